"""Retrieval metrics against brute force: every rank here is checked against a full sort of all candidates.

The reference ranking (`reference_order`) sorts every candidate by (squared distance, id) or by
(-score, id) with np.lexsort, independently of the KD-tree, the disc-counting fast path and the chunked
counting in nextlocmoe.metrics.
"""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from nextlocmoe.errors import ConfigError, DataError
from nextlocmoe.metrics import (CandidateIndex, Ranked, bootstrap_interval, metrics_table, rank_predictions,
                                ranks_from_scores, retrieval_metrics, wilson_interval)


# --- independent reference -------------------------------------------------------------------------

def reference_order(keys: np.ndarray) -> np.ndarray:
    """(N, L) candidate ids of each row sorted by (key ascending, id ascending)."""
    ids = np.broadcast_to(np.arange(keys.shape[1]), keys.shape)
    return np.lexsort((ids, keys), axis=-1)


def reference_d2(points: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    return ((points[:, None, :] - candidates[None, :, :]) ** 2).sum(-1)  # (N, L)


def reference_ranks(order: np.ndarray, targets: np.ndarray) -> np.ndarray:
    return np.argmax(order == targets[:, None], axis=1) + 1


def grid_case(rng, side=9, n_points=300, duplicates=5):
    """Candidates on an integer grid (plus exact duplicates); points on grid points and midpoints."""
    gx, gy = np.meshgrid(np.arange(side), np.arange(side))
    candidates = np.stack([gx.ravel(), gy.ravel()], 1).astype(float)
    candidates = np.concatenate([candidates, candidates[rng.choice(len(candidates), duplicates)]])
    candidates = candidates[rng.permutation(len(candidates))]             # ids unrelated to position
    points = rng.integers(-1, 2 * side + 1, size=(n_points, 2)) / 2.0     # grid points and midpoints
    return candidates, points


# --- hand-computed cases ---------------------------------------------------------------------------

def test_three_candidates_on_a_line_by_hand():
    index = CandidateIndex([[0.0, 0.0], [10.0, 0.0], [20.0, 0.0]])
    points = np.array([[4.0, 0.0], [5.0, 0.0], [15.0, 3.0], [30.0, 0.0]])
    dist, idx = index.topk(points, 3)
    # x=5 ties candidates 0 and 1 (lower id first); (15, 3) ties 1 and 2
    assert idx.tolist() == [[0, 1, 2], [0, 1, 2], [1, 2, 0], [2, 1, 0]]
    assert np.allclose(dist[0], [4, 6, 16]) and np.allclose(dist[3], [10, 20, 30])
    assert np.allclose(dist[2], [math.hypot(5, 3), math.hypot(5, 3), math.hypot(15, 3)])
    assert index.rank_of(points, [1, 1, 2, 0]).tolist() == [2, 2, 2, 3]
    assert index.rank_of(points, [0, 0, 1, 2]).tolist() == [1, 1, 1, 1]


def test_metric_values_by_hand():
    metrics = retrieval_metrics(np.array([1, 2, 3, 25]), distance_error_m=[0.0, 10.0, 20.0, 50.0])
    assert metrics["n"] == 4
    assert metrics["hit@1"] == 0.25 and metrics["hit@5"] == 0.75 and metrics["hit@20"] == 0.75
    assert metrics["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 25) / 4)
    assert metrics["ndcg@5"] == pytest.approx((1 + 1 / math.log2(3) + 1 / 2) / 4)
    assert metrics["ndcg@20"] == metrics["ndcg@5"]
    assert metrics["dist_mean_m"] == 20.0 and metrics["dist_median_m"] == 15.0
    # point metrics first (in their old order), then the 95% intervals, n last
    intervals = ["hit@1_lo", "hit@1_hi", "hit@5_lo", "hit@5_hi", "hit@10_lo", "hit@10_hi", "hit@20_lo",
                 "hit@20_hi", "mrr_lo", "mrr_hi"]
    expected_keys = ["hit@1", "hit@5", "hit@10", "hit@20", "ndcg@5", "ndcg@10", "ndcg@20", "mrr",
                     "dist_mean_m", "dist_median_m", *intervals, "n"]
    assert list(metrics) == expected_keys
    assert list(retrieval_metrics(np.array([1]))) == [k for k in expected_keys if not k.startswith("dist_")]


def test_scores_by_hand_with_ties():
    scores = np.array([[0.5, 0.9, 0.9, 0.1], [2.0, 2.0, 2.0, 2.0]])
    assert ranks_from_scores(scores, [2, 3]).tolist() == [2, 4]
    assert ranks_from_scores(scores, [1, 0]).tolist() == [1, 1]


# --- brute force on random inputs --------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 3, 10, 50])
def test_topk_and_ranks_match_brute_force_continuous(k):
    rng = np.random.default_rng(k)
    candidates = rng.uniform(-5000, 5000, size=(300, 2))
    points = rng.normal(0, 3000, size=(200, 2))
    index = CandidateIndex(candidates)
    order = reference_order(reference_d2(points, candidates))
    dist, idx = index.topk(points, k)
    assert np.array_equal(idx, order[:, :k])
    assert np.allclose(dist, np.linalg.norm(points[:, None] - candidates[idx], axis=-1))
    targets = rng.integers(0, len(candidates), len(points))
    assert np.array_equal(index.rank_of(points, targets), reference_ranks(order, targets))


@pytest.mark.parametrize("k", [1, 2, 4, 5, 8, 9, 30, 86])
def test_topk_matches_brute_force_with_many_ties(k):
    rng = np.random.default_rng(100 + k)
    candidates, points = grid_case(rng)
    index = CandidateIndex(candidates)
    order = reference_order(reference_d2(points, candidates))
    dist, idx = index.topk(points, k)
    assert np.array_equal(idx, order[:, :k])
    # the j-th retrieved candidate has rank j + 1: topk and rank_of share one tie rule
    for j in range(k):
        assert np.array_equal(index.rank_of(points, idx[:, j]), np.full(len(points), j + 1))


def test_ranks_match_brute_force_with_many_ties_and_small_chunks():
    rng = np.random.default_rng(7)
    candidates, points = grid_case(rng, side=11, n_points=400)
    targets = rng.integers(0, len(candidates), len(points))
    expected = reference_ranks(reference_order(reference_d2(points, candidates)), targets)
    for chunk in (1, 37, 1 << 22):
        index = CandidateIndex(candidates, max_chunk_elements=chunk)
        assert np.array_equal(index.rank_of(points, targets), expected)


def test_ranks_exact_far_from_origin_and_at_tiny_distances():
    """Metre coordinates ~1e5 with millimetre spacing: the fast path must defer to the exact count."""
    rng = np.random.default_rng(3)
    candidates = 1e5 + rng.uniform(0, 1e-2, size=(200, 2))
    candidates[::7] = candidates[1::7][: len(candidates[::7])]           # exact duplicates
    points = np.concatenate([candidates[:50], 1e5 + rng.uniform(0, 1e-2, size=(100, 2))])
    targets = rng.integers(0, len(candidates), len(points))
    order = reference_order(reference_d2(points, candidates))
    index = CandidateIndex(candidates)
    assert np.array_equal(index.rank_of(points, targets), reference_ranks(order, targets))
    assert np.array_equal(index.topk(points, 5)[1], order[:, :5])


def test_ranks_from_scores_match_brute_force_with_ties():
    rng = np.random.default_rng(11)
    scores = rng.integers(0, 4, size=(250, 60)).astype(np.float32)      # 4 levels over 60 candidates
    targets = rng.integers(0, 60, 250)
    expected = reference_ranks(reference_order(-scores.astype(np.float64)), targets)
    assert np.array_equal(ranks_from_scores(scores, targets), expected)
    assert np.array_equal(ranks_from_scores(scores, targets, max_chunk_elements=61), expected)
    assert np.array_equal(ranks_from_scores(torch.from_numpy(scores).bfloat16(), torch.from_numpy(targets)),
                          expected)


def test_hit_at_k_monotone_and_bounds():
    rng = np.random.default_rng(5)
    ranks = rng.integers(1, 40, size=500)
    ks = (1, 2, 3, 5, 10, 20, 30, 50)
    metrics = retrieval_metrics(ranks, ks=ks)
    hits = [metrics[f"hit@{k}"] for k in ks]
    assert all(a <= b for a, b in zip(hits, hits[1:])) and hits[-1] == 1.0
    for k in ks[1:]:
        assert 0.0 <= metrics[f"ndcg@{k}"] <= metrics[f"hit@{k}"]
    assert metrics["hit@1"] <= metrics["mrr"] <= 1.0


# --- rank_predictions: one function, two paths, one tie rule ----------------------------------------

def test_points_and_scores_paths_agree():
    rng = np.random.default_rng(21)
    candidates, points = grid_case(rng, side=8, n_points=200, duplicates=0)
    targets = rng.integers(0, len(candidates), len(points))
    index = CandidateIndex(candidates)
    scores = -reference_d2(points, candidates)                            # nearer = higher score
    by_points = rank_predictions(index, targets, points=points)
    by_scores = rank_predictions(candidates, targets, scores=scores)
    np.testing.assert_array_equal(by_points.rank, by_scores.rank)
    np.testing.assert_array_equal(by_points.top1, by_scores.top1)         # the grid has ties: the same winner
    ranking_keys = [key for key in by_points.metrics() if not key.startswith("dist_")]
    assert {k: by_points.metrics()[k] for k in ranking_keys} == {k: by_scores.metrics()[k] for k in ranking_keys}
    # predicted points that sit on a candidate: the top-1 candidate is the point, so distances agree too
    on_candidates = candidates[rng.integers(0, len(candidates), 100)]
    targets = rng.integers(0, len(candidates), 100)
    assert rank_predictions(index, targets, points=on_candidates).metrics() == pytest.approx(
        rank_predictions(candidates, targets, scores=torch.from_numpy(-reference_d2(on_candidates, candidates)))
        .metrics())


def test_rank_predictions_matches_brute_force_with_ties():
    """rank = 1 + #better + #equal with a lower id, top-1 = the lowest id among the best: checked row by row
    against sorting every candidate by (-score, id), on scores with many exact ties (numpy and torch)."""
    rng = np.random.default_rng(5)
    n, L = 60, 25
    scores = rng.integers(0, 4, size=(n, L)).astype(np.float32)           # values 0..3: ties everywhere
    targets = rng.integers(0, L, n)
    candidates = rng.normal(size=(L, 2)) * 100
    for given in (scores, torch.from_numpy(scores)):
        ranked = rank_predictions(candidates, targets, scores=given)
        for row in range(n):
            order = sorted(range(L), key=lambda c: (-scores[row, c], c))   # brute force: best first, lower id first
            assert ranked.rank[row] == order.index(targets[row]) + 1
            assert ranked.top1[row] == order[0]
            assert ranked.error_m[row] == pytest.approx(np.hypot(*(candidates[order[0]] - candidates[targets[row]])))


def test_ranked_concat_is_the_ranking_of_all_rows():
    rng = np.random.default_rng(8)
    candidates = rng.normal(size=(30, 2)) * 50
    scores, targets = rng.normal(size=(40, 30)), rng.integers(0, 30, 40)
    whole = rank_predictions(candidates, targets, scores=scores)
    parts = Ranked.concat([rank_predictions(candidates, targets[a:a + 7], scores=scores[a:a + 7])
                           for a in range(0, 40, 7)])
    for field in Ranked._fields:
        np.testing.assert_array_equal(getattr(whole, field), getattr(parts, field))


def test_distance_errors():
    candidates = np.array([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0]])
    index = CandidateIndex(candidates)
    pred = np.array([[30.0, 40.0], [100.0, 10.0]])
    metrics = rank_predictions(index, [0, 1], points=pred).metrics()
    assert metrics["dist_mean_m"] == pytest.approx((50.0 + 10.0) / 2)
    metrics = rank_predictions(index, [0, 1], [[30.0, 40.0], [100.0, 0.0]], points=pred).metrics()
    assert metrics["dist_mean_m"] == pytest.approx(5.0) and metrics["dist_median_m"] == pytest.approx(5.0)
    scores = np.array([[0.0, 1.0, 1.0], [3.0, 2.0, 1.0]])                 # top-1: candidate 1 (tie), 0
    ranked = rank_predictions(candidates, [2, 1], scores=scores)
    assert ranked.top1.tolist() == [1, 0]
    metrics = ranked.metrics()
    assert metrics["dist_mean_m"] == pytest.approx((math.hypot(100, 100) + 100.0) / 2)
    assert metrics["hit@1"] == 0.0 and metrics["mrr"] == pytest.approx((1 / 2 + 1 / 2) / 2)


# --- 95% intervals -------------------------------------------------------------------------------

def score_test_bounds(successes, n, z=1.96):
    """Wilson bounds found numerically as the p0 where the score statistic |p - p0| / sqrt(p0 (1 - p0) / n)
    equals z (an independent route to the interval: root finding, no closed form)."""
    from scipy.optimize import brentq

    p = successes / n
    f = lambda p0: abs(p - p0) - z * math.sqrt(p0 * (1 - p0) / n)  # noqa: E731  (< 0 inside the interval)
    lo = 0.0 if successes == 0 else brentq(f, 1e-15, p)
    hi = 1.0 if successes == n else brentq(f, p, 1 - 1e-15)
    return lo, hi


def test_wilson_interval_textbook_values_and_edges():
    lo, hi = wilson_interval(8, 10)                     # the textbook example: 8 of 10 at 95%
    assert (round(lo, 3), round(hi, 3)) == (0.490, 0.943)
    z2 = 1.96 ** 2
    lo, hi = wilson_interval(0, 10)                     # no hit: lo is exactly 0, hi is not
    assert lo == 0.0 and hi == pytest.approx(z2 / (10 + z2)) and hi > 0
    lo, hi = wilson_interval(10, 10)
    assert hi == 1.0 and lo == pytest.approx(10 / (10 + z2))
    assert wilson_interval(0, 1) == pytest.approx((0.0, z2 / (1 + z2)))          # n = 1: [0, 0.793]
    assert wilson_interval(1, 1) == pytest.approx((1 / (1 + z2), 1.0))           # [0.207, 1]
    for successes, n in [(1, 3), (5, 17), (37, 200), (1999, 2000), (3, 30_000)]:
        lo, hi = wilson_interval(successes, n)
        assert (lo, hi) == pytest.approx(score_test_bounds(successes, n), abs=1e-9)
        assert lo < successes / n < hi
    # a wider level is a wider interval; arrays give arrays, element by element
    assert wilson_interval(37, 200, z=2.576)[0] < wilson_interval(37, 200)[0]
    lo, hi = wilson_interval(np.array([0, 8, 10]), np.array([10, 10, 10]))
    assert lo == pytest.approx([0.0, wilson_interval(8, 10)[0], 10 / (10 + z2)]) and hi[2] == 1.0
    with pytest.raises(DataError, match="n >= 1"):
        wilson_interval(0, 0)
    with pytest.raises(DataError, match="successes <= n"):
        wilson_interval(11, 10)


def test_bootstrap_interval_is_seeded_contains_the_mean_and_does_not_depend_on_chunking():
    values = np.random.default_rng(3).exponential(1.0, size=2000)
    lo, hi = bootstrap_interval(values)
    assert lo < values.mean() < hi
    assert bootstrap_interval(values) == (lo, hi)                                  # fixed seed: reproducible
    assert bootstrap_interval(values, seed=1) != (lo, hi)
    assert bootstrap_interval(values, max_chunk_elements=7_000) == (lo, hi)        # blocks of 3 resamples
    # the width is that of the normal approximation mean +- 1.96 s / sqrt(n), within a few percent
    half = 1.96 * values.std(ddof=1) / math.sqrt(len(values))
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.1)
    assert bootstrap_interval(values, level=0.5)[1] - bootstrap_interval(values, level=0.5)[0] < hi - lo
    assert bootstrap_interval(values, statistic=np.median)[0] < np.median(values)
    assert bootstrap_interval([0.25]) == (0.25, 0.25)                               # one window: no spread
    with pytest.raises(DataError, match="non-empty"):
        bootstrap_interval([])
    with pytest.raises(ConfigError, match="resamples"):
        bootstrap_interval(values, resamples=0)
    with pytest.raises(ConfigError, match="level"):
        bootstrap_interval(values, level=95)


def test_retrieval_metrics_intervals():
    ranks = np.array([1] * 8 + [30] * 2)                # Hit@1 = 8 / 10
    metrics = retrieval_metrics(ranks)
    assert (metrics["hit@1_lo"], metrics["hit@1_hi"]) == wilson_interval(8, 10)
    assert (metrics["hit@20_lo"], metrics["hit@20_hi"]) == wilson_interval(8, 10)
    assert (metrics["mrr_lo"], metrics["mrr_hi"]) == bootstrap_interval(1.0 / ranks)
    assert metrics["mrr_lo"] <= metrics["mrr"] <= metrics["mrr_hi"]
    # many windows (the size of a full NYC test split): still seeded, and every bound brackets its metric
    big = np.random.default_rng(5).geometric(0.05, size=30_000)
    first, again = retrieval_metrics(big), retrieval_metrics(big)
    assert first == again
    for metric in ("hit@1", "hit@5", "hit@10", "hit@20", "mrr"):
        assert first[f"{metric}_lo"] < first[metric] < first[f"{metric}_hi"]
        assert first[f"{metric}_hi"] - first[f"{metric}_lo"] < 0.02


# --- tables and validation -------------------------------------------------------------------------

def test_metrics_table_is_long_and_lossless():
    rows = [{"method": "markov", "dataset": "nyc", **retrieval_metrics(np.array([1, 3, 7]))},
            {"method": "lstm", "dataset": "synthetic", **retrieval_metrics(np.array([2, 2]))}]
    table = metrics_table(rows)
    assert list(table.columns) == ["method", "dataset", "metric", "value"]
    assert len(table) == sum(len(row) - 2 for row in rows)
    wide = table.pivot(index=["method", "dataset"], columns="metric", values="value")
    for row in rows:
        for key, value in row.items():
            if key not in ("method", "dataset"):
                assert wide.loc[(row["method"], row["dataset"]), key] == pytest.approx(value)
    assert isinstance(metrics_table([]), pd.DataFrame) and metrics_table([]).empty


def test_bad_input_raises_clear_errors():
    index = CandidateIndex(np.zeros((4, 2)) + np.arange(4)[:, None])
    with pytest.raises(DataError, match="points"):
        index.topk(np.zeros((3, 3)), 1)
    with pytest.raises(DataError, match="NaN"):
        index.rank_of([[np.nan, 0.0]], [0])
    with pytest.raises(DataError, match=r"target_ids must lie in \[0, 4\)"):
        index.rank_of(np.zeros((2, 2)), [0, 4])
    with pytest.raises(DataError, match="integer"):
        index.rank_of(np.zeros((2, 2)), [0.0, 1.0])
    with pytest.raises(DataError, match="shape"):
        index.rank_of(np.zeros((2, 2)), [0])
    with pytest.raises(ConfigError, match="k must be"):
        index.topk(np.zeros((2, 2)), 5)
    with pytest.raises(ConfigError, match="k must be"):
        index.topk(np.zeros((2, 2)), 0)
    with pytest.raises(ConfigError, match="ks"):
        retrieval_metrics(np.array([1, 2]), ks=(0, 5))
    with pytest.raises(DataError, match="ranks must be >= 1"):
        retrieval_metrics(np.array([0, 2]))
    with pytest.raises(DataError, match="NaN"):
        ranks_from_scores(np.array([[0.0, np.nan]]), [0])
    with pytest.raises(DataError, match=r"scores must have shape \(N, 4\)"):
        rank_predictions(np.zeros((4, 2)), [0, 1], scores=np.zeros((2, 3)))
    with pytest.raises(ConfigError, match="exactly one of"):
        rank_predictions(np.zeros((4, 2)), [0, 1])
    with pytest.raises(DataError, match="target_xy"):
        rank_predictions(np.zeros((4, 2)), [0, 1], np.zeros((3, 2)), scores=np.zeros((2, 4)))
    with pytest.raises(DataError, match="candidates_xy is empty"):
        CandidateIndex(np.zeros((0, 2)))
    with pytest.raises(DataError, match="method"):
        metrics_table([{"dataset": "nyc", "mrr": 0.1}])
    with pytest.raises(DataError, match="'note' must be a number"):
        metrics_table([{"method": "m", "dataset": "d", "note": "x"}])


def test_topk_when_a_tie_straddles_every_query_size():
    """30 copies of one location around the query point: the tree must be asked until the tie resolves."""
    rng = np.random.default_rng(13)
    candidates = rng.uniform(-100, 100, size=(400, 2))
    copies = rng.choice(len(candidates), 30, replace=False)
    candidates[copies] = [3.0, -7.0]
    points = np.array([[3.0, -7.0], [3.5, -7.0], [3.0, -7.25]])
    order = reference_order(reference_d2(points, candidates))
    index = CandidateIndex(candidates)
    for k in (1, 3, 5, 12, 29, 30, 31, 45):
        assert np.array_equal(index.topk(points, k)[1], order[:, :k]), k


# ---------------------------------------------------------------------------------------------------
# paired comparison of two methods on the same windows

def test_paired_comparison_mcnemar_on_hand_made_cases():
    from nextlocmoe.metrics import paired_comparison
    # 10 windows: A hits the first 8 at rank 1, B hits windows 0-1 only; discordant: b = 6 (A only), c = 0
    a = np.array([1] * 8 + [50, 50])
    b = np.array([1, 1] + [50] * 8)
    out = paired_comparison(a, b, ks=(1,))
    assert out["hit@1_a_only"] == 6 and out["hit@1_b_only"] == 0 and out["n"] == 10
    assert out["hit@1_diff"] == pytest.approx(0.6)
    assert out["hit@1_p"] == pytest.approx(2 * 0.5 ** 6)                     # exact binomial, two-sided: 0.03125
    assert out["hit@1_lo"] > 0 and out["mrr_diff"] == pytest.approx(np.mean(1 / a - 1 / b))
    assert out["mrr_lo"] > 0 and out["mrr_p"] < 0.05
    # swapping the methods flips the signs, keeps the p-values
    back = paired_comparison(b, a, ks=(1,))
    assert back["hit@1_diff"] == pytest.approx(-0.6) and back["hit@1_p"] == out["hit@1_p"]
    # identical methods: no discordant window, p = 1, a zero-width interval at 0
    same = paired_comparison(a, a, ks=(1, 10))
    assert same["hit@1_p"] == 1.0 and same["hit@1_lo"] == same["hit@1_hi"] == 0.0 and same["mrr_p"] == 1.0
    # a difference no resample reverses: the bootstrap p is its floor 2 / (R + 1), never 0
    clear = paired_comparison(np.ones(200, int), np.full(200, 50), ks=(1,), resamples=999)
    assert clear["mrr_p"] == pytest.approx(2 / 1000) and clear["mrr_lo"] > 0
    # balanced discordance (3 each way): p = 1 (min(1, 2 P(X <= 3 | 6, 1/2)) = min(1, 1.3125))
    c = np.array([1, 1, 1, 9, 9, 9]); d = np.array([9, 9, 9, 1, 1, 1])
    assert paired_comparison(c, d, ks=(1,))["hit@1_p"] == 1.0


def test_paired_comparison_refuses_unpaired_inputs():
    from nextlocmoe.metrics import paired_comparison
    with pytest.raises(DataError, match="same windows"):
        paired_comparison(np.array([1, 2, 3]), np.array([1, 2]))
    with pytest.raises(DataError, match=">= 1"):
        paired_comparison(np.array([0, 2]), np.array([1, 2]))
