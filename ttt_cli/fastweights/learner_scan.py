"""The learner's fast path (SPEC §3.9): whole mini-batches that every stream starts together, in one scan.

When a call's tokens fill whole mini-batches that every stream begins with nothing pending (a layer's forward
over a sequence, eval's block scoring, streams in phase), the dual form's terms that do not depend on θ are made
once for the whole call, batched over the mini-batches: the query-key weights (q̃_t·k̃_s) η_s / i_t, the keys
scaled by η_s / C of the update, γ ⊙ (β − y) of the LayerNorm gradient. What is left per mini-batch is what
θ_start changes: the keys' product with θ_start, the LayerNorm gradient and the update (`linear`: five tensor
ops; it keeps every mini-batch's θ̃ and reads all queries after the loop in two batched products), plus the
queries' correction and second layer for `mlp`, whose second layer needs the corrected hidden activations:
instead of some forty ops. At the variants' sizes (rank 32, mini-batches of 8) the per-mini-batch path's cost
is its op count, not its FLOPs.

The bias rides in θ̃ = [W; b] against inputs x̃ = [x, 1]: h·a + 1 = h̃·ã, and one product serves both. Same
arithmetic as the per-mini-batch path of `learner.learn` up to float summation order; `learn` falls back to that
path when a result is not finite (there a non-finite update resets its stream, SPEC §3.7).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .learner_math import F32, Norm, gelu_tanh, ln_l2_grad_given, lower, tilde_of

# The query-key weights of the mini-batches scanned at once take N·B·H·C² floats (and the linear scan keeps each
# mini-batch's θ̃): groups of mini-batches are scanned one after the other so that they stay under this (a chunk
# of 512 on many heads would not fit at once).
GROUP_BYTES = 32 << 20


def _tilde(x: torch.Tensor) -> torch.Tensor:
    """x̃ = [x, 1] along the last dim."""
    return F.pad(x, (0, 1), value=1.0)


def scan_mini_batches(theta: dict[str, torch.Tensor], inner: str, q: torch.Tensor, k: torch.Tensor, y: torch.Tensor,
                      eta: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, chunk_size: int
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
    """Reads and learns T / C whole mini-batches of every stream, from θ_start = `theta` with nothing pending.

    Args:
        theta: θ_start {W1 [B,H,p,n1], b1 [B,H,n1] (and W2 [B,H,n1,p], b2 [B,H,p] for mlp)}; not modified.
        inner: linear | mlp.
        q, k, y: queries, keys, targets [B,H,T,p] float32, T a multiple of C.
        eta: η_s [B,H,T] float32.
        gamma, beta: the learner's LayerNorm [H, p].
        chunk_size: C.
    Returns:
        (o [B,H,T,p], θ_start after the T / C updates, named as `theta`), or None when a result is not finite.
    """
    B, H, T, p = q.shape
    C, BH = chunk_size, B * H
    # θ̃_j = [W_j; b_j] per stream and head: [BH, n_in + 1, n_out]
    th = [t.reshape(BH, *t.shape[2:]) for t in tilde_of(theta)]  # a copy: the state is written only at the end
    per_head = Norm.of(gamma.repeat(B, 1), beta.repeat(B, 1))  # [BH, 1, p]
    # w[t, s] = [s ≤ t] / i_t: every mini-batch starts empty, so token t is its (t + 1)-th
    w = lower(C, q.device) / torch.arange(1, C + 1, dtype=F32, device=q.device)[:, None]  # [C, C]
    per_batch_bytes = 4 * BH * (C * C + th[0].shape[1] * th[0].shape[2])  # its weights, its kept θ̃ (linear)
    group = max(1, GROUP_BYTES // per_batch_bytes) * C
    zs = []
    for a in range(0, T, group):
        b = min(T, a + group)
        zs.append(_scan(th, q[:, :, a:b], k[:, :, a:b], y[:, :, a:b], eta[:, :, a:b], per_head, w, C))
    if not all(bool(torch.isfinite(t).all()) for t in th):  # non-finite θ stays so: the last one tells
        return None
    z = torch.cat(zs, 2) if len(zs) > 1 else zs[0]  # [B,H,T,p]
    out = {}
    for j, t in enumerate(th, 1):
        n_in = theta[f"W{j}"].shape[-2]
        out[f"W{j}"] = t[:, :n_in].reshape(theta[f"W{j}"].shape)
        out[f"b{j}"] = t[:, n_in].reshape(theta[f"b{j}"].shape)
    return Norm.of(gamma, beta).out(q, z), out


def _scan(th: list[torch.Tensor], q: torch.Tensor, k: torch.Tensor, y: torch.Tensor, eta: torch.Tensor,
          norm: Norm, w: torch.Tensor, C: int) -> torch.Tensor:
    """One group of mini-batches: θ̃ in `th` updated in place; returns the pre-LayerNorm outputs z [B,H,L,p]."""
    B, H, L, p = q.shape
    N, BH = L // C, B * H
    g2 = norm.g2  # [BH, 1, p]

    def per_batch(x: torch.Tensor) -> torch.Tensor:  # [B,H,L,n] -> [N,BH,C,n]: mini-batch n, contiguous
        return x.reshape(BH, N, C, x.shape[-1]).transpose(0, 1).contiguous()

    kt, qt = per_batch(_tilde(k)), per_batch(_tilde(q))  # [N,BH,C,p+1]
    e = eta.reshape(BH, N, C).transpose(0, 1)[..., None]  # [N,BH,C,1]: η_s
    c = torch.addcmul(norm.gbeta, norm.gamma, per_batch(y), value=-1.0)  # [N,BH,C,p]: γ ⊙ (β − y)
    wn = e.transpose(-1, -2) * w  # [N,BH,C,C]: η_s [s ≤ t] / i_t
    m1 = torch.matmul(qt, kt.transpose(-1, -2)).mul_(wn)  # [N,BH,C,C]: (q̃_t·k̃_s) η_s [s ≤ t] / i_t
    u1 = (kt * (e / C)).transpose(-1, -2).contiguous()  # [N,BH,p+1,C]: θ̃1 −= u1 @ g1 at the mini-batch end
    if len(th) == 1:  # linear: z = q̃ θ̃ − Σ_{s≤t} w η (q̃·k̃) g
        # Only the keys need θ̃ mini-batch by mini-batch; each θ̃ is kept, so that the queries of every
        # mini-batch are two batched products after the loop (the loop is then five ops a mini-batch).
        (t1,) = th
        thetas = torch.empty(N + 1, *t1.shape, dtype=F32, device=q.device)  # [N+1,BH,p+1,p]: θ̃ before each
        thetas[0].copy_(t1)
        views = thetas.unbind(0)
        gs = []
        for k_n, c_n, u_n, t_n, t_next in zip(kt.unbind(0), c.unbind(0), u1.unbind(0), views, views[1:]):
            gs.append(ln_l2_grad_given(torch.bmm(k_n, t_n), g2, c_n))  # [BH,C,p]
            torch.baddbmm(t_n, u_n, gs[-1], alpha=-1.0, out=t_next)
        t1.copy_(views[N])
        zq = torch.matmul(qt, thetas[:N]).view(N * BH, C, p)  # [N·BH,C,p]
        z = torch.baddbmm(zq, m1.view(N * BH, C, C), torch.stack(gs).view(N * BH, C, p), alpha=-1.0)
        return z.view(N, BH, C, p).transpose(0, 1).reshape(B, H, L, p)
    # mlp: the first layer as above; the second's weights depend on the hidden activations
    kq = torch.cat([kt, qt], 2)  # [N,BH,2C,p+1]: keys, then queries
    z = torch.empty(N, BH, C, p, dtype=F32, device=q.device)
    t1, t2 = th
    for kq_n, c_n, m_n, z_n, u_n, w_n, e_n in zip(*(x.unbind(0) for x in (kq, c, m1, z, u1, wn, e / C))):
        z1 = torch.bmm(kq_n, t1)  # [BH,2C,n1]
        zk = z1[:, :C]
        x2 = _tilde(gelu_tanh(zk))  # [BH,C,n1+1]
        g2n = ln_l2_grad_given(torch.bmm(x2, t2), g2, c_n)  # [BH,C,p]
        g1 = torch.ops.aten.gelu_backward(torch.bmm(g2n, t2[:, :-1].transpose(1, 2)), zk, approximate="tanh")
        h = _tilde(gelu_tanh(torch.baddbmm(z1[:, C:], m_n, g1, alpha=-1.0)))  # [BH,C,n1+1]
        m2 = torch.bmm(h, x2.transpose(1, 2)).mul_(w_n)  # [BH,C,C]: (h̃_t·x̃2_s) η_s [s ≤ t] / i_t
        torch.baddbmm(torch.bmm(h, t2), m2, g2n, alpha=-1.0, out=z_n)
        t1.baddbmm_(u_n, g1, alpha=-1.0)
        t2.baddbmm_((x2 * e_n).transpose(1, 2), g2n, alpha=-1.0)
    return z.transpose(0, 1).reshape(B, H, L, p)
