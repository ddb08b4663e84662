"""Small helpers shared across the package."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def exists(value: Any) -> bool:
    return value is not None


def default(value: Any, fallback: Any) -> Any:
    return value if exists(value) else fallback


def as_numpy(value: Any) -> np.ndarray:
    """numpy view of a numpy array or a (possibly GPU) torch tensor."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)
