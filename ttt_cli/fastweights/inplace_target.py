"""In-Place TTT's target V̂ (SPEC §3.2): a Conv1D inside the chunk and W_target over the token embeddings X0."""

from __future__ import annotations

import typing as tp

import torch
from torch import nn
from torch.nn import functional as F

from moshi.models.lm import LMModel
from moshi.modules.lora import LoRALinear

from .interface import DerivedTensor

F32 = torch.float32


def linear_weight(m: nn.Module) -> torch.Tensor:
    """The effective weight of a moshi linear (plain or LoRA-wrapped)."""
    if isinstance(m, LoRALinear):
        return m.merge_weight()
    return m.weight


class ChunkConv1d(nn.Module):
    """Conv1D over the time axis of *one chunk*, zero-padded inside the chunk only (SPEC §3.2)."""

    def __init__(self, dim: int, kernel_size: int, padding: str):
        super().__init__()
        self.kernel_size = kernel_size
        self.padding = padding
        self.conv = nn.Conv1d(dim, dim, kernel_size, bias=False, dtype=F32)

    def pads(self) -> tuple[int, int]:
        k = self.kernel_size
        left = 0 if self.padding == "right" else (k - 1) // 2
        return left, k - 1 - left

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, L, d], each row one chunk (or the completed prefix of one). Padding here, never
        # across rows, is what keeps a chunk's target from seeing the next chunk (pitfall 1).
        y = F.conv1d(F.pad(x.transpose(1, 2), self.pads()), self.conv.weight)  # [N, d, L]
        return y.transpose(1, 2)


class TargetGenerator(nn.Module):
    """V̂ = Conv1D_K(X0 of one chunk) · W_targetᵀ."""

    def __init__(self, dim: int, kernel_size: int, padding: str):
        super().__init__()
        self.conv1d = ChunkConv1d(dim, kernel_size, padding)
        self.W_target = nn.Linear(dim, dim, bias=False, dtype=F32)
        self._fold = DerivedTensor()  # the folded kernel

    def forward(self, x0: torch.Tensor, folded: bool = False) -> torch.Tensor:
        """V̂ [N, L, d] of x0 [N, L, d]. `folded`: as one convolution with W_target folded into its kernel
        (K d² MACs a token instead of (K+1) d²), from a cached kernel: for calls outside a captured graph
        (a graph would keep the kernel it captured after the weights change). The result is then a
        transposed view whose transpose, what Δ = V̂ᵀZ reads, is contiguous."""
        if folded:
            # The convolution as one GEMM over the chunk's K-token windows (faster than mkldnn's conv1d on
            # CPU, and no transposed copy of X0): windows[n, t, i·K + k] = X0[n, t + k - left, i].
            N, L, d = x0.shape
            windows = F.pad(x0, (0, 0, *self.conv1d.pads())).unfold(1, self.conv1d.kernel_size, 1)  # [N, L, d, K]
            y = torch.matmul(self.folded_kernel(), windows.reshape(N, L, -1).transpose(1, 2))  # [N, d, L]
            return y.transpose(1, 2)
        return F.linear(self.conv1d(x0), self.W_target.weight)  # [N, L, d]

    @torch.no_grad()
    def folded_kernel(self) -> torch.Tensor:
        """W_target folded into the conv kernel, kernel'_k = W_target · conv_k, as [d, d·K] (column i·K + k;
        V̂_t = Σ_k kernel'_k X0_{t+k-left}), cached until either weight changes (in place, replaced, moved or
        cast): the fold costs K d³ MACs, what K d tokens' targets save."""
        conv, wt = self.conv1d.conv.weight, self.W_target.weight  # [d, d, K], [d, d]
        # [d, d·K]: conv's [d, d, K] with (i, k) flattened
        return self._fold.get((conv, wt), lambda: wt @ conv.reshape(conv.shape[0], -1))

    @torch.no_grad()
    def init_ntp(self) -> None:
        """Training-free next-token target: V̂_t = X0_{t+1} inside the chunk, 0 on its last row."""
        k = self.conv1d.kernel_size
        tap = 1 if self.conv1d.padding == "right" else (k - 1) // 2 + 1
        if tap >= k or (self.conv1d.padding == "center" and k < 3):
            raise ValueError(f"ntp init needs a tap reading t+1: kernel {k} with "
                             f"{self.conv1d.padding} padding has none (center needs K >= 3).")
        d = self.W_target.weight.shape[0]
        eye = torch.eye(d, dtype=F32, device=self.W_target.weight.device)
        self.conv1d.conv.weight.zero_()
        self.conv1d.conv.weight[:, :, tap] = eye
        self.W_target.weight.copy_(eye)

    @torch.no_grad()
    def init_zero(self) -> None:
        """The fork's warm start: W_target = 0, so TTT has no effect until trained; conv = 0 too."""
        self.conv1d.conv.weight.zero_()
        self.W_target.weight.zero_()

    def init(self, target_init: str) -> None:
        """`zero` (the fork's warm start) or `ntp` (SPEC §3.6)."""
        if target_init == "zero":
            self.init_zero()
        else:
            self.init_ntp()


class X0Source:
    """Per-LM holder of the current call's token embeddings, filled by forward hooks.

    `input`: the sum of the token embeddings (audio and text, no condition); `text`: `lm.text_emb`'s output.
    """

    def __init__(self) -> None:
        self.input: torch.Tensor | None = None
        self.text: torch.Tensor | None = None
        self.handles: list[tp.Any] = []

    def get(self, source: str, B: int, T: int) -> torch.Tensor:
        x0 = self.input if source == "input" else self.text
        if x0 is None or x0.shape[:2] != (B, T):
            raise RuntimeError("In-Place TTT layer called without its token embeddings: "
                               "call it through lm.forward_text / LMGen, not on its own.")
        return x0


def x0_source(lm: LMModel) -> X0Source:
    """Hooks that give TTT layers the current call's token embeddings (SPEC §3.2), one set per LM.

    `input` is the sum of the audio and text token embeddings *before* any condition is added (the
    fork's `token_embeddings`), summed in moshi's order (audio codebooks in order, then text) so that
    it equals moshi's transformer input bit for bit when there is no condition.
    """
    src = getattr(lm, "_ttt_x0", None)
    if src is None:
        src = X0Source()
        acc: list = [None]  # running sum of this call's audio embeddings

        def grab_audio(index: int):
            def hook(_mod, _args, out):
                acc[0] = out if index == 0 or acc[0] is None else acc[0] + out
            return hook

        def grab_text(_mod, _args, out):
            src.text = out
            src.input = out if acc[0] is None else acc[0] + out
            acc[0] = None

        def clear(_mod, _args, _out):
            src.input = src.text = None
            acc[0] = None

        src.handles = [emb.register_forward_hook(grab_audio(i)) for i, emb in enumerate(lm.emb)]
        src.handles += [lm.text_emb.register_forward_hook(grab_text),
                        lm.transformer.register_forward_hook(clear)]
        lm._ttt_x0 = src
    return src
