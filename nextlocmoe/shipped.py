"""Shipped models: the trained weights the repository carries, found by their training key, checked on the way in.

The published profile's trained models live in checkpoints/<profile>/<name>/ (name = method-dataset-variant of
the first job that trained it), one folder per model:

    model.safetensors  the trainable weights only (the frozen backbone is rebuilt from its package), stored in
                       bfloat16 where that changes no test metric by more than AGREEMENT (else float32; scalars
                       always float32), with their provenance in the header; reading it runs no code
    model.json         the record the experiments read: the training key, configuration hash, validation and test
                       metrics OF THESE WEIGHTS (the tables' numbers), the float32 run's metrics beside them, the
                       check (metrics of the first CHECK_WINDOWS test windows), the file's size and sha256,
                       provenance (code hash, data checksum, seed, device, wall time, training windows)
    config.yaml        the resolved training configuration
    history.csv, steps.csv   the training curve (validation points; training batches)

`export_model` writes such a folder from a train() run directory (runs/experiments/models/...); `install_model`
copies one into the run cache after checking the file against its record, so evaluation, the routing analysis and
zero-shot transfer read it exactly as they read a model trained here. `Runner.trained_model` (experiments/core.py)
looks a model up here by its key before it trains; `make retrain` (NEXTLOCMOE_RETRAIN=1) ignores what is shipped
and rebuilds it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from .config import ExperimentConfig, config_hash
from .data.windows import Windows
from .errors import NextLocMoEError
from .evaluation import rank_split
from .io import atomic_path, file_sha256, provenance, write_json_atomic
from .runs import WEIGHTS_FILE, load_run, read_weights, save_weights
from .runtime import pick_device

SHIPPED_DIR = "checkpoints"            # relative to the project root, like results/ and figures/
RECORD_FILE = "model.json"
COPIED_FILES = ("config.yaml", "history.csv", "steps.csv")
STORAGE_DTYPE = torch.bfloat16
AGREEMENT = 0.002                      # bf16 storage is kept when no test Hit@k moves by more than 0.2 points
CHECK_WINDOWS = 200                    # the test windows a fast test re-evaluates (the first ones, same batches)
RETRAIN_ENV = "NEXTLOCMOE_RETRAIN"     # "1": ignore shipped models, train them again (make retrain)
RETRAIN_COMMAND = "make retrain"


def retraining() -> bool:
    return os.environ.get(RETRAIN_ENV, "") not in ("", "0")


def shipped_index(root: str | os.PathLike) -> dict[str, Path]:
    """{training key: folder} of the shipped models under `root` (checkpoints/<profile>); none is {}."""
    index: dict[str, Path] = {}
    for record_path in sorted(Path(root).glob(f"*/{RECORD_FILE}")):
        try:
            key = json.loads(record_path.read_text())["key"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise NextLocMoEError(f"{record_path} is not a shipped model's record (JSON with a 'key'); restore it "
                                  f"from git or rebuild the shipped models: `{RETRAIN_COMMAND}`") from None
        index[key] = record_path.parent
    return index


def _test_hits(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k.startswith("hit@") and not k.endswith(("_lo", "_hi"))}


def _evaluate(cfg: ExperimentConfig, folder: Path, windows: Windows) -> dict[str, Any]:
    """Validation and test metrics of the weights in `folder`, and the check: the first CHECK_WINDOWS test ones."""
    run = load_run(folder, windows, cfg=cfg)
    device, batch = pick_device(), cfg.train.eval_batch_size
    test = rank_split(run.model, run.windows, "test", batch, device, desc="shipped test")
    return {"val": rank_split(run.model, run.windows, "val", batch, device, desc="shipped val").metrics(),
            "test": test.metrics(), "test_ranks": test.rank.tolist(),
            "check": {"windows": min(CHECK_WINDOWS, len(test.rank)), "metrics": test.first(CHECK_WINDOWS).metrics()}}


def check_metrics(folder: str | os.PathLike, windows: Windows) -> dict[str, float]:
    """Re-evaluate a shipped model on its first CHECK_WINDOWS test windows (what its record's check holds)."""
    folder = Path(folder)
    run = load_run(folder, windows)
    return rank_split(run.model, run.windows, "test", run.config.train.eval_batch_size, pick_device(),
                      max_windows=CHECK_WINDOWS, desc="check").metrics()


def export_model(run_dir: str | os.PathLike, record: dict[str, Any], cfg: ExperimentConfig, windows: Windows,
                 dest: str | os.PathLike, name: str) -> dict[str, Any]:
    """Ship the best weights of train() run `run_dir` to `dest`; returns the shipped record (see module docstring).

    The weights are stored in bfloat16 and evaluated again; if a test Hit@k moved by more than AGREEMENT from the
    float32 run's, they are stored in float32 instead. The run directory's model.safetensors is replaced by the
    shipped file, so a model trained here and one installed from the repository are read identically."""
    run_dir, dest = Path(run_dir), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    state, metadata = read_weights(run_dir / WEIGHTS_FILE)
    for filename in COPIED_FILES:
        with atomic_path(dest / filename) as tmp:
            shutil.copyfile(run_dir / filename, tmp)
    float32 = record.get("float32") or {"val": record["val"], "test": record["test"]}
    for dtype in (STORAGE_DTYPE, torch.float32):
        # scalars (the time priors, gate biases) stay float32: they cost nothing, and rounding a time prior to bf16
        # could swap two near-tied places of a window
        stored = {n: t.to(dtype) if t.is_floating_point() and t.numel() > 1 else t for n, t in state.items()}
        save_weights(dest / WEIGHTS_FILE, stored, {**metadata, "storage_dtype": str(dtype).removeprefix("torch.")})
        measured = _evaluate(cfg, dest, windows)
        moved = max((abs(measured["test"][k] - v) for k, v in _test_hits(float32["test"]).items()), default=0.0)
        if moved <= AGREEMENT:
            break
    shipped = {**record, **measured, "float32": float32, "name": name, "origin": "trained",
               "storage_dtype": str(dtype).removeprefix("torch."), "largest_test_hit_change": moved,
               "size_bytes": (dest / WEIGHTS_FILE).stat().st_size, "sha256": file_sha256(dest / WEIGHTS_FILE),
               "provenance": provenance(cfg.profile, seed=cfg.train.seed,
                                        data_checksum=windows.meta.get("checksum"),
                                        config_hash=config_hash(cfg), train_wall_s=record.get("train_wall_s"),
                                        train_windows=metadata.get("train_windows"),
                                        trained_on=metadata.get("device"))}
    shipped.pop("dir", None)
    write_json_atomic(dest / RECORD_FILE, shipped)       # last: a folder with its record is complete
    with atomic_path(run_dir / WEIGHTS_FILE) as tmp:
        shutil.copyfile(dest / WEIGHTS_FILE, tmp)
    return shipped


def install_model(folder: str | os.PathLike, model_dir: str | os.PathLike) -> dict[str, Any]:
    """Copy shipped model `folder` into run directory `model_dir` after checking its weights file against its
    record (size and sha256: a truncated or corrupted file is one error naming it); the record, origin 'shipped'."""
    folder, model_dir = Path(folder), Path(model_dir)
    record = json.loads((folder / RECORD_FILE).read_text())
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise NextLocMoEError(f"{weights} is missing; restore it from git or rebuild it: `{RETRAIN_COMMAND}`")
    size, digest = weights.stat().st_size, file_sha256(weights)
    if size != record.get("size_bytes") or digest != record.get("sha256"):
        raise NextLocMoEError(f"{weights} is not the file its record {folder / RECORD_FILE} describes (size "
                              f"{size} bytes, expected {record.get('size_bytes')}; sha256 {digest[:12]}..., expected "
                              f"{str(record.get('sha256'))[:12]}...): truncated or corrupted; restore it from git "
                              f"(`git checkout -- {folder.as_posix()}`) or rebuild it: `{RETRAIN_COMMAND}`")
    model_dir.mkdir(parents=True, exist_ok=True)
    for filename in (WEIGHTS_FILE, *COPIED_FILES):
        with atomic_path(model_dir / filename) as tmp:
            shutil.copyfile(folder / filename, tmp)
    return {**record, "origin": "shipped", "shipped": folder.as_posix()}
