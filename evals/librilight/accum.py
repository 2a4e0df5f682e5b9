"""Sums of NLL and tokens per position bin and group, and a policy's results.json entry from them (SPEC §6)."""

from __future__ import annotations

import math

import numpy as np

from ttt_cli.units import FRAME_RATE

from ..policies import Policy

GROUPS = ("all", "semantic", "acoustic", "text")


class Accum:
    """Sums of NLL and token counts per position bin, per group (all/semantic/acoustic/text)."""

    def __init__(self, bins: int = 0):
        self.sums = {g: [0.0] * bins for g in GROUPS}
        self.counts = {g: [0] * bins for g in GROUPS}
        self.seconds = 0.0   # scoring wall time
        self.steps = 0
        self.documents = 0

    def _grow(self, n: int) -> None:
        for g in GROUPS:
            self.sums[g] += [0.0] * (n - len(self.sums[g]))
            self.counts[g] += [0] * (n - len(self.counts[g]))

    def add(self, nll, text_nll, bin_steps: int, seconds: float) -> None:
        """Adds one document's NLL [dep_q, T] and text NLL [T]; bins by code step (not delayed position).

        Args:
            nll: [dep_q, T] NLL per codebook and step (NaN: not scored).
            text_nll: [T] NLL of the text stream (NaN: not scored).
            bin_steps: steps per position bin.
            seconds: the scoring time.
        """
        T = int(nll.shape[-1])
        n_bins = (T + bin_steps - 1) // bin_steps
        self._grow(n_bins)
        a = nll.double().numpy()
        groups = {"all": a, "semantic": a[:1], "acoustic": a[1:], "text": text_nll.double().numpy()[None]}
        bin_of = np.arange(T) // bin_steps
        for g, x in groups.items():
            if x.size == 0:
                continue
            ok = ~np.isnan(x)
            cols = np.broadcast_to(bin_of, x.shape)[ok]
            s = np.bincount(cols, weights=x[ok], minlength=n_bins)
            c = np.bincount(cols, minlength=n_bins)
            for i in range(n_bins):
                self.sums[g][i] += float(s[i])
                self.counts[g][i] += int(c[i])
        self.seconds += seconds
        self.steps += T
        self.documents += 1

    def merge(self, other: "Accum") -> None:
        """Adds another document's (or policy's) sums."""
        self._grow(len(other.sums["all"]))
        for g in GROUPS:
            for i, (s, c) in enumerate(zip(other.sums[g], other.counts[g])):
                self.sums[g][i] += s
                self.counts[g][i] += c
        self.seconds += other.seconds
        self.steps += other.steps
        self.documents += other.documents

    def mean(self, g: str, i: int | None = None) -> float | None:
        """The mean NLL of group `g` (in bin `i`, else overall); None without a token."""
        s = sum(self.sums[g]) if i is None else self.sums[g][i]
        c = sum(self.counts[g]) if i is None else self.counts[g][i]
        return s / c if c else None

    def to_dict(self) -> dict:
        """The sums as the resume record keeps them (`from_dict` reads them back)."""
        return {"sums": self.sums, "counts": self.counts, "seconds": self.seconds, "steps": self.steps,
                "documents": self.documents}

    @classmethod
    def from_dict(cls, d: dict) -> "Accum":
        a = cls()
        a.sums, a.counts = {g: list(d["sums"][g]) for g in GROUPS}, {g: list(d["counts"][g]) for g in GROUPS}
        a.seconds, a.steps, a.documents = float(d["seconds"]), int(d["steps"]), int(d["documents"])
        return a


def ppl(nll: float | None) -> float | None:
    """The perplexity of a mean NLL (inf beyond what a float holds; None for None).

    Args:
        nll: a mean NLL in nats.
    """
    if nll is None:
        return None
    return math.exp(nll) if nll < 700 else math.inf


def policy_section(p: Policy, acc: Accum, bin_steps: int, telemetry: dict, lr: float, warm: bool) -> dict:
    """results.json's entry of one policy: means, perplexities, token counts, curve, timing, telemetry.

    Args:
        p: the policy.
        acc: its sums over the finished documents.
        bin_steps: steps per position bin.
        telemetry: its per-layer telemetry sums.
        lr: the run's rate.
        warm: a warm start (--init-state) was given.
    """
    curve = []
    for i in range(len(acc.sums["all"])):
        curve.append({"bin_start_s": i * bin_steps / FRAME_RATE, "bin_end_s": (i + 1) * bin_steps / FRAME_RATE,
                      "nll": acc.mean("all", i), "nll_semantic": acc.mean("semantic", i),
                      "nll_acoustic": acc.mean("acoustic", i), "nll_text": acc.mean("text", i),
                      "tokens": acc.counts["all"][i], "tokens_text": acc.counts["text"][i]})
    tokens = {g: sum(acc.counts[g]) for g in GROUPS}
    return {
        "policy": p.name, "description": p.describe(),
        "ttt": {"on": p.ttt_on and lr > 0, "lr": lr if p.ttt_on else 0.0, "warm_start": warm and p.ttt_on},
        "nll": acc.mean("all"), "perplexity": ppl(acc.mean("all")),
        "nll_semantic": acc.mean("semantic"), "perplexity_semantic": ppl(acc.mean("semantic")),
        "nll_acoustic": acc.mean("acoustic"), "perplexity_acoustic": ppl(acc.mean("acoustic")),
        "nll_text": acc.mean("text"), "perplexity_text": ppl(acc.mean("text")),
        "tokens": tokens, "documents": acc.documents, "steps": acc.steps,
        "timing": {"seconds": acc.seconds, "steps_per_second": acc.steps / acc.seconds if acc.seconds else None,
                   "tokens_per_second": tokens["all"] / acc.seconds if acc.seconds else None},
        "telemetry": telemetry,
        "curve": curve,
    }
