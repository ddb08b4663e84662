"""Baselines against brute-force Python-loop counts on tiny hand-built data, and the neural ones on a toy pattern."""

from __future__ import annotations

from collections import Counter
import math

import numpy as np
import pandas as pd
import pytest
import torch

from nextlocmoe.baselines import (BASELINES, LastLocation, WindowCentroid, LSTMClassifier, Markov, NeuralBaselineConfig, Popularity,
                                  TransformerClassifier, TransformerPointer, UserHistoryFrequency, UserMostFrequent,
                                  candidates_xy_of, evaluate_baseline, input_locations, make_baseline)
from nextlocmoe.metrics import ranks_from_scores
from nextlocmoe.data.config import DataConfig
from nextlocmoe.data.schema import MobilityData
from nextlocmoe.data.windows import WindowDataset, make_windows
from nextlocmoe.errors import ConfigError, DataError

START = pd.Timestamp("2024-05-06 07:00")
TINY_NEURAL = dict(embedding_dim=16, hidden_dim=32, layers=1, heads=2, dropout=0.0, epochs=6, lr=1e-2,
                   batch_size=32, progress=False)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def mobility(sequences: list[list[int]], n_locations: int, seed: int = 0) -> MobilityData:
    """One user per sequence of location ids, one visit an hour (no gap ever cuts a user)."""
    rng = np.random.default_rng(seed)
    loc = pd.DataFrame({"x": rng.uniform(-5000, 5000, n_locations), "y": rng.uniform(-5000, 5000, n_locations),
                        "lat": np.nan, "lon": np.nan, "function": "Unknown",
                        "name": [f"place{i}" for i in range(n_locations)]})
    frames = []
    for user, ids in enumerate(sequences):
        ids = np.asarray(ids, dtype=np.int64)
        t = START + pd.Timedelta(hours=5 * user) + pd.to_timedelta(np.arange(len(ids)), "h")
        frames.append(pd.DataFrame({"user": user, "timestamp": t, "x": loc.x.to_numpy()[ids],
                                    "y": loc.y.to_numpy()[ids], "lat": np.nan, "lon": np.nan,
                                    "location": ids, "function": "Unknown"}))
    rec = pd.concat(frames, ignore_index=True)
    rec["timestamp"] = rec["timestamp"].astype("datetime64[ns]")
    return MobilityData(name="toy", records=rec, locations=loc, source="generated", checksum="toy")


def windows_of(data: MobilityData, split: str = "chronological", history: int = 3, current: int = 2,
               stride: int = 1, keep_every: int = 1):
    cfg = DataConfig(source="synthetic", history=history, current=current, stride=stride, keep_every=keep_every,
                     gap_hours=24.0, min_segment=3, split=split, seed=1).resolved()
    return make_windows(data, cfg)


def random_windows(split: str = "chronological", seed: int = 0, n_locations: int = 8, stride: int = 1,
                   keep_every: int = 1):
    """Skewed random visits (many repeats and ties) of users of different lengths."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(n_locations, 0.6))
    sequences = [list(rng.choice(n_locations, size=n, p=p)) for n in (30, 41, 26, 35, 22, 38, 29, 33, 27, 36)]
    return windows_of(mobility(sequences, n_locations, seed), split, stride=stride, keep_every=keep_every)


# ---------------------------------------------------------------------------------------------------
# brute-force references: plain Python over the flat record arrays

def span(w) -> int:
    return w.history + w.current


def train_records(w) -> set[int]:
    return {int(s) + j for s in w.starts["train"] for j in range(span(w) + 1)}


def brute_popularity(w, count: str = "targets") -> list[int]:
    if count == "targets":
        c = Counter(int(w.location[int(s) + span(w)]) for s in w.starts["train"])
    else:
        c = Counter(int(w.location[i]) for i in train_records(w))
    return [c[l] for l in range(w.n_locations)]


def order_from_scores(row: np.ndarray) -> list[int]:
    """Candidates best first under the metrics' rule: higher score, then lower id."""
    return sorted(range(len(row)), key=lambda l: (-row[l], l))


def brute_rank(row: np.ndarray, target: int) -> int:
    return 1 + sum(1 for l in range(len(row)) if row[l] > row[target] or (row[l] == row[target] and l < target))


# ---------------------------------------------------------------------------------------------------
# counting baselines equal brute force

@pytest.mark.parametrize("count", ["targets", "records"])
@pytest.mark.parametrize("split", ["chronological", "user"])
def test_popularity_equals_brute_force_counts(split, count):
    w = random_windows(split, stride=2)
    model = Popularity(count).fit(w)
    scores = model.score(w.batch("test", np.arange(w.n_windows("test"))))
    assert scores.shape == (w.n_windows("test"), w.n_locations)
    expected = np.array(brute_popularity(w, count), dtype=float)
    assert (scores == expected[None, :]).all()


@pytest.mark.parametrize("split", ["chronological", "user"])
def test_user_most_frequent_ranks_like_brute_force(split):
    w = random_windows(split, seed=3)
    pop = brute_popularity(w)
    model = UserMostFrequent().fit(w)
    for name in ("train", "test"):
        scores = model.score(w.batch(name, np.arange(w.n_windows(name))))
        for row, s in zip(scores, w.starts[name]):
            inputs = [int(w.location[int(s) + j]) for j in range(span(w))]

            def preference(l):  # visited: (1, visits, latest position); unvisited: (0, 0, 0, popularity)
                if l in inputs:
                    last = max(j for j, v in enumerate(inputs) if v == l)
                    return (1, inputs.count(l), last, 0)
                return (0, 0, 0, pop[l])

            expected = sorted(range(w.n_locations), key=lambda l: (tuple(-v for v in preference(l)), l))
            assert order_from_scores(row) == expected
            # the top candidate is the most frequent input location, the most recent one among equals
            top = max(set(inputs), key=lambda l: (inputs.count(l), max(j for j, v in enumerate(inputs) if v == l)))
            assert row.argmax() == top


@pytest.mark.parametrize("split", ["chronological", "user"])
def test_last_location_ranks_the_current_place_first_then_popularity(split):
    w = random_windows(split, seed=3)
    model = LastLocation().fit(w)
    batch = w.batch("test", np.arange(w.n_windows("test")))
    scores = model.score(batch)
    counts = brute_popularity(w)
    by_popularity = sorted(range(w.n_locations), key=lambda l: (-counts[l], l))
    for b, row in enumerate(scores):
        last = int(batch["cur_location"][b, -1])
        assert order_from_scores(row) == [last] + [l for l in by_popularity if l != last]


def test_window_centroid_ranks_by_distance_to_the_mean_position():
    w = random_windows("chronological", seed=6)
    model = WindowCentroid().fit(w)
    batch = w.batch("test", np.arange(w.n_windows("test")))
    scores = model.score(batch)
    starts = w.starts["test"]
    for b, s0 in enumerate(starts):
        rows = range(int(s0), int(s0) + w.history + w.current)
        centroid = np.array([np.mean([w.x[r] for r in rows]), np.mean([w.y[r] for r in rows])])
        expected = [-float(np.hypot(*(c - centroid))) for c in candidates_xy_of(w)]
        np.testing.assert_allclose(scores[b], expected, rtol=1e-6, atol=1e-3)


@pytest.mark.parametrize("split", ["chronological", "user"])
def test_user_history_frequency_ranks_like_brute_force(split):
    w = random_windows(split, seed=5)
    pop = brute_popularity(w)
    per_user = Counter()
    for i in train_records(w):
        per_user[(int(w.subuser_user[w.subuser[i]]), int(w.location[i]))] += 1
    model = UserHistoryFrequency().fit(w)
    batch = w.batch("test", np.arange(w.n_windows("test")))
    scores = model.score(batch)
    for row, user in zip(scores, batch["user"]):
        expected = sorted(range(w.n_locations), key=lambda l: (-per_user[(int(user), l)], -pop[l], l))
        assert order_from_scores(row) == expected


@pytest.mark.parametrize("alpha,stride,keep_every", [(1.0, 1, 1), (0.3, 2, 2)])
@pytest.mark.parametrize("split", ["chronological", "user"])
def test_markov_equals_brute_force_transition_counts(split, alpha, stride, keep_every):
    w = random_windows(split, seed=7, stride=stride, keep_every=keep_every)
    records = train_records(w)
    transitions = Counter()
    for i in sorted(records):
        if i + 1 in records and w.subuser[i] == w.subuser[i + 1]:
            transitions[(int(w.location[i]), int(w.location[i + 1]))] += 1
    pop = brute_popularity(w)
    model = Markov(alpha=alpha).fit(w)
    L = w.n_locations
    dense = model.transitions.toarray()
    assert all(dense[a, b] == transitions[(a, b)] for a in range(L) for b in range(L))
    scores = model.score(w.batch("test", np.arange(w.n_windows("test"))))
    for row, s in zip(scores, w.starts["test"]):
        a = int(w.location[int(s) + span(w) - 1])                     # last current record
        out = sum(transitions[(a, b)] for b in range(L))
        expected = [(transitions[(a, b)] + alpha * pop[b] / sum(pop)) / (out + alpha) for b in range(L)]
        np.testing.assert_allclose(row, expected, rtol=1e-12)
        assert abs(row.sum() - 1) < 1e-9                               # a proper distribution


def test_markov_solves_a_deterministic_cycle():
    cycle = [4, 1, 6]                                                 # A -> B -> C -> A ...
    sequences = [[cycle[(i + phase) % 3] for i in range(40)] for phase in range(3)]
    w = windows_of(mobility(sequences, n_locations=9), history=4, current=2)
    metrics = evaluate_baseline(Markov().fit(w), w, "test", batch_size=4)
    assert metrics["hit@1"] == 1.0 and metrics["mrr"] == 1.0 and metrics["dist_mean_m"] < 0.01  # target_xy is float32
    assert metrics["n"] == w.n_windows("test")
    # the window's most frequent place is right only about a third of the time on a 3-cycle
    assert evaluate_baseline(UserMostFrequent().fit(w), w, "test")["hit@1"] < 0.7


# ---------------------------------------------------------------------------------------------------
# evaluation harness

def test_evaluate_baseline_equals_brute_force_ranking():
    w = random_windows("user", seed=11)
    counts = np.array(brute_popularity(w), dtype=float)
    targets = [int(w.location[int(s) + span(w)]) for s in w.starts["test"]]
    ranks = np.array([brute_rank(counts, t) for t in targets])
    top1 = order_from_scores(counts)[0]
    batch = w.batch("test", np.arange(w.n_windows("test")))
    errors = np.hypot(*(candidates_xy_of(w)[top1][None, :] - batch["target_xy"].astype(float)).T)
    metrics = evaluate_baseline(Popularity().fit(w), w, "test", batch_size=3)
    for k in (1, 5):
        assert metrics[f"hit@{k}"] == pytest.approx(np.mean(ranks <= k))
    assert metrics["mrr"] == pytest.approx(np.mean(1.0 / ranks))
    assert metrics["dist_mean_m"] == pytest.approx(errors.mean(), rel=1e-6)
    assert metrics["n"] == len(targets)


def test_evaluation_does_not_depend_on_batch_size():
    w = random_windows("chronological", seed=2)
    model = UserMostFrequent().fit(w)
    assert evaluate_baseline(model, w, "val", batch_size=1) == evaluate_baseline(model, w, "val", batch_size=1000)


@pytest.mark.parametrize("name", list(BASELINES))
def test_every_baseline_scores_all_candidates(name):
    w = random_windows("user", seed=4)
    cfg = NeuralBaselineConfig(**{**TINY_NEURAL, "epochs": 1})
    model = make_baseline(name, cfg).fit(w)
    batch = w.batch("test", np.arange(5))
    scores = model.score(batch)
    assert scores.shape == (5, w.n_locations) and np.isfinite(scores).all()
    torch_batch = WindowDataset(w, "test").__getitems__(list(range(5)))   # what a DataLoader hands over
    np.testing.assert_array_equal(model.score(torch_batch), scores)
    assert set(evaluate_baseline(model, w, "test")) >= {"hit@1", "hit@5", "hit@10", "hit@20", "mrr",
                                                           "ndcg@10", "dist_mean_m", "dist_median_m", "n"}


# ---------------------------------------------------------------------------------------------------
# neural baselines

@pytest.fixture(scope="module")
def successor_windows():
    """Users follow one fixed successor map over 10 places, jumping to a random place 20% of the time.

    The next place is a function of the LAST place only (80% of the time): the first records of the
    window say nothing about it, and a model that forgets the order of the records cannot solve it.
    """
    rng = np.random.default_rng(0)
    successor = rng.permutation(10)
    while (successor == np.arange(10)).any():                           # no place is its own successor
        successor = rng.permutation(10)
    sequences = []
    for _ in range(16):
        seq = [int(rng.integers(10))]
        for _ in range(59):
            seq.append(int(rng.integers(10)) if rng.random() < 0.2 else int(successor[seq[-1]]))
        sequences.append(seq)
    return windows_of(mobility(sequences, n_locations=10), history=4, current=2)


@pytest.mark.parametrize("cls", [LSTMClassifier, TransformerClassifier, TransformerPointer])
def test_neural_baseline_learns_a_pattern_popularity_cannot(cls, successor_windows):
    w = successor_windows
    model = cls(NeuralBaselineConfig(**TINY_NEURAL)).fit(w)
    assert len(model.loss_history) == TINY_NEURAL["epochs"]
    assert model.loss_history[-1] < 0.5 * model.loss_history[0]
    neural = evaluate_baseline(model, w, "test")
    popular = evaluate_baseline(Popularity().fit(w), w, "test")
    assert neural["hit@1"] >= 0.65 and neural["hit@1"] > popular["hit@1"] + 0.4


def test_transformer_pointer_starts_like_the_windows_most_frequent_place():
    w = random_windows("chronological", seed=5, n_locations=30)
    model = TransformerPointer(NeuralBaselineConfig(**{**TINY_NEURAL, "epochs": 1, "lr": 1e-12,
                                                        "pointer_gate_init": "baseline"})).fit(w)
    batch = w.batch("test", np.arange(w.n_windows("test")))
    target = batch["target_location"]
    ours = ranks_from_scores(model.score(batch), target)
    theirs = ranks_from_scores(UserMostFrequent().fit(w).score(batch), target)
    loc = input_locations(batch)
    once = (loc == target[:, None]).sum(1) <= 1        # ties of repeated places may order differently (pointer.py)
    assert once.any()
    np.testing.assert_array_equal(ours[once], theirs[once])
    probabilities = np.exp(model.score(batch)).sum(1)  # the scores are log-probabilities
    np.testing.assert_allclose(probabilities, 1.0, atol=1e-5)


def test_transformer_pointer_gate_starts_at_the_training_repeat_rate():
    w = random_windows("chronological", seed=5, n_locations=30)
    model = TransformerPointer(NeuralBaselineConfig(**{**TINY_NEURAL, "epochs": 1, "lr": 1e-12})).fit(w)
    rate = w.subsample("train", TINY_NEURAL.get("max_train_windows"), seed=0).repeat_rate("train")
    assert float(model.net.pointer.gate.bias.detach()) == pytest.approx(math.log(rate / (1 - rate)), abs=1e-5)
    with pytest.raises(ConfigError, match="pointer_gate_init"):
        NeuralBaselineConfig(pointer_gate_init="always").validate()


def test_neural_fit_is_deterministic_and_leaves_global_rng_alone(successor_windows):
    w = successor_windows
    cfg = NeuralBaselineConfig(**{**TINY_NEURAL, "epochs": 2, "dropout": 0.2, "max_train_windows": 100})
    batch = w.batch("test", np.arange(w.n_windows("test")))
    state = torch.get_rng_state()
    first = LSTMClassifier(cfg).fit(w)
    assert torch.equal(torch.get_rng_state(), state)
    second = LSTMClassifier(cfg).fit(w)
    np.testing.assert_array_equal(first.score(batch), second.score(batch))
    assert first.step_losses == second.step_losses
    other = LSTMClassifier(NeuralBaselineConfig(**{**cfg.to_dict(), "seed": 1})).fit(w)
    assert not np.array_equal(first.score(batch), other.score(batch))
    assert len(first.step_losses) == 2 * -(-100 // cfg.batch_size)   # the subsample is what it trains on


# ---------------------------------------------------------------------------------------------------
# bad input

def test_bad_configuration_raises_config_error():
    with pytest.raises(ConfigError, match="nope"):
        make_baseline("nope")
    with pytest.raises(ConfigError, match="heads"):
        TransformerClassifier(NeuralBaselineConfig(hidden_dim=30, heads=4))
    with pytest.raises(ConfigError, match="epochs"):
        LSTMClassifier(NeuralBaselineConfig(epochs=0))
    with pytest.raises(ConfigError, match="alpha"):
        Markov(alpha=0.0)
    with pytest.raises(ConfigError, match="count"):
        Popularity("everything")
    with pytest.raises(ConfigError, match="fit"):
        Popularity().score({"cur_location": np.zeros((2, 2), dtype=np.int64)})


def test_bad_data_raises_data_error():
    w = random_windows("user", seed=0)
    model = UserMostFrequent().fit(w)
    batch = w.batch("test", np.arange(3))
    with pytest.raises(DataError, match="hist_location"):
        model.score({k: v for k, v in batch.items() if k != "hist_location"})
    with pytest.raises(DataError, match="location ids"):
        model.score({**batch, "cur_location": batch["cur_location"] + w.n_locations})
    other = random_windows("user", seed=0, n_locations=12)
    with pytest.raises(DataError, match="candidate locations"):
        evaluate_baseline(model, other, "test")


def test_early_stopping_keeps_the_best_validation_epoch(successor_windows):
    w = successor_windows
    cfg = NeuralBaselineConfig(**{**TINY_NEURAL, "epochs": 8, "patience": 2})
    model = TransformerClassifier(cfg).fit(w)
    history = model.val_history
    assert len(history) == len(model.loss_history) <= 8
    best = int(np.argmax(history)) + 1                     # the first epoch reaching the maximum
    assert model.best_epoch == best
    assert len(history) == 8 or len(history) - best == 2   # stopped by patience, or ran every epoch
    hit = evaluate_baseline(model, w.subsample("val", cfg.max_val_windows, seed=cfg.seed), "val")["hit@10"]
    assert hit == history[best - 1]                        # the weights kept are that epoch's


def test_transformer_pointer_starts_like_the_tuned_window_time_scorer(tmp_path):
    """With the next visit's time (default) the copy attention starts at the window_time scorer chosen on
    validation, as NextLocMoE's does: on the smoke city (hours that matter) the untrained model's target ranks
    equal the scorer's on nearly every test window (float32 rounding of near-equal sums may swap two places)."""
    from nextlocmoe.config import load_config
    from nextlocmoe.data.prepare import prepare
    from nextlocmoe.window_scorers import make_scorer
    w = prepare(load_config("smoke").data, cache_dir=tmp_path)
    model = TransformerPointer(NeuralBaselineConfig(**{**TINY_NEURAL, "epochs": 1, "lr": 1e-12,
                                                        "pointer_gate_init": "baseline"})).fit(w)
    scorer = make_scorer("window_time").fit(w)
    assert math.isfinite(scorer.weights.sigma)                       # the time term is really on
    batch = w.batch("test", np.arange(w.n_windows("test")))
    target = batch["target_location"]
    ours = ranks_from_scores(model.score(batch), target)
    theirs = ranks_from_scores(scorer.score(batch), target)
    assert (ours != theirs).sum() <= 2
    plain = UserMostFrequent().fit(w)
    assert (ranks_from_scores(plain.score(batch), target) != theirs).sum() > 10   # the time changes the ranking
