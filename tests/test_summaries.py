"""Sentences of nextlocmoe.report.summaries on small hand-made tables whose answer is known.

Intervals are written by hand (not computed), so whether two rows overlap is decided by the test's numbers:
e.g. [0.38, 0.42] and [0.41, 0.47] overlap (within noise), [0.30, 0.34] and [0.41, 0.47] do not.
"""

import pandas as pd

from nextlocmoe.report.summaries import INDICATIVE_FRACTION, intervals_overlap, summarize


def table(experiment, rows):
    """rows: (method, kind, dataset, variant, {metric: value}) -> a tidy frame as the experiments write it."""
    return pd.DataFrame([{"experiment": experiment, "method": m, "kind": k, "dataset": d, "variant": v,
                          "metric": metric, "value": value}
                         for m, k, d, v, metrics in rows for metric, value in metrics.items()])


def ranked(method, kind, h10, lo, hi, n=2000, variant="default"):
    return (method, kind, "nyc", variant, {"hit@10": h10, "hit@10_lo": lo, "hit@10_hi": hi, "n": n})


def test_intervals_overlap():
    assert intervals_overlap((0.38, 0.42), (0.41, 0.47)) and intervals_overlap((0.41, 0.47), (0.38, 0.42))
    assert intervals_overlap((0.1, 0.2), (0.2, 0.3))                     # touching counts as overlap
    assert not intervals_overlap((0.30, 0.34), (0.41, 0.47))
    assert intervals_overlap(None, (0.1, 0.2)) is None


def test_without_intervals_the_wording_is_unchanged():
    rows = []
    for method, kind, h1, h10 in [("markov", "baseline", 0.10, 0.30), ("user_most_frequent", "baseline", 0.20, 0.50),
                                  ("nextlocmoe", "paper method", 0.15, 0.60)]:
        rows.append((method, kind, "nyc", "default", {"hit@1": h1, "hit@10": h10}))
    text = summarize(table("supervised", rows), "supervised")
    assert "**nyc**, Hit@1: best user_most_frequent (0.200); nextlocmoe 0.150 (rank 2 of 3, -0.050 vs the best " \
           "baseline user_most_frequent)." in text
    assert "noise" not in text and "indicative" not in text


def test_within_and_beyond_noise_against_the_best_baseline():
    rows = [ranked("markov", "baseline", 0.30, 0.28, 0.32),
            ranked("user_most_frequent", "baseline", 0.44, 0.41, 0.47),
            ranked("nextlocmoe", "paper method", 0.40, 0.38, 0.42),          # overlaps 0.41-0.47
            ranked("nextlocmoe_ranking", "extension", 0.32, 0.30, 0.34)]     # does not
    text = summarize(table("supervised", rows), "supervised", metrics=("hit@10",))
    assert text == ("- **nyc**, Hit@10: best user_most_frequent (0.440); nextlocmoe 0.400 (rank 2 of 4, -0.040 vs "
                    "the best baseline user_most_frequent, within noise); nextlocmoe_ranking 0.320 (rank 3 of 4, "
                    "-0.120 vs the best baseline user_most_frequent, below it beyond noise).\n")
    rows[2] = ranked("nextlocmoe", "paper method", 0.55, 0.52, 0.58)         # above the best baseline, beyond noise
    text = summarize(table("supervised", rows), "supervised", metrics=("hit@10",))
    assert "best nextlocmoe (0.550); nextlocmoe 0.550 (rank 1 of 4, +0.110 vs the best baseline " \
           "user_most_frequent, above it beyond noise)" in text


def test_a_row_on_few_windows_is_indicative_and_never_ranked():
    rows = [ranked("user_most_frequent", "baseline", 0.44, 0.41, 0.47),
            ranked("nextlocmoe", "paper method", 0.40, 0.38, 0.42),
            ranked("llm_mob", "baseline", 0.60, 0.31, 0.83, n=10, variant="zero-shot (prompted, no training)")]
    assert 10 < INDICATIVE_FRACTION * 2000
    text = summarize(table("zero_shot", rows), "zero_shot", metrics=("hit@10",))
    # LLM-Mob's 0.60 on 10 windows would top the table; it is neither the best nor the best baseline
    assert "best user_most_frequent (0.440); nextlocmoe 0.400 (rank 2 of 2, -0.040 vs the best baseline " \
           "user_most_frequent, within noise)" in text
    assert "llm_mob [zero-shot (prompted, no training)] 0.600, indicative (n = 10), not ranked." in text
    # comparable n (here 1,000 vs 2,000) is ranked as usual
    rows[2] = ranked("llm_mob", "baseline", 0.60, 0.57, 0.63, n=1000)
    text = summarize(table("zero_shot", rows), "zero_shot", metrics=("hit@10",))
    assert "best llm_mob (0.600)" in text and "indicative" not in text
    assert "-0.200 vs the best baseline llm_mob, below it beyond noise" in text


def test_ablation_changes_within_or_beyond_noise():
    rows = [("nextlocmoe", "paper method", "nyc", "full", {"hit@10": 0.50, "hit@10_lo": 0.47, "hit@10_hi": 0.53,
                                                           "n": 2000}),
            ("nextlocmoe", "ablation", "nyc", "no_prompt", {"hit@10": 0.40, "hit@10_lo": 0.37, "hit@10_hi": 0.43,
                                                            "n": 2000}),
            ("nextlocmoe", "ablation", "nyc", "experts_1", {"hit@10": 0.52, "hit@10_lo": 0.49, "hit@10_hi": 0.55,
                                                            "n": 2000}),
            ("nextlocmoe", "ablation", "nyc", "tiny_test", {"hit@10": 0.90, "hit@10_lo": 0.60, "hit@10_hi": 0.98,
                                                            "n": 10})]
    text = summarize(table("ablations", rows), "ablations")
    assert text == ("- **nyc**, Hit@10 of the full model 0.500; change per variant (lowest first): no_prompt -0.100 "
                    "(beyond noise), experts_1 +0.020 (within noise), tiny_test +0.400 (indicative, n = 10). "
                    "Beyond noise (95% intervals do not overlap): no_prompt.\n")
    text = summarize(table("ablations", [rows[0], rows[2]]), "ablations")
    assert text.endswith("experts_1 +0.020 (within noise). Every change is within noise (the 95% intervals "
                         "overlap).\n")
    # an old table without intervals keeps its old sentence
    plain = [(m, k, d, v, {"hit@10": x["hit@10"]}) for m, k, d, v, x in rows[:3]]
    assert summarize(table("ablations", plain), "ablations") == (
        "- **nyc**, Hit@10 of the full model 0.500; change per variant (lowest first): no_prompt -0.100, "
        "experts_1 +0.020.\n")


def paired(d, lo, hi, p, metric="hit@10"):
    return {f"paired_{metric}": d, f"paired_{metric}_lo": lo, f"paired_{metric}_hi": hi, f"paired_{metric}_p": p}


def test_paired_tests_decide_noise_where_the_table_has_them():
    """Intervals that overlap (0.40 [0.38, 0.42] vs 0.44 [0.41, 0.47]) but a paired test with p = 0.001: the
    sentence follows the paired test, against the reference row, and names its interval and p."""
    rows = [("window_time", "baseline", "nyc", "default", {"hit@10": 0.44, "hit@10_lo": 0.41, "hit@10_hi": 0.47,
                                                           "n": 2000, "paired_reference": 1.0}),
            ("nextlocmoe", "paper method", "nyc", "default", {"hit@10": 0.40, "hit@10_lo": 0.38, "hit@10_hi": 0.42,
                                                              "n": 2000, **paired(-0.04, -0.06, -0.02, 0.001)})]
    text = summarize(table("supervised", rows), "supervised", metrics=("hit@10",))
    assert text == ("- **nyc**, Hit@10: best window_time (0.440); nextlocmoe 0.400 (rank 2 of 2, -0.040 (paired 95% "
                    "[-0.060, -0.020], p = 0.001, beyond noise) vs window_time).\n")
    rows[1][4].update(paired(-0.04, -0.09, 0.01, 0.2))
    assert "p = 0.2, within noise) vs window_time" in summarize(table("supervised", rows), "supervised",
                                                                  metrics=("hit@10",))


def test_ablation_changes_follow_the_paired_tests():
    rows = [("nextlocmoe", "extension", "nyc", "full", {"hit@10": 0.50, "n": 2000, "paired_reference": 1.0}),
            ("nextlocmoe", "ablation", "nyc", "no_pointer", {"hit@10": 0.40, "n": 2000,
                                                             **paired(-0.10, -0.13, -0.07, 1e-6)}),
            ("nextlocmoe", "ablation", "nyc", "no_prompt", {"hit@10": 0.49, "n": 2000,
                                                            **paired(-0.01, -0.03, 0.01, 0.4)})]
    text = summarize(table("ablations", rows), "ablations")
    assert text == ("- **nyc**, Hit@10 of the full model 0.500; change per variant (lowest first): no_pointer -0.100 "
                    "(paired 95% [-0.130, -0.070], p = 1e-06, beyond noise), no_prompt -0.010 (paired 95% [-0.030, "
                    "+0.010], p = 0.4, within noise). Beyond noise (paired test on the same windows, p < 0.05): "
                    "no_pointer.\n")
    text = summarize(table("ablations", [rows[0], rows[2]]), "ablations")
    assert text.endswith("Every change is within noise (paired tests on the same windows, every p >= 0.05).\n")


def test_p_values_never_read_zero():
    from nextlocmoe.results import format_p
    assert format_p(0.0) == "<1e-300"            # an exact McNemar p that underflowed double precision
    assert format_p(1.4e-148) == "1.4e-148" and format_p(0.03125) == "0.031" and format_p(float("nan")) == "n/a"
