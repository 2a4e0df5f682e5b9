"""Streaming helpers around moshi: block streaming with a large enough KV cache (pitfall 7)."""

from __future__ import annotations

import contextlib
import typing as tp

from torch import nn

from moshi.modules.transformer import StreamingMultiheadAttention


@contextlib.contextmanager
def block_streaming(module: nn.Module, batch_size: int, max_block: int) -> tp.Iterator[None]:
    """`module.streaming(batch_size)` whose attention caches hold `context + max_block - 1` keys.

    moshi's RingKVCache has exactly `context` slots, so a call with T > 1 steps overwrites keys
    that the block's first queries still need. The cache capacity is read from `context` when
    streaming starts while the mask uses `context` at every call: enlarge it only for the start.
    """
    attns = [m for m in module.modules() if isinstance(m, StreamingMultiheadAttention)
             and m.context is not None and not m.cross_attention]
    saved = [m.context for m in attns]
    try:
        for m, c in zip(attns, saved):
            m.context = c + max(max_block, 1) - 1
        stack = module.streaming(batch_size)
    finally:
        for m, c in zip(attns, saved):
            m.context = c
    with stack:
        yield
