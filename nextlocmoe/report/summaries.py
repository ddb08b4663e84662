"""Sentences computed from a results table, so the words a notebook prints always match its numbers.

`summarize(table, experiment)` picks its wording by experiment (`WORDING`, owned here: wording is the
report's business, and the report imports nothing of the experiments, which would load torch): "ranking"
(best method per metric, where the paper's method and the extension rank, their gap to the best baseline),
"ablation" (every variant's change against the full model) or "speed" (the speed ratios). Which rows are
"ours" is read from the table's `kind` column (paper method, extension), as the experiments wrote it.

Noise: where the table holds a metric's 95% interval ("<metric>_lo", "<metric>_hi"; Wilson for Hit@k,
bootstrap for MRR, see `metrics.retrieval_metrics`), a comparison says "within noise" when the two rows'
intervals overlap and "beyond noise" when they do not. Overlap of two 95% intervals is a conservative reading
(two rows whose intervals barely overlap may still differ at the 5% level), so "beyond noise" is a safe claim
and "within noise" means "not shown to differ". A row tested on far fewer windows than the rest of its dataset
(metric "n" below `INDICATIVE_FRACTION` of the dataset's largest n, e.g. LLM-Mob on 10 windows beside 2,000)
is reported as "indicative (n = 10)" and left out of every ranking.
"""

from __future__ import annotations

import math

import pandas as pd

from ..results import format_p

PAIRED_ALPHA = 0.05        # a paired test's p below this is "beyond noise"
INDICATIVE_FRACTION = 0.1   # a row with n < this x the dataset's largest n is indicative only, never ranked

# experiment -> how its table is worded; any other experiment (supervised, zero_shot, a new one) is "ranking"
WORDING = {"ablations": "ablation", "efficiency": "speed"}
OURS_KINDS = ("paper method", "extension")   # the rows the sentences single out, in this order


def intervals_overlap(a: tuple[float, float] | None, b: tuple[float, float] | None) -> bool | None:
    """Whether two intervals (lo, hi) share a point; None when either is unknown (no interval in the table)."""
    if a is None or b is None:
        return None
    return a[0] <= b[1] and b[0] <= a[1]


def _interval(wide: pd.DataFrame, key: tuple, metric: str) -> tuple[float, float] | None:
    """(lo, hi) of `metric` in row `key` of a pivot, or None when the table has no finite bounds for it."""
    columns = (f"{metric}_lo", f"{metric}_hi")
    if not all(c in wide.columns for c in columns):
        return None
    lo, hi = (float(wide.loc[key, c]) for c in columns)
    return (lo, hi) if math.isfinite(lo) and math.isfinite(hi) else None


def _indicative(wide: pd.DataFrame) -> dict[tuple, int]:
    """Rows of a dataset's pivot tested on far fewer windows than its largest n: {row key: n}."""
    if "n" not in wide.columns:
        return {}
    n = wide["n"].dropna()
    if n.empty:
        return {}
    return {key: int(v) for key, v in n.items() if v < INDICATIVE_FRACTION * n.max()}


def _noise(overlap: bool | None, difference: float) -> str:
    """The noise verdict of a gap: 'within noise', 'above it beyond noise', 'below it beyond noise', or ''
    when either row has no interval."""
    if overlap is None:
        return ""
    if overlap:
        return "within noise"
    return f"{'above' if difference > 0 else 'below'} it beyond noise"


def summarize(table: pd.DataFrame, experiment: str, metrics: tuple[str, ...] = ("hit@1", "hit@10")) -> str:
    """Markdown bullets that state what a results table shows, computed from the table itself (so the words a
    notebook prints always match its numbers, on every profile): per dataset, the best method for each metric,
    where the paper's method (NextLocMoE, regression head) and the extension rank, and their gap to the best
    baseline; for ablations, every variant's change against the full model; for efficiency, the speed ratios.

    Where the table has 95% intervals, each gap to the best baseline and each ablation change says whether it
    is within noise (intervals overlap) or beyond it; rows on far fewer test windows (see `INDICATIVE_FRACTION`)
    are listed as "indicative (n = ...)" and never ranked. Example (ranking, with intervals):

        - **nyc**, Hit@10: best user_most_frequent (0.440); nextlocmoe 0.400 (rank 2 of 3, -0.040 vs the best
          baseline user_most_frequent, within noise); llm_mob 0.600, indicative (n = 10), not ranked.
    """
    t = table.copy()
    style = WORDING.get(experiment, "ranking")
    if style == "speed":
        ratio = t[t["method"] == "nextlocmoe_vs_llm_mob"].set_index("metric")["value"]
        lines = []
        if "speedup_vs_generation_b1" in ratio:
            lines.append(f"- NextLocMoE at its best batch processes {ratio['speedup_vs_generation_b1']:,.1f}x as many "
                         "samples per second as LLM-Mob-style generation at batch 1 (paper: up to 600x).")
        if "speedup_best_vs_best" in ratio:
            lines.append(f"- Both at their best batch: {ratio['speedup_best_vs_best']:,.1f}x.")
        return "\n".join(lines) + "\n"
    lines = []
    # the rows the sentences single out: the paper's method, then this project's extension (by the rows' kind)
    ours = list(dict.fromkeys(m for kind in OURS_KINDS for m in t.loc[t["kind"] == kind, "method"]))
    for dataset, d in t.groupby("dataset", sort=False):
        wide = d.pivot_table(index=["method", "kind", "variant"], columns="metric", values="value", sort=False)
        indicative = _indicative(wide)
        if style == "ablation":
            lines.append(_ablation_line(dataset, wide, metrics[-1], indicative))
            continue
        for metric in metrics:
            if metric not in wide:
                continue
            everything = wide[metric].sort_values(ascending=False, kind="stable")
            col = everything.drop(index=list(indicative))            # only rows on comparable n are ranked
            if col.empty:
                continue
            labels = [_label(m, v) for m, _, v in col.index]
            kinds = [k for _, k, _ in col.index]
            parts = [f"best {labels[0]} ({col.iloc[0]:.3f})"]
            best_baseline = next((i for i, k in enumerate(kinds) if k == "baseline"), None)
            reference = _paired_reference(wide)
            for method in ours:
                if method in labels:
                    i = labels.index(method)
                    gap = ""
                    paired = _paired(wide, col.index[i], metric)
                    if paired is not None and reference is not None:
                        gap = f", {paired} vs {_label(reference[0], reference[2])}"
                    elif best_baseline is not None:
                        difference = col.iloc[i] - col.iloc[best_baseline]
                        noise = _noise(intervals_overlap(_interval(wide, col.index[i], metric),
                                                         _interval(wide, col.index[best_baseline], metric)),
                                       difference)
                        gap = f", {difference:+.3f} vs the best baseline {labels[best_baseline]}" + \
                              (f", {noise}" if noise else "")
                    parts.append(f"{method} {col.iloc[i]:.3f} (rank {i + 1} of {len(labels)}{gap})")
            for key, n in indicative.items():
                if key in everything.index and math.isfinite(everything[key]):
                    parts.append(f"{_label(key[0], key[2])} {everything[key]:.3f}, indicative (n = {n:,}), not ranked")
            lines.append(f"- **{dataset}**, {metric_name(metric)}: " + "; ".join(parts) + ".")
    return "\n".join(lines) + "\n"


def _paired_reference(wide: pd.DataFrame) -> tuple | None:
    """The row a dataset's paired tests compare with (metric "paired_reference" = 1), or None."""
    if "paired_reference" not in wide.columns:
        return None
    keys = wide.index[wide["paired_reference"] == 1]
    return keys[0] if len(keys) else None


def _paired(wide: pd.DataFrame, key: tuple, metric: str) -> str | None:
    """"-0.004 (paired 95% [-0.021, +0.013], p = 0.71, within noise)" for row `key`, or None without a paired
    test. "beyond noise" only where p < 0.05 (exact McNemar for Hit@k, paired bootstrap for MRR)."""
    columns = [f"paired_{metric}{s}" for s in ("", "_lo", "_hi", "_p")]
    if not all(c in wide.columns for c in columns):
        return None
    d, lo, hi, p = (float(wide.loc[key, c]) for c in columns)
    if not math.isfinite(d):
        return None
    verdict = "beyond noise" if p < PAIRED_ALPHA else "within noise"
    return f"{d:+.3f} (paired 95% [{lo:+.3f}, {hi:+.3f}], p = {format_p(p)}, {verdict})"


def _label(method: str, variant: str) -> str:
    return method if variant in ("default", "zero-shot") else f"{method} [{variant}]"


def _ablation_line(dataset: str, wide: pd.DataFrame, metric: str, indicative: dict[tuple, int]) -> str:
    """One bullet: the full model's value, every variant's change against it (lowest first), and, where the table
    has intervals, whether each change is within noise (the two 95% intervals overlap) or beyond it."""
    full_rows = wide.xs("full", level="variant", drop_level=False)
    full_key = full_rows.index[0]
    full = full_rows[metric].iloc[0]
    full_interval = _interval(wide, full_key, metric)
    others = wide[metric].drop(index="full", level="variant").sort_values()
    changes, beyond, judged, paired_any = [], [], False, False
    for key, value in others.items():
        text = f"{key[2]} {value - full:+.3f}"
        paired = _paired(wide, key, metric)
        if key in indicative:
            text += f" (indicative, n = {indicative[key]:,})"
        elif paired is not None:
            judged = paired_any = True
            text = f"{key[2]} {paired}"
            if "beyond noise" in paired:
                beyond.append(key[2])
        else:
            overlap = intervals_overlap(_interval(wide, key, metric), full_interval)
            if overlap is not None:
                judged = True
                text += " (within noise)" if overlap else " (beyond noise)"
                if not overlap:
                    beyond.append(key[2])
        changes.append(text)
    line = (f"- **{dataset}**, {metric_name(metric)} of the full model {full:.3f}; change per variant "
            f"(lowest first): " + ", ".join(changes) + ".")
    rule = "paired test on the same windows, p < 0.05" if paired_any else "95% intervals do not overlap"
    calm = "paired tests on the same windows, every p >= 0.05" if paired_any else "the 95% intervals overlap"
    if judged:
        line += (f" Beyond noise ({rule}): {', '.join(beyond)}." if beyond else
                 f" Every change is within noise ({calm}).")
    return line


def metric_name(metric: str) -> str:
    return metric.replace("hit@", "Hit@").replace("mrr", "MRR").replace("ndcg@", "NDCG@")
