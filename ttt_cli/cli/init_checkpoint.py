"""`ttt init-checkpoint`: write a loadable TTT checkpoint directory (SPEC §5.4)."""

from __future__ import annotations

import enum
import typing as tp
from pathlib import Path
from typing import Annotated

import typer

from .common import DebugOpt, JsonOpt, OverwriteOpt, Variant, err, handle_errors, print_json


class TargetInit(str, enum.Enum):
    ntp = "ntp"
    zero = "zero"


class Preset(str, enum.Enum):
    tiny = "tiny"
    tiny_stt = "tiny-stt"
    tiny_mlp = "tiny-mlp"
    tiny_adapter = "tiny-adapter"
    bench = "bench"


def init_checkpoint_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write.")],
    source: Annotated[tp.Optional[str], typer.Option("--from", help="Base checkpoint: directory or hub id.")] = None,
    preset: Annotated[tp.Optional[Preset], typer.Option("--preset", help="Built-in offline preset.")] = None,
    layers: Annotated[tp.Optional[str], typer.Option("--layers", help="0,6,12 | every:6 | every:6@3.")] = None,
    variant: Annotated[tp.Optional[Variant], typer.Option(
        "--variant", help="Fast-weight design: inplace (SPEC §3), mlp (TTT-MLP hybrid blocks, §3.10), "
                          "linear-adapter (TTT-Linear adapters, §3.11). Default: the source's.")] = None,
    target_init: Annotated[tp.Optional[TargetInit], typer.Option(
        "--target-init", help="inplace: fresh tensors with ntp = next-token target, or zero: W_target=0. Default: "
                              "the source's own TTT tensors where it has them (a preset writes itself), else ntp.")]
    = None,
    chunk_size: Annotated[tp.Optional[int], typer.Option("--chunk-size", help="Mini-batch (chunk) size in steps.")] = None,
    lr: Annotated[tp.Optional[float], typer.Option("--lr", help="The variant's rate: lr (inplace), base_lr (mlp), "
                                                                "lr_scale (linear-adapter).")] = None,
    num_heads: Annotated[tp.Optional[int], typer.Option("--num-heads", help="mlp: TTT heads (default: the layer's).")] = None,
    rank: Annotated[tp.Optional[int], typer.Option("--rank", help="linear-adapter: adapter rank r.")] = None,
    targets: Annotated[tp.Optional[str], typer.Option(
        "--targets", help="linear-adapter: comma-separated linears, e.g. self_attn.in_projs.0,gating.linear_out "
                          "(default: all four).")] = None,
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

    --preset P writes P itself (same config and TTT tensors: --model OUT loads as --model P); fresh
    fast-weight tensors come with another variant (--preset tiny --variant mlp), options that change
    the tensors (--rank, --targets, --num-heads, ...) or --target-init.

    Examples:

      ttt init-checkpoint --preset tiny --out ckpt/tiny-ttt

      ttt init-checkpoint --preset tiny --variant linear-adapter --rank 8 --out ckpt/tiny-adapter

      ttt init-checkpoint --from kyutai/moshiko-pytorch-bf16 --layers every:6 --out ckpt/moshiko-ttt

      ttt init-checkpoint --preset tiny --yarn-scale 4 --out ckpt/tiny-yarn
    """
    from ..errors import ConfigError
    if (source is None) == (preset is None):
        raise ConfigError("give exactly one of --from SOURCE or --preset NAME.")
    from ..models.init_checkpoint import init_checkpoint
    section = {k: v for k, v in dict(variant=variant.value if variant else None, chunk_size=chunk_size, lr=lr,
                                     conv_kernel_size=conv_kernel_size, conv_padding=conv_padding,
                                     target_source=target_source, num_heads=num_heads, rank=rank,
                                     targets=[t.strip() for t in targets.split(",") if t.strip()] if targets else None,
                                     ).items() if v is not None}
    res = init_checkpoint(preset.value if preset is not None else source, out, layers=layers,
                          target_init=target_init.value if target_init else None, section=section,
                          copy_base=copy_base, overwrite=overwrite, yarn_scale=yarn_scale)
    _report(res, json_out)


def _report(res, json_out: bool) -> None:
    """What was written: the `--json` object, or one line on stderr and the fast weights' origin."""
    if json_out:
        print_json({"out": str(res.out), "source": res.model_id, "ttt": res.ttt, "files": res.files,
                    "target_init": res.target_init, "ttt_tensors_from_source": res.source_layers,
                    "notes": res.notes})
        return
    from ..fastweights.config import config_class
    key = config_class(res.ttt["variant"]).rate_key
    err(f"wrote {res.out} from {res.model_id}: {res.ttt['variant']} TTT on layers {res.ttt['layers']}, chunk "
        f"{res.ttt['chunk_size']}, {key} {res.ttt[key]}; files {', '.join(res.files)}; verified it loads.")
    for note in res.notes:
        err(f"fast weights: {note}.")


def register(app: typer.Typer) -> None:
    app.command("init-checkpoint")(handle_errors(init_checkpoint_cmd))
