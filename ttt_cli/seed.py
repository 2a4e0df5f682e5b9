"""One seed for every random generator a run touches (python, numpy, torch CPU and CUDA)."""

from __future__ import annotations

import random

import numpy as np
import torch


def set_seed(seed: int) -> None:
    """Seeds python's `random`, numpy and torch (all devices).

    Args:
        seed: the seed, 0 .. 2**32 - 1.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
