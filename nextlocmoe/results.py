"""Results files: the one layout, its writer and reader, and the Markdown rendering of tidy tables.

A leaf module (it imports io and pandas only): the layers that make results (experiments, analysis, data
statistics) write through it, and the report layer (nextlocmoe.report) reads through it.

Every table of results/ is three files written together, atomically (temp file + rename):

    <name>.csv    the values (experiments: tidy, one row per number: experiment, method, kind, dataset,
                  variant, metric, value)
    <name>.md     the readable table a notebook shows (`shows:<name>.md` cells display it verbatim)
    <name>.json   the provenance sidecar: git SHA, profile, device, package versions, data checksum, seed, the
                  files it describes, and whatever the writer adds (plan, jobs, decisions)

`write_results` writes them, `read_results` / `read_table` read them back: figures and summaries are drawn
from these files, so what a reader sees is what is committed.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import DataError
from .io import provenance, write_json_atomic, write_text_atomic


def format_p(p: float) -> str:
    """A p-value for a table or a sentence: two significant digits; an exact McNemar p so small that it
    underflows double precision (0.0) reads "<1e-300", never "0"."""
    if not math.isfinite(p):
        return "n/a"
    return "<1e-300" if p == 0 else f"{p:.2g}"

ID_COLUMNS = ("experiment", "method", "kind", "dataset", "variant")
TIDY_COLUMNS = (*ID_COLUMNS, "metric", "value")


# ---------------------------------------------------------------------------------------------------
# writer and reader

def write_results(results_dir: str | os.PathLike, name: str, table: pd.DataFrame, markdown: str,
                  stamp: dict[str, Any]) -> dict[str, Path]:
    """Write <name>.csv, <name>.md and <name>.json (the stamp, with the two file names added)."""
    results = Path(results_dir)
    files = [f"{name}.csv", f"{name}.md"]
    return {
        "csv": write_text_atomic(results / files[0], table.to_csv(index=False)),
        "md": write_text_atomic(results / files[1], markdown),
        "json": write_json_atomic(results / f"{name}.json", {**stamp, "files": files}),
    }


@dataclass
class ResultsFile:
    table: pd.DataFrame
    markdown: str
    stamp: dict[str, Any]


def read_results(results_dir: str | os.PathLike, name: str) -> ResultsFile:
    """The three files of results table `name`; a missing one is an error naming it and the command to run."""
    results = Path(results_dir)
    paths = [results / f"{name}.{ext}" for ext in ("csv", "md", "json")]
    for path in paths:
        if not path.is_file():
            raise DataError(f"{path} does not exist; write it first (e.g. `nextlocmoe run {name}` or the "
                            "notebook that makes it)")
    try:
        stamp = json.loads(paths[2].read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{paths[2]} is not valid JSON: {err}") from None
    return ResultsFile(pd.read_csv(paths[0], keep_default_na=False, na_values=[""]), paths[1].read_text(), stamp)


def read_table(results_dir: str | os.PathLike, name: str) -> pd.DataFrame:
    return read_results(results_dir, name).table


# ---------------------------------------------------------------------------------------------------
# Markdown

def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub markdown table; integers get thousands separators."""
    def cell(v: Any) -> str:
        if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            return f"{int(v):,}"
        if isinstance(v, (float, np.floating)):
            return f"{float(v):,.4g}"
        return str(v)

    lines = ["| " + " | ".join(map(str, df.columns)) + " |",
             "|" + "|".join(" ---: " if pd.api.types.is_numeric_dtype(df[c]) else " --- " for c in df.columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


ACCURACY_COLUMNS = {"hit@1": "Hit@1", "hit@5": "Hit@5", "hit@10": "Hit@10", "hit@20": "Hit@20", "mrr": "MRR",
                    "ndcg@10": "NDCG@10", "dist_mean_m": "mean dist (m)", "dist_median_m": "median dist (m)",
                    "n": "n", "unparsable_fraction": "unparsable"}

EFFICIENCY_ORDER = ("params_total", "params_trainable", "train_batch", "train_samples_per_s", "peak_memory_train_mib",
                    "infer_samples_per_s_b", "latency_ms_b1", "best_batch", "infer_samples_per_s_best",
                    "latency_ms_per_sample_best", "batch_latency_ms_best", "peak_memory_infer_mib", "prompt_tokens",
                    "new_tokens", "gen_samples_per_s_b", "gen_latency_ms_b1", "gen_best_batch",
                    "gen_samples_per_s_best",
                    "peak_memory_mib", "speedup_vs_generation_b1", "speedup_best_vs_best", "tokens_per_sample",
                    "e2e_samples_per_s_b", "bare_backbone_samples_per_s_b", "e2e_over_bare_b")


def _efficiency_order(metric: str) -> tuple[int, int, str]:
    """Sort key: the position in EFFICIENCY_ORDER (a name, or a prefix followed by a batch size), then the batch."""
    if metric in EFFICIENCY_ORDER:
        return EFFICIENCY_ORDER.index(metric), -1, metric
    match = re.fullmatch(r"(.*_b)(\d+)", metric)
    if match and match.group(1) in EFFICIENCY_ORDER:
        return EFFICIENCY_ORDER.index(match.group(1)), int(match.group(2)), metric
    return len(EFFICIENCY_ORDER), -1, metric


def format_value(metric: str, value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if metric.startswith(("hit@", "ndcg@")) or metric in ("mrr", "unparsable_fraction"):
        return f"{value:.4f}"
    if metric.endswith("_m") or metric.endswith("_mib"):
        return f"{value:,.1f}"
    if float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.1f}"


INTERVAL_SUFFIXES = ("_lo", "_hi")  # metric + suffix: the bounds of its 95% interval (metrics.retrieval_metrics)
INTERVAL_NOTE = ("Intervals: [lo, hi] after a Hit@k or MRR is its 95% confidence interval over the row's n test "
                 "windows: the Wilson score interval for Hit@k (one hit or miss per window), a percentile "
                 "bootstrap over the test windows for MRR (1,000 resamples, fixed seed 0). Both treat windows as "
                 "independent; windows of one user overlap, so the true uncertainty is somewhat larger.")


def is_interval_metric(metric: str) -> bool:
    """True for the bound of an interval ("hit@10_lo", "mrr_hi"), which is no metric of its own."""
    return str(metric).endswith(INTERVAL_SUFFIXES)


PAIRED_COLUMNS = {"hit@1": "Hit@1", "hit@10": "Hit@10", "mrr": "MRR"}
PAIRED_NOTE = ("Paired tests (`metrics.paired_comparison`): each row against its dataset's reference row (named in "
               "the notes) on the same test windows: the difference row - reference, its 95% paired-bootstrap "
               "interval, and p (exact McNemar for Hit@k, paired bootstrap for MRR); p < 0.05 is \"beyond noise\".")


def format_interval(metric: str, value: float, lo: float, hi: float) -> str:
    """A point metric with its 95% interval in one cell, 3 decimals: "0.440 [0.373, 0.509]"; the plain value
    (`format_value`) when a bound is missing (tables written before intervals existed)."""
    if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in (value, lo, hi)):
        return format_value(metric, value)
    return f"{value:.3f} [{lo:.3f}, {hi:.3f}]"


def results_markdown(table: pd.DataFrame, name: str, profile: str, notes: list[str], description: str,
                     layout: str = "methods") -> str:
    """A pivot of a tidy experiment table. layout "methods": one row per method x dataset x variant, one column
    per metric; "metrics": one row per metric, one column per method (many metrics, few methods).

    In the "methods" layout a metric with interval bounds ("<metric>_lo", "<metric>_hi") shows them in its
    own cell, "0.440 [0.373, 0.509]" (`format_interval`), and a note says which intervals they are; the bounds
    get no column of their own. The tidy CSV keeps them as metrics of their own."""
    index = ["method", "kind", "dataset", "variant"]
    order = list(dict.fromkeys(table["metric"]))           # metrics in the order the rows produced them
    keys = list(dict.fromkeys(map(tuple, table[index].itertuples(index=False))))
    wide = table.pivot_table(index=index, columns="metric", values="value", aggfunc="first")

    def value(key: tuple, metric: str) -> float:
        return wide.loc[key, metric] if metric in wide.columns else math.nan

    if layout == "metrics":
        order = sorted(order, key=_efficiency_order)
        methods = [key[0] for key in keys]
        labels = [m if methods.count(m) == 1 else f"{m} [{key[3]}]" for m, key in zip(methods, keys)]
        rows = [{"metric": metric, **{label: format_value(metric, value(key, metric))
                                      for label, key in zip(labels, keys)}} for metric in order]
    else:
        columns = {m: label for m, label in ACCURACY_COLUMNS.items() if m in order}

        def cell(key: tuple, metric: str) -> str:
            if f"{metric}_lo" in wide.columns and f"{metric}_hi" in wide.columns:
                return format_interval(metric, value(key, metric), value(key, f"{metric}_lo"),
                                       value(key, f"{metric}_hi"))
            return format_value(metric, value(key, metric))

        rows = [{**dict(zip(index, key)), **{label: cell(key, metric) for metric, label in columns.items()}}
                for key in keys]
        if any(f"{m}_lo" in wide.columns for m in columns):
            notes = [*notes, INTERVAL_NOTE]
    text = [f"# {name} (profile {profile})", "", description, "", markdown_table(pd.DataFrame(rows))]
    paired = [m for m in PAIRED_COLUMNS if f"paired_{m}" in wide.columns]
    if layout == "methods" and paired:
        def paired_cell(key: tuple, metric: str) -> str:
            if value(key, "paired_reference") == 1:
                return "(reference)"
            d, lo, hi, p = (value(key, f"paired_{metric}{s}") for s in ("", "_lo", "_hi", "_p"))
            return "" if not math.isfinite(d) else f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}] p={format_p(p)}"
        shown = [key for key in keys if value(key, "paired_reference") == 1
                 or any(math.isfinite(value(key, f"paired_{m}")) for m in paired)]
        pairs = [{**dict(zip(index, key)), **{f"{PAIRED_COLUMNS[m]} vs reference": paired_cell(key, m)
                                              for m in paired}} for key in shown]
        text += [PAIRED_NOTE, "", markdown_table(pd.DataFrame(pairs))]
    text += ["Notes:", ""] + [f"- {note}" for note in notes]
    text += ["", f"Tidy values: {name}.csv; provenance: {name}.json; regenerate with "
                 f"`nextlocmoe run {name} --profile {profile}`.", ""]
    return "\n".join(text)


# ---------------------------------------------------------------------------------------------------
# the dataset statistics table (notebook 00, `nextlocmoe prepare`)

def write_dataset_statistics(df: pd.DataFrame, results_dir: str | os.PathLike = "results", profile: str = "cpu",
                             seed: int | None = None) -> dict[str, Path]:
    """dataset_statistics.{csv,md,json} from `data.prepare.dataset_statistics`; prints the table."""
    table = markdown_table(df)
    paths = write_results(results_dir, "dataset_statistics", df, table, provenance(
        profile, seed=seed, data_checksum=df.attrs.get("data_checksum"), cache_key=df.attrs.get("cache_key"),
        command="nextlocmoe prepare"))
    print(table)
    return paths


def split_training_curves(curves: pd.DataFrame) -> dict[str, tuple[pd.DataFrame, pd.DataFrame]]:
    """results/training_curves.csv -> {method: (per-epoch history, per-batch steps)}, each with its own columns."""
    out = {}
    for method, rows in curves.groupby("method", sort=False):
        parts = [rows[rows["table"] == t].drop(columns=["method", "dataset", "table"]).dropna(axis=1, how="all")
                 .reset_index(drop=True) for t in ("epoch", "step")]
        out[method] = (parts[0], parts[1])
    return out


def training_floor_table(curves: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """results/training_curves.csv -> {method: its training-free floors on the run's validation windows} (rows of
    table "floor": floor, val_<metric>); a file written before the floors were added gives {}."""
    if "table" not in curves.columns or "floor" not in curves.columns:
        return {}
    floors = curves[curves["table"] == "floor"]
    return {method: rows.drop(columns=["method", "dataset", "table"]).dropna(axis=1, how="all").reset_index(drop=True)
            for method, rows in floors.groupby("method", sort=False)}
