"""Helpers shared by the model tests: relative error, random codes, full-sequence forward ≡ block streaming."""

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
