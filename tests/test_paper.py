"""The paper's claims beside our numbers: verdicts computed from hand-made results tables."""

from __future__ import annotations

import pandas as pd
import pytest

from nextlocmoe.errors import ConfigError
from nextlocmoe.report.paper import paper_comparison, paper_markdown


def rows(method, kind, dataset, variant, hit1, hit10, half=0.02):
    out = []
    for metric, value in (("hit@1", hit1), ("hit@10", hit10)):
        out += [{"method": method, "kind": kind, "dataset": dataset, "variant": variant, "metric": m, "value": v}
                for m, v in ((metric, value), (f"{metric}_lo", value - half), (f"{metric}_hi", value + half))]
    return out


def test_supervised_verdicts_follow_the_intervals():
    table = pd.DataFrame(
        rows("user_most_frequent", "baseline", "nyc", "default", 0.20, 0.50)
        + rows("markov", "baseline", "nyc", "default", 0.10, 0.30)
        + rows("nextlocmoe", "paper method", "nyc", "default", 0.01, 0.02)
        + rows("nextlocmoe_ranking", "extension", "nyc", "default", 0.30, 0.51))
    frame = paper_comparison(table, "supervised").set_index("claim")
    assert frame.loc["NextLocMoE beats every baseline (nyc, Hit@1)", "verdict"].startswith("supported")
    assert frame.loc["NextLocMoE beats every baseline (nyc, Hit@1)", "ours"] == \
        "nextlocmoe_ranking 0.300 vs user_most_frequent 0.200"
    assert frame.loc["NextLocMoE beats every baseline (nyc, Hit@10)", "verdict"].startswith("not supported: within")
    assert frame.loc["Hit@1 of NextLocMoE (regression head + KD-tree), nyc", "verdict"].startswith("cannot test")
    worse = pd.DataFrame(rows("user_most_frequent", "baseline", "nyc", "default", 0.50, 0.50)
                         + rows("nextlocmoe_ranking", "extension", "nyc", "default", 0.30, 0.49))
    verdicts = paper_comparison(worse, "supervised")["verdict"].tolist()
    assert any(v.startswith("contradicted") for v in verdicts)


def test_ablation_rows_missing_from_the_plan_cannot_be_tested():
    table = pd.DataFrame(rows("nextlocmoe_ranking", "extension", "nyc", "full", 0.2, 0.50)
                         + rows("nextlocmoe_ranking", "ablation", "nyc", "no_location_moe", 0.1, 0.30))
    frame = paper_comparison(table, "ablations")
    moe = frame[frame["claim"].str.contains("Location Semantics")].iloc[0]
    assert moe["verdict"] == "supported (full - without +0.200)"
    others = frame[~frame["claim"].str.contains("Location Semantics")]
    assert len(others) == 2 and (others["verdict"].str.startswith("cannot test")).all()


def test_efficiency_ratio_and_markdown():
    table = pd.DataFrame([{"method": "nextlocmoe_vs_llm_mob", "metric": "speedup_vs_generation_b1", "value": 99.0}])
    frame = paper_comparison(table, "efficiency")
    assert frame["ours"].tolist() == ["99x"] and frame["verdict"].iloc[0].startswith("supported")
    text = paper_markdown(table, "efficiency")
    assert text.startswith("| claim | paper | ours | verdict | what differs |") and "up to 600x" in text
    assert "No claim" in paper_markdown(pd.DataFrame(columns=["method", "metric", "value"]), "efficiency")


def test_unknown_experiment_and_bad_table_raise_clear_errors():
    with pytest.raises(ConfigError, match="expected one of"):
        paper_comparison(pd.DataFrame(), "routing")
    with pytest.raises(ConfigError, match="lacks columns"):
        paper_comparison(pd.DataFrame({"method": []}), "supervised")
