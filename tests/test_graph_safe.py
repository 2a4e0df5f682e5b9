"""The graph-safe streaming step (SPEC §8.6): compiled with fullgraph = eager, host-planned phases, CUDA graphs on."""

import copy
from collections import Counter

import pytest
import torch
from torch import nn

from streaming_checks import assert_telemetry_close
from ttt_cli.fastweights.adapter import AdapterGroup, TTTAdapterLinear
from ttt_cli.fastweights.config import AdapterConfig, MLPConfig, TTTConfig
from ttt_cli.fastweights.inplace import InPlaceTTTGating, X0Source
from ttt_cli.fastweights.mlp import HybridTTTBlock

B, D, C = 3, 8, 4
STEPS = 3 * C + 2  # several chunks, with a partial one at the end
RESETS = {5: [False, True, False], 9: [True, False, False]}
EXEC = {3: [True, False, True], 7: [True, True, True], 10: [False, True, True], 12: [True, True, True]}


def _inplace():
    torch.manual_seed(0)
    lin_in, lin_out = nn.Linear(D, 2 * 2 * D, bias=False), nn.Linear(2 * D, D, bias=False)
    layer = InPlaceTTTGating(lin_in, lin_out, torch.nn.functional.silu,
                             TTTConfig(layers=[0], chunk_size=C, lr=0.3, delta_clip_fro_norm=2.0), X0Source())
    layer.target_generator.init_ntp()

    def make_step(m):
        def step(x, x0):
            m._x0.input = x0  # what moshi's embedding hooks provide inside forward_text
            try:
                return m(x)
            finally:
                m._x0.input = None
        return step
    return layer, make_step, 2


def _mlp():
    layer = HybridTTTBlock(D, 2, MLPConfig(layers=[0], chunk_size=C, base_lr=4.0))
    layer.init_fresh(torch.Generator().manual_seed(1), 0.5)
    with torch.no_grad():
        layer.W1.normal_(0, 0.3, generator=torch.Generator().manual_seed(2))
    return layer, lambda m: (lambda x: m(x)), 1


def _adapter():
    cfg = AdapterConfig(layers=[0], chunk_size=C, targets=["self_attn.in_projs.0", "gating.linear_out"], rank=4,
                        lr_scale=4.0)
    group = AdapterGroup(cfg)
    torch.manual_seed(3)
    for j, target in enumerate(cfg.targets):
        ad = TTTAdapterLinear(nn.Linear(D, D), target, cfg.rank, group)
        ad.ttt_adapter.init_fresh(torch.Generator().manual_seed(4 + j))
        with torch.no_grad():
            ad.ttt_adapter.wo.normal_(0, 0.3)
        group.add(ad)
        group.add_module(f"a{j}", ad)  # keep the adapters with the group for deepcopy (test only)

    def make_step(m):
        ads = [m._adapters[t] for t in m.targets]
        return lambda x: torch.stack([a(x) for a in ads])
    return group, make_step, 1


def _drive(layer, step, n_inputs, planned: bool):
    """Runs STEPS one-token steps with resets and exec masks; `planned`: decide each phase on the host first,
    as PhaseGraphs does before a graph replay (the layer then reads the plan instead of deciding)."""
    g = torch.Generator().manual_seed(7)
    outs = []
    with torch.no_grad(), layer.streaming(B):  # LMGen steps under no_grad
        for t in range(STEPS):
            if t in RESETS:
                layer.reset_streaming(torch.tensor(RESETS[t]))
            if t in EXEC:
                layer.set_exec_mask(torch.tensor(EXEC[t]))
            xs = [torch.randn(B, 1, D, generator=g) for _ in range(n_inputs)]
            clocks = layer.host_clocks()
            if planned:
                for c in clocks:
                    c.plan()
            try:
                outs.append(step(*xs).clone())
            finally:
                for c in clocks:
                    c.planned = None
        tel = [layer.telemetry(b) for b in range(B)]
        state = {k: v.clone() for k, v in layer.capture(1).items()}
    return outs, tel, state


@pytest.mark.parametrize("make", [_inplace, _mlp, _adapter], ids=["inplace", "mlp", "linear-adapter"])
def test_streaming_step_compiles_fullgraph_and_equals_eager(make):
    """SPEC §8.6's CPU proxy: the one-token step has no graph break (fullgraph, aot_eager: no host sync, no branch
    on device data) and gives the eager outputs, over several chunks with resets and exec masks."""
    layer, make_step, n_inputs = make()
    twin = copy.deepcopy(layer)
    eager, tel, state = _drive(layer, make_step(layer), n_inputs, planned=False)
    torch._dynamo.reset()
    compiled = torch.compile(make_step(twin), fullgraph=True, backend="aot_eager", dynamic=False)
    got, tel_c, state_c = _drive(twin, compiled, n_inputs, planned=True)
    for t, (a, b) in enumerate(zip(eager, got)):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6), (t, (a - b).abs().max())
    assert_telemetry_close(tel, tel_c)  # counters equal; drift within 1e-5 (compiled kernels round otherwise)
    for k in state:
        assert torch.allclose(state[k], state_c[k], rtol=1e-6, atol=1e-6), k
    # chunks completed, and the resets and exec masks took effect (what the equality is worth)
    assert tel[1]["updates"] >= 1 and tel[1]["resets"] == 1 and tel[0]["resets"] == 1


def test_phase_graphs_plan_on_the_host(tiny):
    """TTTLMGen's PhaseGraphs: the phase is "step + update" exactly on the steps where a live stream's chunk
    completes (counted here from the steps, resets and exec masks issued), and generation equals plain moshi
    LMGen with the layers deciding on their own."""
    from moshi.models.lm import LMGen
    from ttt_cli.fastweights.attach import ttt_layers
    from ttt_cli.fastweights.graphs import TTTLMGen

    lm = tiny.lm
    C = tiny.ttt.chunk_size
    n = 2 * C + 3
    codes = torch.randint(0, lm.card, (2, lm.n_q - lm.dep_q, n), generator=torch.Generator().manual_seed(0))
    runs = {}
    for name, cls in (("plain", LMGen), ("phased", TTTLMGen)):
        gen = cls(lm, use_sampling=False)
        outs, keys = [], []
        with torch.no_grad(), gen.streaming(2):
            for t in range(n):
                if t == C + 2:
                    gen.reset_streaming(torch.tensor([False, True]))
                out = gen.step(codes[:, :, t:t + 1])
                outs.append(None if out is None else out.clone())
                if name == "phased":
                    keys.append(gen.phase_graphs().calls.copy())
            tel = [layer.telemetry(b) for layer in ttt_layers(lm).values() for b in range(2)]
        runs[name] = (outs, tel, keys)
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(runs["plain"][0], runs["phased"][0]))
    assert_telemetry_close(runs["plain"][1], runs["phased"][1])
    # expected phases, counted independently: stream 0 completes at steps C-1, 2C-1; stream 1 at C-1, then its
    # reset before step C+2 restarts its counting, so it completes at C+2 + C-1. A phase names the completing
    # streams (per layer), so out of phase each completion step updates only its own stream.
    n_layers = len(ttt_layers(lm))
    expected = {C - 1: (0, 1), 2 * C - 1: (0,), 2 * C + 1: (1,)}
    assert n > max(expected)
    prev = Counter()
    for t, calls in enumerate(runs["phased"][2]):
        (key,) = (calls - prev).keys()  # the phase of step t
        assert key == (expected.get(t, ()),) * n_layers, t
        prev = calls
    assert len(runs["phased"][2][-1]) == 4  # "step" and three update phases


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: CUDA graphs are captured only on a GPU")
def test_cuda_graphs_stay_on_with_ttt_on():
    """On CUDA, TTTLMGen captures one graph per phase and replays them (TTT on), with the outputs of the eager run."""
    from moshi.utils.compile import no_cuda_graph
    from ttt_cli import load_model
    from ttt_cli.fastweights.graphs import TTTLMGen

    m = load_model("tiny", device="cuda", dtype="fp32")
    C = m.ttt.chunk_size
    n = 3 * C + 1
    codes = torch.randint(0, m.lm.card, (2, m.lm.n_q - m.lm.dep_q, n), generator=torch.Generator().manual_seed(0))
    runs = {}
    for graphed in (True, False):
        gen = TTTLMGen(m.lm, use_sampling=False)
        outs = []
        ctx = torch.no_grad() if graphed else no_cuda_graph()
        with torch.no_grad(), ctx, gen.streaming(2):
            for t in range(n):
                out = gen.step(codes[:, :, t:t + 1].cuda())
                outs.append(None if out is None else out.clone())
            if graphed:
                captured = gen.phase_graphs().captured()
        runs[graphed] = outs
    assert len(captured) == 2 and all(captured.values()), captured
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(runs[True], runs[False]))
