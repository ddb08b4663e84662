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
    ranking, paper = "NextLocMoE (our ranking head) beats every baseline", "NextLocMoE (the paper's head) beats every baseline"
    assert frame.loc[f"{ranking} (nyc, Hit@1)", "verdict"] == \
        "supported (difference +0.100; 95% intervals apart, no paired test)"
    assert frame.loc[f"{ranking} (nyc, Hit@1)", "ours"] == "nextlocmoe_ranking 0.300 vs user_most_frequent 0.200"
    assert frame.loc[f"{ranking} (nyc, Hit@10)", "verdict"].startswith("not supported: within")
    # the paper's own method is judged too, not only the best of the two heads
    assert frame.loc[f"{paper} (nyc, Hit@1)", "verdict"].startswith("contradicted: difference -0.190")
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
    assert moe["verdict"] == "supported (full - without +0.200; 95% intervals apart, no paired test)"
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


def test_a_paired_test_decides_where_the_table_has_one_for_the_two_rows():
    """Intervals apart (0.50 vs 0.30, half-width 0.02) but a paired p of 0.2: the paired test decides; its sign is
    turned when the claim's row is the reference (full - without, the test stored on the variant's row)."""
    def paired(d, lo, hi, p):
        return [{"method": "nextlocmoe_ranking", "kind": "ablation", "dataset": "nyc", "variant": "no_location_moe",
                 "metric": f"paired_hit@10{s}", "value": v} for s, v in (("", d), ("_lo", lo), ("_hi", hi), ("_p", p))]
    reference = [{"method": "nextlocmoe_ranking", "kind": "extension", "dataset": "nyc", "variant": "full",
                  "metric": "paired_reference", "value": 1.0}]
    base = rows("nextlocmoe_ranking", "extension", "nyc", "full", 0.2, 0.50) \
        + rows("nextlocmoe_ranking", "ablation", "nyc", "no_location_moe", 0.1, 0.30) + reference
    verdict = paper_comparison(pd.DataFrame(base + paired(-0.2, -0.5, 0.1, 0.2)), "ablations")["verdict"].iloc[0]
    assert verdict == "not supported: within noise (full - without +0.200, paired 95% [-0.100, +0.500], p = 0.2)"
    verdict = paper_comparison(pd.DataFrame(base + paired(-0.2, -0.25, -0.15, 1e-4)), "ablations")["verdict"].iloc[0]
    assert verdict == "supported (full - without +0.200, paired 95% [+0.150, +0.250], p = 0.0001)"
