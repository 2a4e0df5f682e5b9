"""The `ttt` command line: one module per command; heavy imports live inside command bodies."""

from __future__ import annotations

import typer
from typer.core import TyperGroup


def _click_exception() -> type:
    try:  # typer >= 0.20 vendors click
        from typer._click.exceptions import ClickException
    except ImportError:  # pragma: no cover - older typer on top of click
        from click.exceptions import ClickException
    return ClickException


class _Group(TyperGroup):
    """The top-level group: with --json, a usage error found by the parser (a missing argument, an
    invalid value, an unknown option) is also printed on stdout as `{"error": {...}}` (SPEC §7.1)."""

    def invoke(self, ctx):
        args = [*ctx._protected_args, *ctx.args]
        try:
            return super().invoke(ctx)
        except _click_exception() as e:
            if "--json" in args:
                from .common import print_json
                print_json({"error": {"code": e.exit_code, "message": e.format_message(),
                                      "hint": "see `ttt " + " ".join(a for a in args[:2] if not a.startswith("-"))
                                              + " --help`"}})
            raise


app = typer.Typer(
    name="ttt", cls=_Group, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Moshi with In-Place Test-Time Training: streaming inference, long-context eval, fast-weight state.\n\n"
         "Examples:\n\n  ttt infer examples/hello.wav --model tiny --out out/\n\n"
         "  ttt eval librilight DATA --model tiny -p document -p off --out results/\n\n"
         "  ttt export-state examples/hello.wav --model tiny --out state.safetensors",
)


def versions() -> dict[str, str]:
    """The tool's, moshi's and torch's versions (SPEC §5): those this process imports (torch's with its
    build tag, e.g. +cu128), which is what runs; an import failure is said instead of a version."""
    import importlib
    from .. import __version__

    out = {"ttt": __version__}
    for name in ("moshi", "torch"):
        try:
            out[name] = str(importlib.import_module(name).__version__)
        except Exception as e:  # a broken install is what --version is asked about
            out[name] = f"not importable ({type(e).__name__}: {e})"
    return out


def _print_version(value: bool) -> None:
    if value:
        v = versions()
        typer.echo(f"ttt {v['ttt']} (moshi {v['moshi']}, torch {v['torch']})")
        raise typer.Exit(0)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                       help="Print the versions of ttt, moshi and torch, and exit.")) -> None:
    """Moshi with In-Place Test-Time Training."""
    import warnings
    from ..errors import LoadWarning
    warnings.filterwarnings("ignore", category=LoadWarning)  # commands print TTTModel.warnings themselves


def _register() -> None:
    from . import bench, eval, infer, init_checkpoint, state
    for mod in (infer, eval, state, init_checkpoint, bench):
        mod.register(app)


_register()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
