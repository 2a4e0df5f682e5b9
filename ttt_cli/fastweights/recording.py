"""The update series of SPEC §3.7: per-update rows gathered in preallocated device tensors, read once per file.

A layer that records owns one `UpdateRecorder` in its streaming state. Where the layer already applies an
update (a completed mini-batch, a flush), resets a stream or meets a non-finite update, it writes one row
per stream with masked tensor arithmetic: the row goes to the stream's write position and the position
advances only where the mask is true, so recording reads no device value on the host and is graph safe.
The host keeps an upper bound of the rows a stream can have produced since the buffer was last read (from
tokens it fed, resets and flushes it issued) and reads the buffer (`drain`) only when that bound could
exceed its capacity and when a file ends (`take`). Norms are stored squared and per part (an adapter
group's learners are parts), so that the host adds them over every fast tensor of the layer.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

EVENTS = ("update", "reset", "nonfinite")
UPDATE, RESET, NONFINITE = 0, 1, 2
# Columns of a device row: event code, part, position (input positions consumed by the stream), tokens of the
# mini-batch, ‖Δ‖² (In-Place: before clipping), ‖θ_after − θ_before‖², ‖θ_after − θ0‖², ‖θ_after‖², clip scale.
_COLS = 9
DEFAULT_CAPACITY = 512  # rows per stream between two host reads
F64 = torch.float64


@dataclass
class UpdateRow:
    """One event of one stream of one layer, as the CSV has it (SPEC §3.7)."""

    event: str         # update | reset | nonfinite
    update: int        # index since the last reset, from 0
    step: int          # input positions consumed when it happened, from the file's start
    tokens: int        # tokens in the mini-batch (0 for resets)
    delta_norm: float  # In-Place: ‖Δ‖_F before clipping; variants: = step_norm
    clip_scale: float  # 1 when not clipped
    step_norm: float   # ‖θ_after − θ_before‖_F
    drift: float       # ‖θ_after − θ0‖_F / ‖θ0‖_F
    w_norm: float      # ‖θ_after‖_F


def squared_norms(after: dict[str, torch.Tensor], before: dict[str, torch.Tensor],
                  theta0: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(‖after − before‖², ‖after − θ0‖², ‖after‖²) per stream [B], float64 sums over every tensor.

    Args:
        after, before: per-stream tensors [B, ...] by name.
        theta0: the initial tensors [...] by name (broadcast over streams).
    """
    step = drift = w = None
    for k, a in after.items():
        a = a.flatten(1)  # [B, n]
        terms = ((a - before[k].flatten(1)), (a - theta0[k].reshape(1, -1).to(a)), a)
        sq = [torch.linalg.vector_norm(t, dim=1).to(F64).square() for t in terms]
        step, drift, w = (sq[0], sq[1], sq[2]) if step is None else (step + sq[0], drift + sq[1], w + sq[2])
    return step, drift, w  # type: ignore[return-value]


def layer_event(parts: list[list[float]], index: int, step: int, theta0_sq: float) -> list[UpdateRow]:
    """A stream's layer event from the device rows its parts wrote at one position (squares added over parts).
    A non-finite update is a `nonfinite` row followed by the `reset` it caused.

    Args:
        parts: the rows (9 columns each) of the layer's parts at this position.
        index: the stream's updates since its last reset (the event's `update`).
        step: the position, from the file's start.
        theta0_sq: ‖θ0‖² of the layer, for the relative drift.
    """
    tokens = int(parts[0][3])
    if any(int(r[0]) == NONFINITE for r in parts):
        return [UpdateRow("nonfinite", index, step, tokens, 0.0, 1.0, 0.0, 0.0, 0.0),
                UpdateRow("reset", 0, step, 0, 0.0, 1.0, 0.0, 0.0, 0.0)]
    delta, step_n, drift, w = (math.sqrt(sum(r[k] for r in parts)) for k in (4, 5, 6, 7))
    return [UpdateRow("update", index, step, tokens, delta, min(r[8] for r in parts), step_n,
                      drift / math.sqrt(theta0_sq) if theta0_sq > 0 else 0.0, w)]


class UpdateRecorder:
    """Event rows of one fast-weight layer's streams, in a preallocated [B, capacity, 9] float64 buffer.

    Args:
        batch_size: streams.
        device: where the rows are gathered (the layer's device).
        chunk_size: the layer's mini-batch (bounds the updates per token fed).
        parts: learners that record separately and add up to the layer (an adapter group: one per target).
        capacity: rows per stream between two host reads.
    """

    def __init__(self, batch_size: int, device: torch.device | str, chunk_size: int, parts: int = 1,
                 capacity: int = DEFAULT_CAPACITY):
        self.B, self.chunk_size, self.parts, self.capacity = batch_size, chunk_size, parts, capacity
        self.buf = torch.zeros(batch_size, capacity, _COLS, dtype=F64, device=device)
        self.ptr = torch.zeros(batch_size, dtype=torch.long, device=device)          # next row per stream
        self.pos = torch.zeros(parts, batch_size, dtype=torch.long, device=device)   # positions consumed
        self._rows = torch.arange(batch_size, device=device)
        self.paused = False
        self.host_driven = False  # a graphed caller calls `host_advance` per step itself (fastweights.graphs)
        # host side
        self._fed = 0        # tokens fed (max over streams) since the last drain
        self._extra = 0      # resets and flushes since the last drain (rows they may add)
        self._held: list[list[torch.Tensor]] = [[] for _ in range(batch_size)]  # drained rows per stream
        self._origin = [0] * batch_size        # position where the stream's current file started
        self._since_reset = [0] * batch_size   # updates since the stream's last reset

    # -- device side (no host reads) -----------------------------------------------------------------
    def _bound(self, more_tokens: int = 0, more_extra: int = 0) -> int:
        C = self.chunk_size
        return self.parts * ((self._fed + more_tokens + C - 1) // C + 1 + self._extra + more_extra)

    def _reserve(self, tokens: int = 0, extra: int = 0) -> None:
        if self._bound(tokens, extra) > self.capacity:
            self.drain()
        self._fed += tokens
        self._extra += extra

    def advance(self, part: int, live: torch.Tensor, tokens: int) -> None:
        """At the start of a call of `tokens` positions: the streams in `live` [B] bool consume them.

        Inside a compiled or captured step the host half (the row bound, a possible read) cannot run: the
        caller that replays the step calls `host_advance(tokens)` per step outside it instead."""
        if part == 0 and not self.host_driven and not torch.compiler.is_compiling():
            self.host_advance(tokens)
        self.pos[part].add_(live.long() * tokens)

    def host_advance(self, tokens: int) -> None:
        """The host half of `advance`: `tokens` more positions may complete mini-batches (reads if needed)."""
        self._reserve(tokens=tokens)

    def _write(self, mask: torch.Tensor, row: torch.Tensor) -> None:
        """Row [B, 9] goes to each stream's write position; the position advances where `mask` [B] is true."""
        idx = self.ptr.clamp(max=self.capacity - 1)
        self.buf[self._rows, idx] = row
        self.ptr.add_(mask.long())

    def record(self, part: int, mask: torch.Tensor, back: int, tokens, step_sq: torch.Tensor,
               drift_sq: torch.Tensor, w_sq: torch.Tensor, delta_sq: torch.Tensor | None = None,
               clip_scale: torch.Tensor | float = 1.0, nonfinite: torch.Tensor | None = None) -> None:
        """Update rows for the streams in `mask` [B] (non-finite ones, in `nonfinite` [B], get zero norms).

        Args:
            part: the learner that updated.
            back: positions of the current call fed after the update (the row's position is pos − back).
            tokens: tokens in the mini-batch (int or [B]).
            step_sq, drift_sq, w_sq: squared norms [B] (see `squared_norms`).
            delta_sq: ‖Δ‖² before clipping [B] (None: = step_sq).
            clip_scale: [B] or a number.
        """
        if self.paused:
            return
        z = torch.zeros(self.B, dtype=F64, device=self.buf.device)
        event = z if nonfinite is None else nonfinite.to(F64) * NONFINITE
        norms = [step_sq if delta_sq is None else delta_sq, step_sq, drift_sq, w_sq]
        if nonfinite is not None:
            norms = [torch.where(nonfinite, z, v.to(F64)) for v in norms]
        cols = [event, z + part, (self.pos[part] - back).to(F64), z + tokens if not torch.is_tensor(tokens)
                else tokens.to(F64), *[v.to(F64) for v in norms], z + clip_scale if not torch.is_tensor(clip_scale)
                else clip_scale.to(F64)]
        self._write(mask, torch.stack(cols, 1))

    def record_reset(self, mask: torch.Tensor) -> None:
        """A reset row (zeros in the norm columns) for the streams in `mask` [B] bool."""
        if self.paused:
            return
        self._reserve(extra=1)
        z = torch.zeros(self.B, dtype=F64, device=self.buf.device)
        row = torch.stack([z + RESET, z, self.pos[0].to(F64), z, z, z, z, z, z + 1.0], 1)
        self._write(mask.to(self.buf.device), row)

    def expect_flush(self) -> None:
        """A flush is about to record (at most one row per part and stream)."""
        self._reserve(extra=1)

    # -- host side -----------------------------------------------------------------------------------
    def drain(self) -> None:
        """Moves the rows gathered so far to the host (one device read); the buffer starts over."""
        counts = self.ptr.tolist()
        if max(counts, default=0) > self.capacity:  # a compiled/graphed caller skipped `host_advance`
            warnings.warn(f"update series: {max(counts) - self.capacity} row(s) of a stream were lost (the buffer "
                          f"of {self.capacity} rows was not read in time); the series has gaps.")
            counts = [min(c, self.capacity) for c in counts]
        n = max(counts) if counts else 0
        if n:
            rows = self.buf[:, :n].cpu()
            for b, c in enumerate(counts):
                if c:
                    self._held[b].append(rows[b, :c].clone())
            self.ptr.zero_()
        self._fed = self._extra = 0

    def take(self, b: int, theta0_sq: float) -> list[UpdateRow]:
        """Stream b's rows since the last `take` (its file), final; the next file starts here.

        Args:
            theta0_sq: ‖θ0‖² of the layer (all its fast tensors), for the relative drift.
        """
        self.drain()
        rows = torch.cat(self._held[b]) if self._held[b] else torch.zeros(0, _COLS, dtype=F64)
        self._held[b] = []
        origin = self._origin[b]
        self._origin[b] = int(self.pos[0, b])
        out: list[UpdateRow] = []
        group: dict[int, list[list[float]]] = {}  # position -> rows of its parts (a reset closes a group)

        def close() -> None:
            for p in sorted(group):
                event = layer_event(group[p], self._since_reset[b], p - origin, theta0_sq)
                self._since_reset[b] = 0 if event[-1].event == "reset" else self._since_reset[b] + 1
                out.extend(event)
            group.clear()

        for r in rows.tolist():
            if int(r[0]) == RESET:
                close()
                self._since_reset[b] = 0
                out.append(UpdateRow("reset", 0, int(r[2]) - origin, 0, 0.0, 1.0, 0.0, 0.0, 0.0))
            else:
                group.setdefault(int(r[2]), []).append(r)
        close()
        return out


@dataclass
class LearnerTap:
    """Where a ttt-lm learner (SPEC §3.9) writes its completions: its layer's recorder, as part `part`."""

    recorder: UpdateRecorder
    part: int
    theta0: dict[str, torch.Tensor]  # the learner's θ0 [H, ...] (drift is measured from it)

    @property
    def active(self) -> bool:
        return not self.recorder.paused

    def completed(self, before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], ok: torch.Tensor,
                  bad: torch.Tensor, back: int, tokens) -> None:
        """Rows for the streams that completed a mini-batch (`ok` [B]) or met a non-finite one (`bad` [B])."""
        sq = squared_norms(after, before, self.theta0)
        self.recorder.record(self.part, ok | bad, back, tokens, *sq, nonfinite=bad)
