"""The results charts of the notebooks, drawn from results files; the routing charts are re-exported here.

One direction of flow: experiments write tidy results files, notebooks read them and call a function here,
which returns a matplotlib `Figure`; `save_figure` writes it to figures/ as a PNG. Nothing here trains,
evaluates or reads a model, and nothing imports the experiments or torch (the report owns its styles:
report/style.py).

    plot_dataset_overview(data)              map of candidate locations by function + records per user (nb 00)
    plot_training_curves(history, steps)     per-batch training loss, per-epoch validation Hit@k (nb 01)
    plot_learning_curves(table)              validation Hit@1 / MRR against training windows, floors as lines
    plot_supervised(table)                   grouped bars of Hit@1/5/10 and MRR per method, per dataset (nb 02)
    plot_zero_shot(table)                    the same for source->target pairs (nb 03)
    plot_ablations(table, metric)            one bar per variant, difference to the full model printed (nb 04)
    plot_efficiency(table)                   throughput, batch sweep, NextLocMoE / LLM-Mob speed ratios (nb 05)
    plot_moe_benchmark(table)                one Personalized MoE layer vs a dense FFN (nb 05, bench_moe.csv)
    save_figure(fig, path)                   atomic PNG write, closes the figure

The routing charts of notebook 06 (plot_role_expert_heatmap, plot_function_gate_heatmap,
plot_active_experts, plot_routing_entropy, plot_prediction_map) live in `routing_figures.py` and are
importable from here as well, so `from nextlocmoe.report.figures import plot_role_expert_heatmap` keeps
working.

Tidy results tables have the columns experiment, method, kind, dataset, variant, metric, value (one row per
number; `nextlocmoe.results`). Every method keeps one colour in every figure (style.METHOD_STYLES; NextLocMoE's
rows are red with a black edge), and a row's `kind` (paper method, extension, baseline, ablation, comparison,
reference) is its bar hatch (`KIND_HATCHES`) and is written in the legend. Where a table holds a metric's 95%
interval ("<metric>_lo" / "<metric>_hi", from `metrics.retrieval_metrics`), the accuracy bars carry it as an
asymmetric error bar; tables without them (written before intervals existed) draw plain bars. Grouped bars
are seaborn's (`barplot` with `hue`, on an Agg figure through `ax=`); the intervals are the table's own
bounds, drawn over them. An input that lacks a column or a metric raises `ConfigError` naming it.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, MaxNLocator

from ..data.schema import FUNCTIONS, UNKNOWN_FUNCTION
from ..errors import ConfigError
from ..results import TIDY_COLUMNS, format_p, is_interval_metric
from .summaries import PAIRED_ALPHA
from .canvas import (SeriesKey, bold_legend, dodged_bars, draw_errorbars, fmt_number, interval_errors,
                     interval_handle, legend_handles, legend_ncols, new_figure, plane_axes, require_columns,
                     require_metrics, save_figure, series_keys, series_styles, spans_decades, styled, thousands,
                     tidy)
from .routing_figures import (plot_active_experts, plot_function_gate_heatmap, plot_prediction_map,
                              plot_role_expert_heatmap, plot_routing_entropy)
from .style import (FUNCTION_COLORS, KIND_HATCHES, NEXTLOCMOE_RED, TOKEN_KIND_COLORS, is_score, lower_is_better,
                    method_color, method_style, metric_axis_label, metric_label)

__all__ = [
    "KIND_HATCHES", "FUNCTION_COLORS", "TOKEN_KIND_COLORS", "TIDY_COLUMNS", "NEXTLOCMOE_RED",
    "method_color", "metric_label", "save_figure",
    "plot_dataset_overview", "plot_training_curves", "plot_learning_curves", "plot_supervised", "plot_zero_shot", "plot_ablations",
    "plot_efficiency", "plot_moe_benchmark",
    # routing charts (routing_figures.py)
    "plot_role_expert_heatmap", "plot_function_gate_heatmap", "plot_active_experts", "plot_routing_entropy",
    "plot_prediction_map",
]

DEFAULT_METRICS = ("hit@1", "hit@5", "hit@10", "mrr")


# ---------------------------------------------------------------------------------------------------
# learning curves (results/learning_curve.csv, `nextlocmoe curve`)

FLOOR_LINESTYLES = {"window_time": "-", "user_most_frequent": "--"}


@styled
def plot_learning_curves(table: pd.DataFrame, metrics: Sequence[str] = ("hit@1", "mrr"), by: str = "curve") -> Figure:
    """One column per curve (method on dataset; by="dataset": per dataset, every model's curve of it in one panel),
    one row per metric: the validation metric against training windows (point 0 = the untrained start) with its 95%
    interval as a band, and each training-free floor on the same validation windows as a horizontal line with its
    band (curves of one dataset share their validation windows, so a floor is drawn once per panel).

    table  results/learning_curve.csv: curve, kind ("model" or "floor"), method, dataset, train_windows and, per
           metric, the value and "<metric>_lo" / "<metric>_hi"
    """
    if by not in ("curve", "dataset"):
        raise ConfigError(f"plot_learning_curves: by={by!r}; expected 'curve' or 'dataset'")
    require_columns(table, ["curve", "kind", "method", by, "train_windows",
                            *[f"{m}{e}" for m in metrics for e in ("", "_lo", "_hi")]], "plot_learning_curves")
    columns = list(dict.fromkeys(table[by]))
    if not columns:
        raise ConfigError("plot_learning_curves: the table holds no curve")
    if len(columns) > 3:
        raise ConfigError(f"plot_learning_curves: {len(columns)} panels do not fit one readable figure; pass at "
                          "most 3 (e.g. table[table['curve'].isin([...])])")
    fig = new_figure((min(11.0, max(9.0, 3.6 * len(columns) + 0.6)), 3.1 * len(metrics) + 0.4))
    axes = np.atleast_2d(fig.subplots(len(metrics), len(columns), squeeze=False))
    for j, column in enumerate(columns):
        rows = table[table[by] == column]
        floors = rows[rows["kind"] == "floor"].drop_duplicates("method")
        models = rows[rows["kind"] == "model"]
        several = models["curve"].nunique() > 1
        for i, metric in enumerate(metrics):
            ax = axes[i, j]
            for _, f in floors.iterrows():
                fc = method_style(f["method"]).color
                ax.axhspan(f[f"{metric}_lo"], f[f"{metric}_hi"], color=fc, alpha=0.12, linewidth=0)
                ax.axhline(f[metric], color=fc, linestyle=FLOOR_LINESTYLES.get(f["method"], ":"), linewidth=1.6,
                           label=f"{f['method']} (no training) {f[metric]:.3f}")
            for curve in dict.fromkeys(models["curve"]):
                model = models[models["curve"] == curve].sort_values("train_windows")
                method = model["method"].iloc[0]
                color = method_style(method).color
                x = model["train_windows"].to_numpy(dtype=float)
                best = model.loc[model[metric].idxmax()]
                ax.fill_between(x, model[f"{metric}_lo"], model[f"{metric}_hi"], color=color,
                                alpha=0.12 if several else 0.2, linewidth=0)
                ax.plot(x, model[metric], marker="o", markersize=3 if several else 4, color=color, linewidth=2,
                        label=f"{method} (validation)" + (f", best {best[metric]:.3f}" if several else ""))
                if not several:
                    ax.annotate(f"best {best[metric]:.3f}", (best["train_windows"], best[metric]),
                                textcoords="offset points", xytext=(0, 8), ha="center", fontsize=9)
            ax.xaxis.set_major_formatter(FuncFormatter(thousands))
            title = str(column).replace("/", " on ") if by == "curve" else f"{column}: {' vs '.join(dict.fromkeys(models['method']))}"
            ax.set(xlabel="training windows seen (0 = untrained)" if i == len(metrics) - 1 else "",
                   ylabel=f"validation {metric_label(metric)}", title=title if i == 0 else "")
            ax.legend(loc="best", fontsize=9)
    n = int(table["n"].dropna().iloc[0]) if "n" in table.columns and table["n"].notna().any() else None
    fig.suptitle("Learning curves: validation accuracy against training windows"
                 + (f" ({n:,} validation windows; bands: 95% intervals)" if n else ""), fontsize=11)
    return fig


# ---------------------------------------------------------------------------------------------------
# 00: data

def _overview_inputs(data: Any) -> tuple[str, np.ndarray, np.ndarray, np.ndarray, str]:
    """(name, location xy (L, 2) metres, location function names (L,), records per user (U,), count label)."""
    if hasattr(data, "records") and hasattr(data, "locations"):          # data.schema.MobilityData
        require_columns(data.locations, ["x", "y", "function"], "plot_dataset_overview (locations)")
        require_columns(data.records, ["user"], "plot_dataset_overview (records)")
        xy = data.locations[["x", "y"]].to_numpy(dtype=float)
        function = data.locations["function"].astype(str).to_numpy()
        per_user = data.records.groupby("user").size().to_numpy()
        return str(getattr(data, "name", "dataset")), xy, function, per_user, "records per user"
    if hasattr(data, "candidates") and hasattr(data, "candidate_function"):  # data.windows.Windows
        xy = np.asarray(data.candidates, dtype=float)
        codes = np.asarray(data.candidate_function, dtype=np.int64)
        names = np.array(list(FUNCTIONS) + [UNKNOWN_FUNCTION], dtype=object)
        function = names[np.where((codes >= 0) & (codes < len(FUNCTIONS)), codes, len(FUNCTIONS))]
        users = np.asarray(data.subuser_user)[np.asarray(data.subuser)]
        per_user = np.bincount(users)
        per_user = per_user[per_user > 0]
        name = str(getattr(data, "meta", {}).get("dataset", "dataset"))
        return name, xy, function, per_user, "records per user (in kept sub-users)"
    raise ConfigError("plot_dataset_overview: expected a MobilityData (data.sources.load_records) or Windows "
                      f"(data.prepare.prepare), got {type(data).__name__}")


@styled
def plot_dataset_overview(data: Any, *, max_points: int = 60_000, seed: int = 0) -> Figure:
    """Map of a dataset's candidate locations coloured by function, and the histogram of records per user.

    data        a `MobilityData` (records + location table; counts every loaded record) or a `Windows`
                (candidates + kept sub-users; counts the records that survive sub-user cutting)
    max_points  locations drawn at most (a seeded random subset beyond; the legend counts all of them)

    Left: every candidate location at its x/y (metres on the dataset's local plane, east/north of the
    centre), coloured by its function (schema.FUNCTIONS; Unknown grey). Right: users by number of records,
    log-spaced bins when counts span decades, median marked.
    """
    name, xy, function, per_user, count_label = _overview_inputs(data)
    if len(xy) == 0 or len(per_user) == 0:
        raise ConfigError(f"plot_dataset_overview: dataset '{name}' has no locations or no records")
    fig = new_figure((11, 5.8))
    ax_map, ax_hist = fig.subplots(1, 2, width_ratios=[1.15, 1])
    draw = np.arange(len(xy))
    if len(xy) > max_points:
        draw = np.sort(np.random.default_rng(seed).choice(len(xy), size=max_points, replace=False))
    size = float(np.clip(8_000 / len(draw), 0.5, 12))
    # largest class first, so a small class (NYC: 585 Residential venues among 8,332 Commercial ones) is drawn
    # on top instead of hidden; Unknown (grey) always underneath; the legend keeps the schema's order
    present = [f for f in FUNCTIONS if f in set(function)] + sorted(set(function) - set(FUNCTIONS))
    size_of = {f: int((function == f).sum()) for f in present}
    order = sorted(present, key=lambda f: (f != UNKNOWN_FUNCTION, -size_of[f]))
    for f in order:
        mine = draw[function[draw] == f]
        ax_map.scatter(xy[mine, 0], xy[mine, 1], s=size, color=FUNCTION_COLORS.get(f, "#444444"),
                       label=f"{f} ({size_of[f]:,})", linewidths=0, alpha=0.8, rasterized=True)
    plane_axes(ax_map, f"{len(xy):,} candidate locations by function", adjustable="datalim")
    handles, labels = ax_map.get_legend_handles_labels()
    legend_order = sorted(range(len(order)), key=lambda i: present.index(order[i]))
    ax_map.legend([handles[i] for i in legend_order], [labels[i] for i in legend_order],
                  title="function (number of locations; smaller classes drawn on top)",
                  markerscale=max(1.0, 6 / math.sqrt(size)),
                  loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=3, frameon=False)

    counts = np.asarray(per_user, dtype=float)
    log = spans_decades(counts)                          # log-spaced bins when counts span decades
    sns.histplot(counts, bins=30 if log else min(30, max(5, int(np.ptp(counts)) + 1)), log_scale=log,
                 color="#4c72b0", edgecolor="white", alpha=1.0, ax=ax_hist)
    median = float(np.median(counts))
    ax_hist.axvline(median, color="black", linestyle="--", linewidth=1.2, label=f"median {median:,.0f}")
    ax_hist.set(xlabel=f"{count_label} (count)", ylabel="users (count)",
                title=f"{len(counts):,} users, {int(counts.sum()):,} records")
    ax_hist.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax_hist.legend(loc="upper right")
    fig.suptitle(f"Dataset '{name}': where the candidate locations are, and how active users are")
    return fig


# ---------------------------------------------------------------------------------------------------
# 01: training

FLOOR_STYLES = {"last_location": (0, (1, 1.5)), "user_most_frequent": "-.", "window_time": (0, (6, 2))}


@styled
def plot_training_curves(history: pd.DataFrame, steps: pd.DataFrame | None = None, *,
                         title: str | None = None, smooth: int = 20, floors: pd.DataFrame | None = None) -> Figure:
    """Training loss per batch (left) and validation Hit@1/5/10 per epoch (right) of one train() run.

    history  history.csv: epoch, val_hit@1, val_hit@5, val_hit@10 (train_loss is used when steps is None)
    steps    steps.csv: epoch, step, loss, and distance_m (regression head, metres) or cross_entropy (ranking
             head, nats); None draws history's per-epoch train_loss instead
    smooth   rolling-mean window (batches) drawn over the raw per-batch loss (at most a fifth of the run)
    floors   the training-free floors on the same validation windows (results.training_floor_table): floor,
             val_hit@1, val_hit@10, val_dist_median_m; drawn as horizontal lines in the Hit@k colours

    The best validation point by Hit@10 (the one whose checkpoint is tested; 0 = the untrained start) is marked;
    Hit@1 and Hit@10 carry their 95% intervals as bands where the history has them. A regression run (its history
    has train_distance_m) gets a third panel: the validation median distance error in metres, the metric that
    moves, with the floors' median errors.
    """
    hits = ["val_hit@1", "val_hit@5", "val_hit@10"]
    require_columns(history, ["epoch", *hits], "plot_training_curves (history)")
    if steps is not None:
        require_columns(steps, ["epoch", "step", "loss"], "plot_training_curves (steps)")
    elif "train_loss" not in history.columns:
        raise ConfigError("plot_training_curves: steps is None and history lacks column 'train_loss'; "
                          "pass steps.csv or a history with train_loss")
    regression = "train_distance_m" in history.columns and "val_dist_median_m" in history.columns
    fig = new_figure((11, 5.2))
    ax_loss, ax_val, *ax_dist = fig.subplots(1, 3 if regression else 2)

    if steps is not None:
        s = steps.sort_values("step", kind="stable")
        part = next((c for c in ("distance_m", "cross_entropy") if c in s.columns), None)
        unit = {"distance_m": "metres + λ·entropy", "cross_entropy": "nats"}.get(part or "", "loss units")
        window = max(1, min(int(smooth), len(s) // 5))  # a window as long as the run would be a cumulative mean
        ax_loss.plot(s["step"], s["loss"], color="0.6", linewidth=0.8, label="loss (per batch)")
        if window > 1:
            ax_loss.plot(s["step"], s["loss"].rolling(window, min_periods=1).mean(), color=NEXTLOCMOE_RED,
                         linewidth=2, label=f"loss ({window}-batch mean)")
        if part is not None:
            ax_loss.plot(s["step"], s[part].rolling(window, min_periods=1).mean(), color="#2c7fb8",
                         linestyle="--", linewidth=1.5,
                         label=f"{part} part ({window}-batch mean)" if window > 1 else f"{part} part")
        starts = s.groupby("epoch")["step"].min().sort_index().to_numpy()[1:]
        for k, x in enumerate(starts):
            ax_loss.axvline(x - 0.5, color="black", linestyle=":", linewidth=1,
                            label="epoch boundary" if k == 0 else None)
        if spans_decades(s["loss"].to_numpy(), 50):
            ax_loss.set_yscale("log")
        ax_loss.set(xlabel="training batch (step)", ylabel=f"training loss ({unit})",
                    title="Training loss per batch")
    else:
        unit = "metres + λ·entropy" if "train_distance_m" in history.columns else \
            "nats" if "train_cross_entropy" in history.columns else "loss units"
        ax_loss.plot(history["epoch"], history["train_loss"], marker="o", color=NEXTLOCMOE_RED,
                     label="mean training loss")
        ax_loss.set(xlabel="epoch", ylabel=f"training loss ({unit})", title="Mean training loss per epoch")
        if len(history) <= 12:
            ax_loss.set_xticks(history["epoch"].to_numpy())
    ax_loss.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_loss.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)

    h = history.sort_values("epoch", kind="stable")
    # x: training windows seen when the history has them (0 = the untrained start), else the epoch
    x_col = "train_windows" if "train_windows" in h.columns and h["train_windows"].notna().all() else "epoch"
    colors = dict(zip(hits, ("#9ecae1", "#4292c6", "#08306b")))
    for column, marker in zip(hits, ("o", "s", "^")):
        ax_val.plot(h[x_col], h[column], marker=marker, color=colors[column], linewidth=1.8,
                    label=metric_label(column.removeprefix("val_")))
        if column != "val_hit@5" and {f"{column}_lo", f"{column}_hi"} <= set(h.columns):
            ax_val.fill_between(h[x_col], h[f"{column}_lo"], h[f"{column}_hi"], color=colors[column], alpha=0.15,
                                linewidth=0)
    floor_rows = [] if floors is None else floors.to_dict("records")
    for values in floor_rows:
        style = FLOOR_STYLES.get(values["floor"], ":")
        for column in ("val_hit@1", "val_hit@10"):
            if np.isfinite(values.get(column, np.nan)):
                ax_val.axhline(values[column], color=colors[column], linestyle=style, linewidth=1.3)
        ax_val.plot([], [], color="0.35", linestyle=style, label=f"floor: {values['floor']} (Hit@1, Hit@10)")
    best = h.loc[h["val_hit@10"].idxmax()]
    best_name = "the untrained start" if int(best["epoch"]) == 0 else f"epoch {int(best['epoch'])}"
    ax_val.axvline(best[x_col], color=NEXTLOCMOE_RED, linestyle="--", linewidth=1.2,
                   label=f"best: {best_name} (Hit@10 {best['val_hit@10']:.3f})")
    floor_top = max([float(v[k]) for v in floor_rows for k in ("val_hit@1", "val_hit@10") if np.isfinite(v.get(k, np.nan))],
                    default=0.0)
    ax_val.set_ylim(0, max(0.05, float(h[hits].max().max()) * 1.15, floor_top * 1.1))
    xlabel = "training windows seen (0 = untrained)" if x_col == "train_windows" else "epoch (0 = untrained)"
    ax_val.set(xlabel=xlabel, ylabel="validation Hit@k (fraction of windows)", title="Validation Hit@k per validation point")
    if len(h) <= 12:
        ax_val.set_xticks(h[x_col].to_numpy())
    ax_val.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)
    if ax_dist:
        ax = ax_dist[0]
        ax.plot(h[x_col], h["val_dist_median_m"], marker="o", color=NEXTLOCMOE_RED, linewidth=1.8,
                label="the model")
        for values in floor_rows:
            if np.isfinite(values.get("val_dist_median_m", np.nan)):
                ax.axhline(values["val_dist_median_m"], color="0.35", linestyle=FLOOR_STYLES.get(values["floor"], ":"),
                           linewidth=1.3, label=f"floor: {values['floor']}")
        ax.set(xlabel=xlabel, ylabel="validation median error (m)", title="Median distance error")
        ax.set_ylim(bottom=0)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)
        ax.grid(alpha=0.3)
    fig.suptitle(title or "Training NextLocMoE: training loss per " + ("batch" if steps is not None else "epoch")
                 + " and validation accuracy per epoch")
    return fig


# ---------------------------------------------------------------------------------------------------
# 02 / 03: supervised and zero-shot tables

def _grouped_bars(table: pd.DataFrame, metrics: Sequence[str], what: str, suptitle: str,
                  panel_title: Callable[[str], str]) -> Figure:
    """One panel per dataset: groups = metrics, one bar per (method, variant) in the method's colour.

    Every bar carries gid 'dataset|method|variant|metric' so a reader (or test) can find its number. Where the
    table holds a metric's 95% interval ("<metric>_lo", "<metric>_hi"), the bar gets an asymmetric error bar
    (an ErrorbarContainer whose artists carry gid 'dataset|method|variant|interval'); interval bounds are never
    bars of their own.
    """
    t = tidy(table, what)
    metrics = [m for m in metrics if not is_interval_metric(m)]   # bounds are error bars, not bars
    if not metrics:
        raise ConfigError(f"{what}: metrics is empty; expected e.g. {list(DEFAULT_METRICS)}")
    require_metrics(t, metrics, what)
    bounds = [f"{m}{suffix}" for m in metrics for suffix in ("_lo", "_hi")]
    t = t[t["metric"].isin(metrics + bounds)]
    datasets = list(dict.fromkeys(t["dataset"]))
    keys = series_keys(t[t["metric"].isin(metrics)])
    styles = series_styles(keys)
    values = t.groupby(["dataset", "method", "variant", "metric"], sort=False)["value"].first()

    n = len(datasets)
    width_per = max(4.5, 0.16 * len(keys) * len(metrics) + 1.5)
    fig = new_figure((min(11.0, max(9.0, width_per * n + 1.0)), 6.0))
    axes = np.atleast_1d(fig.subplots(1, n, sharey=True, squeeze=False)[0])
    top = 0.0
    with_intervals = False
    for ax, dataset in zip(axes, datasets):
        present = [k for k in keys if any((dataset, k[0], k[1], m) in values.index for m in metrics)]

        def value(key: SeriesKey, metric: str, dataset: str = dataset) -> float:
            return float(values.get((dataset, key[0], key[1], metric), np.nan))

        bars = dodged_bars(ax, value, metrics, present, styles)
        for (key, metric), bar in bars.items():
            bar.set_gid(f"{dataset}|{key[0]}|{key[1]}|{metric}")
            top = max(top, bar.get_height())
        for key in present:
            drawn_bars = [(m, bars[(key, m)]) for m in metrics if (key, m) in bars]
            heights = [bar.get_height() for _, bar in drawn_bars]
            lo, hi = ([value(key, f"{m}{suffix}") for m, _ in drawn_bars] for suffix in ("_lo", "_hi"))
            err, drawn = interval_errors(heights, lo, hi)
            if drawn.any():
                centres = np.array([bar.get_x() + bar.get_width() / 2 for _, bar in drawn_bars])
                draw_errorbars(ax, centres[drawn], np.asarray(heights)[drawn], err[:, drawn],
                               f"{dataset}|{key[0]}|{key[1]}|interval")
                top = max(top, float(np.nanmax(np.asarray(hi)[drawn])))
                with_intervals = True
        ax.set_xticks(np.arange(len(metrics)), [metric_label(m) for m in metrics])
        ax.set_title(panel_title(dataset))
        ax.set_xlabel("metric (test split)")
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    axes[0].set_ylabel(metric_axis_label(metrics))
    if is_score(metrics):
        axes[0].set_ylim(0, min(1.05, max(0.1, top * 1.12)))
    handles: list[Any] = legend_handles(styles)
    if with_intervals:
        handles.append(interval_handle())
    labels = [str(h.get_label()) for h in handles]
    legend = fig.legend(handles=handles, loc="outside lower center", title="method (kind)",
                        ncols=legend_ncols(labels, fig.get_figwidth()), frameon=False)
    bold_legend(legend, styles)
    fig.suptitle(suptitle)
    return fig


@styled
def plot_supervised(table: pd.DataFrame, metrics: Sequence[str] = DEFAULT_METRICS) -> Figure:
    """Fully supervised results (results/supervised.csv): Hit@1/5/10 and MRR of every method, per dataset.

    table    tidy: method, kind, dataset, variant, metric, value (one panel per dataset)
    metrics  the groups of bars, in order; each must be in the table (ConfigError names a missing one)
    """
    return _grouped_bars(table, metrics, "plot_supervised",
                         "Fully supervised next-location prediction: accuracy on the test split (higher is better)",
                         lambda dataset: f"dataset: {dataset}")


def _pair_title(dataset: str) -> str:
    if "->" in dataset:
        source, target = dataset.split("->", 1)
        return f"train {source} → test {target}"
    return dataset


@styled
def plot_zero_shot(table: pd.DataFrame, metrics: Sequence[str] = DEFAULT_METRICS) -> Figure:
    """Zero-shot transfer results (results/zero_shot.csv): one panel per "source->target" pair.

    Bars are (method, variant): NextLocMoE zero-shot next to NextLocMoE trained on the target (a lighter
    shade of the same colour), the history-only and LLM-Mob references in their own colours.
    """
    return _grouped_bars(table, metrics, "plot_zero_shot",
                         "Zero-shot transfer: trained on a source city, tested on another without fine-tuning",
                         _pair_title)


# ---------------------------------------------------------------------------------------------------
# 04: ablations

@styled
def plot_ablations(table: pd.DataFrame, metric: str = "hit@10", reference: str = "full") -> Figure:
    """Ablations (results/ablations.csv): one horizontal bar per variant, the full model marked.

    Beside every bar the difference to the `reference` variant is printed (absolute, in the metric's units).
    For distance/latency metrics lower is better; the sign of "better" in the colours follows that.
    One panel per dataset. Where the table holds the metric's 95% interval ("<metric>_lo", "<metric>_hi"), every
    bar gets an asymmetric horizontal error bar (an ErrorbarContainer whose artists carry
    gid 'dataset|interval').
    """
    if is_interval_metric(metric):
        raise ConfigError(f"plot_ablations: '{metric}' is the bound of an interval (drawn as error bars); "
                          f"pass the metric itself, e.g. '{metric[:-3]}'")
    t = tidy(table, "plot_ablations")
    require_metrics(t, [metric], "plot_ablations")
    bounds = t[t["metric"].isin([f"{metric}_lo", f"{metric}_hi", f"paired_{metric}_p"])]
    bounds = bounds.groupby(["dataset", "method", "variant", "metric"], sort=False)["value"].first()
    t = t[t["metric"] == metric]
    if reference not in set(t["variant"]):
        raise ConfigError(f"plot_ablations: no variant '{reference}' (the reference) in the table; "
                          f"variants are {sorted(set(t['variant']))}")
    datasets = list(dict.fromkeys(t["dataset"]))
    lower = lower_is_better(metric)
    n_rows = max(len(t[t["dataset"] == d]) for d in datasets)
    heads = list(dict.fromkeys(t.loc[t["kind"] != "baseline", "method"]))   # the models ablated, not the floor
    fig = new_figure((min(12.0, 5.5 * len(datasets) + 4.5), min(7.0, max(4.5, 0.38 * n_rows + 1.8))))
    axes = np.atleast_1d(fig.subplots(1, len(datasets), squeeze=False)[0])
    with_intervals = False
    for ax, dataset in zip(axes, datasets):
        d = t[t["dataset"] == dataset].drop_duplicates(["method", "variant"])
        several_heads = d.loc[d["kind"] != "baseline", "method"].nunique() > 1
        ref_rows = d[d["variant"] == reference]
        if ref_rows.empty:
            raise ConfigError(f"plot_ablations: dataset '{dataset}' has no '{reference}' variant")
        ref_value = float(ref_rows["value"].iloc[0])
        d = pd.concat([ref_rows.iloc[:1], d.drop(ref_rows.index[:1])])
        labels = [f"{m} · {v}" if several_heads or k == "baseline" else v
                  for m, v, k in zip(d["method"], d["variant"], d["kind"])]
        is_ref = (d["variant"] == reference).to_numpy()
        colors = [NEXTLOCMOE_RED if r else "#9fb3c8" for r in is_ref]
        hatches = ["" if r else KIND_HATCHES.get(k, "") for r, k in zip(is_ref, d["kind"])]
        y = np.arange(len(d))
        bars = ax.barh(y, d["value"].to_numpy(dtype=float), color=colors, edgecolor="black", linewidth=0.6)
        for bar, hatch, variant, method in zip(bars, hatches, d["variant"], d["method"]):
            bar.set_hatch(hatch)
            bar.set_gid(f"{dataset}|{method}|{variant}|{metric}")
        ax.axvline(ref_value, color=NEXTLOCMOE_RED, linestyle="--", linewidth=1.2)
        widths = d["value"].to_numpy(dtype=float)
        lo = [float(bounds.get((dataset, m, v, f"{metric}_lo"), np.nan)) for m, v in zip(d["method"], d["variant"])]
        hi = np.array([float(bounds.get((dataset, m, v, f"{metric}_hi"), np.nan))
                       for m, v in zip(d["method"], d["variant"])])
        err, drawn = interval_errors(widths, lo, hi)
        if drawn.any():
            draw_errorbars(ax, widths[drawn], y[drawn], err[:, drawn], f"{dataset}|interval", vertical=False)
            with_intervals = True
        method_of, variant_of = list(d["method"]), list(d["variant"])
        ends = np.where(drawn, hi, widths)                                     # where a bar's drawing ends
        span = float(np.nanmax(ends)) if np.isfinite(ends).any() else 1.0
        for yi, value, end, r in zip(y, widths, ends, is_ref):
            if not np.isfinite(value):
                ax.text(0, yi, " n/a", va="center", fontsize=9)
                continue
            if r:
                text, color = f"{fmt_number(value)}  (reference)", "black"
            else:
                diff = value - ref_value
                better = diff < 0 if lower else diff > 0
                p = float(bounds.get((dataset, method_of[yi], variant_of[yi], f"paired_{metric}_p"), np.nan))
                beyond = np.isfinite(p) and p < PAIRED_ALPHA          # colour only what a paired test shows
                color = ("#1a7f37" if better else "#b42318") if beyond and diff != 0 else "0.3"
                text = f"{fmt_number(value)}  (Δ {diff:+.3g}" + (f", p = {format_p(p)})" if np.isfinite(p) else ")")
            ax.text(end + 0.01 * span, yi, text, va="center", fontsize=9, color=color)
        ax.set_yticks(y, labels)
        for tick, r in zip(ax.get_yticklabels(), is_ref):
            if r:
                tick.set_fontweight("bold")
        ax.invert_yaxis()
        ax.set_xlim(0, span * 1.6 if span > 0 else 1)                      # room for the printed differences
        ax.set(xlabel=metric_axis_label([metric]), title=f"dataset: {dataset}")
        ax.grid(axis="x", alpha=0.3)
        ax.set_axisbelow(True)
    handles = [Patch(facecolor=NEXTLOCMOE_RED, edgecolor="black", label=f"'{reference}' model (reference)"),
               Patch(facecolor="#9fb3c8", edgecolor="black", hatch=KIND_HATCHES["ablation"],
                     label="ablated variant (kind: ablation)"),
               Line2D([], [], color="#1a7f37", marker="s", linestyle="", label="Δ better, paired p < 0.05"),
               Line2D([], [], color="#b42318", marker="s", linestyle="", label="Δ worse, paired p < 0.05"),
               Line2D([], [], color="0.3", marker="s", linestyle="", label="Δ within noise (or no paired test)")]
    if with_intervals:
        handles.append(interval_handle(vertical=False))
    fig.legend(handles=handles, loc="outside lower center", frameon=False,
               ncols=legend_ncols([str(h.get_label()) for h in handles], fig.get_figwidth()))
    direction = "lower is better" if lower else "higher is better"
    fig.suptitle(f"Ablations of NextLocMoE ({', '.join(heads)})\n{metric_label(metric)} per variant vs the full model "
                 f"({direction})")
    return fig


# ---------------------------------------------------------------------------------------------------
# 05: efficiency

THROUGHPUT_MEASURES = (  # (label, metric of a scoring model, metric of the generative baseline)
    ("training", "train_samples_per_s", None),
    ("inference\nbatch 1", "infer_samples_per_s_b1", "gen_samples_per_s_b1"),
    ("inference\nbest batch", "infer_samples_per_s_best", "gen_samples_per_s_best"),
)
RATIO_LABELS = {"speedup_vs_generation_b1": "ours best\n÷ LLM-Mob\nbatch 1",
                "speedup_best_vs_best": "ours best\n÷ LLM-Mob\nbest batch"}


@styled
def plot_efficiency(table: pd.DataFrame, dataset: str | None = None, paper_claim: float | None = 600.0) -> Figure:
    """Efficiency (results/efficiency.csv): throughput by method, the batch sweep, and NextLocMoE/LLM-Mob ratios.

    Left: samples/s for training, inference at batch 1 and at the best batch of the sweep (for llm_mob,
    generation of its answer); log scale when values span decades. Middle: inference (generation) samples/s
    against batch size. Right: the rows of method 'nextlocmoe_vs_llm_mob' (speedup_vs_generation_b1,
    speedup_best_vs_best), log scale, 1x = equal speed, `paper_claim` (the paper's "up to 600x") dashed.
    """
    t = tidy(table, "plot_efficiency")
    if dataset is None:
        datasets = list(dict.fromkeys(t["dataset"]))
        if len(datasets) > 1:
            raise ConfigError(f"plot_efficiency: the table holds datasets {datasets}; pass dataset=...")
        dataset = datasets[0]
    elif dataset not in set(t["dataset"]):
        raise ConfigError(f"plot_efficiency: dataset='{dataset}' is not in the table ({sorted(set(t['dataset']))})")
    t = t[t["dataset"] == dataset]
    throughput = [m for _, a, b in THROUGHPUT_MEASURES for m in (a, b) if m]
    if not t["metric"].isin(throughput).any():
        raise ConfigError(f"plot_efficiency: the table has no throughput metric; expected some of {throughput}")
    ratios = t[(t["method"] == "nextlocmoe_vs_llm_mob") & t["metric"].isin(list(RATIO_LABELS))]
    if ratios.empty:
        raise ConfigError("plot_efficiency: the table lacks method 'nextlocmoe_vs_llm_mob' with metrics "
                          f"{list(RATIO_LABELS)} (the NextLocMoE vs LLM-Mob ratios)")
    values = t.groupby(["method", "metric"], sort=False)["value"].first()
    keys = series_keys(t[t["kind"] != "comparison"])          # the ratio row is the right panel, not a series
    styles = series_styles(keys, with_variant=False)

    fig = new_figure((11, 5.6))
    ax_bar, ax_sweep, ax_ratio = fig.subplots(1, 3, width_ratios=[1.35, 1.1, 0.8])
    measures = {label: (scoring, generating) for label, scoring, generating in THROUGHPUT_MEASURES}

    def measure(key: SeriesKey, label: str) -> str | None:
        """The metric a method reports for a throughput measure: its scoring one, else its generation one."""
        scoring, generating = measures[label]
        return scoring if (key[0], scoring) in values.index else generating

    def throughput_of(key: SeriesKey, label: str) -> float:
        name = measure(key, label)
        return float(values.get((key[0], name), np.nan)) if name else np.nan

    bars = dodged_bars(ax_bar, throughput_of, list(measures), keys, styles)
    drawn = []
    for (key, label), bar in bars.items():
        h = bar.get_height()
        bar.set_gid(f"{dataset}|{key[0]}|{key[1]}|{measure(key, label)}")
        drawn.append(h)
        ax_bar.annotate(fmt_number(h), (bar.get_x() + bar.get_width() / 2, h), xytext=(0, 2),
                        textcoords="offset points", ha="center", va="bottom", fontsize=9, rotation=90)
    if spans_decades(drawn, 10):
        ax_bar.set_yscale("log")
        ax_bar.set_ylim(min(drawn) / 2, max(drawn) * 30)
    elif drawn:
        ax_bar.set_ylim(0, max(drawn) * 1.35)
    ax_bar.set_xticks(np.arange(len(measures)), list(measures))
    ax_bar.set(ylabel="throughput (samples/s)", title="Throughput by method\n(llm_mob: generating its answer)")
    ax_bar.grid(axis="y", alpha=0.3)
    ax_bar.set_axisbelow(True)

    sweep: list[float] = []
    for key in keys:
        method = key[0]
        points = []
        for metric in t.loc[t["method"] == method, "metric"].unique():
            if m := re.fullmatch(r"(?:infer|gen)_samples_per_s_b(\d+)", metric):
                points.append((int(m.group(1)), float(values[(method, metric)])))
        if not points:
            continue
        points.sort()
        style = styles[key]
        ax_sweep.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=style["color"],
                      linewidth=2.2 if style["bold"] else 1.4, label=key[0])
        sweep += [p[1] for p in points]
    if sweep:
        ax_sweep.set_xscale("log", base=2)
        if spans_decades(sweep, 10):
            ax_sweep.set_yscale("log")
        ax_sweep.xaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:g}"))
    else:
        ax_sweep.text(0.5, 0.5, "no batch sweep in the table", ha="center", va="center", transform=ax_sweep.transAxes)
    ax_sweep.set(xlabel="batch size (samples)", ylabel="throughput (samples/s)",
                 title="Inference / generation\nthroughput vs batch size")
    ax_sweep.grid(alpha=0.3)

    ratio_metrics = [m for m in RATIO_LABELS if m in set(ratios["metric"])]
    ratio_values = [float(ratios.loc[ratios["metric"] == m, "value"].iloc[0]) for m in ratio_metrics]
    ratio_bars = ax_ratio.bar(np.arange(len(ratio_metrics)), ratio_values, 0.6, color=NEXTLOCMOE_RED,
                              hatch=KIND_HATCHES["comparison"], edgecolor="black", linewidth=1.0)
    for bar, metric, v in zip(ratio_bars, ratio_metrics, ratio_values):
        bar.set_gid(f"{dataset}|nextlocmoe_vs_llm_mob|samples/s ratio|{metric}")
        if np.isfinite(v):
            ax_ratio.annotate(f"{v:,.3g}×", (bar.get_x() + bar.get_width() / 2, v), xytext=(0, 3),
                              textcoords="offset points", ha="center", va="bottom", fontsize=10, fontweight="bold")
    ax_ratio.axhline(1.0, color="black", linewidth=1, label="1× (equal speed)")
    finite = [v for v in ratio_values if np.isfinite(v) and v > 0]
    top = max(finite + [1.0])
    if paper_claim is not None:
        ax_ratio.axhline(paper_claim, color="0.3", linestyle="--", linewidth=1.2,
                         label=f"paper: up to {paper_claim:g}×")
        top = max(top, paper_claim)
    ax_ratio.set_yscale("log")
    ax_ratio.set_ylim(min(finite + [1.0]) / 3, top * 6)
    ax_ratio.set_xticks(np.arange(len(ratio_metrics)), [RATIO_LABELS[m] for m in ratio_metrics], fontsize=9)
    ax_ratio.set(ylabel="speed ratio (×, samples/s over samples/s)", title="NextLocMoE vs LLM-Mob")
    ax_ratio.legend(loc="upper right")
    legend = fig.legend(handles=legend_handles(styles), loc="outside lower center", title="method (kind)",
                        ncols=legend_ncols([s["label"] for s in styles.values()], fig.get_figwidth()), frameon=False)
    bold_legend(legend, styles)
    fig.suptitle(f"Efficiency on '{dataset}': how many samples per second each method processes")
    return fig


# ---------------------------------------------------------------------------------------------------
# 05: benchmarks/bench_moe.py

MOE_BENCH_LABELS = {"ffn": "dense FFN", "lora_ffn": "FFN + one LoRA", "moe_threshold": "MoE, threshold (5 active)",
                    "moe_threshold_sharp": "MoE, threshold (sharp gates)", "moe_topk2": "MoE, top-2",
                    "naive_threshold": "naive: 11 FFN copies"}


@styled
def plot_moe_benchmark(table: pd.DataFrame, device: str | None = None) -> Figure:
    """results/bench_moe.csv: forward + backward time of one Personalized MoE layer relative to a dense FFN.

    One panel per width (SmolLM2, LLaMA-3.2-3B shapes); one bar per (method, expert_compute), the value
    `x_ffn` (median time / the dense FFN's median time); the design target of 1.5x is drawn. `device` (e.g.
    the results file's provenance) goes into the title.
    """
    require_columns(table, ("width", "tokens", "method", "x_ffn", "expert_compute", "active_experts"),
                    "plot_moe_benchmark")
    widths = list(dict.fromkeys(table["width"]))
    keys = list(dict.fromkeys(zip(table["method"], table["expert_compute"])))      # one row per variant
    fig = new_figure((11, 5))
    axes = fig.subplots(1, len(widths), squeeze=False, sharey=True)[0]
    labels = [MOE_BENCH_LABELS.get(m, m) + (f" [{c}]" if m.startswith("moe") else "") for m, c in keys]
    for ax, width in zip(axes, widths):
        rows = table[table["width"] == width].set_index(["method", "expert_compute"])
        for i, (method, compute) in enumerate(keys):
            if (method, compute) not in rows.index:
                continue
            value = float(rows.loc[(method, compute), "x_ffn"])
            bar = ax.barh(i, value, color=NEXTLOCMOE_RED if method.startswith("moe") else "#7f7f7f")[0]
            bar.set_gid(f"{width}|{method}|{compute}")
            ax.text(value * 1.08, i, f"{value:.2f}x", va="center", fontsize=9,
                    bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5})
        ax.axvline(1.5, color="black", linestyle="--", linewidth=1, label="target 1.5x", zorder=0)
        ax.set_xscale("log")
        ax.set_xlim(0.8, float(rows["x_ffn"].max()) * 3.0)
        ax.set_yticks(range(len(keys)), labels)
        ax.set_xlabel("x dense FFN time (log scale)")
        ax.set_title(f"{width} width, {int(rows['tokens'].iloc[0]):,} tokens")
        ax.legend(loc="upper right")
    axes[0].invert_yaxis()
    fig.suptitle("Personalized MoE layer, forward + backward (median): shared-base LoRA experts vs a dense FFN"
                 + (f"\n{device}" if device else ""))
    return fig
