"""The lab's evaluation-time changes: each changes what it says while inside, and restores the model on exit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nextlocmoe.baselines import Popularity
from nextlocmoe.config import load_config
from nextlocmoe.data.prepare import prepare
from nextlocmoe.errors import ConfigError
from nextlocmoe.lab import copy_gates, next_visit_time_off, routing_threshold
from nextlocmoe.model import build_model
from nextlocmoe.window_scorers import make_scorer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ranking(tmp_path_factory):
    """An untrained ranking NextLocMoE on the smoke city with its popularity and time priors, and a test batch."""
    cfg = load_config("smoke", overrides=["model.head=ranking", "model.use_prompt=false"])
    windows = prepare(cfg.data, cache_dir=tmp_path_factory.mktemp("cache"))
    torch.manual_seed(0)
    model = build_model(cfg.model, windows.stats, windows.candidates, windows.candidate_function,
                        windows.history + windows.current).eval()
    model.set_popularity_prior(Popularity("targets").fit(windows).counts)
    model.set_time_prior(make_scorer("window_time").fit(windows).weights)
    batch = {k: torch.as_tensor(v) for k, v in windows.batch("test", np.arange(16)).items()}
    return model, windows, batch


@torch.no_grad()
def test_routing_threshold_changes_the_routing_and_is_restored(ranking):
    model, _, batch = ranking

    def hidden():   # the untrained ranking head does not read the backbone yet: compare the hidden states
        return model(batch, return_intermediates=True).intermediates["hidden"]

    before = hidden()
    with routing_threshold(model, 0.05):        # a near-uniform gate reaches 0.05 with its first expert
        assert all(layer.cfg.threshold == 0.05 for layer in model.personalized_moe.values())
        inside = hidden()
    assert not torch.allclose(inside, before)   # one kept expert instead of five: less of the FFN's output
    assert torch.equal(hidden(), before)
    assert all(layer.cfg.threshold == 0.8 for layer in model.personalized_moe.values())
    with pytest.raises(ConfigError, match="threshold"):
        with routing_threshold(model, 1.5):
            pass


@torch.no_grad()
def test_next_visit_time_off_zeroes_the_time_term_and_is_restored(ranking):
    model, _, batch = ranking
    pointer = model.pointer
    precision = float(pointer.hour_precision)
    assert precision != 0.0                      # the tuned prior is on: a real test
    before = model(batch).scores
    with next_visit_time_off(model):
        assert float(pointer.hour_precision) == float(pointer.same_weekday_bonus) == 0.0
        assert not torch.allclose(model(batch).scores, before)
    assert float(pointer.hour_precision) == precision and torch.equal(model(batch).scores, before)


@torch.no_grad()
def test_copy_gates_are_the_forward_pass_gates_in_window_order(ranking):
    model, windows, batch = ranking
    gates = copy_gates(model, windows, "test", batch_size=5, max_windows=16)
    expected = model(batch, return_intermediates=True).intermediates["copy_gate"].reshape(-1).numpy()
    assert gates.shape == (16,) and np.allclose(gates, expected, atol=1e-6)
    assert ((gates > 0) & (gates < 1)).all()
