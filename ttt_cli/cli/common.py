"""Options, parsing and error handling shared by every command (SPEC §5). Imports stay light."""

from __future__ import annotations

import enum
import functools
import json
import os
import sys
import typing as tp
import warnings
from pathlib import Path
from typing import Annotated

import typer


class Device(str, enum.Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class AudioStream(str, enum.Enum):
    """Which LM audio stream teacher-forced audio goes on (SPEC §6 token layout)."""
    moshi = "moshi"
    user = "user"


class TextStream(str, enum.Enum):
    """The text stream of teacher-forced input: -1 (no token) or the padding id."""
    zero = "zero"
    pad = "pad"


class Variant(str, enum.Enum):
    """Fast-weight designs (SPEC §3.9)."""
    inplace = "inplace"
    mlp = "mlp"
    linear_adapter = "linear-adapter"


class DType(str, enum.Enum):
    auto = "auto"
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


def _model_value(value: tp.Optional[str]) -> tp.Optional[str]:
    if value is not None and not value.strip():
        raise typer.BadParameter("empty: give tiny, a checkpoint directory or a hub id org/name (leave the option "
                                 "out for the default kyutai/moshiko-pytorch-bf16).")
    return value


ModelOpt = Annotated[tp.Optional[str], typer.Option("--model", "-m", callback=_model_value,
                                                    help="tiny | tiny-stt | tiny-mlp | tiny-adapter | bench | moshi-7b-random | "
                                                    "moshi-7b-layer | "
                                                    "a checkpoint directory | "
                                                    "a hub id org/name[@rev]. Default: kyutai/moshiko-pytorch-bf16.")]
DeviceOpt = Annotated[Device, typer.Option("--device", help="auto = cuda if available.")]
DTypeOpt = Annotated[DType, typer.Option("--dtype", help="auto = bf16 on cuda, fp32 on cpu.")]
TTTOpt = Annotated[bool, typer.Option("--ttt/--no-ttt", help="--no-ttt freezes fast weights at W0 (the baseline).")]
TTTLrOpt = Annotated[tp.Optional[float], typer.Option("--ttt-lr", help="Override the fast-weight rate: lr (inplace), "
                                                     "base_lr (mlp) or lr_scale (linear-adapter).")]
TTTChunkOpt = Annotated[tp.Optional[int], typer.Option("--ttt-chunk-size", min=1,
                                                       help="Override the chunk size (steps).")]
TTTLayersOpt = Annotated[tp.Optional[str], typer.Option("--ttt-layers", help="0,6,12 | every:6 | every:6@3 | none.")]
SEED_MAX = 2**32 - 1  # numpy's legacy seeding takes 0 .. 2**32 - 1
SeedOpt = Annotated[int, typer.Option("--seed", min=0, max=SEED_MAX, help="Random seed (0 .. 2**32 - 1).")]
BootstrapOpt = Annotated[int, typer.Option("--bootstrap", min=0, help="Resamples of the 95% intervals (percentile "
                                           "bootstrap over documents or recordings, drawn with --seed); 0: none.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the machine-readable result on stdout, nothing else "
                                       "(one JSON object, also on errors).")]
TTTClipOpt = Annotated[tp.Optional[str], typer.Option("--ttt-clip", help="Override the delta clip (Frobenius "
                                                      "norm of each chunk's update): none | a number > 0.")]
BaseOpt = Annotated[tp.Optional[str], typer.Option("--base", help="For a fine-tuning fork (moshi_in_place) checkpoint: "
                                                   "the base model the files its folder lacks (LM weights, Mimi, "
                                                   "tokenizer) come from; used only when one is missing. Any --model "
                                                   "source; default kyutai/moshiko-pytorch-bf16.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace outputs of an earlier ttt run (never inputs, "
                                            "never files ttt did not write).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Run even if the fast-weight memory estimate does not fit.")]
TelemetryOpt = Annotated[tp.Optional[Path], typer.Option(
    "--telemetry", help="Write the fast-weight update series here: per file a <name>.updates.csv (one row per "
    "update, reset and non-finite event per stream and layer) and a <name>.updates.png (drift and step norm vs "
    "time, one line per layer).")]
ForceStateOpt = Annotated[bool, typer.Option("--force-state", help="Use an --init-state snapshot whose lr/clip differ "
                                             "from the model's (never one whose fingerprint differs).")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue an interrupted run in --out.")]
# Input paths say readable=False: typer's default (click's readable check) refuses an unreadable input while
# parsing (exit 2), before anything runs; the commands report and skip it with its reason instead (SPEC §7).
WarmStartOpt = Annotated[tp.Optional[Path], typer.Option("--init-state", readable=False, help="Warm start: a fast-weight snapshot "
                                                         "(ttt export-state); resets go back to it.")]
DistTimeoutOpt = Annotated[float, typer.Option("--dist-timeout", help="Under torchrun: seconds a rank waits for a "
                                               "silent peer (and bounds every collective) before it stops with a "
                                               "message naming the rank.")]


def parse_clip(value: str) -> float | None:
    """`--ttt-clip`: `none` (no clip) or a number > 0."""
    from ..errors import ConfigError
    if value.strip().lower() == "none":
        return None
    try:
        clip = float(value)
    except ValueError:
        clip = float("nan")
    if not clip > 0 or clip == float("inf"):
        raise ConfigError(f"--ttt-clip {value}: expected `none` or a number > 0.")
    return clip


def ttt_overrides(ttt: bool, lr: float | None, chunk: int | None, layers: str | None,
                  clip: str | None = None) -> dict:
    """CLI TTT options -> overrides of the `ttt` section (`--no-ttt` = lr 0, SPEC §3.4b)."""
    out: dict[str, tp.Any] = {}
    if clip is not None:
        out["delta_clip_fro_norm"] = parse_clip(clip)
    if lr is not None:
        out["lr"] = lr
    if chunk is not None:
        out["chunk_size"] = chunk
    if layers is not None:
        out["layers"] = layers
    if not ttt:
        out["lr"] = 0.0
    return out


def handle_errors(fn):
    """Runs a command body under the error contract (SPEC §5, §7, §7.1).

    TTTError -> a one-paragraph message and its exit code; Ctrl-C -> 130; an OSError or an
    unexpected exception -> a one-paragraph message, exit 1; tracebacks only with --debug. With
    --json the same error is also printed on stdout as one object
    `{"error": {"code", "message", "hint"}, ...}` (plus what the error carries, e.g. the inputs'
    accounting). Warnings (Python's `warnings` included) are printed once each, without source lines.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .. import distributed
        _LAST_ERROR.clear()
        try:
            _guarded(fn, args, kwargs)
        except typer.Exit as e:
            code = e.exit_code
        except SystemExit:
            raise  # SIGTERM under torchrun: leave at once
        except BaseException as e:  # --debug: the traceback, once the other ranks know
            distributed.finish(130 if isinstance(e, KeyboardInterrupt) else 1, f"{type(e).__name__}: {e}")
            raise
        else:
            code = 0
        # Under torchrun every rank reaches this point and leaves with the code all agree on (SPEC §5.6).
        final = distributed.finish(code, _LAST_ERROR[-1] if _LAST_ERROR else None)
        if final:
            raise typer.Exit(final)
    return wrapper


def _guarded(fn, args: tuple, kwargs: dict) -> None:
    """Runs `fn(*args, **kwargs)`, its warnings said once each, its errors turned into `fail` (typer.Exit)."""
    from ..errors import TTTError
    debug = kwargs.get("debug", False)
    json_out = kwargs.get("json_out", False)
    _WARNED.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = _show_warning
        try:
            fn(*args, **kwargs)
        except typer.Exit:
            raise
        except TTTError as e:
            if debug:
                raise
            if getattr(e, "silent", False):  # said by the rank it concerns (scale-out)
                _LAST_ERROR.append(str(e))
                raise typer.Exit(e.exit_code)
            fail(e.exit_code, str(e), e.hint, json_out, getattr(e, "payload", None))
        except KeyboardInterrupt:
            fail(130, "interrupted (Ctrl-C); outputs finished before it are kept.",
                 "run the same command again", json_out)
        except OSError as e:
            if debug:
                raise
            from ..io import describe_os_error
            fail(1, describe_os_error(e) + ".", "fix the path named in the message", json_out)
        except Exception as e:
            if debug:
                raise
            fail(1, f"unexpected error ({type(e).__name__}: {str(e).strip() or 'no details'}). This is a bug in "
                 f"ttt: run again with --debug for the traceback and report it.", "run again with --debug",
                 json_out)


def fail(code: int, message: str, hint: str | None = None, json_out: bool = False,
         payload: dict | None = None) -> tp.NoReturn:
    """Prints an error (stderr; with --json also the error object on stdout) and exits with `code`."""
    from ..distributed import current
    from ..outputs import shown
    message = shown(message)
    _LAST_ERROR.append(message)
    err(f"{current().label}error: {message}", always=True)
    if json_out:
        print_json({"error": {"code": code, "message": message, "hint": hint or ""}, **(payload or {})})
    raise typer.Exit(code)


def inputs_error(code: int, message: str) -> dict:
    """The `error` entry of a `--json` result whose exit code is 1 because some inputs failed (the
    result object itself, with the accounting of inputs, is still printed)."""
    if code == 0:
        return {}
    return {"error": {"code": code, "message": message, "hint": "the inputs listed as skipped were reported "
                                                                "and left out; fix or remove them"}}


_WARNED: set[str] = set()
_LAST_ERROR: list[str] = []  # the error this run printed (handed to the other ranks under torchrun)


def warn(message: str) -> None:
    """A warning on stderr, printed once per command run however many times it is raised."""
    text = str(message).strip()
    if text and text not in _WARNED:
        _WARNED.add(text)
        err(f"warning: {text}")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    warn(str(message))


def err(msg: str, always: bool = False) -> None:
    """A message on stderr (never stdout: --json owns stdout); under torchrun only rank 0's, or `always`."""
    from rich.console import Console
    from ..distributed import quiet
    from ..outputs import shown
    if quiet() and not always:
        return
    Console(stderr=True, highlight=False, soft_wrap=True).print(shown(msg), markup=False)


def fmt_or_dash(v: float | None, spec: str = ".4f") -> str:
    """A table cell: `v` formatted, or "-" when there is no value."""
    return "-" if v is None else format(v, spec)


def fmt_interval(ci: tp.Sequence[float] | None, spec: str = ".4f", scale: float = 1.0) -> str:
    """A table cell for a 95% interval: `[low, high]`, or "-" when there is none."""
    return "-" if not ci else f"[{format(scale * ci[0], spec)}, {format(scale * ci[1], spec)}]"


def fmt_vs_off(vs: dict | None, spec: str = ".4f", scale: float = 1.0) -> str:
    """A table cell for a paired difference with the `off` policy: `+d [low, high]`, or "-"."""
    if not vs:
        return "-"
    d = format(scale * vs["diff"], "+" + spec)
    return f"{d} {fmt_interval(vs['ci'], spec, scale)}" if vs["ci"] else d


def interval_notes(res) -> list[str]:
    """Why the table shows no interval or no difference with `off` (SPEC §5.8), as lines for stderr."""
    notes = []
    note = (res.results.get("bootstrap") or {}).get("note")
    if note:
        notes.append(note)
    if "off" not in res.results.get("policies", {}):
        notes.append("no `off` policy in this run: no paired differences (add -p off)")
    return notes


def eval_model_loader(opts, seed: int, force: bool) -> tp.Callable[[], tp.Any]:
    """What the eval commands hand the protocol: loads `opts.model` once it is needed (after the output
    checks), says what loading said, and refuses a run whose fast weights do not fit (unless `force`)."""
    def load():
        from ..models.loader import load_model
        set_seed(seed)
        m = load_model(opts.model, device=opts.device, dtype=opts.dtype, ttt=opts.ttt, base=opts.base)
        say_model_notes(m)
        err(check_memory(m, 1, force))
        return m
    return load


def report_eval(res, json_out: bool, noun: str, table: tp.Callable[[], None]) -> tp.NoReturn:
    """The end of an eval command: warnings, Ctrl-C (130, with how to resume), the `--json` object or the
    table (`table()` prints it), the skipped inputs, and the exit code.

    Args:
        res: the protocol's result (`results`, `out`, `files`, `failed`, `interrupted`, `exit_code`,
            `documents_done`/`documents_total`, `warnings`).
        noun: what a unit of the dataset is called ("document", "recording").
    """
    for w in res.warnings:
        warn(w)
    payload = {**res.results, "out": str(res.out), "files": res.files, "failed": res.failed}
    if res.interrupted:
        fail(130, f"interrupted: {res.documents_done} of {res.documents_total} {noun}(s) finished and kept "
                  f"(results.json says so). Run the same command with --resume to continue.",
             "run the same command with --resume", json_out, {**payload, "exit_code": 130})
    if json_out:
        print_json({**payload, "exit_code": res.exit_code,
                    **inputs_error(res.exit_code, f"{len(res.failed)} input(s) skipped: " + "; ".join(res.failed))})
    else:
        table()
        if res.failed:
            err(f"{len(res.failed)} input(s) skipped:")
            for f in res.failed:
                err(f"  {f}")
    raise typer.Exit(res.exit_code)


def say_model_notes(m) -> None:
    """What loading said about the model (where a fork checkpoint's files came from, warnings), once."""
    for note in m.notes:
        err(note)
    for note in m.warnings:
        warn(note)


def print_json(obj: tp.Any) -> None:
    """The one JSON object of a command on stdout (paths with undecodable bytes shown with U+FFFD)."""
    from ..distributed import quiet
    from ..outputs import shown
    if quiet():  # under torchrun, rank 0 prints the job's one object
        return
    sys.stdout.write(shown(json.dumps(obj, indent=2, ensure_ascii=False, default=str)) + "\n")
    sys.stdout.flush()


def print_table(title: str, columns: list[str], rows: list[list[tp.Any]]) -> None:
    """A rich table on stderr."""
    from rich.console import Console
    from rich.table import Table
    from ..distributed import quiet
    if quiet():
        return
    t = Table(title=title)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in r])
    Console(stderr=True).print(t)


def set_seed(seed: int) -> None:
    from ..seed import set_seed as _set_seed
    _set_seed(seed)


def check_memory(m, streams: int, force: bool) -> str:
    """Estimates per-stream fast-weight memory, says it on stderr, refuses what cannot fit (unless --force)."""
    from ..fastweights.attach import ttt_layers
    from ..errors import ConfigError
    layers = ttt_layers(m.lm)
    per = sum(l.state_bytes_per_stream() for l in layers.values())
    need = per * streams
    parts = " + ".join(l.memory_formula() for l in layers.values()) or "0"
    if m.device.startswith("cuda"):
        import torch
        free, _ = torch.cuda.mem_get_info()
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    msg = (f"fast-weight memory: {per / 2**20:.1f} MiB per stream (Σ layers: {parts} bytes) "
           f"x {streams} stream(s) = {need / 2**20:.1f} MiB; {free / 2**20:.0f} MiB free on {m.device}.")
    if need > free and not force:
        raise ConfigError(msg + " That does not fit: lower --batch-size, use fewer TTT layers, or pass --force.")
    return msg
