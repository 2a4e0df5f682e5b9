"""The learner's per-stream state (SPEC §3.9): θ_start as θ̃ = [W; b], the pending gradient sums, counters; reset
and the mini-batch end."""

from __future__ import annotations

import typing as tp
from dataclasses import dataclass, field

import torch

from .learner_math import F32, tilde_of


@dataclass
class LearnerState:
    """One learner's per-stream tensors: θ_start, the pending tokens' gradient sums and counters.

    Each inner layer j keeps θ̃_j = [W_j; b_j] in one tensor (and its pending sum S̃_j likewise), so that a token
    reads and learns with one product against x̃ = [x, 1]; `theta` and `sums` name views of them (W_j, b_j), which
    every in-place write goes through; `tilde_bh` and `sums_bh` are the same tensors as [B·H, n_in + 1, n_out] views,
    made once, for a one-token step's `bmm`s, and `tilde_wb`, `sums_wb` their (W [B·H, n_in, n_out], b [B·H, 1,
    n_out]) views, for a product whose input has no 1 appended (the bias row is `baddbmm`'s added term). Counters
    are tensors, so that a one-token step never reads device data on the host; `count` and `tokens` are the rows of
    `steps`, which a token advances in one op.
    """

    theta: dict[str, torch.Tensor]   # θ_start [B, H, ...]: views of `tilde`
    sums: dict[str, torch.Tensor]    # Σ η_s ∇ℓ_s(θ_start) of the pending tokens [B, H, ...]: views of `tilde_sums`
    count: torch.Tensor              # [B] long: pending tokens
    tokens: torch.Tensor             # [B] long: tokens since the last reset
    updates: torch.Tensor            # [B] long
    resets: torch.Tensor             # [B] long
    nonfinite: torch.Tensor          # [B] long
    tilde: list[torch.Tensor] = field(default_factory=list)       # θ̃_j [B, H, n_in + 1, n_out]
    tilde_sums: list[torch.Tensor] = field(default_factory=list)  # S̃_j [B, H, n_in + 1, n_out]
    tilde_bh: list[torch.Tensor] = field(default_factory=list)    # θ̃_j viewed [B·H, n_in + 1, n_out]
    sums_bh: list[torch.Tensor] = field(default_factory=list)     # S̃_j viewed [B·H, n_in + 1, n_out]
    steps: torch.Tensor | None = None                             # [2, B] long: the rows `count`, `tokens`
    tilde_wb: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (W̃_j, b̃_j) of `tilde_bh`
    sums_wb: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)   # the same of `sums_bh`

    @classmethod
    def fresh(cls, start: dict[str, torch.Tensor], batch_size: int, device: torch.device) -> "LearnerState":
        """Every stream at `start` ({W1, b1, ...: [H, ...]}; empty for a frozen learner: counters only)."""
        tilde, tilde_sums, theta, sums = [], [], {}, {}
        for j, t0 in enumerate(tilde_of(start), 1):
            t = t0.detach().to(device, F32).expand(batch_size, -1, -1, -1).clone()
            s = torch.zeros_like(t)
            tilde.append(t)
            tilde_sums.append(s)
            theta[f"W{j}"], theta[f"b{j}"] = t[:, :, :-1], t[:, :, -1]
            sums[f"W{j}"], sums[f"b{j}"] = s[:, :, :-1], s[:, :, -1]
        z = lambda: torch.zeros(batch_size, dtype=torch.long, device=device)  # noqa: E731
        steps = torch.zeros(2, batch_size, dtype=torch.long, device=device)
        bh = [t.view(-1, *t.shape[2:]) for t in tilde]
        sums_bh = [s.view(-1, *s.shape[2:]) for s in tilde_sums]
        wb = lambda ts: [(t[:, :-1], t[:, -1:]) for t in ts]  # noqa: E731
        return cls(theta, sums, steps[0], steps[1], z(), z(), z(), tilde, tilde_sums, bh, sums_bh, steps,
                   wb(bh), wb(sums_bh))

    def reset(self, mask: torch.Tensor, start: dict[str, torch.Tensor]) -> None:
        """Streams in `mask` go back to `start` with nothing pending (masked arithmetic, no host sync)."""
        for th, s, s0 in zip(self.tilde, self.tilde_sums, tilde_of(start)):
            torch.where(mask.view(-1, 1, 1, 1), s0, th, out=th)
            s.masked_fill_(mask.view(-1, 1, 1, 1), 0.0)
        self.count.masked_fill_(mask, 0)
        self.tokens.masked_fill_(mask, 0)
        self.resets.add_(mask.long())

    def complete(self, done: torch.Tensor | None, chunk_size: int, start: dict[str, torch.Tensor],
                 tap: tp.Any = None, back: int = 0, tokens: tp.Any = None) -> None:
        """Mini-batch end for the streams in `done` (None: every stream): θ_start ← θ_start − S/C. A
        non-finite result resets the stream to `start` instead and is counted (SPEC §3.7); θ_start was
        finite, so the result is non-finite exactly when the stream's pending sum is (or overflows).
        `tap` (a `recording.LearnerTap`) records the update series' rows: `back` positions of the call
        follow the completion, `tokens` were in the mini-batch (default C)."""
        before = {k: v.clone() for k, v in self.theta.items()} if tap is not None and tap.active else None
        finite = torch.stack([torch.isfinite(s.flatten(1).sum(1)) for s in self.tilde_sums]).all(0)  # [B]
        ok, bad = (finite, ~finite) if done is None else (done & finite, done & ~finite)
        shape = (-1, 1, 1, 1)  # [B] against [B, H, n_in + 1, n_out]
        for th, s in zip(self.tilde, self.tilde_sums):
            if done is None:
                th.sub_(s, alpha=1.0 / chunk_size)
                s.zero_()
            else:
                th.sub_(torch.where(done.view(shape), s, 0.0), alpha=1.0 / chunk_size)
                s.masked_fill_(done.view(shape), 0.0)
        for th, t0 in zip(self.tilde, tilde_of(start)):
            torch.where(bad.view(shape), t0, th, out=th)
        if done is None:
            self.count.zero_()
        else:
            self.count.masked_fill_(done, 0)
        self.updates.add_(ok.long())
        self.nonfinite.add_(bad.long())
        if before is not None:
            tap.completed(before, self.theta, ok, bad, back, chunk_size if tokens is None else tokens)
