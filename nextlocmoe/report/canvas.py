"""The machinery every chart of the report shares: Agg figures under fixed fonts, input checks, legends,
interval error bars and the atomic PNG write.

Figures are built with `matplotlib.figure.Figure` on an Agg canvas, never through pyplot's figure manager
(seaborn is only called through its axes-level functions with `ax=`), so drawing many figures in a loop or
a test leaks nothing and needs no display. Charts live in `figures.py` (results tables) and
`routing_figures.py` (routing frames of nextlocmoe.analysis); both draw with these helpers.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import matplotlib
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle

from ..errors import ConfigError
from ..io import atomic_path
from ..results import TIDY_COLUMNS
from .style import FONT, KIND_HATCHES, method_style

F = TypeVar("F", bound=Callable[..., Figure])

SeriesKey = tuple[str, str, str]   # (method, variant, kind): one bar colour, hatch and legend entry
K = TypeVar("K")

BAR_GROUP_WIDTH = 0.84   # of a group of dodged bars, in units of the distance between two groups


# ---------------------------------------------------------------------------------------------------
# figures

def styled(func: F) -> F:
    """Draw under the report's font sizes (fonts are fixed when an artist is made, so this holds on save)."""
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Figure:
        with matplotlib.rc_context(FONT):
            return func(*args, **kwargs)
    return wrapper  # type: ignore[return-value]


def new_figure(figsize: tuple[float, float]) -> Figure:
    """A constrained-layout Figure of `figsize` inches on its own Agg canvas (no pyplot)."""
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


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
# inputs

def require_columns(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    if not isinstance(df, pd.DataFrame):
        raise ConfigError(f"{what}: expected a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ConfigError(f"{what}: input lacks column(s) {missing}; expected columns {list(columns)} "
                          f"(it has {list(df.columns)})")
    if len(df) == 0:
        raise ConfigError(f"{what}: input has no rows")


def require_metrics(table: pd.DataFrame, metrics: Sequence[str], what: str) -> None:
    present = set(table["metric"])
    missing = [m for m in metrics if m not in present]
    if missing:
        raise ConfigError(f"{what}: the table has no metric {missing}; it has {sorted(present)}")


def tidy(table: pd.DataFrame, what: str) -> pd.DataFrame:
    """Check the tidy schema (experiment is optional) and return a copy with a float `value`."""
    require_columns(table, [c for c in TIDY_COLUMNS if c != "experiment"], what)
    out = table.copy()
    out["value"] = pd.to_numeric(out["value"], errors="coerce")
    for column in ("method", "kind", "dataset", "variant", "metric"):
        out[column] = out[column].astype(str)
    return out


def ordered(values: Sequence[Any], preferred: Sequence[str]) -> list[Any]:
    """Distinct values: those in `preferred` in its order, then the rest in order of appearance."""
    seen = list(dict.fromkeys(values))
    return [p for p in preferred if p in seen] + [v for v in seen if v not in preferred]


# ---------------------------------------------------------------------------------------------------
# series of a results table: colour, hatch, edge, legend

def series_keys(table: pd.DataFrame) -> list[SeriesKey]:
    """(method, variant, kind) of each row group, in the order the table lists them."""
    keys = table[["method", "variant", "kind"]].drop_duplicates()
    return [tuple(k) for k in keys.itertuples(index=False)]  # type: ignore[misc]


def lighten(color: str, amount: float) -> tuple[float, float, float]:
    """Blend a colour with white; amount 0 keeps it, 1 gives white."""
    r, g, b = to_rgb(color)
    return (r + (1 - r) * amount, g + (1 - g) * amount, b + (1 - b) * amount)


def series_styles(keys: Sequence[SeriesKey], with_variant: bool | None = None) -> dict[SeriesKey, dict[str, Any]]:
    """Colour, hatch, edge and legend label of each (method, variant, kind).

    A method's colour is fixed (style.METHOD_STYLES); when it appears in several variants (zero-shot vs
    trained on target), the later variants are lighter shades of it. The variant enters the labels when the
    table has several (with_variant=None) or as asked. Emphasised methods (NextLocMoE) get a black edge and a
    bold legend entry.
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
        style = method_style(method)
        color = to_rgb(style.color) if position == 0 else lighten(style.color, min(0.25 + 0.2 * position, 0.75))
        label = f"{method} · {variant}" if tell_variants else method
        ours = style.emphasised
        styles[key] = {"color": color, "hatch": KIND_HATCHES.get(kind, "++"),
                       "edgecolor": "black" if ours else "white", "linewidth": 1.3 if ours else 0.5,
                       "label": f"{label} ({kind})", "bold": ours}
    return styles


def dodged_bars(ax: Any, values: Callable[[K, Any], float], groups: Sequence[Any], keys: Sequence[K],
                styles: dict[K, dict[str, Any]]) -> dict[tuple[K, Any], Rectangle]:
    """Seaborn grouped bars: one group per entry of `groups` along x (at 0, 1, ...), one bar per series key in
    it, dodged in `keys` order, of height `values(key, group)`, in styles[key]'s color, hatch, edgecolor and
    linewidth; each series' BarContainer carries styles[key]["label"], so `ax.legend()` lists the series.

    Returns {(key, group): bar}; a NaN value has no bar. seaborn makes one BarContainer per hue level in hue
    order (an empty one for a series without values) and drops NaN bars, so a bar's group is read back from
    its centre.
    """
    if not keys:
        return {}
    frame = pd.DataFrame([(str(i), g, values(key, group)) for i, key in enumerate(keys)
                          for g, group in enumerate(groups)], columns=["series", "group", "value"])
    before = len(ax.containers)
    sns.barplot(frame, x="group", y="value", hue="series", order=range(len(groups)),
                hue_order=[str(i) for i in range(len(keys))],
                palette={str(i): styles[key]["color"] for i, key in enumerate(keys)},
                saturation=1, errorbar=None, width=BAR_GROUP_WIDTH, legend=False, ax=ax)
    containers = list(ax.containers)[before:]
    if containers and len(containers) != len(keys):     # would pair bars with the wrong series
        raise ConfigError(f"dodged_bars: seaborn drew {len(containers)} bar series for {len(keys)} keys; "
                          "expected one BarContainer per hue level (seaborn 0.13)")
    bars = {}
    for key, container in zip(keys, containers):
        style = styles[key]
        container.set_label(style.get("label", "_nolegend_"))
        for bar in container:
            bar.set(hatch=style.get("hatch", ""), edgecolor=style["edgecolor"], linewidth=style["linewidth"])
            bars[(key, groups[int(round(bar.get_x() + bar.get_width() / 2))])] = bar
    ax.set_xticks(np.arange(len(groups)), [str(g) for g in groups])
    ax.set(xlabel="", ylabel="")
    return bars


def legend_handles(styles: dict[Any, dict[str, Any]]) -> list[Patch]:
    return [Patch(facecolor=s["color"], hatch=s["hatch"], edgecolor=s["edgecolor"] if s["bold"] else "0.35",
                  linewidth=s["linewidth"], label=s["label"]) for s in styles.values()]


def legend_ncols(labels: Sequence[str], width_in: float) -> int:
    """Columns of a figure legend so that its rows fit `width_in` inches (about 0.07 in per 9-pt character)."""
    column = 0.07 * max((len(label) for label in labels), default=10) + 0.7
    return int(max(1, min(len(labels), width_in * 0.95 // column)))


def bold_legend(legend: Any, styles: dict[Any, dict[str, Any]]) -> None:
    for text, style in zip(legend.get_texts(), styles.values()):
        if style["bold"]:
            text.set_fontweight("bold")


# ---------------------------------------------------------------------------------------------------
# numbers

def thousands(value: float, _pos: Any = None) -> str:
    return f"{value:,.0f}"


def plane_axes(ax: Any, title: str, adjustable: str) -> None:
    """A map of the local plane: equal aspect, metres with thousands separators, the axis names of every map."""
    from matplotlib.ticker import FuncFormatter

    ax.set_aspect("equal", adjustable=adjustable)
    ax.xaxis.set_major_formatter(FuncFormatter(thousands))
    ax.yaxis.set_major_formatter(FuncFormatter(thousands))
    ax.tick_params(axis="x", labelrotation=30)
    ax.set(xlabel="x, east of centre (m)", ylabel="y, north of centre (m)", title=title)


def spans_decades(values: Sequence[float] | np.ndarray, ratio: float = 30.0) -> bool:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v) & (v > 0)]
    return len(v) >= 2 and v.max() / v.min() >= ratio


def fmt_number(value: float) -> str:
    if not np.isfinite(value):
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


# ---------------------------------------------------------------------------------------------------
# 95% intervals as error bars

ERRORBAR_STYLE = {"fmt": "none", "ecolor": "0.15", "elinewidth": 1.0, "capsize": 2.5, "capthick": 1.0}
INTERVAL_LABEL = "95% CI (Wilson: Hit@k; bootstrap: MRR)"   # legend entry of the error bars


def interval_errors(heights: Sequence[float], lo: Sequence[float], hi: Sequence[float]
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


def draw_errorbars(ax: Any, x: np.ndarray, y: np.ndarray, err: np.ndarray, gid: str, vertical: bool = True) -> None:
    """Error bars err (2, N) at (x, y) (N,); every artist of the ErrorbarContainer carries `gid` (a container
    has none of its own), so a reader finds the whiskers of a series as it finds its bars."""
    container = ax.errorbar(x, y, **({"yerr": err} if vertical else {"xerr": err}), label="_nolegend_",
                            **ERRORBAR_STYLE)
    for artist in container.get_children():
        artist.set_gid(gid)


def interval_handle(vertical: bool = True) -> Line2D:
    """Legend entry of the error bars."""
    return Line2D([], [], color=ERRORBAR_STYLE["ecolor"], marker="|" if vertical else "_", markersize=12,
                  markeredgewidth=1.2, linestyle="", label=INTERVAL_LABEL)
