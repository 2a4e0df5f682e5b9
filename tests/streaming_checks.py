"""Helpers shared by the model tests: relative error, random codes, full-sequence forward ≡ block streaming,
telemetry of two runs."""

import math

import torch

from ttt_cli.streaming import block_streaming


def rel(a, b):
    """max |a - b| / max |b|, in float64."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


def random_codes(lm, B, T, seed=0):
    """Random token codes [B, K, T] within the LM's vocabularies (text in codebook 0)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, lm.card, (B, lm.num_codebooks, T), generator=g)
    codes[:, 0] = torch.randint(0, lm.text_card, (B, T), generator=g)
    return codes


@torch.no_grad()
def full_equals_blocks(lm, seq, blocks, tol=1e-4):
    """Asserts `lm.forward_text(seq)` text logits equal block-streamed calls of each size in `blocks`
    (KV cache enlarged for blocks, SPEC pitfall 7); returns the full-sequence text logits."""
    T = seq.shape[-1]
    _, full = lm.forward_text(seq)
    for block in blocks:
        with block_streaming(lm, 1, block):
            outs = [lm.forward_text(seq[:, :, s:s + block])[1] for s in range(0, T, block)]
        assert rel(torch.cat(outs, 2), full) < tol, block
    return full


def assert_telemetry_close(a, b, rel_tol=1e-5):
    """Two runs' telemetry ({counter: value} per stream, or lists of them): counts equal, float figures
    (drift) within `rel_tol`. Runs on different kernels (compiled vs eager, blocked vs per-token, other
    thread counts) round differently in the last bits, so floats are never compared exactly."""
    if isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), (a, b)
        for x, y in zip(a, b):
            assert_telemetry_close(x, y, rel_tol)
        return
    assert set(a) == set(b), (sorted(a), sorted(b))
    for k, v in a.items():
        if isinstance(v, float) or isinstance(b[k], float):
            assert math.isclose(v, b[k], rel_tol=rel_tol, abs_tol=1e-12), (k, v, b[k])
        else:
            assert v == b[k], (k, v, b[k])
