"""Whisper's English text normaliser, and the times of normalised hypothesis words (docs/asr.md)."""

from __future__ import annotations

import functools
import math
import typing as tp
from dataclasses import dataclass

import jiwer
from whisper_normalizer.english import EnglishTextNormalizer


@functools.lru_cache(maxsize=1)
def _normalizer():
    # whisper's EnglishTextNormalizer, from the `whisper-normalizer` package (no torch pin): what
    # kyutai's STT evaluation scores with, so our WERs are comparable with theirs.
    return EnglishTextNormalizer()


def normalize_text(text: str) -> str:
    """Whisper's English normalisation: lower case, no punctuation, numbers as digits, US spelling.

    Args:
        text: raw text (a reference as read, or a hypothesis as produced).
    """
    return " ".join(_normalizer()(text).split())


def normalize_words(text: str) -> list[str]:
    """The normalised text split into words (what WER counts).

    Args:
        text: raw text.
    """
    return normalize_text(text).split()


@dataclass(frozen=True)
class TimedWord:
    """A hypothesis word with its times in the recording, as `ttt infer` produces them (seconds)."""

    word: str
    start: float
    end: float


@dataclass(frozen=True)
class TimedToken:
    """A normalised hypothesis word with the times given to it (see `timed_tokens`)."""

    word: str
    start: float
    end: float


def as_timed_words(words: tp.Iterable) -> list[TimedWord]:
    """Accepts `ttt_cli.infer.Word` objects, `{"word", "start", "end"}` dicts or 3-tuples.

    Args:
        words: the hypothesis words with their start and end times in seconds.
    Raises:
        ValueError: an entry has none of these shapes or a non-finite time.
    """
    out = []
    for w in words:
        if isinstance(w, dict):
            t = (w["word"], w["start"], w["end"])
        elif isinstance(w, (tuple, list)):
            t = tuple(w)
        else:
            t = (w.word, w.start, w.end)
        if len(t) != 3:
            raise ValueError(f"a timed word is (word, start, end), got {w!r}")
        word, start, end = str(t[0]), float(t[1]), float(t[2])
        if not (math.isfinite(start) and math.isfinite(end)):
            raise ValueError(f"non-finite time in {w!r}")
        out.append(TimedWord(word, start, end))
    return out


def word_tokens(words: tp.Sequence[TimedWord]) -> list[TimedToken]:
    """Each timed word normalised on its own; every token it yields keeps the word's times.

    A word that normalises to nothing (`uh`, `um`, punctuation) yields no token.

    Args:
        words: the hypothesis's timed words.
    """
    cache: dict[str, list[str]] = {}  # long recordings repeat words: normalise each text once
    out = []
    for w in words:
        toks = cache.get(w.word)
        if toks is None:
            toks = cache[w.word] = normalize_words(w.word)
        out.extend(TimedToken(t, w.start, w.end) for t in toks)
    return out


def timed_tokens(normalized: tp.Sequence[str], tokens: tp.Sequence[TimedToken] | None) -> list[TimedToken] | None:
    """Times for the normalised hypothesis words (what WER scores), from the word tokens.

    Normalisation works on context ("twenty five" → "25", "one two three" → "123"), so the words of
    the normalised hypothesis are not the timed words one for one. Each timed word is therefore also
    normalised on its own (`word_tokens`: every token keeps its word's times) and jiwer aligns the two
    sequences. A normalised word equal to its aligned token takes that token's times. Between two
    such agreeing words, the m normalised words of the stretch take the times of its n word tokens
    spread in order (the i-th, from 0, takes token ⌊i·n/m⌋: "25" takes the times of the "20" of
    "twenty", whichever way jiwer breaks its ties); a stretch with no token takes the times of the
    token just before it (just after, at the very start).

    Args:
        normalized: the normalised hypothesis words, `normalize_words(hypothesis)`.
        tokens: `word_tokens(timed words)`, or None when the transcriber gave no timestamps.
    Returns:
        one `TimedToken` per normalised word, in order; None when no time can be given (no
        timestamps, or timed words that all normalise to nothing while the hypothesis does not).
    """
    if not normalized:
        return []
    if not tokens:
        return None

    out: list[TimedToken] = []

    def give(word: str, t: TimedToken) -> None:
        out.append(TimedToken(word, t.start, t.end))

    def flush(norm_end: int, tok_start: int, tok_end: int) -> None:
        # normalised words out[len(out):norm_end] against word tokens [tok_start, tok_end)
        m, n = norm_end - len(out), tok_end - tok_start
        for i in range(m):
            j = tok_start + i * n // m if n else max(tok_start - 1, 0)
            give(normalized[len(out)], tokens[j])

    al = jiwer.process_words(" ".join(normalized), " ".join(t.word for t in tokens))
    tok_start = 0  # first word token of the current stretch of disagreement
    for c in al.alignments[0]:
        if c.type == "equal":
            flush(c.ref_start_idx, tok_start, c.hyp_start_idx)
            for k in range(c.ref_end_idx - c.ref_start_idx):
                give(normalized[c.ref_start_idx + k], tokens[c.hyp_start_idx + k])
            tok_start = c.hyp_end_idx
    flush(len(normalized), tok_start, len(tokens))
    return out
