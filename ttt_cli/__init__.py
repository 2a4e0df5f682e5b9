"""ttt: Moshi with In-Place Test-Time Training (load_model, ttt_layers; see SPEC §5.0)."""

from . import timeline

timeline.mark("process")  # the first point of a run's timeline (scale-out's fixed costs are measured from it)

__version__ = "0.1.0"
__all__ = ["load_model", "ttt_layers", "__version__"]


def __getattr__(name):
    # Lazy (PEP 562), the one import-in-a-function of the library: the CLI imports this package first, and
    # `ttt --help` must not import torch; `ttt_cli.load_model` resolves on first use.
    if name == "load_model":
        from .models.loader import load_model
        return load_model
    if name == "ttt_layers":
        from .fastweights.attach import ttt_layers
        return ttt_layers
    raise AttributeError(name)
