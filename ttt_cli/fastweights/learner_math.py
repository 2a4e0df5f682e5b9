"""The closed-form pieces of the ttt-lm learner (SPEC §3.9): LayerNorm and its ℓ2 gradient, the inner model's key
gradients, the dual form's query outputs and the gradient sums. All math float32; no state."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

F32 = torch.float32
LN_EPS = 1e-6


def _bcast(v: torch.Tensor) -> torch.Tensor:
    return v.unsqueeze(1)  # [H, p] -> [H, 1, p], against [B, H, L, p]


def tilde_of(theta: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """θ̃_j = [W_j; b_j] of each inner layer j: {W1 [..., n_in, n_out], b1 [..., n_out], ...} -> [[..., n_in + 1, n_out]]."""
    return [torch.cat([theta[f"W{j}"], theta[f"b{j}"].unsqueeze(-2)], -2) for j in range(1, len(theta) // 2 + 1)]


def ln_l2_grad_given(z: torch.Tensor, g2: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """`Norm.l2_grad` from γ² and c = γ ⊙ (β − y), broadcastable against z: ∂ℓ/∂x̂ = γ² ⊙ x̂ + c (the scan of
    `learner_scan` makes c once for many mini-batches)."""
    p = z.shape[-1:]
    xhat, mean, rstd = torch.native_layer_norm(z, p, None, None, LN_EPS)  # torch.ops.aten's binding costs more per call
    return torch.ops.aten.native_layer_norm_backward(torch.addcmul(c, g2, xhat), z, p, mean, rstd, None, None,
                                                     [True, False, False])[0]


@dataclass(frozen=True)
class Norm:
    """A learner's LayerNorm (γ, β) shaped [H, 1, p] against [B, H, L, p], with γ² and γ ⊙ β made once: what a
    one-token step and a frozen read need from it in few ops (a layer caches it while γ and β are unchanged)."""

    gamma: torch.Tensor  # γ [H, 1, p]
    beta: torch.Tensor   # β [H, 1, p]
    g2: torch.Tensor     # γ² [H, 1, p]
    gbeta: torch.Tensor  # γ ⊙ β [H, 1, p]

    @classmethod
    def of(cls, gamma: torch.Tensor, beta: torch.Tensor) -> "Norm":
        """From γ, β [H, p]."""
        g, b = _bcast(gamma), _bcast(beta)
        return cls(g, b, g * g, g * b)

    def scaled(self, eta: torch.Tensor) -> "Norm":
        """The norm whose `l2_grad` is η·∇ (∂ℓ/∂z is linear in ∂ℓ/∂x̂ = γ² ⊙ x̂ + γ ⊙ (β − y), so η scales γ² and γ
        and γ ⊙ β); for `l2_grad` only. eta: broadcastable against [H, 1, p]."""
        return Norm(self.gamma * eta, self.beta, self.g2 * eta, self.gbeta * eta)

    def out(self, q: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """q + LN(z), LN_h(z) = γ_h ⊙ (z − mean) / sqrt(var + 1e-6) + β_h over the last dim (population variance)."""
        xhat = torch.native_layer_norm(z, z.shape[-1:], None, None, LN_EPS)[0]
        return torch.addcmul(q + self.beta, self.gamma, xhat)

    def l2_grad(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """∂/∂z of ½‖LN(z) − y‖² in closed form: ∂ℓ/∂x̂ = γ ⊙ (LN(z) − y), then the LayerNorm backward
        rstd·(g − mean g − x̂·mean(g ⊙ x̂)) (ttt-lm's `ln_fused_l2_bwd`), here ATen's LayerNorm kernels."""
        return ln_l2_grad_given(z, self.g2, torch.addcmul(self.gbeta, self.gamma, y, value=-1.0))


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def key_gradients(inner: str, theta: dict[str, torch.Tensor], k: torch.Tensor, y: torch.Tensor,
                  norm: Norm) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per inner layer j, (a_s, g_s) for every key: ∇_{Wj} ℓ_s = a_sᵀ g_s and ∇_{bj} ℓ_s = g_s, at θ (= θ_start).

    Args:
        theta: W1 [B,H,p,n1], b1 [B,H,n1] (and W2, b2 for mlp).
        k, y: keys and targets [B,H,L,p].
        norm: the learner's LayerNorm.
    """
    z1 = k @ theta["W1"] + theta["b1"][:, :, None]  # [B,H,L,n1]
    if inner == "linear":
        return [(k, norm.l2_grad(z1, y))]
    x2 = gelu_tanh(z1)
    z2 = x2 @ theta["W2"] + theta["b2"][:, :, None]  # [B,H,L,p]
    g2 = norm.l2_grad(z2, y)
    # g1 = (g2 W2ᵀ) ⊙ gelu_tanh'(z1), with ATen's closed-form gelu backward
    g1 = torch.ops.aten.gelu_backward(g2 @ theta["W2"].transpose(-1, -2), z1, approximate="tanh")  # [B,H,L,4p]
    return [(k, g1), (x2, g2)]


_LOWER: dict[tuple[int, torch.device], torch.Tensor] = {}


def lower(L: int, device: torch.device) -> torch.Tensor:
    """[L, L] float mask of s ≤ t (cached: torch.tril on tiny tensors is slow under CPU contention)."""
    key = (L, torch.device(device))
    if key not in _LOWER:
        _LOWER[key] = torch.ones(L, L, dtype=F32).tril().to(device)
    return _LOWER[key]


def query_outputs(theta: dict[str, torch.Tensor], sums: dict[str, torch.Tensor] | None, q: torch.Tensor,
                  grads: list[tuple[torch.Tensor, torch.Tensor]], eta: torch.Tensor, idx: torch.Tensor,
                  norm: Norm) -> torch.Tensor:
    """o_t = q_t + LN(f_θt(q_t)) in dual form for a segment of one mini-batch.

    Args:
        sums: running sums of the mini-batch's earlier tokens (None: there are none).
        grads: `key_gradients` of the segment's tokens.
        eta: η_s [B,H,L].
        idx: i, the 1-based position of each token in its mini-batch, [B,L] float.
        norm: the learner's LayerNorm.
    """
    inv_i = (1.0 / idx)[:, None, :, None]  # [B,1,L,1]
    causal = eta[:, :, None, :] * lower(q.shape[2], q.device)  # [B,H,L,L]: η_s where s ≤ t
    h = q
    z = q
    n = len(grads)
    for j, (a, g) in enumerate(grads, 1):
        z = h @ theta[f"W{j}"] + theta[f"b{j}"][:, :, None]
        corr = ((h @ a.transpose(-1, -2) + 1.0) * causal) @ g  # Σ_{s≤t} η_s (h_t·a_s + 1) g_s
        if sums is not None:
            corr = corr + h @ sums[f"W{j}"] + sums[f"b{j}"][:, :, None]
        z = z - corr * inv_i
        if j < n:
            h = gelu_tanh(z)
    return norm.out(q, z)


def gradient_sums(grads: list[tuple[torch.Tensor, torch.Tensor]], eta: torch.Tensor) -> dict[str, torch.Tensor]:
    """Σ_s η_s ∇ℓ_s over a segment: {Wj: Σ η a_sᵀ g_s [B,H,n_in,n_out], bj: Σ η g_s [B,H,n_out]}."""
    out = {}
    e = eta[..., None]  # [B,H,L,1]
    for j, (a, g) in enumerate(grads, 1):
        out[f"W{j}"] = (e * a).transpose(-1, -2) @ g
        out[f"b{j}"] = (e * g).sum(-2)
    return out


def frozen_outputs(inner: str, theta: dict[str, torch.Tensor], q: torch.Tensor, norm: Norm) -> torch.Tensor:
    """o = q + LN(f_θ(q)) with θ shared by every stream ([H, ...]): the learner with η = 0."""
    z = q @ theta["W1"] + theta["b1"][:, None]
    if inner == "mlp":
        z = gelu_tanh(z) @ theta["W2"] + theta["b2"][:, None]
    return norm.out(q, z)
