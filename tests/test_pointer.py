"""The copy (pointer) mixture of the ranking head: its probabilities against a loop over windows, the recency
bound, and the untrained model ranking like the "most frequent place of the window" baseline on real windows."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from nextlocmoe.baselines import Popularity, UserMostFrequent, input_locations
from nextlocmoe.config import load_config
from nextlocmoe.data.prepare import prepare
from nextlocmoe.errors import DataError
from nextlocmoe.metrics import ranks_from_scores
from nextlocmoe.model import build_model
from nextlocmoe.model.pointer import CopyMixture, recency_slope

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_inputs(B=4, T=7, L=12, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    state = torch.randn(B, D, generator=g)
    keys = torch.randn(B, T, D, generator=g)
    window = torch.randint(0, L // 2, (B, T), generator=g)       # half the candidates are never visited
    gen = torch.randn(B, L, generator=g)
    return state, keys, window, gen


def test_copy_mixture_equals_a_loop_over_windows_and_is_normalised():
    torch.manual_seed(0)
    mix = CopyMixture(8, 8, positions=10, dim=4)
    with torch.no_grad():        # move away from the initialisation so every term matters
        for p in mix.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    state, keys, window, gen = random_inputs()
    with torch.no_grad():
        log_p = mix(state, keys, window, gen)                                    # (B, L)
    B, T = window.shape
    for b in range(B):
        q = mix.query.weight.double() @ state[b].double() + mix.query.bias.double()
        logits = [float(q.detach() @ (mix.key.weight.detach().double() @ keys[b, t].double())) / math.sqrt(4)
                  + float(mix.position_bias[10 - T + t].detach()) for t in range(T)]
        a = np.exp(np.array(logits) - max(logits))
        a /= a.sum()
        with torch.no_grad():
            g = 1 / (1 + math.exp(-float(mix.gate.weight.double() @ state[b].double() + mix.gate.bias.double())))
        gen_p = torch.softmax(gen[b].double(), 0).numpy()
        for l in range(gen.shape[1]):
            copy = sum(a[t] for t in range(T) if window[b, t] == l)
            assert math.exp(float(log_p[b, l])) == pytest.approx(g * copy + (1 - g) * gen_p[l], rel=1e-4)
    torch.testing.assert_close(torch.logsumexp(log_p, -1), torch.zeros(B), atol=1e-5, rtol=0)


def test_gradients_stay_finite_for_places_the_window_never_visits():
    torch.manual_seed(0)
    mix = CopyMixture(8, 8, positions=7, dim=4)
    state, keys, window, gen = random_inputs()
    gen.requires_grad_(True)
    target = torch.tensor([11, 10, window[2, 0].item(), 9])      # three targets outside every window
    loss = -mix(state, keys, window, gen).gather(1, target[:, None]).mean()
    loss.backward()
    grads = [gen.grad] + [p.grad for p in mix.parameters()]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    assert mix.gate.bias.grad.item() > 0.5       # unvisited targets pull the gate towards generating


def test_recency_slope_never_outweighs_one_more_visit():
    # every pair of disjoint position sets with c + 1 and c visits, exhaustively for short windows
    for T in range(2, 10):
        w = np.exp(recency_slope(T) * np.arange(T))
        for c in range(1, T // 2 + 1):
            for more in itertools.combinations(range(T), c + 1):
                rest = [t for t in range(T) if t not in more]
                for fewer in itertools.combinations(rest, c):
                    assert w[list(more)].sum() > w[list(fewer)].sum()
    assert recency_slope(45) * 44 < math.log1p(1 / 22)


def test_bad_window_shapes_raise_clear_errors():
    mix = CopyMixture(8, 8, positions=5)
    state, keys, window, gen = random_inputs(T=7)
    with pytest.raises(DataError, match="longer than the 5 positions"):
        mix(state, keys, window, gen)
    mix = CopyMixture(8, 8, positions=7)
    with pytest.raises(DataError, match="window_location"):
        mix(state, keys, window[:, :3], gen)


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    """An untrained ranking NextLocMoE (tiny backbone, no prompt) on the smoke city, with its popularity prior."""
    cfg = load_config("smoke", overrides=["model.head=ranking", "model.use_prompt=false"])
    windows = prepare(cfg.data, cache_dir=tmp_path_factory.mktemp("cache"))
    torch.manual_seed(0)
    model = build_model(cfg.model, windows.stats, windows.candidates, windows.candidate_function,
                        windows.history + windows.current).eval()
    model.set_popularity_prior(Popularity("targets").fit(windows).counts)
    return model, windows


@torch.no_grad()
def test_untrained_pointer_head_ranks_like_the_windows_most_frequent_place(untrained):
    model, windows = untrained
    batch = windows.batch("test", np.arange(min(256, windows.n_windows("test"))))
    scores = model({k: torch.as_tensor(v) for k, v in batch.items()}).scores.numpy()   # (B, L) log p
    baseline = UserMostFrequent().fit(windows).score(batch)                           # (B, L)
    target = batch["target_location"]
    ours, theirs = ranks_from_scores(scores, target), ranks_from_scores(baseline, target)

    loc = input_locations(batch)                                                      # (B, T)
    visits = np.stack([np.bincount(row, minlength=windows.n_locations) for row in loc])   # (B, L)
    target_visits = visits[np.arange(len(target)), target]
    # a target visited at most once: places seen more often rank above it in both, single visits by their only
    # (= latest) position, unvisited places by popularity then id -- the same rank exactly
    once = target_visits <= 1
    assert once.any() and (~once).any()
    np.testing.assert_array_equal(ours[once], theirs[once])
    # every window: both orders put places by visit count first (ties of two or more visits may order differently:
    # the baseline by the latest visit, the mixture by recency-weighted visits)
    for b in range(len(target)):
        n_visited = int((visits[b] > 0).sum())
        ours_order = np.argsort(-scores[b], kind="stable")[:n_visited]
        theirs_order = np.argsort(-baseline[b], kind="stable")[:n_visited]
        np.testing.assert_array_equal(visits[b, ours_order], visits[b, theirs_order])
    for k in (1, 5, 10):   # which is why the untrained model scores like the baseline
        assert abs((ours <= k).mean() - (theirs <= k).mean()) <= 0.02


def test_one_training_step_moves_the_query_the_gate_and_the_generator(untrained):
    model, windows = untrained
    model = model.train()
    batch = {k: torch.as_tensor(v) for k, v in windows.batch("train", np.arange(16)).items()}
    loss, parts = model.loss(model(batch), batch)
    loss.backward()
    assert torch.isfinite(loss)
    for name in ("pointer.query.weight", "pointer.gate.weight", "head.query.weight", "head.candidate_bias"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    model.zero_grad(set_to_none=True)
    model.eval()


def test_place_ids_outside_the_candidates_raise_a_clear_error():
    mix = CopyMixture(8, 8, positions=7)
    state, keys, window, gen = random_inputs()
    with pytest.raises(DataError, match="ids of the 3 candidates"):
        mix(state, keys, window, gen[:, :3])


def test_repeat_rate_is_the_share_of_targets_inside_their_window(untrained):
    _, windows = untrained
    for split in ("train", "test"):
        batch = windows.batch(split, np.arange(windows.n_windows(split)))
        records = input_locations(batch)                                            # (W, T)
        inside = [t in set(row.tolist()) for row, t in zip(records, batch["target_location"])]
        assert windows.repeat_rate(split) == pytest.approx(np.mean(inside))


def test_copy_rate_starts_the_gate_there_and_keeps_probabilities_normalised():
    mix = CopyMixture(8, 8, positions=7)
    state, keys, window, gen = random_inputs(T=7)
    mix.set_copy_rate(0.63)
    g = torch.sigmoid(mix.gate_logit(state))                                        # w = 0: the bias alone
    torch.testing.assert_close(g, torch.full_like(g, 0.63))
    torch.testing.assert_close(mix(state, keys, window, gen).exp().sum(-1), torch.ones(len(state)))
    mix.set_copy_rate(1.0)                                                          # clipped, still finite
    assert torch.isfinite(mix.gate.bias).all()
    with pytest.raises(DataError, match="not a probability"):
        mix.set_copy_rate(1.5)


def test_log_popularity_prior_makes_the_softmax_proportional_to_smoothed_counts():
    from nextlocmoe.model.heads import log_popularity_prior
    counts = torch.tensor([0.0, 3.0, 1.0, 10.0])
    prior = log_popularity_prior(counts)
    torch.testing.assert_close(prior.softmax(-1), (counts + 1) / (counts + 1).sum())
    assert abs(float(prior.mean())) < 1e-6


# ---------------------------------------------------------------------------------------------------
# the time term (model.next_visit_time): the copy attention started at the tuned window_time scorer

def test_time_term_is_the_log_of_the_scorers_visit_weight():
    """exp(b_t + tau_t) of the mixture == the scorer's visit weight w_t (window_scorers.visit_weights, numpy,
    written independently) up to one constant per window, on random windows and parameters."""
    from nextlocmoe.window_scorers import WindowWeights, visit_weights
    rng = np.random.default_rng(0)
    B, T = 6, 9
    batch = {"hist_hour": rng.integers(0, 24, (B, T - 2)), "cur_hour": rng.integers(0, 24, (B, 2)),
             "hist_weekday": rng.integers(0, 7, (B, T - 2)), "cur_weekday": rng.integers(0, 7, (B, 2)),
             "next_hour": rng.integers(0, 24, B), "next_weekday": rng.integers(0, 7, B)}
    for p in (WindowWeights(sigma=0.5, same_weekday=2.0, same_daytype=0.5), WindowWeights(sigma=3.0),
              WindowWeights(same_daytype=1.0)):
        mix = CopyMixture(8, 8, positions=T, dim=4, time_terms=True)
        mix.set_time_prior(p.sigma, p.same_weekday, p.same_daytype)
        t = lambda a: torch.as_tensor(a)
        visit_time = {"hour": t(np.concatenate([batch["hist_hour"], batch["cur_hour"]], 1)),
                      "weekday": t(np.concatenate([batch["hist_weekday"], batch["cur_weekday"]], 1)),
                      "next_hour": t(batch["next_hour"]), "next_weekday": t(batch["next_weekday"])}
        state, keys = torch.randn(B, 8), torch.randn(B, T, 8)
        a = mix.attention(state, keys, visit_time).detach().double().numpy()     # query = 0: biases alone
        w = visit_weights(batch, p)
        np.testing.assert_allclose(a, w / w.sum(1, keepdims=True), rtol=1e-4, atol=1e-7)   # float32 underflow
    with pytest.raises(DataError, match="visit_time"):
        mix.attention(state, keys)
    with pytest.raises(DataError, match="without time terms"):
        CopyMixture(8, 8, positions=T).set_time_prior(1.0, 0.0, 0.0)


@torch.no_grad()
def test_untrained_pointer_head_with_its_time_prior_ranks_like_the_tuned_window_time_scorer(tmp_path):
    """Step 0 of the ranking head = the tuned window_time scorer: the same rank of the target on (nearly) every
    test window of the smoke city; only float32 rounding of near-equal sums may swap two places."""
    from nextlocmoe.window_scorers import make_scorer
    cfg = load_config("smoke", overrides=["model.head=ranking", "model.use_prompt=false",
                                          "model.pointer_gate_init=baseline"])
    windows = prepare(cfg.data, cache_dir=tmp_path)
    torch.manual_seed(0)
    model = build_model(cfg.model, windows.stats, windows.candidates, windows.candidate_function,
                        windows.history + windows.current).eval()
    model.set_popularity_prior(Popularity("targets").fit(windows).counts)
    scorer = make_scorer("window_time").fit(windows)
    assert math.isfinite(scorer.weights.sigma)          # the time term is on: a real test of it
    model.set_time_prior(scorer.weights)
    batch = windows.batch("test", np.arange(windows.n_windows("test")))
    scores = model({k: torch.as_tensor(v) for k, v in batch.items()}).scores.numpy()
    target = batch["target_location"]
    ours, theirs = ranks_from_scores(scores, target), ranks_from_scores(scorer.score(batch), target)
    assert (ours == theirs).mean() >= 0.99
    assert (ours != theirs).sum() <= 2
    untimed = build_model(cfg.model, windows.stats, windows.candidates, windows.candidate_function,
                          windows.history + windows.current).eval()    # the same model without its time prior
    untimed.set_popularity_prior(Popularity("targets").fit(windows).counts)
    plain = ranks_from_scores(untimed({k: torch.as_tensor(v) for k, v in batch.items()}).scores.numpy(), target)
    assert (plain != theirs).sum() > 2 * max(1, (ours != theirs).sum())   # the prior changed the ranking


@torch.no_grad()
def test_untrained_ranking_head_transferred_to_another_city_ranks_like_the_scorer_with_source_parameters(tmp_path):
    """Zero-shot transfer of the ranking head (NextLocMoE.set_candidates): it scores the TARGET city's candidates
    (another count of places), its per-candidate bias restarts at 0 (the target has no popularity), and the untrained
    model ranks every target window exactly like window_time with the source's parameters and no popularity prior:
    the window's places by the scorer's weights, every other place tied below them."""
    import dataclasses

    from nextlocmoe.errors import ConfigError
    from nextlocmoe.experiments import second_city
    from nextlocmoe.window_scorers import make_scorer
    cfg = load_config("smoke", overrides=["model.head=ranking", "model.use_prompt=false"])
    source = prepare(cfg.data, cache_dir=tmp_path)
    target = prepare(second_city(cfg.data), cache_dir=tmp_path)
    assert target.n_locations != source.n_locations
    torch.manual_seed(0)
    model = build_model(cfg.model, source.stats, source.candidates, source.candidate_function,
                        source.history + source.current).eval()
    model.set_popularity_prior(Popularity("targets").fit(source).counts)
    model.set_copy_rate(source.repeat_rate("train"))
    chosen = make_scorer("window_time").fit(source)           # parameters chosen on the source's validation split
    assert math.isfinite(chosen.weights.sigma)
    model.set_time_prior(chosen.weights)
    model.set_candidates(target.candidates, target.candidate_function)
    assert model.head.candidate_bias.shape == (target.n_locations,) and not model.head.candidate_bias.any()
    assert model.head.candidate_function.tolist() == target.candidate_function.tolist()
    windows = dataclasses.replace(target, stats=source.stats)   # inputs on the source's scale, as in zero_shot
    batch = windows.batch("test", np.arange(windows.n_windows("test")))
    scores = model({k: torch.as_tensor(v) for k, v in batch.items()}).scores.numpy()
    assert scores.shape == (len(batch["target_location"]), target.n_locations)
    scorer = make_scorer("window_time", use_popularity=False).fit(windows, weights=chosen.weights)
    target_place = batch["target_location"]
    ours, theirs = ranks_from_scores(scores, target_place), ranks_from_scores(scorer.score(batch), target_place)
    assert (ours != theirs).sum() <= 2 and (ours == theirs).mean() >= 0.99
    outside = ~(input_locations(batch) == target_place[:, None]).any(1)
    assert outside.any() and (ours[outside] == theirs[outside]).all()   # unvisited places: the same tie
    with pytest.raises(DataError, match="candidate_function"):
        model.set_candidates(target.candidates, target.candidate_function[:-1])
    with_ids = build_model(dataclasses.replace(cfg.model, ranking_id_embedding=True), source.stats, source.candidates,
                           source.candidate_function, source.history + source.current)
    with pytest.raises(ConfigError, match="ranking_id_embedding"):
        with_ids.set_candidates(target.candidates, target.candidate_function)
