"""Options, parsing and error handling shared by every command (SPEC §5). Imports stay light."""

from __future__ import annotations

import enum
import functools
import json
import os
import sys
import typing as tp
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


class DType(str, enum.Enum):
    auto = "auto"
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


ModelOpt = Annotated[str, typer.Option("--model", "-m", help="tiny | tiny-stt | bench | a checkpoint directory | "
                                       "a hub id org/name[@rev]. Default: kyutai/moshiko-pytorch-bf16.")]
DeviceOpt = Annotated[Device, typer.Option("--device", help="auto = cuda if available.")]
DTypeOpt = Annotated[DType, typer.Option("--dtype", help="auto = bf16 on cuda, fp32 on cpu.")]
TTTOpt = Annotated[bool, typer.Option("--ttt/--no-ttt", help="--no-ttt freezes fast weights at W0 (the baseline).")]
TTTLrOpt = Annotated[tp.Optional[float], typer.Option("--ttt-lr", help="Override the fast-weight learning rate.")]
TTTChunkOpt = Annotated[tp.Optional[int], typer.Option("--ttt-chunk-size", help="Override the chunk size (steps).")]
TTTLayersOpt = Annotated[tp.Optional[str], typer.Option("--ttt-layers", help="0,6,12 | every:6 | every:6@3.")]
TTTClipOpt = Annotated[tp.Optional[str], typer.Option("--ttt-clip", help="Override the delta clip (Frobenius "
                                                      "norm of each chunk's update): none | a number > 0.")]
BaseOpt = Annotated[tp.Optional[str], typer.Option("--base", help="For a fine-tuning fork (moshi_in_place) checkpoint: "
                                                   "the base model its missing files (LM weights, Mimi, tokenizer) "
                                                   "come from. Any --model source; default "
                                                   "kyutai/moshiko-pytorch-bf16.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the machine-readable result on stdout, nothing else.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace existing outputs.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Run even if the fast-weight memory estimate does not fit.")]


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
    """Maps TTTError to a one-paragraph message and its exit code; tracebacks only with --debug."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from ..errors import TTTError
        debug = kwargs.get("debug", False)
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except TTTError as e:
            if debug:
                raise
            err(f"error: {e}")
            raise typer.Exit(e.exit_code)
        except KeyboardInterrupt:
            err("interrupted.")
            raise typer.Exit(130)
    return wrapper


def err(msg: str) -> None:
    """A message on stderr (never stdout: --json owns stdout)."""
    from rich.console import Console
    Console(stderr=True, highlight=False, soft_wrap=True).print(msg, markup=False)


def say_model_notes(m) -> None:
    """What loading said about the model (where a fork checkpoint's files came from, warnings), once."""
    for note in m.notes:
        err(note)
    for note in m.warnings:
        err(f"warning: {note}")


def print_json(obj: tp.Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")
    sys.stdout.flush()


def print_table(title: str, columns: list[str], rows: list[list[tp.Any]]) -> None:
    """A rich table on stderr."""
    from rich.console import Console
    from rich.table import Table
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
    parts = " + ".join(f"{l.dim}x{l.hidden}x4" for l in layers.values()) or "0"
    if m.device.startswith("cuda"):
        import torch
        free, _ = torch.cuda.mem_get_info()
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    msg = (f"fast-weight memory: {per / 2**20:.1f} MiB per stream (Σ layers d·h·4 bytes + pending chunk: {parts} ...) "
           f"x {streams} stream(s) = {need / 2**20:.1f} MiB; {free / 2**20:.0f} MiB free on {m.device}.")
    if need > free and not force:
        raise ConfigError(msg + " That does not fit: lower --batch-size, use fewer TTT layers, or pass --force.")
    return msg
