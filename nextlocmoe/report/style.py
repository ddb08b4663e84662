"""How the report draws things: one colour per method, one hatch per kind, one colour per location function.

The report layer only reads results files, so it owns its presentation instead of asking the experiments
registry for it: importing `nextlocmoe.experiments` (core -> train -> torch, transformers, accelerate) to
learn a colour made every figure and summary load the training stack. This module imports nothing of the
package; `tests/test_report_style.py` checks that every method of the registry has an entry here, so a
new method cannot silently fall back to a hashed colour.

Who owns what, each fact in one place:

    registry (experiments/registry.py)  what a method is: its kind (written into every results row), family,
                                        one-line description and table order
    this module                         how the report shows it: colour, whether its rows are emphasised
                                        (NextLocMoE: black edge, bold legend text)

A figure therefore takes a row's kind (legend text, bar hatch) and its place (table order) from the results
table it draws, and only the colour and the emphasis from here.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import Sequence

from ..data.schema import UNKNOWN_FUNCTION

NEXTLOCMOE_RED = "#c0392b"


@dataclass(frozen=True)
class MethodStyle:
    color: str                 # fill of the method's bars and lines in every figure
    emphasised: bool = False   # the paper's model and its extension: black bar edge, bold legend text


METHOD_STYLES: dict[str, MethodStyle] = {
    # classical baselines: greys and browns for the counting ones, teal and greens for the neural ones
    "popularity": MethodStyle("#8a8a8a"),
    "last_location": MethodStyle("#b3a28a"),
    "window_centroid": MethodStyle("#c7b9a5"),
    "user_most_frequent": MethodStyle("#8c6d4f"),
    "markov": MethodStyle("#b8b332"),
    "lstm": MethodStyle("#1b9e9e"),
    "transformer": MethodStyle("#41ab5d"),
    "transformer_pointer": MethodStyle("#006d2c"),
    # tuned training-free scorers (nextlocmoe.window_scorers): pinks, darker with more ingredients
    "window_recency": MethodStyle("#f1b6da"),
    "window_time": MethodStyle("#de77ae"),
    "window_time_recency": MethodStyle("#c51b7d"),
    # LLM-based
    "nextlocllm": MethodStyle("#2c7fb8"),
    "nextlocmoe": MethodStyle(NEXTLOCMOE_RED, emphasised=True),
    "nextlocmoe_ranking": MethodStyle("#e67e22", emphasised=True),
    "nextlocmoe_absolute": MethodStyle("#7f1d1d"),     # the paper's absolute regression head, beside ours
    "llm_mob": MethodStyle("#7b5ea7"),
}

# palette for methods the table does not name (a method added in a notebook, a test's toy method); crc32 of
# the name picks the colour, so it is the same in every figure and every session
FALLBACK_COLORS = ("#17becf", "#bcbd22", "#9467bd", "#e377c2", "#7f7f7f", "#8c564b", "#1f77b4", "#2ca02c")


def method_style(method: str) -> MethodStyle:
    """The style of a method; a stable hashed colour, not emphasised, for a method this table does not name."""
    if method in METHOD_STYLES:
        return METHOD_STYLES[method]
    return MethodStyle(FALLBACK_COLORS[zlib.crc32(str(method).encode()) % len(FALLBACK_COLORS)])


def method_color(method: str) -> str:
    """The fixed colour of a method in every figure (stable for methods METHOD_STYLES does not list)."""
    return method_style(method).color


# the `kind` column of a results row -> bar hatch; the kind itself is written in the legend
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

# font sizes of every figure: readable at 100% zoom, nothing under 9 pt
FONT = {"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "xtick.labelsize": 9,
        "ytick.labelsize": 9, "legend.fontsize": 9, "figure.titlesize": 12, "hatch.linewidth": 0.6}


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


def is_score(metrics: Sequence[str]) -> bool:
    """Whether every metric is a 0-1 ranking score (Hit@k, NDCG@k, MRR)."""
    return all(re.fullmatch(r"(hit|ndcg)@\d+|mrr", m) for m in metrics)


def metric_axis_label(metrics: Sequence[str]) -> str:
    """The value-axis label of a chart that shows `metrics` side by side."""
    if all(m.startswith("hit@") for m in metrics):
        return (metric_label(metrics[0]) if len(metrics) == 1 else "Hit@k") + " (fraction of test windows)"
    if is_score(metrics):
        return "score (0-1; Hit@k = fraction of test windows)"
    if len(metrics) == 1:
        return metric_label(metrics[0])
    return "value (units of each metric)"


def lower_is_better(metric: str) -> bool:
    return metric.startswith("dist_") or "latency" in metric or "memory" in metric
