"""95% intervals by bootstrap over independent units (documents, recordings) of ratios of sums (SPEC §5.8)."""

from __future__ import annotations

import typing as tp
import warnings
from dataclasses import dataclass

import numpy as np

LEVEL = 0.95
# Percentile, not BCa: a percentile interval is a continuous function of the units' sums, so a sharded run
# (sums equal up to float summation order) gives the same interval up to that order; BCa's bias correction
# counts resampled statistics below the estimate, which jumps when a tie (a resample that is a permutation
# of the units: half of them with 2 units) moves by one ulp. Its jackknife is also O(units²).
METHOD = "percentile"
DEFAULT_RESAMPLES = 1000
BASELINE = "off"           # the policy every other one is compared with (paired differences)
_BATCH_ELEMENTS = 1 << 22  # resample indices drawn at a time (memory only: the draws do not depend on it)

Pair = tuple[float, float]  # one unit's (numerator sum, denominator sum): (Σ nll, tokens) or (errors, words)


@dataclass(frozen=True)
class Bootstrap:
    """How intervals are drawn: `resamples` (0: none), `seed`, and what a unit is (`document`, `recording`)."""

    resamples: int
    seed: int
    unit: str

    def record(self, units: int) -> dict:
        """results.json's `bootstrap` section; `note` says why there is no interval when there is none.

        Args:
            units: the units scored (documents or recordings).
        """
        rec = {"resamples": self.resamples, "seed": self.seed, "level": LEVEL, "method": METHOD, "unit": self.unit,
               "units": units}
        why = self.why_none(units)
        if why:
            rec["note"] = why
        return rec

    def why_none(self, units: int) -> str | None:
        """Why no interval is given for `units` units (None: intervals are drawn).

        Args:
            units: the units of the figure.
        """
        if self.resamples < 1:
            return "no intervals: --bootstrap 0"
        if units < 2:
            return f"no intervals: {units} {self.unit}(s) scored; a bootstrap over {self.unit}s needs at least 2"
        return None


@dataclass
class UnitScores:
    """One unit's sums under one policy: overall, and per position bin (None: the unit has no bins)."""

    total: Pair
    bins: list[Pair] | None


def ratio(pairs: tp.Sequence[Pair]) -> float | None:
    """Σ numerators / Σ denominators (None when the denominators sum to 0).

    Args:
        pairs: the units' (numerator, denominator).
    """
    den = sum(d for _, d in pairs)
    return sum(n for n, _ in pairs) / den if den else None


def _ratio_stat(num, den, axis=-1):
    return num.sum(axis=axis) / den.sum(axis=axis)


def _diff_stat(num, den, num0, den0, axis=-1):
    return num.sum(axis=axis) / den.sum(axis=axis) - num0.sum(axis=axis) / den0.sum(axis=axis)


def _draw(samples: tuple[np.ndarray, ...], statistic, boot: Bootstrap) -> list[float] | None:
    """scipy's paired percentile bootstrap of `statistic` over the units (the samples' entries), with a fresh
    generator seeded with `boot.seed`; None with fewer than 2 units, no resamples, or a non-finite bound
    (some resamples have a zero denominator)."""
    n = len(samples[0])
    if boot.why_none(n):
        return None
    # Imported here, not at the top: `scipy.stats` takes 1.3-1.5 s to import, and every eval process imports
    # this module (its options name DEFAULT_RESAMPLES) while only the process that merges draws intervals:
    # each other torchrun rank paid that second for nothing (ttt bench's scaleout_fixed_s_per_rank).
    from scipy import stats
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore")  # a degenerate distribution: said by a None, not a warning
        res = stats.bootstrap(samples, statistic, n_resamples=boot.resamples, paired=True, vectorized=True,
                              confidence_level=LEVEL, method=METHOD, rng=np.random.default_rng(boot.seed),
                              batch=max(1, min(boot.resamples, _BATCH_ELEMENTS // n)))
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return [lo, hi] if np.isfinite(lo) and np.isfinite(hi) else None


def _arrays(pairs: tp.Sequence[Pair]) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(pairs, dtype=np.float64).reshape(-1, 2)  # [units, 2]
    return a[:, 0], a[:, 1]


def ratio_interval(pairs: tp.Sequence[Pair], boot: Bootstrap) -> list[float] | None:
    """The interval of Σ num / Σ den, resampling whole units (their pairs), never their parts.

    Args:
        pairs: each unit's (numerator sum, denominator sum), in the units' canonical order.
        boot: resamples, seed.
    Returns:
        [low, high], or None (fewer than 2 units, --bootstrap 0, or a bound that is not finite).
    """
    return _draw(_arrays(pairs), _ratio_stat, boot)


def diff_interval(pairs: tp.Sequence[Pair], base: tp.Sequence[Pair], boot: Bootstrap) -> list[float] | None:
    """The interval of the paired difference ratio(pairs) − ratio(base): unit i of both resampled together.

    Args:
        pairs: each unit's (numerator, denominator) under the policy.
        base: the same units' under the baseline, in the same order.
        boot: resamples, seed.
    """
    if len(pairs) != len(base):
        raise ValueError(f"paired units differ in number: {len(pairs)} vs {len(base)}")
    return _draw((*_arrays(pairs), *_arrays(base)), _diff_stat, boot)


def _figure(units: tp.Sequence[Pair | None], base: tp.Sequence[Pair | None] | None, boot: Bootstrap) -> dict:
    """{"ci", "vs_off"} of one figure (overall or one bin): units without it (None) are left out; in the paired
    difference a unit with it under one policy only counts (0, 0) under the other, so both point estimates
    stay the reported ones."""
    own = [u for u in units if u is not None]
    out: dict[str, tp.Any] = {"ci": ratio_interval(own, boot) if ratio(own) is not None else None, "vs_off": None}
    if base is not None:
        both = [(u, b) for u, b in zip(units, base) if u is not None or b is not None]
        a = [u or (0.0, 0.0) for u, _ in both]
        b = [v or (0.0, 0.0) for _, v in both]
        ra, rb = ratio(a), ratio(b)
        if ra is not None and rb is not None:
            out["vs_off"] = {"diff": ra - rb, "ci": diff_interval(a, b, boot)}
    return out


def policy_intervals(scores: tp.Mapping[str, tp.Sequence[UnitScores | None]], boot: Bootstrap,
                     baseline: str = BASELINE) -> dict[str, dict]:
    """Every policy's intervals: overall and per bin, and the paired difference with the baseline.

    Units are the entries of each policy's list, the same unit at the same index for every policy, in a
    canonical order (the dataset's): the resamples depend on that order and the seed only, so a resumed or
    sharded run draws the same ones. Each interval draws from a generator seeded with `boot.seed` alone,
    so it does not depend on which other intervals a run computes. A bin's figure resamples only the units
    that have that bin.

    Args:
        scores: policy -> per unit, its sums (None: the unit was not scored under the policy).
        boot: resamples, seed, unit.
        baseline: the policy the others are compared with (absent: no differences).
    Returns:
        policy -> {"ci": [low, high] | None, "vs_off": {"diff", "ci"} | None, "bins": [{"ci", "vs_off"}, ...]}
        (`vs_off` None for the baseline itself and when the run has no baseline).
    """
    base = scores.get(baseline)
    out = {}
    for name, units in scores.items():
        ref = base if (base is not None and name != baseline) else None
        fig = _figure([u.total if u else None for u in units], None if ref is None else
                      [u.total if u else None for u in ref], boot)
        n_bins = max([len(u.bins) for u in units if u and u.bins] + [0])
        bins = []
        for i in range(n_bins):
            mine = [_bin(u, i) for u in units]
            bins.append(_figure(mine, None if ref is None else [_bin(u, i) for u in ref], boot))
        out[name] = {**fig, "bins": bins}
    return out


def _bin(u: UnitScores | None, i: int) -> Pair | None:
    return u.bins[i] if u is not None and u.bins is not None and i < len(u.bins) else None
