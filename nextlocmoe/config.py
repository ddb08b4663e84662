"""Experiment configuration: data + model + training + the experiment plan, one named profile table.

A profile is ONE complete configuration, defined here and nowhere else:

    smoke  tiny random LLaMA, small synthetic city: seconds; what CI runs
    cpu    New York check-ins + SmolLM2-135M (12 of 30 layers), subsampled to finish on 2 cores
    gpu    New York check-ins, all windows, SmolLM2 12 layers, bf16 on one GPU
    paper  HuMob Kumamoto (city D) + LLaMA-3.2-3B (12 of 28 layers): for users who hold both

Its four sections are `data` (nextlocmoe.data.config), `model` (nextlocmoe.model.config), `train` (the budget
and recipe of every trained model: `nextlocmoe train` and the supervised/zero-shot jobs of `nextlocmoe run`
read the same section, so they train the same model) and `plan` (what the experiments run beyond that: the
datasets, the ablation groups and their training changes, the baselines' epochs, the efficiency sweeps).

Order of precedence, lowest first (`load_config(profile, path, overrides)`):
    1. the profile below;
    2. a YAML file (`--config FILE`) with any of the four sections;
    3. dotted overrides (`--set train.epochs=3`, `--set plan.ablations=[routing]`), in the order given.
Each run writes the resolved configuration beside its results (config.yaml), so a run is described by one file.
`config_hash(cfg)` identifies a trained model: it hashes data, model and train (not the plan, not the profile
name), so two commands that resolve to the same training share one hash and one cached model.
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
from .io import plain, stable_hash
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
    max_train_windows: int | None = None  # seeded subsample of the training split (CPU budget); None = all
    max_eval_windows: int | None = None   # seeded subsample of validation (and of test, unless max_test_windows); None = all
    max_test_windows: int | None = None   # seeded subsample of test; None = the same cap as max_eval_windows
    windows_per_epoch: int | None = None  # None: an epoch is one pass over the training windows; K: an "epoch" is
                                          # the next K windows of a stream of seeded passes, so a budget of N windows
                                          # gets N / K validation points (and checkpoints, early stopping) (ours)
    eval_batch_size: int = 64
    mixed_precision: str = "auto"    # "auto" (bf16 on GPU, fp32 on CPU), "no" or "bf16"
    seed: int = 0                    # reference seed

    def __post_init__(self) -> None:
        for name in ("max_train_windows", "max_eval_windows", "max_test_windows", "windows_per_epoch"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and value >= 1):
                raise ConfigError(f"train.{name}={value!r} is invalid; expected null or an integer >= 1")


BASELINE_BUDGET_FIELDS = ("epochs", "patience", "train_windows")   # what plan.baseline_budgets may change

ALL_ABLATIONS = ("no_location_moe", "no_personalized_moe", "no_history_router", "routing", "renormalize", "experts",
                 "depth", "backbone_init", "head", "pointer", "next_visit_time", "prompt", "prompt_history")


@dataclass
class PlanConfig:
    """What the experiments of `nextlocmoe run` add to the training section (nextlocmoe/experiments/)."""
    datasets: tuple[str, ...] = ("nyc", "synthetic")  # supervised datasets; the first is also the ablation,
                                                     # efficiency and `nextlocmoe train` default dataset
    baseline_epochs: int = 20        # at most this many epochs of the neural baselines (LSTM, transformer(+pointer))
    baseline_patience: int = 2       # ... stopped after this many epochs without a better validation Hit@10
    baseline_train_windows: int | None = None  # training windows of every classical baseline; None = all of them
    baseline_budgets: dict[str, dict[str, Any]] = field(default_factory=dict)  # per neural baseline, the budget
                                     # fields that differ from the three above ("epochs", "patience",
                                     # "train_windows"), e.g. read off its learning curve; {} = the plan's
    ablations: tuple[str, ...] = ALL_ABLATIONS  # ablation groups to run (nextlocmoe/experiments/ablations.py)
    ablation_train: dict[str, Any] = field(default_factory=dict)  # train-section fields the ablation variants
                                     # change (e.g. {"epochs": 10}); {} = the supervised budget, so the "full"
                                     # variant is the supervised model itself
    zero_shot_train: dict[str, Any] = field(default_factory=dict)  # the same for the zero-shot models (trained on
                                     # a source half or city, and the "trained on target" reference)
    expert_counts: tuple[int, ...] = (1, 5, 11)  # role experts compared by the "experts" group (paper: 11)
    depths: tuple[int, ...] = (4, 8, 12)         # backbone depths compared by the "depth" group (paper: 12)
    ablation_head: str = "auto"      # "auto" (higher validation Hit@10 of the supervised models), "regression"
                                     # or "ranking"
    region_dataset: str = "nyc"      # the dataset split into west / east halves for zero-shot
    llm_mob_samples: int = 500       # test windows the LLM-Mob-style baseline answers (generation is slow)
    llm_mob_history: int = 40        # history records written into its prompt (paper S_h = 40)
    batch_sweep: tuple[int, ...] = (1, 32, 256, 1024)  # inference batch sizes timed by the efficiency experiment
    generation_batches: tuple[int, ...] = (1, 16, 64)  # LLM-Mob generation batch sizes timed
    repeats: int = 10                # timed repeats after one warm-up; the median is reported
    large_backbone_batches: tuple[int, ...] = (32, 256)  # GPU only: LLaMA-3.2-3B-shaped overhead measurement
    generation_prompt_tokens: int | None = None  # LLM-Mob prompt length when the generator is a stand-in without
                                     # SmolLM2's tokenizer (compact backbone); None = measured from real prompts
    shipped_experiments: tuple[str, ...] = ()  # experiments whose trained models are written to
                                     # checkpoints/<profile>/ when trained (nextlocmoe/shipped.py); every experiment
                                     # reads a shipped model whose training key matches instead of training it

    def baseline_budget(self, name: str) -> dict[str, Any]:
        """The budget of one neural baseline: {"epochs", "patience", "train_windows"}, the plan's unless
        `baseline_budgets` names this baseline."""
        budget = {"epochs": self.baseline_epochs, "patience": self.baseline_patience,
                  "train_windows": self.baseline_train_windows}
        return {**budget, **self.baseline_budgets.get(name, {})}

    def validate(self) -> "PlanConfig":
        """Checks that need no registry; the experiments check names (datasets, ablation groups) themselves."""
        checks = [
            ("datasets", len(self.datasets) >= 1, "at least one dataset name"),
            ("baseline_epochs", self.baseline_epochs >= 1, "an integer >= 1"),
            ("baseline_patience", self.baseline_patience >= 1, "an integer >= 1"),
            ("baseline_train_windows", self.baseline_train_windows is None or self.baseline_train_windows >= 1,
             "null (all) or an integer >= 1"),
            ("ablation_train", isinstance(self.ablation_train, dict) and set(self.ablation_train) <= _TRAIN_FIELDS,
             f"a mapping of train fields {sorted(_TRAIN_FIELDS)}"),
            ("zero_shot_train", isinstance(self.zero_shot_train, dict) and set(self.zero_shot_train) <= _TRAIN_FIELDS,
             f"a mapping of train fields {sorted(_TRAIN_FIELDS)}"),
            ("baseline_budgets", isinstance(self.baseline_budgets, dict) and all(
                isinstance(b, dict) and set(b) <= set(BASELINE_BUDGET_FIELDS) for b in self.baseline_budgets.values()),
             f"a mapping of baseline names to mappings of {list(BASELINE_BUDGET_FIELDS)}"),
            ("expert_counts", all(isinstance(n, int) and 1 <= n <= 11 for n in self.expert_counts), "integers 1..11"),
            ("depths", all(isinstance(n, int) and n >= 1 for n in self.depths), "integers >= 1"),
            ("ablation_head", self.ablation_head in ("auto", "regression", "ranking"), "auto, regression or ranking"),
            ("llm_mob_samples", self.llm_mob_samples >= 1, "an integer >= 1"),
            ("llm_mob_history", self.llm_mob_history >= 0, "an integer >= 0"),
            ("batch_sweep", len(self.batch_sweep) >= 1 and all(b >= 1 for b in self.batch_sweep), "batch sizes >= 1"),
            ("generation_batches", len(self.generation_batches) >= 1 and all(b >= 1 for b in self.generation_batches),
             "batch sizes >= 1"),
            ("repeats", self.repeats >= 1, "an integer >= 1"),
            ("shipped_experiments", set(self.shipped_experiments) <= {"supervised", "zero_shot", "ablations"},
             "names from ['supervised', 'zero_shot', 'ablations']"),
            ("generation_prompt_tokens", self.generation_prompt_tokens is None or self.generation_prompt_tokens >= 1,
             "None or an integer >= 1"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ConfigError(f"plan.{name}={getattr(self, name)!r} is invalid; expected {expected}")
        return self


_TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


@dataclass
class ExperimentConfig:
    profile: str = "cpu"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(plain(self.to_dict()), sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExperimentConfig":
        return from_dict(cls, d)


def training_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """What decides a trained model: data, model and train (not the plan, not the profile's name)."""
    return plain({"data": dataclasses.asdict(cfg.data), "model": dataclasses.asdict(cfg.model),
                  "train": dataclasses.asdict(cfg.train)})


def config_hash(cfg: ExperimentConfig) -> str:
    """The identity of one training run (see the module docstring)."""
    return stable_hash(training_dict(cfg))


# ---------------------------------------------------------------------------------------------------
# the profile table

def _smoke() -> ExperimentConfig:
    # Tiny random backbone, a 12 x 12 synthetic city: each experiment in well under two minutes on 2 cores.
    # "backbone_init" is left out: the tiny backbone is random already, so both variants would be one model.
    return ExperimentConfig(
        profile="smoke",
        data=DataConfig(source="synthetic", synthetic=SyntheticConfig(grid=12, users=60, days=14)),
        model=ModelConfig(backbone="tiny", num_layers=4, pmoe_layers=(1, 3)),
        train=TrainConfig(lr=2e-3, batch_size=16, grad_accum=1, epochs=1, max_train_windows=32,
                          max_eval_windows=32, eval_batch_size=64),
        plan=PlanConfig(datasets=("synthetic",), baseline_epochs=1,
                        ablations=tuple(a for a in ALL_ABLATIONS if a != "backbone_init"),
                        expert_counts=(1, 5, 11), depths=(2, 4, 6), region_dataset="synthetic",
                        llm_mob_samples=4, llm_mob_history=10, batch_sweep=(1, 4, 16), generation_batches=(1, 4),
                        repeats=3),
    )


def _cpu() -> ExperimentConfig:
    # New York check-ins + SmolLM2 (12 of 30 layers) on 2 CPU cores, the whole reproduction (every notebook) in
    # about an hour on a 2-core AVX2 machine (~5-6 training and ~14 inference samples/s per LLM-based model with the
    # shared prompt, benchmarks/bench_model.py). Where the hour goes: the supervised table's six LLM-based models
    # (3 periods x 256 training windows each: three validation points on 250 windows, test on 2,000 windows, the
    # same 2,000 for every method, +-2 points at 95%); the ablations and the zero-shot models train on 320 windows
    # once and test on 2,000 too (paired tests against the full model / the transferred scorer); the classical baselines fit 4,096
    # training windows, the neural ones for at most 5 epochs with early stopping on validation. These are budget
    # numbers, not the paper's: the gpu profile trains on all windows.
    small = {"max_train_windows": 320, "windows_per_epoch": None, "epochs": 1, "max_test_windows": 2000}
    return ExperimentConfig(
        profile="cpu",
        data=DataConfig(source="nyc_foursquare"),
        model=ModelConfig(backbone="smollm2", num_layers=12, pmoe_layers=(8, 10), prompt_reads_history=False),
        train=TrainConfig(lr=1e-3, batch_size=32, grad_accum=1, epochs=3, max_train_windows=768,
                          windows_per_epoch=256, max_eval_windows=250, max_test_windows=2000,
                          early_stop_patience=3),
        plan=PlanConfig(datasets=("nyc", "synthetic"), baseline_epochs=5, baseline_patience=2,
                        baseline_train_windows=4096,
                        # read off its learning curves (results/learning_curve.md): on New York its validation
                        # Hit@1 and MRR still rise through three passes over all 31,768 training windows, on the
                        # synthetic city they flatten within one pass and stay there; a fixed budget, the last epoch
                        # kept (validation Hit@10 on 250 windows, the early-stopping rule, does not see the gain)
                        baseline_budgets={"transformer_pointer": {"train_windows": None, "epochs": 3, "patience": None}},
                        ablations=("no_location_moe", "no_personalized_moe", "pointer", "next_visit_time", "renormalize",
                                   "prompt_history"),
                        ablation_train=small,
                        zero_shot_train=small, expert_counts=(1, 11), depths=(4, 12),
                        region_dataset="nyc", llm_mob_samples=10, llm_mob_history=40, batch_sweep=(1, 8, 32),
                        generation_batches=(1, 4), repeats=2, shipped_experiments=("supervised", "zero_shot")),
    )


def _gpu() -> ExperimentConfig:
    return ExperimentConfig(
        profile="gpu",
        data=DataConfig(source="nyc_foursquare"),
        model=ModelConfig(backbone="smollm2", num_layers=12, pmoe_layers=(8, 10)),
        train=TrainConfig(lr=1e-3, batch_size=64, grad_accum=1, epochs=20, mixed_precision="bf16",
                          eval_batch_size=256),
        plan=PlanConfig(datasets=("nyc", "synthetic"), baseline_epochs=20, ablation_train={"epochs": 10},
                        region_dataset="nyc", llm_mob_samples=500),
    )


def _paper() -> ExperimentConfig:
    return ExperimentConfig(
        profile="paper",
        data=DataConfig(source="humob", path="data/cityD-dataset.csv"),
        model=ModelConfig(backbone="meta-llama/Llama-3.2-3B", num_layers=12, pmoe_layers=(8, 10)),
        train=TrainConfig(lr=2e-4, batch_size=32, grad_accum=4, epochs=50, mixed_precision="bf16"),
        plan=PlanConfig(datasets=("humob", "nyc"), baseline_epochs=20, ablation_train={"epochs": 20},
                        region_dataset="nyc", llm_mob_samples=1000),
    )


PROFILES = {"smoke": _smoke, "cpu": _cpu, "gpu": _gpu, "paper": _paper}


def profile_config(profile: str) -> ExperimentConfig:
    """The profile's configuration as defined above (a fresh object)."""
    if profile not in PROFILES:
        raise ConfigError(f"--profile '{profile}' is unknown; expected one of {list(PROFILES)}")
    return PROFILES[profile]()


def load_config(profile: str = "cpu", path: str | Path | None = None,
                overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Profile defaults, then a YAML file's values, then `section.field=value` overrides (module docstring)."""
    cfg = plain(profile_config(profile).to_dict())
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections (data, model, train, plan)")
        _merge(cfg, loaded, str(path), ())
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
        if leaf not in node and tuple(parents) not in FREE_FORM:
            raise ConfigError(f"override '{item}': unknown field '{leaf}'; known: {sorted(node)}")
        parsed = yaml.safe_load(value)
        if isinstance(node.get(leaf), str) and isinstance(parsed, (bool, int, float)):
            parsed = value       # a text field keeps the text: YAML would read "no" as False, "1e-3" as a float
        node[leaf] = parsed
    out = from_dict(ExperimentConfig, cfg)
    out.plan.validate()
    return out


# ---------------------------------------------------------------------------------------------------
# dataclass <-> plain dict


FREE_FORM = {("plan", "ablation_train"), ("plan", "zero_shot_train"), ("plan", "baseline_budgets")}   # mappings whose keys are not fixed by a dataclass


def _merge(base: dict, new: dict, where: str, path: tuple[str, ...]) -> None:
    for k, v in new.items():
        if k not in base:
            raise ConfigError(f"{where}: unknown config key '{k}'; known: {sorted(base)}")
        if isinstance(base[k], dict) and isinstance(v, dict) and (*path, k) not in FREE_FORM:
            _merge(base[k], v, where, (*path, k))
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
