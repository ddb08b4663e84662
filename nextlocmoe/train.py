"""Training and evaluation of NextLocMoE on `accelerate` (one CPU, one GPU, or several with `accelerate launch`).

The loop follows the reference training recipe (docs/design.md §3.8): Adam with weight decay 0.01,
ReduceLROnPlateau on validation Hit@10 (factor 0.5, patience 2), gradient clipping and accumulation, bf16
on GPU, best checkpoint by validation Hit@10. Two things the reference leaves to chance are fixed here:

- the test split is evaluated with the BEST checkpoint, reloaded from disk, never with the last epoch;
- a run can be interrupted and resumed (`resume=True`): checkpoints are written atomically at the end of
  every epoch, and each epoch's data order and dropout draws depend only on (seed, epoch), so a resumed run
  reaches the same final metrics as an uninterrupted one on CPU.

A non-finite loss stops the run with a clear message; the last good checkpoint is left untouched.

Several processes (`accelerate launch`, or `ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N` on CPUs) each
train on their shard of every epoch's batches (data parallel: a global batch of N x train.batch_size); only the
main process writes the run directory and prints, and validation / test run once, on the main process, whose
metrics every process receives (`evaluate_once`). README gives the tested commands.
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
from .config import ExperimentConfig, training_dict
from .data.prepare import prepare
from .data.windows import Windows
from .errors import NextLocMoEError
from .evaluation import epoch_loader, evaluate, period_indices
from .io import atomic_path, check_writable, provenance, remove_stale_temps, write_json_atomic, write_text_atomic
from .model import build_model
from .runs import limited, load_run, load_trainable_state, save_checkpoint, trainable_state
from .runtime import pick_device, resolve_mixed_precision

SELECTION_METRIC = "hit@10"  # reference: best checkpoint by validation Hit@10


class TrainingDiverged(NextLocMoEError):
    """The loss became NaN or infinite."""


@dataclass
class TrainResult:
    out_dir: Path
    best_epoch: int                 # 1-based epoch whose checkpoint produced the test metrics
    val: dict[str, float]           # validation metrics of the best checkpoint
    test: dict[str, float]          # test metrics of the best checkpoint
    history: pd.DataFrame           # one row per epoch: train loss parts, validation metrics, lr, seconds
    wall_s: float


# ---------------------------------------------------------------------------------------------------
# training

def _training_part(config: dict[str, Any]) -> dict[str, Any]:
    """The data, model and train sections of a stored config dict (what decides the run; not plan or name)."""
    return training_dict(ExperimentConfig.from_dict(config))


def evaluate_once(accelerator: Accelerator, model, windows: Windows, split: str, batch_size: int,
                  desc: str) -> dict[str, float]:
    """Evaluate on the main process only and hand the metrics to every process (several processes would
    otherwise each evaluate the whole split); one process: a plain `evaluate`."""
    metrics = [evaluate(model, windows, split, batch_size, device=accelerator.device, desc=desc)
               if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(metrics, from_process=0)
    return metrics[0]


def train(cfg: ExperimentConfig, out_dir: str | os.PathLike, resume: bool = False,
          windows: Windows | None = None, stop_after_epochs: int | None = None) -> TrainResult:
    """Train NextLocMoE under `cfg`, keep the best checkpoint by validation Hit@10, test it.

    out_dir receives config.yaml, last.pt (resumable state), best.pt (trainable weights of the best epoch),
    history.csv (one row per epoch), steps.csv (one row per training batch: loss parts, routing entropies)
    and metrics.json (stamped with provenance). `stop_after_epochs` ends the run early as an
    interruption would (tests use it to check that `resume=True` reproduces an uninterrupted run).
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
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
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=tc.lr, weight_decay=tc.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=tc.plateau_factor,
                                                           patience=tc.plateau_patience)
    model, optimizer = accelerator.prepare(model, optimizer)

    # `steps` keeps every training batch's loss parts (routing entropy over training is drawn from it)
    state = dict(epoch=0, best_metric=-math.inf, best_epoch=0, bad_epochs=0, history=[], steps=[])
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    if resume and last_path.exists():
        ckpt = torch.load(last_path, map_location="cpu", weights_only=False)
        if _training_part(ckpt["config"]) != training_dict(cfg):
            raise NextLocMoEError(f"--resume: {last_path} was written by a different config; "
                                  "use a new output directory or the same config")
        load_trainable_state(accelerator.unwrap_model(model), ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        state = ckpt["state"]
        accelerator.print(f"resumed from {last_path.name}: {state['epoch']} epoch(s) done")
    if main:
        write_text_atomic(out_dir / "config.yaml", cfg.to_yaml())
    bars = None if main else True     # tqdm: auto on the main process, silent on the others

    epochs = range(state["epoch"], tc.epochs)
    for epoch in tqdm(epochs, desc="epochs", initial=state["epoch"], total=tc.epochs, disable=bars):
        if state["bad_epochs"] >= tc.early_stop_patience:
            accelerator.print(f"early stop: no better validation {SELECTION_METRIC} for "
                              f"{state['bad_epochs']} epochs")
            break
        if stop_after_epochs is not None and epoch >= stop_after_epochs:
            break
        epoch_t0 = time.perf_counter()
        # Data order and dropout depend only on (seed, epoch): resuming reproduces them exactly.
        torch.manual_seed(tc.seed * 100_003 + epoch)
        if tc.windows_per_epoch is None:
            loader = epoch_loader(windows, "train", tc.batch_size, seed=tc.seed * 100_003 + epoch)
        else:   # a validation period: the next windows_per_epoch windows of a stream of seeded passes
            indices = period_indices(windows.n_windows("train"), tc.windows_per_epoch, epoch, tc.seed)
            loader = epoch_loader(windows, "train", tc.batch_size, seed=None, indices=indices)
        loader = accelerator.prepare(loader)
        model.train()
        sums: dict[str, float] = {}
        n_batches = 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}", leave=False, disable=bars)
        for step, batch in enumerate(bar):
            with accelerator.accumulate(model):
                out = model(batch)
                loss, parts = accelerator.unwrap_model(model).loss(out, batch)
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"loss became {loss.item()} at epoch {epoch + 1}, step {step + 1} (parts: "
                        f"{ {k: float(v) for k, v in parts.items()} }); the last good checkpoint is kept at "
                        f"{last_path if last_path.exists() else 'none (first epoch)'}. Try a lower train.lr.")
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    # A finite loss can still have non-finite gradients; one such step would corrupt every
                    # parameter it touches, so stop before the optimizer applies it.
                    grad_norm = accelerator.clip_grad_norm_(params, tc.clip_norm if tc.clip_norm else math.inf)
                    if grad_norm is not None and not torch.isfinite(torch.as_tensor(grad_norm)):
                        raise TrainingDiverged(
                            f"gradients became non-finite (norm {float(grad_norm)}) at epoch {epoch + 1}, step "
                            f"{step + 1} although the loss was {loss.item():.6g}; the last good checkpoint is kept "
                            f"at {last_path if last_path.exists() else 'none (first epoch)'}. Try a lower train.lr "
                            "or train.mixed_precision=no.")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            values = {k: float(v) for k, v in parts.items()}
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
            state["steps"].append({"epoch": epoch + 1, "step": len(state["steps"]) + 1, **values})
            n_batches += 1
            bar.set_postfix(loss=f"{loss.item():.4g}")

        val = evaluate_once(accelerator, accelerator.unwrap_model(model), windows, "val", tc.eval_batch_size,
                            desc=f"val {epoch + 1}")
        scheduler.step(val[SELECTION_METRIC])
        row = {"epoch": epoch + 1, **{f"train_{k}": v / max(n_batches, 1) for k, v in sums.items()},
               **{f"val_{k}": v for k, v in val.items()}, "lr": optimizer.param_groups[0]["lr"],
               "seconds": time.perf_counter() - epoch_t0}
        state["history"].append(row)
        state["epoch"] = epoch + 1
        if val[SELECTION_METRIC] > state["best_metric"]:
            state.update(best_metric=val[SELECTION_METRIC], best_epoch=epoch + 1, bad_epochs=0)
            if accelerator.is_main_process:
                save_checkpoint(best_path, {"model": trainable_state(accelerator.unwrap_model(model)),
                                            "epoch": epoch + 1, "val": val})
        else:
            state["bad_epochs"] += 1
        if accelerator.is_main_process:
            save_checkpoint(last_path, {"model": trainable_state(accelerator.unwrap_model(model)),
                                        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                        "state": state, "config": cfg.to_dict()})
        accelerator.print(f"epoch {epoch + 1}: " + ", ".join(
            f"{k}={v:.4g}" for k, v in row.items()
            if k.startswith(("train_loss", "val_hit", "val_mrr")) and not k.endswith(("_lo", "_hi"))))
        accelerator.wait_for_everyone()

    history = pd.DataFrame(state["history"])
    if stop_after_epochs is not None and state["epoch"] < tc.epochs and state["bad_epochs"] < tc.early_stop_patience:
        return TrainResult(out_dir, state["best_epoch"], {}, {}, history, time.perf_counter() - t0)
    if not best_path.exists():
        raise NextLocMoEError(f"no best checkpoint in {out_dir}: train.epochs={tc.epochs} ran no epoch")

    # Test the best checkpoint, reloaded from disk: never the last epoch by accident.
    accelerator.wait_for_everyone()      # best.pt is written by the main process
    best = torch.load(best_path, map_location="cpu", weights_only=False)
    unwrapped = accelerator.unwrap_model(model)
    load_trainable_state(unwrapped, best["model"])
    test = evaluate_once(accelerator, unwrapped, windows, "test", tc.eval_batch_size, desc="test")
    wall = time.perf_counter() - t0
    if accelerator.is_main_process:
        with atomic_path(out_dir / "history.csv") as tmp:
            history.to_csv(tmp, index=False)
        with atomic_path(out_dir / "steps.csv") as tmp:
            pd.DataFrame(state.get("steps", [])).to_csv(tmp, index=False)
        write_json_atomic(out_dir / "metrics.json", {
            "best_epoch": best["epoch"], "val": best["val"], "test": test,
            "windows": {s: windows.n_windows(s) for s in ("train", "val", "test")},
            "parameters": unwrapped.parameter_counts(),
            "provenance": provenance(cfg.profile, seed=tc.seed, data_checksum=windows.meta.get("checksum"),
                                     wall_s=wall, config=cfg.to_dict()),
        })
    return TrainResult(out_dir, best["epoch"], best["val"], test, history, wall)


def evaluate_checkpoint(cfg: ExperimentConfig, run_dir: str | os.PathLike, split: str = "test",
                        windows: Windows | None = None, device: str = "auto") -> dict[str, float]:
    """Rebuild the model of `cfg` from run_dir/best.pt (`runs.load_run`) and evaluate one split."""
    run = load_run(run_dir, windows, cfg=cfg, device=device)
    return evaluate(run.model, run.windows, split, cfg.train.eval_batch_size, device=pick_device(device))
