"""Evaluation of a NextLocMoE-class model on one split (paper Sec. 5.1 metrics), and the batch loader."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .data.windows import Windows, WindowDataset, identity_collate
from .metrics import CandidateIndex, Ranked, rank_predictions


def move_batch(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def epoch_loader(windows: Windows, split: str, batch_size: int, seed: int | None,
                 indices: list[int] | None = None) -> torch.utils.data.DataLoader:
    """Batches of one pass over a split; with a seed, the order is a permutation drawn from (seed) only;
    `indices` gives the windows and their order explicitly (a training period, `period_indices`)."""
    dataset = WindowDataset(windows, split)
    if indices is not None:
        sampler = list(indices)
    elif seed is None:
        sampler = range(len(dataset))
    else:
        g = torch.Generator().manual_seed(seed)
        sampler = torch.randperm(len(dataset), generator=g).tolist()
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                                       collate_fn=identity_collate, num_workers=0)


def period_indices(n: int, per_period: int, period: int, seed: int) -> list[int]:
    """Windows of training period `period` (0-based) when each period takes the next `per_period` windows of a
    stream of passes over n windows, pass p in the order torch.randperm(n) draws from seed * 100_003 + p.

    Periods tile the stream: pass p is used up before pass p + 1 begins, so every window is seen once per pass
    and a budget of n windows in periods of n / 3 gives three validation points on three disjoint thirds."""
    start, stop = period * per_period, (period + 1) * per_period
    out: list[int] = []
    for p in range(start // n, (stop - 1) // n + 1):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + p)).tolist()
        lo, hi = max(start - p * n, 0), min(stop - p * n, n)
        out.extend(order[lo:hi])
    return out


@torch.no_grad()
def evaluate(model, windows: Windows, split: str, batch_size: int = 64, device: torch.device | None = None,
             desc: str | None = None) -> dict[str, float]:
    """Hit@k, MRR, NDCG@k and distance error of `model` on one split (docs/design.md §3.7).

    Regression head: the predicted point is matched to candidates by a KD-tree (rank = position of the true
    location among candidates ordered by distance). Ranking head: candidates ordered by score.
    """
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    loader = epoch_loader(windows, split, batch_size, seed=None)
    index = CandidateIndex(windows.candidates)
    ranked, points, targets, targets_xy = [], [], [], []
    for batch in tqdm(loader, desc=desc or f"eval {split}", leave=False, disable=None):
        batch = move_batch(batch, device)
        out = model(batch)
        if out.scores is not None:   # ranking head: ranked batch by batch, memory stays at (batch, L)
            ranked.append(rank_predictions(index, batch["target_location"].cpu(), batch["target_xy"].cpu(),
                                           scores=out.scores.float().cpu()))
        else:                        # regression head: every point, then one KD-tree pass
            points.append(out.pred_xy.float().cpu().double())
            targets.append(batch["target_location"].cpu())
            targets_xy.append(batch["target_xy"].cpu().double())
    if points:
        ranked = [rank_predictions(index, torch.cat(targets), torch.cat(targets_xy), points=torch.cat(points))]
    model.train(was_training)
    return Ranked.concat(ranked).metrics()
