"""Training and evaluation of NextLocMoE on `accelerate` (one CPU, one GPU, or several with `accelerate launch`).

The loop follows the reference training recipe (docs/design.md §3.8): Adam with weight decay 0.01,
ReduceLROnPlateau on validation Hit@10 (factor 0.5, patience 2), gradient clipping and accumulation, bf16
on GPU, best checkpoint by validation Hit@10. Two things the reference leaves to chance are fixed here:

- the test split is evaluated with the BEST checkpoint, reloaded from disk, never with the last epoch;
- a run can be interrupted and resumed (`resume=True`): checkpoints are written atomically at the end of
  every epoch, and each epoch's data order and dropout draws depend only on (seed, epoch), so a resumed run
  reaches the same final metrics as an uninterrupted one on CPU.

A non-finite loss stops the run with a clear message; the last good checkpoint is left untouched.

The untrained model is validated too, before the first period ("epoch 0" of the history): it is the first
point of every validation curve and a candidate for the best checkpoint, so a run whose training never beats
its start tests its start (the ranking head starts at the tuned training-free window_time scorer, the offset
regression head at the current place: docs/design.md §3.6, §3.9), and says so with best_epoch = 0.

Several processes (`accelerate launch`, or `ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N` on CPUs) each
train on their shard of every epoch's batches (data parallel: a global batch of N x train.batch_size); only the
main process writes the run directory and prints, and validation / test run once, on the main process, whose
metrics every process receives (`evaluate_once`). README gives the tested commands.

`train()` reads as four steps, the way a torchtune recipe does: `_setup` (data, model, optimiser, resume),
`_train_period` (one epoch, or one period of `train.windows_per_epoch` windows), `_end_period` (validate,
scheduler, history, checkpoints, early-stopping count) and `_finish` (test the best checkpoint, write the run's
files); before each period `_stops_before` applies early stopping and `stop_after_epochs`. What they share is
one `_Run`; what is checkpointed in last.pt is its `state` dict, unchanged in layout.
The training data order (`epoch_loader`, `period_indices`) lives here too: evaluation reads splits in stored
order and needs none of it.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from tqdm.auto import tqdm

from .baselines import Popularity
from .config import ExperimentConfig, config_hash, training_dict
from .data.prepare import prepare
from .data.windows import WindowDataset, Windows, identity_collate
from .errors import NextLocMoEError
from .evaluation import evaluate, rank_split
from .metrics import Ranked
from .io import atomic_path, check_writable, provenance, remove_stale_temps, write_json_atomic, write_text_atomic
from .model import build_model
from .runs import (WEIGHTS_FILE, limited, load_checkpoint, load_run, load_trainable_state, save_checkpoint,
                   save_weights, trainable_state)
from .runtime import pick_device, resolve_mixed_precision
from .window_scorers import make_scorer

TIME_PRIOR_SCORER = "window_time"   # the tuned scorer whose parameters start the copy mixture's time term
SELECTION_METRIC = "hit@10"  # reference: best checkpoint by validation Hit@10


class TrainingDiverged(NextLocMoEError):
    """The loss became NaN or infinite."""


@dataclass
class TrainResult:
    out_dir: Path
    best_epoch: int                 # 1-based epoch whose checkpoint produced the test metrics; 0 = the untrained start
    val: dict[str, float]           # validation metrics of the best checkpoint
    test: dict[str, float]          # test metrics of the best checkpoint
    history: pd.DataFrame           # one row per epoch: train loss parts, validation metrics, lr, seconds
    wall_s: float


# ---------------------------------------------------------------------------------------------------
# training data order

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


# ---------------------------------------------------------------------------------------------------
# training

def _training_part(config: dict[str, Any]) -> dict[str, Any]:
    """The data, model and train sections of a stored config dict (what decides the run; not plan or name)."""
    return training_dict(ExperimentConfig.from_dict(config))


def evaluate_once(accelerator: Accelerator, model, windows: Windows, split: str, batch_size: int,
                  desc: str) -> Ranked:
    """Rank one split on the main process only and hand the result to every process (several processes would
    otherwise each evaluate the whole split); one process: a plain `rank_split`."""
    ranked = [rank_split(model, windows, split, batch_size, device=accelerator.device, desc=desc)
              if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(ranked, from_process=0)
    return ranked[0]


@dataclass
class _Run:
    """What the steps of one `train()` call share. Only `state` is checkpointed (last.pt), so a resumed run
    rebuilds everything else from the config and continues from `state`."""
    cfg: ExperimentConfig
    out_dir: Path
    accelerator: Accelerator
    windows: Windows                # already limited to the config's subsample (`runs.limited`)
    model: torch.nn.Module          # as `accelerator.prepare` returned it (possibly wrapped)
    params: list[torch.nn.Parameter]    # the trainable ones: optimised and gradient-clipped
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau
    # epoch (periods done), best_metric, best_epoch, bad_epochs, history (one row per period) and steps (one
    # row per training batch: loss parts, routing entropies); its keys and layout are last.pt's
    state: dict[str, Any]
    # tqdm's `disable`: True hides the bars (every process but the main one); None leaves it to tqdm, which
    # shows them when stderr is a terminal. Not `False`: that would force bars into logs and notebooks.
    hide_bars: bool | None
    started: float                  # time.perf_counter() when train() was called (TrainResult.wall_s)

    @property
    def last_path(self) -> Path:
        return self.out_dir / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.out_dir / "best.pt"

    def kept_checkpoint(self) -> str:
        """Where the last good checkpoint is, for a divergence message."""
        return str(self.last_path) if self.last_path.exists() else "none (first epoch)"


@dataclass
class _Period:
    """What one training period hands to `_end_period`."""
    epoch: int                      # 0-based
    started: float                  # time.perf_counter() at its start (history's seconds include validation)
    train_means: dict[str, float]   # mean of each loss part over the period's batches


NO_DECAY_SUFFIX = ".parametrizations.weight.original1"   # a weight-normalised layer's direction v (w = g v/||v||)


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The trainable parameters in two optimiser groups: with `weight_decay` (Adam's L2 term), and without it for
    the directions v of weight-normalised layers (the history router's TCN). The layer uses v / ||v||, so decay
    cannot change its function, only shrink v: after a few thousand steps ||v|| reached ~1e-20 and the forward
    pass divided 0 by 0 (the NaN that stopped a long New York run). Their magnitudes g keep the decay."""
    decay, free = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (free if name.endswith(NO_DECAY_SUFFIX) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": free, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _setup(cfg: ExperimentConfig, out_dir: Path, resume: bool, windows: Windows | None,
           started: float) -> _Run:
    """Data, model (ranking head at popularity, copy gate at the repeat rate, copy attention's time term at the
    tuned window_time scorer chosen on validation), optimiser and scheduler, then last.pt's state when resuming. The order of the random draws is fixed: seeding comes right before the model
    is built, so the same config builds the same model whether or not it resumes."""
    tc = cfg.train
    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(tc.mixed_precision),
                              gradient_accumulation_steps=tc.grad_accum)
    main = accelerator.is_main_process
    if main:
        check_writable(out_dir, "run directory")
        remove_stale_temps(out_dir)          # one writer per run directory: any temp file here is a killed write
    if windows is None:
        windows = prepare(cfg.data)
    windows = limited(windows, cfg)

    torch.manual_seed(tc.seed)
    model = build_model(cfg.model, windows.stats, windows.candidates, windows.candidate_function,
                        windows.history + windows.current)
    model.set_popularity_prior(Popularity("targets").fit(windows).counts)   # ranking head: starts at popularity
    if cfg.model.pointer_gate_init == "repeat_rate":                        # copy gate: at the repeat rate
        model.set_copy_rate(windows.repeat_rate("train"))
    resuming = resume and (out_dir / "last.pt").exists()
    if model.uses_time_prior and not resuming:
        # time terms: the tuned scorer's parameters (a resumed run loads its trained ones from last.pt instead)
        model.set_time_prior(make_scorer(TIME_PRIOR_SCORER).fit(windows).weights)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(decay_groups(model, tc.weight_decay), lr=tc.lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=tc.plateau_factor,
                                                           patience=tc.plateau_patience)
    model, optimizer = accelerator.prepare(model, optimizer)

    run = _Run(cfg, out_dir, accelerator, windows, model, params, optimizer, scheduler,
               state=dict(epoch=0, best_metric=-math.inf, best_epoch=0, bad_epochs=0, history=[], steps=[],
                          train_windows=0),
               hide_bars=None if main else True, started=started)
    if resuming:
        _resume(run)
    if main:
        write_text_atomic(out_dir / "config.yaml", cfg.to_yaml())
    return run


def _resume(run: _Run) -> None:
    """Load last.pt into the run: trainable weights, optimiser, scheduler and state (a different config refuses)."""
    ckpt = load_checkpoint(run.last_path)
    if _training_part(ckpt["config"]) != training_dict(run.cfg):
        raise NextLocMoEError(f"--resume: {run.last_path} was written by a different config; "
                              "use a new output directory or the same config")
    load_trainable_state(run.accelerator.unwrap_model(run.model), ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    run.state = ckpt["state"]
    run.accelerator.print(f"resumed from {run.last_path.name}: {run.state['epoch']} epoch(s) done")


def _stops_before(run: _Run, epoch: int, stop_after_epochs: int | None) -> bool:
    """Whether no period `epoch` is trained: patience used up (checked before the period, so a run resumed after
    it had stopped early trains no further) or the interruption `stop_after_epochs` asks for."""
    if run.state["bad_epochs"] >= run.cfg.train.early_stop_patience:
        run.accelerator.print(f"early stop: no better validation {SELECTION_METRIC} for "
                              f"{run.state['bad_epochs']} epochs")
        return True
    return stop_after_epochs is not None and epoch >= stop_after_epochs


def _train_period(run: _Run, epoch: int) -> _Period:
    """One epoch (or one period of `train.windows_per_epoch` windows) of optimiser steps; every batch's loss
    parts are appended to state["steps"]. A non-finite loss or gradient raises TrainingDiverged before the
    optimiser applies it."""
    tc, accelerator, model = run.cfg.train, run.accelerator, run.model
    started = time.perf_counter()
    # Data order and dropout depend only on (seed, epoch): resuming reproduces them exactly.
    torch.manual_seed(tc.seed * 100_003 + epoch)
    if tc.windows_per_epoch is None:
        loader = epoch_loader(run.windows, "train", tc.batch_size, seed=tc.seed * 100_003 + epoch)
    else:   # a validation period: the next windows_per_epoch windows of a stream of seeded passes
        indices = period_indices(run.windows.n_windows("train"), tc.windows_per_epoch, epoch, tc.seed)
        loader = epoch_loader(run.windows, "train", tc.batch_size, seed=None, indices=indices)
    loader = accelerator.prepare(loader)
    model.train()
    sums: dict[str, float] = {}
    n_batches = n_windows = 0
    bar = tqdm(loader, desc=f"epoch {epoch + 1}", leave=False, disable=run.hide_bars)
    for step, batch in enumerate(bar):
        with accelerator.accumulate(model):
            out = model(batch)
            loss, parts = accelerator.unwrap_model(model).loss(out, batch)
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"loss became {loss.item()} at epoch {epoch + 1}, step {step + 1} (parts: "
                    f"{ {k: float(v) for k, v in parts.items()} }); the last good checkpoint is kept at "
                    f"{run.kept_checkpoint()}. Try a lower train.lr.")
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                # A finite loss can still have non-finite gradients; one such step would corrupt every
                # parameter it touches, so stop before the optimizer applies it.
                grad_norm = accelerator.clip_grad_norm_(run.params, tc.clip_norm if tc.clip_norm else math.inf)
                if grad_norm is not None and not torch.isfinite(torch.as_tensor(grad_norm)):
                    raise TrainingDiverged(
                        f"gradients became non-finite (norm {float(grad_norm)}) at epoch {epoch + 1}, step "
                        f"{step + 1} although the loss was {loss.item():.6g}; the last good checkpoint is kept "
                        f"at {run.kept_checkpoint()}. Try a lower train.lr or train.mixed_precision=no.")
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
        values = {k: float(v) for k, v in parts.items()}
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
        run.state["steps"].append({"epoch": epoch + 1, "step": len(run.state["steps"]) + 1, **values})
        n_batches += 1
        n_windows += len(batch["target_location"])
        bar.set_postfix(loss=f"{loss.item():.4g}")
    run.state["train_windows"] = run.state.get("train_windows", 0) + n_windows * accelerator.num_processes
    return _Period(epoch, started, {k: v / max(n_batches, 1) for k, v in sums.items()})


def _end_period(run: _Run, period: _Period | None) -> None:
    """Validate, step the scheduler, append the history row, count a period without improvement (early
    stopping, `_stops_before`), save best.pt when validation Hit@10 improved and last.pt always. `period=None`
    validates the untrained start (history's epoch 0: no training parts, 0 training windows)."""
    accelerator, state = run.accelerator, run.state
    done = 0 if period is None else period.epoch + 1          # periods trained so far
    started = time.perf_counter() if period is None else period.started
    unwrapped = accelerator.unwrap_model(run.model)
    val = evaluate_once(accelerator, unwrapped, run.windows, "val", run.cfg.train.eval_batch_size,
                        desc="val start" if period is None else f"val {done}").metrics()
    run.scheduler.step(val[SELECTION_METRIC])
    train_means = {} if period is None else period.train_means
    row = {"epoch": done, "train_windows": state.get("train_windows", 0),
           **{f"train_{k}": v for k, v in train_means.items()},
           **{f"val_{k}": v for k, v in val.items()}, "lr": run.optimizer.param_groups[0]["lr"],
           "seconds": time.perf_counter() - started}
    state["history"].append(row)
    state["epoch"] = done
    if val[SELECTION_METRIC] > state["best_metric"]:
        state.update(best_metric=val[SELECTION_METRIC], best_epoch=done, bad_epochs=0)
        if accelerator.is_main_process:
            save_checkpoint(run.best_path, {"model": trainable_state(unwrapped), "epoch": done, "val": val})
    else:
        state["bad_epochs"] += 1
    if accelerator.is_main_process:
        save_checkpoint(run.last_path, {"model": trainable_state(unwrapped), "optimizer": run.optimizer.state_dict(),
                                        "scheduler": run.scheduler.state_dict(), "state": state,
                                        "config": run.cfg.to_dict()})
    accelerator.print(f"epoch {done}{' (untrained start)' if period is None else ''}: " + ", ".join(
        f"{k}={v:.4g}" for k, v in row.items()
        if k.startswith(("train_loss", "val_hit", "val_mrr")) and not k.endswith(("_lo", "_hi"))) + _pace(run, row))
    accelerator.wait_for_everyone()


def _pace(run: _Run, row: dict[str, Any]) -> str:
    """" | 13.1 windows/s, ~2.4 min left": this period's training windows per second (its validation included)
    and the periods left at that pace (an upper bound when early stopping ends the run sooner)."""
    history = run.state["history"]
    if len(history) < 2:
        return ""
    windows = row["train_windows"] - history[-2]["train_windows"]
    left = (run.cfg.train.epochs - row["epoch"]) * row["seconds"]
    return f" | {windows / max(row['seconds'], 1e-9):.1f} windows/s, ~{left / 60:.1f} min left"


def _finish(run: _Run, stop_after_epochs: int | None) -> TrainResult:
    """Test the best checkpoint, reloaded from disk (never the last epoch by accident), and write history.csv,
    steps.csv and metrics.json. A run interrupted by `stop_after_epochs` returns its history only."""
    tc, accelerator, state = run.cfg.train, run.accelerator, run.state
    history = pd.DataFrame(state["history"])
    if stop_after_epochs is not None and state["epoch"] < tc.epochs and state["bad_epochs"] < tc.early_stop_patience:
        return TrainResult(run.out_dir, state["best_epoch"], {}, {}, history, time.perf_counter() - run.started)
    if not run.best_path.exists():
        raise NextLocMoEError(f"no best checkpoint in {run.out_dir}: train.epochs={tc.epochs} ran no epoch")

    accelerator.wait_for_everyone()      # best.pt is written by the main process
    best = load_checkpoint(run.best_path)
    unwrapped = accelerator.unwrap_model(run.model)
    load_trainable_state(unwrapped, best["model"])
    ranked = evaluate_once(accelerator, unwrapped, run.windows, "test", tc.eval_batch_size, desc="test")
    test = ranked.metrics()
    wall = time.perf_counter() - run.started
    if accelerator.is_main_process:
        with atomic_path(run.out_dir / "history.csv") as tmp:
            history.to_csv(tmp, index=False)
        with atomic_path(run.out_dir / "steps.csv") as tmp:
            pd.DataFrame(state.get("steps", [])).to_csv(tmp, index=False)
        stamp = provenance(run.cfg.profile, seed=tc.seed, data_checksum=run.windows.meta.get("checksum"), wall_s=wall,
                           config_hash=config_hash(run.cfg), best_epoch=best["epoch"],
                           train_windows=state.get("train_windows"))
        save_weights(run.out_dir / WEIGHTS_FILE, best["model"], stamp)   # the file to hand on (runs.py)
        write_json_atomic(run.out_dir / "metrics.json", {
            "best_epoch": best["epoch"], "val": best["val"], "test": test,
            "test_ranks": ranked.rank.tolist(),      # window by window: the paired tests of the results tables
            "windows": {s: run.windows.n_windows(s) for s in ("train", "val", "test")},
            "parameters": unwrapped.parameter_counts(),
            "provenance": provenance(run.cfg.profile, seed=tc.seed, data_checksum=run.windows.meta.get("checksum"),
                                     wall_s=wall, config=run.cfg.to_dict()),
        })
    return TrainResult(run.out_dir, best["epoch"], best["val"], test, history, wall)


def train(cfg: ExperimentConfig, out_dir: str | os.PathLike, resume: bool = False,
          windows: Windows | None = None, stop_after_epochs: int | None = None) -> TrainResult:
    """Train NextLocMoE under `cfg`, keep the best checkpoint by validation Hit@10, test it.

    out_dir receives config.yaml, last.pt (resumable state), best.pt (trainable weights of the best epoch, 0 = the
    untrained start) and model.safetensors (the same weights with their provenance, the file to hand on), history.csv (one row per validation point, the untrained start first), steps.csv (one row per training batch: loss parts, routing entropies)
    and metrics.json (stamped with provenance). `stop_after_epochs` ends the run early as an
    interruption would (tests use it to check that `resume=True` reproduces an uninterrupted run).
    """
    run = _setup(cfg, Path(out_dir), resume, windows, started=time.perf_counter())
    if not run.state["history"]:         # the untrained start: the first validation point (module docstring)
        _end_period(run, None)
    done, total = run.state["epoch"], cfg.train.epochs
    for epoch in tqdm(range(done, total), desc="epochs", initial=done, total=total, disable=run.hide_bars):
        if _stops_before(run, epoch, stop_after_epochs):
            break
        _end_period(run, _train_period(run, epoch))
    return _finish(run, stop_after_epochs)


def evaluate_checkpoint(cfg: ExperimentConfig, run_dir: str | os.PathLike, split: str = "test",
                        windows: Windows | None = None, device: str = "auto") -> dict[str, float]:
    """Rebuild the model of `cfg` from run_dir/best.pt (`runs.load_run`) and evaluate one split."""
    run = load_run(run_dir, windows, cfg=cfg, device=device)
    return evaluate(run.model, run.windows, split, cfg.train.eval_batch_size, device=pick_device(device))
