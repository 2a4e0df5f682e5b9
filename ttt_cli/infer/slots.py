"""The model side of a batch: one LMGen over B slots, each slot reset, restored, measured and captured alone."""

from __future__ import annotations

import contextlib
import typing as tp

import numpy as np
import torch

from ..fastweights.attach import ttt_layers
from ..fastweights.graphs import TTTLMGen
from ..state import FastWeightState, capture, check_fits, load_state, restore
from ..telemetry import recording, take_rows
from .options import InferOptions
from .streams import MimiStreams

# Cumulative telemetry counters (SPEC §3.7): a batch slot keeps them across the files it plays, so
# results report them from the stream's start, as if the stream had the slot alone.
COUNTERS = ("updates", "resets", "clip_events", "nonfinite_events")


def initial_state(model, opts: InferOptions) -> FastWeightState | None:
    """The `--init-state` snapshot every stream starts from, checked against the model; None without one.

    Args:
        model: a TTTModel.
        opts: the options (`init_state`, `force`).
    """
    if opts.init_state is None:
        return None
    state = load_state(opts.init_state)
    if state.has_attention:
        # infer starts new LMGen streams: only the fast weights carry over (SPEC §5.0 semantics).
        state = FastWeightState({k: v for k, v in state.tensors.items() if k.startswith("layers.")},
                                {**state.meta, "attention": False, "attention_state": None})
    check_fits(model.lm, state).raise_unless_fits(opts.force, flag="--force-state")
    return state


class Slots:
    """moshi's LMGen and Mimi over B batch slots, each slot with its own attention, fast weights and Mimi state.

    A slot whose stream ended takes the next one after a reset of that slot only
    (`LMGen(support_out_of_sync=True)` + exec masks, pitfall 8).

    Args:
        model: a TTTModel.
        B: the batch slots.
        sampling: LMGen's sampling settings (`sampling_settings`).
        opts: the options (`force`, `telemetry`, `save_state`).
        init_state: the snapshot every stream starts from, or None.
    """

    def __init__(self, model, B: int, sampling: dict, opts: InferOptions, init_state: FastWeightState | None = None):
        self.m, self.lm, self.B, self.opts, self.init_state = model, model.lm, B, opts, init_state
        self.device = self.lm.device
        # moshi's LMGen with one CUDA graph per step phase: graphs stay on with TTT on (SPEC §8.6).
        self.lm_gen = TTTLMGen(self.lm, support_out_of_sync=True, **sampling)
        self.codec = MimiStreams(model.mimi, B, self.device)
        self._lm_mask: list[bool] | None = None  # the exec mask LMGen has now (None: unknown)

    @contextlib.contextmanager
    def streaming(self) -> tp.Iterator[None]:
        """LMGen streaming over the B slots; the update series recorded when --telemetry asks for them."""
        with recording(self.lm, self.opts.telemetry is not None), self.lm_gen.streaming(self.B):
            yield

    def mask(self, bits: list[bool]) -> torch.Tensor:
        """The slots `bits` selects, as LMGen's mask [B] bool."""
        return torch.tensor(bits, dtype=torch.bool, device=self.device)

    def step(self, bits: list[bool], user: torch.Tensor, replace: torch.Tensor | None = None,
             reset: list[bool] | None = None) -> torch.Tensor:
        """One LMGen step of the slots `bits` selects: tokens [B, 1 + dep_q, 1] (-1 where none yet).

        Args:
            bits: the slots that step (the exec mask; LMGen is told only when it changes).
            user: the input stream's codes [B, n_q, 1].
            replace: transcribe: Moshi-stream tokens [B, dep_q, 1] forced on the depformer.
            reset: slots whose fast weights (not attention) reset before this step (`reset_every_steps`).
        """
        if bits != self._lm_mask:
            self.lm_gen.set_exec_mask(self.mask(bits))
            self._lm_mask = list(bits)
        if reset is not None and any(reset):
            mask = self.mask(reset)
            for layer in ttt_layers(self.lm).values():
                layer.reset_streaming(mask)
        return self.lm_gen.step(user, depformer_replace_tokens=replace)

    def start(self, b: int) -> dict[int, dict]:
        """Fresh state for slot b: LMGen and LM (attention, fast weights) reset for b only, a new Mimi state.

        Returns:
            the slot's telemetry now: the baseline its counters are counted from.
        """
        self.lm_gen.reset_streaming(self.mask([i == b for i in range(self.B)]))
        self._lm_mask = None  # a reset sets the item's exec mask to True
        self.codec.start(b)
        if self.init_state is not None:
            restore(self.lm, self.init_state, batch_index=b, force=self.opts.force)
        if self.opts.telemetry is not None:
            take_rows(self.lm, b)  # the slot's earlier stream and this start: the new file's series starts here
        return self.telemetry(b)

    def telemetry(self, b: int, since: dict[int, dict] | None = None) -> dict[int, dict]:
        """Per-layer telemetry of slot b; counters counted from `since` (the stream's start)."""
        out = {i: dict(layer.telemetry(b)) for i, layer in ttt_layers(self.lm).items()}
        for i, tel in out.items():
            base = (since or {}).get(i, {})
            for k in COUNTERS:
                if k in tel and k in base:
                    tel[k] -= base[k]
        return out

    def updates(self, b: int) -> dict:
        """The update series of slot b since it was last taken ({layer: [UpdateRow]}; --telemetry records them)."""
        return take_rows(self.lm, b)

    def end_state(self, b: int) -> FastWeightState | None:
        """--save-state: the fast weights of slot b now (its stream's end), else None."""
        return capture(self.m, batch_index=b) if self.opts.save_state is not None else None

    def encode(self, frames: list[np.ndarray | None]) -> torch.Tensor:
        """Mimi codes [B, n_q, 1] of one frame [FRAME_SIZE] per slot (zeros where a slot has none)."""
        codes = torch.zeros(self.B, self.m.mimi.num_codebooks, 1, dtype=torch.long, device=self.device)
        for b, f in enumerate(frames):
            if f is not None:
                x = torch.from_numpy(np.ascontiguousarray(f)).to(self.device)[None, None]  # [1, 1, FRAME_SIZE]
                codes[b] = self.codec.encode(b, x)[0]  # [n_q, 1]
        return codes

    def voice(self, out: torch.Tensor, valid: list[bool]) -> dict[int, np.ndarray]:
        """Moshi's voice [FRAME_SIZE] float32 of each slot with a valid output, from its tokens out [B, 1 + dep_q, 1]."""
        pcm = {}
        for b in range(self.B):
            if valid[b]:
                y = self.codec.decode(b, out[b:b + 1, 1:])  # [1, 1, FRAME_SIZE]
                pcm[b] = y[0, 0].float().cpu().numpy()
        return pcm
