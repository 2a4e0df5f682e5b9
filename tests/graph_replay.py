"""Test helpers for the CUDA-graph preconditions (SPEC §8.6): a CPU replay emulator, a host-sync guard, a walk of
the LM's streaming-state tensors, and one out-of-phase `ttt infer` batch driven through `Slots`."""

from __future__ import annotations

import contextlib
import dataclasses
import typing as tp
from pathlib import Path

import torch
from torch import nn
from torch._guards import TracingContext, tracing
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.overrides import TorchFunctionMode

from moshi.utils.compile import CUDAGraphed
from ttt_cli.fastweights.interface import HostClock

# Tensor methods that read device data on the host (a sync, and under CUDA-graph capture an error or a value
# frozen into the graph), or whose output shape depends on device data (same).
SYNCS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
         torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.nonzero, torch.nonzero, torch.Tensor.numpy,
         torch.Tensor.cpu, torch.argwhere, torch.Tensor.argwhere, torch.masked_select, torch.Tensor.masked_select,
         torch.unique, torch.Tensor.unique}


class HostSyncGuard(TorchFunctionMode):
    """Fails on any host read of tensor data (`SYNCS`, boolean-mask indexing, one-argument `torch.where`)
    inside its block: what a CUDA graph cannot contain."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        bad = func in SYNCS or (func is torch.where and len(args) + len(kwargs) == 1)
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and len(args) > 1:
            idx = args[1] if isinstance(args[1], tuple) else (args[1],)
            bad = any(torch.is_tensor(i) and i.dtype == torch.bool for i in idx)
        if bad:
            raise AssertionError(f"host read of device data inside the graphed step: {getattr(func, '__name__', func)}")
        return func(*args, **kwargs)


class ReplayEmulator(CUDAGraphed):
    """Stands in for moshi's `CUDAGraphed` on the CPU with a CUDA graph's semantics.

    Like moshi's: the first call runs eagerly (warm-up); the second copies its tensor arguments into buffers
    it keeps and "captures" the function on them; later calls copy their arguments into those buffers and
    "replay". Capture traces the function once with `make_fx` on real tensors: every tensor that is not an
    argument (parameters, streaming state, recorder buffers) enters the trace as that very tensor object, and
    every Python decision is frozen at what it was during capture, as the kernels and addresses of a CUDA
    graph are. Replay runs the trace (no Python of the model runs) and writes its results into the output
    tensors of the capture, which it returns (a real replay writes into them too). Every call runs under
    `HostSyncGuard`.

    Args: as `CUDAGraphed` (`disable` is ignored: the emulator always emulates).
    """

    def __init__(self, func: tp.Callable, warmup_steps: int = 1, disable: bool = False):
        super().__init__(func, warmup_steps, disable=False)
        self.trace = None
        self.replays = 0

    def __call__(self, *args):
        with HostSyncGuard():
            if self.trace is None and self.warmup_steps > 0:
                self.warmup_steps -= 1
                return self.func(*args)
            if self.trace is None:
                return self._capture(args)
            for a, s in zip(args, self._args):
                if torch.is_tensor(s):
                    assert a.shape == s.shape, "a captured graph needs the same shapes"
                    s.copy_(a)
                else:
                    assert a is s or a == s, "a captured graph needs the same non-tensor arguments"
            outs = self.trace(*[self._args[i] for i in self._tensor_args])
            for o, s in zip(outs, self._output):
                s.copy_(o)
            self.replays += 1
            return self._output

    def _capture(self, args: tuple) -> tp.Any:
        self._args = tuple(a.clone() if torch.is_tensor(a) else a for a in args)
        self._tensor_args = [i for i, a in enumerate(self._args) if torch.is_tensor(a)]
        self._graph = True  # moshi's flag for "captured" (PhaseGraphs.captured reads it)

        def fn(*tensors):
            full = list(self._args)
            for i, t in zip(self._tensor_args, tensors):
                full[i] = t
            self._output = self.func(*full)  # the trace runs the step once, for real, as moshi's capture + replay
            return self._output
        # one fake mode for the trace's shape metadata (else make_fx builds one per op: seconds per capture)
        with tracing(TracingContext(FakeTensorMode(allow_fallback_kernels=True))):
            self.trace = make_fx(fn)(*[self._args[i] for i in self._tensor_args])
        return self._output


def state_tensors(obj: tp.Any, path: str = "", out: dict | None = None) -> dict[str, torch.Tensor]:
    """Every tensor reachable from a streaming state (dataclasses, dicts, lists, plain objects), by path.
    Not walked: modules (their parameters are no streaming state), moshi's own graph wrappers (`CUDAGraphed`,
    whose buffers belong to the graph) and an update recorder's `_held` (rows already read to the host)."""
    out = {} if out is None else out
    if torch.is_tensor(obj):
        out[path] = obj
    elif isinstance(obj, (nn.Module, CUDAGraphed)) or callable(obj):
        pass
    elif isinstance(obj, dict):
        for k, v in obj.items():
            state_tensors(v, f"{path}[{k}]", out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            state_tensors(v, f"{path}[{i}]", out)
    elif dataclasses.is_dataclass(obj) or hasattr(obj, "__dict__"):
        fields = vars(obj) if hasattr(obj, "__dict__") else {f.name: getattr(obj, f.name)
                                                             for f in dataclasses.fields(obj)}
        for k, v in fields.items():
            if k != "_held":
                state_tensors(v, f"{path}.{k}", out)
    return out


def storage_map(lm) -> dict[str, tuple[int, int]]:
    """(id, data_ptr) of every streaming-state tensor of the LM and its modules (`get_streaming_state`), by path."""
    return {k: (id(t), t.data_ptr()) for k, t in state_tensors(lm.get_streaming_state()).items()}


@dataclasses.dataclass
class BatchRun:
    """What one driven batch gave: per step the tokens [B, 1 + dep_q, 1] and text logits, then per slot the
    fast weights, telemetry and update series, and the storage maps checked after every host action."""

    tokens: list[torch.Tensor]
    logits: list[torch.Tensor]
    state: list[dict[str, torch.Tensor]]
    telemetry: list[dict]
    updates: list[dict]
    maps: list[tuple[str, dict]]
    phases: list[tuple[tuple[int, ...], ...]]  # PhaseGraphs' keys: per host clock, the streams completing a chunk
    replays: dict[tuple[tuple[int, ...], ...], int]  # per phase
    calls: dict[tuple[tuple[int, ...], ...], int]  # per phase, the steps run in it


B = 3
STEPS = 22
REFILL = {6: 1, 11: 2}         # step -> slot whose stream ends and takes the next one (reset + snapshot restore)
FROZEN = {8: 0, 9: 0, 14: 2}   # step -> slot that does not step (exec mask false)
FW_RESET = {16: 0}             # step -> slot whose fast weights reset (`--reset-every-steps`)


def drive(model, snapshot: Path, telemetry_dir: Path, graphed: bool, device: str = "cpu") -> BatchRun:
    """Runs one out-of-phase batch as `ttt infer --batch-size 3 --telemetry DIR --init-state SNAPSHOT` drives it
    (`Slots`): every slot starts from the snapshot (pending tokens included, so streams are out of phase with
    the chunk grid), slots are refilled mid-run, some are frozen by exec masks, one has its fast weights reset;
    user codes are random, generation greedy. `graphed`: moshi's `CUDAGraphed` inside `PhaseGraphs` is
    replaced by `ReplayEmulator` (on CUDA: the real graphs, `device="cuda"`), else everything runs eagerly.

    Args:
        model: a TTTModel (`load_model`).
        snapshot: a fast-weight snapshot file fitting the model.
        telemetry_dir: what `--telemetry` names (recording is on; nothing is written here).
        graphed: emulate (CPU) or use (CUDA) the graphed step.
        device: where the model runs.
    """
    from ttt_cli.fastweights import graphs
    from ttt_cli.infer.options import InferOptions
    from ttt_cli.infer.slots import Slots, initial_state

    opts = InferOptions(greedy=True, init_state=snapshot, telemetry=telemetry_dir)
    lm = model.lm
    slots = Slots(model, B, {"use_sampling": False}, opts, initial_state(model, opts))
    logits: list[torch.Tensor] = []
    slots.lm_gen.on_text_logits_hook = lambda t: logits.append(t.detach().clone())
    g = torch.Generator().manual_seed(11)
    n_user = lm.n_q - lm.dep_q
    run = BatchRun([], logits, [], [], [], [], [], {}, {})
    emulate = graphed and device == "cpu"
    patch = contextlib.ExitStack()
    if emulate:
        patch.enter_context(_patched(graphs, "CUDAGraphed", ReplayEmulator))
        # the step's kind (PhaseGraphs' key) comes from the host clocks alone: deciding reads no device data
        plan = HostClock.plan
        patch.enter_context(_patched(HostClock, "plan", lambda clock: _guarded(plan, clock)))
    ctx = torch.no_grad() if graphed else _no_graphs(device)
    with patch, ctx, slots.streaming():
        pg = slots.lm_gen.phase_graphs()
        if emulate:
            pg.disable = False  # the path PhaseGraphs takes on CUDA: the recorder's host half runs outside
        for b in range(B):
            slots.start(b)
        run.maps.append(("start", storage_map(lm)))
        for t in range(STEPS):
            if t in REFILL:
                slots.start(REFILL[t])
                run.maps.append((f"refill {t}", storage_map(lm)))
            bits = [FROZEN.get(t) != b for b in range(B)]
            reset = [FW_RESET.get(t) == b for b in range(B)]
            user = torch.randint(0, lm.card, (B, n_user, 1), generator=g).to(device)
            out = slots.step(bits, user, reset=reset)
            run.tokens.append(out.detach().clone().cpu())
            run.maps.append((f"step {t}", storage_map(lm)))
        run.phases = sorted(pg.calls)
        run.calls = dict(pg.calls)
        # moshi's graphs: one warm-up call, one capture (which runs the step), then replays
        run.replays = {k: (gr.replays if emulate else max(pg.calls[k] - 2, 0)) for k, gr in pg.graphs.items()}
        from ttt_cli.fastweights.attach import ttt_layers
        for b in range(B):
            run.state.append({f"{i}.{k}": v for i, layer in ttt_layers(lm).items()
                              for k, v in layer.capture(b).items()})
            run.telemetry.append(slots.telemetry(b))
            run.updates.append(slots.updates(b))
    return run


def _guarded(fn, *args):
    with HostSyncGuard():
        return fn(*args)


@contextlib.contextmanager
def _patched(obj, name: str, value) -> tp.Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@contextlib.contextmanager
def _no_graphs(device: str) -> tp.Iterator[None]:
    from moshi.utils.compile import no_cuda_graph
    with torch.no_grad(), (no_cuda_graph() if device == "cuda" else contextlib.nullcontext()):
        yield
