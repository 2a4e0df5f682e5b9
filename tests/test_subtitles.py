"""`ttt infer --format`: subtitle cues cut from word times (SPEC §5.1, openai/whisper's formats).

References: cues worked out by hand for hand-made word lists (the cutter's rules), and the files `ttt infer`
writes read back with well-kept parsers (`srt`, `webvtt-py`, the csv module for TSV) and checked against the
words of the run's own `<stem>.json`: every word in exactly one cue, in order, cue times = word times to the
millisecond, line widths and counts within the limits, and every cue as long as the limits allow.
"""

import csv
import json
import shutil
from pathlib import Path

import pytest
import srt
import webvtt

from safety_helpers import cli, clip
from ttt_cli.errors import ConfigError
from ttt_cli.infer import Word
from ttt_cli.infer.subtitles import cut_cues, parse_formats, srt_text, timestamp, tsv_text, vtt_text

PAUSE = 3.0   # docs/infer.md: a silence longer than 3 s between two words ends a cue


def words(*spec):
    """Words from (text, start, end) triples."""
    return [Word(w, s, e, 0, 0) for w, s, e in spec]


# -- the cutter, against hand-worked cues -------------------------------------------------------------------

def test_cues_by_hand():
    ws = words(("The", 0.0, 0.3), ("quick", 0.3, 0.6), ("brown", 0.6, 0.9), ("fox", 0.9, 1.1),
               ("jumps", 1.2, 1.5), ("over", 1.5, 1.7), ("the", 1.7, 1.8), ("lazy", 1.8, 2.1), ("dog.", 2.1, 2.5))
    # width 11: "The quick" (9) + " brown" would be 15 -> new line; "brown fox" (9) + " jumps" 15 -> the cue
    # has its 2 lines: closed; "jumps over" (10); "the lazy" (8) + " dog." 13 -> closed; "dog." alone.
    cues = cut_cues(ws, max_line_width=11, max_line_count=2)
    assert [(c.lines, c.start, c.end) for c in cues] == [
        (("The quick", "brown fox"), 0.0, 1.1),
        (("jumps over", "the lazy"), 1.2, 2.1),
        (("dog.",), 2.1, 2.5)]
    # one line per cue
    assert [c.text for c in cut_cues(ws, 11, 1)] == ["The quick", "brown fox", "jumps over", "the lazy", "dog."]
    # wide enough for everything: one cue, one line
    assert [c.lines for c in cut_cues(ws, 100, 2)] == [("The quick brown fox jumps over the lazy dog.",)]
    # exactly the width: "The quick brown" is 15 characters
    assert cut_cues(ws[:3], 15, 1)[0].text == "The quick brown" and len(cut_cues(ws[:3], 14, 1)) == 2


def test_long_pause_long_word_and_nothing():
    ws = words(("one", 0.0, 0.4), ("two", 0.5, 1.0), ("three", 4.0, 4.5), ("four", 7.6, 8.0))
    # 1.0 -> 4.0 is exactly 3 s (not longer: same cue); 4.5 -> 7.6 is 3.1 s: a new cue
    assert [(c.text, c.start, c.end) for c in cut_cues(ws, 42, 2)] == [("one two three", 0.0, 4.5),
                                                                       ("four", 7.6, 8.0)]
    long = words(("a", 0.0, 0.1), ("supercalifragilistic", 0.1, 0.9), ("b", 1.0, 1.1))
    assert [c.lines for c in cut_cues(long, 5, 3)] == [("a", "supercalifragilistic", "b")]  # never split
    assert cut_cues([], 42, 2) == []
    with pytest.raises(ConfigError, match="--max-line-width"):
        cut_cues(ws, 0, 2)
    with pytest.raises(ConfigError, match="--max-line-count"):
        cut_cues(ws, 10, 0)


def test_file_texts_by_hand():
    cues = cut_cues(words(("Hi", 0.0, 0.5), ("there,", 0.5, 1.0), ("<you>", 1.5, 3724.5)), 9, 2)
    assert timestamp(3723.0456, ",") == "01:02:03,046" and timestamp(0.0005, ".") == "00:00:00.000"  # half to even
    assert srt_text(cues) == "1\n00:00:00,000 --> 01:02:04,500\nHi there,\n<you>\n\n"
    assert vtt_text(cues) == "WEBVTT\n\n00:00:00.000 --> 01:02:04.500\nHi there,\n&lt;you&gt;\n\n"
    assert tsv_text(cues) == "start\tend\ttext\n0\t3724500\tHi there, <you>\n"
    assert srt_text([]) == "" and vtt_text([]) == "WEBVTT\n\n" and tsv_text([]) == "start\tend\ttext\n"


def test_parse_formats():
    assert parse_formats("txt,json") == ("txt", "json")
    assert parse_formats("SRT, vtt") == ("json", "srt", "vtt")            # json always: the input's record
    assert parse_formats("all") == ("txt", "json", "srt", "vtt", "tsv")
    for bad in ("pdf", "", "srt,,vtt", "all,srt"):
        with pytest.raises(ConfigError, match="--format"):
            parse_formats(bad)


# -- the written files, read back by subtitle libraries ------------------------------------------------------

def _ms(seconds):
    return round(seconds * 1000)


def read_cues(out: Path, stem: str):
    """{format: [(start ms, end ms, [lines])]} of the srt, vtt and tsv files, read by srt, webvtt-py and csv."""
    got = {}
    if (out / f"{stem}.srt").exists():
        subs = list(srt.parse((out / f"{stem}.srt").read_text(encoding="utf-8")))
        assert [s.index for s in subs] == list(range(1, len(subs) + 1))
        got["srt"] = [(s.start.days * 86_400_000 + s.start.seconds * 1000 + s.start.microseconds // 1000,
                       s.end.days * 86_400_000 + s.end.seconds * 1000 + s.end.microseconds // 1000,
                       s.content.split("\n")) for s in subs]
    if (out / f"{stem}.vtt").exists():
        assert (out / f"{stem}.vtt").read_text(encoding="utf-8").startswith("WEBVTT\n")

        def ms(t):
            return ((t.hours * 60 + t.minutes) * 60 + t.seconds) * 1000 + t.milliseconds
        vtt = webvtt.read(str(out / f"{stem}.vtt"))
        unescape = (lambda s: s.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"))
        got["vtt"] = [(ms(c.start_time), ms(c.end_time), [unescape(x) for x in c.lines]) for c in vtt.captions]
    if (out / f"{stem}.tsv").exists():
        with open(out / f"{stem}.tsv", newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
        assert rows[0] == ["start", "end", "text"]
        got["tsv"] = [(int(a), int(b), [t]) for a, b, t in rows[1:]]
    return got


def check_against_words(cues, ws, width, count, joined_lines=False):
    """Each word in exactly one cue, in order; cue times = its first word's start and last word's end (ms);
    lines within the limits (a word wider than the line alone on it); every cue as full as the limits allow."""
    i = 0
    for n, (start, end, lines) in enumerate(cues):
        assert lines and all(lines)
        texts = [w for line in lines for w in line.split(" ")]
        mine = ws[i:i + len(texts)]
        assert [w["word"] for w in mine] == texts
        assert (start, end) == (_ms(mine[0]["start"]), _ms(max(mine[-1]["end"], mine[0]["start"])))
        if not joined_lines:
            assert len(lines) <= count
            assert all(len(line) <= width or " " not in line for line in lines)
            if n + 1 < len(cues):  # why the cue ended: the next word fits neither the line nor a new line, or a pause
                nxt = ws[i + len(texts)]
                full = len(lines) == count and len(lines[-1]) + 1 + len(nxt["word"]) > width
                assert full or nxt["start"] - mine[-1]["end"] > PAUSE
        i += len(texts)
    assert i == len(ws)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 2 s slice of the bundled espeak-ng clip through tiny-stt (stt, every format) and tiny (transcribe,
    subtitles only; dialog, vtt only)."""
    root = tmp_path_factory.mktemp("subs")
    audio = clip(root / "speech.wav", 0.3, 2.0)
    common = ["--greedy", "--max-line-width", "12", "--json"]
    stt = cli("infer", audio, "--model", "tiny-stt", "--format", "all", *common, "--out", root / "stt")
    tr = cli("infer", audio, "--model", "tiny", "--mode", "transcribe", "--format", "srt,vtt,tsv", *common,
             "--out", root / "transcribe")
    dialog = cli("infer", audio, "--model", "tiny", "--mode", "dialog", "--format", "vtt", *common,
                 "--max-line-count", "1", "--out", root / "dialog")
    return root, audio, stt, tr, dialog


def test_stt_files_match_the_json_words(runs):
    root, _, r, _, _ = runs
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)["results"][0]
    out = root / "stt"
    assert sorted(p.name for p in out.iterdir()) == ["speech.json", "speech.srt", "speech.tsv", "speech.txt",
                                                     "speech.vtt"]
    assert res["mode"] == "stt" and res["subtitles"] == {"max_line_width": 12, "max_line_count": 2}
    assert {k: Path(v).name for k, v in res["outputs"].items()} == {f: f"speech.{f}" for f in
                                                                    ("txt", "srt", "vtt", "tsv", "json")}
    assert json.loads((out / "speech.json").read_text()) == res
    assert (out / "speech.txt").read_text() == res["text"] + "\n"
    ws = res["words"]
    assert len(ws) >= 3  # enough words for several cues at 12 characters a line
    got = read_cues(out, "speech")
    assert got["srt"] == got["vtt"] and len(got["srt"]) >= 2
    check_against_words(got["srt"], ws, 12, 2)
    check_against_words(got["tsv"], ws, 12, 2, joined_lines=True)
    assert [(a, b, " ".join(t)) for a, b, t in got["srt"]] == [(a, b, t[0]) for a, b, t in got["tsv"]]


def test_transcribe_and_dialog_subtitles(runs):
    root, _, _, r, d = runs
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)["results"][0]
    out = root / "transcribe"
    assert sorted(p.name for p in out.iterdir()) == ["speech.json", "speech.srt", "speech.tsv", "speech.vtt"]
    assert "txt" not in res["outputs"] and res["mode"] == "transcribe"
    got = read_cues(out, "speech")
    assert got["srt"] == got["vtt"]
    assert len(got["srt"]) >= 3 and any(len(t) == 2 and " " in t[0] for _, _, t in got["srt"])  # full cues
    check_against_words(got["srt"], res["words"], 12, 2)
    check_against_words(got["tsv"], res["words"], 12, 2, joined_lines=True)
    # dialog: Moshi's own words, on the timeline of its voice (<stem>.wav)
    assert d.exit_code == 0, d.output
    res = json.loads(d.stdout)["results"][0]
    assert sorted(p.name for p in (root / "dialog").iterdir()) == ["speech.json", "speech.vtt", "speech.wav"]
    check_against_words(read_cues(root / "dialog", "speech")["vtt"], res["words"], 12, 1)


def test_default_formats_and_usage_errors(runs, tmp_path):
    root, audio, *_ = runs
    for args, words_ in ((["--format", "pdf"], "unknown format"),
                         (["--max-line-width", "20"], "add srt, vtt or tsv"),
                         (["--format", "srt", "--max-line-count", "0"], "--max-line-count must be >= 1")):
        r = cli("infer", audio, "--model", "tiny-stt", "--out", tmp_path / "x", "--json", *args)
        assert r.exit_code == 2 and words_ in json.loads(r.stdout)["error"]["message"], r.output
    assert not (tmp_path / "x").exists()  # refused before any work
    # an earlier run's subtitles are replaced only with --overwrite; a file ttt did not write never
    out = shutil.copytree(root / "stt", tmp_path / "stt")  # the other tests read the fixture's files
    before = (out / "speech.srt").read_bytes()
    r = cli("infer", audio, "--model", "tiny-stt", "--greedy", "--format", "srt", "--out", out)
    assert r.exit_code == 2 and "--overwrite" in r.stderr
    r = cli("infer", audio, "--model", "tiny-stt", "--greedy", "--format", "srt", "--max-line-width", "12",
            "--out", out, "--overwrite")
    assert r.exit_code == 0, r.output
    assert (out / "speech.srt").read_bytes() == before  # same run, same cues
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "speech.vtt").write_text("WEBVTT\n\n")
    r = cli("infer", audio, "--model", "tiny-stt", "--format", "vtt", "--out", tmp_path / "mine", "--overwrite")
    assert r.exit_code == 2 and "was not written by ttt" in r.stderr
    assert (tmp_path / "mine" / "speech.vtt").read_text() == "WEBVTT\n\n"
