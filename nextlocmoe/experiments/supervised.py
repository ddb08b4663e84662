"""Experiment 3 (paper Sec. 5.2): every registered supervised method x every dataset of the plan.

All methods see the same windows, splits and candidates, and the same seeded subsamples of the train
section's budget (`runs.limited`), so the column n is equal across a dataset's rows. `supervised_model` is
the same training for one (dataset, method), for notebook 01; `write_training_summary` writes the table and
the curves notebook 01 draws.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from ..config import ExperimentConfig, config_hash
from ..data.windows import Windows
from ..errors import ConfigError
from ..io import provenance
from ..metrics import metrics_table
from ..results import markdown_table, write_results
from .core import Runner, budget_text, run_config, slug
from .methods import baseline_job, model_job
from ..baselines import NEURAL_BASELINES, evaluate_baseline, make_baseline
from ..runs import limited
from ..window_scorers import SCORERS, make_scorer
from .registry import get_method, register_experiment
from .registry import methods as registered_methods


def _windows(n: int | None) -> str:
    return "all" if n is None else f"{n:,}"


@register_experiment("supervised", order=1, notebook="02_supervised.ipynb",
                     description="Fully supervised next-location prediction: every method x dataset on the same "
                                 "windows.")
def supervised(runner: Runner, methods: tuple[str, ...] | None = None) -> list[str]:
    """Rows of every supervised method (or only `methods`) on every dataset of the plan."""
    chosen = [get_method(m) for m in methods] if methods else registered_methods(supervised=True)
    unknown = sorted(set(runner.plan.baseline_budgets) - set(NEURAL_BASELINES))
    if unknown:
        raise ConfigError(f"plan.baseline_budgets names {unknown}; expected neural baselines {list(NEURAL_BASELINES)}")
    runner.paired_reference = best_training_free
    for dataset in runner.plan.datasets:
        data = runner.dataset(dataset)
        for method in tqdm(chosen, desc=f"supervised {dataset}", unit="method", disable=None):
            if method.family == "model":
                model_job(runner, method.name, data, run_config(runner.cfg, method.name, dataset))
            elif method.family == "baseline":
                baseline_job(runner, method, data, runner.job_config(data.config, runner.cfg.model))
            else:
                raise ConfigError(f"method '{method.name}' ({method.family}) cannot run in the supervised table")
    plan, train = runner.plan, runner.cfg.train
    baseline_windows = _windows(plan.baseline_train_windows)
    return [
        "Every method sees the same splits and candidates and is validated and tested on the same seeded "
        "subsamples (runs.limited), so the column n is equal across a dataset's rows.",
        f"Training windows: the LLM-based models {budget_text(train)}; the classical baselines fit "
        f"{baseline_windows} training windows (the neural ones at most {plan.baseline_epochs} epochs, early stopping "
        f"on validation Hit@10 with patience {plan.baseline_patience})"
        + "".join(f"; {name}: {_windows(b['train_windows'])} training windows, "
                  + (f"{b['epochs']} epochs, the last kept" if b["patience"] is None else
                     f"at most {b['epochs']} epochs, patience {b['patience']}")
                  for name, b in ((n, plan.baseline_budget(n)) for n in plan.baseline_budgets))
        + ".",
        "nextlocmoe is the paper's method (regression head + KD-tree); nextlocmoe_ranking is this project's "
        "ranking head; nextlocllm is the NextLocLLM-style baseline (same backbone and prompt, regression head, "
        "no MoE and no router, a LoRA on every FFN).",
        "Test metrics come from the checkpoint with the best validation Hit@10.",
    ]


def best_training_free(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The paired tests' reference of a dataset: of its tuned training-free scorers (window_scorers.SCORERS), the
    one with the highest VALIDATION MRR (first on ties); None when the table has none."""
    scorers = [r for r in records if r["method"] in SCORERS and "val" in r["details"]]
    return max(scorers, key=lambda r: r["details"]["val"]["mrr"], default=None)


def _metric_position(metric: str) -> tuple[int, int, str]:
    """hit@k, ndcg@k (by k, each point value before its _lo/_hi bounds), mrr, distances, n, then the rest by name."""
    base, bound = metric, ""
    for suffix in ("_lo", "_hi"):
        if metric.endswith(suffix):
            base, bound = metric[:-len(suffix)], suffix
    family, _, k = base.partition("@")
    families = ("hit", "ndcg", "mrr", "dist_mean_m", "dist_median_m", "n")
    if family in families:
        return families.index(family), int(k) if k.isdigit() else 0, bound
    return len(families), 0, metric


@dataclass
class TrainedModel:
    """A model the supervised experiment trains (and shares with the others): where it is and how it did."""
    method: str
    dataset: str
    config: ExperimentConfig
    run_dir: Path                    # train() output: config.yaml, best.pt, history.csv, steps.csv, metrics.json
    record: dict[str, Any]           # val / test metrics, best epoch, parameters, windows, training wall time
    windows: Windows                 # the full windows of the dataset (runs.limited gives the model's subsample)


def supervised_model(profile: str, dataset: str, method: str = "nextlocmoe", *,
                     runs_dir: str | os.PathLike = "runs/experiments", cache_dir: str | os.PathLike = ".cache/windows",
                     force: bool = False, overrides: list[str] | tuple[str, ...] = (),
                     plan: dict[str, Any] | None = None, variant: str = "default") -> TrainedModel:
    """Train (or reuse) `method` on `dataset` exactly as the supervised experiment does, at its budget.

    Notebook 01 calls this to train the profile's models and show their curves; the supervised table then
    reads the same cached model instead of training it again (the cache key is the config and the data).
    `variant` names a model trained with `overrides` in its shipped folder (`model_folder`).
    """
    if get_method(method).family != "model":
        raise ConfigError(f"method '{method}' is not a trained model; expected one of "
                          f"{[m.name for m in registered_methods(family='model')]}")
    runner = Runner("supervised", profile, runs_dir=runs_dir, cache_dir=cache_dir, force=force,
                    overrides=overrides, plan=plan)
    if dataset not in runner.plan.datasets:
        raise ConfigError(f"dataset '{dataset}' is not in the {profile} plan; expected one of "
                          f"{list(runner.plan.datasets)}")
    data = runner.dataset(dataset)
    cfg = run_config(runner.cfg, method, dataset)
    record = runner.trained_model(cfg, data, name=model_folder(method, dataset, variant, cfg, bool(overrides)))
    return TrainedModel(method, dataset, cfg, runner.runs_dir / record["dir"], record, data.windows)


def model_folder(method: str, dataset: str, variant: str, cfg: ExperimentConfig, overridden: bool) -> str:
    """The shipped folder of a supervised model: <method>-<dataset>-<variant>. A model trained with overrides
    under the name "default" gets its configuration hash instead, so that it can never take the folder of the
    supervised table's model."""
    if overridden and variant == "default":
        variant = f"custom_{config_hash(cfg)}"
    return slug(method, dataset, variant)


NO_BALANCE = ("model.balance_weight=0",)   # the paper's routing loss: the entropy term alone


def no_balance_model(profile: str, dataset: str, method: str, **kwargs: Any) -> TrainedModel:
    """`method` on `dataset` at the supervised budget with the paper's routing loss (no balance term,
    docs/design.md §5.2): the run whose gate entropy notebook 06 draws beside the default one, to show the
    collapse the balance term prevents. Trained once and shipped like the supervised models."""
    return supervised_model(profile, dataset, method, overrides=NO_BALANCE, variant="no_balance", **kwargs)


NEXTLOCMOE_HEADS = ("nextlocmoe", "nextlocmoe_ranking")


def best_supervised_model(profile: str, dataset: str, methods: tuple[str, ...] = NEXTLOCMOE_HEADS,
                          **kwargs: Any) -> TrainedModel:
    """Of `methods` (by default NextLocMoE with either head), the supervised model with the higher VALIDATION
    Hit@10 on `dataset` (ties: the first); the routing analysis of notebook 06 studies this one."""
    models = [supervised_model(profile, dataset, method, **kwargs) for method in methods]
    return max(models, key=lambda m: m.record["val"]["hit@10"])   # max keeps the first of equal values


def plan_datasets(profile: str, *, cache_dir: str | os.PathLike = ".cache/windows",
                  overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Windows]:
    """The windows of every dataset the profile's plan names, by name (built or read from the cache)."""
    runner = Runner("supervised", profile, cache_dir=cache_dir, overrides=overrides)
    return {name: runner.dataset(name).windows for name in runner.plan.datasets}


TRAINING_FLOORS = ("last_location", "user_most_frequent", "window_time")


def training_floors(cfg: ExperimentConfig, windows: Windows) -> dict[str, dict[str, float]]:
    """Validation metrics of the training-free floors on a run's own validation windows (`runs.limited`): the
    current place (the regression head's start), the window's most frequent place and the tuned window_time
    scorer (the ranking head's start); seconds, no training beyond their counts and the scorer's grid search on
    the same validation split."""
    w = limited(windows, cfg)
    made = {"window_time": lambda: make_scorer("window_time")}
    return {name: evaluate_baseline(made.get(name, lambda: make_baseline(name))().fit(w), w, "val")
            for name in TRAINING_FLOORS}


def write_training_summary(models: dict[str, TrainedModel], profile: str,
                           results_dir: str | os.PathLike = "results") -> dict[str, Path]:
    """results/training.{csv,md,json}: validation and test metrics, best epoch, parameters and wall time of the
    models notebook 01 trains; and results/training_curves.{csv,md,json}: their per-epoch validation history,
    per-batch training loss parts and the training-free floors on the same validation windows (table "floor",
    `training_floors`); the figures of notebook 01 are drawn from that file."""
    rows = []
    for method, m in models.items():
        extra = {"best_epoch": m.record["best_epoch"], "train_wall_s": m.record["train_wall_s"],
                 "trainable_params": m.record["parameters"]["trainable"], "total_params": m.record["parameters"]["total"]}
        for split in ("val", "test"):
            # metrics in the order retrieval_metrics makes them, whether the record was just computed or read
            # back from the cache (JSON with sorted keys): the table's bytes do not depend on the cache
            values = dict(sorted(m.record[split].items(), key=lambda kv: _metric_position(kv[0])))
            rows.append({"method": method, "kind": get_method(method).kind, "dataset": m.dataset, "split": split,
                         **values, **extra})
    table = metrics_table(rows, id_columns=("method", "kind", "dataset", "split"))
    pivot = table.pivot_table(index=["method", "dataset", "split"], columns="metric", values="value", sort=False)
    shown = [c for c in ("hit@1", "hit@5", "hit@10", "mrr", "dist_median_m", "best_epoch", "train_wall_s")
             if c in pivot.columns]
    checksums = {m.dataset: m.windows.meta.get("checksum") for m in models.values()}
    first = next(iter(models.values()))
    stamp = dict(profile=profile, seed=first.config.train.seed, data_checksum=checksums,
                 runs={k: str(m.run_dir) for k, m in models.items()})
    paths = write_results(results_dir, "training", table, markdown_table(pivot[shown].reset_index().round(4)),
                          provenance(**stamp, config={k: m.config.to_dict() for k, m in models.items()}))
    curves = []
    for method, m in models.items():
        for source, name in (("history.csv", "epoch"), ("steps.csv", "step")):
            frame = pd.read_csv(m.run_dir / source)
            curves.append(frame.assign(method=method, dataset=m.dataset, table=name))
        floors = training_floors(m.config, m.windows)            # the same validation windows as the run's
        curves.append(pd.DataFrame([{"floor": name, **{f"val_{k}": v for k, v in metrics.items()}}
                                    for name, metrics in floors.items()]).assign(method=method, dataset=m.dataset,
                                                                                 table="floor"))
    curves = pd.concat(curves, ignore_index=True)
    ids = ["method", "dataset", "table"]
    curves = curves[ids + [c for c in curves.columns if c not in ids]]
    summary = curves.groupby(ids, sort=False).size().rename("rows").reset_index()
    write_results(results_dir, "training_curves", curves, markdown_table(summary), provenance(**stamp))
    return paths
