"""Transcript formats: subtitle cues cut from word times, and their SRT / WebVTT / TSV texts (docs/infer.md)."""

from __future__ import annotations

import typing as tp
from dataclasses import dataclass

from ..errors import ConfigError

FORMATS = ("txt", "json", "srt", "vtt", "tsv")   # openai/whisper's `--output_format` names, in writing order
SUBTITLE_FORMATS = ("srt", "vtt", "tsv")          # the formats made of cues
DEFAULT_FORMATS = ("txt", "json")                 # what `ttt infer` wrote before `--format` existed
MAX_LINE_WIDTH = 42   # characters per line (the common broadcast limit; whisper has no default)
MAX_LINE_COUNT = 2    # lines per cue
LONG_PAUSE_SECONDS = 3.0   # a silence longer than this between two words ends a cue (whisper's rule)


class TimedWord(tp.Protocol):
    """What a cue is cut from: a word and its times in seconds (`ttt_cli.infer.Word` is one)."""

    word: str
    start: float
    end: float


@dataclass(frozen=True)
class Cue:
    """One subtitle: its lines, from its first word's start to its last word's end (seconds)."""

    start: float
    end: float
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        """The lines as one text, one line per line (SRT and VTT cue text)."""
        return "\n".join(self.lines)


def parse_formats(spec: str) -> tuple[str, ...]:
    """`--format`: a comma list of `txt,json,srt,vtt,tsv`, or `all`; returns them in `FORMATS` order.

    `json` is always included: `<stem>.json` is the record that says an input's outputs are complete and
    ttt's own (what `--overwrite` may replace), so it is written whatever the list (docs/infer.md).

    Args:
        spec: the option's value, e.g. "srt,vtt" or "all".
    Raises:
        ConfigError: an empty list or an unknown name (exit 2).
    """
    names = [n.strip().lower() for n in spec.split(",")]
    if names == ["all"]:
        return FORMATS
    unknown = [n for n in names if n not in FORMATS]
    if not any(names) or unknown:
        what = f"unknown format(s) {', '.join(repr(n) for n in unknown if n)}" if any(unknown) else "an empty list"
        raise ConfigError(f"--format {spec!r}: {what}; give a comma list of {', '.join(FORMATS)}, or all.")
    return tuple(f for f in FORMATS if f in names or f == "json")


def check_limits(max_line_width: int, max_line_count: int) -> None:
    """Refuses limits no cue can keep (ConfigError, exit 2).

    Args:
        max_line_width: characters per line.
        max_line_count: lines per cue.
    """
    if max_line_width < 1:
        raise ConfigError(f"--max-line-width must be >= 1 character, got {max_line_width}.")
    if max_line_count < 1:
        raise ConfigError(f"--max-line-count must be >= 1 line, got {max_line_count}.")


def cut_cues(words: tp.Iterable[TimedWord], max_line_width: int = MAX_LINE_WIDTH,
             max_line_count: int = MAX_LINE_COUNT, long_pause: float = LONG_PAUSE_SECONDS) -> list[Cue]:
    """Cues from words in order: words fill a line (joined by one space) while it stays within
    `max_line_width` characters, lines fill a cue up to `max_line_count`; a word that starts more than
    `long_pause` seconds after the previous word ends starts a new cue. A word longer than the width
    gets a line of its own (words are never split).

    Args:
        words: the words with their times (seconds), in order.
        max_line_width: characters per line.
        max_line_count: lines per cue.
        long_pause: seconds of silence between words that end a cue.
    """
    check_limits(max_line_width, max_line_count)
    cues: list[Cue] = []
    lines: list[str] = []
    line: list[str] = []
    first: TimedWord | None = None
    last: TimedWord | None = None

    def close() -> None:
        nonlocal lines, line, first, last
        if line:
            lines.append(" ".join(line))
        if lines and first is not None and last is not None:
            cues.append(Cue(first.start, max(first.start, last.end), tuple(lines)))
        lines, line, first, last = [], [], None, None

    for w in words:
        if last is not None and w.start - last.end > long_pause:
            close()
        if line and len(" ".join(line)) + 1 + len(w.word) > max_line_width:
            lines.append(" ".join(line))
            line = []
            if len(lines) >= max_line_count:
                close()
        if first is None:
            first = w
        line.append(w.word)
        last = w
    close()
    return cues


def timestamp(seconds: float, marker: str) -> str:
    """`HH:MM:SS<marker>mmm`, milliseconds rounded (SRT: marker `,`; WebVTT: `.`).

    Args:
        seconds: a time >= 0.
        marker: what separates seconds and milliseconds.
    """
    ms = round(max(0.0, seconds) * 1000)
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{marker}{ms:03d}"


def srt_text(cues: tp.Sequence[Cue]) -> str:
    """SubRip: numbered cues from 1, `HH:MM:SS,mmm --> HH:MM:SS,mmm`, a blank line after each.

    Args:
        cues: the cues.
    """
    return "".join(f"{i}\n{timestamp(c.start, ',')} --> {timestamp(c.end, ',')}\n{c.text}\n\n"
                   for i, c in enumerate(cues, start=1))


def vtt_text(cues: tp.Sequence[Cue]) -> str:
    """WebVTT: the `WEBVTT` header, then `HH:MM:SS.mmm --> HH:MM:SS.mmm` cues; `&`, `<`, `>` in the text
    are written as character references, as WebVTT requires.

    Args:
        cues: the cues.
    """
    def escaped(text: str) -> str:
        return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return "WEBVTT\n\n" + "".join(f"{timestamp(c.start, '.')} --> {timestamp(c.end, '.')}\n{escaped(c.text)}\n\n"
                                  for c in cues)


def tsv_text(cues: tp.Sequence[Cue]) -> str:
    """Tab-separated `start`, `end` (integer milliseconds) and `text` (the cue's lines joined by a space,
    tabs made spaces), one cue a row under a header row, as whisper's tsv writer does.

    Args:
        cues: the cues.
    """
    rows = "".join(f"{round(1000 * c.start)}\t{round(1000 * c.end)}\t{' '.join(c.lines).replace(chr(9), ' ')}\n"
                   for c in cues)
    return "start\tend\ttext\n" + rows


WRITERS: dict[str, tp.Callable[[tp.Sequence[Cue]], str]] = {"srt": srt_text, "vtt": vtt_text, "tsv": tsv_text}


def subtitle_texts(words: tp.Iterable[TimedWord], formats: tp.Iterable[str], max_line_width: int = MAX_LINE_WIDTH,
                   max_line_count: int = MAX_LINE_COUNT) -> dict[str, str]:
    """{format: file text} for the subtitle formats among `formats`, all from the same cues.

    Args:
        words: the words with their times (seconds), in order.
        formats: output formats (others than srt, vtt, tsv are left out).
        max_line_width: characters per line.
        max_line_count: lines per cue.
    """
    wanted = [f for f in SUBTITLE_FORMATS if f in formats]
    if not wanted:
        return {}
    cues = cut_cues(words, max_line_width, max_line_count)
    return {f: WRITERS[f](cues) for f in wanted}
