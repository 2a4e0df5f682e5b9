"""The driver every eval task runs under: outputs checked, model, warm start, provenance, write-or-stop."""

from __future__ import annotations

import datetime
import importlib.metadata as md
import platform
import shutil
import time
import typing as tp
from dataclasses import dataclass
from pathlib import Path

import torch

from ttt_cli import __version__, load_model, timeline
from ttt_cli.distributed import current
from ttt_cli.errors import ConfigError, OutputError, TTTError, WriteError
from ttt_cli.fastweights.attach import ttt_layers
from ttt_cli.io import as_os_error, describe_os_error
from ttt_cli.outputs import OutputPlan
from ttt_cli.progress import NullProgress
from ttt_cli.state import check_fits, fingerprint, load_state

from . import resume
from .inputs import file_digest, mimi_fingerprint
from .report import RESULTS


@dataclass
class EvalResult:
    """What a run produced: the results.json content, files written, failures and the exit code.

    `policies` holds the task's table lines (one per policy); `documents_done`/`_total` count the
    task's items (eval asr: recordings).
    """

    out: Path
    results: dict
    policies: list
    files: list[str]
    failed: list[str]          # "path: reason" of skipped files and documents
    warnings: list[str]
    interrupted: bool
    documents_done: int
    documents_total: int

    @property
    def exit_code(self) -> int:
        """130 after Ctrl-C, 1 when an input was skipped because something was wrong with it, else 0."""
        if self.interrupted:
            return 130
        return 1 if self.failed else 0


class EvalStopped(TTTError):
    """The run stopped while its results were being written (Ctrl-C: exit 130, a write failure: exit 1);
    finished documents are kept in the resume record."""


@dataclass
class Setup:
    """What `evaluate` hands a task's `run` once the model is loaded: the model and the run's provenance."""

    m: tp.Any                  # the loaded TTTModel
    lr: float                  # the variant's rate (lr, base_lr or lr_scale); 0 without fast weights
    warm: dict | None          # --init-state: {layer index: tensors as captured}
    protocol: dict             # results.json's `protocol` section (the task's)
    model_rec: dict            # results.json's `model` section
    mimi_fp: str               # `mimi_fingerprint(m.mimi)`, hashed once per run
    fp_seconds: float          # what hashing Mimi took
    warnings: list[str]        # the model's, the task's, the warm start's, in that order
    progress: tp.Any
    t_start: float             # `time.perf_counter()` before the model was obtained


class Task(tp.Protocol):
    """One evaluation as `evaluate` runs it (`evals.librilight`, `evals.asr`)."""

    def check(self) -> OutputPlan:
        """Checks options, data and where the run writes, before any work; returns the prepared plan."""

    def prepare(self, m) -> list[str]:
        """Checks the loaded model against the task (raising ConfigError), settles what depends on it;
        returns notes for the run's warnings.

        Args:
            m: the loaded TTTModel.
        """

    def protocol(self, init_state: dict | None) -> dict:
        """results.json's `protocol` section.

        Args:
            init_state: the warm start's record (None: no --init-state).
        """

    def run(self, setup: Setup) -> EvalResult:
        """Opens (or resumes) the record, runs every pending item, writes the outputs.

        Args:
            setup: the model and the run's provenance.
        """


def evaluate(task: Task, options, progress=None, model=None) -> EvalResult:
    """Runs one eval task: checks its inputs and outputs, obtains the model, then hands the task a `Setup`.

    Args:
        task: the task (`evals.librilight.protocol.LibriLightTask`, `evals.asr.protocol.AsrTask`).
        options: its options (`model`, `device`, `dtype`, `ttt`, `base`, `init_state`, `force_state` read here).
        progress: a `ttt_cli.progress` hook (None: silent).
        model: a loaded `TTTModel`, or a function returning one, called once the data and --out are
            checked (None: load `options.model`). The model is left as it was found.
    Returns:
        the task's EvalResult.
    """
    plan = task.check()
    try:
        current().sync("eval-checked")  # under torchrun: no rank writes before every rank checked --out
        return task.run(begin(task, options, progress or NullProgress(), model))
    finally:
        plan.cleanup()


def begin(task: Task, o, progress, model) -> Setup:
    """Obtains the model, lets the task check it, reads the warm start and records the run's provenance.

    Args:
        task: the task.
        o: its options.
        progress: the progress hook.
        model: as `evaluate`'s.
    """
    t_start = time.perf_counter()
    timeline.mark("model_load_started")
    m = obtain_model(o, model)
    timeline.mark("model_loaded")
    notes = list(m.warnings) + task.prepare(m)
    warm, init_rec = None, None
    if o.init_state is not None:
        warm, init_rec, more = load_warm_start(m, Path(o.init_state), o.force_state)
        notes += more
    t_fp = time.perf_counter()
    mimi_fp = mimi_fingerprint(m.mimi)  # hashed once per run: the model section's, and every codes cache key's
    fp_seconds = time.perf_counter() - t_fp
    lr = float(m.ttt.rate) if m.ttt is not None else 0.0
    return Setup(m, lr, warm, task.protocol(init_rec), model_section(m, ttt_fingerprint(m), mimi_fp), mimi_fp,
                 fp_seconds, notes, progress, t_start)


def obtain_model(o, model):
    """The run's model: `model` itself, what it returns when it is a function, or (None) `o.model` loaded with
    the options' device, dtype, TTT overrides and base.

    Args:
        o: the task's options.
        model: a TTTModel, a function returning one, or None.
    """
    if model is None:
        return load_model(o.model, device=o.device, dtype=o.dtype, ttt=o.ttt, base=o.base)
    return model() if callable(model) else model


# -- provenance ----------------------------------------------------------------------------------

def _version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def environment(m, packages: tp.Sequence[str] = ()) -> dict:
    """Versions, device and date of a run.

    Args:
        m: the loaded TTTModel (its device and dtype).
        packages: further packages whose versions the figures depend on (recorded under their names, `-` as `_`).
    """
    dev = str(m.device)
    name = torch.cuda.get_device_name(torch.device(dev)) if dev.startswith("cuda") else (
        platform.processor() or platform.machine())
    return {"ttt": __version__, "python": platform.python_version(), "platform": platform.platform(),
            "torch": torch.__version__, "moshi": _version("moshi"), "numpy": _version("numpy"),
            "sphn": _version("sphn"), "device": dev, "device_name": name,
            "dtype": str(m.dtype).removeprefix("torch."), "torch_threads": torch.get_num_threads(),
            "cuda": torch.version.cuda,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **{p.replace("-", "_"): _version(p) for p in packages}}


def ttt_fingerprint(m) -> str | None:
    """The fingerprint of the model's fast-weight layers (`ttt_cli.state.fingerprint`), None without any.

    Args:
        m: the loaded TTTModel.
    """
    return fingerprint(m.lm) if ttt_layers(m.lm) else None


def model_section(m, fp: str | None, mimi_fp: str) -> dict:
    """results.json's `model` section: id, TTT settings and where they came from, fingerprints, layout.

    Args:
        m: the loaded TTTModel.
        fp: `ttt_fingerprint(m)`.
        mimi_fp: `mimi_fingerprint(m.mimi)`.
    """
    lm = m.lm
    return {"id": m.model_id, "model_type": m.info.model_type, "ttt": m.config.get("ttt"),
            "ttt_origin": m.config.get("ttt_origin"), "provenance": m.config.get("provenance"), "fingerprint": fp,
            "mimi_fingerprint": mimi_fp, "num_layers": len(lm.transformer.layers), "dim": lm.dim,
            "context": lm.context, "n_q": lm.n_q, "dep_q": lm.dep_q, "delays": list(lm.delays), "card": lm.card,
            "text_card": lm.text_card, "dtype": str(m.dtype).removeprefix("torch."), "device": str(m.device)}


def load_warm_start(m, path: Path, force: bool) -> tuple[dict, dict, list[str]]:
    """Reads an `--init-state` snapshot: ({layer: its captured tensors}, its record for results.json, warnings).

    Args:
        m: the loaded TTTModel the snapshot must fit.
        path: the snapshot file.
        force: accept forceable differences (lr, clip).

    Only the fast weights are used: resets and new streams start from them. A pending partial
    chunk in the snapshot is not replayed (a reset empties the pending chunk by definition), and
    attention tensors, if any, are ignored (a document starts with fresh attention).
    """
    s = load_state(path)
    check_fits(m.lm, s).raise_unless_fits(force, flag="--force-state")
    warm, notes = {}, []
    for i in s.layers:
        warm[i] = s.layer_tensors(i)  # FastWeightLayer.set_warm_start takes them as captured
    pending = {str(i): s.pending_tokens(i) for i in s.layers if s.pending_tokens(i)}
    if pending:
        notes.append(f"--init-state {path}: its pending partial chunk ({pending} tokens per layer) is not used; "
                     f"a warm start is the fast weights W only (export with --flush-partial to fold it in).")
    rec = {"path": str(Path(path).resolve()), "sha256": file_digest(Path(path)), "model": s.meta.get("model"),
           "model_fingerprint": s.fingerprint, "steps": s.meta.get("steps"), "seconds": s.meta.get("seconds"),
           "source_files": s.meta.get("source_files"), "reset_policy": s.meta.get("reset_policy"),
           "created": s.meta.get("created"), "pending_tokens_ignored": pending,
           "attention_ignored": s.has_attention}
    return warm, rec, notes


def telemetry_add(total: dict, per_layer: dict[int, dict]) -> None:
    """Adds one item's per-layer telemetry (updates, resets, clip and non-finite events, drift) to a policy's sums.

    Args:
        total: {layer (str): sums}, updated in place.
        per_layer: {layer: `FastWeightLayer.telemetry`} at the end of one item.
    """
    for i, t in per_layer.items():
        cur = total.setdefault(str(i), {"updates": 0, "resets": 0, "clip_events": 0, "nonfinite_events": 0,
                                        "max_final_relative_drift": 0.0})
        for k in ("updates", "resets", "clip_events", "nonfinite_events"):
            cur[k] += int(t.get(k, 0))
        cur["max_final_relative_drift"] = max(cur["max_final_relative_drift"], float(t.get("relative_drift", 0.0)))


# -- an earlier run, and stopping on a write error ------------------------------------------------

def check_resume_flags(o) -> None:
    """Refuses --resume with --overwrite (one continues the run in --out, the other starts it again).

    Args:
        o: the task's options (`resume`, `overwrite`).
    """
    if o.resume and o.overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: resume continues the run in --out, "
                          "overwrite starts it again.")


def check_earlier_run(out: Path, resuming: bool, overwrite: bool, outputs: list[Path]) -> None:
    """What an earlier run left in `out` allows this one (SPEC §6, §7.1): a resume record that is not ttt's is
    never replaced; `--resume` needs a record where results exist; otherwise a run's outputs are replaced
    only with `--overwrite`.

    Args:
        out: --out.
        resuming: --resume given.
        overwrite: --overwrite given.
        outputs: what a run leaves in `out` (named in the message when some exist).
    Raises:
        OutputError: the record's folder was not written by ttt.
        ConfigError: --resume without a record, or earlier outputs without --resume / --overwrite.
    """
    sdir, rdir = resume.state_dir(out), resume.ranks_dir(out)
    for d, ours in ((sdir, resume.state_dir_is_ours), (rdir, resume.ranks_dir_is_ours)):
        if d.exists() and not (d.is_dir() and ours(d)):
            raise OutputError(f"{d} exists and was not written by ttt eval; ttt never replaces it. Move it away or "
                              f"choose another --out.")
    if resuming:
        if not (sdir / resume.STATE_FILE).is_file() and not rdir.is_dir() and (out / RESULTS).exists():
            raise ConfigError(f"--resume: {out} has results but no resume state ({resume.STATE_DIR}/"
                              f"{resume.STATE_FILE}); pass --overwrite to run again.")
    elif not overwrite:
        existing = [p.name for p in outputs if p.exists()]
        if existing:
            raise ConfigError(f"{out} already holds the outputs of a run ({', '.join(existing)}); pass --resume to "
                              f"continue it, or --overwrite to replace it.",
                              hint="pass --resume or --overwrite, or choose another --out")


def stop_on_write_error(out: Path, state: dict, ids: list[str], e: BaseException,
                        noun: str = "document") -> tp.NoReturn:
    """Raises the WriteError of a run that could not write (disk full, permission...): what is kept, what was
    not run, how to resume (finished items stay in the resume record; an empty record is removed).

    Args:
        out: --out.
        state: the resume state (its `done` items are kept).
        ids: every item of the run, in order.
        e: the error met.
        noun: what an item is called (`document`, `recording`).
    """
    ose = as_os_error(e) or OSError(str(e))
    done = list(state.get("done", []))
    left = [i for i in ids if i not in set(done)]
    if not done:
        _remove_empty_state(out)
    err = WriteError(f"{describe_os_error(ose, ose.filename)}. {len(done)} finished {noun}(s) are kept"
                     + (f" in {resume.state_dir(out)}" if done else "")
                     + f"; {len(left)} {noun}(s) not run. Free some space (or fix the path) and run the same "
                       f"command with --resume.", hint="free some space, then run the same command with --resume")
    err.payload = {f"{noun}s_done": done, f"{noun}s_not_run": left}  # type: ignore[attr-defined]
    raise err from None


def _remove_empty_state(out: Path) -> None:
    sdir = resume.state_dir(out)
    try:
        if sdir.is_dir() and resume.state_dir_is_ours(sdir) and not any(
                p.name != resume.STATE_FILE for p in sdir.iterdir()):
            shutil.rmtree(sdir)
    except OSError:
        pass


def write_results_or_stop(out: Path, state: dict, ids: list[str], writers: list[tp.Callable[[], Path]],
                          names: str, noun: str = "document") -> list[str]:
    """Runs `writers` (each writes one output atomically, returning its path); Ctrl-C raises EvalStopped (exit
    130) and a write failure `stop_on_write_error`'s WriteError, the resume record kept either way.

    Args:
        out: --out.
        state: the resume state.
        ids: every item of the run, in order.
        writers: the output writers.
        names: the outputs, as the message names them.
        noun: what an item is called (`document`, `recording`).
    """
    try:
        return [str(w()) for w in writers]
    except KeyboardInterrupt:
        done = len(state["done"])
        e = EvalStopped(f"interrupted while writing the results: the {done} finished {noun}(s) are kept in "
                        f"{resume.state_dir(out)}. Run the same command with --resume to write {names}.",
                        hint="run the same command with --resume")
        e.exit_code = 130
        e.payload = {f"{noun}s_done": state["done"]}  # type: ignore[attr-defined]
        raise e from None
    except Exception as e:
        if as_os_error(e) is None:
            raise
        stop_on_write_error(out, state, ids, e, noun)
