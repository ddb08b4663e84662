"""Evaluation of a NextLocMoE-class model on one split (paper Sec. 5.1 metrics), and the batch loader."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .data.windows import Windows, WindowDataset, identity_collate
from .metrics import CandidateIndex, Ranked, rank_predictions


def move_batch(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def ordered_loader(windows: Windows, split: str, batch_size: int) -> torch.utils.data.DataLoader:
    """Batches of one split in stored order: what evaluation reads (training's seeded order and periods are
    `train.epoch_loader` / `train.period_indices`)."""
    return torch.utils.data.DataLoader(WindowDataset(windows, split), batch_size=batch_size, shuffle=False,
                                       collate_fn=identity_collate, num_workers=0)


def evaluate(model, windows: Windows, split: str, batch_size: int = 64, device: torch.device | None = None,
             desc: str | None = None) -> dict[str, float]:
    """Hit@k, MRR, NDCG@k and distance error of `model` on one split (docs/design.md §3.7)."""
    return rank_split(model, windows, split, batch_size, device, desc).metrics()


@torch.no_grad()
def rank_split(model, windows: Windows, split: str, batch_size: int = 64, device: torch.device | None = None,
               desc: str | None = None, max_windows: int | None = None) -> Ranked:
    """The rank of the true location, the top-1 candidate and the distance error of every window of one split,
    in stored order (what `evaluate` summarises; paired tests compare two methods window by window).

    Regression head: the predicted point is matched to candidates by a KD-tree (rank = position of the true
    location among candidates ordered by distance). Ranking head: candidates ordered by score.
    max_windows: only the first windows of the split, computed in the same batches as the whole split (so on the
    same machine their ranks are bit-identical to the whole split's first ranks).
    """
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    loader = ordered_loader(windows, split, batch_size)
    ranked, points, targets, targets_xy = [], [], [], []
    seen = 0
    for batch in tqdm(loader, desc=desc or f"eval {split}", leave=False, disable=None):
        if max_windows is not None and seen >= max_windows:
            break
        seen += len(batch["target_location"])
        batch = move_batch(batch, device)
        out = model(batch)
        if out.scores is not None:   # ranking head: ranked batch by batch, memory stays at (batch, L)
            ranked.append(rank_predictions(windows.candidates, batch["target_location"].cpu(),
                                           batch["target_xy"].cpu(), scores=out.scores.float().cpu()))
        else:                        # regression head: every point, then one KD-tree pass
            points.append(out.pred_xy.float().cpu().double())
            targets.append(batch["target_location"].cpu())
            targets_xy.append(batch["target_xy"].cpu().double())
    if points:
        ranked = [rank_predictions(CandidateIndex(windows.candidates), torch.cat(targets), torch.cat(targets_xy),
                                   points=torch.cat(points))]
    model.train(was_training)
    ranked = Ranked.concat(ranked)
    return ranked if max_windows is None else ranked.first(max_windows)
