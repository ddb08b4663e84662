"""Learning curves: validation Hit@1 and MRR against training windows, from the untrained start to the plateau,
with the training-free floors on the same validation windows drawn as lines.

One curve is one `train()` run of a method's supervised configuration with a different budget: every training
window of the dataset (no subsample), periods of `windows_per_point` windows (a stream of seeded passes,
`train.period_indices`), a validation point after each period on `val_windows` validation windows, and no early
stop (the curve runs to its end). The run is resumable period by period: `run_learning_curve` trains one more
period per `train(..., resume=True, stop_after_epochs=p)` call and rewrites results/learning_curve.* after each, so
a killed session loses at most the period in flight and the same command continues it. Its best checkpoint (by
validation Hit@10, the untrained start included) is the trained model of that budget.

The floors: `user_most_frequent` and the tuned `window_time` scorer (parameters chosen on the same validation
windows, never test), evaluated on the same validation windows as every point of the curve; for a regression head
also `last_location`, the "stay where you are" floor of its median distance error.

    nextlocmoe curve --profile cpu --method nextlocmoe_ranking --dataset synthetic --windows-per-point 1024 --points 8

The neural baselines (lstm, transformer, transformer_pointer) have curves too (`run_baseline_curve`): one fit of the
baseline's supervised configuration over every training window with no early stop, observed at the start and
after every `windows_per_point` windows on the same validation windows and floors; not resumable (minutes), and its
best point by validation Hit@10 is compared with window_time, paired, when the fit ends.

    nextlocmoe curve --profile cpu --method transformer_pointer --dataset nyc --windows-per-point 2048 --points 47
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

from ..baselines import (NEURAL_BASELINES, LastLocation, NeuralBaselineConfig, UserMostFrequent,
                         make_baseline, rank_baseline)
from ..config import ExperimentConfig
from ..data.prepare import prepare
from ..errors import ConfigError
from ..io import provenance, write_json_atomic
from ..metrics import Ranked, paired_comparison
from ..results import markdown_table, write_results
from ..runs import limited, load_checkpoint
from ..window_scorers import make_scorer
from .core import job_config, resolve_config, run_config
from .datasets import dataset_config
from .registry import get_method

CURVE_METRICS = ("hit@1", "hit@1_lo", "hit@1_hi", "hit@10", "mrr", "mrr_lo", "mrr_hi", "dist_median_m", "n")


def curve_config(profile: str, method: str, dataset: str, windows_per_point: int, points: int,
                 val_windows: int = 1000, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """The method's supervised config with the curve's budget (module docstring)."""
    check_budget(windows_per_point, points)
    cfg = run_config(resolve_config(profile, overrides=overrides), method, dataset)
    cfg.train = dataclasses.replace(cfg.train, max_train_windows=None, windows_per_epoch=windows_per_point,
                                    epochs=points, max_eval_windows=val_windows, early_stop_patience=points + 1)
    return cfg


def check_budget(windows_per_point: Any, points: Any) -> None:
    if not (isinstance(windows_per_point, int) and windows_per_point >= 1 and isinstance(points, int) and points >= 1):
        raise ConfigError(f"windows_per_point={windows_per_point!r}, points={points!r}; expected integers >= 1")


def floor_ranks(cfg: ExperimentConfig, windows: Any, point_predictions: bool | None = None) -> dict[str, Ranked]:
    """The training-free floors ranked on the curve's validation windows; with point predictions (default:
    cfg.model.head == "regression") also last_location."""
    w = limited(windows, cfg)
    floors = {"user_most_frequent": rank_baseline(UserMostFrequent().fit(w), w, "val"),
              "window_time": rank_baseline(make_scorer("window_time").fit(w), w, "val")}
    if cfg.model.head == "regression" if point_predictions is None else point_predictions:
        floors["last_location"] = rank_baseline(LastLocation().fit(w), w, "val")
    return floors


def floor_metrics(cfg: ExperimentConfig, windows: Any, point_predictions: bool | None = None
                  ) -> dict[str, dict[str, float]]:
    """Validation metrics of the training-free floors (`floor_ranks`)."""
    return {name: ranked.metrics() for name, ranked in floor_ranks(cfg, windows, point_predictions).items()}


def curve_table(method: str, dataset: str, history: pd.DataFrame, floors: dict[str, dict[str, float]]) -> pd.DataFrame:
    """One row per validation point (kind "model") and one per floor (kind "floor", train_windows empty)."""
    rows = [{"method": method, "dataset": dataset, "kind": "model", "point": int(r["epoch"]),
             "train_windows": int(r["train_windows"]),
             **{m: r.get(f"val_{m}") for m in CURVE_METRICS}} for _, r in history.iterrows()]
    rows += [{"method": name, "dataset": dataset, "kind": "floor", "point": None, "train_windows": None,
              **{m: v.get(m) for m in CURVE_METRICS}} for name, v in floors.items()]
    return pd.DataFrame(rows)


def run_learning_curve(profile: str, method: str, dataset: str, windows_per_point: int, points: int,
                       out_dir: str | os.PathLike, results_dir: str | os.PathLike = "results",
                       val_windows: int = 1000, overrides: list[str] | tuple[str, ...] = ()) -> pd.DataFrame:
    """Train (or continue) the curve's run in out_dir one period at a time; after each, merge its points into
    results/learning_curve.* (rows of other (method, dataset) curves are kept). Returns this curve's rows."""
    from ..train import train      # torch-heavy: imported when a curve is run, not when the table is read

    cfg = curve_config(profile, method, dataset, windows_per_point, points, val_windows, overrides)
    windows = prepare(cfg.data)
    floors = floor_metrics(cfg, windows)
    out_dir = Path(out_dir)
    last = out_dir / "last.pt"
    done = load_checkpoint(last)["state"]["epoch"] if last.exists() else 0    # periods a killed run finished
    table = None
    for p in range(max(done, 1), points + 1):
        result = train(cfg, out_dir, resume=True, windows=windows, stop_after_epochs=p)
        table = curve_table(method, dataset, result.history, floors)
        write_curves(results_dir, table, cfg, windows)
        done = table[table["kind"] == "model"].iloc[-1]
        print(f"{method} {dataset}: point {int(done['point'])}/{points}, {int(done['train_windows'])} training "
              f"windows, val Hit@1 {done['hit@1']:.4f}, MRR {done['mrr']:.4f} (window_time "
              f"{floors['window_time']['hit@1']:.4f} / {floors['window_time']['mrr']:.4f})", flush=True)
    return table


def baseline_curve_config(profile: str, method: str, dataset: str, windows_per_point: int, points: int,
                          val_windows: int = 1000, overrides: list[str] | tuple[str, ...] = ()
                          ) -> tuple[ExperimentConfig, NeuralBaselineConfig]:
    """A neural baseline's curve: the profile's data for `dataset`, `val_windows` validation windows, and the
    baseline's supervised configuration (experiments/methods.py) with every training window, no early stop and
    enough passes for points x windows_per_point windows (set by run_baseline_curve once the data are known)."""
    if method not in NEURAL_BASELINES:
        raise ConfigError(f"method '{method}' has no baseline curve; expected one of {list(NEURAL_BASELINES)}")
    check_budget(windows_per_point, points)
    cfg = resolve_config(profile, overrides=overrides)
    cfg = job_config(cfg, dataset_config(dataset, cfg), cfg.model,
                     {"max_train_windows": None, "max_eval_windows": val_windows})
    baseline = get_method(method).make(cfg.plan, cfg.train.seed).cfg
    return cfg, dataclasses.replace(baseline, max_train_windows=None, patience=None)


def run_baseline_curve(profile: str, method: str, dataset: str, windows_per_point: int, points: int,
                       results_dir: str | os.PathLike = "results", val_windows: int = 1000,
                       overrides: list[str] | tuple[str, ...] = ()) -> pd.DataFrame:
    """The learning curve of a neural baseline (lstm, transformer, transformer_pointer): one fit over every training
    window, a validation point at the start and after each `windows_per_point` windows (`NeuralBaseline.fit`'s
    observe), merged into results/learning_curve.* after each point. Not resumable: these models train in minutes.
    The best point by validation Hit@10 (the rule of the supervised runs) is then compared with window_time on the
    same windows (paired tests, results/learning_curve.json "paired_vs_window_time")."""
    cfg, baseline_cfg = baseline_curve_config(profile, method, dataset, windows_per_point, points, val_windows,
                                              overrides)
    windows = prepare(cfg.data)
    n_train = windows.n_windows("train")
    baseline_cfg = dataclasses.replace(baseline_cfg, epochs=-(-points * windows_per_point // n_train))
    cfg.train = dataclasses.replace(cfg.train, windows_per_epoch=windows_per_point, epochs=points)   # the stamp
    ranked_floors = floor_ranks(cfg, windows, point_predictions=False)      # a classifier ranks candidates
    floors = {name: ranked.metrics() for name, ranked in ranked_floors.items()}
    val = limited(windows, cfg)
    history, ranks = [], {}

    def observe(model: Any, seen: int) -> bool:
        ranked = rank_baseline(model, val, "val", desc=f"val {method}")
        point = len(history)
        history.append({"epoch": point, "train_windows": seen,
                        **{f"val_{m}": v for m, v in ranked.metrics().items()}})
        ranks[point] = ranked.rank
        table = curve_table(method, dataset, pd.DataFrame(history), floors)
        write_curves(results_dir, table, cfg, windows, {"baseline": baseline_cfg.to_dict()})
        last = history[-1]
        print(f"{method} {dataset}: point {point}/{points}, {seen} training windows, val Hit@1 "
              f"{last['val_hit@1']:.4f}, MRR {last['val_mrr']:.4f} (window_time {floors['window_time']['hit@1']:.4f}"
              f" / {floors['window_time']['mrr']:.4f})", flush=True)
        return point >= points

    make_baseline(method, baseline_cfg).fit(windows, observe=observe, observe_every=windows_per_point)
    best = max(range(len(history)), key=lambda i: (history[i]["val_hit@10"], -i))   # earliest of equals
    record_comparison(results_dir, f"{method}/{dataset}", {
        "best_point": best, "best_train_windows": history[best]["train_windows"], "points_done": len(history) - 1,
        **paired_comparison(ranks[best], ranked_floors["window_time"].rank)})
    return curve_table(method, dataset, pd.DataFrame(history), floors)


def record_comparison(results_dir: str | os.PathLike, curve: str, result: dict[str, Any]) -> None:
    """Store one curve's paired comparison with window_time in results/learning_curve.json."""
    path = Path(results_dir) / "learning_curve.json"
    if path.exists():
        stamp = json.loads(path.read_text())
        stamp.setdefault("paired_vs_window_time", {})[curve] = result
        write_json_atomic(path, stamp)


def write_curves(results_dir: str | os.PathLike, table: pd.DataFrame, cfg: ExperimentConfig, windows: Any,
                 extra: dict[str, Any] | None = None) -> None:
    """Merge `table` (one curve) into results/learning_curve.{csv,md,json}."""
    path = Path(results_dir) / "learning_curve.csv"
    key = (table["method"].iloc[0], table["dataset"].iloc[0])
    if path.exists():
        old = pd.read_csv(path)
        mine = old["curve"].eq(f"{key[0]}/{key[1]}")
        table = pd.concat([old[~mine], table.assign(curve=f"{key[0]}/{key[1]}")], ignore_index=True)
    else:
        table = table.assign(curve=f"{key[0]}/{key[1]}")
    table = table[["curve", *[c for c in table.columns if c != "curve"]]]
    shown = table.copy()
    for c in ("hit@1", "hit@10", "mrr"):
        shown[c] = shown[c].map(lambda v: f"{v:.4f}")
    for c in ("point", "train_windows", "dist_median_m"):   # a floor has no point: an empty cell, not "nan"
        if c not in shown.columns:                             # a table written before the column existed
            shown[c] = None
        shown[c] = shown[c].map(lambda v: "" if pd.isna(v) else f"{int(round(v)):,}")
    md = ("# Learning curves (validation)\n\n"
          "Validation Hit@1, Hit@10 and MRR after each period of training windows (point 0 = the untrained start), "
          "and the training-free floors on the same validation windows (95% intervals in the CSV: Wilson for "
          "Hit@k, bootstrap for MRR); dist_median_m is the median distance error in metres (point predictions: "
          "the regression head's point, a ranker's top place).\n\n"
          + markdown_table(shown[["curve", "kind", "method", "point", "train_windows", "hit@1", "hit@10", "mrr",
                                  "dist_median_m", "n"]]))
    stamp = provenance(cfg.profile, seed=cfg.train.seed, data_checksum=windows.meta.get("checksum"),
                       command="nextlocmoe curve", curves={f"{key[0]}/{key[1]}": {**cfg.to_dict(), **(extra or {})}})
    if (Path(results_dir) / "learning_curve.json").exists():
        previous = json.loads((Path(results_dir) / "learning_curve.json").read_text())
        stamp["curves"] = {**previous.get("curves", {}), **stamp["curves"]}
        if "paired_vs_window_time" in previous:      # comparisons of finished points stay (compare_with_floor)
            stamp["paired_vs_window_time"] = previous["paired_vs_window_time"]
    write_results(results_dir, "learning_curve", table, md, stamp)


def curve_summary(table: pd.DataFrame, metric: str = "mrr", tolerance: float = 0.005) -> pd.DataFrame:
    """One row per curve: the untrained start, the best point by `metric`, where the curve flattens (the first
    point within `tolerance` of that best) and the window_time floor on the same windows, each with Hit@1 and MRR;
    `beats_floor` says whether the best point's interval of `metric` lies wholly above the floor's value (an
    unpaired reading: the paired test on the same windows is stronger)."""
    rows = []
    for curve, part in table.groupby("curve", sort=False):
        model = part[part["kind"] == "model"].sort_values("train_windows")
        floor = part[(part["kind"] == "floor") & (part["method"] == "window_time")]
        if model.empty:
            continue
        start, best = model.iloc[0], model.loc[model[metric].idxmax()]
        flat = model[model[metric] >= best[metric] - tolerance].iloc[0]
        f = floor.iloc[0] if len(floor) else None
        rows.append({"curve": curve, "points": len(model) - 1, "train_windows": int(model["train_windows"].max()),
                     "start_hit@1": start["hit@1"], "start_mrr": start["mrr"],
                     "best_train_windows": int(best["train_windows"]), "best_hit@1": best["hit@1"],
                     "best_mrr": best["mrr"], f"best_{metric}_lo": best[f"{metric}_lo"],
                     "flattens_at": int(flat["train_windows"]),
                     "window_time_hit@1": None if f is None else f["hit@1"],
                     "window_time_mrr": None if f is None else f["mrr"],
                     "beats_floor": None if f is None else bool(best[f"{metric}_lo"] > f[metric]),
                     **({"start_dist_median_m": start["dist_median_m"], "best_dist_median_m": best["dist_median_m"]}
                        if "dist_median_m" in model.columns else {})})
    return pd.DataFrame(rows)


def read_learning_curves(results_dir: str | os.PathLike = "results") -> pd.DataFrame | None:
    """results/learning_curve.csv, or None where no curve was measured (the smoke profile's outputs)."""
    path = Path(results_dir) / "learning_curve.csv"
    return pd.read_csv(path) if path.exists() else None


def compare_with_floor(profile: str, method: str, dataset: str, windows_per_point: int, points: int,
                       out_dir: str | os.PathLike, results_dir: str | os.PathLike = "results",
                       val_windows: int = 1000, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The curve's best checkpoint so far against the tuned window_time scorer, window by window on the curve's
    validation windows (`metrics.paired_comparison`: exact McNemar for Hit@1 / Hit@10, paired bootstrap for MRR);
    recorded in results/learning_curve.json under "paired_vs_window_time" and returned. Trains nothing."""
    from ..evaluation import rank_split
    from ..runs import load_run

    cfg = curve_config(profile, method, dataset, windows_per_point, points, val_windows, overrides)
    windows = prepare(cfg.data)
    run = load_run(out_dir, windows, cfg=cfg)                  # best.pt: the best validation point so far
    state = load_checkpoint(Path(out_dir) / "last.pt")["state"]   # which point that is, and the history
    ours = rank_split(run.model, run.windows, "val", cfg.train.eval_batch_size, desc="val ranks").rank
    floor = rank_baseline(make_scorer("window_time").fit(run.windows), run.windows, "val").rank
    at = next(r for r in state["history"] if int(r["epoch"]) == int(state["best_epoch"]))
    result = {"best_point": int(state["best_epoch"]), "best_train_windows": int(at.get("train_windows", 0)),
              "points_done": len(state["history"]) - 1, **paired_comparison(ours, floor)}
    record_comparison(results_dir, f"{method}/{dataset}", result)
    return result
