"""Fast-weight layers attached to moshi: the interface every variant implements, the variants, attaching.

Knows no files and no commands: checkpoints (`ttt_cli.models`) and snapshots (`ttt_cli.state`) build on it.
"""

from .interface import FastWeightLayer
from .attach import attach_ttt, set_ttt_lr, ttt_layers

__all__ = ["FastWeightLayer", "attach_ttt", "set_ttt_lr", "ttt_layers"]
