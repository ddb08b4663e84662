"""Run directories: the budget subsample a run trains on, its checkpoints, and `load_run` that rebuilds it.

A run directory (written by `nextlocmoe.train.train`) holds config.yaml (the resolved configuration),
best.pt and last.pt (trainable weights only: the frozen backbone is rebuilt from its source), model.safetensors
(the best weights again, in the ecosystem's format, with their provenance as metadata), history.csv, steps.csv and
metrics.json. `load_run(run_dir)` is the one way back from such a directory to (config, model, windows):
evaluation, zero-shot transfer and the routing analysis all call it; it reads model.safetensors where there is
one.

model.safetensors is the file to hand to someone else: reading it runs no code (safetensors holds tensors and
a string-to-string header only), and `read_weights` / `check_weights` turn a truncated or corrupted file, or one
whose configuration hash, parameter names or shapes differ from the model it is loaded into, into one error that
names the file, what differs and the command that retrains it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import ExperimentConfig, config_hash
from .data.prepare import prepare
from .data.windows import Windows
from .errors import ConfigError, NextLocMoEError
from .io import atomic_path
from .model import NextLocMoE, build_model
from .runtime import pick_device


def limited(windows: Windows, cfg: ExperimentConfig) -> Windows:
    """The seeded subsamples of the train section's budget: max_train_windows, max_eval_windows (validation) and
    max_test_windows (test; None = the validation cap); a cap of None keeps the whole split."""
    t = cfg.train
    test_cap = t.max_test_windows if t.max_test_windows is not None else t.max_eval_windows
    for split, cap in (("train", t.max_train_windows), ("val", t.max_eval_windows), ("test", test_cap)):
        if cap is not None:
            windows = windows.subsample(split, cap, seed=t.seed)
    return windows


def stored_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint of `model` holds, by name: the trainable parameters (the frozen backbone is rebuilt from its
    source, not stored) and the buffers a module lists in its `stored_buffers` attribute (values set from the
    training data before training, such as the regression origin's time prior, that no gradient moves)."""
    tensors = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for prefix, module in model.named_modules():
        for name in getattr(module, "stored_buffers", ()):
            tensors[f"{prefix}.{name}" if prefix else name] = getattr(module, name)
    return tensors


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint stores (`stored_tensors`), detached copies on the CPU."""
    return {n: t.detach().cpu().clone() for n, t in stored_tensors(model).items()}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    tensors = stored_tensors(model)
    if set(state) != set(tensors):
        missing, extra = sorted(set(tensors) - set(state))[:3], sorted(set(state) - set(tensors))[:3]
        raise NextLocMoEError(f"checkpoint does not match the model: missing {missing}, unexpected {extra}; "
                              "was it written by a different config?")
    with torch.no_grad():
        for n, t in state.items():
            tensors[n].copy_(t.to(tensors[n].device, tensors[n].dtype))


def save_checkpoint(path: Path, obj: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint of `save_checkpoint` (tensors, numbers, strings, lists and dicts), read with torch's
    weights-only unpickler: a file someone else wrote cannot run code on this machine. Anything else in it, or a
    truncated or corrupted file, is one clear error naming the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:   # torch raises UnpicklingError, RuntimeError or EOFError depending on the damage
        raise NextLocMoEError(f"{path} is not a checkpoint this library can read safely (tensors, numbers, "
                              f"strings, lists and dicts only): {type(err).__name__}: {str(err).splitlines()[0]}; "
                              "retrain it, or resume in a new output directory") from None


WEIGHTS_FILE = "model.safetensors"
METADATA_KEY = "nextlocmoe"     # the header entry holding the provenance (a JSON string)


def save_weights(path: str | os.PathLike, state: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
    """Atomically write trainable weights as safetensors, `metadata` (JSON-serialisable: config_hash, provenance)
    in the header. Tensors are stored contiguous, in their own dtype."""
    tensors = {name: t.detach().cpu().contiguous() for name, t in state.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True, default=str)})
    return Path(path)


def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, metadata) of a `save_weights` file; a missing, truncated or corrupted file, or one without this
    library's header, is one NextLocMoEError naming it."""
    path = Path(path)
    if not path.is_file():
        raise NextLocMoEError(f"{path} does not exist; expected trainable weights written by nextlocmoe train")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:      # one read: header and tensors
            metadata = json.loads((f.metadata() or {})[METADATA_KEY])
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, KeyError, ValueError) as err:
        raise NextLocMoEError(f"{path} is not a weights file this library wrote (truncated, corrupted or another "
                              f"format: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                              "retrain it (`nextlocmoe train`)") from None
    return tensors, metadata


def check_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], metadata: dict[str, Any],
                  path: str | os.PathLike, cfg: ExperimentConfig | None = None, retrain: str = "nextlocmoe train") -> None:
    """Refuse weights that do not belong to `model` (and to `cfg`, when given): a different configuration hash,
    missing or unexpected parameter names, or other shapes. One error names the file, what differs and `retrain`."""
    problems = []
    if cfg is not None and metadata.get("config_hash") not in (None, config_hash(cfg)):
        problems.append(f"it was trained with configuration {metadata.get('config_hash')}, this one is "
                        f"{config_hash(cfg)}")
    expected = {n: tuple(t.shape) for n, t in stored_tensors(model).items()}
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing:
        problems.append(f"missing parameters {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    if extra:
        problems.append(f"unexpected parameters {extra[:3]}{' ...' if len(extra) > 3 else ''}")
    shapes = [f"{n} {tuple(state[n].shape)} (model: {expected[n]})" for n in sorted(set(expected) & set(state))
              if tuple(state[n].shape) != expected[n]]
    if shapes:
        problems.append(f"other shapes: {shapes[:3]}{' ...' if len(shapes) > 3 else ''}")
    if problems:
        raise NextLocMoEError(f"{path} does not fit this model: {'; '.join(problems)}. The code or the "
                              f"configuration changed since it was trained; retrain it: `{retrain}`")


def read_run_config(run_dir: str | os.PathLike) -> ExperimentConfig:
    """The configuration a run directory was trained with (its config.yaml)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise NextLocMoEError(f"{path} does not exist; expected a run directory written by nextlocmoe train "
                              "(config.yaml, best.pt, steps.csv, metrics.json)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    return ExperimentConfig.from_dict(raw)


class LoadedRun(NamedTuple):
    config: ExperimentConfig
    model: NextLocMoE            # in eval mode, best checkpoint loaded, on `device`
    windows: Windows             # after `limited`: the same seeded val/test subsamples that training evaluated


def load_run(run_dir: str | os.PathLike, windows: Windows | None = None, *, cfg: ExperimentConfig | None = None,
             cache_dir: str | os.PathLike = ".cache/windows", device: str | torch.device | None = "auto") -> LoadedRun:
    """Rebuild the model of a run directory with its best checkpoint, exactly as training tested it.

    windows  the dataset's windows; None prepares them from the run's data config (cached in `cache_dir`).
             Zero-shot region models were trained on filtered data that prepare() cannot rebuild: pass those.
    cfg      the configuration to rebuild (default: the run's config.yaml)
    """
    run_dir = Path(run_dir)
    cfg = cfg if cfg is not None else read_run_config(run_dir)
    best_path, weights_path = run_dir / "best.pt", run_dir / WEIGHTS_FILE
    if not best_path.is_file() and not weights_path.is_file():
        raise NextLocMoEError(f"{best_path} does not exist; the run in {run_dir} finished no epoch "
                              "(train first, or resume it with --resume)")
    if windows is None:
        windows = prepare(cfg.data, cache_dir=cache_dir)
    windows = limited(windows, cfg)
    torch.manual_seed(cfg.train.seed)       # the fixed random parts of the model (as in train)
    model = build_model(cfg.model, windows.stats, windows.candidates, windows.candidate_function,
                        windows.history + windows.current)
    if weights_path.is_file():
        state, metadata = read_weights(weights_path)
        check_weights(model, state, metadata, weights_path, cfg,
                      retrain=f"nextlocmoe train --profile {cfg.profile} --out {run_dir}")
    else:
        state = load_checkpoint(best_path)["model"]
    load_trainable_state(model, state)
    return LoadedRun(cfg, model.to(pick_device(device)).eval(), windows)
