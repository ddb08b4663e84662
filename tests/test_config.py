"""Configuration: profiles, YAML round-trip, overrides and their errors."""

import pytest

from nextlocmoe.config import PROFILES, ExperimentConfig, load_config
from nextlocmoe.errors import ConfigError


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_profile_round_trips_through_yaml(profile, tmp_path):
    cfg = load_config(profile)
    path = tmp_path / "cfg.yaml"
    path.write_text(cfg.to_yaml())
    again = load_config(profile, path)
    assert again == cfg
    assert ExperimentConfig.from_dict(cfg.to_dict()) == cfg


def test_yaml_file_and_overrides_apply_in_order(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("train:\n  epochs: 7\n  lr: 0.5\ndata:\n  history: 20\n")
    cfg = load_config("smoke", path, ["train.epochs=3", "model.pmoe_layers=[0, 2]"])
    assert cfg.train.epochs == 3 and cfg.train.lr == 0.5 and cfg.data.history == 20
    assert cfg.model.pmoe_layers == (0, 2)


@pytest.mark.parametrize("overrides, match", [
    (["train.epoch=3"], "unknown field 'epoch'"),
    (["trian.epochs=3"], "'trian' is not a config section"),
    (["train.epochs"], "must look like section.field=value"),
])
def test_bad_overrides_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config("smoke", overrides=overrides)


def test_unknown_profile_and_bad_file(tmp_path):
    with pytest.raises(ConfigError, match="--profile 'nope' is unknown"):
        load_config("nope")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("smoke", tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  layers_count: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'layers_count'"):
        load_config("smoke", bad)


def test_text_overrides_stay_text_where_yaml_would_read_a_boolean():
    cfg = load_config("smoke", overrides=["train.mixed_precision=no"])
    assert cfg.train.mixed_precision == "no"
    assert load_config("smoke", overrides=["train.epochs=3"]).train.epochs == 3


def test_a_neural_baselines_budget_is_the_plans_unless_baseline_budgets_names_it(tmp_path):
    cfg = load_config("cpu")
    assert cfg.plan.baseline_budget("lstm") == {"epochs": 5, "patience": 2, "train_windows": 4096}
    assert cfg.plan.baseline_budget("transformer_pointer") == {"epochs": 3, "patience": None, "train_windows": None}
    path = tmp_path / "budget.yaml"
    path.write_text("plan:\n  baseline_budgets:\n    lstm:\n      epochs: 1\n")      # a free-form mapping
    assert load_config("cpu", path).plan.baseline_budget("lstm")["epochs"] == 1
    path.write_text("plan:\n  baseline_budgets:\n    lstm:\n      lr: 0.1\n")
    with pytest.raises(ConfigError, match="baseline_budgets"):
        load_config("cpu", path)
