"""The Markdown rendering of results tables (nextlocmoe.results): intervals in the cell, a note saying which."""

import json
from pathlib import Path

import numpy as np
import pandas as pd

from nextlocmoe.io import code_hash
from nextlocmoe.metrics import retrieval_metrics
from nextlocmoe.results import INTERVAL_NOTE, format_interval, is_interval_metric, results_markdown


def tidy(rows):
    return pd.DataFrame([{"experiment": "supervised", "method": m, "kind": k, "dataset": "nyc", "variant": "default",
                          "metric": metric, "value": value}
                         for m, k, metrics in rows for metric, value in metrics.items()])


def cells(markdown, method):
    """{column: cell} of the table row of `method`."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    for line in lines[2:]:
        row = [c.strip() for c in line.strip("|").split("|")]
        if row[0] == method:
            return dict(zip(header, row))
    raise KeyError(method)


def test_cells_carry_the_interval_and_the_note_names_the_method():
    ranks = np.array([1] * 8 + [30] * 2)                        # Hit@1 = 0.8, Wilson [0.490, 0.943]
    metrics = retrieval_metrics(ranks, distance_error_m=np.full(10, 1234.5))
    markdown = results_markdown(tidy([("markov", "baseline", metrics)]), "supervised", "cpu", ["a note"], "text")
    row = cells(markdown, "markov")
    assert row["Hit@1"] == "0.800 [0.490, 0.943]"
    assert row["MRR"] == f"{metrics['mrr']:.3f} [{metrics['mrr_lo']:.3f}, {metrics['mrr_hi']:.3f}]"
    assert row["NDCG@10"] == f"{metrics['ndcg@10']:.4f}" and row["mean dist (m)"] == "1,234.5" and row["n"] == "10"
    # the bounds are no columns of their own
    assert not any("_lo" in c or "_hi" in c for c in row)
    assert f"- {INTERVAL_NOTE}" in markdown and "Wilson" in INTERVAL_NOTE and "bootstrap" in INTERVAL_NOTE
    assert markdown.index("- a note") < markdown.index(INTERVAL_NOTE)


def test_tables_without_intervals_render_as_before():
    old = {"hit@1": 0.12, "hit@10": 0.44, "mrr": 0.2209, "n": 200}
    markdown = results_markdown(tidy([("markov", "baseline", old)]), "supervised", "cpu", [], "text")
    row = cells(markdown, "markov")
    assert row["Hit@1"] == "0.1200" and row["MRR"] == "0.2209" and row["n"] == "200"
    assert INTERVAL_NOTE not in markdown
    # a row lacking bounds in a table that has them shows its plain value
    new = retrieval_metrics(np.array([1, 2, 3]))
    markdown = results_markdown(tidy([("markov", "baseline", old), ("lstm", "baseline", new)]), "s", "cpu", [], "t")
    assert cells(markdown, "markov")["Hit@1"] == "0.1200" and "[" in cells(markdown, "lstm")["Hit@1"]
    assert format_interval("hit@1", 0.5, float("nan"), 0.6) == "0.5000"
    assert is_interval_metric("hit@10_lo") and is_interval_metric("mrr_hi") and not is_interval_metric("hit@10")


def test_committed_results_were_made_by_this_code():
    """Every table of the committed reproduction (results/*.json of a `nextlocmoe run` or `prepare`, not the
    benchmarks and learning curves, which are measured on their own and say with what code) carries the code hash of the library it was made with; it must be
    the hash of the code in this checkout, or the tables describe code that no longer exists."""
    results = Path(__file__).resolve().parent.parent / "results"
    stamps = {path.name: json.loads(path.read_text()) for path in sorted(results.glob("*.json"))
              if not path.name.startswith(("bench_", "learning_curve"))}
    assert stamps, "no committed results"
    current = code_hash()
    stale = {name: stamp.get("code_hash") for name, stamp in stamps.items() if stamp.get("code_hash") != current}
    assert not stale, (f"results made by other code (code hash now {current}): {stale}; rerun `make reproduce` "
                       "and commit results/, figures/ and notebooks/")
