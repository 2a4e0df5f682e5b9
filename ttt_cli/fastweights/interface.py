"""The small interface every fast-weight variant implements, so commands never know which one runs."""

from __future__ import annotations

import abc
import contextlib
import hashlib
import json
import typing as tp
import warnings
from dataclasses import dataclass, field

import torch

from moshi.modules.streaming import State, StreamingModule

from .recording import UpdateRecorder, UpdateRow

StateT = tp.TypeVar("StateT", bound=State)


GRAPH_CAPTURE_ERROR = ("a TTT layer is captured in a CUDA graph without a step plan: the graph would freeze "
                       "whether chunks update. Generate with ttt_cli.fastweights.graphs.TTTLMGen (one graph per "
                       "step phase), or wrap generation in moshi.utils.compile.no_cuda_graph().")


def float32_tensors(modules: tp.Iterable[torch.nn.Module]) -> list[tuple[torch.nn.Module, str, torch.Tensor]]:
    """(module, name, tensor) of the floating-point parameters and buffers held directly by `modules`."""
    return [(m, n, t) for m in modules for n, t in [*m._parameters.items(), *m._buffers.items()]
            if t is not None and t.is_floating_point()]


def keep_float32(modules: tp.Sequence[torch.nn.Module], apply: tp.Callable[[], tp.Any]) -> None:
    """Runs `apply` (a module's `_apply`, e.g. from `lm.to(dtype)`) so that the fast-weight tensors of `modules` stay
    float32 *with their float32 values*: a cast to the model dtype moves them to the new device only (cast there
    and back, θ0 would be rounded to bf16: SPEC §3.3 keeps W float32 whatever the model dtype)."""
    before = {(id(m), n): t.data for m, n, t in float32_tensors(modules) if t.dtype == torch.float32}
    apply()
    with torch.no_grad():
        for m, n, t in float32_tensors(modules):
            if t.dtype != torch.float32:
                old = before.get((id(m), n))
                t.data = t.data.to(torch.float32) if old is None else old.to(t.device)


def refuse_graph_capture(t: torch.Tensor, planned: bool = False) -> None:
    """Under CUDA graph capture only a planned one-token step is safe (pitfall 9): fail loudly otherwise."""
    if t.is_cuda and not planned and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(GRAPH_CAPTURE_ERROR)



class DerivedTensor:
    """A tensor computed from parameters (a cast, a stack, a fold), made again only when one of them changed.

    Keyed on each part's identity, storage, in-place version counter, device and dtype: a checkpoint load copies
    in place (the version moves), a device move or cast gives new storage, a replaced parameter is another
    object. The parts it was made from stay referenced, so a freed storage cannot come back at the same address.
    """

    def __init__(self) -> None:
        self._parts: tuple[torch.Tensor, ...] = ()
        self._key: tuple | None = None
        self._value: torch.Tensor | None = None

    def get(self, parts: tp.Sequence[torch.Tensor], make: tp.Callable[[], torch.Tensor], *extra: tp.Hashable
            ) -> torch.Tensor:
        """The value `make()` gave for `parts` as they are now (and `extra`, e.g. a target dtype)."""
        key = tuple((t.data_ptr(), t._version, t.device, t.dtype) for t in parts) + extra
        if self._value is None or key != self._key or any(a is not b for a, b in zip(self._parts, parts)):
            self._parts, self._key, self._value = tuple(parts), key, make()
        return self._value

@dataclass
class HostClock:
    """Host-owned mirror of one learner's per-stream pending counts (SPEC §8.6).

    It moves only with what the host does: one-token steps (`plan`/`take`), the exec masks and resets it
    issues, restores and flushes. From it the host knows, without reading the device, which live streams'
    chunks a one-token step completes, so the step can pick its code path ("step", or "step + update of
    these streams") outside a CUDA graph, and a graph replay needs no Python inside the layer. A
    decision is the tuple of completing streams: empty (falsy) when no chunk completes.
    """

    chunk_size: int
    pending: list[int] = field(default_factory=list)   # tokens pending per stream
    active: list[bool] = field(default_factory=list)   # the exec mask the host set
    planned: tuple[int, ...] | None = None  # the decision `PhaseGraphs` took for the step being run

    @classmethod
    def fresh(cls, chunk_size: int, batch_size: int) -> "HostClock":
        return cls(chunk_size, [0] * batch_size, [True] * batch_size)

    def completes_next(self) -> tuple[int, ...]:
        """The live streams whose chunk the next one-token step completes (empty: none)."""
        return tuple(b for b, (n, a) in enumerate(zip(self.pending, self.active)) if a and n + 1 == self.chunk_size)

    def advance(self, tokens: int = 1) -> None:
        """`tokens` tokens read by every live stream, chunk counting wrapping at completion."""
        self.pending = [(n + tokens) % self.chunk_size if a else n for n, a in zip(self.pending, self.active)]

    def plan(self) -> tuple[int, ...]:
        """Decides the next one-token step before it runs (graphed or not) and advances the clock."""
        self.planned = self.completes_next()
        self.advance()
        return self.planned

    def take(self) -> tuple[int, ...]:
        """The completing streams of the one-token step being run: the plan made for it, else decided now."""
        if self.planned is not None:
            return self.planned
        done = self.completes_next()
        self.advance()
        return done

    def reset(self, mask: list[bool]) -> None:
        for b, m in enumerate(mask):
            if m:
                self.pending[b], self.active[b] = 0, True


class SnapshotAnswers:
    """What snapshot code (`ttt_cli.snapshot`) asks a fast-weight layer, answered by the layer itself so that
    snapshots never name a variant's tensors: one question per layer. Part of `FastWeightLayer`, whose
    `capture` and moshi streaming API these defaults use; a variant overrides what it knows better."""

    @contextlib.contextmanager
    def fresh_stream(self, batch_size: int) -> tp.Iterator[StateT]:
        """A new streaming state of `batch_size` streams for the block, streaming or not now: the current
        state is set aside and put back after (moshi's `get/set_streaming_state`).

        Args:
            batch_size: streams in the new state.
        """
        saved = self.get_streaming_state()
        self.set_streaming_state({name: None for name in saved})
        try:
            with self.streaming(batch_size):
                yield self._state()
        finally:
            self.set_streaming_state(saved)

    def fresh_capture(self) -> dict[str, torch.Tensor]:
        """What `capture` returns for a new stream (the names and shapes a snapshot's tensors must have)."""
        with self.fresh_stream(1):
            return self.capture(0)

    def check_capture(self, tensors: dict[str, torch.Tensor], index: int) -> list[str]:
        """Why one stream's tensors (as `capture` returns them: a snapshot's) do not fit this layer; [] if they do.

        Args:
            tensors: {name: tensor} of one stream.
            index: the layer's index in the model, named in the messages (`layers.{index}.<name>`).
        """
        return capture_mismatches(tensors, self.fresh_capture(), index)

    @classmethod
    def check_stored(cls, tensors: dict[str, torch.Tensor], chunk_size: int, pending_tokens: int | None) -> str | None:
        """Why one layer's tensors in a file, read without a model, disagree among themselves or with the file's
        metadata, or None. Default: nothing to check (a variant checks what its names let it).

        Args:
            tensors: {name: tensor} of the layer.
            chunk_size: the file's chunk size.
            pending_tokens: the pending tokens the file records for the layer (None: not recorded).
        """
        return None


class FastWeightLayer(StreamingModule[StateT], SnapshotAnswers, abc.ABC):
    """A moshi `StreamingModule` whose streaming state holds per-stream fast weights.

    What commands need from a variant (SPEC §3.9): `capture`/`restore` of one stream's tensors,
    `reset_streaming(mask)` (inherited), `fingerprint_tensors()`, telemetry, memory arithmetic,
    its rate (`--ttt-lr`) and `config_section()` (with a `variant` key). Tensor names in
    `capture()` are the snapshot's per-layer keys (`layers.{i}.<name>`; a name with a dotted part
    starting `pending` is update state, not a weight); whether tensors fit the layer it says
    itself (`SnapshotAnswers`).
    """

    variant: tp.ClassVar[str]
    # Config keys (of `config_section()`, plus the model-level `layers`) that change what the layer
    # computes: they enter the fingerprint. Update-rule hyperparameters (lr, clip) and file names do not.
    structural: tp.ClassVar[frozenset[str]]
    rate_key: tp.ClassVar[str] = "lr"  # the `ttt` key that `set_rate` changes (0 = TTT off)
    recording: bool = False  # streams started while True gather the update series (SPEC §3.7, `set_recording`)

    def _state(self) -> StateT:
        """The streaming state; a clear error outside `lm.streaming(B)`."""
        st = self._streaming_state
        if st is None:
            raise RuntimeError("the TTT layer is not streaming: enter `lm.streaming(B)` first.")
        return st

    @abc.abstractmethod
    def capture(self, batch_index: int) -> dict[str, torch.Tensor]:
        """Returns copies of one stream's fast-weight tensors (CPU, float32)."""

    @abc.abstractmethod
    def restore(self, tensors: dict[str, torch.Tensor], batch_index: int) -> None:
        """Loads one stream's tensors (as returned by `capture`); raises StateMismatchError if they do not fit."""

    @abc.abstractmethod
    def set_warm_start(self, tensors: dict[str, torch.Tensor] | None) -> None:
        """Makes new streams and resets start from captured tensors (as `capture` returns) instead
        of the checkpoint's initial weights; None goes back to them."""

    @abc.abstractmethod
    def initial_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors a reset goes back to (θ0, In-Place's W0), used for drift and the θ0 fingerprint."""

    @abc.abstractmethod
    def fingerprint_tensors(self) -> dict[str, torch.Tensor]:
        """θ0 and every other tensor that defines what the layer computes (SPEC §3.9), by name."""

    @abc.abstractmethod
    def telemetry(self, batch_index: int) -> dict[str, tp.Any]:
        """Counters of one stream: updates, resets, clip events, drift, pending tokens, non-finite events."""

    @abc.abstractmethod
    def state_bytes_per_stream(self) -> int:
        """Bytes of fast-weight state one stream needs on the device (SPEC §5's estimate)."""

    def bytes_read_per_step(self) -> int:
        """Fast-weight bytes one stream's step must read (the memory-bound floor of `ttt bench`)."""
        return self.state_bytes_per_stream()

    @abc.abstractmethod
    def memory_formula(self) -> str:
        """`state_bytes_per_stream` as arithmetic with this layer's numbers, for messages."""

    @abc.abstractmethod
    def config_section(self) -> dict[str, tp.Any]:
        """The layer's settings as a `ttt` config section (with its `variant` key)."""

    @abc.abstractmethod
    def flush_partial(self, batch_index: int | None = None) -> None:
        """Applies the pending partial chunk's update now (chunk counting restarts)."""

    _nonfinite_warned: int = 0  # non-finite updates already warned about (per layer)

    def _warn_nonfinite(self, per_stream: list[int]) -> None:
        """Warns about non-finite updates counted since the last warning, when telemetry is read: the step
        never reads the device to find them (SPEC §3.7). `per_stream`: the events of each stream so far."""
        total = sum(per_stream)
        if total > self._nonfinite_warned:
            self._nonfinite_warned = total
            streams = [i for i, n in enumerate(per_stream) if n]
            warnings.warn(f"{self.variant} TTT: non-finite fast-weight update(s) in stream(s) {streams} ({total} so "
                          f"far); each was reset to its initial fast weights.")

    def get_rate(self) -> float:
        """The layer's learning rate (its attribute `rate_key`)."""
        return float(getattr(self, self.rate_key))

    def set_rate(self, rate: float) -> None:
        """Sets the learning rate (0 freezes the fast weights at their initial value); not while streaming."""
        if self.is_streaming:
            raise RuntimeError("cannot change the TTT learning rate of a streaming model.")
        setattr(self, self.rate_key, float(rate))

    @abc.abstractmethod
    def forwards_vs_plain(self, tokens: int, generator: torch.Generator
                          ) -> tuple[tp.Callable[[], tp.Any], tp.Callable[[], tp.Any], str]:
        """(forward with TTT, forward of the plain moshi module this layer extends, which modules): both on the
        same `tokens` random tokens drawn from `generator`, whole-sequence, not streaming (SPEC §8.5)."""

    @abc.abstractmethod
    def macs_vs_plain(self, tokens: int) -> tuple[float, str]:
        """(multiply-accumulates with TTT / those of the plain module, the arithmetic with this layer's numbers)
        for a forward over `tokens` tokens: the FLOP floor of `forwards_vs_plain`'s time ratio."""

    def host_clocks(self) -> list[HostClock]:
        """The host clocks of the streaming state (one per learner); empty when frozen or not streaming."""
        return []

    # -- the update series (SPEC §3.7): one recording API for every variant ---------------------------
    def set_recording(self, on: bool) -> None:
        """Streams started from now on gather one row per update, reset and non-finite event (not while
        streaming). A frozen layer (rate 0) records nothing: nothing moves."""
        if self.is_streaming:
            raise RuntimeError("cannot switch update recording on or off while the model is streaming.")
        self.recording = bool(on)

    def new_recorder(self, batch_size: int, device: torch.device | str, parts: int = 1) -> UpdateRecorder | None:
        """The recorder a new streaming state holds, or None when this layer does not record."""
        if not self.recording or self.get_rate() == 0.0:
            return None
        return UpdateRecorder(batch_size, device, self.chunk_size, parts)  # type: ignore[attr-defined]

    def recorder(self) -> UpdateRecorder | None:
        """The current stream set's recorder (None: not recording or not streaming)."""
        st = self._streaming_state
        return None if st is None else getattr(st, "recorder", None)

    def take_updates(self, batch_index: int) -> list[UpdateRow]:
        """Stream `batch_index`'s rows since the last call (its file): one device read, never per step."""
        rec = self.recorder()
        if rec is None:
            return []
        theta0_sq = sum(float(t.detach().double().square().sum()) for t in self.initial_tensors().values())
        return rec.take(batch_index, theta0_sq)

    def structural_config(self) -> dict[str, tp.Any]:
        """The `structural` keys of `config_section()` (what the fingerprint covers of the config)."""
        return {k: v for k, v in sorted(self.config_section().items()) if k in self.structural}

    def fingerprint_update(self, h: "hashlib._Hash", initial_only: bool = False) -> None:
        """Feeds the fingerprint tensors (names, shapes, float32 bytes) and the structural config to `h`;
        `initial_only`: θ0's tensors only (the W0 fingerprint)."""
        tensors = self.initial_tensors() if initial_only else self.fingerprint_tensors()
        for name, t in sorted(tensors.items()):
            h.update(f"{name}:{list(t.shape)};".encode())
            h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        if not initial_only:
            h.update(json.dumps(self.structural_config(), sort_keys=True, separators=(",", ":")).encode())


def capture_mismatches(tensors: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], index: int) -> list[str]:
    """Other names, or other shapes than `ref` (a new stream's capture) of layer `index`'s tensors. A tensor `ref`
    holds with 0 rows (a pending chunk) may have any row count.

    Args:
        tensors: {name: tensor} of one stream.
        ref: what the layer captures for a new stream.
        index: the layer's index, named in the messages.
    """
    if set(tensors) != set(ref):
        return [f"layer {index} holds tensors {sorted(tensors)}, the model's layer holds {sorted(ref)}"]
    out = []
    for name in sorted(ref):
        a, r = tuple(tensors[name].shape), tuple(ref[name].shape)
        variable = len(r) >= 1 and r[0] == 0
        if len(a) != len(r) or (a[1:] if variable else a) != (r[1:] if variable else r):
            want = ("[n, " + ", ".join(map(str, r[1:])) + "]") if variable else str(list(r))
            out.append(f"layers.{index}.{name} has shape {list(a)}, the model needs {want}")
    return out
