"""`ttt eval asr` library pieces (evals/asr/): normalisation, WER/CER, failure signals, bins, data, writers.

Expected numbers are worked out by hand in each test (comments show the alignment), never taken
from the code under test.
"""

import csv
import json
import shutil
import wave
from pathlib import Path

import numpy as np
import pytest
from jiwer import AlignmentChunk

from evals.asr.data import discover_asr
from evals.asr.metrics import (WerBin, longest_deletion_run, longest_gap, merge_bins, repetition_rate, score_corpus,
                               score_file)
from evals.asr.normalize import (TimedToken, as_timed_words, normalize_text, normalize_words, timed_tokens,
                                 word_tokens)
from evals.asr.report import WER_COLUMNS, write_wer_csv, write_wer_png
from ttt_cli.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "asr"
MANIFEST = ROOT / "tests" / "data" / "asr" / "manifest.jsonl"


def timed(*spec):
    """timed("alpha", 0.5, "bravo", 1.5, ...): words lasting 0.4 s from the given starts."""
    return [(spec[i], spec[i + 1], spec[i + 1] + 0.4) for i in range(0, len(spec), 2)]


# ---------------------------------------------------------------------------------- normalisation
@pytest.mark.parametrize("raw, norm", [
    ("Hello, World! It's TWENTY-FIVE past.", "hello world it is 25 past"),     # case, punctuation, numbers
    ("She paid $20 for two hundred and fifty apples.", "she paid $20 for 250 apples"),
    ("The colour of the Theatre!", "the color of the theater"),               # British -> American
    ("Um, I won't go (laughs).", "i will not go"),                            # fillers, contractions, asides
    ("  spaced \t out\n", "spaced out"),
])
def test_whisper_normalisation(raw, norm):
    assert normalize_text(raw) == norm
    assert normalize_words(raw) == norm.split()


def test_normalised_words_get_times_of_their_source_words():
    words = as_timed_words([("I", 0.0, 0.5), ("paid", 1.0, 1.5), ("twenty", 2.0, 2.5), ("five", 3.0, 3.5),
                            ("dollars", 4.0, 4.5), ("uh", 5.0, 5.5), ("won't", 6.0, 6.5), ("stop", 7.0, 7.5)])
    toks = word_tokens(words)
    # Each word on its own: "twenty" -> "20", "five" -> "5", "uh" -> nothing, "won't" -> "will not".
    assert [(t.word, t.start) for t in toks] == [("i", 0.0), ("paid", 1.0), ("20", 2.0), ("5", 3.0),
                                                 ("dollars", 4.0), ("will", 6.0), ("not", 6.0), ("stop", 7.0)]
    norm = normalize_words("I paid twenty five dollars uh won't stop")
    assert norm == ["i", "paid", "$25", "will", "not", "stop"]
    # "$25" stands where the tokens 20, 5, dollars stand: the only word of that stretch takes the
    # first token's time (twenty); the rest agree word for word.
    got = timed_tokens(norm, toks)
    assert got == [TimedToken("i", 0.0, 0.5), TimedToken("paid", 1.0, 1.5), TimedToken("$25", 2.0, 2.5),
                   TimedToken("will", 6.0, 6.5), TimedToken("not", 6.0, 6.5), TimedToken("stop", 7.0, 7.5)]
    # Two normalised words over six tokens: the i-th takes token 6*i//2 = 0 and 3.
    toks2 = word_tokens(as_timed_words(timed("twenty", 0.0, "five", 1.0, "dollars", 2.0,
                                             "one", 3.0, "two", 4.0, "three", 5.0)))
    assert [t.start for t in timed_tokens(["$25", "123"], toks2)] == [0.0, 3.0]
    assert timed_tokens([], toks) == [] and timed_tokens(["a"], None) is None and timed_tokens(["a"], []) is None
    # ttt infer's Word objects and results.json's dicts are accepted alike
    from ttt_cli.infer import Word
    assert as_timed_words([Word("hi", 1.0, 2.0, 12, 25)]) == as_timed_words([{"word": "hi", "start": 1, "end": 2}])
    with pytest.raises(ValueError):
        as_timed_words([("hi", float("nan"), 1.0)])


# ---------------------------------------------------------------------------------- WER and CER
def test_wer_with_substitution_deletion_insertion():
    # the quick brown [fox->box] jumps [over: deleted] the lazy dog [+today]: S=1 D=1 I=1 of 9 words
    s = score_file("The quick brown fox jumps over the lazy dog.", "the quick brown box jumps the lazy dog today")
    assert (s.substitutions, s.deletions, s.insertions, s.hits, s.words) == (1, 1, 1, 7, 9)
    assert s.wer == pytest.approx(3 / 9)
    assert s.reference_normalized == "the quick brown fox jumps over the lazy dog"
    assert s.longest_deletion_run == 1 and s.bins is None and s.longest_gap_s is None
    # deletions without insertions: the word count is the reference's (H + S + D), not the hypothesis's
    d = score_file("red green blue gold", "red green")
    assert (d.deletions, d.insertions, d.words, d.wer) == (2, 0, 4, pytest.approx(2 / 4))
    # numbers and punctuation normalise on both sides: no error
    same = score_file("It cost twenty-five dollars.", "it cost $25")
    assert same.wer == 0.0 and same.cer == 0.0 and same.words == 3


def test_cer_and_corpus_versus_mean():
    a = score_file("cat sat", "cut sat")        # 7 characters (space included), 1 substitution
    b = score_file("cat", "cats")               # 3 characters, 1 insertion
    assert (a.chars, a.char_errors, a.cer) == (7, 1, pytest.approx(1 / 7))
    assert (b.chars, b.char_errors, b.cer) == (3, 1, pytest.approx(1 / 3))
    c = score_corpus([a, b])
    assert c.cer == pytest.approx(2 / 10) and c.cer_mean == pytest.approx((1 / 7 + 1 / 3) / 2)

    short = score_file("red green", "red blue")                                      # 1 error / 2 words
    long_ = score_file("one fine day we went to the sea", "one fine day we went to the sea")  # 0 / 8
    corpus = score_corpus([short, long_])
    assert corpus.wer == pytest.approx(1 / 10)          # total errors / total reference words
    assert corpus.wer_mean == pytest.approx(0.25)       # (0.5 + 0) / 2
    assert (corpus.files, corpus.words, corpus.substitutions) == (2, 10, 1)
    with pytest.raises(ValueError):
        score_corpus([])
    with pytest.raises(ValueError, match="empty after normalisation"):
        score_file("Uh, hmm (laughs)", "hello")


# ---------------------------------------------------------------------------------- position bins
def test_bins_deletions_between_neighbours_and_insertions():
    ref = "alpha bravo charlie delta echo foxtrot golf hotel"
    hyp = "alpha bravo echo xray golf hotel yankee"
    words = timed("alpha", 0.5, "bravo", 1.5, "echo", 5.5, "xray", 6.5, "golf", 7.5, "hotel", 8.5, "yankee", 11.0)
    s = score_file(ref, hyp, words, duration_s=12.0, bin_seconds=4.0)
    # alpha 0.5, bravo 1.5 | charlie, delta deleted between bravo 1.5 and echo 5.5 -> 3.5 | echo 5.5,
    # foxtrot->xray 6.5, golf 7.5 | hotel 8.5, +yankee 11.0
    assert [(b.bin_start_s, b.bin_end_s, b.errors, b.ref_words) for b in s.bins] == [
        (0.0, 4.0, 2, 4), (4.0, 8.0, 1, 3), (8.0, 12.0, 1, 1)]
    assert [b.wer for b in s.bins] == [pytest.approx(0.5), pytest.approx(1 / 3), pytest.approx(1.0)]
    assert (s.substitutions, s.deletions, s.insertions) == (1, 2, 1) and s.wer == pytest.approx(4 / 8)
    assert s.longest_deletion_run == 2
    assert sum(b.errors for b in s.bins) == s.errors and sum(b.ref_words for b in s.bins) == s.words
    # the per-file keys of results.json (SPEC §5.7), plus the bins
    assert set(s.to_dict()) == {"wer", "cer", "substitutions", "deletions", "insertions", "words",
                                "longest_deletion_run", "longest_gap_s", "repetition_rate", "bins"}


def test_bins_deletions_at_the_edges_use_recording_start_and_end():
    # alpha deleted before bravo (4.0): (0 + 4) / 2 = 2 -> bin [2, 4); charlie deleted after it:
    # (4 + 10) / 2 = 7 -> bin [6, 8); ceil(10 / 2) = 5 bins, empty ones have no WER.
    s = score_file("alpha bravo charlie", "bravo", timed("bravo", 4.0), duration_s=10.0, bin_seconds=2.0)
    assert [(b.errors, b.ref_words) for b in s.bins] == [(0, 0), (1, 1), (0, 1), (1, 1), (0, 0)]
    assert [b.wer for b in s.bins] == [None, 1.0, 0.0, 1.0, None]
    assert s.bins[0].to_dict() == {"bin_start_s": 0.0, "bin_end_s": 2.0, "wer": None, "errors": 0, "ref_words": 0}
    # nothing transcribed: every word deleted at (0 + 10) / 2 = 5 -> bin [4, 6); gap = the recording
    e = score_file("alpha bravo charlie", "", [], duration_s=10.0, bin_seconds=2.0)
    assert [(b.errors, b.ref_words) for b in e.bins] == [(0, 0), (0, 0), (3, 3), (0, 0), (0, 0)]
    assert e.longest_gap_s == 10.0 and e.longest_deletion_run == 3 and e.wer == 1.0
    # a word timed past the recording's end (STT padding) opens a bin of its own
    late = score_file("alpha", "alpha beta", timed("alpha", 1.0, "beta", 5.0), duration_s=3.0, bin_seconds=2.0)
    assert [(b.errors, b.ref_words) for b in late.bins] == [(0, 1), (0, 0), (1, 0)]


def test_merge_bins_over_files():
    a = [WerBin(0.0, 60.0, 1, 10), WerBin(60.0, 120.0, 2, 5)]
    b = [WerBin(0.0, 60.0, 3, 10)]
    m = merge_bins([a, None, b])
    assert [(x.errors, x.ref_words, x.wer) for x in m] == [(4, 20, 0.2), (2, 5, 0.4)]
    with pytest.raises(ValueError):
        merge_bins([a, [WerBin(0.0, 30.0, 1, 1)]])


# ---------------------------------------------------------------------------------- failure signals
def test_longest_deletion_run():
    s = score_file("red green blue cyan pink gray teal navy", "red pink gray navy")
    # red [green blue cyan deleted] pink gray [teal deleted] navy
    assert (s.deletions, s.longest_deletion_run) == (4, 3)
    # an insertion between deletions consumes no reference word: the run goes on (2 + 1)
    chunks = [AlignmentChunk("equal", 0, 1, 0, 1), AlignmentChunk("delete", 1, 3, 1, 1),
              AlignmentChunk("insert", 3, 3, 1, 2), AlignmentChunk("delete", 3, 4, 2, 2),
              AlignmentChunk("substitute", 4, 5, 2, 3), AlignmentChunk("delete", 5, 7, 3, 3)]
    assert longest_deletion_run(chunks) == 3
    assert longest_deletion_run([AlignmentChunk("equal", 0, 2, 0, 2)]) == 0


def test_longest_gap():
    words = as_timed_words([("a", 1.0, 1.5), ("b", 2.0, 2.4), ("uh", 3.0, 3.2), ("c", 6.0, 6.5)])
    toks = word_tokens(words)  # "uh" normalises to nothing: it does not end a gap
    # gaps: 0 -> 1.0, 1.5 -> 2.0, 2.4 -> 6.0 (3.6), 6.5 -> 8.0 (1.5)
    assert longest_gap(toks, 8.0) == pytest.approx(3.6)
    assert longest_gap(toks, 12.0) == pytest.approx(5.5)       # the end of the recording counts
    assert longest_gap(toks, None) == pytest.approx(3.6)       # no duration: the tail is not counted
    # overlapping words: the gap starts at the latest end so far (3.0), not at b's end
    over = [TimedToken("a", 0.0, 3.0), TimedToken("b", 1.0, 2.0), TimedToken("c", 4.0, 5.0)]
    assert longest_gap(over, 5.0) == pytest.approx(1.0)
    assert longest_gap([], 7.0) == 7.0 and longest_gap([], None) is None
    s = score_file("a b c", "a b uh c", [("a", 1.0, 1.5), ("b", 2.0, 2.4), ("uh", 3.0, 3.2), ("c", 6.0, 6.5)],
                   duration_s=8.0)
    assert s.longest_gap_s == pytest.approx(3.6)


@pytest.mark.parametrize("words, rate", [
    ("go go go go go go", 1.0),                # 6 words: only i = 3 has both windows; it repeats
    ("red fox ran red fox ran now", 0.5),     # i = 3: (red fox ran) twice; i = 4: (fox ran now) != (fox ran red)
    ("the cat the cat the cat", 0.0),         # period 2: (cat the cat) != (the cat the)
    ("red fox ran red fox", 0.0),             # 5 words: no position has both windows
    ("", 0.0),
])
def test_repetition_rate(words, rate):
    assert repetition_rate(words.split()) == pytest.approx(rate)


def test_repetition_rate_is_on_normalised_words():
    s = score_file("go to bed now", "Go to bed. GO TO BED! go to bed, now")
    # -> go to bed go to bed go to bed now (10 words), positions 3..7: 3, 4, 5, 6 repeat the three
    # words before them, 7 (to bed now vs to bed go) does not: 4 / 5. Raw words would not repeat.
    assert s.repetition_rate == pytest.approx(0.8)
    assert repetition_rate("Go to bed. GO TO BED! go to bed, now".split()) == 0.0


# ---------------------------------------------------------------------------------- data discovery
def _wav(path: Path, seconds: float = 0.5, rate: int = 16000) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    pcm = (0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype("<i2")
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path


def test_directory_discovery_accounts_for_every_input(tmp_path):
    _wav(tmp_path / "a.wav"); (tmp_path / "a.txt").write_text("Hello there.")
    _wav(tmp_path / "sub" / "b10.wav", 1.0); (tmp_path / "sub" / "b10.txt").write_text("ten")
    _wav(tmp_path / "sub" / "b2.wav"); (tmp_path / "sub" / "b2.txt").write_bytes("\ufeffcafé two".encode())
    shutil.copy(EXAMPLES / "launch.flac", tmp_path / "sub" / "b3.FLAC")
    (tmp_path / "sub" / "b3.txt").write_text("three")
    _wav(tmp_path / "c.wav")                                            # no reference
    (tmp_path / "d.txt").write_text("orphan")                           # no audio
    _wav(tmp_path / "e.wav"); (tmp_path / "e.txt").write_text("  \n")   # empty reference
    _wav(tmp_path / "f.wav"); (tmp_path / "f.txt").write_bytes(b"caf\xe9")  # Latin-1, not UTF-8
    _wav(tmp_path / "g.wav"); (tmp_path / "g.txt").write_text("Uh, hmm (laughs)")  # nothing after normalising
    (tmp_path / "h.wav").write_bytes(b"RIFF garbage"); (tmp_path / "h.txt").write_text("broken")
    _wav(tmp_path / "i.wav"); _wav(tmp_path / "i.flac"); (tmp_path / "i.txt").write_text("twice")
    _wav(tmp_path / ".cache" / "x.wav"); (tmp_path / ".cache" / "x.txt").write_text("hidden")
    ds = discover_asr(tmp_path)
    assert ds.kind == "directory" and ds.source == tmp_path
    # natural order of the relative paths: sub/b2 < sub/b3 < sub/b10
    assert [it.key for it in ds.items] == ["a.wav", "sub/b2.wav", "sub/b3.FLAC", "sub/b10.wav"]
    assert ds.items[1].reference == "café two"                          # UTF-8, byte-order mark dropped
    assert ds.items[0].reference_path == tmp_path / "a.txt" and ds.items[0].line is None
    assert ds.items[3].seconds == pytest.approx(1.0) and ds.items[2].seconds == pytest.approx(9.23, abs=0.01)
    why = {Path(s.path).name: s.reason for s in ds.skipped}
    assert set(why) == {"c.wav", "d.txt", "e.wav", "f.wav", "g.wav", "h.wav", "i.wav", "i.flac"}
    assert "expected c.txt" in why["c.wav"]
    assert "without audio" in why["d.txt"]
    assert "empty reference" in why["e.wav"]
    assert "not UTF-8" in why["f.wav"]
    assert "empty after normalisation" in why["g.wav"]
    assert "audio" in why["h.wav"] or "decode" in why["h.wav"]
    assert "share the reference i.txt" in why["i.wav"] and "share" in why["i.flac"]
    # the same without probing: h.wav is then kept (its header is not read)
    assert "h.wav" in [it.key for it in discover_asr(tmp_path, probe=False).items]


def test_manifest_discovery_accounts_for_every_line(tmp_path):
    _wav(tmp_path / "audio" / "one.wav")
    _wav(tmp_path / "two.wav")
    lines = [
        json.dumps({"audio": "audio/one.wav", "text": "First one."}),                   # 1 relative
        json.dumps({"audio": str(tmp_path / "two.wav"), "text": "Second", "id": 7}),      # 2 absolute, extra key
        "",                                                                               # 3 blank: ignored
        "{not json",                                                                      # 4
        json.dumps(["audio", "text"]),                                                    # 5 not an object
        json.dumps({"text": "no audio"}),                                                 # 6
        json.dumps({"audio": "two.wav"}),                                                 # 7 no text
        json.dumps({"audio": "missing.wav", "text": "x"}),                                # 8
        json.dumps({"audio": "./audio/one.wav", "text": "again"}),                        # 9 duplicate of 1
        json.dumps({"audio": "notes.txt", "text": "x"}),                                  # 10 not audio
        json.dumps({"audio": "two.wav", "text": "  "}),                                   # 11 empty text
    ]
    data = "\n".join(lines).encode() + b"\n" + b'{"audio": "two.wav", "text": "caf\xe9"}\n'  # 12 not UTF-8
    (tmp_path / "m.jsonl").write_bytes(data)
    ds = discover_asr(tmp_path / "m.jsonl")
    assert ds.kind == "manifest"
    assert [(it.key, it.line, it.reference) for it in ds.items] == [("audio/one.wav", 1, "First one."),
                                                                    (str(tmp_path / "two.wav"), 2, "Second")]
    assert ds.items[0].audio == tmp_path / "audio" / "one.wav" and ds.items[0].seconds == pytest.approx(0.5)
    reasons = [s.reason for s in ds.skipped]
    assert [r.split(":")[0] for r in reasons] == [f"line {n}" for n in (4, 5, 6, 7, 8, 9, 10, 11, 12)]
    assert "not valid JSON" in reasons[0] and "not a JSON object" in reasons[1]
    assert '"audio"' in reasons[2] and '"text"' in reasons[3] and "not found" in reasons[4]
    assert "same audio file as line 1" in reasons[5] and "not an audio file" in reasons[6]
    assert "empty reference" in reasons[7] and "not UTF-8" in reasons[8]
    assert ds.skipped[0].path == f"{tmp_path / 'm.jsonl'}:4"


def test_nemo_manifest_lines(tmp_path):
    _wav(tmp_path / "a.wav", 0.5)
    _wav(tmp_path / "b.wav", 2.0)
    _wav(tmp_path / "c.wav", 1.0)
    _wav(tmp_path / "d.wav", 1.0)
    lines = [
        {"audio_filepath": "a.wav", "text": "one", "duration": 0.55},                     # 1 within 0.1 s: fine
        {"audio_filepath": str(tmp_path / "b.wav"), "text": "two", "duration": 1.5},      # 2 0.5 s off: a warning
        {"audio_filepath": "c.wav", "text": "three", "duration": "long"},                 # 3 not seconds: a warning
        {"audio_filepath": "d.wav", "text": "four"},                                      # 4 no duration: fine
        {"audio_filepath": "a.wav", "audio": "a.wav", "text": "x"},                       # 5 both keys
        {"audio_filepath": "b.wav", "text": "x", "duration": 1.0, "offset": 0.5},         # 6 a segment
        {"audio_filepath": "", "text": "x", "duration": 1.0},                             # 7 no path
        {"audio_filepath": "missing.wav", "text": "x", "duration": 1.0},                  # 8
        {"audio_filepath": "d.wav", "duration": 1.0},                                     # 9 no text
    ]
    (tmp_path / "train_manifest.json").write_text("\n".join(map(json.dumps, lines)) + "\n")  # NeMo's .json name
    ds = discover_asr(tmp_path / "train_manifest.json")
    assert (ds.kind, ds.manifest_format) == ("manifest", "nemo")
    assert [(it.key, it.line, it.reference) for it in ds.items] == [
        ("a.wav", 1, "one"), (str(tmp_path / "b.wav"), 2, "two"), ("c.wav", 3, "three"), ("d.wav", 4, "four")]
    assert [it.seconds for it in ds.items] == pytest.approx([0.5, 2.0, 1.0, 1.0])  # the audio's, not the hint's
    assert len(ds.warnings) == 2
    assert "line 2" in ds.warnings[0] and "1.5 s" in ds.warnings[0] and "2.000 s" in ds.warnings[0]
    assert "line 3" in ds.warnings[1] and "'long'" in ds.warnings[1]
    reasons = [s.reason for s in ds.skipped]
    assert [r.split(":")[0] for r in reasons] == [f"line {n}" for n in (5, 6, 7, 8, 9)]
    assert "give one" in reasons[0] and "segment" in reasons[1] and "audio_filepath" in reasons[2]
    assert "not found" in reasons[3] and '"text"' in reasons[4]
    # both forms in one manifest
    (tmp_path / "m.jsonl").write_text(json.dumps({"audio": "a.wav", "text": "one"}) + "\n" +
                                      json.dumps({"audio_filepath": "b.wav", "text": "two", "duration": 2.0}) + "\n")
    ds = discover_asr(tmp_path / "m.jsonl")
    assert ds.manifest_format == "mixed" and len(ds.items) == 2 and not ds.warnings
    assert discover_asr(MANIFEST).manifest_format == "audio-text" and discover_asr(EXAMPLES).manifest_format is None
    # a pretty-printed JSON list is not a manifest: said so, not one error per line
    (tmp_path / "list.json").write_text(json.dumps(lines[:2], indent=2))
    with pytest.raises(ConfigError, match="one JSON document, not a manifest"):
        discover_asr(tmp_path / "list.json")


def test_discovery_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        discover_asr(tmp_path / "nope")
    with pytest.raises(ConfigError, match="no audio file with a .txt reference"):
        discover_asr(tmp_path)
    _wav(tmp_path / "a.wav")
    with pytest.raises(ConfigError, match="neither a directory nor a .jsonl"):
        discover_asr(tmp_path / "a.wav")
    with pytest.raises(ConfigError, match=r"no usable recording .*a\.wav: no reference"):
        discover_asr(tmp_path)
    (tmp_path / "m.jsonl").write_text("\n\n")
    with pytest.raises(ConfigError, match="no entry"):
        discover_asr(tmp_path / "m.jsonl")


def test_bundled_example_in_both_forms():
    d = discover_asr(EXAMPLES)
    m = discover_asr(MANIFEST)
    assert not d.skipped and not m.skipped
    assert [it.audio.name for it in d.items] == ["directions.flac", "launch.flac", "library.wav"]
    assert {it.audio.resolve(): it.reference.strip() for it in d.items} == \
        {it.audio.resolve(): it.reference for it in m.items}
    assert all(2.0 < it.seconds < 12.0 for it in d.items)


# ---------------------------------------------------------------------------------- writers
def test_wer_csv_and_png(tmp_path):
    policies = {"off": [WerBin(0.0, 60.0, 2, 8), WerBin(60.0, 120.0, 1, 0)],
                "document": [WerBin(0.0, 60.0, 1, 8).to_dict()]}   # results.json's dict form works too
    p = write_wer_csv(tmp_path / "wer.csv", policies)
    with open(p, newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [list(WER_COLUMNS),   # no interval in these bins: empty cells
                    ["off", "0.000000", "60.000000", "0.250000", "2", "8"] + [""] * 5,
                    ["off", "60.000000", "120.000000", "", "1", "0"] + [""] * 5,
                    ["document", "0.000000", "60.000000", "0.125000", "1", "8"] + [""] * 5]
    png = write_wer_png(tmp_path / "wer.png", policies, "tiny-stt on examples/asr", {"off": 0.25})
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["wer.csv", "wer.png"]   # no temporary left
