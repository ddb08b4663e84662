"""Training loop on the smoke profile: best-checkpoint testing, resume, divergence, CLI."""

import json

import pandas as pd
import pytest
import torch

from nextlocmoe.cli import main
from nextlocmoe.config import load_config
from nextlocmoe.data.prepare import prepare
from nextlocmoe.errors import ConfigError
from nextlocmoe.train import TrainingDiverged, evaluate_checkpoint, period_indices, train


@pytest.fixture(scope="module")
def smoke_cfg():
    return load_config("smoke", overrides=["train.epochs=3", "train.max_train_windows=96",
                                           "train.max_eval_windows=48", "train.early_stop_patience=10"])


@pytest.fixture(scope="module")
def smoke_windows(smoke_cfg, tmp_path_factory):
    return prepare(smoke_cfg.data, cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def full_run(smoke_cfg, smoke_windows, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    return train(smoke_cfg, out, windows=smoke_windows)


@pytest.mark.slow
def test_test_metrics_come_from_the_best_checkpoint(full_run, smoke_cfg, smoke_windows):
    hist = full_run.history
    assert hist["epoch"].tolist() == [0, 1, 2, 3]           # the untrained start first
    assert hist["train_windows"].tolist() == [0, 96, 192, 288]
    best = int(hist["epoch"].iloc[int(hist["val_hit@10"].to_numpy().argmax())])  # first point reaching the maximum
    assert full_run.best_epoch == best
    again = evaluate_checkpoint(smoke_cfg, full_run.out_dir, "test", windows=smoke_windows)
    assert again == pytest.approx(full_run.test)
    metrics = json.loads((full_run.out_dir / "metrics.json").read_text())
    assert metrics["best_epoch"] == best
    assert metrics["provenance"]["profile"] == "smoke"
    assert metrics["provenance"]["seed"] == smoke_cfg.train.seed
    assert 0.0 <= metrics["test"]["hit@1"] <= metrics["test"]["hit@10"] <= 1.0


@pytest.mark.slow
def test_resume_reaches_the_same_result(full_run, smoke_cfg, smoke_windows, tmp_path):
    partial = train(smoke_cfg, tmp_path, windows=smoke_windows, stop_after_epochs=1)
    assert len(partial.history) == 2 and not (tmp_path / "metrics.json").exists()   # start + one epoch
    resumed = train(smoke_cfg, tmp_path, windows=smoke_windows, resume=True)
    assert resumed.best_epoch == full_run.best_epoch
    assert resumed.test == pytest.approx(full_run.test, rel=1e-6)
    cols = [c for c in full_run.history.columns if c != "seconds"]
    assert resumed.history[cols].to_numpy() == pytest.approx(full_run.history[cols].to_numpy(), rel=1e-5, nan_ok=True)


@pytest.mark.slow
def test_resume_refuses_a_different_config(smoke_cfg, smoke_windows, tmp_path):
    train(smoke_cfg, tmp_path, windows=smoke_windows, stop_after_epochs=1)
    other = load_config("smoke", overrides=["train.lr=0.5"])
    with pytest.raises(Exception, match="different config"):
        train(other, tmp_path, windows=smoke_windows, resume=True)


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(smoke_cfg, smoke_windows, tmp_path, monkeypatch):
    train(smoke_cfg, tmp_path, windows=smoke_windows, stop_after_epochs=1)
    good = (tmp_path / "last.pt").read_bytes()
    from nextlocmoe.model import nextlocmoe as model_module

    real_loss = model_module.NextLocMoE.loss

    def poisoned(self, out, batch):
        loss, parts = real_loss(self, out, batch)
        return loss * float("nan"), parts

    monkeypatch.setattr(model_module.NextLocMoE, "loss", poisoned)
    with pytest.raises(TrainingDiverged, match="loss became nan at epoch 2"):
        train(smoke_cfg, tmp_path, windows=smoke_windows, resume=True)
    assert (tmp_path / "last.pt").read_bytes() == good


def test_cli_errors_are_one_line_and_exit_2(capsys, tmp_path):
    assert main(["prepare", "--profile", "smoke", "--set", "data.source=humob",
                 "--set", f"data.path={tmp_path / 'missing.csv'}"]) == 2
    err = capsys.readouterr().err
    assert "missing.csv" in err and "Traceback" not in err
    assert main(["train", "--profile", "smoke", "--set", "train.nope=1"]) == 2
    assert "unknown field 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0


class _NaNGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradients are not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


@pytest.mark.slow
def test_non_finite_gradients_stop_before_the_step(smoke_cfg, smoke_windows, tmp_path, monkeypatch):
    from nextlocmoe.model import nextlocmoe as model_module

    real_loss = model_module.NextLocMoE.loss

    def poisoned(self, out, batch):
        loss, parts = real_loss(self, out, batch)
        return _NaNGradient.apply(loss), parts

    monkeypatch.setattr(model_module.NextLocMoE, "loss", poisoned)
    with pytest.raises(TrainingDiverged, match="gradients became non-finite .* at epoch 1, step 1"):
        train(smoke_cfg, tmp_path, windows=smoke_windows)
    from nextlocmoe.runs import load_checkpoint                   # what is kept: the validated untrained start
    assert load_checkpoint(tmp_path / "last.pt")["state"]["epoch"] == 0


def test_training_periods_tile_a_stream_of_seeded_passes():
    n, k = 10, 4
    periods = [period_indices(n, k, p, seed=3) for p in range(5)]            # 20 windows = two passes
    assert all(len(p) == k for p in periods)
    stream = [i for p in periods for i in p]
    first, second = stream[:n], stream[n:]
    assert sorted(first) == sorted(second) == list(range(n)) and first != second   # each pass: every window once
    assert first == torch.randperm(n, generator=torch.Generator().manual_seed(3 * 100_003)).tolist()
    assert period_indices(n, k, 1, seed=3) == periods[1]                      # a period depends on its number only


@pytest.mark.slow
def test_windows_per_epoch_gives_one_validation_point_per_period(smoke_cfg, smoke_windows, tmp_path, capsys):
    cfg = load_config("smoke", overrides=["train.epochs=3", "train.max_train_windows=96", "train.windows_per_epoch=32",
                                          "train.max_eval_windows=48", "train.max_test_windows=20",
                                          "train.early_stop_patience=10", "train.batch_size=16"])
    result = train(cfg, tmp_path, windows=smoke_windows)
    assert len(result.history) == 4 and result.test["n"] == 20 and result.val["n"] == min(48, smoke_windows.n_windows("val"))
    per_epoch = pd.read_csv(tmp_path / "steps.csv").groupby("epoch").size()
    assert per_epoch.tolist() == [2, 2, 2]                                   # 32 windows = 2 batches of 16 each
    printed = capsys.readouterr().out.splitlines()
    paces = [line for line in printed if line.startswith("epoch ") and "windows/s, ~" in line]
    assert len(paces) == 3 and paces[-1].endswith("~0.0 min left")        # every trained period; none left at the end


@pytest.mark.slow
def test_the_untrained_start_is_validated_and_kept_when_training_never_beats_it(smoke_cfg, smoke_windows, tmp_path,
                                                                                 monkeypatch):
    """With every optimiser step a no-op the later periods tie with the start: best_epoch 0, and the test metrics
    are those of the untrained model (the same config built without training)."""
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, closure=None: None)
    cfg = load_config("smoke", overrides=["train.epochs=2", "train.max_train_windows=32", "train.max_eval_windows=48",
                                          "train.early_stop_patience=10"])
    result = train(cfg, tmp_path, windows=smoke_windows)
    assert result.best_epoch == 0 and result.history["epoch"].tolist() == [0, 1, 2]
    assert result.history["val_hit@10"].nunique() == 1
    assert json.loads((tmp_path / "metrics.json").read_text())["best_epoch"] == 0
    start = train(load_config("smoke", overrides=["train.epochs=1", "train.max_train_windows=32",
                                                  "train.max_eval_windows=48", "train.early_stop_patience=0"]),
                  tmp_path / "start", windows=smoke_windows)       # patience 0: stops before any period
    assert start.history["epoch"].tolist() == [0] and start.test == pytest.approx(result.test)


def test_bad_budget_values_name_the_field():
    with pytest.raises(ConfigError, match="train.windows_per_epoch"):
        load_config("smoke", overrides=["train.windows_per_epoch=0"])


@pytest.mark.slow
def test_learning_curve_is_resumable_and_written_point_by_point(smoke_windows, tmp_path):
    """Two points on the smoke city: the table holds the untrained start, both points (training windows 0, 16,
    32) and the two floors on the same validation windows; a second call continues, it does not retrain."""
    from nextlocmoe.experiments.learning_curve import run_learning_curve
    args = ("smoke", "nextlocmoe_ranking", "synthetic", 16, 2, tmp_path / "run")
    table = run_learning_curve(*args, results_dir=tmp_path / "results", val_windows=40,
                               overrides=["train.batch_size=16"])
    model = table[table["kind"] == "model"]
    assert model["train_windows"].tolist() == [0, 16, 32] and model["n"].eq(model["n"].iloc[0]).all()
    floors = table[table["kind"] == "floor"]
    assert sorted(floors["method"]) == ["user_most_frequent", "window_time"] and floors["n"].eq(model["n"].iloc[0]).all()
    written = pd.read_csv(tmp_path / "results" / "learning_curve.csv")
    assert len(written) == 5 and written["curve"].eq("nextlocmoe_ranking/synthetic").all()
    stamp = json.loads((tmp_path / "results" / "learning_curve.json").read_text())
    assert stamp["command"] == "nextlocmoe curve" and "nextlocmoe_ranking/synthetic" in stamp["curves"]
    again = run_learning_curve(*args, results_dir=tmp_path / "results", val_windows=40, overrides=["train.batch_size=16"])
    assert again.equals(table)
    from nextlocmoe.experiments.learning_curve import compare_with_floor
    paired = compare_with_floor(*args, results_dir=tmp_path / "results", val_windows=40,
                                overrides=["train.batch_size=16"])
    assert paired["n"] == model["n"].iloc[0] and paired["points_done"] == 2
    assert paired["best_train_windows"] == model.loc[model["point"] == paired["best_point"], "train_windows"].item()
    assert paired["hit@1_diff"] == pytest.approx(paired["hit@1_a_only"] / paired["n"] - paired["hit@1_b_only"] / paired["n"])
    stamp = json.loads((tmp_path / "results" / "learning_curve.json").read_text())
    assert stamp["paired_vs_window_time"]["nextlocmoe_ranking/synthetic"] == json.loads(json.dumps(paired))


@pytest.mark.slow
def test_a_regression_curve_starts_at_the_scorers_distance_and_draws_the_last_location_floor(smoke_windows, tmp_path):
    """The regression head's curve: its untrained start predicts the window_time scorer's top place (so its median
    error is the scorer's, up to float32 near-ties, and not above last_location's), and last_location is a floor."""
    from nextlocmoe.experiments.learning_curve import curve_summary, run_learning_curve
    table = run_learning_curve("smoke", "nextlocmoe", "synthetic", 16, 1, tmp_path / "run",
                               results_dir=tmp_path / "results", val_windows=40, overrides=["train.batch_size=16"])
    floors = table[table["kind"] == "floor"].set_index("method")
    assert sorted(floors.index) == ["last_location", "user_most_frequent", "window_time"]
    start = table[(table["kind"] == "model") & (table["train_windows"] == 0)].iloc[0]
    assert start["hit@1"] == pytest.approx(floors.loc["window_time", "hit@1"], abs=2 / 40)
    assert start["dist_median_m"] <= floors.loc["last_location", "dist_median_m"]
    summary = curve_summary(table.assign(curve="nextlocmoe/synthetic"))
    assert summary["start_dist_median_m"].iloc[0] == start["dist_median_m"]


@pytest.mark.slow
def test_a_neural_baselines_curve_starts_at_the_unfitted_model_and_records_its_paired_comparison(smoke_windows, tmp_path):
    """transformer_pointer's curve (run_baseline_curve): point 0 is the model before its first step (what a fit with
    no training would score), a point after each period of windows (across passes), the
    ranking floors only, and the best point by validation Hit@10 paired with window_time on the same windows."""
    from nextlocmoe.baselines import NeuralBaselineConfig, evaluate_baseline, make_baseline
    from nextlocmoe.experiments.learning_curve import baseline_curve_config, run_baseline_curve
    results = tmp_path / "results"
    table = run_baseline_curve("smoke", "transformer_pointer", "synthetic", 128, 3, results_dir=results,
                               val_windows=40)
    model = table[table["kind"] == "model"]
    assert model["point"].tolist() == [0, 1, 2, 3]
    # each point at the first step that reaches its mark (216 training windows a pass: batches of 128 and 88)
    assert all(128 * p <= w < 128 * (p + 1) for p, w in zip(model["point"], model["train_windows"]))
    assert model["train_windows"].tolist()[:2] == [0, 128]
    assert sorted(table[table["kind"] == "floor"]["method"]) == ["user_most_frequent", "window_time"]
    cfg, baseline_cfg = baseline_curve_config("smoke", "transformer_pointer", "synthetic", 128, 3, val_windows=40)
    assert baseline_cfg.max_train_windows is None and baseline_cfg.patience is None
    from nextlocmoe.runs import limited
    val = limited(smoke_windows, cfg)
    stopped = make_baseline("transformer_pointer", NeuralBaselineConfig(**{**baseline_cfg.to_dict(), "epochs": 1}))
    stopped.fit(smoke_windows, observe=lambda m, seen: True, observe_every=128)   # stops before its first step
    assert stopped.step_losses == [] and evaluate_baseline(stopped, val, "val")["mrr"] == pytest.approx(
        model["mrr"].iloc[0])
    stamp = json.loads((results / "learning_curve.json").read_text())
    paired = stamp["paired_vs_window_time"]["transformer_pointer/synthetic"]
    best = model.loc[model["hit@10"].idxmax()]
    assert paired["best_point"] == best["point"] and paired["n"] == best["n"] == val.n_windows("val")
    assert "baseline" in stamp["curves"]["transformer_pointer/synthetic"]
    with pytest.raises(ConfigError, match="no baseline curve"):
        baseline_curve_config("smoke", "markov", "synthetic", 128, 3)
    with pytest.raises(ConfigError, match="observe_every"):
        make_baseline("transformer_pointer").fit(smoke_windows, observe=lambda m, seen: None, observe_every=0)


# ---------------------------------------------------------------------------------------------------
# model.safetensors: the weights file to hand on

@pytest.mark.slow
def test_safetensors_weights_are_the_best_checkpoint_and_load_run_reads_them(full_run, smoke_cfg, smoke_windows):
    from nextlocmoe.config import config_hash
    from nextlocmoe.runs import load_checkpoint, load_run, read_weights
    state, metadata = read_weights(full_run.out_dir / "model.safetensors")
    best = load_checkpoint(full_run.out_dir / "best.pt")["model"]
    assert state.keys() == best.keys() and all(torch.equal(state[k], best[k]) for k in best)
    assert metadata["config_hash"] == config_hash(smoke_cfg) and metadata["best_epoch"] == full_run.best_epoch
    assert metadata["train_windows"] == 288 and metadata["seed"] == smoke_cfg.train.seed and metadata["code_hash"]
    (full_run.out_dir / "best.pt").rename(full_run.out_dir / "best.pt.away")     # only the safetensors file left
    try:
        again = evaluate_checkpoint(smoke_cfg, full_run.out_dir, "test", windows=smoke_windows)
    finally:
        (full_run.out_dir / "best.pt.away").rename(full_run.out_dir / "best.pt")
    assert again == pytest.approx(full_run.test)


@pytest.mark.slow
def test_weights_that_do_not_fit_or_are_damaged_give_one_clear_error(full_run, smoke_cfg, smoke_windows, tmp_path):
    import shutil
    from nextlocmoe.errors import NextLocMoEError
    from nextlocmoe.runs import load_run, read_weights, save_weights
    run = tmp_path / "run"
    shutil.copytree(full_run.out_dir, run)
    state, metadata = read_weights(run / "model.safetensors")
    name = sorted(state)[0]

    save_weights(run / "model.safetensors", {k: v for k, v in state.items() if k != name}, metadata)
    with pytest.raises(NextLocMoEError, match=rf"model.safetensors does not fit this model: missing parameters \['{name}'\].*retrain it: `nextlocmoe train"):
        load_run(run, smoke_windows, cfg=smoke_cfg)
    save_weights(run / "model.safetensors", {**state, name: torch.zeros(3, 1)}, metadata)
    with pytest.raises(NextLocMoEError, match="other shapes"):
        load_run(run, smoke_windows, cfg=smoke_cfg)
    other = load_config("smoke", overrides=["train.epochs=3", "train.max_train_windows=96", "train.max_eval_windows=48",
                                            "train.early_stop_patience=10", "train.lr=0.5"])
    save_weights(run / "model.safetensors", state, metadata)
    with pytest.raises(NextLocMoEError, match="trained with configuration"):
        load_run(run, smoke_windows, cfg=other)

    raw = (full_run.out_dir / "model.safetensors").read_bytes()
    for damaged in (raw[: len(raw) // 2], b"\x00" * 64, b"not a weights file"):
        (run / "model.safetensors").write_bytes(damaged)
        with pytest.raises(NextLocMoEError, match="not a weights file this library wrote"):
            load_run(run, smoke_windows, cfg=smoke_cfg)


def test_weight_decay_leaves_weight_normalised_directions_alone():
    """Decay cannot change a weight-normalised layer (it uses v / ||v||) and only shrinks v towards 0/0: the
    history router's directions are in the group without decay; every other trainable weight keeps it."""
    from nextlocmoe.model.history_router import HistoryRouter
    from nextlocmoe.train import NO_DECAY_SUFFIX, decay_groups

    torch.manual_seed(0)
    router = HistoryRouter(token_dim=8, channels=(8, 8), kernel_size=2)
    names = {id(p): n for n, p in router.named_parameters()}
    decayed, free = decay_groups(router, 0.01)
    assert decayed["weight_decay"] == 0.01 and free["weight_decay"] == 0.0
    directions = [n for n, _ in router.named_parameters() if n.endswith(NO_DECAY_SUFFIX)]
    assert directions and sorted(names[id(p)] for p in free["params"]) == sorted(directions)
    assert len(decayed["params"]) + len(free["params"]) == len(list(router.parameters()))

    # with a loss that does not depend on the weights, only decay moves them: the directions stay, the rest shrink
    before = {n: p.detach().clone() for n, p in router.named_parameters()}
    opt = torch.optim.Adam(decay_groups(router, 0.01), lr=1e-2)
    for _ in range(20):
        opt.zero_grad()
        (0.0 * sum(p.sum() for p in router.parameters())).backward()
        opt.step()
    for n, p in router.named_parameters():
        if n.endswith(NO_DECAY_SUFFIX):
            assert torch.equal(p, before[n]), n
        elif before[n].abs().max() > 0:
            assert p.abs().sum() < before[n].abs().sum(), n
