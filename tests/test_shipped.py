"""Shipped models: exported in bf16 with their record, found by key, installed after a check, rebuilt identically;
and the models the repository ships (checkpoints/cpu/) reproduce their committed metrics."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from nextlocmoe.config import load_config
from nextlocmoe.errors import NextLocMoEError
from nextlocmoe.experiments.core import Runner, run_config
from nextlocmoe.experiments.datasets import named_handle
from nextlocmoe.shipped import (AGREEMENT, CHECK_WINDOWS, RECORD_FILE, RETRAIN_ENV, check_metrics, install_model,
                                shipped_index)

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = sorted((ROOT / "checkpoints" / "cpu").glob(f"*/{RECORD_FILE}"))
SHIPS = {"shipped_experiments": ("supervised",)}


def tensors(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """One smoke model trained, exported to a shipped folder, then installed by a runner that does not ship."""
    root = tmp_path_factory.mktemp("ship")
    cache = root / "cache"
    runner = Runner("supervised", "smoke", runs_dir=root / "runs", cache_dir=cache, plan=SHIPS,
                    shipped_dir=root / "checkpoints")
    data = runner.dataset("synthetic")
    cfg = run_config(runner.cfg, "nextlocmoe_ranking", "synthetic")
    trained = runner.trained_model(cfg, data, name="nextlocmoe_ranking-synthetic-default")
    reader = Runner("supervised", "smoke", runs_dir=root / "runs2", cache_dir=cache, shipped_dir=root / "checkpoints")
    installed = reader.trained_model(cfg, data)
    return dict(root=root, cache=cache, cfg=cfg, data=data, trained=trained, installed=installed, reader=reader,
                folder=root / "checkpoints" / "smoke" / "nextlocmoe_ranking-synthetic-default")


@pytest.mark.slow
def test_an_exported_model_is_found_by_its_key_and_read_instead_of_trained(shipped):
    folder = shipped["folder"]
    assert sorted(p.name for p in folder.iterdir()) == ["config.yaml", "history.csv", "model.json",
                                                        "model.safetensors", "steps.csv"]
    assert shipped_index(folder.parent) == {shipped["trained"]["key"]: folder}
    assert shipped["reader"].trained == 0 and shipped["installed"]["origin"] == "shipped"
    for split in ("val", "test"):
        assert shipped["installed"][split] == shipped["trained"][split]
    record = json.loads((folder / RECORD_FILE).read_text())
    assert record["storage_dtype"] in ("bfloat16", "float32")
    stored = [t for t in tensors(folder / "model.safetensors").values() if t.is_floating_point()]
    assert {t.dtype for t in stored if t.numel() > 1} == {getattr(torch, record["storage_dtype"])}
    assert {t.dtype for t in stored if t.numel() <= 1} <= {torch.float32}     # scalars are never rounded
    for field in ("code_hash", "data_checksum", "seed", "device", "train_windows", "config_hash"):
        assert field in record["provenance"], field


@pytest.mark.slow
def test_the_check_reproduces_exactly_and_bf16_agrees_with_float32(shipped):
    record = json.loads((shipped["folder"] / RECORD_FILE).read_text())
    assert record["check"]["windows"] == min(CHECK_WINDOWS, record["windows"]["test"])
    assert check_metrics(shipped["folder"], shipped["data"].windows) == record["check"]["metrics"]
    for k, v in record["float32"]["test"].items():
        if k.startswith("hit@") and not k.endswith(("_lo", "_hi")):
            assert abs(record["test"][k] - v) <= AGREEMENT, k
    # the run directory now holds the shipped weights too: trained here or installed, a model is read identically
    trained_dir = shipped["root"] / "runs" / shipped["trained"]["dir"]
    assert (trained_dir / "model.safetensors").read_bytes() == (shipped["folder"] / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_a_truncated_or_altered_weights_file_is_one_error_naming_it(shipped, tmp_path):
    for damage in ("truncate", "flip"):
        folder = tmp_path / damage
        shutil.copytree(shipped["folder"], folder)
        weights = folder / "model.safetensors"
        data = bytearray(weights.read_bytes())
        if damage == "truncate":
            data = data[: len(data) // 2]
        else:
            data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
        with pytest.raises(NextLocMoEError, match=r"model\.safetensors is not the file its record .*make retrain"):
            install_model(folder, tmp_path / f"{damage}-run")


@pytest.mark.slow
def test_retraining_ignores_the_shipped_model_and_rebuilds_the_same_weights(shipped, monkeypatch):
    monkeypatch.setenv(RETRAIN_ENV, "1")
    root = shipped["root"]
    runner = Runner("supervised", "smoke", runs_dir=root / "runs3", cache_dir=shipped["cache"], plan=SHIPS,
                    shipped_dir=root / "again")
    record = runner.trained_model(shipped["cfg"], shipped["data"], name="nextlocmoe_ranking-synthetic-default")
    assert runner.trained == 1 and record["origin"] == "trained"
    first = tensors(shipped["folder"] / "model.safetensors")
    second = tensors(root / "again" / "smoke" / "nextlocmoe_ranking-synthetic-default" / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.slow
def test_a_model_asked_not_to_be_shipped_is_trained_but_not_exported(shipped):
    """The zero-shot ranking sources (experiments.zero_shot.UNSHIPPED_SOURCES) train in every reproduction: a runner
    that ships its experiment's models leaves them out when asked (ship=False)."""
    root = shipped["root"]
    runner = Runner("supervised", "smoke", runs_dir=root / "runs4", cache_dir=shipped["cache"], plan=SHIPS,
                    shipped_dir=root / "not_shipped")
    record = runner.trained_model(shipped["cfg"], shipped["data"], name="kept-out", ship=False)
    assert runner.trained == 1 and record["origin"] == "trained" and "shipped" not in record
    assert not (root / "not_shipped" / "smoke" / "kept-out").exists()


def test_the_shipped_models_fit_in_100_mib():
    assert COMMITTED, "the cpu profile ships its supervised and zero-shot models in checkpoints/cpu/"
    size = sum((p.parent / "model.safetensors").stat().st_size for p in COMMITTED)
    assert size <= 100 * 2 ** 20, f"{size / 2 ** 20:.1f} MiB"


@pytest.mark.slow
@pytest.mark.parametrize("record_path", COMMITTED, ids=[p.parent.name for p in COMMITTED])
def test_each_shipped_model_reproduces_its_committed_check(record_path):
    """Loads the shipped weights (checked against their record) and re-evaluates the first test windows."""
    record = json.loads(record_path.read_text())
    cfg = load_config("cpu")
    handle = named_handle(record["dataset"], cfg)
    assert json.loads(json.dumps(handle.fingerprint, default=str)) == record["data"], "trained on other data"
    got, want = check_metrics(record_path.parent, handle.windows), record["check"]["metrics"]
    assert got.keys() == want.keys()
    # Hit@k and n exactly; the rest to float noise: a regression point moves by millimetres between
    # thread counts, and two near-tied scores thousands of places down the ranking can swap (MRR moves by ~1e-10)
    exact = [k for k in want if k.startswith("hit@") and not k.endswith(("_lo", "_hi"))] + ["n"]
    assert {k: got[k] for k in exact} == {k: want[k] for k in exact}
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    for k, v in record["float32"]["test"].items():
        if k.startswith("hit@") and not k.endswith(("_lo", "_hi")):
            assert abs(record["test"][k] - v) <= AGREEMENT, k
