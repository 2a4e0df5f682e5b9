"""The per-recording loop of `ttt eval asr`: each recording streamed once per policy, hypotheses written, committed."""

from __future__ import annotations

import typing as tp
from pathlib import Path

from ttt_cli import infer as inference  # infer called through the module: a test stands in for it (Ctrl-C mid-run)
from ttt_cli.io import as_os_error

from .. import resume
from ..inputs import digest_or_none, file_digest
from ..policies import policy_settings
from ..run import stop_on_write_error
from .data import AsrItem
from .metrics import score_file
from .options import AsrRun
from .outputs import hyp_dir, hyp_paths, hyp_stem


def stop(run: AsrRun, e: BaseException) -> tp.NoReturn:
    """`stop_on_write_error` for this run's recordings.

    Args:
        run: the run.
        e: the error met.
    """
    stop_on_write_error(run.out, run.state, [it.key for it in run.dataset.items], e, "recording")


class _Labelled:
    """Progress of one recording and policy: infer's per-file bar, named `[n/N] key (policy)`."""

    def __init__(self, progress, label: str):
        self.p, self.label = progress, label

    def start(self, key, description, total):
        self.p.start(f"asr-{key}", self.label, total)

    def update(self, key, completed, **info):
        self.p.update(f"asr-{key}", completed, **info)

    def finish(self, key, **info):
        self.p.finish(f"asr-{key}", **info)

    def log(self, message):
        self.p.log(message)


Commit = tp.Callable[[AsrRun, AsrItem, dict], None]


def commit(run: AsrRun, item: AsrItem, entry: dict) -> None:
    """Commits one finished recording to the resume record; it counts once written.

    Args:
        run: the run.
        item: the recording.
        entry: its resume entry.
    """
    state = resume.with_document(run.state, item.key, entry)
    resume.write_state(resume.state_dir(run.out), state)
    run.state = state


def transcribe_pending(run: AsrRun, todo: list[AsrItem] | None = None, commit: Commit = commit) -> bool:
    """Transcribes the recordings `todo` (default: every one not done yet) under every policy, handing each
    finished one to `commit(run, item, entry)`; True when Ctrl-C stopped it (the recording in progress leaves
    nothing behind).

    Args:
        run: the run (its resume record open).
        todo: the recordings to transcribe (under torchrun: this rank's share).
        commit: what records a finished recording (under torchrun: a rank record).
    """
    items = run.dataset.items
    done = set(run.state["done"])
    first, of = (len(done) + 1, len(items)) if todo is None else (1, len(todo))  # torchrun: this rank's share
    todo = [it for it in items if it.key not in done] if todo is None else todo
    run.progress.log(f"transcribing {len(todo)} of {len(items)} recording(s) x {len(run.policies)} policy(ies) "
                     f"({run.mode}): {', '.join(p.name for p in run.policies)}")
    for n, item in enumerate(todo, start=first):
        written: list[Path] = []
        try:
            entry = transcribe_recording(run, item, f"[{n}/{of}] {item.key}", written)
            commit(run, item, entry)
        except KeyboardInterrupt:
            _remove(written)
            return True
        except Exception as e:
            _remove(written)
            if as_os_error(e) is None:
                raise
            stop(run, e)
    return False


def transcribe_recording(run: AsrRun, item: AsrItem, label: str, written: list[Path]) -> dict:
    """Streams one recording once per policy, writes its hypotheses; returns its resume entry.

    Args:
        run: the run.
        item: the recording.
        label: its progress label.
        written: receives each file written, so that an interrupted recording can be removed again.
    """
    entry: dict[str, tp.Any] = {"key": item.key, "inputs": {"sha256": digest_or_none(item.audio)},
                                "policies": {}, "warnings": [], "error": None}
    for p in run.policies:
        opts = inference.InferOptions(mode=run.mode, greedy=True, seed=run.o.seed, pad_seconds=run.pads,
                                      whole_file_seconds=run.o.whole_file_seconds,
                                      reset_every_steps=p.interval_steps if p.kind == "every" else None)
        job = inference.Job(0, item.audio, hyp_stem(item.key))
        with policy_settings(run.m.lm, p.ttt_on, run.lr, run.warm):
            irun = inference.infer(run.m, [job], opts, _Labelled(run.progress, f"{label} ({p.name})"))
        res = irun.results[0]
        if not res.ok:  # a file that cannot be decoded fails alike under every policy
            entry["error"] = res.error.removeprefix(f"{item.audio}: ")
            run.progress.log(f"{label}: skipped: {entry['error']}")
            return entry
        irun.ttt = {**irun.ttt, "enabled": p.ttt_on and run.lr > 0, "policy": p.name}
        paths = hyp_paths(run.out, p.dir_name, item.key)
        written += [paths["txt"], paths["json"]]
        inference.write_result(res, irun, hyp_dir(run.out, p.dir_name))
        rel = {k: paths[k].relative_to(run.out).as_posix() for k in ("txt", "json")}
        entry["policies"][p.name] = {
            **rel, "sha256": {r: file_digest(run.out / r) for r in rel.values()},
            "seconds": res.info.seconds, "wall_seconds": res.wall_seconds, "steps": res.steps,
            "telemetry": {str(i): t for i, t in res.telemetry.items()}}
        entry["warnings"] = list(res.info.warnings)
        entry["info"] = {**res.info.to_dict(), "read": "whole" if res.read_whole else "pieces"}
        s = score_file(item.reference, res.text, res.words, res.info.seconds, run.o.bin_seconds)
        run.progress.log(f"{label} ({res.info.seconds:.1f} s) {p.name}: WER {100 * s.wer:.1f}% "
                         f"({s.errors}/{s.words}), RTF {res.realtime_factor:.3f}")
    return entry


def _remove(paths: list[Path]) -> None:
    for p in paths:
        try:
            p.unlink(missing_ok=True)
        except OSError:
            pass
