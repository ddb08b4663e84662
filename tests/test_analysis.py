"""Routing analysis (nextlocmoe.analysis) on the smoke city: loading a run, collecting routing, the tables
checked against brute-force loops over windows and tokens, NMI hand cases, entropy logs, errors."""

from __future__ import annotations

import json
import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch

from nextlocmoe.analysis import (RoutingSample, active_experts_per_token, collect_routing, entropy_over_training,
                                 expert_activation_by_role, function_gate_by_category,
                                 majority_top_expert, nearest_centroid_accuracy, normalized_mutual_information,
                                 prediction_sample,
                                 routing_alignment, write_routing_summary)
from nextlocmoe.config import load_config
from nextlocmoe.data.prepare import prepare
from nextlocmoe.data.schema import FUNCTIONS
from nextlocmoe.errors import ConfigError, DataError, NextLocMoEError
from nextlocmoe.io import write_text_atomic
from nextlocmoe.model import build_model
from nextlocmoe.evaluation import evaluate
from nextlocmoe.runs import limited, load_run, save_checkpoint, trainable_state
from nextlocmoe.train import train

SMALL = ["train.epochs=1", "train.max_train_windows=32", "train.max_eval_windows=40", "train.batch_size=16",
         "model.tcn_channels=[176,176]"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def regression_run(threads, cache_dir, tmp_path_factory):
    """A tiny regression model (with the prompt, threshold routing) trained for one epoch."""
    cfg = load_config("smoke", overrides=SMALL)
    windows = prepare(cfg.data, cache_dir=cache_dir)
    result = train(cfg, tmp_path_factory.mktemp("regression"), windows=windows)
    cfg, model, windows = load_run(result.out_dir, windows=windows)
    sample = collect_routing(model, windows, "test", max_windows=None, batch_size=16, seed=3)
    return dict(result=result, cfg=cfg, model=model, windows=windows, sample=sample)


@pytest.fixture(scope="module")
def ranking_run(threads, cache_dir, tmp_path_factory):
    """An untrained ranking model (no prompt) whose gates were sharpened so that threshold routing keeps 1 to 5
    experts, saved as best.pt by hand; the original in-memory model is kept to compare with the loaded one."""
    cfg = load_config("smoke", overrides=SMALL + ["model.head=ranking", "model.use_prompt=false"])
    windows = limited(prepare(cfg.data, cache_dir=cache_dir), cfg)
    torch.manual_seed(cfg.train.seed)
    original = build_model(cfg.model, windows.stats, windows.candidates, windows.candidate_function).eval()
    with torch.no_grad():
        for moe in original.personalized_moe.values():
            moe.gate.proj_out.weight.mul_(60.0)
        original.location_moe.gate[2].weight.mul_(20.0)
    run_dir = tmp_path_factory.mktemp("ranking")
    write_text_atomic(run_dir / "config.yaml", cfg.to_yaml())
    save_checkpoint(run_dir / "best.pt", {"model": trainable_state(original), "epoch": 1, "val": {}})
    _, model, windows = load_run(run_dir, cache_dir=cache_dir)   # windows=None: prepared (cache hit)
    sample = collect_routing(model, windows, "test", max_windows=25, batch_size=8, seed=0)
    return dict(cfg=cfg, original=original, model=model, windows=windows, sample=sample, run_dir=run_dir)


def torch_batch(windows, split, idx):
    return {k: torch.from_numpy(v) for k, v in windows.batch(split, np.asarray(idx)).items()}


# ---------------------------------------------------------------------------------------------------------
# load_run

@pytest.mark.slow
def test_load_run_reproduces_train_test_metrics(regression_run):
    r = regression_run
    again = evaluate(r["model"], r["windows"], "test", r["cfg"].train.eval_batch_size)
    assert again == pytest.approx(r["result"].test, rel=1e-9)
    # the sample covers the whole (subsampled) test split: its hits are train's Hit@1 / Hit@10
    s = r["sample"]
    assert s.n_windows == r["windows"].n_windows("test") == r["result"].test["n"]
    assert s.hit1.mean() == pytest.approx(r["result"].test["hit@1"])
    assert s.hit10.mean() == pytest.approx(r["result"].test["hit@10"])
    error = np.linalg.norm(s.pred_xy - s.target_xy, axis=1)
    assert error.mean() == pytest.approx(r["result"].test["dist_mean_m"], rel=1e-6)


def test_load_run_loads_the_checkpoint_and_prepares_windows(ranking_run):
    r = ranking_run
    assert not r["model"].training
    assert r["windows"].n_windows("test") == 40          # train.limited applied to freshly prepared windows
    batch = torch_batch(r["windows"], "test", np.arange(4))
    with torch.no_grad():
        mine, theirs = r["model"](batch), r["original"](batch)
    torch.testing.assert_close(mine.scores, theirs.scores)
    torch.testing.assert_close(mine.personalized[0].gate_probs, theirs.personalized[0].gate_probs)


def test_load_run_names_the_missing_file(ranking_run, tmp_path):
    with pytest.raises(NextLocMoEError, match="config.yaml"):
        load_run(tmp_path)
    (tmp_path / "config.yaml").write_text((ranking_run["run_dir"] / "config.yaml").read_text())
    with pytest.raises(NextLocMoEError, match="best.pt"):
        load_run(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# collect_routing

@pytest.mark.parametrize("run", [pytest.param("regression_run", marks=pytest.mark.slow), "ranking_run"])
def test_sample_shapes_truth_and_token_kinds(run, request):
    r = request.getfixturevalue(run)
    s, w, model = r["sample"], r["windows"], r["model"]
    W, H, C = s.n_windows, w.history, w.current
    n_split = w.n_windows("test")
    assert np.array_equal(s.window_index, np.random.default_rng(3 if run == "regression_run" else 0)
                          .permutation(n_split)[:W])
    P = 0 if model.prompt_embeddings is None else model.prompt_embeddings.shape[0]
    assert (P > 0) == (run == "regression_run")
    T = P + H + C
    kinds, counts = np.unique(s.token_kind, return_counts=True)
    assert dict(zip(kinds, counts)) == {k: n for k, n in (("prompt", P), ("history", H), ("current", C)) if n}
    assert list(s.token_kind) == ["prompt"] * P + ["history"] * H + ["current"] * C
    assert s.pmoe_layers == (1, 3) and s.expert_names == model.role_names
    assert s.pmoe_probs.shape == s.pmoe_selected.shape == (W, 2, T, 11)
    assert s.pmoe_probs.dtype == np.float32 and s.pmoe_selected.dtype == bool
    assert s.location_probs.shape == (W, C, 5) and s.location_function.shape == (W, C)
    np.testing.assert_allclose(s.pmoe_probs.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(s.location_probs.sum(-1), 1.0, atol=1e-5)
    # truth by another path: start record -> sub-user -> user -> role; current records -> location -> function
    starts = w.starts["test"][s.window_index]
    users = w.subuser_user[w.subuser[starts]]
    assert np.array_equal(s.user, users)
    assert list(s.role) == [w.meta["truth"]["user_role"][u] for u in users]
    cur_records = starts[:, None] + H + np.arange(C)
    assert np.array_equal(s.location_function, w.candidate_function[w.location[cur_records]])
    target = starts + H + C
    np.testing.assert_array_equal(s.target_xy, np.stack([w.x[target], w.y[target]], 1))


@pytest.mark.slow
def test_token_kinds_match_what_the_model_attends_to(ranking_run, regression_run):
    """Changing only the current records leaves P-MoE routing of earlier positions (prompt, history) untouched
    (causal attention; h reads history only) and changes it at the current positions."""
    for r in (ranking_run, regression_run):
        s, w = r["sample"], r["windows"]
        batch = torch_batch(w, "test", s.window_index[:3])
        changed = dict(batch, cur_hour=(batch["cur_hour"] + 7) % 24, cur_xy=batch["cur_xy"] + 0.5)
        with torch.no_grad():
            a = r["model"](batch).personalized[0].gate_probs.numpy()
            b = r["model"](changed).personalized[0].gate_probs.numpy()
        changed_at = ~np.all(np.abs(a - b) < 1e-6, axis=(0, 2))                          # (T,)
        current = s.token_kind == "current"
        assert not changed_at[~current].any() and changed_at[current].any()
        assert np.array_equal(changed_at, current) or r is ranking_run   # its sharpened gates may saturate


def brute_force_route(p: np.ndarray, threshold: float, max_experts: int) -> set[int]:
    order = sorted(range(len(p)), key=lambda e: (-p[e], e))
    kept, mass = [], 0.0
    for e in order:
        if len(kept) >= max_experts or (kept and mass >= threshold):
            break
        kept.append(e)
        mass += float(p[e])
    return set(kept)


@pytest.mark.parametrize("run", [pytest.param("regression_run", marks=pytest.mark.slow), "ranking_run"])
def test_selected_follows_the_threshold_rule(run, request):
    s = request.getfixturevalue(run)["sample"]
    rng = np.random.default_rng(0)
    W, P, T, _ = s.pmoe_probs.shape
    picks = zip(rng.integers(0, W, 400), rng.integers(0, P, 400), rng.integers(0, T, 400))
    for w, p, t in picks:
        want = brute_force_route(s.pmoe_probs[w, p, t].astype(np.float64), 0.8, 5)
        assert set(np.flatnonzero(s.pmoe_selected[w, p, t])) == want


def test_ranking_top1_is_the_best_scored_candidate(ranking_run):
    r = ranking_run
    s, w = r["sample"], r["windows"]
    scores = r["original"].predict_scores(torch_batch(w, "test", s.window_index))       # (W, L)
    np.testing.assert_array_equal(s.top1_xy, w.candidates[scores.argmax(1)])
    target = w.location[w.target_index("test")[s.window_index]]
    rank = 1 + (scores > scores[np.arange(len(target)), target][:, None]).sum(1)        # no ties in float scores
    assert np.array_equal(s.hit1, rank <= 1) and np.array_equal(s.hit10, rank <= 10)
    assert s.pred_xy is None


@pytest.mark.slow
def test_regression_top1_is_the_nearest_candidate(regression_run):
    s, w = regression_run["sample"], regression_run["windows"]
    d2 = ((s.pred_xy[:, None, :] - w.candidates[None]) ** 2).sum(-1)                     # (W, L)
    np.testing.assert_array_equal(s.top1_xy, w.candidates[d2.argmin(1)])                # first = lower id
    target = w.location[w.target_index("test")[s.window_index]]
    target_d2 = d2[np.arange(len(target)), target][:, None]
    ids = np.arange(d2.shape[1])[None]
    rank = 1 + (d2 < target_d2).sum(1) + ((d2 == target_d2) & (ids < target[:, None])).sum(1)
    assert np.array_equal(s.rank, rank)
    assert np.array_equal(s.hit1, rank <= 1) and np.array_equal(s.hit10, rank <= 10)


def test_sample_rejects_inconsistent_shapes(ranking_run):
    with pytest.raises(DataError, match="hit1"):
        dataclasses.replace(ranking_run["sample"], hit1=np.zeros(3, dtype=bool))


# ---------------------------------------------------------------------------------------------------------
# tables against brute force

@pytest.mark.parametrize("run", [pytest.param("regression_run", marks=pytest.mark.slow), "ranking_run"])
def test_activation_by_role_equals_a_loop_over_windows(run, request):
    s = request.getfixturevalue(run)["sample"]
    df = expert_activation_by_role(s, kinds=("current",) if run == "ranking_run" else ("history", "current"))
    kinds = {"current"} if run == "ranking_run" else {"history", "current"}
    sums: dict = {}
    for w in range(s.n_windows):
        for p, layer in enumerate(s.pmoe_layers):
            for t, kind in enumerate(s.token_kind):
                if kind not in kinds:
                    continue
                for e in range(s.pmoe_probs.shape[-1]):
                    acc = sums.setdefault((s.role[w], layer, e), [0.0, 0.0, 0])
                    acc[0] += float(s.pmoe_probs[w, p, t, e])
                    acc[1] += float(s.pmoe_selected[w, p, t, e])
                    acc[2] += 1
    assert len(df) == len(sums)
    for row in df.itertuples():
        total_prob, total_selected, n = sums[(row.role, row.layer, row.expert)]
        assert row.mean_prob == pytest.approx(total_prob / n, rel=1e-5)
        assert row.selected_rate == pytest.approx(total_selected / n)
        assert row.n_tokens == n
        assert row.expert_name == s.expert_names[row.expert]


def test_function_gate_by_category_equals_a_loop(ranking_run):
    s = ranking_run["sample"]
    df = function_gate_by_category(s)
    assert list(df.columns) == ["function", "expert", "mean_prob", "n_tokens"]
    assert len(df) == 25 and list(df["function"].unique()) == list(FUNCTIONS)
    for f, function in enumerate(FUNCTIONS):
        probs = [s.location_probs[w, c] for w in range(s.n_windows) for c in range(s.location_probs.shape[1])
                 if s.location_function[w, c] == f]
        rows = df[df["function"] == function]
        assert list(rows["expert"]) == list(FUNCTIONS)
        assert (rows["n_tokens"] == len(probs)).all()
        if probs:
            np.testing.assert_allclose(rows["mean_prob"], np.mean(probs, axis=0), rtol=1e-5)
        else:
            assert rows["mean_prob"].isna().all()


def test_active_experts_per_token_counts(ranking_run):
    s = ranking_run["sample"]
    df = active_experts_per_token(s)
    assert set(df["token_kind"]) == {"history", "current"}          # no prompt in this model
    assert df["n_active"].max() <= 5 and df["n_active"].min() >= 1
    assert df["n_active"].nunique() > 1                             # sharpened gates: routing varies
    for (layer, kind), group in df.groupby(["layer", "token_kind"]):
        assert group["share"].sum() == pytest.approx(1.0)
        p = s.pmoe_layers.index(layer)
        counts: dict[int, int] = {}
        for w in range(s.n_windows):
            for t in np.flatnonzero(s.token_kind == kind):
                n = int(s.pmoe_selected[w, p, t].sum())
                counts[n] = counts.get(n, 0) + 1
        assert dict(zip(group["n_active"], group["tokens"])) == {n: counts.get(n, 0) for n in group["n_active"]}
        assert sum(counts.values()) == group["tokens"].sum()


def test_tables_refuse_samples_without_roles_or_moe(ranking_run):
    s = ranking_run["sample"]
    with pytest.raises(ConfigError, match="roles"):
        expert_activation_by_role(dataclasses.replace(s, role=None))
    no_moe = dataclasses.replace(s, pmoe_probs=None, pmoe_selected=None, pmoe_layers=())
    with pytest.raises(ConfigError, match="Personalized MoE"):
        expert_activation_by_role(no_moe)
    with pytest.raises(ConfigError, match="Personalized MoE"):
        active_experts_per_token(no_moe)
    with pytest.raises(ConfigError, match="kinds"):
        expert_activation_by_role(s, kinds=("future",))
    with pytest.raises(ConfigError, match="Location"):
        function_gate_by_category(dataclasses.replace(s, location_probs=None))
    assert routing_alignment(no_moe)["nmi_role_top_expert"] == {}


# ---------------------------------------------------------------------------------------------------------
# NMI and alignment

def test_nmi_hand_cases():
    roles = ["a", "b", "c"] * 5
    relabelled = [{"a": 7, "b": 2, "c": 9}[r] for r in roles]
    assert normalized_mutual_information(roles, relabelled) == pytest.approx(1.0)
    # a product design: every (a, b) pair equally often -> independent -> I = 0 exactly
    a, b = np.repeat([0, 1, 2], 4), np.tile([0, 1, 2, 3], 3)
    assert abs(normalized_mutual_information(a, b)) < 1e-12
    # a = [0,0,1,1], b = [0,0,0,1]: H(a) = ln 2, H(b) = H(3/4, 1/4), I = H(b) - H(b|a) = H(b) - ln(2)/2
    h_a = math.log(2)
    h_b = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    mutual = h_b - 0.5 * math.log(2)
    assert normalized_mutual_information([0, 0, 1, 1], [0, 0, 0, 1]) == pytest.approx(mutual / ((h_a + h_b) / 2))
    assert normalized_mutual_information([0, 0, 1, 1], [0, 0, 0, 1], "geometric") == pytest.approx(
        mutual / math.sqrt(h_a * h_b))
    assert normalized_mutual_information([1, 1, 1], ["x", "x", "x"]) == 1.0
    assert normalized_mutual_information([1, 1, 1], [0, 1, 2]) == 0.0
    with pytest.raises(DataError, match="equal lengths"):
        normalized_mutual_information([0, 1], [0])
    with pytest.raises(ConfigError, match="average"):
        normalized_mutual_information([0, 1], [0, 1], "median")


def test_majority_top_expert_breaks_ties_by_lower_index():
    probs = np.array([[[0.1, 0.9], [0.8, 0.2]],           # one vote each -> expert 0
                      [[0.1, 0.9], [0.3, 0.7]]])          # expert 1 twice
    assert majority_top_expert(probs).tolist() == [0, 1]


def hand_sample() -> RoutingSample:
    """6 windows, roles A A B B C C; tokens [history, current, current, current]; layer 5 routes current tokens
    by role (history tokens point elsewhere), layer 7 always to expert 0; 3 current tokens per window for the
    Location MoE with hand-set functions."""
    W, E = 6, 3
    role = np.array(["A", "A", "B", "B", "C", "C"], dtype=object)
    probs = np.full((W, 2, 4, E), 0.1, dtype=np.float32)
    for w in range(W):
        r = "ABC".index(role[w])
        probs[w, 0, 0] = np.roll([0.8, 0.1, 0.1], r + 1)                    # history: a different expert
        probs[w, 0, 1:] = np.roll([0.8, 0.1, 0.1], r)                       # current: the role's expert
        probs[w, 0, 2] = np.roll([0.8, 0.1, 0.1], r + 2)                    # outvoted by the other two
        probs[w, 1] = [0.8, 0.1, 0.1]
    location_function = np.array([[0, 0, -1]] * W, dtype=np.int64)
    location_function[:2] = [[1, 1, 1], [1, 2, -1]]
    location_probs = np.zeros((W, 3, 5), dtype=np.float32)
    location_probs[..., 0] = 1.0                          # argmax expert 0 (Entertainment) ...
    location_probs[0] = np.eye(5)[1]                      # ... except window 0: expert 1 (Commercial)
    zeros = np.zeros((W, 2))
    return RoutingSample(split="test", window_index=np.arange(W), user=np.arange(W), role=role,
                         token_kind=np.array(["history", "current", "current", "current"]), pmoe_layers=(5, 7),
                         pmoe_probs=probs, pmoe_selected=probs > 0.5, location_probs=location_probs,
                         location_function=location_function, target_xy=zeros, pred_xy=zeros + 1, top1_xy=zeros,
                         hit1=np.zeros(W, bool), hit10=np.ones(W, bool))


def test_routing_alignment_hand_case():
    result = routing_alignment(hand_sample(), shuffles=5)
    assert result["n_windows_with_role"] == 6
    assert result["nmi_role_top_expert"] == {5: pytest.approx(1.0), 7: 0.0}
    assert 0.0 <= result["nmi_shuffled"][5] < 1.0
    # known functions: windows 0-1 give 1,1,1,1,2 and windows 2-5 give 0,0 each -> 13 tokens, 8 of category 0;
    # right: window 0's three (expert 1) and the eight 0s (expert 0)
    assert result["n_function_tokens"] == 13
    assert result["function_accuracy"] == pytest.approx(11 / 13)
    assert result["function_chance"] == pytest.approx(8 / 13)
    unknown_role = dataclasses.replace(hand_sample(), role=np.array(["A", "A", None, None, "C", "C"], dtype=object))
    again = routing_alignment(unknown_role)
    assert again["n_windows_with_role"] == 4 and again["nmi_role_top_expert"][5] == pytest.approx(1.0)


def brute_force_nearest_centroid(x, labels):
    """Leave-one-out nearest centroid by refitting without each row (the columns z-scored once, up front)."""
    x = np.asarray(x, float)
    keep = x.std(0) > 0
    x = (x[:, keep] - x[:, keep].mean(0)) / x[:, keep].std(0)
    labels = np.asarray(labels).astype(str)
    right = 0
    for i in range(len(x)):
        rest = np.arange(len(x)) != i
        best, best_d = None, np.inf
        for c in sorted(set(labels[rest])):
            d = ((x[i] - x[rest][labels[rest] == c].mean(0)) ** 2).sum()
            if d < best_d:
                best, best_d = c, d
        right += best == labels[i]
    return right / len(x)


def test_nearest_centroid_accuracy_equals_refitting_without_each_row():
    rng = np.random.default_rng(0)
    labels = np.array(list("AABBBCCCCD"), dtype=object)        # D alone: its left-out row has no centroid
    x = rng.normal(size=(10, 4))
    x[:, 0] += np.array([0 if l == "A" else 3 if l == "B" else 6 for l in labels])
    x[:, 3] = 1.0                                             # a constant column is dropped
    assert nearest_centroid_accuracy(x, labels) == pytest.approx(brute_force_nearest_centroid(x, labels))
    separable = np.repeat(np.eye(3), 4, axis=0) + rng.normal(scale=0.01, size=(12, 3))
    assert nearest_centroid_accuracy(separable, np.repeat(list("abc"), 4)) == 1.0
    with pytest.raises(ConfigError, match="one label per row"):
        nearest_centroid_accuracy(x, labels[:5])


def test_role_decoding_has_a_chance_level_when_every_window_picks_the_same_expert():
    result = routing_alignment(hand_sample(), shuffles=5)
    assert result["distinct_top_experts"] == {5: 3, 7: 1}
    assert result["role_decoding"][5] == 1.0                 # current tokens' gates differ by role
    assert result["nmi_role_top_expert"][7] == 0.0           # layer 7: one expert for all, and no variation
    assert 0.0 <= result["role_decoding_shuffled"][5] < 1.0
    collapsed = hand_sample()
    collapsed.pmoe_probs[:, 1, :] = [0.8, 0.1, 0.1]
    for w in range(collapsed.n_windows):                      # same top expert everywhere, role in the margin
        collapsed.pmoe_probs[w, 1, 1:, 1 + "ABC".index(collapsed.role[w]) % 2] += 0.01 * (1 + "ABC".index(collapsed.role[w]))
    again = routing_alignment(collapsed, shuffles=5)
    assert again["distinct_top_experts"][7] == 1 and again["nmi_role_top_expert"][7] == 0.0
    assert again["role_decoding"][7] == 1.0 > again["role_decoding_shuffled"][7]


@pytest.mark.slow
def test_routing_alignment_on_a_model_sample(regression_run):
    result = routing_alignment(regression_run["sample"])
    assert set(result["nmi_role_top_expert"]) == {1, 3}
    assert all(0.0 <= v <= 1.0 for v in result["nmi_role_top_expert"].values())
    assert 0.0 <= result["function_accuracy"] <= 1.0 and 0.0 < result["function_chance"] <= 1.0


@pytest.mark.slow
def test_routing_summary_table_carries_the_alignment_and_expert_counts(regression_run, tmp_path):
    sample = regression_run["sample"]
    paths = write_routing_summary({"synthetic": sample}, "smoke", tmp_path, role_dataset="synthetic",
                                  function_dataset="synthetic", data_checksum={"synthetic": "abc"})
    table = pd.read_csv(paths["csv"])
    alignment = routing_alignment(sample)
    nmi = table[table["metric"] == "nmi(role, top expert)"].set_index("layer")["value"].rename(index=int)
    assert nmi.to_dict() == pytest.approx({int(k): v for k, v in alignment["nmi_role_top_expert"].items()})
    kept = table[table["metric"] == "mean experts per token"].set_index("layer")["value"].rename(index=int)
    not_prompt = sample.token_kind != "prompt"
    for i, layer in enumerate(sample.pmoe_layers):      # a loop over windows and tokens, independently
        counts = [int(sample.pmoe_selected[w, i, t].sum()) for w in range(sample.n_windows)
                  for t in np.flatnonzero(not_prompt)]
        assert kept[layer] == pytest.approx(np.mean(counts))
    decoding = table[table["metric"] == "role decoding from gates"].set_index("layer")["value"].rename(index=int)
    assert decoding.to_dict() == pytest.approx({int(k): v for k, v in alignment["role_decoding"].items()})
    accuracy = table.loc[table["metric"] == "top function expert accuracy", "value"].item()
    assert accuracy == pytest.approx(alignment["function_accuracy"])
    assert json.loads(paths["json"].read_text())["data_checksum"] == {"synthetic": "abc"}
    assert "nmi(role, top expert)" in paths["md"].read_text()
    with pytest.raises(ConfigError, match="nyc"):
        write_routing_summary({"synthetic": sample}, "smoke", tmp_path, role_dataset="synthetic",
                              function_dataset="nyc")


# ---------------------------------------------------------------------------------------------------------
# entropy over training, predictions

def test_entropy_over_training_smooths_steps_csv(tmp_path):
    pd.DataFrame({"epoch": [1, 1, 1, 2, 2], "step": [1, 2, 3, 4, 5], "loss": [9.0] * 5,
                  "pmoe_entropy": [1.0, 2.0, 3.0, 4.0, 5.0]}).to_csv(tmp_path / "steps.csv", index=False)
    df = entropy_over_training(tmp_path, smooth=2)
    assert list(df.columns) == ["step", "epoch", "pmoe_entropy", "location_entropy", "pmoe_entropy_smooth",
                                "location_entropy_smooth"]
    assert df["pmoe_entropy_smooth"].tolist() == [1.0, 1.5, 2.5, 3.5, 4.5]
    assert df["location_entropy"].isna().all()
    with pytest.raises(ConfigError, match="smooth"):
        entropy_over_training(tmp_path, smooth=0)
    with pytest.raises(DataError, match="steps.csv"):
        entropy_over_training(tmp_path / "older_run")


@pytest.mark.slow
def test_entropy_over_training_of_a_real_run(regression_run):
    df = entropy_over_training(regression_run["result"].out_dir, smooth=20)
    assert len(df) == 2                                             # 32 training windows / batch 16, one epoch
    assert df["location_entropy"].between(0, math.log(5)).all()
    assert df["pmoe_entropy"].between(0, math.log(11)).all()
    assert df["pmoe_entropy_smooth"].iloc[-1] == pytest.approx(df["pmoe_entropy"].mean())


@pytest.mark.slow
def test_prediction_sample(regression_run, ranking_run):
    s = regression_run["sample"]
    df = prediction_sample(s, n=7)
    assert list(df.columns) == ["window", "target_x", "target_y", "pred_x", "pred_y", "top1_x", "top1_y", "hit1",
                                "hit10", "error_m"]
    assert len(df) == 7 and df["window"].tolist() == s.window_index[:7].tolist()
    np.testing.assert_allclose(df[["pred_x", "pred_y"]], s.pred_xy[:7])
    for row in df.itertuples():
        assert row.error_m == pytest.approx(math.dist((row.top1_x, row.top1_y), (row.target_x, row.target_y)))
        if row.hit1:                                                # a hit answers the target's own place
            assert row.error_m == pytest.approx(0.0, abs=1e-6)
    assert len(prediction_sample(s, n=10_000)) == s.n_windows
    ranking = prediction_sample(ranking_run["sample"], n=5)
    assert ranking[["pred_x", "pred_y"]].isna().all().all()
    with pytest.raises(ConfigError, match="n="):
        prediction_sample(s, n=0)


def test_kept_mass_per_token_against_a_loop():
    """The mass of the kept experts per token, binned, equals a plain loop over windows, layers and tokens."""
    from nextlocmoe.analysis import kept_mass_per_token

    rng = np.random.default_rng(3)
    base = hand_sample()
    probs = rng.dirichlet(np.ones(3), size=base.pmoe_probs.shape[:3]).astype(np.float32)   # (W, P, T, E)
    selected = rng.random(probs.shape) < 0.5
    sample = dataclasses.replace(base, pmoe_probs=probs, pmoe_selected=selected)
    df = kept_mass_per_token(sample, bins=4)
    assert df.groupby(["layer", "token_kind"])["share"].sum().to_numpy() == pytest.approx(1.0)
    for p, layer in enumerate(sample.pmoe_layers):
        for kind in ("history", "current"):
            counts = [0, 0, 0, 0]
            for w in range(probs.shape[0]):
                for t, k in enumerate(sample.token_kind):
                    if k == kind:
                        mass = sum(float(probs[w, p, t, e]) for e in range(3) if selected[w, p, t, e])
                        counts[min(int(mass * 4), 3)] += 1
            got = df[(df["layer"] == layer) & (df["token_kind"] == kind)].sort_values("mass_lo")["tokens"]
            assert got.tolist() == counts
    assert set(df["token_kind"]) == {"history", "current"}               # no prompt tokens in this sample
    with pytest.raises(ConfigError, match="bins"):
        kept_mass_per_token(sample, bins=0)
