"""The `ttt` command line: one module per command; heavy imports live inside command bodies."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="ttt", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Moshi with In-Place Test-Time Training: streaming inference, long-context eval, fast-weight state.\n\n"
         "Examples:\n\n  ttt infer examples/hello.wav --model tiny --out out/\n\n"
         "  ttt eval librilight DATA --model tiny -p document -p off --out results/\n\n"
         "  ttt export-state examples/hello.wav --model tiny --out state.safetensors",
)


@app.callback()
def _root() -> None:
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
