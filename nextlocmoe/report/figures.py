"""Every figure of the notebooks, drawn from results files and from the frames of `nextlocmoe.analysis`.

One direction of flow: experiments write tidy results files, notebooks read them and call a
function here, which returns a matplotlib `Figure`; `save_figure` writes it to figures/ as a PNG. Nothing
here trains, evaluates or reads a model.

    plot_dataset_overview(data)              map of candidate locations by function + records per user (nb 00)
    plot_training_curves(history, steps)     per-batch training loss, per-epoch validation Hit@k (nb 01)
    plot_supervised(table)                   grouped bars of Hit@1/5/10 and MRR per method, per dataset (nb 02)
    plot_zero_shot(table)                    the same for source->target pairs (nb 03)
    plot_ablations(table, metric)            one bar per variant, difference to the full model printed (nb 04)
    plot_efficiency(table)                   throughput, batch sweep, NextLocMoE / LLM-Mob speed ratios (nb 05)
    plot_role_expert_heatmap(df)             P-MoE gate probability by true role, one heatmap per layer (nb 06)
    plot_function_gate_heatmap(df)           Location-MoE gate by true category, row-normalised (nb 06)
    plot_active_experts(df)                  how many role experts threshold routing keeps per token (nb 06)
    plot_routing_entropy(df)                 gate entropies over training steps, epochs marked (nb 06)
    plot_prediction_map(df, candidates)      targets vs predicted points and retrieved places, metres (nb 06)
    save_figure(fig, path)                   atomic PNG write, closes the figure

Tidy results tables have the columns experiment, method, kind, dataset, variant, metric, value (one row per
number; `nextlocmoe.results`). Every method keeps one colour in every figure (its registry entry; NextLocMoE's rows
are red with a black edge), and a method's `kind` (paper method, extension, baseline, ablation, comparison,
reference) is its bar hatch (`KIND_HATCHES`) and is written in the legend. Where a table holds a metric's 95%
interval ("<metric>_lo" / "<metric>_hi", from `metrics.retrieval_metrics`), the accuracy bars carry it as an
asymmetric error bar; tables without them (written before intervals existed) draw plain bars.

Figures are built with `matplotlib.figure.Figure` (Agg canvas), never through pyplot's global figure
manager, so drawing many figures in a loop or a test leaks nothing and needs no display. An input that lacks
a column or a metric raises `ConfigError` naming it.
"""

from __future__ import annotations

import functools
import math
import os
import re
import sys
import zlib
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize, to_rgb
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import FuncFormatter, MaxNLocator

from ..data.schema import FUNCTIONS, ROLES, UNKNOWN_FUNCTION
from ..errors import ConfigError
from ..experiments.registry import METHODS
from ..io import atomic_path
from ..results import TIDY_COLUMNS, is_interval_metric

__all__ = [
    "KIND_HATCHES", "FUNCTION_COLORS", "TOKEN_KIND_COLORS", "TIDY_COLUMNS",
    "method_color", "metric_label", "save_figure",
    "plot_dataset_overview", "plot_training_curves", "plot_supervised", "plot_zero_shot", "plot_ablations",
    "plot_efficiency", "plot_role_expert_heatmap", "plot_function_gate_heatmap", "plot_active_experts",
    "plot_routing_entropy", "plot_prediction_map",
]

# ---------------------------------------------------------------------------------------------------
# fixed styles: one colour per method, one hatch per kind, one colour per location function

NEXTLOCMOE_RED = "#c0392b"
# one colour per method: the method registry's (nextlocmoe.experiments.registry; NextLocMoE's rows are red)
# palette for methods this table does not name; crc32 of the name picks the colour, so it is stable
_FALLBACK_COLORS = ("#17becf", "#bcbd22", "#9467bd", "#e377c2", "#7f7f7f", "#8c564b", "#1f77b4", "#2ca02c")

KIND_HATCHES: dict[str, str] = {
    "paper method": "",
    "baseline": "",
    "extension": "//",
    "ablation": "..",
    "comparison": "xx",
    "reference": "\\\\",
}

FUNCTION_COLORS: dict[str, str] = {
    "Entertainment": "#e7298a",
    "Commercial": "#d95f02",
    "Education": "#1b9e77",
    "Public": "#7570b3",
    "Residential": "#e6ab02",
    UNKNOWN_FUNCTION: "#b3b3b3",
}

TOKEN_KIND_COLORS: dict[str, str] = {"prompt": "#969696", "history": "#2c7fb8", "current": "#e6550d"}

FONT = {"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "xtick.labelsize": 9,
        "ytick.labelsize": 9, "legend.fontsize": 9, "figure.titlesize": 12, "hatch.linewidth": 0.6}

DEFAULT_METRICS = ("hit@1", "hit@5", "hit@10", "mrr")

F = TypeVar("F", bound=Callable[..., Figure])


# ---------------------------------------------------------------------------------------------------
# small helpers

def _styled(func: F) -> F:
    """Draw under the module's font sizes (fonts are fixed when an artist is made, so this holds on save)."""
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Figure:
        with matplotlib.rc_context(FONT):
            return func(*args, **kwargs)
    return wrapper  # type: ignore[return-value]


def _figure(figsize: tuple[float, float]) -> Figure:
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def method_color(method: str) -> str:
    """The fixed colour of a method in every figure (stable for methods the registry does not list)."""
    if method in METHODS:
        return METHODS[method].color
    return _FALLBACK_COLORS[zlib.crc32(method.encode()) % len(_FALLBACK_COLORS)]


def _lighten(color: str, amount: float) -> tuple[float, float, float]:
    """Blend a colour with white; amount 0 keeps it, 1 gives white."""
    r, g, b = to_rgb(color)
    return (r + (1 - r) * amount, g + (1 - g) * amount, b + (1 - b) * amount)


def _is_nextlocmoe(method: str) -> bool:
    return str(method).startswith("nextlocmoe")


def metric_label(metric: str) -> str:
    """Readable name of a tidy metric with its unit, e.g. 'hit@10' -> 'Hit@10', 'dist_mean_m' -> '... (m)'."""
    fixed = {"mrr": "MRR", "dist_mean_m": "mean distance error (m)", "dist_median_m": "median distance error (m)",
             "n": "test windows (count)"}
    if metric in fixed:
        return fixed[metric]
    if m := re.fullmatch(r"hit@(\d+)", metric):
        return f"Hit@{m.group(1)}"
    if m := re.fullmatch(r"ndcg@(\d+)", metric):
        return f"NDCG@{m.group(1)}"
    if metric.endswith("_samples_per_s") or "_samples_per_s_" in metric:
        return f"{metric} (samples/s)"
    if metric.endswith("_ms") or "_ms_" in metric:
        return f"{metric} (ms)"
    if metric.endswith("_mib"):
        return f"{metric} (MiB)"
    return metric


def _metric_axis_label(metrics: Sequence[str]) -> str:
    if all(m.startswith("hit@") for m in metrics):
        return (metric_label(metrics[0]) if len(metrics) == 1 else "Hit@k") + " (fraction of test windows)"
    if all(re.fullmatch(r"(hit|ndcg)@\d+|mrr", m) for m in metrics):
        return "score (0-1; Hit@k = fraction of test windows)"
    if len(metrics) == 1:
        return metric_label(metrics[0])
    return "value (units of each metric)"


def _lower_is_better(metric: str) -> bool:
    return metric.startswith("dist_") or "latency" in metric or "memory" in metric


def _require_columns(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    if not isinstance(df, pd.DataFrame):
        raise ConfigError(f"{what}: expected a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ConfigError(f"{what}: input lacks column(s) {missing}; expected columns {list(columns)} "
                          f"(it has {list(df.columns)})")
    if len(df) == 0:
        raise ConfigError(f"{what}: input has no rows")


def _require_metrics(table: pd.DataFrame, metrics: Sequence[str], what: str) -> None:
    present = set(table["metric"])
    missing = [m for m in metrics if m not in present]
    if missing:
        raise ConfigError(f"{what}: the table has no metric {missing}; it has {sorted(present)}")


def _tidy(table: pd.DataFrame, what: str) -> pd.DataFrame:
    """Check the tidy schema (experiment is optional) and return a copy with a float `value`."""
    _require_columns(table, [c for c in TIDY_COLUMNS if c != "experiment"], what)
    out = table.copy()
    out["value"] = pd.to_numeric(out["value"], errors="coerce")
    for column in ("method", "kind", "dataset", "variant", "metric"):
        out[column] = out[column].astype(str)
    return out


def _series_keys(table: pd.DataFrame) -> list[tuple[str, str, str]]:
    """(method, variant, kind) of each row group, in the order the table lists them."""
    keys = table[["method", "variant", "kind"]].drop_duplicates()
    return [tuple(k) for k in keys.itertuples(index=False)]  # type: ignore[misc]


def _series_styles(keys: Sequence[tuple[str, str, str]], with_variant: bool | None = None
                   ) -> dict[tuple[str, str, str], dict[str, Any]]:
    """Colour, hatch, edge and legend label of each (method, variant, kind).

    A method's colour is fixed; when it appears in several variants (zero-shot vs trained on target), the
    later variants are lighter shades of it. The variant enters the labels when the table has several
    (with_variant=None) or as asked.
    """
    tell_variants = len({variant for _, variant, _ in keys}) > 1 if with_variant is None else with_variant
    variants_of: dict[str, list[str]] = {}
    for method, variant, _ in keys:
        variants_of.setdefault(method, [])
        if variant not in variants_of[method]:
            variants_of[method].append(variant)
    styles = {}
    for key in keys:
        method, variant, kind = key
        position = variants_of[method].index(variant)
        base = method_color(method)
        color = to_rgb(base) if position == 0 else _lighten(base, min(0.25 + 0.2 * position, 0.75))
        label = f"{method} · {variant}" if tell_variants else method
        ours = _is_nextlocmoe(method)
        styles[key] = {"color": color, "hatch": KIND_HATCHES.get(kind, "++"),
                       "edgecolor": "black" if ours else "white", "linewidth": 1.3 if ours else 0.5,
                       "label": f"{label} ({kind})", "bold": ours}
    return styles


def _legend_handles(styles: dict[Any, dict[str, Any]]) -> list[Patch]:
    return [Patch(facecolor=s["color"], hatch=s["hatch"], edgecolor=s["edgecolor"] if s["bold"] else "0.35",
                  linewidth=s["linewidth"], label=s["label"]) for s in styles.values()]


def _legend_ncols(labels: Sequence[str], width_in: float) -> int:
    """Columns of a figure legend so that its rows fit `width_in` inches (about 0.07 in per 9-pt character)."""
    column = 0.07 * max((len(label) for label in labels), default=10) + 0.7
    return int(max(1, min(len(labels), width_in * 0.95 // column)))


def _bold_legend(legend: Any, styles: dict[Any, dict[str, Any]]) -> None:
    for text, style in zip(legend.get_texts(), styles.values()):
        if style["bold"]:
            text.set_fontweight("bold")


def _thousands(value: float, _pos: Any = None) -> str:
    return f"{value:,.0f}"


def _spans_decades(values: Sequence[float] | np.ndarray, ratio: float = 30.0) -> bool:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v) & (v > 0)]
    return len(v) >= 2 and v.max() / v.min() >= ratio


def _fmt_number(value: float) -> str:
    if not np.isfinite(value):
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def _interval_errors(heights: Sequence[float], lo: Sequence[float], hi: Sequence[float]
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Asymmetric error bars of bars `heights` (N,) from their interval bounds: (err (2, N), drawn (N,) bool).

    err[0] = height - lo and err[1] = hi - height (clipped at 0, matplotlib refuses negative lengths); drawn is
    False where the height or a bound is missing (a table written before intervals existed), so those bars get
    no error bar.
    """
    heights, lo, hi = (np.asarray(v, dtype=float) for v in (heights, lo, hi))
    drawn = np.isfinite(heights) & np.isfinite(lo) & np.isfinite(hi)
    err = np.zeros((2, len(heights)))
    err[0, drawn] = np.maximum(heights[drawn] - lo[drawn], 0.0)
    err[1, drawn] = np.maximum(hi[drawn] - heights[drawn], 0.0)
    return err, drawn


ERRORBAR_STYLE = {"fmt": "none", "ecolor": "0.15", "elinewidth": 1.0, "capsize": 2.5, "capthick": 1.0}
INTERVAL_LABEL = "95% CI (Wilson: Hit@k; bootstrap: MRR)"   # legend entry of the error bars


def _draw_errorbars(ax: Any, x: np.ndarray, y: np.ndarray, err: np.ndarray, gid: str, vertical: bool = True) -> None:
    """Error bars err (2, N) at (x, y) (N,); every artist of the ErrorbarContainer carries `gid` (a container
    has none of its own), so a reader finds the whiskers of a series as it finds its bars."""
    container = ax.errorbar(x, y, **({"yerr": err} if vertical else {"xerr": err}), label="_nolegend_",
                            **ERRORBAR_STYLE)
    for artist in container.get_children():
        artist.set_gid(gid)


def _interval_handle(vertical: bool = True) -> Line2D:
    """Legend entry of the error bars."""
    return Line2D([], [], color=ERRORBAR_STYLE["ecolor"], marker="|" if vertical else "_", markersize=12,
                  markeredgewidth=1.2, linestyle="", label=INTERVAL_LABEL)


# ---------------------------------------------------------------------------------------------------
# saving

def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 150) -> Path:
    """Write `fig` as a PNG at `path` atomically (temp file + rename), create the directory, close the figure.

    Returns the path written. `dpi` is pixels per inch (150: a (10, 5) inch figure is 1500 x 750 pixels).
    """
    if not isinstance(fig, Figure):
        raise ConfigError(f"save_figure: expected a matplotlib Figure, got {type(fig).__name__}")
    if isinstance(dpi, bool) or not isinstance(dpi, (int, float)) or dpi <= 0:
        raise ConfigError(f"dpi={dpi!r} is invalid; expected a number of pixels per inch > 0")
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ConfigError(f"save_figure: path '{path}' should end in .png (figures are written as PNG)")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png", facecolor="white")
    if "matplotlib.pyplot" in sys.modules:  # a figure made through pyplot is released from its manager
        sys.modules["matplotlib.pyplot"].close(fig)
    return path


# ---------------------------------------------------------------------------------------------------
# 00: data

def _overview_inputs(data: Any) -> tuple[str, np.ndarray, np.ndarray, np.ndarray, str]:
    """(name, location xy (L, 2) metres, location function names (L,), records per user (U,), count label)."""
    if hasattr(data, "records") and hasattr(data, "locations"):          # data.schema.MobilityData
        _require_columns(data.locations, ["x", "y", "function"], "plot_dataset_overview (locations)")
        _require_columns(data.records, ["user"], "plot_dataset_overview (records)")
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


@_styled
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
    fig = _figure((11, 5.8))
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
                       label=f"{f} ({int((function == f).sum()):,})", linewidths=0, alpha=0.8, rasterized=True)
    ax_map.set_aspect("equal", adjustable="datalim")
    ax_map.xaxis.set_major_formatter(FuncFormatter(_thousands))
    ax_map.yaxis.set_major_formatter(FuncFormatter(_thousands))
    ax_map.tick_params(axis="x", labelrotation=30)
    ax_map.set(xlabel="x, east of centre (m)", ylabel="y, north of centre (m)",
               title=f"{len(xy):,} candidate locations by function")
    handles, labels = ax_map.get_legend_handles_labels()
    legend_order = sorted(range(len(order)), key=lambda i: present.index(order[i]))
    ax_map.legend([handles[i] for i in legend_order], [labels[i] for i in legend_order],
                  title="function (number of locations; smaller classes drawn on top)",
                  markerscale=max(1.0, 6 / math.sqrt(size)),
                  loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=3, frameon=False)

    counts = np.asarray(per_user, dtype=float)
    if _spans_decades(counts):
        bins = np.logspace(np.log10(counts.min()), np.log10(counts.max()), 30)
        ax_hist.set_xscale("log")
    else:
        bins = min(30, max(5, int(np.ptp(counts)) + 1))
    ax_hist.hist(counts, bins=bins, color="#4c72b0", edgecolor="white")
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

@_styled
def plot_training_curves(history: pd.DataFrame, steps: pd.DataFrame | None = None, *,
                         title: str | None = None, smooth: int = 20) -> Figure:
    """Training loss per batch (left) and validation Hit@1/5/10 per epoch (right) of one train() run.

    history  history.csv: epoch, val_hit@1, val_hit@5, val_hit@10 (train_loss is used when steps is None)
    steps    steps.csv: epoch, step, loss, and distance_m (regression head, metres) or cross_entropy (ranking
             head, nats); None draws history's per-epoch train_loss instead
    smooth   rolling-mean window (batches) drawn over the raw per-batch loss (at most a fifth of the run)

    The best epoch by validation Hit@10 (the one whose checkpoint is tested) is marked.
    """
    hits = ["val_hit@1", "val_hit@5", "val_hit@10"]
    _require_columns(history, ["epoch", *hits], "plot_training_curves (history)")
    if steps is not None:
        _require_columns(steps, ["epoch", "step", "loss"], "plot_training_curves (steps)")
    elif "train_loss" not in history.columns:
        raise ConfigError("plot_training_curves: steps is None and history lacks column 'train_loss'; "
                          "pass steps.csv or a history with train_loss")
    fig = _figure((11, 4.8))
    ax_loss, ax_val = fig.subplots(1, 2)

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
        if _spans_decades(s["loss"].to_numpy(), 50):
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
    ax_loss.legend(loc="upper right")

    h = history.sort_values("epoch", kind="stable")
    for column, color, marker in zip(hits, ("#9ecae1", "#4292c6", "#08306b"), ("o", "s", "^")):
        ax_val.plot(h["epoch"], h[column], marker=marker, color=color, linewidth=1.8,
                    label=metric_label(column.removeprefix("val_")))
    best = h.loc[h["val_hit@10"].idxmax()]
    ax_val.axvline(best["epoch"], color=NEXTLOCMOE_RED, linestyle="--", linewidth=1.2,
                   label=f"best epoch {int(best['epoch'])} (Hit@10 {best['val_hit@10']:.3f})")
    ax_val.set_ylim(0, max(0.05, float(h[hits].max().max()) * 1.15))
    ax_val.set(xlabel="epoch", ylabel="validation Hit@k (fraction of windows)", title="Validation Hit@k per epoch")
    if len(h) <= 12:
        ax_val.set_xticks(h["epoch"].to_numpy())
    ax_val.legend(loc="best")
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
    (an ErrorbarContainer whose artists carry gid
    'dataset|method|variant|interval'); interval bounds are never bars of their own.
    """
    t = _tidy(table, what)
    metrics = [m for m in metrics if not is_interval_metric(m)]   # bounds are error bars, not bars
    if not metrics:
        raise ConfigError(f"{what}: metrics is empty; expected e.g. {list(DEFAULT_METRICS)}")
    _require_metrics(t, metrics, what)
    bounds = [f"{m}{suffix}" for m in metrics for suffix in ("_lo", "_hi")]
    t = t[t["metric"].isin(metrics + bounds)]
    datasets = list(dict.fromkeys(t["dataset"]))
    keys = _series_keys(t[t["metric"].isin(metrics)])
    styles = _series_styles(keys)
    values = t.groupby(["dataset", "method", "variant", "metric"], sort=False)["value"].first()

    n = len(datasets)
    width_per = max(4.5, 0.16 * len(keys) * len(metrics) + 1.5)
    fig = _figure((min(11.0, max(9.0, width_per * n + 1.0)), 6.0))
    axes = np.atleast_1d(fig.subplots(1, n, sharey=True, squeeze=False)[0])
    top = 0.0
    with_intervals = False
    for ax, dataset in zip(axes, datasets):
        present = [k for k in keys if any((dataset, k[0], k[1], m) in values.index for m in metrics)]
        width = 0.84 / max(len(present), 1)
        x = np.arange(len(metrics))
        for i, key in enumerate(present):
            method, variant, _ = key
            heights = [float(values.get((dataset, method, variant, m), np.nan)) for m in metrics]
            style = styles[key]
            bars = ax.bar(x - 0.42 + width * (i + 0.5), heights, width, color=style["color"], hatch=style["hatch"],
                          edgecolor=style["edgecolor"], linewidth=style["linewidth"], label=style["label"])
            for bar, metric in zip(bars, metrics):
                bar.set_gid(f"{dataset}|{method}|{variant}|{metric}")
            top = max(top, np.nanmax(heights) if np.isfinite(heights).any() else 0.0)
            lo = [float(values.get((dataset, method, variant, f"{m}_lo"), np.nan)) for m in metrics]
            hi = [float(values.get((dataset, method, variant, f"{m}_hi"), np.nan)) for m in metrics]
            err, drawn = _interval_errors(heights, lo, hi)
            if drawn.any():
                centres = np.array([bar.get_x() + bar.get_width() / 2 for bar in bars])
                _draw_errorbars(ax, centres[drawn], np.asarray(heights)[drawn], err[:, drawn],
                                f"{dataset}|{method}|{variant}|interval")
                top = max(top, float(np.nanmax(np.asarray(hi)[drawn])))
                with_intervals = True
        ax.set_xticks(x, [metric_label(m) for m in metrics])
        ax.set_title(panel_title(dataset))
        ax.set_xlabel("metric (test split)")
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    axes[0].set_ylabel(_metric_axis_label(metrics))
    if all(re.fullmatch(r"(hit|ndcg)@\d+|mrr", m) for m in metrics):
        axes[0].set_ylim(0, min(1.05, max(0.1, top * 1.12)))
    handles: list[Any] = _legend_handles(styles)
    if with_intervals:
        handles.append(_interval_handle())
    labels = [str(h.get_label()) for h in handles]
    legend = fig.legend(handles=handles, loc="outside lower center", title="method (kind)",
                        ncols=_legend_ncols(labels, fig.get_figwidth()), frameon=False)
    _bold_legend(legend, styles)
    fig.suptitle(suptitle)
    return fig


@_styled
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


@_styled
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

@_styled
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
    t = _tidy(table, "plot_ablations")
    _require_metrics(t, [metric], "plot_ablations")
    bounds = t[t["metric"].isin([f"{metric}_lo", f"{metric}_hi"])]
    bounds = bounds.groupby(["dataset", "method", "variant", "metric"], sort=False)["value"].first()
    t = t[t["metric"] == metric]
    if reference not in set(t["variant"]):
        raise ConfigError(f"plot_ablations: no variant '{reference}' (the reference) in the table; "
                          f"variants are {sorted(set(t['variant']))}")
    datasets = list(dict.fromkeys(t["dataset"]))
    lower = _lower_is_better(metric)
    n_rows = max(len(t[t["dataset"] == d]) for d in datasets)
    fig = _figure((min(11.0, 5.0 * len(datasets) + 3.5), min(7.0, max(4.5, 0.38 * n_rows + 1.8))))
    axes = np.atleast_1d(fig.subplots(1, len(datasets), squeeze=False)[0])
    with_intervals = False
    for ax, dataset in zip(axes, datasets):
        d = t[t["dataset"] == dataset].drop_duplicates(["method", "variant"])
        several_methods = d["method"].nunique() > 1
        ref_rows = d[d["variant"] == reference]
        if ref_rows.empty:
            raise ConfigError(f"plot_ablations: dataset '{dataset}' has no '{reference}' variant")
        ref_value = float(ref_rows["value"].iloc[0])
        d = pd.concat([ref_rows.iloc[:1], d.drop(ref_rows.index[:1])])
        labels = [f"{m} · {v}" if several_methods else v for m, v in zip(d["method"], d["variant"])]
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
        err, drawn = _interval_errors(widths, lo, hi)
        if drawn.any():
            _draw_errorbars(ax, widths[drawn], y[drawn], err[:, drawn], f"{dataset}|interval", vertical=False)
            with_intervals = True
        ends = np.where(drawn, hi, widths)                                     # where a bar's drawing ends
        span = float(np.nanmax(ends)) if np.isfinite(ends).any() else 1.0
        for yi, value, end, r in zip(y, widths, ends, is_ref):
            if not np.isfinite(value):
                ax.text(0, yi, " n/a", va="center", fontsize=9)
                continue
            if r:
                text, color = f"{_fmt_number(value)}  (reference)", "black"
            else:
                diff = value - ref_value
                better = diff < 0 if lower else diff > 0
                color = "#1a7f37" if better and diff != 0 else "#b42318" if diff != 0 else "0.3"
                text = f"{_fmt_number(value)}  (Δ {diff:+.3g})"
            ax.text(end + 0.01 * span, yi, text, va="center", fontsize=9, color=color)
        ax.set_yticks(y, labels)
        for tick, r in zip(ax.get_yticklabels(), is_ref):
            if r:
                tick.set_fontweight("bold")
        ax.invert_yaxis()
        ax.set_xlim(0, span * 1.38 if span > 0 else 1)
        ax.set(xlabel=_metric_axis_label([metric]), title=f"dataset: {dataset}")
        ax.grid(axis="x", alpha=0.3)
        ax.set_axisbelow(True)
    handles = [Patch(facecolor=NEXTLOCMOE_RED, edgecolor="black", label=f"'{reference}' model (reference)"),
               Patch(facecolor="#9fb3c8", edgecolor="black", hatch=KIND_HATCHES["ablation"],
                     label="ablated variant (kind: ablation)"),
               Line2D([], [], color="#1a7f37", marker="s", linestyle="", label="Δ better than reference"),
               Line2D([], [], color="#b42318", marker="s", linestyle="", label="Δ worse than reference")]
    if with_intervals:
        handles.append(_interval_handle(vertical=False))
    fig.legend(handles=handles, loc="outside lower center", frameon=False,
               ncols=_legend_ncols([str(h.get_label()) for h in handles], fig.get_figwidth()))
    direction = "lower is better" if lower else "higher is better"
    fig.suptitle(f"Ablations of NextLocMoE: {metric_label(metric)} per variant vs the full model ({direction})")
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


@_styled
def plot_efficiency(table: pd.DataFrame, dataset: str | None = None, paper_claim: float | None = 600.0) -> Figure:
    """Efficiency (results/efficiency.csv): throughput by method, the batch sweep, and NextLocMoE/LLM-Mob ratios.

    Left: samples/s for training, inference at batch 1 and at the best batch of the sweep (for llm_mob,
    generation of its answer); log scale when values span decades. Middle: inference (generation) samples/s
    against batch size. Right: the rows of method 'nextlocmoe_vs_llm_mob' (speedup_vs_generation_b1,
    speedup_best_vs_best), log scale, 1x = equal speed, `paper_claim` (the paper's "up to 600x") dashed.
    """
    t = _tidy(table, "plot_efficiency")
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
    models = t[t["kind"] != "comparison"]
    keys = _series_keys(models)
    styles = _series_styles(keys, with_variant=False)

    fig = _figure((11, 5.6))
    ax_bar, ax_sweep, ax_ratio = fig.subplots(1, 3, width_ratios=[1.35, 1.1, 0.8])
    width = 0.84 / max(len(keys), 1)
    x = np.arange(len(THROUGHPUT_MEASURES))
    drawn: list[float] = []
    for i, key in enumerate(keys):
        method = key[0]
        heights, names = [], []
        for _, scoring, generating in THROUGHPUT_MEASURES:
            name = scoring if (method, scoring) in values.index else generating
            names.append(name)
            heights.append(float(values.get((method, name), np.nan)) if name else np.nan)
        style = styles[key]
        bars = ax_bar.bar(x - 0.42 + width * (i + 0.5), heights, width, color=style["color"], hatch=style["hatch"],
                          edgecolor=style["edgecolor"], linewidth=style["linewidth"], label=style["label"])
        for bar, name, h in zip(bars, names, heights):
            bar.set_gid(f"{dataset}|{method}|{key[1]}|{name}")
            if np.isfinite(h):
                drawn.append(h)
                ax_bar.annotate(_fmt_number(h), (bar.get_x() + bar.get_width() / 2, h), xytext=(0, 2),
                                textcoords="offset points", ha="center", va="bottom", fontsize=9, rotation=90)
    if _spans_decades(drawn, 10):
        ax_bar.set_yscale("log")
        ax_bar.set_ylim(min(drawn) / 2, max(drawn) * 30)
    elif drawn:
        ax_bar.set_ylim(0, max(drawn) * 1.35)
    ax_bar.set_xticks(x, [label for label, _, _ in THROUGHPUT_MEASURES])
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
        if _spans_decades(sweep, 10):
            ax_sweep.set_yscale("log")
        ax_sweep.xaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:g}"))
    else:
        ax_sweep.text(0.5, 0.5, "no batch sweep in the table", ha="center", va="center", transform=ax_sweep.transAxes)
    ax_sweep.set(xlabel="batch size (samples)", ylabel="throughput (samples/s)",
                 title="Inference / generation\nthroughput vs batch size")
    ax_sweep.grid(alpha=0.3)

    ratio_metrics = [m for m in RATIO_LABELS if m in set(ratios["metric"])]
    ratio_values = [float(ratios.loc[ratios["metric"] == m, "value"].iloc[0]) for m in ratio_metrics]
    bars = ax_ratio.bar(np.arange(len(ratio_metrics)), ratio_values, 0.6, color=NEXTLOCMOE_RED,
                        hatch=KIND_HATCHES["comparison"], edgecolor="black", linewidth=1.0)
    for bar, metric, v in zip(bars, ratio_metrics, ratio_values):
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
    legend = fig.legend(handles=_legend_handles(styles), loc="outside lower center", title="method (kind)",
                        ncols=_legend_ncols([s["label"] for s in styles.values()], fig.get_figwidth()), frameon=False)
    _bold_legend(legend, styles)
    fig.suptitle(f"Efficiency on '{dataset}': how many samples per second each method processes")
    return fig


# ---------------------------------------------------------------------------------------------------
# 06: expert visualisation

def _ordered(values: Sequence[Any], preferred: Sequence[str]) -> list[Any]:
    """Distinct values: those in `preferred` in its order, then the rest in order of appearance."""
    seen = list(dict.fromkeys(values))
    return [p for p in preferred if p in seen] + [v for v in seen if v not in preferred]


def _annotate_cells(ax: Any, matrix: np.ndarray, norm: Normalize, fmt: Callable[[float], str]) -> None:
    for (i, j), v in np.ndenumerate(matrix):
        if np.isfinite(v):
            dark = norm(v) > 0.6
            ax.text(j, i, fmt(v), ha="center", va="center", fontsize=9, color="white" if dark else "black")


def _short_prob(v: float) -> str:
    return f"{v:.2f}".removeprefix("0") if 0 <= v < 1 else f"{v:.2f}"


@_styled
def plot_role_expert_heatmap(df: pd.DataFrame, value: str = "mean_prob", annotate: bool | None = None) -> Figure:
    """Personalized-MoE gate by true user role (analysis.expert_activation_by_role): one heatmap per layer.

    df        role, layer, expert, mean_prob, selected_rate, n_tokens (expert_name, when present, labels columns)
    value     'mean_prob' (mean gate probability) or 'selected_rate' (share of tokens routing kept the expert)
    annotate  print each cell's value; None = when a panel has at most 121 cells

    Rows are true roles (schema.ROLES order), columns the role experts; one shared colour scale from 0.
    A role-aligned gate lights up one column per row; a uniform gate is 1/E everywhere.
    """
    _require_columns(df, ["role", "layer", "expert", "mean_prob", "selected_rate", "n_tokens"],
                     "plot_role_expert_heatmap")
    if value not in ("mean_prob", "selected_rate"):
        raise ConfigError(f"value={value!r} is invalid; expected 'mean_prob' or 'selected_rate'")
    layers = sorted(df["layer"].unique())
    roles = _ordered(df["role"], ROLES)
    experts = list(dict.fromkeys(df["expert"]))
    if all(isinstance(e, (int, np.integer)) for e in experts):
        experts = sorted(experts)
    if "expert_name" in df.columns:
        names = df.drop_duplicates("expert").set_index("expert")["expert_name"].to_dict()
        labels = [f"{e}: {names.get(e, e)}" if str(names.get(e, e)) != str(e) else str(e) for e in experts]
    elif len(experts) == len(ROLES) and all(isinstance(e, (int, np.integer)) for e in experts):
        labels = [f"{e}: {ROLES[int(e)]}" for e in experts]
    else:
        labels = [str(e) for e in experts]
    grids = []
    for layer in layers:
        sub = df[df["layer"] == layer].pivot_table(index="role", columns="expert", values=value, aggfunc="first")
        grids.append(sub.reindex(index=roles, columns=experts).to_numpy(dtype=float))
    vmax = max(float(np.nanmax(g)) if np.isfinite(g).any() else 0.0 for g in grids) or 1.0
    norm = Normalize(0.0, vmax)
    annotate = (len(roles) * len(experts) <= 121) if annotate is None else annotate
    fig = _figure((min(11.0, 3.2 + 4.6 * len(layers)), 6.0))
    axes = np.atleast_1d(fig.subplots(1, len(layers), sharey=True, squeeze=False)[0])
    image = None
    for ax, layer, grid in zip(axes, layers, grids):
        image = ax.imshow(grid, cmap="Blues", norm=norm, aspect="auto")
        if annotate:
            _annotate_cells(ax, grid, norm, _short_prob)
        ax.set_xticks(np.arange(len(experts)), labels, rotation=60, ha="right", rotation_mode="anchor")
        ax.set_yticks(np.arange(len(roles)), roles)
        ax.set(title=f"P-MoE layer {layer}", xlabel="role expert (index: name of its key)")
    axes[0].set_ylabel("true role of the user")
    what = "mean gate probability" if value == "mean_prob" else "share of tokens routed to the expert"
    fig.colorbar(image, ax=list(axes), label=f"{what} (0-1)", shrink=0.9)
    uniform = 1.0 / len(experts)
    fig.suptitle(f"Personalized MoE: {what} by true role (uniform gate = {uniform:.2f})")
    return fig


@_styled
def plot_function_gate_heatmap(df: pd.DataFrame) -> Figure:
    """Location-Semantics-MoE gate by true category (analysis.function_gate_by_category), row-normalised.

    df  function (true category of the token's location), expert (function expert), mean_prob, n_tokens.
    Each row is divided by its sum, so a cell is the share of that category's gate probability that the
    expert receives; rows without tokens (NaN) stay blank. Cells where category == expert are outlined:
    a function-aligned gate puts its mass there.
    """
    _require_columns(df, ["function", "expert", "mean_prob", "n_tokens"], "plot_function_gate_heatmap")
    functions = _ordered(df["function"], [*FUNCTIONS, UNKNOWN_FUNCTION])
    experts = _ordered(df["expert"], FUNCTIONS)
    grid = df.pivot_table(index="function", columns="expert", values="mean_prob", aggfunc="first", dropna=False)
    grid = grid.reindex(index=functions, columns=experts).to_numpy(dtype=float)
    sums = np.nansum(grid, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(sums > 0, grid / sums, np.nan)                                  # (F, E) rows sum to 1
    tokens = df.groupby("function", sort=False)["n_tokens"].max().reindex(functions).fillna(0).astype(int)
    fig = _figure((9, 5.6))
    ax = fig.subplots()
    norm = Normalize(0.0, 1.0)
    image = ax.imshow(share, cmap="Oranges", norm=norm, aspect="auto")
    _annotate_cells(ax, share, norm, lambda v: f"{v:.2f}")
    for i, f in enumerate(functions):
        if not np.isfinite(share[i]).any():
            ax.text(len(experts) / 2 - 0.5, i, "no tokens", ha="center", va="center", fontsize=9, color="0.4")
        if f in experts:
            ax.add_patch(Rectangle((experts.index(f) - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black",
                                   linewidth=2))
    ax.set_xticks(np.arange(len(experts)), [str(e) for e in experts], rotation=20, ha="right", rotation_mode="anchor")
    ax.set_yticks(np.arange(len(functions)), [f"{f}\n(n={tokens[f]:,})" for f in functions])
    ax.set(xlabel="function expert of the Location Semantics MoE",
           ylabel="true category of the location (tokens)")
    fig.colorbar(image, ax=ax, label="share of the category's gate probability (row sums to 1)")
    fig.suptitle("Location Semantics MoE: which function expert each true venue category is routed to "
                 f"(uniform = {1 / len(experts):.2f})")
    return fig


@_styled
def plot_active_experts(df: pd.DataFrame) -> Figure:
    """How many role experts routing keeps per token (analysis.active_experts_per_token), one panel per layer.

    df  layer, token_kind, n_active, tokens, share. Bars: share of tokens of a kind (prompt/history/current)
        that kept exactly n_active experts; the legend gives each kind's mean number of active experts.
    """
    _require_columns(df, ["layer", "token_kind", "n_active", "tokens", "share"], "plot_active_experts")
    layers = sorted(df["layer"].unique())
    kinds = _ordered(df["token_kind"], list(TOKEN_KIND_COLORS))
    values = sorted(int(v) for v in df["n_active"].unique())
    fig = _figure((min(11.0, 2.5 + 4.2 * len(layers)), 5.2))
    axes = np.atleast_1d(fig.subplots(1, len(layers), sharey=True, squeeze=False)[0])
    width = 0.84 / max(len(kinds), 1)
    x = np.arange(len(values))
    for ax, layer in zip(axes, layers):
        d = df[df["layer"] == layer]
        for i, kind in enumerate(kinds):
            k = d[d["token_kind"] == kind].drop_duplicates("n_active").set_index("n_active")
            if k.empty:
                continue
            heights = [float(k["share"].get(v, 0.0)) for v in values]
            total = float(k["tokens"].sum())
            mean = float((k.index.to_numpy(dtype=float) * k["tokens"]).sum() / total) if total > 0 else math.nan
            bars = ax.bar(x - 0.42 + width * (i + 0.5), heights, width,
                          color=TOKEN_KIND_COLORS.get(kind, method_color(str(kind))), edgecolor="white",
                          label=f"{kind} tokens (mean {mean:.2f})")
            for bar, v in zip(bars, values):
                bar.set_gid(f"{layer}|{kind}|{v}")
        ax.set_xticks(x, [str(v) for v in values])
        ax.set(title=f"P-MoE layer {layer}", xlabel="role experts kept per token (count)")
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
    axes[0].set_ylabel("share of tokens (0-1)")
    axes[0].set_ylim(0, 1.05)
    fig.suptitle("Personalized MoE routing: number of active role experts per token")
    return fig


@_styled
def plot_routing_entropy(df: pd.DataFrame, n_role_experts: int | None = 11,
                         n_function_experts: int | None = 5) -> Figure:
    """Gate entropies over training (analysis.entropy_over_training), in nats, epochs marked.

    df  step, epoch, pmoe_entropy, location_entropy, pmoe_entropy_smooth, location_entropy_smooth; raw values
        thin, smoothed thick; an all-NaN entropy (module switched off) is left out.
    n_role_experts / n_function_experts  draw the entropy of a uniform gate, ln(E) (None hides it).
    """
    columns = ["step", "epoch", "pmoe_entropy", "location_entropy", "pmoe_entropy_smooth", "location_entropy_smooth"]
    _require_columns(df, columns, "plot_routing_entropy")
    d = df.sort_values("step", kind="stable")
    fig = _figure((10, 5.2))
    ax = fig.subplots()
    drawn = 0
    gates = (("pmoe_entropy", NEXTLOCMOE_RED, n_role_experts, "Personalized MoE (role gate)"),
             ("location_entropy", "#2c7fb8", n_function_experts, "Location Semantics MoE (function gate)"))
    for name, color, experts, label in gates:
        raw = pd.to_numeric(d[name], errors="coerce")
        if not np.isfinite(raw).any():
            continue
        ax.plot(d["step"], raw, color=color, alpha=0.3, linewidth=0.8)
        ax.plot(d["step"], d[f"{name}_smooth"], color=color, linewidth=2.2, label=f"{label}, smoothed")
        if experts:
            ax.axhline(math.log(experts), color=color, linestyle=":", linewidth=1.2,
                       label=f"uniform over {experts} experts: ln {experts} = {math.log(experts):.2f}")
        drawn += 1
    if drawn == 0:
        raise ConfigError("plot_routing_entropy: columns 'pmoe_entropy' and 'location_entropy' hold no finite value")
    starts = d.groupby("epoch")["step"].min().sort_index().to_numpy()[1:]
    for k, x in enumerate(starts):
        ax.axvline(x - 0.5, color="black", linestyle="--", linewidth=0.9, label="epoch boundary" if k == 0 else None)
    ax.set_ylim(bottom=0)
    ax.set(xlabel="training batch (step)", ylabel="mean gate entropy (nats)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncols=2, frameon=False)
    ax.grid(alpha=0.3)
    fig.suptitle("Routing entropy over training (thin: per batch; lower = more confident routing)")
    return fig


def _candidate_xy(candidates: Any) -> np.ndarray | None:
    if candidates is None:
        return None
    if isinstance(candidates, pd.DataFrame):
        _require_columns(candidates, ["x", "y"], "plot_prediction_map (candidates)")
        return candidates[["x", "y"]].to_numpy(dtype=float)
    xy = np.asarray(candidates, dtype=float)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise ConfigError(f"plot_prediction_map: candidates must be (L, 2) metres or a frame with x, y; "
                          f"got shape {xy.shape}")
    return xy


@_styled
def plot_prediction_map(df: pd.DataFrame, candidates: Any = None, max_windows: int = 200) -> Figure:
    """Where the model points (analysis.prediction_sample): targets vs predicted points and retrieved places.

    df          window, target_x, target_y, pred_x, pred_y (NaN for the ranking head), top1_x, top1_y,
                hit1, hit10, error_m (top-1 place to target, metres)
    candidates  optional (L, 2) array or frame with x, y: every candidate location, drawn faintly
    max_windows the first windows drawn on the map (all windows enter the title's rates and the histogram)

    Left: a thin line joins each target to the regressed point (or to the top-1 place without one); the
    top-1 place is green when it is the target (Hit@1). Right: histogram of error_m.
    """
    columns = ["window", "target_x", "target_y", "pred_x", "pred_y", "top1_x", "top1_y", "hit1", "hit10", "error_m"]
    _require_columns(df, columns, "plot_prediction_map")
    cand = _candidate_xy(candidates)
    d = df.iloc[:max_windows]
    fig = _figure((11, 6))
    ax_map, ax_err = fig.subplots(1, 2, width_ratios=[1.4, 1])
    if cand is not None:
        ax_map.scatter(cand[:, 0], cand[:, 1], s=3, color="0.75", linewidths=0, label="candidate location",
                       rasterized=True)
    pred = d[["pred_x", "pred_y"]].to_numpy(dtype=float)
    target = d[["target_x", "target_y"]].to_numpy(dtype=float)
    top1 = d[["top1_x", "top1_y"]].to_numpy(dtype=float)
    has_pred = np.isfinite(pred).all(axis=1)
    end = np.where(has_pred[:, None], pred, top1)
    segments_x = np.column_stack([target[:, 0], end[:, 0], np.full(len(d), np.nan)]).ravel()
    segments_y = np.column_stack([target[:, 1], end[:, 1], np.full(len(d), np.nan)]).ravel()
    ax_map.plot(segments_x, segments_y, color="0.45", linewidth=0.6, alpha=0.7,
                label="target → predicted point" if has_pred.any() else "target → top-1 place")
    ax_map.scatter(target[:, 0], target[:, 1], s=28, facecolors="none", edgecolors="black", linewidths=1.0,
                   label="true next location", zorder=3)
    if has_pred.any():
        ax_map.scatter(pred[has_pred, 0], pred[has_pred, 1], s=26, marker="x", color=NEXTLOCMOE_RED, linewidths=1.2,
                       label="regressed point", zorder=4)
    hit1 = d["hit1"].to_numpy().astype(bool)
    ax_map.scatter(top1[~hit1, 0], top1[~hit1, 1], s=18, marker="^", color="#2c7fb8", alpha=0.8,
                   label="top-1 place (miss)", zorder=3)
    ax_map.scatter(top1[hit1, 0], top1[hit1, 1], s=22, marker="^", color="#1a9850",
                   label="top-1 place (hit)", zorder=5)
    shown = np.vstack([target, top1, pred[has_pred]])
    shown = shown[np.isfinite(shown).all(axis=1)]
    if len(shown):
        lo, hi = shown.min(axis=0), shown.max(axis=0)
        pad = 0.06 * max(float((hi - lo).max()), 1.0)
        ax_map.set_xlim(lo[0] - pad, hi[0] + pad)
        ax_map.set_ylim(lo[1] - pad, hi[1] + pad)
    ax_map.set_aspect("equal", adjustable="box")
    ax_map.xaxis.set_major_formatter(FuncFormatter(_thousands))
    ax_map.yaxis.set_major_formatter(FuncFormatter(_thousands))
    ax_map.tick_params(axis="x", labelrotation=30)
    ax_map.set(xlabel="x, east of centre (m)", ylabel="y, north of centre (m)",
               title=f"{len(d)} test windows (a seeded random draw)")
    ax_map.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=3, frameon=False, markerscale=1.3)

    errors = pd.to_numeric(df["error_m"], errors="coerce").to_numpy(dtype=float)
    errors = errors[np.isfinite(errors)]
    if len(errors):
        ax_err.hist(errors, bins=30, color="#4c72b0", edgecolor="white")
        median = float(np.median(errors))
        ax_err.axvline(median, color="black", linestyle="--", linewidth=1.2, label=f"median {median:,.0f} m")
        ax_err.legend(loc="upper right")
    ax_err.xaxis.set_major_formatter(FuncFormatter(_thousands))
    ax_err.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax_err.set(xlabel="distance from top-1 place to target (m)", ylabel="test windows (count)",
               title="error of the answered place")
    rate1 = float(pd.to_numeric(df["hit1"]).mean())
    rate10 = float(pd.to_numeric(df["hit10"]).mean())
    fig.suptitle(f"Predictions vs truth on {len(df):,} test windows: Hit@1 = {rate1:.3f}, Hit@10 = {rate10:.3f}")
    return fig


# ---------------------------------------------------------------------------------------------------
# benchmarks/bench_moe.py

MOE_BENCH_LABELS = {"ffn": "dense FFN", "lora_ffn": "FFN + one LoRA", "moe_threshold": "MoE, threshold (5 active)",
                    "moe_threshold_sharp": "MoE, threshold (sharp gates)", "moe_topk2": "MoE, top-2",
                    "naive_threshold": "naive: 11 FFN copies"}


@_styled
def plot_moe_benchmark(table: pd.DataFrame, device: str | None = None) -> Figure:
    """results/bench_moe.csv: forward + backward time of one Personalized MoE layer relative to a dense FFN.

    One panel per width (SmolLM2, LLaMA-3.2-3B shapes); one bar per (method, expert_compute), the value
    `x_ffn` (median time / the dense FFN's median time); the design target of 1.5x is drawn. `device` (e.g.
    the results file's provenance) goes into the title.
    """
    _require_columns(table, ("width", "tokens", "method", "x_ffn", "expert_compute", "active_experts"),
                     "plot_moe_benchmark")
    widths = list(dict.fromkeys(table["width"]))
    keys = list(dict.fromkeys(zip(table["method"], table["expert_compute"])))      # one row per variant
    fig = _figure((11, 5))
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
