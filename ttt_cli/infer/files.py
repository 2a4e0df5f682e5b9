"""Where `ttt infer` writes and how: output names, the output plan, and each result written as one unit, read back."""

from __future__ import annotations

import errno
import json
import typing as tp
import wave
from pathlib import Path

import numpy as np
import sphn

from ..audio import SAMPLE_RATE
from ..errors import TTTError, WriteError
from ..io import as_os_error, atomic_write, describe_os_error, shown, write_json, write_text
from ..outputs import json_with_keys, named_in, safetensors_with_metadata
from ..state import save_state
from ..telemetry import FLAG, plan_series, series_paths, write_series
from .results import FileResult, InferRun, Job, result_json
from .subtitles import DEFAULT_FORMATS, SUBTITLE_FORMATS, subtitle_texts


def plan_jobs(paths: tp.Sequence[str | Path]) -> list[Job]:
    """Names each input's outputs: `<stem>`, or `<parent>_<stem>` when several inputs share a stem.

    Names are unique (compared case-insensitively, for file systems that fold case): a name still
    taken gets `_2`, `_3`, ... so that two inputs never write the same output.

    Args:
        paths: input paths in command-line order.
    """
    paths = [Path(p) for p in paths]
    stems = [p.stem or p.name for p in paths]
    count: dict[str, int] = {}
    for s in stems:
        count[s.lower()] = count.get(s.lower(), 0) + 1
    names = [f"{p.parent.name or 'root'}_{s}" if count[s.lower()] > 1 else s for p, s in zip(paths, stems)]
    taken: set[str] = set()
    out = []
    for i, (p, n) in enumerate(zip(paths, names)):
        name, k = n, 1
        while name.lower() in taken:  # same parent name too, or a stem equal to another's new name
            k += 1
            name = f"{n}_{k}"
        taken.add(name.lower())
        out.append(Job(i, p, name))
    return out


def output_paths(out_dir: Path, job: Job, mode: str, telemetry: Path | None = None,
                 formats: tp.Collection[str] = DEFAULT_FORMATS) -> dict[str, Path]:
    """The files one input writes (with `telemetry`, its update series `updates_csv`, `updates_png` there).

    Args:
        out_dir: --out.
        job: the input.
        mode: the resolved mode (dialog adds the .wav).
        telemetry: the --telemetry directory, or None.
        formats: the transcript formats (`txt`, `json`, `srt`, `vtt`, `tsv`): `<stem>.<format>` each;
            `<stem>.json` always.
    """
    d = {f: out_dir / f"{job.stem}.{f}" for f in ("txt", "json", *SUBTITLE_FORMATS) if f in formats or f == "json"}
    if mode == "dialog":
        d["wav"] = out_dir / f"{job.stem}.wav"
    if telemetry is not None:
        d.update({f"updates_{k}": p for k, p in series_paths(telemetry, job.stem).items()})
    return d


def state_paths(save_state: Path | None, jobs: list[Job], reset_policy: str) -> dict[int, Path]:
    """{index of a stream's last job: snapshot path}; one stream writes `save_state` itself (or
    `<stem>.end.safetensors` inside it when it is an existing directory), several streams a directory.

    Args:
        save_state: --save-state, or None.
        jobs: the planned inputs.
        reset_policy: `file` (a stream per input) or `carry` (one stream).
    """
    if save_state is None or not jobs:
        return {}
    if reset_policy == "carry" or len(jobs) == 1:
        last = jobs[-1]
        if Path(save_state).is_dir():
            return {last.index: Path(save_state) / f"{last.stem}.end.safetensors"}
        return {last.index: Path(save_state)}
    return {j.index: Path(save_state) / f"{j.stem}.end.safetensors" for j in jobs}


def output_recognisers(out_dir: Path, job: Job, mode: str,
                       formats: tp.Collection[str] = DEFAULT_FORMATS) -> dict[str, tp.Callable[[Path], bool]]:
    """How an existing output of an earlier `ttt infer` run is recognised (replaceable with --overwrite):
    `<stem>.json` is a result object, and it names the other files among its `outputs`.

    Args:
        out_dir: --out.
        job: the input.
        mode: the resolved mode.
        formats: the transcript formats (as `output_paths`).
    """
    paths = output_paths(out_dir, job, mode, formats=formats)
    record = json_with_keys("input", "mode", "outputs")
    return {k: (record if k == "json" else named_in(paths["json"], record)) for k in paths}


def plan_outputs(plan, out_dir: Path, jobs: list[Job], mode: str | None, states: dict[int, Path],
                 kinds: tp.Collection[str] = ("txt", "json", *SUBTITLE_FORMATS, "wav", "updates"),
                 telemetry: Path | None = None, formats: tp.Collection[str] = DEFAULT_FORMATS) -> None:
    """Declares the outputs of an infer run on an `OutputPlan` (mode None: not known yet, no .wav).

    Args:
        plan: the run's OutputPlan.
        out_dir: --out.
        jobs: the planned inputs.
        mode: the resolved mode, or None before the model is loaded.
        states: --save-state paths by job index.
        kinds: which per-input outputs to declare (e.g. only "wav" once the mode is known).
        telemetry: the --telemetry directory (the update series of each input).
        formats: the transcript formats (`InferOptions.formats`).
    """
    if telemetry is not None and "updates" in kinds:
        plan.write_into(telemetry, FLAG)
        for j in jobs:
            plan_series(plan, series_paths(telemetry, j.stem), j.path.name)
    for j in jobs:
        rec = output_recognisers(out_dir, j, mode or "transcribe", formats)
        for k, p in output_paths(out_dir, j, mode or "transcribe", formats=formats).items():
            if k in kinds:
                plan.write(p, "--out", f"the .{k} output of {j.path.name}", rec[k])
    for i, p in states.items():
        plan.write(p, "--save-state", "a fast-weight snapshot", safetensors_with_metadata("ttt_state"))



def write_result(res: FileResult, run: InferRun, out_dir: Path, state_path: Path | None = None,
                 overwrite: bool = False) -> None:
    """Writes `<stem>.txt`, the subtitle files (`run.formats`), `<stem>.wav` (dialog), the snapshot and
    `<stem>.json` as one unit.

    Each file is written atomically and read back; `<stem>.json` comes last, so it exists only when
    the rest does. On any failure (a full disk, Ctrl-C, a file that does not read back) the files of
    this result already written are removed again and the error propagates: an OSError becomes a
    WriteError naming the path, which stops the run (the inputs not yet written are reported as not
    run); the outputs of earlier inputs stay.

    Args:
        res: the input's result (a failed one writes nothing; its unfinished voice is discarded).
        run: the run it belongs to.
        out_dir: --out.
        state_path: where its stream's end snapshot goes (--save-state), or None.
        overwrite: unused: the output plan decided what may be replaced.
    """
    if not res.ok:
        if res.audio_stream is not None:
            res.audio_stream.discard()
        return
    unit = _Unit()
    try:
        _write_files(res, run, out_dir, state_path, unit)
    except BaseException as e:
        unit.remove()
        if res.audio_stream is not None:
            res.audio_stream.discard()
        res.outputs.clear()
        ose = as_os_error(e, unit.current)
        if ose is not None and not isinstance(e, TTTError):
            detail = describe_os_error(ose, unit.current)
            res.error = f"{res.job.path}: {detail}"
            raise WriteError.unit_removed(detail, res.job.path) from None
        raise
    finally:
        res.state = None  # a snapshot can be large: keep it no longer than needed
        res.audio_stream = None


class _Unit:
    """The files of one result written so far, and the one being written (named in an error)."""

    def __init__(self):
        self.written: list[Path] = []
        self.current: Path | None = None

    def remove(self) -> None:
        for p in self.written:
            try:
                p.unlink(missing_ok=True)
            except OSError:
                pass


def _write_files(res: FileResult, run: InferRun, out_dir: Path, state_path: Path | None, unit: _Unit) -> None:
    """`write_result`'s files in order, `<stem>.json` last; each one's path goes to `unit` before it is written."""
    paths = output_paths(out_dir, res.job, run.mode, formats=run.formats)
    series = series_paths(Path(run.telemetry), res.job.stem) if run.telemetry is not None else None
    texts = {"txt": res.text + "\n"} if "txt" in paths else {}
    texts.update(subtitle_texts(res.words, run.formats, **(run.subtitles or {})))
    for k, text in texts.items():
        unit.current = paths[k]
        write_text(paths[k], text)
        unit.written.append(paths[k])
        if paths[k].read_text(encoding="utf-8") != text:
            raise OSError(errno.EIO, "does not read back as written", str(paths[k]))
        res.outputs[k] = str(paths[k])
    if "wav" in paths:
        unit.current = paths["wav"]
        expected = _write_wav(res, paths["wav"])
        unit.written.append(paths["wav"])
        _check_wav(paths["wav"], expected)
        res.outputs["wav"] = str(paths["wav"])
    if state_path is not None and res.state is not None:
        unit.current = state_path
        meta = {"source_files": [str(res.job.path)] if run.reset_policy == "file" else res.stream.get("paths", []),
                "reset_policy": run.reset_policy, "command": "infer", "mode": run.mode,
                "init_state": run.init_state}
        save_state(res.state, state_path, metadata=meta, overwrite=True)  # the plan checked it is ours
        unit.written.append(state_path)
        res.outputs["state"] = str(state_path)
    if series is not None:
        unit.current = series["csv"]
        unit.written += list(series.values())  # removed again (if there) should a later file fail
        names = write_series(series, res.updates or {}, res.slot, f"{run.model['id']}: {res.job.path.name}")
        res.outputs.update({f"updates_{k}": v for k, v in names.items()})
    unit.current = paths["json"]
    res.outputs["json"] = str(paths["json"])
    obj = result_json(res, run)
    text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
    write_json(paths["json"], obj)
    unit.written.append(paths["json"])
    if json.loads(paths["json"].read_text(encoding="utf-8")) != json.loads(shown(text)):
        raise OSError(errno.EIO, "does not read back as written", str(paths["json"]))


def _write_wav(res: FileResult, path: Path) -> int:
    """Puts the generated voice at `path`: commits the stream written during the run, or writes the
    samples held in memory (atomically either way); returns the number of samples written."""
    if res.audio_stream is not None:
        if Path(res.audio_stream.path) != Path(path):
            raise RuntimeError(f"the generated audio was written for {res.audio_stream.path}, not {path}")
        res.audio_stream.commit()
        return res.audio_stream.samples
    audio = np.asarray(res.audio, dtype=np.float32)
    atomic_write(path, lambda p: sphn.write_wav(str(p), audio, SAMPLE_RATE))
    return int(audio.shape[0])


def _check_wav(path: Path, samples: int) -> None:
    """The written .wav's header says 24 kHz mono with `samples` samples (read without loading the data)."""
    try:
        with wave.open(str(path), "rb") as w:
            sr, n, ch = w.getframerate(), w.getnframes(), w.getnchannels()
    except (wave.Error, EOFError) as e:
        raise OSError(errno.EIO, f"does not read back as a WAV file ({e})", str(path)) from None
    if (sr, n, ch) != (SAMPLE_RATE, samples, 1):
        raise OSError(errno.EIO, f"does not read back ({n} samples at {sr} Hz, {ch} channel(s); expected {samples} "
                                 f"at {SAMPLE_RATE}, mono)", str(path))
