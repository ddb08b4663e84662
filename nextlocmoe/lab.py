"""Evaluation-time experiments on a trained model, for the lab (README, "A 90-minute lab"): change one thing of a
loaded model without retraining it, measure what changes on the same windows.

    with routing_threshold(model, 0.5):      threshold routing keeps experts until 0.5 of the gate mass (not 0.8)
    with next_visit_time_off(model):         the copy mixture's time-closeness term set to zero (recency only)
    copy_gates(model, windows, "test")       each window's copy probability g (ranking head with the copy mixture)

Each context manager restores the model on exit, so the same loaded model serves every exercise. Compare two
settings with `evaluation.rank_split` on the same windows and `metrics.paired_comparison` (not two intervals).
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch

from .data.windows import Windows
from .errors import ConfigError
from .evaluation import move_batch, ordered_loader


@contextmanager
def routing_threshold(model, threshold: float) -> Iterator[None]:
    """Every Personalized MoE layer routes with `threshold` (cumulative gate probability, (0, 1]) while inside."""
    if not 0.0 < float(threshold) <= 1.0:
        raise ConfigError(f"threshold={threshold!r} is invalid; expected a probability in (0, 1]")
    layers = list(model.personalized_moe.values())
    if not layers:
        raise ConfigError("this model has no Personalized MoE layer (model.use_personalized_moe=false)")
    if any(layer.cfg.routing != "threshold" for layer in layers):
        raise ConfigError("routing_threshold needs threshold routing (model.personalized.routing='threshold')")
    saved = [layer.cfg for layer in layers]
    try:
        for layer in layers:
            layer.cfg = dataclasses.replace(layer.cfg, threshold=float(threshold))
        yield
    finally:
        for layer, cfg in zip(layers, saved):
            layer.cfg = cfg


@contextmanager
def next_visit_time_off(model) -> Iterator[None]:
    """The copy mixture's time-closeness term (hour precision, same-weekday and same-day-type bonuses) is zero
    while inside: the copy attention then weighs the window's visits by recency alone (docs/design.md §3.9)."""
    pointer = getattr(model, "pointer", None)
    if pointer is None or not pointer.time_terms:
        raise ConfigError("this model has no time term in its copy mixture (ranking head with model.next_visit_time)")
    names = ("hour_precision", "same_weekday_bonus", "same_daytype_bonus")
    saved = {n: getattr(pointer, n).detach().clone() for n in names}
    try:
        with torch.no_grad():
            for n in names:
                getattr(pointer, n).zero_()
        yield
    finally:
        with torch.no_grad():
            for n in names:
                getattr(pointer, n).copy_(saved[n])


@torch.no_grad()
def copy_gates(model, windows: Windows, split: str = "test", batch_size: int = 64,
               max_windows: int | None = None) -> np.ndarray:
    """(N,) the copy probability g of each window of `split` (in stored order; the first `max_windows`)."""
    if getattr(model, "pointer", None) is None:
        raise ConfigError("this model has no copy mixture (ranking head with model.ranking_pointer)")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    gates = []
    for batch in ordered_loader(windows, split, batch_size):
        if max_windows is not None and sum(len(g) for g in gates) >= max_windows:
            break
        out = model(move_batch(batch, device), return_intermediates=True)
        gates.append(out.intermediates["copy_gate"].float().reshape(-1).cpu().numpy())
    model.train(was_training)
    gates = np.concatenate(gates) if gates else np.zeros(0)
    return gates if max_windows is None else gates[:max_windows]
