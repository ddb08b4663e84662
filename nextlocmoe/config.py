"""Experiment configuration: data + model + training, named profiles, YAML round-trip.

A profile is a complete, named configuration:

    smoke  tiny random LLaMA, small synthetic city: seconds; what CI runs
    cpu    New York check-ins + SmolLM2-135M (12 of 30 layers), subsampled to finish on 2 cores
    gpu    New York check-ins, all windows, SmolLM2 12 layers, bf16 on one GPU
    paper  HuMob Kumamoto (city D) + LLaMA-3.2-3B (12 of 28 layers): for users who hold both

`load_config(profile, path=None, overrides=...)` starts from the profile and applies a YAML file and then
dotted overrides (`train.epochs=3`), so every run is fully described by one YAML file it writes beside
its results.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .data.config import DataConfig, SyntheticConfig
from .errors import ConfigError
from .io import plain
from .model.config import ModelConfig


@dataclass
class TrainConfig:
    lr: float = 2e-4                 # reference, Kumamoto (Shanghai: 1e-3)
    weight_decay: float = 0.01       # reference Adam weight decay
    batch_size: int = 32             # reference per-GPU batch (x 5 GPUs)
    grad_accum: int = 4              # reference gradient accumulation
    epochs: int = 50                 # reference
    clip_norm: float = 1.0           # gradient clipping (reference clips; value ours)
    plateau_factor: float = 0.5      # ReduceLROnPlateau factor (reference)
    plateau_patience: int = 2        # ReduceLROnPlateau patience in epochs (reference)
    early_stop_patience: int = 5     # stop after this many epochs without a better validation Hit@10 (ours)
    max_train_windows: int | None = None  # subsample the training split (CPU budget); None = all
    max_eval_windows: int | None = None   # subsample validation and test; None = all
    eval_batch_size: int = 64
    mixed_precision: str = "auto"    # "auto" (bf16 on GPU, fp32 on CPU), "no" or "bf16"
    seed: int = 0                    # reference seed


@dataclass
class ExperimentConfig:
    profile: str = "cpu"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(plain(self.to_dict()), sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExperimentConfig":
        return from_dict(cls, d)


# ---------------------------------------------------------------------------------------------------
# profiles

def _smoke() -> ExperimentConfig:
    return ExperimentConfig(
        profile="smoke",
        data=DataConfig(source="synthetic",
                        synthetic=SyntheticConfig(grid=12, users=60, days=14)),
        model=ModelConfig(backbone="tiny", num_layers=4, pmoe_layers=(1, 3)),
        train=TrainConfig(lr=2e-3, batch_size=16, grad_accum=1, epochs=2, max_train_windows=256,
                          max_eval_windows=128, eval_batch_size=64),
    )


def _cpu() -> ExperimentConfig:
    return ExperimentConfig(
        profile="cpu",
        data=DataConfig(source="nyc_foursquare"),
        model=ModelConfig(backbone="smollm2", num_layers=12, pmoe_layers=(8, 10)),
        # 2 CPU cores train ~4-5 samples/s with the 101-token prompt: 2,000 training windows (of 31,768) for 2
        # epochs, 500 validation and 500 test windows (seeded subsamples) keep one run near 15 minutes
        train=TrainConfig(lr=1e-3, batch_size=32, grad_accum=1, epochs=2, max_train_windows=2000,
                          max_eval_windows=500, early_stop_patience=2),
    )


def _gpu() -> ExperimentConfig:
    return ExperimentConfig(
        profile="gpu",
        data=DataConfig(source="nyc_foursquare"),
        model=ModelConfig(backbone="smollm2", num_layers=12, pmoe_layers=(8, 10)),
        train=TrainConfig(lr=1e-3, batch_size=64, grad_accum=1, epochs=20, mixed_precision="bf16",
                          eval_batch_size=256),
    )


def _paper() -> ExperimentConfig:
    return ExperimentConfig(
        profile="paper",
        data=DataConfig(source="humob", path="data/cityD-dataset.csv"),
        model=ModelConfig(backbone="meta-llama/Llama-3.2-3B", num_layers=12, pmoe_layers=(8, 10)),
        train=TrainConfig(lr=2e-4, batch_size=32, grad_accum=4, epochs=50, mixed_precision="bf16"),
    )


PROFILES = {"smoke": _smoke, "cpu": _cpu, "gpu": _gpu, "paper": _paper}


def load_config(profile: str = "cpu", path: str | Path | None = None,
                overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Profile defaults, then a YAML file's values, then `section.field=value` overrides."""
    if profile not in PROFILES:
        raise ConfigError(f"--profile '{profile}' is unknown; expected one of {list(PROFILES)}")
    cfg = plain(PROFILES[profile]().to_dict())
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections (data, model, train)")
        _merge(cfg, loaded, str(path))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override '{item}' must look like section.field=value")
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            if not isinstance(node.get(p), dict):
                raise ConfigError(f"override '{item}': '{p}' is not a config section")
            node = node[p]
        if leaf not in node:
            raise ConfigError(f"override '{item}': unknown field '{leaf}'; known: {sorted(node)}")
        parsed = yaml.safe_load(value)
        if isinstance(node[leaf], str) and isinstance(parsed, (bool, int, float)):
            parsed = value       # a text field keeps the text: YAML would read "no" as False, "1e-3" as a float
        node[leaf] = parsed
    return from_dict(ExperimentConfig, cfg)


# ---------------------------------------------------------------------------------------------------
# dataclass <-> plain dict


def _merge(base: dict, new: dict, where: str) -> None:
    for k, v in new.items():
        if k not in base:
            raise ConfigError(f"{where}: unknown config key '{k}'; known: {sorted(base)}")
        if isinstance(base[k], dict) and isinstance(v, dict):
            _merge(base[k], v, where)
        else:
            base[k] = v


def from_dict(cls: type, d: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from a plain dict, recursively; unknown keys are errors."""
    if not isinstance(d, dict):
        raise ConfigError(f"config section '{where or cls.__name__}' must be a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ConfigError(f"config section '{where or cls.__name__}': unknown keys {sorted(unknown)}; "
                          f"known: {sorted(names)}")
    kwargs = {}
    for name, value in d.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}.{name}" if where else name)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, where) if len(args) == 1 else value
    if origin is tuple and isinstance(value, (list, tuple)):
        return tuple(value)
    if tp is float and isinstance(value, int):
        return float(value)
    return value
