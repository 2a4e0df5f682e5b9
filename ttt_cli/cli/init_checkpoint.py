"""`ttt init-checkpoint`: write a loadable TTT checkpoint directory (SPEC §5.4)."""

from __future__ import annotations

import enum
import typing as tp
from pathlib import Path
from typing import Annotated

import typer

from .common import DebugOpt, JsonOpt, OverwriteOpt, err, handle_errors, print_json


class TargetInit(str, enum.Enum):
    ntp = "ntp"
    zero = "zero"


class Preset(str, enum.Enum):
    tiny = "tiny"
    tiny_stt = "tiny-stt"
    bench = "bench"


def init_checkpoint_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write.")],
    source: Annotated[tp.Optional[str], typer.Option("--from", help="Base checkpoint: directory or hub id.")] = None,
    preset: Annotated[tp.Optional[Preset], typer.Option("--preset", help="Built-in offline preset.")] = None,
    layers: Annotated[tp.Optional[str], typer.Option("--layers", help="0,6,12 | every:6 | every:6@3.")] = None,
    target_init: Annotated[TargetInit, typer.Option("--target-init", help="ntp: next-token target; zero: W_target=0.")] = TargetInit.ntp,
    chunk_size: Annotated[tp.Optional[int], typer.Option("--chunk-size")] = None,
    lr: Annotated[tp.Optional[float], typer.Option("--lr")] = None,
    conv_kernel_size: Annotated[tp.Optional[int], typer.Option("--conv-kernel-size")] = None,
    conv_padding: Annotated[tp.Optional[str], typer.Option("--conv-padding", help="right | center")] = None,
    target_source: Annotated[tp.Optional[str], typer.Option("--target-source", help="input | text")] = None,
    copy_base: Annotated[bool, typer.Option("--copy-base", help="Copy base weights instead of referencing them.")] = False,
    yarn_scale: Annotated[tp.Optional[float], typer.Option("--yarn-scale", help="Extend the attention context with "
                                                          "YaRN by this factor (writes `yarn_config`; context x S).")]
    = None,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Write a TTT checkpoint (config.json with a `ttt` section + ttt.safetensors) and verify it loads.

    Examples:

      ttt init-checkpoint --preset tiny --out ckpt/tiny-ttt

      ttt init-checkpoint --from kyutai/moshiko-pytorch-bf16 --layers every:6 --out ckpt/moshiko-ttt

      ttt init-checkpoint --preset tiny --yarn-scale 4 --out ckpt/tiny-yarn
    """
    from ..errors import ConfigError
    from ..models.init_checkpoint import init_checkpoint

    if (source is None) == (preset is None):
        raise ConfigError("give exactly one of --from SOURCE or --preset NAME.")
    src = preset.value if preset is not None else source
    section = {k: v for k, v in dict(chunk_size=chunk_size, lr=lr, conv_kernel_size=conv_kernel_size,
                                     conv_padding=conv_padding, target_source=target_source).items() if v is not None}
    res = init_checkpoint(src, out, layers=layers, target_init=target_init.value, section=section,
                          copy_base=copy_base, overwrite=overwrite, yarn_scale=yarn_scale)
    if json_out:
        print_json({"out": str(res.out), "source": res.model_id, "ttt": res.ttt, "files": res.files,
                    "target_init": res.target_init})
    else:
        err(f"wrote {res.out} from {res.model_id}: TTT layers {res.ttt['layers']}, chunk {res.ttt['chunk_size']}, "
            f"lr {res.ttt['lr']}, target {res.target_init}; files {', '.join(res.files)}; verified it loads.")


def register(app: typer.Typer) -> None:
    app.command("init-checkpoint")(handle_errors(init_checkpoint_cmd))
