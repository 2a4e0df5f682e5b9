"""`ttt eval librilight` against independent references: moshi's own full-sequence forward, and plain moshi
fed one step at a time with the naive per-token fast-weight loop of tests/naive_ttt.py (never the tool's
TTT layers or its scoring code)."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from moshi.modules.streaming import StreamingModule

import librilight_data as LD
from bootstrap_reference import scipy_ci
from naive_ttt import checkpoint_ttt, naive_ttt
from evals.inputs import natural_key
from evals.librilight.codes_cache import document_codes
from evals.librilight.data import discover
from evals.librilight.options import EvalOptions
from evals.librilight.protocol import evaluate_librilight
from evals.librilight.scoring import score_document
from evals.policies import parse_policies, parse_policy, policy_settings
from ttt_cli import load_model
from ttt_cli.fastweights.attach import ttt_layers
from ttt_cli.audio import load_audio
from ttt_cli.codes import encode_audio, lm_input_codes
from ttt_cli.errors import ConfigError
from ttt_cli.models.presets import preset_dir

REL = 1e-4
FRAME = 1920


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    return LD.build(tmp_path_factory.mktemp("librilight") / "data")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("codes-cache")


@pytest.fixture(scope="session")
def dataset(data_root):
    return discover(data_root)


@pytest.fixture(scope="session")
def doc_codes(tiny, dataset, cache_dir):
    """{document id: DocumentCodes} (first call: encoded and cached)."""
    return {d.id: document_codes(tiny.mimi, d, 3600, cache_dir) for d in dataset.documents}


@pytest.fixture(scope="session")
def plain(tiny):
    return load_model("tiny", device="cpu", dtype="fp32", ttt=False)


def lm_codes(tiny, doc_codes, doc_id):
    return lm_input_codes(tiny.lm, doc_codes[doc_id].codes)  # [K, T]


# -- references written here ---------------------------------------------------------------------

def moshi_forward_nll(lm, codes):
    """NLL [dep_q, T] from moshi's own full-sequence `LMModel.forward` (NaN where moshi masks)."""
    with torch.no_grad():
        out = lm.forward(codes[None])
    logp = out.logits[0].float().log_softmax(-1)  # [dep_q, T, card]
    tgt = codes[1:1 + lm.dep_q]
    nll = -logp.gather(-1, tgt.clamp(min=0)[..., None])[..., 0]
    return torch.where(out.mask[0], nll, torch.full_like(nll, math.nan))


def hand_input(lm, codes, s):
    """Transformer input column s [1, K, 1] built by hand: position s holds step s-1-delay_k (else initial)."""
    K = codes.shape[0]
    col = torch.empty(1, K, 1, dtype=torch.long)
    for k in range(K):
        j = s - 1 - lm.delays[k]
        col[0, k, 0] = codes[k, j] if (s >= 1 and j >= 0) else (lm.text_card if k == 0 else lm.card)
    return col


def reset_attention_only(lm):
    """Resets every streaming state of the LM (the naive fast-weight streams are not streaming modules)."""
    for mod in lm.modules():
        if isinstance(mod, StreamingModule) and mod._streaming_state is not None:
            mod._streaming_state.reset(torch.ones(1, dtype=torch.bool))


_NAIVE: dict = {}


@torch.no_grad()
def naive_nll(plain, docs, resets_per_doc, warm=None, key=None):
    """One `forward_text` per step in plain moshi's `lm.streaming(1)`, the fast weights updated by the naive
    per-token loop (tests/naive_ttt.py) and reset to W0 (or `warm`, {layer: W}) at the given positions.

    `docs` are played in one stream (attention reset between them, fast weights carried: `never`).
    Returns [dep_q, T] NLL per document, from moshi's `forward_depformer_training` on the outputs.
    Computed once per (`key`, resets): pass a key naming the documents (and warm start).
    """
    k = (key, tuple(tuple(r) for r in resets_per_doc))
    if key is not None and k in _NAIVE:
        return _NAIVE[k]
    lm = plain.lm
    results = []
    with naive_ttt(lm, *checkpoint_ttt(preset_dir("tiny"))) as streams, lm.streaming(1):
        def start():
            for i, st in streams.items():
                st.start(None if warm is None else warm[i])

        start()
        for n, (codes, resets) in enumerate(zip(docs, resets_per_doc)):
            if n:
                reset_attention_only(lm)
            T = codes.shape[1]
            outs = []
            for s in range(T):
                if s in resets:
                    start()
                out, _ = lm.forward_text(hand_input(lm, codes, s))
                outs.append(out)
            tout = torch.cat(outs, 1)  # [1, T, d]
            targets = torch.cat([hand_input(lm, codes, s + 1) for s in range(T)], 2)  # [1, K, T]
            logp = lm.forward_depformer_training(targets, tout)[0].log_softmax(-1)  # [dep_q, T, card]
            nll = torch.full((lm.dep_q, T), math.nan)
            for k in range(lm.dep_q):
                d = lm.delays[1 + k]
                for t in range(T - d):
                    nll[k, t] = -logp[k, t + d, codes[1 + k, t]]
            results.append(nll)
    if key is not None:
        _NAIVE[k] = results
    return results


def assert_close(a, b, rel=REL):
    assert torch.equal(torch.isnan(a), torch.isnan(b)), "scored positions differ"
    ok = ~torch.isnan(a)
    err = (a[ok] - b[ok]).abs().max().item()
    scale = b[ok].abs().max().item()
    assert err <= rel * scale, f"max abs diff {err:.3g} > {rel:g} x {scale:.3g}"


# -- discovery -----------------------------------------------------------------------------------

def test_natural_key_orders_numbers_as_numbers():
    names = ["10.flac", "2.flac", "1.flac", "book10", "book2", "100", "20"]
    assert sorted(names, key=natural_key) == ["1.flac", "2.flac", "10.flac", "20", "100", "book2", "book10"]


def test_discovery_order_metadata_and_skipped(dataset, data_root):
    assert [d.id for d in dataset.documents] == LD.ORDER
    book2 = dataset.documents[0]
    assert [f.path.name for f in book2.files] == ["1.flac", "2.flac", "10.flac"]
    assert (book2.speaker, book2.book) == ("20", "book2")
    meta = book2.files[2].meta
    assert meta["snr"] == 30.5 and meta["book_meta"]["title"] == "Book book2 of speaker 20"
    assert book2.files[0].meta["voice_activity_seconds"] == pytest.approx(1.3)
    bad_json = dataset.documents[1].files[0]
    assert bad_json.meta is None and "unreadable metadata" in bad_json.meta_error  # the audio is still used
    broken = dataset.documents[2]
    assert [f.path.name for f in broken.files] == ["1.flac", "3.flac"]
    assert [Path(s.path).relative_to(data_root).as_posix() for s in broken.skipped] == [LD.BROKEN]
    assert "cannot decode" in broken.skipped[0].reason


def test_discovery_limits_and_errors(data_root, tmp_path):
    assert [d.id for d in discover(data_root, limit_books=2).documents] == LD.ORDER[:2]
    secs = {d: sum(LD.seconds(data_root, d)) for d in LD.ORDER}  # one sentence vs two or three: 3 s between
    assert secs["20/book10"] < 3.0 < min(secs["20/book2"], secs["100/7"]), secs
    short = discover(data_root, min_seconds=3.0)
    assert [d.id for d in short.documents] == ["20/book2", "100/7"]
    assert short.skipped_documents[0].id == "20/book10"
    cut = discover(data_root, max_seconds=0.9 * LD.seconds(data_root, "20/book2")[0])  # inside the first file:
    assert [f.path.name for f in cut.documents[0].files] == ["1.flac"]  # files starting after the cut are left out
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no audio files found"):
        discover(tmp_path / "empty")
    with pytest.raises(ConfigError, match="does not exist"):
        discover(tmp_path / "missing")


# -- encoding and boundaries ---------------------------------------------------------------------

def test_boundaries_in_seconds_and_steps(dataset, doc_codes):
    doc = dataset.documents[0]
    lengths = [load_audio(f.path)[0].shape[0] for f in doc.files]
    starts = np.cumsum([0] + lengths[:-1])
    dc = doc_codes[doc.id]
    assert [f.start_step for f in dc.files] == [int(n) // FRAME for n in starts]
    assert [f.end_step for f in dc.files] == [int(n + L) // FRAME for n, L in zip(starts, lengths)]
    assert [f.start_s for f in dc.files] == pytest.approx([n / 24000 for n in starts])
    assert dc.steps == sum(lengths) // FRAME > 32  # longer than the tiny model's attention context
    # 100/7: the broken middle file is skipped, the boundaries are those of the two others.
    dc7 = doc_codes["100/7"]
    assert [Path(f.path).name for f in dc7.files] == ["1.flac", "3.flac"]
    assert dc7.files[1].start_step == dc7.files[0].end_step


def test_max_seconds_cut(tiny, dataset, data_root):
    doc = dataset.documents[0]
    assert sum(LD.seconds(data_root, doc.id)) > 4.0  # three sentences: the cut falls inside the document
    dc = document_codes(tiny.mimi, doc, 4.0, None)
    assert dc.samples == 96000 and dc.steps == 96000 // FRAME
    assert dc.files[-1].truncated and dc.files[-1].end_s == pytest.approx(4.0)


def test_streamed_encoding_matches_whole_waveform(tiny, dataset, doc_codes):
    """Pitfall 7: bounded streaming encoding gives exactly the codes of one whole-waveform call, also past
    the 250-step context of Mimi's encoder transformer (the document twice: 16.8 s = 420 encoder steps)."""
    doc = dataset.documents[0]
    wav = np.concatenate([load_audio(f.path)[0] for f in doc.files])
    streamed = doc_codes[doc.id].codes
    T = streamed.shape[-1]
    long = np.concatenate([wav, wav])
    with torch.no_grad():
        whole = tiny.mimi.encode(torch.from_numpy(long)[None, None])[0]  # [n_q, F] in one call
    assert T == wav.shape[0] // FRAME and torch.equal(whole[:, :T], streamed)  # the document as cached
    pieces = [long[i:i + 7000] for i in range(0, long.shape[0], 7000)]  # pieces are not frames
    again = encode_audio(tiny.mimi, pieces)
    n = long.shape[0] // FRAME
    assert again.shape[-1] == n and whole.shape[-1] in (n, n + 1)  # the partial last frame aside
    assert torch.equal(whole[:, :n], again)


def test_codes_cache_hit_and_invalidation(tiny, dataset, doc_codes, cache_dir, tmp_path):
    doc = dataset.documents[0]
    first = doc_codes[doc.id]
    again = document_codes(tiny.mimi, doc, 3600, cache_dir)
    assert again.cache_hit and torch.equal(again.codes, first.codes)
    assert [f.to_dict() for f in again.files] == [f.to_dict() for f in first.files]
    # Another cut is another entry; changed audio content is another entry.
    assert not document_codes(tiny.mimi, doc, 3.0, cache_dir).cache_hit
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(doc.files[0].path.parent, copy / "20" / "book2")
    moved = discover(copy).documents[0]
    assert document_codes(tiny.mimi, moved, 3600, cache_dir).cache_hit  # same content elsewhere: a hit
    LD._synth("Something else entirely.", moved.files[1].path, tmp_path)
    changed = discover(copy).documents[0]
    assert not document_codes(tiny.mimi, changed, 3600, cache_dir).cache_hit


# -- policies ------------------------------------------------------------------------------------

def test_policy_parsing_and_reset_positions():
    assert parse_policy("every:2s").interval_steps == 25
    assert parse_policy("every:500ms").interval_steps == 6
    assert parse_policy("every:40").interval_steps == 40
    assert parse_policy("every:2s").dir_name == "every-2s"
    assert parse_policy("file").reset_positions(100, [0, 38, 71]) == [38, 71]
    assert parse_policy("every:40").reset_positions(100) == [40, 80]
    assert parse_policy("document").reset_positions(100, [0, 38]) == []
    assert [p.name for p in parse_policies(None)] == ["document"]
    for bad in ("sometimes", "every:0", "every:1.5", "every:xs"):
        with pytest.raises(ConfigError):
            parse_policy(bad)
    with pytest.raises(ConfigError, match="more than once"):
        parse_policies(["off", "off"])


# -- scores against references -------------------------------------------------------------------

def test_off_equals_plain_moshi_forward(tiny, plain, doc_codes):
    codes = lm_codes(tiny, doc_codes, "20/book2")
    ref = moshi_forward_nll(plain.lm, codes)  # plain moshi modules (linear_out), no TTT at all
    with policy_settings(tiny.lm, False, tiny.ttt.lr):
        got = score_document(tiny.lm, codes, block_steps=250).nll
    assert_close(got, ref)
    assert torch.isnan(got[1:, -1]).all() and not torch.isnan(got[0]).any()  # acoustic delay at the end


def resets_of(policy, data_root, doc="20/book2"):
    """Where a policy resets the fast weights in a document, by hand from its files' lengths (SPEC §6.1):
    `file` at each later file's first step, `every:20` every 20 steps inside the document."""
    *starts, steps = LD.step_bounds(data_root, doc)
    return {"document": [], "file": starts[1:], "every:20": list(range(20, steps, 20))}[policy]


# Block sizes scored per policy: every:20 resets inside blocks of 7 and between steps of 1 too.
BLOCKS = {"document": ({"block_steps": 250},), "file": ({"block_steps": 7}, {"block_steps": 250}),
          "every:20": ({"block_steps": 1}, {"block_steps": 7}, {"block_steps": 250}, {"step_by_step": True})}


@pytest.mark.parametrize("policy", list(BLOCKS))
def test_policies_and_block_sizes_equal_naive_reference(tiny, plain, doc_codes, data_root, policy):
    """score_document in blocks (and step by step), each against the naive reference (plain moshi one step
    at a time, naive fast weights reset where the policy says): the block size changes nothing."""
    dc = doc_codes["20/book2"]
    codes = lm_codes(tiny, doc_codes, "20/book2")
    resets = resets_of(policy, data_root)
    assert [f.start_step for f in dc.files] + [dc.steps] == LD.step_bounds(data_root, "20/book2")
    assert len(resets) >= (2 if policy != "document" else 0)  # 3 files; > 40 steps
    assert parse_policy(policy).reset_positions(dc.steps, [f.start_step for f in dc.files]) == resets
    ref = naive_nll(plain, [codes], [resets], key="20/book2")[0]
    for kw in BLOCKS[policy]:
        assert_close(score_document(tiny.lm, codes, resets, **kw).nll, ref)
    if resets:  # the resets matter
        no_reset = naive_nll(plain, [codes], [[]], key="20/book2")[0]
        ok = ~torch.isnan(ref)
        assert (no_reset[ok] - ref[ok]).abs().max() > 1e-3
    else:  # TTT visibly changes the scores
        off = moshi_forward_nll(plain.lm, codes)
        ok = ~torch.isnan(off)
        assert (ref[ok] - off[ok]).abs().max() > 1e-2


def test_never_carries_fast_weights_across_documents(tiny, plain, doc_codes):
    a, b = lm_codes(tiny, doc_codes, "20/book2"), lm_codes(tiny, doc_codes, "20/book10")
    ref = naive_nll(plain, [a, b], [[], []], key="book2+book10")
    first = score_document(tiny.lm, a, keep_carry=True)
    second = score_document(tiny.lm, b, carry=first.carry, keep_carry=True)
    assert_close(first.nll, ref[0])
    assert_close(second.nll, ref[1])
    fresh = score_document(tiny.lm, b).nll
    ok = ~torch.isnan(fresh)
    assert (fresh[ok] - second.nll[ok]).abs().max() > 1e-3
    assert any(t["pending_tokens"] for t in first.telemetry.values())  # a pending chunk was carried


# -- the protocol and the CLI --------------------------------------------------------------------

POLICIES = ["document", "file", "every:20", "never", "off"]


def run_eval(tiny, data_root, cache_dir, out, **kw):
    opts = EvalOptions(data=data_root, out=out, model="tiny", policies=POLICIES, bin_seconds=2.0,
                       codes_cache=cache_dir, save_token_nll=True, **kw)
    return evaluate_librilight(opts, model=tiny)


@pytest.fixture(scope="module")
def full_run(tiny, data_root, cache_dir, doc_codes, tmp_path_factory):
    # doc_codes first: the documents are in the cache before the run, whatever order the tests run in
    # (the run's `codes_cache.hits == 3` below depends on it).
    return run_eval(tiny, data_root, cache_dir, tmp_path_factory.mktemp("eval") / "out")


def test_protocol_outputs_match_references(tiny, plain, full_run, doc_codes, data_root):
    res = full_run
    r = json.loads((res.out / "results.json").read_text())
    assert r["status"] == "complete" and res.exit_code == 1  # the broken file makes the run exit 1
    assert any(LD.BROKEN in f for f in res.failed)
    assert [d["id"] for d in r["documents"]] == LD.ORDER
    d0 = r["documents"][0]
    assert [f["path"] for f in d0["files"]] == ["20/book2/1.flac", "20/book2/2.flac", "20/book2/10.flac"]
    assert [f["start_step"] for f in d0["files"]] == LD.step_bounds(data_root, "20/book2")[:-1]
    assert r["documents"][2]["skipped"][0]["path"] == LD.BROKEN
    assert set(r["policies"]) == set(POLICIES) and r["codes_cache"]["hits"] == 3
    # Token NLL files against the naive reference, with the resets the protocol implies.
    a, b = lm_codes(tiny, doc_codes, "20/book2"), lm_codes(tiny, doc_codes, "20/book10")
    tn = lambda pol, doc: load_file(str(res.out / "token_nll" / pol / f"{doc}.safetensors"))
    f0 = tn("file", "20/book2")
    assert torch.equal(f0["codes"], a) and f0["nll"].dtype == torch.float32 and f0["nll"].shape == (8, a.shape[1])
    assert_close(f0["nll"], naive_nll(plain, [a], [resets_of("file", data_root)], key="20/book2")[0])
    assert_close(tn("every-20", "20/book2")["nll"],
                 naive_nll(plain, [a], [resets_of("every:20", data_root)], key="20/book2")[0])
    assert_close(tn("document", "20/book2")["nll"], naive_nll(plain, [a], [[]], key="20/book2")[0])
    assert_close(tn("never", "20/book10")["nll"], naive_nll(plain, [a, b], [[], []], key="book2+book10")[1])
    assert_close(tn("off", "20/book2")["nll"], moshi_forward_nll(plain.lm, a))
    # Means and curve bins recomputed by hand from the token NLL files.
    for pol in ("document", "never"):
        nlls = [tn(pol, d)["nll"].double().numpy() for d in LD.ORDER]
        allv = np.concatenate([x[~np.isnan(x)] for x in nlls])
        assert r["policies"][pol]["nll"] == pytest.approx(allv.mean(), rel=1e-9)
        assert r["policies"][pol]["perplexity"] == pytest.approx(math.exp(allv.mean()), rel=1e-9)
        sem = np.concatenate([x[0][~np.isnan(x[0])] for x in nlls])
        assert r["policies"][pol]["nll_semantic"] == pytest.approx(sem.mean(), rel=1e-9)
        aco = np.concatenate([x[1:][~np.isnan(x[1:])] for x in nlls])  # the acoustic codebooks 1..7
        assert r["policies"][pol]["nll_acoustic"] == pytest.approx(aco.mean(), rel=1e-9)
        assert r["policies"][pol]["tokens"]["all"] == allv.size
        for i, bin_ in enumerate(r["policies"][pol]["curve"]):  # 2 s = 25 steps per bin
            vals = np.concatenate([x[:, 25 * i:25 * (i + 1)].ravel() for x in nlls])
            vals = vals[~np.isnan(vals)]
            assert bin_["tokens"] == vals.size and bin_["nll"] == pytest.approx(vals.mean(), rel=1e-9)
            assert (bin_["bin_start_s"], bin_["bin_end_s"]) == (2.0 * i, 2.0 * (i + 1))
    rows = list(csv.reader(open(res.out / "curve.csv")))
    assert rows[0] == ["policy", "bin_start_s", "bin_end_s", "nll", "nll_semantic", "nll_acoustic", "tokens",
                       "ci_low", "ci_high", "vs_off", "vs_off_ci_low", "vs_off_ci_high"]
    assert len(rows) == 1 + sum(len(p["curve"]) for p in r["policies"].values())
    check_intervals(r, rows, [[tn(pol.replace(":", "-"), d)["nll"].double().numpy() for d in LD.ORDER]
                              for pol in POLICIES])
    assert (res.out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert tiny.lm.transformer.layers[1].gating.lr == tiny.ttt.lr  # the model is left as it was found


def check_intervals(r, rows, nlls):
    """The intervals against scipy called on per-document (Σ nll, tokens) summed here from the token NLL files
    (`nlls`: per policy of POLICIES, per document of LD.ORDER, [dep_q, T]), overall and per 25-step bin (bins
    only over the documents that reach them); and curve.csv's columns against results.json."""
    assert r["bootstrap"] == {"resamples": 1000, "seed": 0, "level": 0.95, "method": "percentile",
                              "unit": "document", "units": 3}
    sums = lambda x: (float(np.nansum(x)), int((~np.isnan(x)).sum()))
    per = {pol: [sums(x) for x in docs] for pol, docs in zip(POLICIES, nlls)}
    for pol, docs in zip(POLICIES, nlls):
        sec = r["policies"][pol]
        assert sec["ci"] == pytest.approx(scipy_ci(per[pol]), rel=1e-9)
        assert [d["scores"][pol]["tokens"] for d in r["documents"]] == [t for _, t in per[pol]]
        if pol == "off":
            assert sec["vs_off"] is None
        else:
            assert sec["vs_off"]["diff"] == pytest.approx(sec["nll"] - r["policies"]["off"]["nll"], abs=1e-9)
            assert sec["vs_off"]["ci"] == pytest.approx(scipy_ci(per[pol], per["off"]), abs=1e-9)
        for i, b in enumerate(sec["curve"]):
            have = [k for k, x in enumerate(docs) if x.shape[1] > 25 * i]
            pairs = [sums(docs[k][:, 25 * i:25 * (i + 1)]) for k in have]
            assert b["ci"] == (None if len(have) < 2 else pytest.approx(scipy_ci(pairs), rel=1e-9)), (pol, i)
            if pol != "off":
                base = [sums(nlls[POLICIES.index("off")][k][:, 25 * i:25 * (i + 1)]) for k in have]
                assert b["vs_off"]["ci"] == (None if len(have) < 2 else
                                             pytest.approx(scipy_ci(pairs, base), abs=1e-9)), (pol, i)
    cells = lambda v: "" if v is None else f"{v:.6f}"
    want = [[cells(x) for x in (*(b["ci"] or (None, None)), (b["vs_off"] or {}).get("diff"),
                                 *((b["vs_off"] or {}).get("ci") or (None, None)))]
            for p in r["policies"].values() for b in p["curve"]]
    assert [row[7:] for row in rows[1:]] == want
    assert any(w[0] for w in want) and any(not w[0] for w in want)  # bins with and without an interval


class StopAt:
    """A progress hook that presses Ctrl-C once the given document starts scoring."""

    def __init__(self, doc: str):
        self.doc = doc

    def start(self, *a): pass
    def finish(self, *a, **k): pass
    def log(self, m): pass

    def update(self, key, completed, **info):
        if info.get("doc") == self.doc:
            raise KeyboardInterrupt


def test_interrupt_then_resume_equals_full_run(tiny, data_root, cache_dir, full_run, tmp_path):
    out = tmp_path / "out"
    opts = EvalOptions(data=data_root, out=out, model="tiny", policies=POLICIES, bin_seconds=2.0,
                       codes_cache=cache_dir, save_token_nll=True)
    res = evaluate_librilight(opts, StopAt("2/3"), model=tiny)
    assert res.interrupted and res.exit_code == 130 and res.documents_done == 1
    part = json.loads((out / "results.json").read_text())
    assert part["status"] == "interrupted" and [d["id"] for d in part["documents"]] == ["20/book2"]
    with pytest.raises(ConfigError, match="--resume"):
        evaluate_librilight(opts, model=tiny)
    opts.resume = True
    done = evaluate_librilight(opts, model=tiny)
    assert not done.interrupted and done.documents_done == 3
    full = full_run.results["policies"]
    for pol, sec in done.results["policies"].items():  # `never` needs the carried state saved at the cut
        assert sec["nll"] == pytest.approx(full[pol]["nll"], rel=1e-7), pol
        assert [c["nll"] for c in sec["curve"]] == pytest.approx([c["nll"] for c in full[pol]["curve"]], rel=1e-7)
        # the same intervals: drawn at the end from every document's sums, in dataset order, with the seed
        for a, b in [(sec, full[pol])] + list(zip(sec["curve"], full[pol]["curve"])):
            assert (a["ci"] is None) == (b["ci"] is None) and (a["vs_off"] is None) == (b["vs_off"] is None)
            assert a["ci"] is None or a["ci"] == pytest.approx(b["ci"], rel=1e-7)
            if a["vs_off"] is not None:
                assert a["vs_off"]["diff"] == pytest.approx(b["vs_off"]["diff"], abs=1e-7)
                assert (a["vs_off"]["ci"] is None and b["vs_off"]["ci"] is None) or \
                    a["vs_off"]["ci"] == pytest.approx(b["vs_off"]["ci"], abs=1e-7)
        assert sec["ci"] is not None and (pol == "off" or sec["vs_off"]["ci"] is not None)
    other = EvalOptions(data=data_root, out=out, model="tiny", policies=["document"], codes_cache=cache_dir,
                        resume=True)
    with pytest.raises(ConfigError, match="other options"):
        evaluate_librilight(other, model=tiny)


def test_init_state_warm_start_and_force_state(tiny, plain, data_root, cache_dir, doc_codes, tmp_path):
    """--init-state warm-starts every reset from the snapshot's W (its pending chunk ignored); a snapshot
    taken with another lr is refused unless --force-state; `off` stays W0."""
    from ttt_cli.state import capture, save_state
    a = lm_codes(tiny, doc_codes, "20/book2")
    other = load_model("tiny", device="cpu", dtype="fp32", ttt={"lr": 0.1})
    with torch.no_grad(), other.lm.streaming(1):
        other.lm.forward_text(hand_cols(other.lm, a, 40))  # two chunks of 16 and 8 pending tokens
        snap = capture(other, 0)
    path = save_state(snap, tmp_path / "warm.safetensors")
    warm = {i: snap.layer_tensors(i)["w"] for i in snap.layers}
    out = tmp_path / "out"
    args = ["eval", "librilight", str(data_root), "--model", "tiny", "--out", str(out), "-p", "file", "-p", "off",
            "--limit-books", "1", "--codes-cache", str(cache_dir), "--save-token-nll", "--init-state", str(path)]
    r = cli(args)
    assert r.exit_code == 2 and "lr differs" in r.output and not (out / "results.json").exists()
    r = cli(args + ["--force-state"])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    rec = res["protocol"]["init_state"]
    assert rec["path"] == str(path.resolve()) and rec["pending_tokens_ignored"] == {"1": 8, "3": 8}
    assert res["policies"]["file"]["ttt"]["warm_start"] is True and res["policies"]["off"]["ttt"]["on"] is False
    got = load_file(str(out / "token_nll" / "file" / "20" / "book2.safetensors"))["nll"]
    assert_close(got, naive_nll(plain, [a], [resets_of("file", data_root)], warm=warm)[0])  # the model's lr, from the warm W
    off = load_file(str(out / "token_nll" / "off" / "20" / "book2.safetensors"))["nll"]
    assert_close(off, moshi_forward_nll(plain.lm, a))  # `off` is W0, warm start or not
    for layer in ttt_layers(tiny.lm).values():  # the warm start does not outlive the run
        assert layer._reset_target() is layer.w_down


def cli(args):
    from typer.testing import CliRunner
    from ttt_cli.cli.app import app
    return CliRunner().invoke(app, args)


def hand_cols(lm, codes, n):
    return torch.cat([hand_input(lm, codes, s) for s in range(n)], 2)


def test_cli_end_to_end(data_root, cache_dir, full_run, tmp_path, monkeypatch):
    out = tmp_path / "out"
    args = ["eval", "librilight", str(data_root), "--model", "tiny", "--out", str(out), "-p", "document",
            "-p", "every:2s", "--bin-seconds", "2", "--codes-cache", str(cache_dir), "--device", "cpu"]
    r = cli(args + ["--json"])
    assert r.exit_code == 1, r.output  # one broken file
    payload = json.loads(r.stdout)  # stdout holds the JSON result only
    assert payload["status"] == "complete" and set(payload["policies"]) == {"document", "every:2s"}
    assert payload["policies"]["document"]["nll"] == pytest.approx(full_run.results["policies"]["document"]["nll"],
                                                                 rel=1e-9)  # the CLI runs the same protocol
    assert any(LD.BROKEN in f for f in payload["failed"])
    assert payload["codes_cache"]["hits"] == 3  # encoded by the session fixture: no encoding again
    for name in ("results.json", "curve.csv", "curve.png"):
        assert (out / name).is_file()
    first = json.loads((out / "results.json").read_text())
    before = (out / "results.json").read_bytes()
    r = cli(args)
    assert r.exit_code == 2 and "--overwrite" in r.output and (out / "results.json").read_bytes() == before
    # --resume of a finished run: nothing is scored again, the results are the same
    r = cli(args + ["--resume"])
    assert r.exit_code == 1, r.output
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["codes_cache"]["hits"] == resumed["codes_cache"]["misses"] == 0  # no document was processed
    assert resumed["policies"] == first["policies"] and resumed["documents"] == first["documents"]
    # --overwrite: a new run (every document processed again), same numbers
    r = cli(args + ["--overwrite"])
    assert r.exit_code == 1 and "fast-weight memory" in r.output
    again = json.loads((out / "results.json").read_text())
    assert again["codes_cache"]["hits"] == 3
    assert again["policies"]["every:2s"]["nll"] == pytest.approx(first["policies"]["every:2s"]["nll"], rel=1e-9)
    # --no-codes-cache: encodes again, stores nothing, same numbers
    fresh_cache = tmp_path / "unused-cache"
    r = cli(args[:-4] + ["--device", "cpu", "--codes-cache", str(fresh_cache), "--no-codes-cache", "--out",
                         str(tmp_path / "nocache"), "--json"])
    assert r.exit_code == 1, r.output
    nc = json.loads(r.stdout)
    assert nc["codes_cache"] == {"dir": None, "hits": 0, "misses": 3, "read_only": False} and not fresh_cache.exists()
    assert first["policies"]["document"]["ci"] is not None and first["policies"]["document"]["vs_off"] is None
    # --bootstrap 0: no intervals (null), said in the table; the numbers are the same
    r = cli(args + ["--overwrite", "--bootstrap", "0", "--seed", "3"])
    assert r.exit_code == 1 and "no intervals: --bootstrap 0" in r.output and "no `off` policy" in r.output, r.output
    zero = json.loads((out / "results.json").read_text())
    assert zero["bootstrap"]["resamples"] == 0 and zero["bootstrap"]["seed"] == 3
    assert zero["policies"]["document"]["ci"] is None and zero["policies"]["document"]["curve"][0]["ci"] is None
    assert zero["policies"]["document"]["nll"] == pytest.approx(first["policies"]["document"]["nll"], rel=1e-9)
    assert nc["policies"]["document"]["nll"] == pytest.approx(first["policies"]["document"]["nll"], rel=1e-6)
    # usage errors: one paragraph, exit 2, nothing written
    (tmp_path / "empty").mkdir()
    r = cli(["eval", "librilight", str(tmp_path / "empty"), "--model", "tiny", "--out", str(out)])
    assert r.exit_code == 2 and "no audio files found" in r.output and "Traceback" not in r.output
    bad = {"--audio-stream user": "nothing to score", "-p sometimes": "unknown policy",
           "--block-steps 0": "--block-steps", "--bin-seconds 0.01": "--bin-seconds", "--resume": "exclude each other",
           "--max-seconds soon": "soon", "--bootstrap -1": "--bootstrap"}
    for opt, msg in bad.items():
        r = cli(args + ["--overwrite", *opt.split()])
        assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output, (opt, r.output)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # --device cuda without a GPU
    r = cli(args[:-2] + ["--device", "cuda", "--out", str(tmp_path / "cuda")])
    assert r.exit_code == 2 and "no CUDA device" in r.output and not (tmp_path / "cuda" / "results.json").exists()


def test_text_stream_pad_scores_text_like_moshi(tiny, doc_codes):
    codes = lm_input_codes(tiny.lm, doc_codes["20/book10"].codes, "user", "pad")  # audio input only, text = pad
    with torch.no_grad():
        out = tiny.lm.forward(codes[None])
    logp = out.text_logits[0, 0].float().log_softmax(-1)  # [T, text_card]
    ref = -logp.gather(-1, codes[0][:, None])[:, 0]
    sc = score_document(tiny.lm, codes, block_steps=7)
    assert_close(sc.text_nll, torch.where(out.text_mask[0, 0], ref, torch.full_like(ref, math.nan)))
    assert torch.isnan(sc.nll).all()  # Moshi's own stream is empty (-1): nothing for the depformer to score


def test_exit_code_counts_failures_not_filters(tiny, data_root, cache_dir, tmp_path):
    import shutil
    root = tmp_path / "data"
    shutil.copytree(data_root / "20", root / "20")
    assert sum(LD.seconds(data_root, "20/book10")) < 3.0 < sum(LD.seconds(data_root, "20/book2"))
    opts = EvalOptions(data=root, out=tmp_path / "a", model="tiny", min_seconds=3.0, codes_cache=cache_dir,
                       policies=["document"], text_stream="pad")
    res = evaluate_librilight(opts, model=tiny)
    assert res.exit_code == 0 and [d["id"] for d in res.results["documents"]] == ["20/book2"]
    assert res.results["dataset"]["skipped_documents"][0]["id"] == "20/book10"  # too short: reported, not failed
    assert res.results["policies"]["document"]["tokens"]["text"] == res.results["dataset"]["steps"]
    (root / "30" / "x").mkdir(parents=True)
    (root / "30" / "x" / "1.flac").write_bytes(b"not audio at all")
    opts.out = tmp_path / "b"
    res = evaluate_librilight(opts, model=tiny)
    assert res.exit_code == 1 and len(res.failed) == 1
    assert res.failed[0].startswith("30/x/1.flac: cannot decode as audio")
    bad = [s for s in res.results["dataset"]["skipped_documents"] if s["id"] == "30/x"][0]
    assert bad["reason"] == "no readable audio file" and bad["skipped"][0]["path"] == "30/x/1.flac"
