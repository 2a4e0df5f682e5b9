"""`ttt bench`'s eval scoring figures (SPEC §8.2, §8.4): block vs step-by-step scoring of one document, in-process."""

from __future__ import annotations

import torch

# The one arrow from ttt_cli up to evals: these figures measure the eval's own scoring function in
# this process (SPEC §8.2), so this module sits above it; nothing in evals imports ttt_cli.bench.
from evals.librilight.scoring import score_document

from ..models.loader import TTTModel
from .options import BenchOptions
from .results import Figure


def score_figures(m: TTTModel, opts: BenchOptions, progress) -> dict[str, Figure]:
    """Block vs step-by-step scoring of the same random codes (with a fast-weight reset inside).

    Args:
        m: the model scored.
        opts: the run's options (`score_steps` = positions scored; `seed`).
        progress: a `Progress` hook (ttt_cli.progress).
    """
    lm = m.lm
    T = opts.score_steps
    g = torch.Generator().manual_seed(opts.seed)
    codes = torch.full((lm.num_codebooks, T), lm.zero_token_id, dtype=torch.long)  # [K, T]
    codes[1:1 + lm.dep_q] = torch.randint(0, lm.card, (lm.dep_q, T), generator=g)
    progress.start("score", f"eval scoring: blocks of 250 vs one step at a time, {T} steps", None)
    block_runs = []
    step = None
    for r in range(3):  # block, step, block: interleaved, the faster block run counts
        if r == 1:
            step = score_document(lm, codes, resets=[T // 3], step_by_step=True)
        else:
            block_runs.append(score_document(lm, codes, resets=[T // 3], block_steps=250))
    block = min(block_runs, key=lambda s: s.seconds)
    tokens = int(torch.isfinite(block.nll).sum())
    speed = (tokens / block.seconds) / (tokens / step.seconds)
    diff = float((block.nll - step.nll).nan_to_num().abs().max())
    progress.finish("score", speedup=speed, max_abs_diff=diff)
    return {"eval_block_speedup": Figure("eval_block_speedup", speed, detail={
                "block_tokens_per_s": tokens / block.seconds, "step_tokens_per_s": tokens / step.seconds, "steps": T}),
            "eval_nll_max_abs_diff": Figure("eval_nll_max_abs_diff", diff)}
