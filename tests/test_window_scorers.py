"""Tuned training-free scorers: the fast grid ranks equal the harness's, the weights mean what they say, and the
grid search reads the validation split only."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nextlocmoe.baselines import UserMostFrequent, evaluate_baseline
from nextlocmoe.config import load_config
from nextlocmoe.data.prepare import prepare
from nextlocmoe.errors import ConfigError, DataError
from nextlocmoe.metrics import rank_predictions
from nextlocmoe.model.pointer import recency_slope
from nextlocmoe.window_scorers import (SCORERS, WindowScorer, WindowWeights, circular_hour_difference, make_scorer,
                                       visit_weights, window_ranks)
from nextlocmoe.baselines import input_locations


@pytest.fixture(scope="module")
def windows(tmp_path_factory):
    return prepare(load_config("smoke").data, cache_dir=tmp_path_factory.mktemp("cache"))


PARAMS = [WindowWeights(), WindowWeights(half_life=2.0), WindowWeights(sigma=1.0, same_weekday=1.0),
          WindowWeights(half_life=8.0, sigma=3.0, same_weekday=0.5, same_daytype=2.0)]


@pytest.mark.parametrize("params", PARAMS, ids=lambda p: f"{p.half_life}-{p.sigma}-{p.same_weekday}-{p.same_daytype}")
@pytest.mark.parametrize("use_popularity", [True, False])
def test_grid_ranks_equal_the_harness_ranks(windows, params, use_popularity):
    """window_ranks (the grid search's fast path) == metrics.rank_predictions of score() on every validation
    window, including the exact count ties of WindowWeights() (all weights 1) and popularity ties."""
    scorer = make_scorer("window_time_recency", use_popularity=use_popularity).fit(windows, weights=params)
    n = windows.n_windows("val")
    batch = windows.batch("val", np.arange(n))
    loc, target = input_locations(batch), batch["target_location"]
    fast = window_ranks(loc, visit_weights(batch, params), target, scorer._unvisited_rank(loc, target))
    harness = rank_predictions(windows.candidates, target, scores=scorer.score(batch)).rank
    np.testing.assert_array_equal(fast, harness)


def test_visit_weights_by_hand():
    """One window of four visits (T = 4), next visit Saturday 9:00."""
    batch = {"hist_hour": np.array([[8, 20, 23]]), "cur_hour": np.array([[9]]),
             "hist_weekday": np.array([[5, 1, 6]]), "cur_weekday": np.array([[2]]),
             "next_hour": np.array([9]), "next_weekday": np.array([5])}
    p = WindowWeights(half_life=2.0, sigma=2.0, same_weekday=1.0, same_daytype=0.5)
    age = np.array([3, 2, 1, 0])
    dh = np.array([1, 11, 10, 0])
    same_day = np.array([1, 0, 0, 0])
    weekend = np.array([1, 0, 1, 0])
    tie_break = np.exp(recency_slope(4) * np.arange(4))
    expected = 2.0 ** (-age / 2) * np.exp(-dh ** 2 / 8) * (1 + same_day) * (1 + 0.5 * weekend) * tie_break
    np.testing.assert_allclose(visit_weights(batch, p)[0], expected, rtol=1e-12)
    np.testing.assert_allclose(visit_weights(batch, WindowWeights())[0], tie_break, rtol=1e-12)
    assert circular_hour_difference(np.array([[23, 1, 12]]), np.array([1])).tolist() == [[2, 0, 11]]


def test_hour_closeness_can_outvote_frequency():
    """Place 7 visited twice in the evening, place 3 once at the next visit's hour: counting prefers 7, a narrow
    hour kernel prefers 3; places never visited come after both, by popularity."""
    batch = {"hist_location": np.array([[7, 3]]), "cur_location": np.array([[7]]),
             "hist_hour": np.array([[20, 9]]), "cur_hour": np.array([[21]]),
             "hist_weekday": np.zeros((1, 2), int), "cur_weekday": np.zeros((1, 1), int),
             "next_hour": np.array([9]), "next_weekday": np.array([0])}
    scorer = WindowScorer("t", {"sigma": (1.0,)})
    scorer.n_locations = 10
    scorer.popularity.counts = np.arange(10, dtype=float)                       # place 9 the most popular
    scorer.weights = WindowWeights()
    assert scorer.score(batch)[0].argsort()[::-1][:3].tolist() == [7, 3, 9]
    scorer.weights = WindowWeights(sigma=1.0)
    assert scorer.score(batch)[0].argsort()[::-1][:3].tolist() == [3, 7, 9]


class ValidationOnly:
    """Windows whose test split cannot be read: the grid search must not need it."""

    def __init__(self, windows):
        self._w = windows

    def __getattr__(self, name):
        return getattr(self._w, name)

    def batch(self, split, idx):
        if split == "test":
            raise AssertionError("the grid search read the test split")
        return self._w.batch(split, idx)


def test_grid_search_reads_validation_only_and_picks_the_best_point(windows):
    scorer = make_scorer("window_time").fit(ValidationOnly(windows))
    assert len(scorer.search) == math.prod(len(v) for v in SCORERS["window_time"].values())
    best = max(scorer.search, key=lambda row: row["val_mrr"])
    assert scorer.weights.to_dict() == {k: best[k] for k in WindowWeights.__dataclass_fields__}
    # the validation MRR the search recorded is the harness's validation MRR of the chosen scorer
    assert evaluate_baseline(scorer, windows, "val")["mrr"] == pytest.approx(best["val_mrr"], rel=1e-12)


def test_untuned_scorer_ranks_visited_places_by_count_like_the_most_frequent_baseline(windows):
    """With every ingredient off the scorer ranks like user_most_frequent wherever counts differ, and also inside
    count ties of places visited once (both then put the latest visit first); only ties of places visited
    several times may differ (the baseline orders them by their latest visit, the scorer by the summed slope)."""
    batch = windows.batch("test", np.arange(windows.n_windows("test")))
    scorer = make_scorer("window_recency").fit(windows, weights=WindowWeights())
    ours = rank_predictions(windows.candidates, batch["target_location"], scores=scorer.score(batch)).rank
    base = rank_predictions(windows.candidates, batch["target_location"],
                            scores=UserMostFrequent().fit(windows).score(batch)).rank
    loc = input_locations(batch)
    counts = np.array([np.unique(row, return_counts=True)[1] for row in loc], dtype=object)
    untied = np.array([len(set(c)) == len(c) for c in counts])                 # no two places with one count
    once = np.array([(row == t).sum() <= 1 for row, t in zip(loc, batch["target_location"])])
    assert (~untied & once).any()                                              # ties of single visits occur
    np.testing.assert_array_equal(ours[untied | once], base[untied | once])


def test_bad_parameters_and_names():
    with pytest.raises(ConfigError, match="half_life"):
        WindowWeights(half_life=0.0).validate()
    with pytest.raises(ConfigError, match="same_weekday"):
        WindowWeights(same_weekday=-1.0).validate()
    with pytest.raises(ConfigError, match="unknown"):
        make_scorer("window_magic")
    with pytest.raises(ConfigError, match="unknown parameters"):
        WindowScorer("x", {"tau": (1.0,)})


def test_empty_validation_split_is_a_clear_error(windows):
    class NoValidation(ValidationOnly):
        def n_windows(self, split):
            return 0 if split == "val" else self._w.n_windows(split)
    with pytest.raises(DataError, match="validation split"):
        make_scorer("window_recency").fit(NoValidation(windows))
