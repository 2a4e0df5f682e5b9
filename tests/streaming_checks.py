"""A check shared by the layer tests: a full-sequence forward equals block streaming in any block size."""

import torch

from ttt_cli.streaming import block_streaming


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


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
