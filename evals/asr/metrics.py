"""WER/CER with jiwer, long-form failure signals and WER per position bin (SPEC §5.7, docs/asr.md)."""

from __future__ import annotations

import math
import typing as tp
from dataclasses import dataclass

import jiwer

from .normalize import TimedToken, as_timed_words, normalize_words, timed_tokens, word_tokens

DEFAULT_BIN_SECONDS = 60.0
REPEAT_SPAN = 3  # repetition_rate compares w_i..w_{i+2} with w_{i-3}..w_{i-1}


@dataclass
class WerBin:
    """Errors and reference words whose time falls in `[bin_start_s, bin_end_s)`."""

    bin_start_s: float
    bin_end_s: float
    errors: int = 0
    ref_words: int = 0

    @property
    def wer(self) -> float | None:
        """errors / ref_words; None for a bin with no reference word (insertions alone stay in `errors`)."""
        return self.errors / self.ref_words if self.ref_words else None

    def to_dict(self) -> dict:
        return {"bin_start_s": self.bin_start_s, "bin_end_s": self.bin_end_s, "wer": self.wer,
                "errors": self.errors, "ref_words": self.ref_words}


@dataclass
class FileScore:
    """One recording scored against its reference, both normalised (counts in normalised words)."""

    wer: float                   # (S + D + I) / words
    cer: float                   # character errors / chars
    substitutions: int
    deletions: int
    insertions: int
    hits: int
    words: int                   # normalised reference words
    chars: int                   # characters of the normalised reference, spaces included (jiwer's count)
    char_errors: int
    longest_deletion_run: int    # most consecutive reference words all deleted
    longest_gap_s: float | None  # longest stretch without a hypothesis word; None: no timestamps
    repetition_rate: float
    bins: list[WerBin] | None    # None: no timestamps
    reference_normalized: str
    hypothesis_normalized: str

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    def to_dict(self) -> dict:
        """The metric keys of a `files` entry of results.json (SPEC §5.7), plus the bins."""
        return {"wer": self.wer, "cer": self.cer, "substitutions": self.substitutions,
                "deletions": self.deletions, "insertions": self.insertions, "words": self.words,
                "longest_deletion_run": self.longest_deletion_run, "longest_gap_s": self.longest_gap_s,
                "repetition_rate": self.repetition_rate,
                "bins": None if self.bins is None else [b.to_dict() for b in self.bins]}


@dataclass
class CorpusScore:
    """A policy's files together: corpus rates are total errors / total reference units."""

    files: int
    wer: float                   # Σ errors / Σ words (kyutai's `corpus_wer`)
    wer_mean: float              # mean of the per-file WERs (kyutai's `wer`)
    cer: float                   # Σ char errors / Σ chars
    cer_mean: float              # mean of the per-file CERs (kyutai's `cer`)
    substitutions: int
    deletions: int
    insertions: int
    hits: int
    words: int
    chars: int
    char_errors: int
    longest_deletion_run: int    # maximum over files
    longest_gap_s: float | None  # maximum over files with timestamps
    repetition_rate: float       # maximum over files
    bins: list[WerBin]           # per position in the file, summed over files

    def to_dict(self) -> dict:
        return {"files": self.files, "wer": self.wer, "wer_mean": self.wer_mean, "cer": self.cer,
                "cer_mean": self.cer_mean, "substitutions": self.substitutions, "deletions": self.deletions,
                "insertions": self.insertions, "hits": self.hits, "words": self.words, "chars": self.chars,
                "char_errors": self.char_errors, "longest_deletion_run": self.longest_deletion_run,
                "longest_gap_s": self.longest_gap_s, "repetition_rate": self.repetition_rate,
                "bins": [b.to_dict() for b in self.bins]}


def longest_deletion_run(alignment) -> int:
    """Most consecutive reference words that are all deleted, from jiwer's alignment chunks.

    An insertion between two deletions consumes no reference word, so it does not end the run.

    Args:
        alignment: jiwer's alignment chunks of one reference and hypothesis.
    """
    best = run = 0
    for c in alignment:
        if c.type == "delete":
            run += c.ref_end_idx - c.ref_start_idx
            best = max(best, run)
        elif c.type != "insert":
            run = 0
    return best


def longest_gap(tokens: tp.Sequence[TimedToken], duration_s: float | None) -> float | None:
    """Longest stretch of the recording with no hypothesis word (seconds).

    Counted: from 0 to the first word's start, from each word's end (the latest end so far) to the
    next word's start, and from the last end to `duration_s` (the recording's end, when given).
    No word at all: the whole recording (None when its duration is not given either).

    Args:
        tokens: the hypothesis words with times (`word_tokens`: those that normalise to something).
        duration_s: the recording's length in seconds, padding excluded.
    """
    if not tokens:
        return duration_s
    gap, last_end = 0.0, 0.0
    for t in sorted(tokens, key=lambda t: t.start):
        gap = max(gap, t.start - last_end)
        last_end = max(last_end, t.end)
    if duration_s is not None:
        gap = max(gap, duration_s - last_end)
    return gap


def repetition_rate(words: tp.Sequence[str]) -> float:
    """Share of positions i where w_i..w_{i+2} equals w_{i-3}..w_{i-1}, over the positions where both
    windows exist (i = 3 .. n-3, 0-based); 0 when there is none (fewer than 6 words).

    Args:
        words: the normalised hypothesis words.
    """
    k = REPEAT_SPAN
    positions = range(k, len(words) - k + 1)
    if not positions:
        return 0.0
    same = sum(1 for i in positions if list(words[i:i + k]) == list(words[i - k:i]))
    return same / len(positions)


def reference_times(alignment, hyp_times: tp.Sequence[float], duration_s: float | None) -> list[float]:
    """The time of each normalised reference word, from jiwer's alignment with the hypothesis.

    A hit or substitution takes its hypothesis word's time; a deleted word, halfway between the
    hypothesis words aligned just before and just after its place (at the edges, the recording's
    start 0 s and its end `duration_s`; with no end known, the word before).

    Args:
        alignment: jiwer's alignment chunks (reference -> hypothesis).
        hyp_times: the time of each normalised hypothesis word.
        duration_s: the recording's length (None: unknown).
    """
    n_hyp = len(hyp_times)
    times: list[float] = []
    for c in alignment:
        if c.type in ("equal", "substitute"):
            times.extend(hyp_times[c.hyp_start_idx:c.hyp_end_idx])
        elif c.type == "delete":
            h = c.hyp_start_idx
            before = hyp_times[h - 1] if h > 0 else 0.0
            after = hyp_times[h] if h < n_hyp else (duration_s if duration_s is not None else before)
            times.extend([(before + after) / 2] * (c.ref_end_idx - c.ref_start_idx))
    return times


def position_bins(alignment, hyp_times: tp.Sequence[float], duration_s: float | None,
                  bin_seconds: float) -> list[WerBin]:
    """WER per position bin `[k·w, (k+1)·w)` of one file.

    Each reference word counts in the bin of its time (`reference_times`), with one error if it was
    substituted or deleted; an inserted hypothesis word is one error in the bin of its own time.
    Bins cover the recording (`ceil(duration_s / w)`) and any later word time (e.g. in padding).

    Args:
        alignment: jiwer's alignment chunks of the normalised reference against the hypothesis.
        hyp_times: one time per normalised hypothesis word (seconds; its start).
        duration_s: the recording's length, or None.
        bin_seconds: the bin width w.
    """
    if not bin_seconds > 0:
        raise ValueError(f"bin_seconds must be > 0, got {bin_seconds}")
    ref_t = reference_times(alignment, hyp_times, duration_s)
    events: list[tuple[float, int, int]] = []  # (time, errors, ref_words)
    k = 0
    for c in alignment:
        if c.type == "insert":
            events.extend((hyp_times[j], 1, 0) for j in range(c.hyp_start_idx, c.hyp_end_idx))
            continue
        err = 0 if c.type == "equal" else 1
        for _ in range(c.ref_start_idx, c.ref_end_idx):
            events.append((ref_t[k], err, 1))
            k += 1

    def index(t: float) -> int:
        return max(0, math.floor(t / bin_seconds))

    n = math.ceil(duration_s / bin_seconds) if duration_s else 0
    n = max([n] + [index(t) + 1 for t, _, _ in events])
    bins = [WerBin(i * bin_seconds, (i + 1) * bin_seconds) for i in range(n)]
    for t, err, ref in events:
        b = bins[index(t)]
        b.errors += err
        b.ref_words += ref
    return bins


def score_file(reference: str, hypothesis: str, words: tp.Iterable | None = None,
               duration_s: float | None = None, bin_seconds: float = DEFAULT_BIN_SECONDS) -> FileScore:
    """Scores one recording's hypothesis against its reference (both normalised, `normalize.py`).

    Args:
        reference: the reference transcript as read.
        hypothesis: the transcript as produced.
        words: the hypothesis's timed words (`ttt_cli.infer.Word`, dicts or (word, start, end)),
            or None when there are no timestamps (then no gap and no bins).
        duration_s: the recording's length in seconds (padding excluded); bounds the last gap and
            sets the number of bins.
        bin_seconds: width of the position bins.
    Raises:
        ValueError: the reference normalises to nothing (discovery skips such references).
    """
    ref = normalize_words(reference)
    if not ref:
        raise ValueError("the reference is empty after normalisation")
    hyp = normalize_words(hypothesis)
    ref_s, hyp_s = " ".join(ref), " ".join(hyp)
    w = jiwer.process_words(ref_s, hyp_s)
    c = jiwer.process_characters(ref_s, hyp_s)
    alignment = w.alignments[0]
    toks = None if words is None else word_tokens(as_timed_words(words))
    timed = timed_tokens(hyp, toks)
    n_words = w.hits + w.substitutions + w.deletions
    chars = c.hits + c.substitutions + c.deletions
    char_errors = c.substitutions + c.deletions + c.insertions
    return FileScore(
        wer=(w.substitutions + w.deletions + w.insertions) / n_words,
        cer=char_errors / chars,
        substitutions=w.substitutions, deletions=w.deletions, insertions=w.insertions, hits=w.hits,
        words=n_words, chars=chars, char_errors=char_errors,
        longest_deletion_run=longest_deletion_run(alignment),
        longest_gap_s=None if toks is None else longest_gap(toks, duration_s),
        repetition_rate=repetition_rate(hyp),
        bins=None if timed is None else position_bins(alignment, [t.start for t in timed], duration_s,
                                                      bin_seconds),
        reference_normalized=ref_s, hypothesis_normalized=hyp_s)


def merge_bins(per_file: tp.Iterable[tp.Sequence[WerBin] | None]) -> list[WerBin]:
    """Sums bins of the same position over files (all of one width; files without bins are left out).

    Args:
        per_file: each file's bins (None: the file has none).
    """
    out: list[WerBin] = []
    for bins in per_file:
        for i, b in enumerate(bins or ()):
            if i == len(out):
                out.append(WerBin(b.bin_start_s, b.bin_end_s))
            if (out[i].bin_start_s, out[i].bin_end_s) != (b.bin_start_s, b.bin_end_s):
                raise ValueError("bins of different widths cannot be merged")
            out[i].errors += b.errors
            out[i].ref_words += b.ref_words
    return out


def score_corpus(files: tp.Sequence[FileScore]) -> CorpusScore:
    """A policy's corpus figures from its files' scores.

    Args:
        files: the scores of every file the policy transcribed.
    Raises:
        ValueError: no file.
    """
    if not files:
        raise ValueError("no file to score")
    words = sum(f.words for f in files)
    chars = sum(f.chars for f in files)
    char_errors = sum(f.char_errors for f in files)
    gaps = [f.longest_gap_s for f in files if f.longest_gap_s is not None]
    return CorpusScore(
        files=len(files),
        wer=sum(f.errors for f in files) / words,
        wer_mean=sum(f.wer for f in files) / len(files),
        cer=char_errors / chars,
        cer_mean=sum(f.cer for f in files) / len(files),
        substitutions=sum(f.substitutions for f in files), deletions=sum(f.deletions for f in files),
        insertions=sum(f.insertions for f in files), hits=sum(f.hits for f in files),
        words=words, chars=chars, char_errors=char_errors,
        longest_deletion_run=max(f.longest_deletion_run for f in files),
        longest_gap_s=max(gaps) if gaps else None,
        repetition_rate=max(f.repetition_rate for f in files),
        bins=merge_bins(f.bins for f in files))
