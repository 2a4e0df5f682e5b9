"""The evals' intervals recomputed in the tests: scipy's bootstrap called directly on per-unit sums."""

import numpy as np
from scipy import stats


def scipy_ci(*pairs):
    """scipy's paired percentile bootstrap of Σ num / Σ den (minus the second policy's), called here directly:
    1000 resamples, the default --seed 0.

    Args:
        pairs: one or two lists of per-unit (num, den) pairs (documents' Σ nll and tokens, recordings' errors
            and words); two: the first policy's ratio minus the second's, units resampled together.
    """
    arrays = [np.asarray(x, dtype=float) for p in pairs for x in zip(*p)]
    stat = (lambda a, b, axis: a.sum(axis) / b.sum(axis)) if len(pairs) == 1 else (
        lambda a, b, c, d, axis: a.sum(axis) / b.sum(axis) - c.sum(axis) / d.sum(axis))
    res = stats.bootstrap(arrays, stat, n_resamples=1000, paired=True, vectorized=True, method="percentile",
                          rng=np.random.default_rng(0))
    return [res.confidence_interval.low, res.confidence_interval.high]
