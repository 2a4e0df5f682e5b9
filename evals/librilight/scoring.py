"""Teacher-forced NLL of a document in streaming mode: transformer blocks, depformer in parallel."""

from __future__ import annotations

import math
import time
import typing as tp
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from ttt_cli.codes import transformer_input
from ttt_cli.fastweights.attach import ttt_layers
from ttt_cli.streaming import block_streaming
from ttt_cli.telemetry import recording, take_rows

DEFAULT_BLOCK_STEPS = 250

Carry = dict  # {layer index: tensors from FastWeightLayer.capture}


@dataclass
class DocumentScore:
    """Per-step, per-codebook NLL (nats) of one document under one policy."""

    nll: torch.Tensor        # [dep_q, T] float32; NaN where not scored (acoustic delay at the end, -1 targets)
    text_nll: torch.Tensor   # [T] float32; NaN where the text target is -1 (the default layout)
    resets: list[int]        # positions where fast weights were reset inside the document
    seconds: float           # wall time of scoring
    carry: Carry | None = None                                      # fast-weight state at the end
    telemetry: dict[int, dict] = field(default_factory=dict)        # per TTT layer, at the end
    updates: dict | None = None     # the update series {layer: [UpdateRow]} (`record`)

    @property
    def steps(self) -> int:
        return int(self.nll.shape[-1])


def _token_nll(logits: torch.Tensor, target: torch.Tensor, card: int) -> torch.Tensor:
    """-log p(target) for logits [..., card] and targets [...]; NaN where the target is no real token."""
    valid = (target >= 0) & (target < card)  # -1: no token; card: the initial token (before a delay)
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.clamp(0, card - 1).reshape(-1),
                         reduction="none").view(target.shape)
    return torch.where(valid, ce, torch.full_like(ce, math.nan))


@torch.no_grad()
def score_document(lm, codes: torch.Tensor, resets: tp.Iterable[int] = (), block_steps: int = DEFAULT_BLOCK_STEPS,
                   carry: Carry | None = None, keep_carry: bool = False, step_by_step: bool = False,
                   on_block: tp.Callable[[int], None] | None = None, record: bool = False) -> DocumentScore:
    """Scores LM codes [K, T] (before delays) with teacher forcing, in one fresh stream.

    The stream starts with fresh attention (a document start). Position s of the transformer input
    (`ttt_cli.codes.transformer_input`) predicts step s; a reset at s is applied to the fast-weight
    layers only, between positions s-1 and s, by splitting the block there. The main transformer runs
    one block per call with a KV cache of context + block - 1 entries (pitfall 7) and its TTT state
    carried across calls; the depformer scores the block's dep_q codebooks in one call, as
    `LMModel.forward_depformer_training` does in `LMModel.forward`.

    Args:
        lm: moshi LMModel (TTT attached or not), eval mode, not streaming.
        codes: LM input codes [K, T] (`ttt_cli.codes.lm_input_codes`).
        resets: positions 0 < s < T where fast weights reset.
        block_steps: steps per main-transformer call.
        carry: fast-weight state to start from (the `never` policy), as returned in `.carry`.
        keep_carry: capture the fast-weight state at the end into `.carry`.
        step_by_step: one `forward_text` call per step in plain `lm.streaming` (the reference path
            whose cache holds exactly `context` keys, like `LMGen`), depformer per step too.
        on_block: called with the number of steps scored so far.
        record: gather the update series (SPEC §3.7) into `.updates`; a reset's step is its position s.
    """
    if block_steps < 1:
        raise ValueError(f"block_steps must be >= 1, got {block_steps}")
    if lm.is_streaming:
        raise RuntimeError("score_document starts its own stream: the LM must not be streaming.")
    K, T = codes.shape
    if T == 0:
        raise ValueError("cannot score an empty document (0 steps).")
    dev = next(lm.parameters()).device
    block = 1 if step_by_step else block_steps
    resets = sorted({int(s) for s in resets if 0 < int(s) < T})
    reset_set = set(resets)
    # Padding one step makes the last target available; the padded value is never read.
    x = transformer_input(lm, torch.cat([codes, codes[:, -1:]], -1)[None].to(dev))  # [1, K, T + 1]
    inputs, targets = x[:, :, :T], x[:, :, 1:]  # position s reads inputs[s] and predicts targets[s]
    nll = torch.full((lm.dep_q, T), math.nan, dtype=torch.float32)
    text_nll = torch.full((T,), math.nan, dtype=torch.float32)
    layers = ttt_layers(lm)
    one = torch.ones(1, dtype=torch.bool, device=dev)
    t0 = time.perf_counter()
    ctx = lm.streaming(1) if step_by_step else block_streaming(lm, 1, block)
    with recording(lm, record), ctx:
        if carry is not None:
            for i, layer in layers.items():
                layer.restore(carry[i], 0)
        for a in range(0, T, block):
            b = min(a + block, T)
            resets_in = [s for s in resets if a < s < b] + ([a] if a in reset_set else [])
            tout, tl = _transformer_block(lm, inputs, a, b, resets_in, layers, one)
            _block_nll(lm, targets, tout, tl, a, b, nll, text_nll)
            if on_block is not None:
                on_block(b)
        out_carry = {i: layer.capture(0) for i, layer in layers.items()} if keep_carry else None
        telemetry = {i: layer.telemetry(0) for i, layer in layers.items()}
        updates = take_rows(lm, 0) if record else None
    return DocumentScore(nll, text_nll, resets, time.perf_counter() - t0, out_carry, telemetry, updates)


def _transformer_block(lm, inputs: torch.Tensor, a: int, b: int, resets: list[int], layers: dict,
                       one: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The main transformer over positions [a, b) of `inputs` [1, K, T], split at `resets` (positions in [a, b)
    before which the fast weights reset; attention carries on); returns its outputs [1, L, d] and text logits
    [L, text_card]."""
    cuts = sorted({a, b, *resets})
    outs, text_logits = [], []
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        if lo in resets:
            for layer in layers.values():
                layer.reset_streaming(one)  # fast weights only; attention carries on
        out, tl = lm.forward_text(inputs[:, :, lo:hi])  # [1, L, d], [1, 1, L, text_card]
        outs.append(out)
        text_logits.append(tl)
    return torch.cat(outs, 1), torch.cat(text_logits, 2)[0, 0]  # [1, L, d], [L, text_card]


def _block_nll(lm, targets: torch.Tensor, tout: torch.Tensor, tl: torch.Tensor, a: int, b: int, nll: torch.Tensor,
               text_nll: torch.Tensor) -> None:
    """Writes the NLL of positions [a, b) into `nll` [dep_q, T] and `text_nll` [T]: the text from the text logits
    `tl` [L, text_card], the audio codebooks from one depformer call on the transformer outputs `tout` [1, L, d];
    position s predicts step s - delay of each stream."""
    delays, dq = list(lm.delays), lm.dep_q
    d0 = delays[0]
    lo = max(a, d0)
    if lo < b:
        text_nll[lo - d0:b - d0] = _token_nll(tl[lo - a:], targets[0, 0, lo:b], lm.text_card).cpu()
    if dq:
        logits = lm.forward_depformer_training(targets[:, :, a:b], tout)[0]  # [dep_q, L, card]
        tok = _token_nll(logits, targets[0, lm.audio_offset:lm.audio_offset + dq, a:b], lm.card).cpu()
        for k in range(dq):
            d = delays[lm.audio_offset + k]  # position s predicts step s - d of codebook k
            lo = max(a, d)
            if lo < b:
                nll[k, lo - d:b - d] = tok[k, lo - a:]
