"""One window through the model: the walkthrough ends at exactly what the model's forward computes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nextlocmoe.baselines import Popularity
from nextlocmoe.config import load_config
from nextlocmoe.data.prepare import prepare
from nextlocmoe.errors import ConfigError
from nextlocmoe.model import build_model
from nextlocmoe.model.heads import final_norm_float32
from nextlocmoe.model.pointer import window_visit_time
from nextlocmoe.walkthrough import describe, tcn_receptive_field, walk_window

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=["regression", "ranking"])
def model_and_windows(request, tmp_path_factory):
    cfg = load_config("smoke", overrides=[f"model.head={request.param}"])
    windows = prepare(cfg.data, cache_dir=tmp_path_factory.mktemp("cache"))
    torch.manual_seed(0)
    model = build_model(cfg.model, windows.stats, windows.candidates, windows.candidate_function,
                        windows.history + windows.current).eval()
    model.set_popularity_prior(Popularity("targets").fit(windows).counts)
    model.set_copy_rate(windows.repeat_rate("train"))
    return model, windows


@torch.no_grad()
def test_walk_ends_at_the_models_own_output(model_and_windows):
    model, windows = model_and_windows
    index = 3
    batch = {k: torch.as_tensor(v) for k, v in windows.batch("test", [index]).items()}
    out = model(batch)
    walk = walk_window(model, windows, "test", index, top=5)
    if model.cfg.head == "ranking":
        torch.testing.assert_close(walk.scores, out.scores.cpu(), rtol=1e-5, atol=1e-5)
        table = walk.step("ranking").table
        assert table["place"].tolist() == torch.argsort(out.scores[0], descending=True, stable=True)[:5].tolist()
        if model.pointer is not None:     # copy + generator parts add up to p
            np.testing.assert_allclose(table["from copy"] + table["from generator"], table["p"], atol=2e-4)
    else:
        np.testing.assert_allclose(walk.pred_xy, out.pred_xy[0].numpy(), rtol=1e-5, atol=1e-3)
        table = walk.step("regression").table
        d = np.hypot(*(np.asarray(windows.candidates, float) - walk.pred_xy).T)
        assert table["place"].tolist() == np.argsort(d, kind="stable")[:5].tolist()   # brute-force nearest


@torch.no_grad()
def test_intermediates_are_what_forward_computes(model_and_windows):
    """forward(return_intermediates=True) returns the same output as forward, and each recorded intermediate
    is what its name says: checked by recomputing the later stages from the recorded earlier ones."""
    model, windows = model_and_windows
    batch = {k: torch.as_tensor(v) for k, v in windows.batch("test", [0, 1, 2]).items()}
    plain, traced = model(batch), model(batch, return_intermediates=True)
    assert plain.intermediates is None
    seen = traced.intermediates
    head = plain.scores if plain.scores is not None else plain.pred_xy
    assert torch.equal(head, traced.scores if plain.scores is not None else traced.pred_xy)
    H, C, P = windows.history, windows.current, model.prompt_length
    assert seen["history_features"].shape[:2] == (3, H) and seen["current_features"].shape[:2] == (3, C)
    assert seen["tokens"].shape[1] == seen["hidden"].shape[1] == P + H + C
    hidden, _ = model.run_backbone(seen["tokens"], traced.history)
    torch.testing.assert_close(hidden, seen["hidden"])
    state = final_norm_float32(model.llama.norm, seen["hidden"][:, -1])
    torch.testing.assert_close(state, seen["state"])
    if model.cfg.head == "regression":
        origin = seen["regression_origin"]                    # the scorer's top place: a candidate's coordinates
        window = torch.cat([batch["hist_location"], batch["cur_location"]], dim=1)
        top = model.origin.top_place(window, window_visit_time(batch, window.device))      # (B,) place ids
        assert all(int(place) in set(w.tolist()) for place, w in zip(top, window))         # a place of the window
        torch.testing.assert_close(origin, model.origin.candidates_z[top])
        torch.testing.assert_close(model.head(state, origin), plain.pred_xy)
        return
    torch.testing.assert_close(model.head(state, model.candidate_location_embeddings()), seen["generator_scores"])
    if model.pointer is not None:    # p = g p_copy + (1 - g) softmax(generator), from the recorded parts
        window = torch.cat([batch["hist_location"], batch["cur_location"]], dim=1)
        p_copy = torch.zeros_like(plain.scores).scatter_add(1, window, seen["copy_attention"])
        g = seen["copy_gate"]
        p = g * p_copy + (1 - g) * seen["generator_scores"].softmax(-1)
        torch.testing.assert_close(p, plain.scores.exp(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(seen["copy_attention"].sum(-1), torch.ones(3))


def test_walk_shows_records_gates_and_shapes(model_and_windows):
    model, windows = model_and_windows
    walk = walk_window(model, windows, "test", 0)
    H, C = windows.history, windows.current
    records = walk.step("records").table
    assert len(records) == H + C + 1
    assert records["place"].iloc[-1] == windows.batch("test", [0])["target_location"][0]
    location = walk.step("location").table
    np.testing.assert_allclose(location.iloc[:, 1:6].sum(axis=1), 1.0, atol=2e-3)
    layers = [s for s in walk.steps if s.name.startswith("personalized layer")]
    assert len(layers) == len(model.personalized_moe)
    cfg = model.cfg.personalized
    for step in layers:       # the threshold rule: mass reached, or the cap hit
        t = step.table
        assert ((t["kept mass"] >= cfg.threshold - 1e-3) | (t["kept"] == cfg.max_experts)).all()
        # the kept experts are listed most probable first: the top expert leads the list
        assert all(kept.split(", ")[0] == top for kept, top in zip(t["kept experts"], t["top expert"]))
    shapes = walk.shapes()
    tokens = shapes.loc[shapes["tensor"] == "backbone input", "shape"].item()
    assert tokens.startswith(f"(1, {model.prompt_length + H + C},")
    assert [d["step"] for d in describe(walk)][:3] == ["records", "features", "history"]
    assert walk.step("loss").note.startswith("loss ")      # the window's own training loss closes the walk


def test_receptive_field_and_bad_arguments(model_and_windows):
    model, windows = model_and_windows
    assert tcn_receptive_field(4, [1, 2, 4, 8, 16]) == 187
    with pytest.raises(ConfigError, match="split 'test' has"):
        walk_window(model, windows, "test", windows.n_windows("test"))
    with pytest.raises(ConfigError, match="top=0"):
        walk_window(model, windows, "test", 0, top=0)
