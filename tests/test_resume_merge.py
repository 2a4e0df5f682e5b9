"""Merging the ranks' per-document records into the resume state (`ttt eval` under torchrun, SPEC §5.8):
records written to disk by two ranks, read back and merged, against the expected state built by hand."""

import hashlib
import json

from evals import resume


def sealed(entry: dict) -> dict:
    """The entry with its checksum as the resume format defines it: sha256 of the entry's JSON, keys sorted."""
    return {**entry, "checksum": hashlib.sha256(json.dumps(entry, sort_keys=True).encode()).hexdigest()}


def test_merge_keeps_records_of_this_config_in_dataset_order_and_names_damaged_ones(tmp_path):
    config, other = {"--lr": 0.1, "policies": ["document"]}, {"--lr": 0.2, "policies": ["document"]}
    entry = {d: {"policies": {"document": {"sums": {"all": [float(i)]}}}} for i, d in enumerate("abcde")}
    # rank 1 finished c and a (in that order), rank 0 finished b; d was made with other options; e is damaged
    resume.write_rank_record(tmp_path, 1, "c", entry["c"], config)
    resume.write_rank_record(tmp_path, 1, "a", entry["a"], config)
    resume.write_rank_record(tmp_path, 0, "b", entry["b"], config)
    resume.write_rank_record(tmp_path, 0, "d", entry["d"], other)
    path = resume.write_rank_record(tmp_path, 0, "e", entry["e"], config)
    rec = json.loads(path.read_text())
    rec["entry"]["policies"]["document"]["sums"]["all"][0] += 1.0  # altered after it was sealed
    path.write_text(json.dumps(rec))
    records, notes = resume.read_rank_records(tmp_path)
    assert notes == [] and sorted(r["doc_id"] for r in records) == list("abcde")
    state = {"version": resume.STATE_VERSION, "config": config, "done": [], "docs": {}}
    merged, damaged = resume.merge_records(state, records, list("edcba"))  # the dataset's order
    assert damaged == ["e"]
    assert merged["done"] == ["c", "b", "a"]  # dataset order, whichever rank wrote them
    assert merged["docs"] == {d: sealed(entry[d]) for d in "abc"}
    assert merged["config"] == config and state["done"] == []  # the state passed in is not changed
