"""CUDA-graph preconditions of the streaming step proven on the CPU (SPEC §8.6, pitfall 9), per variant: storage
kept, nothing allocated and kept, no host read inside the step, and a captured-then-replayed step ≡ eager."""

import pytest
import torch

from graph_replay import HostSyncGuard, ReplayEmulator, drive, state_tensors
from streaming_checks import assert_telemetry_close
from ttt_cli import load_model
from ttt_cli.fastweights.graphs import TTTLMGen
from ttt_cli.state import capture, save_state

# chunk sizes small enough that the driven steps complete chunks in every stream several times
PRESETS = {"tiny": 4, "tiny-mlp": 4, "tiny-adapter": 4}


def _model_and_snapshot(name: str, device: str, folder):
    """The preset with a small chunk on `device`, and a snapshot of 6 tokens' fast weights (2 pending) in `folder`."""
    m = load_model(name, device=device, dtype="fp32", ttt={"chunk_size": PRESETS[name]})
    gen = TTTLMGen(m.lm, use_sampling=False)
    codes = torch.randint(0, m.lm.card, (1, m.lm.n_q - m.lm.dep_q, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), gen.streaming(1):
        for t in range(6):
            gen.step(codes[:, :, t:t + 1].to(device))
        snap = capture(m, batch_index=0)
    return m, save_state(snap, folder / "warm.safetensors")


@pytest.fixture(scope="module", params=sorted(PRESETS))
def variant(request, tmp_path_factory):
    """(name, model, snapshot file) per preset, on the CPU."""
    name = request.param
    return (name, *_model_and_snapshot(name, "cpu", tmp_path_factory.mktemp(name)))


@pytest.fixture(scope="module")
def runs(variant, tmp_path_factory):
    name, m, path = variant
    tel = tmp_path_factory.mktemp(f"{name}-tel")
    return name, drive(m, path, tel, graphed=False), drive(m, path, tel, graphed=True)


def test_streaming_state_keeps_its_storage(runs):
    """Every streaming-state tensor of the LM (attention caches, fast weights, pending chunks, counters, the
    update recorder's buffers) is the same tensor at the same address after every step, refill, snapshot
    restore, exec mask and reset as when streaming started: a graph captured at any step reads and writes the
    state the host sees (pitfall 9: a rebound fast weight would stay frozen under replay), and no step leaves a
    new persistent tensor behind."""
    name, eager, graphed = runs
    for run in (eager, graphed):
        (_, first), *later = run.maps
        paths = list(first)
        # the walk reaches what matters: each layer's fast state and the recorder's buffers
        assert any(".recorder.buf" in p for p in paths) and any(".recorder.ptr" in p for p in paths), name
        assert sum(".recorder." in p for p in paths) >= 2 * 3, name  # two TTT layers, buf/ptr/pos each
        assert len(paths) > 20, paths
        for when, now in later:
            assert now.keys() == first.keys(), (name, when, set(now) ^ set(first))
            moved = [p for p in first if now[p] != first[p]]
            assert not moved, (name, when, moved)


def test_replayed_step_equals_eager(runs):
    """The step captured once per phase and replayed (ReplayEmulator: no Python of the model runs in a
    replay, inputs copied into the captured buffers, outputs read from the captured ones) gives the eager run's
    tokens, text logits, fast weights, telemetry and update series over refills, restores, exec masks and
    resets; the update phase was replayed, so chunk completions ran from the captured graph."""
    name, eager, graphed = runs
    assert_replay_equals_eager(name, eager, graphed, tol=1e-5)


def assert_replay_equals_eager(name, eager, graphed, tol):
    """Tokens equal, logits within `tol`, fast weights, telemetry and update series alike; the plain step and
    the update of part of the batch (streams out of phase: the update of only the completing streams) replayed."""
    assert graphed.phases == eager.phases and len(graphed.phases) >= 3, (graphed.phases, eager.phases)
    n_slots = len(eager.state)
    no_update = next(k for k in graphed.phases if not any(k))
    partial = [k for k, n in graphed.replays.items() if n and any(0 < len(s) < n_slots for s in k)]
    assert graphed.replays[no_update] >= 1 and partial, graphed.replays
    # every step but each phase's warm-up and capture call is a replay
    assert sum(graphed.replays.values()) == len(graphed.tokens) - sum(min(n, 2) for n in graphed.calls.values())
    for t, (a, b) in enumerate(zip(eager.tokens, graphed.tokens)):
        assert torch.equal(a, b), (name, t)
    # `tol`: the emulator's trace replays aten kernels whose composite ops may be decomposed otherwise than the
    # eager modules run them (rounding), and a CUDA graph may replay other cuBLAS algorithms than eager picks;
    # either is far below any logit gap that decides a greedy token
    for t, (a, b) in enumerate(zip(eager.logits, graphed.logits)):
        assert torch.allclose(a, b, rtol=tol, atol=tol), (name, t, (a - b).abs().max())
    for b in range(len(eager.state)):
        for k, v in eager.state[b].items():
            assert torch.allclose(v, graphed.state[b][k], rtol=tol, atol=tol / 10), (name, b, k)
        assert_telemetry_close(list(eager.telemetry[b].values()), list(graphed.telemetry[b].values()))
        ea, gr = eager.updates[b], graphed.updates[b]
        assert ea.keys() == gr.keys()
        for layer in ea:
            assert [(r.event, r.update, r.step, r.tokens) for r in ea[layer]] == \
                   [(r.event, r.update, r.step, r.tokens) for r in gr[layer]], (name, b, layer)
            for r, s in zip(ea[layer], gr[layer]):
                assert r.step_norm == pytest.approx(s.step_norm, rel=1e-4, abs=1e-7)
                assert r.drift == pytest.approx(s.drift, rel=1e-4, abs=1e-7)
    # what the equality is worth: updates, resets (refills and the fast-weight reset) and rows happened
    tel = eager.telemetry
    assert all(t["updates"] >= 1 for slot in tel for t in slot.values())
    assert tel[0][min(tel[0])]["resets"] >= 1  # slot 0's fast-weight reset
    assert sum(len(rows) for u in eager.updates for rows in u.values()) > 10


def test_host_sync_guard_catches_device_reads():
    """The guard the emulator runs every step under does fire on the reads it exists for."""
    x = torch.arange(4.0)
    for bad in (lambda: x.sum().item(), lambda: x.tolist(), lambda: bool(x[0] > 1), lambda: x.nonzero(),
                lambda: x[x > 1], lambda: int(x[1]), lambda: torch.where(x > 1)):
        with pytest.raises(AssertionError, match="host read"), HostSyncGuard():
            bad()
    with HostSyncGuard():  # masked arithmetic is fine
        torch.where(x > 1, x, -x).add_(1)


def test_emulator_freezes_what_a_graph_freezes():
    """A rebound state tensor or a Python branch on device data is invisible to a real CUDA graph replay;
    the emulator reproduces that (so the equality test above can fail), while in-place state moves on."""
    state = {"w": torch.zeros(2), "v": torch.zeros(2)}

    def step(x):
        state["w"].add_(x)                 # in place: replays keep updating the state the host sees
        state["v"] = state["v"] + x        # rebound: replays update the captured (old) tensor only
        return state["w"] * 2

    g = ReplayEmulator(step)
    outs = [g(torch.full((2,), float(i))).clone() for i in range(1, 5)]
    assert g.replays == 2
    assert torch.equal(state["w"], torch.full((2,), 10.0))                   # 1+2+3+4
    assert torch.equal(outs[-1], torch.full((2,), 20.0))
    assert torch.equal(state["v"], torch.full((2,), 3.0))                    # stuck after the capture (1+2)
    assert state_tensors({"s": state}).keys() == {"[s][w]", "[s][v]"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: CUDA graphs are captured only on a GPU")
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_cuda_graphs_replayed_equal_eager_over_refills_masks_resets(name, tmp_path):
    """On CUDA, the same out-of-phase batch as above (refills with snapshot restores, exec masks, a fast-weight
    reset, recording on) with moshi's real CUDA graphs (one per phase, captured and replayed) and without them
    (`no_cuda_graph()`): storage kept throughout and the same results."""
    m, path = _model_and_snapshot(name, "cuda", tmp_path)
    eager = drive(m, path, tmp_path / "tel", graphed=False, device="cuda")
    graphed = drive(m, path, tmp_path / "tel", graphed=True, device="cuda")
    (_, first), *later = graphed.maps
    assert all(now == first for _, now in later), name
    assert_replay_equals_eager(name, eager, graphed, tol=1e-4)
