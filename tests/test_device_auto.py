"""`--device auto` / `--dtype auto` with CUDA availability mocked (SPEC §5, §3.4b, §8.7): what a GPU run resolves to,
the dtype rule of frozen and learning layers there, and the memory refusals with the device's own total."""

import re
import types

import pytest
import torch

from ttt_cli import load_model
from ttt_cli.errors import ConfigError
from ttt_cli.fastweights.attach import ttt_layers
from ttt_cli.models import presets
from ttt_cli.models.loader import resolve_device, resolve_dtype

GiB = 2**30


@pytest.fixture
def cuda_present(monkeypatch):
    """torch says a CUDA device is there, with `total` bytes (the tests set it); nothing is ever put on it."""
    dev = types.SimpleNamespace(total=24 * GiB)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda d=None: types.SimpleNamespace(total_memory=dev.total, name="mocked GPU"))
    return dev


def test_auto_is_cuda_bf16_with_a_gpu_and_cpu_fp32_without(monkeypatch, cuda_present):
    assert resolve_device("auto") == resolve_device(None) == "cuda"
    assert resolve_dtype("auto", "cuda") is torch.bfloat16 and resolve_dtype(None, "cuda:1") is torch.bfloat16
    assert resolve_device("cuda:0") == "cuda:0" and resolve_device("CPU") == "cpu"
    assert resolve_dtype("fp32", "cuda") is torch.float32 and resolve_dtype("fp16", "cuda") is torch.float16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu" and resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype("bf16", "cpu") is torch.bfloat16  # asked for: honoured on the CPU too
    with pytest.raises(ConfigError, match="no CUDA device is available here. Use --device cpu"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="expected auto, cpu or cuda"):
        resolve_device("tpu")
    with pytest.raises(ConfigError, match="expected auto, bf16, fp16 or fp32"):
        resolve_dtype("int8", "cpu")


def test_auto_dtype_on_a_gpu_keeps_the_frozen_rule_and_float32_fast_weights(cuda_present):
    """What `--dtype auto` gives on CUDA (bf16), built on the CPU: frozen In-Place layers compute moshi's module in
    bf16 with W0 cast to bf16 (SPEC §3.4b: bit-identical, the same kernel on the same weights), while learning
    layers of every variant keep θ0 and their streaming state float32 (§3.3, §3.9)."""
    dtype = {torch.bfloat16: "bf16"}[resolve_dtype("auto", resolve_device("auto"))]
    from moshi.modules.gating import ActivationGating

    frozen = load_model("tiny", device="cpu", dtype=dtype, ttt={"lr": 0})
    plain = load_model("tiny", device="cpu", dtype=dtype, ttt=False)
    x = (torch.randn(2, 5, frozen.lm.dim, generator=torch.Generator().manual_seed(0)) * 3).to(torch.bfloat16)
    for i, layer in ttt_layers(frozen.lm).items():
        moshi_gating = plain.lm.transformer.layers[i].gating
        assert type(moshi_gating) is ActivationGating and moshi_gating.linear_out.weight.dtype == torch.bfloat16
        with torch.no_grad():
            got, want = layer(x), moshi_gating(x)
        assert got.dtype == torch.bfloat16 and torch.equal(got, want), i
        assert layer.w_down.dtype == torch.float32  # W0 stays float32; only its use is cast
    for name in ("tiny", "tiny-mlp", "tiny-adapter"):
        m = load_model(name, device="cpu", dtype=dtype)
        assert next(m.lm.transformer.parameters()).dtype == torch.bfloat16
        with torch.no_grad(), m.lm.streaming(2):
            for i, layer in ttt_layers(m.lm).items():
                theta0 = layer.initial_tensors()
                assert theta0 and all(t.dtype == torch.float32 for t in theta0.values()), (name, i)
                assert all(t.dtype == torch.float32 for t in layer.capture(1).values()), (name, i)


def test_a_7b_preset_is_refused_against_the_gpu_total(cuda_present):
    """`moshi-7b-random --device auto` on a GPU: the estimate in bf16 (auto) is set against the device's own total
    (torch.cuda.get_device_properties): a 16 GiB card refuses with the arithmetic before any weight is drawn,
    an 80 GiB card fits (the estimate alone: nothing is built here)."""
    cuda_present.total = 16 * GiB
    assert presets.device_memory("cuda") == 16 * GiB
    with pytest.raises(ConfigError, match=r"does not fit cuda: .*LM weights x 2 B \(bfloat16\).*headroom.*"
                                          r"> 16.0 GiB of device memory") as e:
        load_model("moshi-7b-random", device="auto", dtype="auto")
    need = float(re.search(r"headroom = ([0-9.]+) GiB", str(e.value)).group(1)) * GiB
    cuda_present.total = 80 * GiB
    assert 16 * GiB < need < presets.device_memory("cuda:0")  # an 80 GiB card would build it


def test_stream_memory_check_uses_the_gpu_free_memory(monkeypatch, tiny):
    """Before a run on CUDA the per-stream fast-weight estimate is set against the device's free memory
    (`torch.cuda.mem_get_info`): refused with the arithmetic when it does not fit, unless --force."""
    from ttt_cli.cli.common import check_memory

    per = sum(layer.state_bytes_per_stream() for layer in ttt_layers(tiny.lm).values())
    on_gpu = types.SimpleNamespace(lm=tiny.lm, device="cuda")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (per * 8 - 1, 16 * GiB))
    with pytest.raises(ConfigError, match=r"x 8 stream\(s\).*free on cuda.*does not fit.*--force"):
        check_memory(on_gpu, 8, force=False)
    assert "x 8 stream(s)" in check_memory(on_gpu, 8, force=True)
    assert "x 7 stream(s)" in check_memory(on_gpu, 7, force=False)
