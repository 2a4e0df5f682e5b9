"""moshi's CUDA graphs with TTT on: one captured `forward_text` per step phase ("step", "step + update of streams S")."""

from __future__ import annotations

import typing as tp
from collections import Counter

from moshi.models.lm import LMGen, LMModel
from moshi.utils.compile import CUDAGraphed

from .attach import ttt_layers

Phase = tp.Tuple[tp.Tuple[int, ...], ...]  # per host clock, the streams whose chunk completes on the step


class PhaseGraphs:
    """Stands in for `LMGen`'s `graphed_main`: one moshi `CUDAGraphed(lm.forward_text)` per step phase.

    Before each step the host clocks of the TTT layers decide, from counters the host owns, which live
    streams' chunks complete on this token (SPEC §8.6); the phase key (one decision per clock: the tuple of
    completing streams) picks the graph, captured the first time the phase repeats (moshi's warm-up of one
    eager call). A replay runs no Python inside the layers, so the clocks are advanced here, before the call,
    and the layers read the plan instead of deciding. Streams in phase give two graphs ("step" and "step +
    update of every stream"); B streams out of phase (refilled slots) at most B + 1, each graph updating
    only the streams it names (SPEC §8.9). Off CUDA (`disable`) every step runs eagerly: the key is counted
    (`calls`) but nothing is planned, so the layers decide as they run and may use what else the host knows
    (a one-token step masks nothing when every stream is live).

    Args:
        lm: the LM whose `forward_text` is graphed.
        disable: run eagerly (moshi disables graphs off CUDA).
    """

    def __init__(self, lm: LMModel, disable: bool):
        self.lm = lm
        self.disable = disable
        self.layers = list(ttt_layers(lm).values())  # fixed while streaming: not walked again per step
        self.graphs: dict[Phase, CUDAGraphed] = {}
        self.calls: Counter[Phase] = Counter()

    def __call__(self, *args: tp.Any) -> tp.Any:
        clocks = [c for layer in self.layers for c in layer.host_clocks()]
        if self.disable:  # eager: the layers decide as they run (and may use what else the host knows, SPEC §8.6)
            key = tuple(c.completes_next() for c in clocks)
            self.calls[key] += 1
            return self.lm.forward_text(*args)
        key = tuple(c.plan() for c in clocks)
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = CUDAGraphed(self.lm.forward_text, disable=self.disable)
        self.calls[key] += 1
        # a replay runs no Python in the layers: the update series' host half runs here
        for rec in filter(None, (layer.recorder() for layer in self.layers)):
            rec.host_driven = True
            rec.host_advance(1)
        try:
            return graph(*args)
        finally:
            for c in clocks:
                c.planned = None

    def captured(self) -> dict[Phase, bool]:
        """Per phase key, whether its CUDA graph has been captured (replays follow)."""
        return {k: g._graph is not None for k, g in self.graphs.items()}


class TTTLMGen(LMGen):
    """moshi's `LMGen` whose main step is graphed per step phase (`PhaseGraphs`), so CUDA graphs stay on with
    TTT on; everything else (sampling, depformer graph, delays, resets, exec masks) is moshi's own code.
    Without fast-weight layers, or frozen ones, there is one phase and it is exactly moshi's graph."""

    def _init_streaming_state(self, batch_size: int):
        state = super()._init_streaming_state(batch_size)
        state.graphed_main = PhaseGraphs(self.lm_model, disable=self.lm_model.device.type != "cuda")
        return state

    def phase_graphs(self) -> PhaseGraphs:
        """The running stream's `PhaseGraphs` (inside `streaming()`)."""
        st = self._streaming_state
        if st is None:
            raise RuntimeError("TTTLMGen is not streaming: enter `lm_gen.streaming(B)` first.")
        return st.graphed_main
