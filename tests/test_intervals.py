"""Bootstrap intervals (SPEC §5.8) against references written here: scipy's bootstrap called directly on hand-made
per-unit numbers, a plain numpy percentile bootstrap, hand-enumerated resample sets, and coverage on synthetic data
whose true value is known."""

import numpy as np
import pytest
from scipy import stats

from evals.intervals import Bootstrap, UnitScores, diff_interval, policy_intervals, ratio, ratio_interval

# Hand-made per-document (Σ nll, tokens): lengths differ, so a ratio of sums is not a mean of ratios.
DOCS = [(412.0, 100), (95.5, 20), (1310.25, 300), (48.0, 10), (880.0, 210), (233.0, 50)]
OFF = [(400.0, 100), (90.0, 20), (1290.0, 300), (47.5, 10), (845.0, 210), (230.0, 50)]


def scipy_ratio_ci(pairs, n, seed):
    num, den = np.array(pairs, dtype=float).T
    res = stats.bootstrap((num, den), lambda a, b, axis: a.sum(axis) / b.sum(axis), n_resamples=n, paired=True,
                          vectorized=True, method="percentile", confidence_level=0.95,
                          rng=np.random.default_rng(seed))
    return [res.confidence_interval.low, res.confidence_interval.high]


def numpy_percentile(pairs, base, n, seed):
    """A plain percentile bootstrap: n resamples of the units' indices, the ratio of sums (minus the baseline's
    on the same indices), the 2.5% and 97.5% quantiles."""
    a = np.array(pairs, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(a), (n, len(a)))
    stat = a[idx, 0].sum(1) / a[idx, 1].sum(1)
    if base is not None:
        b = np.array(base, dtype=float)
        stat = stat - b[idx, 0].sum(1) / b[idx, 1].sum(1)
    return list(np.quantile(stat, [0.025, 0.975]))


def test_same_seed_same_interval_as_scipy_and_a_plain_numpy_bootstrap():
    boot = Bootstrap(1000, 7, "document")
    got = ratio_interval(DOCS, boot)
    assert got == pytest.approx(scipy_ratio_ci(DOCS, 1000, 7), rel=1e-12)
    assert got == pytest.approx(numpy_percentile(DOCS, None, 1000, 7), rel=1e-12)  # same draws, same quantiles
    assert ratio_interval(DOCS, boot) == got                                       # reproducible
    assert ratio_interval(DOCS, Bootstrap(1000, 8, "document")) != got             # the seed matters
    lo, hi = got
    assert lo < ratio(DOCS) < hi
    # paired difference: both policies resampled with the same documents
    d = diff_interval(DOCS, OFF, boot)
    assert d == pytest.approx(numpy_percentile(DOCS, OFF, 1000, 7), rel=1e-12)
    # unpaired (independent draws) would be far wider: the documents' shared difficulty cancels in a pair
    wide = np.subtract(ratio_interval(DOCS, boot), ratio_interval(OFF, Bootstrap(1000, 99, "document"))[::-1])
    assert d[1] - d[0] < 0.5 * (wide[1] - wide[0])


def test_ratio_of_sums_not_mean_of_per_unit_ratios():
    """Corpus WER = Σ errors / Σ words. Two short recordings with WER 1.0 and three long ones with 0.1: the mean
    of per-file WERs is 0.46, the corpus WER 0.104; every resample of whole recordings has a corpus WER between
    0.1 and 1, and resampling per-file WERs instead would centre near 0.46."""
    rec = [(1, 1), (2, 2), (30, 300), (40, 400), (5, 50)]
    corpus = 78 / 753
    lo, hi = ratio_interval(rec, Bootstrap(2000, 0, "recording"))
    assert lo <= corpus <= hi and 0.1 <= lo and hi < 0.2
    per_file = np.mean([e / w for e, w in rec])
    assert per_file == pytest.approx(0.46) and hi < per_file
    # the mean of per-file WERs has its own interval, as a ratio of (wer_i, 1) pairs: centred on 0.46
    mlo, mhi = ratio_interval([(e / w, 1.0) for e, w in rec], Bootstrap(2000, 0, "recording"))
    assert mlo < per_file < mhi and mhi > 0.5


def test_two_units_every_resample_enumerated():
    """With units A = (1, 1) and B = (10, 100), a resample is AA (1.0), BB (0.1) or AB (11/101), with
    probabilities 1/4, 1/4, 1/2: the 2.5% and 97.5% quantiles are 0.1 and 1.0."""
    assert ratio_interval([(1, 1), (10, 100)], Bootstrap(4000, 3, "recording")) == pytest.approx([0.1, 1.0])


def test_no_interval_with_one_unit_or_no_resamples():
    boot = Bootstrap(1000, 0, "document")
    assert ratio_interval([(3.0, 4)], boot) is None
    assert diff_interval([(3.0, 4)], [(2.0, 4)], boot) is None
    assert ratio_interval(DOCS, Bootstrap(0, 0, "document")) is None
    assert "needs at least 2" in boot.record(1)["note"] and "note" not in boot.record(2)
    assert Bootstrap(0, 0, "recording").record(5) == {"resamples": 0, "seed": 0, "level": 0.95,
                                                      "method": "percentile", "unit": "recording", "units": 5,
                                                      "note": "no intervals: --bootstrap 0"}
    with pytest.raises(ValueError, match="paired"):
        diff_interval(DOCS, OFF[:3], boot)


def test_bins_resample_only_the_units_that_have_them():
    boot = Bootstrap(500, 1, "document")
    u = lambda pairs: UnitScores((sum(p[0] for p in pairs), sum(p[1] for p in pairs)), pairs)
    # three documents of 3, 2 and 1 bins
    doc = [u([(10.0, 5), (12.0, 5), (9.0, 5)]), u([(8.0, 4), (7.0, 5)]), u([(11.0, 5)])]
    off = [u([(9.0, 5), (11.0, 5), (9.5, 5)]), u([(8.5, 4), (6.0, 5)]), u([(10.0, 5)])]
    iv = policy_intervals({"document": doc, "off": off}, boot)
    assert iv["off"]["vs_off"] is None and all(b["vs_off"] is None for b in iv["off"]["bins"])
    d = iv["document"]
    assert d["ci"] == ratio_interval([x.total for x in doc], boot)
    assert d["vs_off"]["diff"] == pytest.approx(ratio([x.total for x in doc]) - ratio([x.total for x in off]))
    assert d["vs_off"]["ci"] == diff_interval([x.total for x in doc], [x.total for x in off], boot)
    assert len(d["bins"]) == 3
    assert d["bins"][0]["ci"] == ratio_interval([x.bins[0] for x in doc], boot)           # all three documents
    assert d["bins"][1]["ci"] == ratio_interval([doc[0].bins[1], doc[1].bins[1]], boot)    # the two that reach it
    assert d["bins"][1]["vs_off"]["ci"] == diff_interval([doc[0].bins[1], doc[1].bins[1]],
                                                         [off[0].bins[1], off[1].bins[1]], boot)
    assert d["bins"][2]["ci"] is None and d["bins"][2]["vs_off"]["ci"] is None            # one document: none
    assert d["bins"][2]["vs_off"]["diff"] == pytest.approx(9.0 / 5 - 9.5 / 5)
    # no baseline in the run: no differences; a unit not scored under a policy is left out
    alone = policy_intervals({"document": [doc[0], None, doc[2]]}, boot)["document"]
    assert alone["vs_off"] is None and alone["ci"] == ratio_interval([doc[0].total, doc[2].total], boot)


def test_coverage_close_to_95_percent():
    """200 synthetic corpora with a known ratio: units of 5..50 tokens, each token's value mean 2.0 (unit effects
    added), so Σ num / Σ den estimates 2.0; and a second policy 0.1 lower on the same units (the paired
    difference's true value -0.1). The percentile interval should cover the truth about 95% of the time
    (somewhat less with 30 units); bounds far from that keep this test steady."""
    rng = np.random.default_rng(12345)
    hits = diff_hits = 0
    reps = 200
    for k in range(reps):
        den = rng.integers(5, 51, 30).astype(float)
        effect = rng.normal(0.0, 0.5, 30)                         # a unit's difficulty, shared by both policies
        num = den * (2.0 + effect) + rng.normal(0.0, 1.0, 30) * np.sqrt(den)
        num_b = num + den * 0.1 + rng.normal(0.0, 0.3, 30) * np.sqrt(den)
        boot = Bootstrap(300, k, "document")
        lo, hi = ratio_interval(list(zip(num, den)), boot)
        hits += lo <= 2.0 <= hi
        dlo, dhi = diff_interval(list(zip(num, den)), list(zip(num_b, den)), boot)
        diff_hits += dlo <= -0.1 <= dhi
    assert 0.86 <= hits / reps <= 0.99, hits
    assert 0.86 <= diff_hits / reps <= 0.99, diff_hits
