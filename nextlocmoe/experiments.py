"""Named experiments that regenerate the paper's tables by profile (paper Sec. 5; DESIGN.md Sec. 3, items 3-6).

    supervised   every method x dataset: popularity, user most-frequent, Markov, LSTM, transformer, the
                 NextLocLLM-style model, NextLocMoE (regression head, the paper's method) and NextLocMoE with
                 this project's ranking head; all on the SAME windows, splits, candidates and test subsample
    zero_shot    train on one city (or one half of a city), test on another without fine-tuning
    ablations    NextLocMoE variants, each at the same budget
    efficiency   parameters, training / inference speed, latency and memory; NextLocMoE vs LLM-Mob generation

`run_experiment(name, profile)` (or `supervised(profile)`, ...) runs one experiment and writes
results/<name>.csv (tidy: experiment, method, kind, dataset, variant, metric, value), results/<name>.md (a
readable pivot) and results/<name>.json (provenance: git SHA, profile, device, packages, data checksums,
seed, wall time, the plan and every job). `nextlocmoe run <name> --profile <profile>` is the same from a shell.

Jobs and caching. An experiment is a list of jobs (one method on one dataset in one variant). A job's key
hashes (io.stable_hash) everything that decides its result: the experiment, method, dataset and variant, the
full configuration (data config included) and the raw data's checksum. Its result is kept in
runs/experiments/<experiment>/<job>-<hash>/result.json and reused unless force=True; a changed configuration
gives a new hash, so a stale result is never read. Trained models are cached one level lower, in
runs/experiments/models/<dataset>-<head>-<hash>/ (the train() run directory: checkpoints, history, metrics),
keyed by (configuration, data) alone, so the supervised, zero-shot and ablation experiments share a model
they all need (e.g. NextLocMoE on the synthetic city) instead of training it three times. An interrupted
training resumes from its last epoch. Every file is written atomically.

Plans. A profile fixes the configuration (nextlocmoe.config); its plan fixes what each experiment runs and
at which budget. Budgets are (epochs, training windows, evaluation windows); `--set train.epochs=...` etc.
still override them. This table is `plans_markdown()` (a test keeps the two in step):

| profile | datasets | budget | baseline epochs | ablation budget | ablations | ablation head | zero-shot | LLM-Mob windows | batch sweep | generation batches | repeats |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |
| smoke | synthetic | 1 ep, 32 train / 32 eval | 1 | 1 ep, 32 train / 32 eval | no_location_moe, no_personalized_moe, no_history_router, routing, experts (1/5/11), depth (2/4/6), head, prompt | auto | synthetic A->B, synthetic west->east | 4 | 1/4/16 | 1/4 | 3 |
| cpu | nyc, synthetic | 1 ep, 500 train / 200 eval | 3 | 1 ep, 500 train / 200 eval | no_location_moe, no_personalized_moe, no_history_router, routing, experts (1/11), depth (4/12), backbone_init, head, prompt | auto | synthetic A->B, nyc west->east | 10 | 1/8/32 | 1/4 | 3 |
| gpu | nyc, synthetic | 20 ep, all train / all eval | 20 | 10 ep, all train / all eval | no_location_moe, no_personalized_moe, no_history_router, routing, experts (1/5/11), depth (4/8/12), backbone_init, head, prompt | auto | synthetic A->B, nyc west->east | 500 | 1/32/256/1024 | 1/16/64 | 10 |
| paper | humob, nyc | 50 ep, all train / all eval | 20 | 20 ep, all train / all eval | no_location_moe, no_personalized_moe, no_history_router, routing, experts (1/5/11), depth (4/8/12), backbone_init, head, prompt | auto | synthetic A->B, nyc west->east | 1000 | 1/32/256/1024 | 1/16/64 | 10 |

Decisions (the paper is silent on them):

* Zero-shot normalisation and candidates. The source model keeps the source city's z-score and duration
  statistics: the target's windows are normalised with them (`Windows.stats` swapped), because a model
  trained on one scale has no other; a target city of another extent is then part of the shift that the
  zero-shot number measures. Retrieval uses the TARGET city's candidates (its KD-tree). Zero-shot runs the
  regression head only (NextLocMoE and the NextLocLLM-style model): the ranking head learns one embedding per
  source candidate, which has no meaning in another city, and removing them would test a different model.
* Synthetic A -> B: B has layout_seed + 1, seed + 1 and a larger grid (grid + max(2, grid // 5)).
* City halves ("NYC across regions"): a user's home is their most visited location over all their records
  (ties: the lowest location id); homes strictly west of the median home longitude (x in metres for grid
  data, where there is no longitude) form the source region, all other users the target region. The two
  user sets are disjoint and cover every user; each half is windowed and split on its own (its own training
  statistics), and both keep the whole city's candidate set.
* Reference rows: "trained on target" is NextLocMoE trained and tested on the target (what zero-shot gives
  up); "history only" is the user-most-frequent baseline with its popularity tie-break removed, so it uses
  nothing but the window's own records (no training at all).
* Ablation head: with ablation_head="auto" the plan compares NextLocMoE's two heads on the ablation dataset
  at the supervised budget (training them if needed) and ablates the one with the higher VALIDATION Hit@10
  (never the test split); the choice and both scores are recorded in results/ablations.json.
* Depth ablation: the P-MoE layers keep their distance from the top of the stack (12 layers with P-MoE at
  8 and 10 -> 4 layers at 0 and 2, 8 layers at 4 and 6).
* Efficiency memory: on a GPU, torch.cuda.max_memory_allocated; on a CPU, the process's peak resident set
  size (VmHWM) during the measurement, reset through /proc/self/clear_refs before it (Linux), else the
  process-lifetime ru_maxrss; the results say which.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
import yaml
from tqdm.auto import tqdm

from .baselines import BASELINES, NEURAL_BASELINES, NeuralBaselineConfig, evaluate_baseline, make_baseline
from .config import PROFILES, ExperimentConfig, TrainConfig, load_config
from .data.config import DataConfig
from .data.prepare import key_config, markdown_table, prepare, raw_checksum
from .data.schema import MobilityData
from .data.windows import Windows, make_windows
from .errors import ConfigError, DataError
from .io import device_name, plain, provenance, stable_hash, write_json_atomic, write_text_atomic
from .metrics import metrics_table
from .model.backbone import RANDOM_BACKBONES
from .model.config import ModelConfig
from .train import evaluate, limited, load_trainable_state, resolve_mixed_precision, train

EXPERIMENTS = ("supervised", "zero_shot", "ablations", "efficiency")
JOB_FORMAT_VERSION = 1      # bump when what a job stores changes: every cached result then misses
MODEL_FORMAT_VERSION = 2    # the same for trained models (2: steps.csv)
ID_COLUMNS = ("experiment", "method", "kind", "dataset", "variant")

# ---------------------------------------------------------------------------------------------------
# helpers

def slug(*parts: str) -> str:
    """A file-name-safe job name: letters, digits, '.', '_' and '-' only."""
    return "-".join(re.sub(r"[^A-Za-z0-9._]+", "_", str(p)).strip("_") for p in parts)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------------------------------------------
# plans: what each profile runs, at which budget (the table of the module docstring)

@dataclass(frozen=True)
class Budget:
    epochs: int                      # train.epochs of every NextLocMoE / NextLocLLM run
    train_windows: int | None        # train.max_train_windows (seeded subsample; None = all)
    eval_windows: int | None         # train.max_eval_windows for validation and test (None = all)

    def __str__(self) -> str:
        def n(v: int | None) -> str:
            return "all" if v is None else str(v)
        return f"{self.epochs} ep, {n(self.train_windows)} train / {n(self.eval_windows)} eval"


ABLATION_GROUPS = ("no_location_moe", "no_personalized_moe", "no_history_router", "routing", "experts", "depth",
                   "backbone_init", "head", "prompt")


@dataclass(frozen=True)
class Plan:
    datasets: tuple[str, ...]          # supervised datasets; the first is also the ablation / efficiency dataset
    budget: Budget                     # supervised and zero-shot training budget
    baseline_epochs: int               # epochs of the LSTM and transformer baselines
    ablation_budget: Budget            # budget of every ablation variant
    ablations: tuple[str, ...]         # groups of ABLATION_GROUPS to run
    expert_counts: tuple[int, ...]     # role experts compared by the "experts" group (paper: 11)
    depths: tuple[int, ...]            # backbone depths compared by the "depth" group (paper: 12)
    ablation_head: str                 # "auto" (higher validation Hit@10 in supervised), "regression" or "ranking"
    region_dataset: str                # the dataset split into west / east halves for zero-shot
    llm_mob_samples: int               # test windows the LLM-Mob-style baseline answers (generation is slow)
    llm_mob_history: int               # history records written into its prompt (paper S_h = 40)
    batch_sweep: tuple[int, ...]       # inference batch sizes timed by the efficiency experiment
    generation_batches: tuple[int, ...]  # LLM-Mob generation batch sizes timed
    repeats: int                       # timed repeats after one warm-up; the median is reported
    large_backbone_batches: tuple[int, ...] = (32, 256)  # GPU only: LLaMA-3.2-3B-shaped overhead measurement
    # LLM-Mob prompt length for the generation timing when the generator is a stand-in without SmolLM2's
    # tokenizer (compact backbone); None: measured from this dataset's real prompts
    generation_prompt_tokens: int | None = None

    def validate(self) -> "Plan":
        known = ("synthetic", "nyc", "humob")
        checks = [
            ("datasets", len(self.datasets) >= 1 and all(d in known for d in self.datasets), f"names from {known}"),
            ("baseline_epochs", self.baseline_epochs >= 1, "an integer >= 1"),
            ("ablations", all(a in ABLATION_GROUPS for a in self.ablations), f"groups from {ABLATION_GROUPS}"),
            ("expert_counts", all(isinstance(n, int) and 1 <= n <= 11 for n in self.expert_counts), "integers 1..11"),
            ("depths", all(isinstance(n, int) and n >= 1 for n in self.depths), "integers >= 1"),
            ("ablation_head", self.ablation_head in ("auto", "regression", "ranking"), "auto, regression or ranking"),
            ("region_dataset", self.region_dataset in known, f"one of {known}"),
            ("llm_mob_samples", self.llm_mob_samples >= 1, "an integer >= 1"),
            ("llm_mob_history", self.llm_mob_history >= 0, "an integer >= 0"),
            ("batch_sweep", len(self.batch_sweep) >= 1 and all(b >= 1 for b in self.batch_sweep), "batch sizes >= 1"),
            ("generation_batches", len(self.generation_batches) >= 1 and all(b >= 1 for b in self.generation_batches),
             "batch sizes >= 1"),
            ("repeats", self.repeats >= 1, "an integer >= 1"),
            ("generation_prompt_tokens", self.generation_prompt_tokens is None or self.generation_prompt_tokens >= 1,
             "None or an integer >= 1"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ConfigError(f"plan.{name}={getattr(self, name)!r} is invalid; expected {expected}")
        for name in ("budget", "ablation_budget"):
            b = getattr(self, name)
            if not (isinstance(b, Budget) and b.epochs >= 1 and all(v is None or v >= 1 for v in
                                                                    (b.train_windows, b.eval_windows))):
                raise ConfigError(f"plan.{name}={b!r} is invalid; expected Budget(epochs >= 1, windows >= 1 or None)")
        return self


_ALL_ABLATIONS = ABLATION_GROUPS
_GPU_SWEEP = (1, 32, 256, 1024)

PLANS: dict[str, Plan] = {
    # tiny random backbone, a 12 x 12 synthetic city: each experiment in well under two minutes on 2 cores.
    # "backbone_init" is left out: the tiny backbone is random already, so both variants would be one model.
    "smoke": Plan(datasets=("synthetic",), budget=Budget(1, 32, 32), baseline_epochs=1,
                  ablation_budget=Budget(1, 32, 32),
                  ablations=tuple(a for a in _ALL_ABLATIONS if a != "backbone_init"),
                  expert_counts=(1, 5, 11), depths=(2, 4, 6), ablation_head="auto", region_dataset="synthetic",
                  llm_mob_samples=4, llm_mob_history=10, batch_sweep=(1, 4, 16), generation_batches=(1, 4),
                  repeats=3),
    # New York check-ins + SmolLM2 (12 of 30 layers) on 2 CPU cores. The whole cpu reproduction (every
    # notebook, ~19 trained models) must fit 45 minutes there: 2 cores train ~7 samples/s with the 101-token
    # prompt, so each model sees 500 training windows once and is validated / tested on 200 windows (seeded
    # subsamples, the same for every method). The ablation budget equals the supervised one, so the "full"
    # and "other head" variants are the supervised models themselves. These are budget numbers, not the
    # paper's: the gpu profile trains on every window.
    "cpu": Plan(datasets=("nyc", "synthetic"), budget=Budget(1, 500, 200), baseline_epochs=3,
                ablation_budget=Budget(1, 500, 200), ablations=_ALL_ABLATIONS, expert_counts=(1, 11),
                depths=(4, 12), ablation_head="auto", region_dataset="nyc", llm_mob_samples=10,
                llm_mob_history=40, batch_sweep=(1, 8, 32), generation_batches=(1, 4), repeats=3),
    "gpu": Plan(datasets=("nyc", "synthetic"), budget=Budget(20, None, None), baseline_epochs=20,
                ablation_budget=Budget(10, None, None), ablations=_ALL_ABLATIONS, expert_counts=(1, 5, 11),
                depths=(4, 8, 12), ablation_head="auto", region_dataset="nyc", llm_mob_samples=500,
                llm_mob_history=40, batch_sweep=_GPU_SWEEP, generation_batches=(1, 16, 64), repeats=10),
    # HuMob Kumamoto (city D) + LLaMA-3.2-3B, for users who hold both
    "paper": Plan(datasets=("humob", "nyc"), budget=Budget(50, None, None), baseline_epochs=20,
                  ablation_budget=Budget(20, None, None), ablations=_ALL_ABLATIONS, expert_counts=(1, 5, 11),
                  depths=(4, 8, 12), ablation_head="auto", region_dataset="nyc", llm_mob_samples=1000,
                  llm_mob_history=40, batch_sweep=_GPU_SWEEP, generation_batches=(1, 16, 64), repeats=10),
}


def _ablation_label(plan: Plan) -> str:
    labels = []
    for group in plan.ablations:
        if group == "experts":
            labels.append("experts (" + "/".join(map(str, plan.expert_counts)) + ")")
        elif group == "depth":
            labels.append("depth (" + "/".join(map(str, plan.depths)) + ")")
        else:
            labels.append(group)
    return ", ".join(labels)


def plans_table() -> pd.DataFrame:
    """One row per profile: what each experiment runs and at which budget."""
    rows = []
    for profile, plan in PLANS.items():
        rows.append({
            "profile": profile,
            "datasets": ", ".join(plan.datasets),
            "budget": str(plan.budget),
            "baseline epochs": plan.baseline_epochs,
            "ablation budget": str(plan.ablation_budget),
            "ablations": _ablation_label(plan),
            "ablation head": plan.ablation_head,
            "zero-shot": f"synthetic A->B, {plan.region_dataset} west->east",
            "LLM-Mob windows": plan.llm_mob_samples,
            "batch sweep": "/".join(map(str, plan.batch_sweep)),
            "generation batches": "/".join(map(str, plan.generation_batches)),
            "repeats": plan.repeats,
        })
    return pd.DataFrame(rows)


def plans_markdown() -> str:
    df = plans_table()
    lines = ["| " + " | ".join(df.columns) + " |", "| " + " | ".join("---" for _ in df.columns) + " |"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def resolve_plan(profile: str, overrides: dict[str, Any] | None = None) -> Plan:
    """The profile's plan with some fields replaced (tests shrink it; budgets may be given as tuples)."""
    if profile not in PLANS:
        raise ConfigError(f"--profile '{profile}' has no experiment plan; expected one of {list(PLANS)}")
    plan = PLANS[profile]
    overrides = dict(overrides or {})
    known = {f.name for f in dataclasses.fields(Plan)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"plan overrides {unknown} are unknown; known: {sorted(known)}")
    for name in ("budget", "ablation_budget"):
        if isinstance(overrides.get(name), (tuple, list)):
            overrides[name] = Budget(*overrides[name])
    for name, value in overrides.items():
        if isinstance(value, list):
            overrides[name] = tuple(value)
    return dataclasses.replace(plan, **overrides).validate()


# ---------------------------------------------------------------------------------------------------
# methods

SUPERVISED_METHODS = ("popularity", "user_most_frequent", "markov", "lstm", "transformer",
                      "nextlocllm", "nextlocmoe", "nextlocmoe_ranking")
MODEL_METHODS = ("nextlocllm", "nextlocmoe", "nextlocmoe_ranking")
METHOD_KIND = {**{name: "baseline" for name in BASELINES}, "nextlocllm": "baseline", "llm_mob": "baseline",
               "nextlocmoe": "paper method", "nextlocmoe_ranking": "extension"}


def method_model_config(method: str, base: ModelConfig) -> ModelConfig:
    """The ModelConfig of a model method, derived from the profile's model config.

    nextlocmoe          the paper's model: both MoEs, the history router, regression head + KD-tree
    nextlocmoe_ranking  the same with this project's ranking head
    nextlocllm          NextLocLLM-style: same backbone and prompt, regression head, no MoE and no router; a LoRA
                        on every FFN (`dense_lora`) gives it trainable capacity inside the backbone
    """
    if method == "nextlocmoe":
        return dataclasses.replace(base, head="regression")
    if method == "nextlocmoe_ranking":
        return dataclasses.replace(base, head="ranking")
    if method == "nextlocllm":
        return dataclasses.replace(base, head="regression", use_location_moe=False, use_personalized_moe=False,
                                   use_history_router=False, dense_lora=True)
    raise ConfigError(f"method '{method}' is not a model method; expected one of {list(MODEL_METHODS)}")


def head_method(head: str) -> str:
    return "nextlocmoe" if head == "regression" else "nextlocmoe_ranking"


# ---------------------------------------------------------------------------------------------------
# datasets

DATASET_SOURCES = {"synthetic": "synthetic", "nyc": "nyc_foursquare", "humob": "humob"}


class DatasetHandle:
    """A named dataset whose windows are built only when a job needs them; `fingerprint` enters job keys."""

    def __init__(self, name: str, config: DataConfig, build: Callable[[], Windows],
                 extra_fingerprint: dict[str, Any] | None = None):
        self.name = name
        self.config = config
        resolved = config.resolved()
        self.checksum = raw_checksum(resolved)
        # no name: two handles of the same data (e.g. "synthetic" and "synthetic_A") share trained models
        self.fingerprint = {"config": key_config(resolved), "raw_checksum": self.checksum,
                            **(extra_fingerprint or {})}
        self._build = build
        self._windows: Windows | None = None

    @property
    def windows(self) -> Windows:
        if self._windows is None:
            self._windows = self._build()
        return self._windows


def dataset_config(name: str, cfg: ExperimentConfig) -> DataConfig:
    """The profile's own data config when it has this source (so --set data.* applies), else the source's
    defaults (the synthetic default city: 40 x 40 cells, 200 users, 28 days)."""
    if name not in DATASET_SOURCES:
        raise ConfigError(f"dataset '{name}' is unknown; expected one of {list(DATASET_SOURCES)}")
    source = DATASET_SOURCES[name]
    if cfg.data.source == source:
        return cfg.data
    if source == "humob":
        raise ConfigError("dataset 'humob' needs a HuMob file: use the paper profile or "
                          "--set data.source=humob --set data.path=<cityD-dataset.csv>")
    return DataConfig(source=source, seed=cfg.data.seed, history=cfg.data.history, current=cfg.data.current)


def second_city(config: DataConfig) -> DataConfig:
    """City B of the synthetic zero-shot pair: another layout, other people and a larger grid."""
    syn = config.synthetic
    return dataclasses.replace(config, synthetic=dataclasses.replace(
        syn, layout_seed=syn.layout_seed + 1, seed=syn.seed + 1, grid=syn.grid + max(2, syn.grid // 5)))


def humob_config(path: str | os.PathLike, cfg: ExperimentConfig) -> DataConfig:
    """A HuMob city file with the profile's HuMob settings (grid, cell size, start date, window sizes)."""
    base = cfg.data if cfg.data.source == "humob" else DataConfig(
        source="humob", humob_grid=cfg.data.humob_grid, humob_cell_m=cfg.data.humob_cell_m,
        humob_start=cfg.data.humob_start, history=cfg.data.history, current=cfg.data.current, seed=cfg.data.seed)
    return dataclasses.replace(base, path=str(path))


@dataclass
class RegionSplit:
    """Users split into two halves of a city by where they live (module docstring)."""

    west_users: np.ndarray      # user ids whose home is strictly west of the median home
    east_users: np.ndarray      # every other user
    median: float               # median home coordinate (degrees of longitude, or metres east)
    coordinate: str             # "lon" or "x"
    home: pd.Series             # home location id per user

    def summary(self) -> dict[str, Any]:
        return {"rule": REGION_RULE, "coordinate": self.coordinate, "median_home": self.median,
                "source_users": int(len(self.west_users)), "target_users": int(len(self.east_users))}


REGION_RULE = ("home = the user's most visited location over all records (ties: lowest location id); "
               "source = users whose home is strictly west of the median home longitude (x in metres for grid "
               "data), target = all other users")


def home_regions(data: MobilityData) -> RegionSplit:
    """Split the users of `data` into a western (source) and an eastern (target) half; see REGION_RULE."""
    visits = data.records.groupby(["user", "location"]).size().reset_index(name="visits")
    visits = visits.sort_values(["user", "visits", "location"], ascending=[True, False, True], kind="stable")
    home = visits.drop_duplicates("user").set_index("user")["location"]                  # (U,) location id
    lon = data.locations["lon"].to_numpy(dtype=np.float64)[home.to_numpy()]
    coordinate = "lon" if np.isfinite(lon).all() else "x"
    position = lon if coordinate == "lon" else data.locations["x"].to_numpy(dtype=np.float64)[home.to_numpy()]
    median = float(np.median(position))
    users = home.index.to_numpy(dtype=np.int64)
    west = position < median
    if west.all() or not west.any():
        raise DataError(f"dataset '{data.name}': every home lies on one side of the median {coordinate}; "
                        "the region split needs users on both sides")
    return RegionSplit(users[west], users[~west], median, coordinate, home)


def filter_users(data: MobilityData, users: np.ndarray, suffix: str) -> MobilityData:
    """The records of `users` only (ids unchanged); the candidate set stays the whole city's."""
    records = data.records[data.records["user"].isin(users)].reset_index(drop=True)
    return MobilityData(f"{data.name}_{suffix}", records, data.locations, data.source, data.checksum, data.truth)


def region_handles(name: str, config: DataConfig) -> tuple[DatasetHandle, DatasetHandle, Callable[[], RegionSplit]]:
    """(west, east, split) handles over one dataset; the records are read once, when first needed."""
    from .data.sources import load_records

    state: dict[str, Any] = {}

    def split() -> RegionSplit:
        if "split" not in state:
            state["data"] = load_records(config)
            state["split"] = home_regions(state["data"])
        return state["split"]

    def build(region: str) -> Callable[[], Windows]:
        def windows() -> Windows:
            s = split()
            users = s.west_users if region == "west" else s.east_users
            return make_windows(filter_users(state["data"], users, region), config.resolved())
        return windows

    handles = tuple(DatasetHandle(f"{name}_{region}", config, build(region),
                                  {"region": region, "region_rule": REGION_RULE}) for region in ("west", "east"))
    return handles[0], handles[1], split


# ---------------------------------------------------------------------------------------------------
# results of one experiment call

@dataclass
class ExperimentResult:
    name: str
    profile: str
    table: pd.DataFrame              # tidy: experiment, method, kind, dataset, variant, metric, value
    paths: dict[str, Path]           # csv, md, json
    jobs: list[dict[str, Any]]       # job name, hash, cached, directory (relative to runs_dir)
    computed: int                    # jobs computed in this call
    cached: int                      # jobs read from the cache
    trained: int                     # models trained in this call
    wall_s: float
    decisions: dict[str, Any] = field(default_factory=dict)


class Runner:
    """State of one experiment call: configuration, plan, caches, counters and the rows of its table."""

    def __init__(self, name: str, profile: str, *, results_dir: str | os.PathLike = "results",
                 runs_dir: str | os.PathLike = "runs/experiments", cache_dir: str | os.PathLike = ".cache/windows",
                 force: bool = False, config_path: str | os.PathLike | None = None,
                 overrides: list[str] | tuple[str, ...] = (), plan: dict[str, Any] | None = None):
        if name not in EXPERIMENTS:
            raise ConfigError(f"experiment '{name}' is unknown; expected one of {list(EXPERIMENTS)}")
        self.name, self.profile = name, profile
        self.cfg = load_config(profile, config_path, list(overrides))
        self.explicit = _explicit_keys(config_path, overrides)
        self.plan = resolve_plan(profile, plan)
        self.results_dir, self.runs_dir, self.cache_dir = Path(results_dir), Path(runs_dir), Path(cache_dir)
        self.force = force
        self.computed = self.cached = self.trained = 0
        self.retrained: set[str] = set()
        self.jobs: list[dict[str, Any]] = []
        self.rows: list[dict[str, Any]] = []
        self.decisions: dict[str, Any] = {}
        self.datasets: dict[str, DatasetHandle] = {}
        self.t0 = time.perf_counter()

    # -- configuration ------------------------------------------------------------------------------
    def job_config(self, data: DataConfig, model: ModelConfig, budget: Budget) -> ExperimentConfig:
        """The profile's config with this data, this model and the plan's budget (explicit --set wins)."""
        cfg = copy.deepcopy(self.cfg)
        cfg.data, cfg.model = data, model
        for name, value in (("epochs", budget.epochs), ("max_train_windows", budget.train_windows),
                            ("max_eval_windows", budget.eval_windows)):
            if f"train.{name}" not in self.explicit:
                setattr(cfg.train, name, value)
        return cfg

    def dataset(self, name: str) -> DatasetHandle:
        if name not in self.datasets:
            config = dataset_config(name, self.cfg)
            self.datasets[name] = self.handle(name, config)
        return self.datasets[name]

    def handle(self, name: str, config: DataConfig) -> DatasetHandle:
        return DatasetHandle(name, config, lambda: prepare(config, cache_dir=self.cache_dir))

    # -- jobs ---------------------------------------------------------------------------------------
    def job(self, method: str, dataset: str, variant: str, key: dict[str, Any],
            compute: Callable[[Path], dict[str, Any]], kind: str | None = None) -> dict[str, Any]:
        """Run (or read from the cache) one job; `compute(job_dir)` returns {"metrics": {...}, ...details}."""
        kind = kind or METHOD_KIND.get(method, "baseline")
        h = stable_hash({"experiment": self.name, "method": method, "dataset": dataset, "variant": variant,
                         "key": key, "format": JOB_FORMAT_VERSION})
        job_dir = self.runs_dir / self.name / f"{slug(method, dataset, variant)}-{h}"
        path = job_dir / "result.json"
        record = None if self.force else _read_json(path)
        cached = record is not None and record.get("hash") == h
        if not cached:
            started = time.perf_counter()
            out = compute(job_dir)
            metrics = {k: v for k, v in out.pop("metrics").items() if _is_number(v)}
            record = {"hash": h, "experiment": self.name, "method": method, "kind": kind, "dataset": dataset,
                      "variant": variant, "metrics": metrics, "details": out, "key": key,
                      "wall_s": time.perf_counter() - started,
                      "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            write_json_atomic(path, record)
            record = json.loads(json.dumps(record, sort_keys=True, default=str))   # the same form as a cache hit
            self.computed += 1
        else:
            self.cached += 1
        self.jobs.append({"job": job_dir.name, "hash": h, "cached": cached,
                          "dir": str(job_dir.relative_to(self.runs_dir))})
        self.rows.append({"experiment": self.name, "method": method, "kind": record["kind"], "dataset": dataset,
                          "variant": variant, **record["metrics"]})
        return record

    def trained_model(self, cfg: ExperimentConfig, data: DatasetHandle) -> dict[str, Any]:
        """Train `cfg` on `data` unless a model with this (config, data) key is cached; its record."""
        key = stable_hash({"config": cfg.to_dict(), "data": data.fingerprint, "format": MODEL_FORMAT_VERSION})
        model_dir = self.runs_dir / "models" / slug(data.config.source, cfg.model.head, key)
        path = model_dir / "model.json"
        fresh = self.force and key not in self.retrained
        record = None if fresh else _read_json(path)
        if record is None or record.get("key") != key:
            result = train(cfg, model_dir, windows=data.windows, resume=not fresh)
            written = json.loads((model_dir / "metrics.json").read_text())
            record = {"key": key, "dir": str(model_dir.relative_to(self.runs_dir)), "best_epoch": result.best_epoch,
                      "val": result.val, "test": result.test, "parameters": written.get("parameters"),
                      "windows": written.get("windows"), "train_wall_s": result.wall_s, "data": data.fingerprint}
            write_json_atomic(path, record)
            self.trained += 1
            self.retrained.add(key)
        return record

    # -- outputs ------------------------------------------------------------------------------------
    def finish(self, notes: list[str]) -> ExperimentResult:
        table = metrics_table(self.rows, id_columns=ID_COLUMNS)
        wall = time.perf_counter() - self.t0
        checksums = {h.name: h.checksum for h in self.datasets.values()}
        files = [f"{self.name}.csv", f"{self.name}.md"]
        stamp = provenance(self.profile, seed=self.cfg.train.seed, data_checksum=checksums,
                           experiment=self.name, command=f"nextlocmoe run {self.name} --profile {self.profile}",
                           wall_s=wall, plan=plain(dataclasses.asdict(self.plan)), profile_config=self.cfg.to_dict(),
                           decisions=self.decisions, notes=notes, files=files,
                           jobs=self.jobs, jobs_computed=self.computed, jobs_cached=self.cached,
                           models_trained=self.trained)
        paths = {
            "csv": self.results_dir / files[0],
            "md": self.results_dir / files[1],
            "json": self.results_dir / f"{self.name}.json",
        }
        write_text_atomic(paths["csv"], table.to_csv(index=False))
        write_text_atomic(paths["md"], results_markdown(table, self.name, self.profile, notes))
        write_json_atomic(paths["json"], stamp)
        return ExperimentResult(self.name, self.profile, table, paths, self.jobs, self.computed, self.cached,
                                self.trained, wall, self.decisions)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)



def _explicit_keys(config_path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...]) -> set[str]:
    """Dotted keys the user set by --config or --set: the plan's budget never overrides them."""
    keys = {item.partition("=")[0].strip() for item in overrides}
    if config_path is not None and Path(config_path).is_file():
        def walk(node: Any, prefix: str) -> None:
            if isinstance(node, dict):
                for k, v in node.items():
                    walk(v, f"{prefix}.{k}" if prefix else str(k))
            else:
                keys.add(prefix)
        walk(yaml.safe_load(Path(config_path).read_text()) or {}, "")
    return keys


# ---------------------------------------------------------------------------------------------------
# job bodies shared by the experiments

def baseline_job(runner: Runner, method: str, data: DatasetHandle, cfg: ExperimentConfig,
                 variant: str = "default") -> dict[str, Any]:
    """Fit a classical baseline on the (subsampled) training split and test it, like every other method."""
    neural = NeuralBaselineConfig(epochs=runner.plan.baseline_epochs, seed=cfg.train.seed) \
        if method in NEURAL_BASELINES else None
    key = {"data": data.fingerprint, "budget": {k: getattr(cfg.train, k) for k in
                                                ("max_train_windows", "max_eval_windows", "seed")},
           "baseline_config": neural.to_dict() if neural else None}

    def compute(job_dir: Path) -> dict[str, Any]:
        windows = limited(data.windows, cfg)
        model = make_baseline(method, neural).fit(windows)
        return {"metrics": evaluate_baseline(model, windows, "test"),
                "val": evaluate_baseline(model, windows, "val"),
                "windows": {s: windows.n_windows(s) for s in ("train", "val", "test")}}

    return runner.job(method, data.name, variant, key, compute)


def model_job(runner: Runner, method: str, data: DatasetHandle, cfg: ExperimentConfig, variant: str = "default",
              kind: str | None = None, label: str | None = None) -> dict[str, Any]:
    """Train (or reuse) a model and report its test metrics (best checkpoint by validation Hit@10); `label`
    names the dataset column when it is not the data's own name (zero-shot pairs)."""
    key = {"config": cfg.to_dict(), "data": data.fingerprint}

    def compute(job_dir: Path) -> dict[str, Any]:
        model = runner.trained_model(cfg, data)
        return {"metrics": model["test"], "val": model["val"], "model_dir": model["dir"],
                "best_epoch": model["best_epoch"], "parameters": model["parameters"], "windows": model["windows"]}

    return runner.job(method, label or data.name, variant, key, compute, kind=kind)


# ---------------------------------------------------------------------------------------------------
# experiment 3: fully supervised

def _supervised(runner: Runner, methods: tuple[str, ...] = SUPERVISED_METHODS) -> list[str]:
    plan = runner.plan
    for dataset in plan.datasets:
        data = runner.dataset(dataset)
        for method in tqdm(methods, desc=f"supervised {dataset}", unit="method", disable=None):
            if method in MODEL_METHODS:
                cfg = runner.job_config(data.config, method_model_config(method, runner.cfg.model), plan.budget)
                model_job(runner, method, data, cfg)
            elif method in BASELINES:
                cfg = runner.job_config(data.config, runner.cfg.model, plan.budget)
                baseline_job(runner, method, data, cfg)
            else:
                raise ConfigError(f"supervised method '{method}' is unknown; expected from {list(SUPERVISED_METHODS)}")
    return [
        "Every method sees the same windows, splits and candidates; training and test sets are the same seeded "
        "subsamples (train.limited) for all of them, so the column n is equal across a dataset's rows.",
        "nextlocmoe is the paper's method (regression head + KD-tree); nextlocmoe_ranking is this project's "
        "ranking head; nextlocllm is the NextLocLLM-style baseline (same backbone and prompt, regression head, "
        "no MoE and no router, a LoRA on every FFN).",
        "Test metrics come from the checkpoint with the best validation Hit@10.",
    ]


# ---------------------------------------------------------------------------------------------------
# experiment 4: zero-shot transfer

def transfer_metrics(cfg: ExperimentConfig, model_dir: Path, source: Windows, target: Windows) -> dict[str, float]:
    """Test metrics on `target` of the model trained on `source` (best.pt in model_dir), without fine-tuning.

    The target's inputs are normalised with the SOURCE statistics and retrieval uses the TARGET candidates
    (module docstring); the regression head is required.
    """
    if cfg.model.head != "regression":
        raise ConfigError("zero-shot transfer needs model.head='regression': the ranking head's candidate "
                          "embeddings belong to the source city")
    target = limited(dataclasses.replace(target, stats=source.stats), cfg)
    torch.manual_seed(cfg.train.seed)
    from .model import build_model

    model = build_model(cfg.model, source.stats, source.candidates, source.candidate_function)
    load_trainable_state(model, torch.load(model_dir / "best.pt", map_location="cpu", weights_only=False)["model"])
    device = _device()
    return evaluate(model.to(device), target, "test", cfg.train.eval_batch_size, device=device,
                    desc="zero-shot test")


class LLMMobRunner:
    """The LLM-Mob-style generative baseline (nextlocmoe.llm_mob) on the profile's backbone, loaded once."""

    def __init__(self, runner: Runner):
        self.runner = runner
        self._mob = None

    @property
    def backbone(self) -> str:
        """The generative model: the profile's backbone; for a compact export (12 layers, no generation head or
        tokenizer) a random model of SmolLM2's shapes, which generates at the same speed but says nothing."""
        name = self.runner.cfg.model.backbone
        return COMPACT_STAND_IN if is_compact_backbone(name) else name

    @property
    def answers_meaningfully(self) -> bool:
        return self.backbone not in RANDOM_BACKBONES or self.runner.cfg.model.backbone in RANDOM_BACKBONES

    @property
    def mob(self):
        if self._mob is None:
            from .llm_mob import LLMMob

            device = _device()
            dtype = torch.bfloat16 if device.type == "cuda" else self.runner.cfg.model.torch_dtype
            # the full generative model (all layers): LLM-Mob prompts the whole LLM
            self._mob = LLMMob.from_backbone(self.backbone, None, dtype=dtype, device=device,
                                             seed=self.runner.cfg.model.seed)
        return self._mob

    def config(self):
        from .llm_mob import LLMMobConfig

        plan, cfg = self.runner.plan, self.runner.cfg
        # a chat template only where the tokenizer has one (the random backbones' byte codec has none)
        chat = self.backbone not in RANDOM_BACKBONES
        return LLMMobConfig(max_history=plan.llm_mob_history, max_samples=plan.llm_mob_samples, seed=cfg.train.seed,
                            use_chat_template=chat, progress=True)

    def job(self, target: DatasetHandle, dataset_label: str, cfg: ExperimentConfig) -> dict[str, Any]:
        mob_cfg = self.config()
        key = {"backbone": self.backbone, "llm_mob": mob_cfg.to_dict(), "target": target.fingerprint,
               "budget": {k: getattr(cfg.train, k) for k in ("max_eval_windows", "seed")}}

        def compute(job_dir: Path) -> dict[str, Any]:
            mob = self.mob
            if mob_cfg.use_chat_template and mob.codec.chat is None:
                mob_cfg.use_chat_template = False
            windows = limited(target.windows, cfg)
            return {"metrics": mob.evaluate(windows, "test", mob_cfg), "backbone": self.backbone}

        return self.runner.job("llm_mob", dataset_label, "zero-shot (prompted, no training)", key, compute)


COMPACT_STAND_IN = "smollm2-shape"


def is_compact_backbone(name: str) -> bool:
    from .model.compact import is_compact_dir
    return name.startswith("compact:") or (os.path.isdir(name) and is_compact_dir(name))


def _zero_shot(runner: Runner, humob_paths: dict[str, str | DataConfig] | None = None,
               methods: tuple[str, ...] = ("nextlocmoe", "nextlocllm")) -> list[str]:
    plan = runner.plan
    synthetic = dataset_config("synthetic", runner.cfg)
    pairs: list[tuple[DatasetHandle, DatasetHandle, dict[str, Any]]] = [
        (runner.handle("synthetic_A", synthetic), runner.handle("synthetic_B", second_city(synthetic)), {})]
    region_config = dataset_config(plan.region_dataset, runner.cfg)
    west, east, split = region_handles(plan.region_dataset, region_config)
    pairs.append((west, east, {"split": split}))
    if humob_paths:
        names = list(humob_paths)
        if len(names) < 2:
            raise ConfigError(f"zero-shot across HuMob cities needs at least two files, got {names}")
        cities = [runner.handle(f"humob_{n}", p if isinstance(p, DataConfig) else humob_config(p, runner.cfg))
                  for n, p in humob_paths.items()]
        pairs += [(cities[0], other, {}) for other in cities[1:]]

    mob = LLMMobRunner(runner)
    regions = {}
    for source, target, extra in tqdm(pairs, desc="zero-shot pairs", unit="pair", disable=None):
        runner.datasets.setdefault(source.name, source)
        runner.datasets.setdefault(target.name, target)
        label = f"{source.name}->{target.name}"
        for method in methods:
            cfg = runner.job_config(source.config, method_model_config(method, runner.cfg.model), plan.budget)
            key = {"config": cfg.to_dict(), "source": source.fingerprint, "target": target.fingerprint}

            def compute(job_dir: Path, cfg=cfg, source=source, target=target, extra=extra) -> dict[str, Any]:
                model = runner.trained_model(cfg, source)
                metrics = transfer_metrics(cfg, runner.runs_dir / model["dir"], source.windows, target.windows)
                details = {"metrics": metrics, "model_dir": model["dir"], "source_test": model["test"]}
                if "split" in extra:
                    details["region"] = extra["split"]().summary()
                return details

            record = runner.job(method, label, "zero-shot", key, compute)
            if "region" in record["details"]:
                regions[label] = record["details"]["region"]
        # what zero-shot gives up: the paper's model trained on the target itself
        cfg = runner.job_config(target.config, method_model_config("nextlocmoe", runner.cfg.model), plan.budget)
        model_job(runner, "nextlocmoe", target, cfg, variant="trained on target", label=label)
        # a training-free floor: the window's own most frequent place, no popularity prior
        history_only_job(runner, target, label, cfg)
        if mob.answers_meaningfully:
            mob.job(target, label, cfg)
    if not mob.answers_meaningfully:
        runner.decisions["llm_mob"] = (f"skipped: the backbone {runner.cfg.model.backbone} is a compact export, which "
                                       "cannot generate; the cpu profile's zero-shot table has the LLM-Mob rows")
    runner.decisions["regions"] = regions
    runner.decisions["zero_shot"] = {
        "normalisation": "source city statistics", "candidates": "target city", "heads": "regression only",
        "synthetic_B": dataclasses.asdict(second_city(synthetic).synthetic)}
    return [
        "zero-shot: trained on the source (left of ->), tested on the target's test split without fine-tuning; "
        "inputs normalised with the SOURCE statistics, retrieval over the TARGET's candidates; regression head "
        "only (the ranking head's candidate embeddings belong to the source city).",
        "trained on target: NextLocMoE trained and tested on the target (the supervised reference).",
        "history only: the most frequent place of the window's own records, no training and no popularity prior.",
        "LLM-Mob: the generative backbone prompted with the visits as text; it answers a seeded subsample of the "
        "same test windows (its n is smaller); unparsable answers count as misses.",
        f"City halves: {REGION_RULE}.",
    ]


def history_only_job(runner: Runner, target: DatasetHandle, label: str, cfg: ExperimentConfig) -> dict[str, Any]:
    key = {"target": target.fingerprint, "budget": {k: getattr(cfg.train, k) for k in ("max_eval_windows", "seed")}}

    def compute(job_dir: Path) -> dict[str, Any]:
        windows = limited(target.windows, cfg)
        model = make_baseline("user_most_frequent").fit(windows)
        model.popularity.counts = np.zeros_like(model.popularity.counts)   # no prior: only the window's records
        return {"metrics": evaluate_baseline(model, windows, "test")}

    return runner.job("user_most_frequent", label, "history only (no training)", key, compute)


# ---------------------------------------------------------------------------------------------------
# experiment 5: ablations

def _shift_pmoe_layers(base: ModelConfig, depth: int) -> tuple[int, ...]:
    """P-MoE layers at the same distance from the top of a `depth`-layer stack as in `base`."""
    offsets = [base.num_layers - i for i in base.pmoe_layers]
    layers = sorted(depth - o for o in offsets if depth - o >= 0)
    return tuple(layers) if layers else (depth - 1,)


def ablation_variants(base: ModelConfig, plan: Plan) -> dict[str, tuple[str, ModelConfig]]:
    """variant name -> (description, ModelConfig); "full" is `base` itself (the head is already chosen)."""
    variants = {"full": ("the full model", base)}
    p = base.personalized
    for group in plan.ablations:
        if group == "no_location_moe":
            variants[group] = ("without the Location Semantics MoE", dataclasses.replace(base, use_location_moe=False))
        elif group == "no_personalized_moe":
            variants[group] = ("without the Personalized MoE (dense frozen FFNs)",
                               dataclasses.replace(base, use_personalized_moe=False))
        elif group == "no_history_router":
            variants[group] = ("without the history-aware router (gates see zeros)",
                               dataclasses.replace(base, use_history_router=False))
        elif group == "routing":
            other = "topk" if p.routing == "threshold" else "threshold"
            routed = dataclasses.replace(base, personalized=dataclasses.replace(p, routing=other))
            variants[f"{other}_routing"] = (f"P-MoE {other} routing instead of {p.routing}", routed)
        elif group == "experts":
            for n in plan.expert_counts:
                if n != p.num_experts:
                    variants[f"experts_{n}"] = (f"{n} role expert(s) instead of {p.num_experts}", dataclasses.replace(
                        base, personalized=dataclasses.replace(p, num_experts=n, top_k=min(p.top_k, n))))
        elif group == "depth":
            if base.num_layers is None:
                continue
            for n in plan.depths:
                if n != base.num_layers:
                    layers = _shift_pmoe_layers(base, n)
                    variants[f"depth_{n}"] = (f"backbone truncated to {n} layers, P-MoE at {list(layers)}",
                                              dataclasses.replace(base, num_layers=n, pmoe_layers=layers))
        elif group == "backbone_init":
            variants["random_backbone"] = ("randomly initialised backbone of the same shape",
                                           dataclasses.replace(base, backbone_init="random"))
        elif group == "head":
            other = "ranking" if base.head == "regression" else "regression"
            variants[f"{other}_head"] = (f"{other} head instead of {base.head}", dataclasses.replace(base, head=other))
        elif group == "prompt":
            name = "no_prompt" if base.use_prompt else "with_prompt"
            variants[name] = ("without the task prompt" if base.use_prompt else "with the task prompt",
                              dataclasses.replace(base, use_prompt=not base.use_prompt))
    return variants


def choose_ablation_head(runner: Runner, data: DatasetHandle) -> dict[str, Any]:
    """The head the ablations use: fixed by the plan, or the one with the higher validation Hit@10 in the
    supervised setting (both models trained at the supervised budget, shared with that experiment's cache)."""
    plan = runner.plan
    if plan.ablation_head != "auto":
        return {"head": plan.ablation_head, "rule": "fixed by the plan"}
    val = {}
    for head in ("regression", "ranking"):
        method = head_method(head)
        cfg = runner.job_config(data.config, method_model_config(method, runner.cfg.model), plan.budget)
        val[head] = runner.trained_model(cfg, data)["val"]["hit@10"]
    head = "ranking" if val["ranking"] > val["regression"] else "regression"   # a tie keeps the paper's head
    return {"head": head, "rule": "higher validation Hit@10 of the supervised models (tie: regression)",
            "val_hit@10": val}


def _ablations(runner: Runner) -> list[str]:
    plan = runner.plan
    data = runner.dataset(plan.datasets[0])
    choice = choose_ablation_head(runner, data)
    runner.decisions["ablation_head"] = choice
    base = method_model_config(head_method(choice["head"]), runner.cfg.model)
    variants = ablation_variants(base, plan)
    method = head_method(choice["head"])
    descriptions = {}
    for variant, (description, model_cfg) in tqdm(variants.items(), desc="ablations", unit="variant", disable=None):
        cfg = runner.job_config(data.config, model_cfg, plan.ablation_budget)
        kind = METHOD_KIND[method] if variant == "full" else "ablation"
        model_job(runner, method, data, cfg, variant=variant, kind=kind)
        descriptions[variant] = description
    runner.decisions["variants"] = descriptions
    return [f"Ablation head: {choice['head']} ({choice['rule']}).",
            f"Every variant trains at the same budget ({plan.ablation_budget}) on {data.name}."] + \
           [f"{name}: {text}" for name, text in descriptions.items()]


# ---------------------------------------------------------------------------------------------------
# experiment 6: efficiency

def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(step: Callable[[], Any], repeats: int, warmup: int, device: torch.device) -> float:
    """Median wall time of `step` over `repeats` runs after `warmup` unmeasured ones (CUDA-synchronised)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        _synchronize(device)
        started = time.perf_counter()
        step()
        _synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


class PeakMemory:
    """Peak memory of a block in MiB: CUDA max_memory_allocated, or the process's peak RSS on a CPU (see `kind`)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_mib = math.nan
        self.kind = ""

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda max_memory_allocated"
        else:
            try:   # Linux: writing 5 resets the process's peak resident set size (VmHWM)
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.kind = "cpu peak RSS of the process during the block (VmHWM, reset before it)"
            except OSError:
                self.kind = "cpu ru_maxrss: peak RSS over the whole process lifetime"
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self.kind.startswith("cpu peak RSS"):
            status = Path("/proc/self/status").read_text()
            self.peak_mib = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024
        else:
            self.peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux


def _batch(windows: Windows, split: str, size: int, device: torch.device) -> dict[str, torch.Tensor]:
    n = windows.n_windows(split)
    arrays = windows.batch(split, np.arange(size) % n)          # cycles when the split is smaller than `size`
    return {k: torch.from_numpy(v).to(device) for k, v in arrays.items()}


def measure_model(cfg: ExperimentConfig, windows: Windows, batch_sizes: tuple[int, ...], repeats: int,
                  warmup: int = 1) -> tuple[dict[str, float], dict[str, Any]]:
    """Parameters, training and inference throughput, latency and peak memory of one model (untrained weights:
    speed does not depend on their values). Returns (metrics, details)."""
    from .model import build_model

    device = _device()
    autocast = resolve_mixed_precision(cfg.train.mixed_precision) == "bf16"
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, windows.stats, windows.candidates, windows.candidate_function).to(device)
    counts = model.parameter_counts()
    metrics: dict[str, float] = {"params_total": counts["total"], "params_trainable": counts["trainable"]}

    def context():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast)

    # training: forward + loss + backward + Adam step on one batch of train.batch_size windows
    train_batch = _batch(windows, "train", cfg.train.batch_size, device)
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=1e-6)
    model.train()

    def train_step() -> None:
        with context():
            out = model(train_batch)
            loss, _ = model.loss(out, train_batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with PeakMemory(device) as memory:
        seconds = median_seconds(train_step, repeats, warmup, device)
    metrics["train_batch"] = cfg.train.batch_size
    metrics["train_samples_per_s"] = cfg.train.batch_size / seconds
    metrics["peak_memory_train_mib"] = memory.peak_mib

    # inference: a sweep of batch sizes; latency at batch 1 and at the fastest batch
    model.eval()
    throughput = {}
    batch_seconds = {}
    for size in tqdm(batch_sizes, desc="inference sweep", unit="batch size", leave=False, disable=None):
        batch = _batch(windows, "test", size, device)

        def infer_step(batch=batch) -> None:
            with torch.no_grad(), context():
                model(batch)

        batch_seconds[size] = median_seconds(infer_step, repeats, warmup, device)
        throughput[size] = size / batch_seconds[size]
        metrics[f"infer_samples_per_s_b{size}"] = throughput[size]
    best = max(throughput, key=throughput.get)
    with PeakMemory(device) as memory, torch.no_grad(), context():
        model(_batch(windows, "test", best, device))
    if 1 in batch_seconds:
        metrics["latency_ms_b1"] = 1000 * batch_seconds[1]
    metrics["best_batch"] = best
    metrics["infer_samples_per_s_best"] = throughput[best]
    metrics["latency_ms_per_sample_best"] = 1000 * batch_seconds[best] / best
    metrics["batch_latency_ms_best"] = 1000 * batch_seconds[best]
    metrics["peak_memory_infer_mib"] = memory.peak_mib
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return metrics, {"memory": memory.kind, "device": device_name(), "autocast_bf16": autocast,
                     "threads": torch.get_num_threads(), "parameters": counts}


def measure_generation(mob: Any, mob_cfg: Any, windows: Windows, batch_sizes: tuple[int, ...], repeats: int,
                       seed: int = 0, prompt_tokens: int | None = None) -> tuple[dict[str, float], dict[str, Any]]:
    """LLM-Mob-style generation speed at the prompt length of this dataset's real prompts (mean of a few), or at
    `prompt_tokens` when given (a stand-in generator without the real tokenizer would miscount them)."""
    from .llm_mob import batch_prompts, generation_throughput

    device = next(mob.model.parameters()).device
    if prompt_tokens is None:
        sample = windows.batch("test", np.arange(min(8, windows.n_windows("test"))))
        prompt_tokens = int(round(float(np.mean([len(mob.codec.encode(p))
                                                 for p in batch_prompts(sample, mob.codec, mob_cfg)]))))
    with PeakMemory(device) as memory:
        rows = generation_throughput(mob.model, mob.codec, prompt_tokens, mob_cfg.max_new_tokens, list(batch_sizes),
                                     device=device, repeats=repeats, warmup=1, seed=seed)
    metrics: dict[str, float] = {"params_total": sum(p.numel() for p in mob.model.parameters()),
                                 "prompt_tokens": prompt_tokens, "new_tokens": mob_cfg.max_new_tokens}
    for row in rows:
        metrics[f"gen_samples_per_s_b{row['batch_size']}"] = row["samples_per_s"]
    best = max(rows, key=lambda r: r["samples_per_s"])
    first = min(rows, key=lambda r: r["batch_size"])
    metrics["gen_latency_ms_b1"] = 1000 * first["seconds_per_batch"] if first["batch_size"] == 1 else math.nan
    metrics["gen_best_batch"] = best["batch_size"]
    metrics["gen_samples_per_s_best"] = best["samples_per_s"]
    metrics["peak_memory_mib"] = memory.peak_mib
    return metrics, {"memory": memory.kind, "rows": rows, "device": device_name()}


def backbone_overhead(model_cfg: ModelConfig, windows: Windows, batch_sizes: tuple[int, ...], repeats: int,
                      device: torch.device | None = None, warmup: int = 1) -> dict[str, float]:
    """End-to-end NextLocMoE inference throughput over the bare truncated backbone's on identical shapes
    (the same B and the same T = prompt + history + current tokens), per batch size.

    The bare backbone is the LlamaModel of the same config run on random input embeddings (dense FFNs, no
    prompt sharing); a ratio below 1 is what NextLocMoE's own modules cost, above 1 what prompt sharing saves.
    """
    from .model.backbone import load_backbone
    from .model.nextlocmoe import NextLocMoE

    device = device or _device()
    name = model_cfg.backbone
    backbone = load_backbone(name, model_cfg.num_layers, dtype=model_cfg.torch_dtype, seed=model_cfg.seed,
                             device=device if name in RANDOM_BACKBONES else None)
    torch.manual_seed(model_cfg.seed)
    model = NextLocMoE(model_cfg, backbone, windows.stats, windows.candidates, windows.candidate_function)
    model = model.to(device).eval()
    autocast = device.type == "cuda" and model_cfg.torch_dtype != torch.float32
    prompt = 0 if model.prompt_embeddings is None else model.prompt_embeddings.shape[0]
    T = prompt + windows.history + windows.current
    D = model.llama.config.hidden_size
    metrics: dict[str, float] = {"tokens_per_sample": T}
    for size in batch_sizes:
        batch = _batch(windows, "test", size, device)
        embeds = torch.randn(size, T, D, device=device, dtype=model.backbone_dtype)

        def end_to_end(batch=batch) -> None:
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                model(batch)

        def bare(embeds=embeds) -> None:
            with torch.no_grad():
                model.llama(inputs_embeds=embeds, use_cache=False)

        e2e = size / median_seconds(end_to_end, repeats, warmup, device)
        bare_rate = size / median_seconds(bare, repeats, warmup, device)
        metrics[f"e2e_samples_per_s_b{size}"] = e2e
        metrics[f"bare_backbone_samples_per_s_b{size}"] = bare_rate
        metrics[f"e2e_over_bare_b{size}"] = e2e / bare_rate
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return metrics


LARGE_BACKBONE = "llama3.2-3b-shape"


def _efficiency(runner: Runner) -> list[str]:
    plan = runner.plan
    data = runner.dataset(plan.datasets[0])
    device_key = {"device": device_name(), "threads": torch.get_num_threads(), "torch": torch.__version__}
    records = {}
    for method in tqdm(MODEL_METHODS, desc="efficiency", unit="method", disable=None):
        cfg = runner.job_config(data.config, method_model_config(method, runner.cfg.model), plan.budget)
        key = {"config": cfg.to_dict(), "data": data.fingerprint, "machine": device_key,
               "sweep": list(plan.batch_sweep), "repeats": plan.repeats}

        def compute(job_dir: Path, cfg=cfg) -> dict[str, Any]:
            metrics, details = measure_model(cfg, limited(data.windows, cfg), plan.batch_sweep, plan.repeats)
            return {"metrics": metrics, **details}

        records[method] = runner.job(method, data.name, "inference + training", key, compute)

    mob = LLMMobRunner(runner)
    mob_cfg = mob.config()
    key = {"backbone": mob.backbone, "llm_mob": mob_cfg.to_dict(), "data": data.fingerprint, "machine": device_key,
           "batches": list(plan.generation_batches), "repeats": plan.repeats,
           "prompt_tokens": plan.generation_prompt_tokens if mob.backbone != runner.cfg.model.backbone else None}

    def generation(job_dir: Path) -> dict[str, Any]:
        if mob_cfg.use_chat_template and mob.mob.codec.chat is None:
            mob_cfg.use_chat_template = False
        cfg = runner.job_config(data.config, runner.cfg.model, plan.budget)
        stand_in = mob.backbone != runner.cfg.model.backbone
        metrics, details = measure_generation(mob.mob, mob_cfg, limited(data.windows, cfg), plan.generation_batches,
                                              plan.repeats, seed=runner.cfg.train.seed,
                                              prompt_tokens=plan.generation_prompt_tokens if stand_in else None)
        details["generator"] = mob.backbone
        return {"metrics": metrics, **details}

    generated = runner.job("llm_mob", data.name, "generation", key, generation)

    # the paper's speed claim, two ways: NextLocMoE at its best batch vs generation at batch 1, and best vs best
    ours = records["nextlocmoe"]["metrics"]
    theirs = generated["metrics"]
    ratios = {"speedup_vs_generation_b1": ours["infer_samples_per_s_best"] / theirs["gen_samples_per_s_b1"]
              if "gen_samples_per_s_b1" in theirs else math.nan,
              "speedup_best_vs_best": ours["infer_samples_per_s_best"] / theirs["gen_samples_per_s_best"]}
    runner.rows.append({"experiment": runner.name, "method": "nextlocmoe_vs_llm_mob", "kind": "comparison",
                        "dataset": data.name, "variant": "samples/s ratio", **ratios})

    notes = [
        "Untrained weights (speed and memory do not depend on their values); medians of "
        f"{plan.repeats} timed repeats after one warm-up, CUDA-synchronised on a GPU.",
        "train_samples_per_s: forward + loss + backward + Adam step at train.batch_size; infer_*: forward only; "
        "latency_ms_b1 = one sample alone; latency_ms_per_sample_best = batch time / batch size at the fastest "
        "batch of the sweep.",
        f"Memory: {records['nextlocmoe']['details'].get('memory', '?')}.",
        "llm_mob: greedy generation of new_tokens after prompts as long as this dataset's real LLM-Mob prompts "
        "(prompt_tokens), with the full generative backbone; NextLocMoE keeps its truncated backbone.",
        "nextlocmoe_vs_llm_mob: NextLocMoE's best-batch throughput over generation at batch 1 and over "
        "generation at its own best batch.",
    ]
    if torch.cuda.is_available():
        large_cfg = dataclasses.replace(runner.cfg.model, backbone=LARGE_BACKBONE, num_layers=12, pmoe_layers=(8, 10),
                                        dtype="bfloat16", head="regression")
        key = {"model": large_cfg.to_dict(), "data": data.fingerprint, "machine": device_key,
               "batches": list(plan.large_backbone_batches), "repeats": plan.repeats}

        def overhead(job_dir: Path) -> dict[str, Any]:
            cfg = runner.job_config(data.config, large_cfg, plan.budget)
            return {"metrics": backbone_overhead(large_cfg, limited(data.windows, cfg), plan.large_backbone_batches,
                                                 plan.repeats)}

        runner.job("nextlocmoe", data.name, f"{LARGE_BACKBONE} (12 layers) vs bare backbone", key, overhead)
        notes.append(f"{LARGE_BACKBONE}: NextLocMoE end-to-end throughput over the bare truncated backbone on the "
                     "same (batch, tokens); random weights, bf16.")
    else:
        notes.append(f"The {LARGE_BACKBONE} overhead measurement runs on a GPU only (not measured here).")
    if mob.backbone != runner.cfg.model.backbone:
        notes.append(f"llm_mob here is a randomly initialised {mob.backbone} model (SmolLM2-135M's shapes): the "
                     f"compact backbone {runner.cfg.model.backbone} cannot generate; speed does not depend on the "
                     f"weights, and the prompt length is fixed at {plan.generation_prompt_tokens} tokens "
                     "(plan.generation_prompt_tokens).")
    runner.decisions["memory"] = records["nextlocmoe"]["details"].get("memory")
    return notes


# ---------------------------------------------------------------------------------------------------
# public entry points

def run_experiment(name: str, profile: str = "smoke", *, results_dir: str | os.PathLike = "results",
                   runs_dir: str | os.PathLike = "runs/experiments", cache_dir: str | os.PathLike = ".cache/windows",
                   force: bool = False, config_path: str | os.PathLike | None = None,
                   overrides: list[str] | tuple[str, ...] = (), plan: dict[str, Any] | None = None,
                   humob_paths: dict[str, str | DataConfig] | None = None,
                   methods: tuple[str, ...] | None = None) -> ExperimentResult:
    """Run experiment `name` ("supervised", "zero_shot", "ablations", "efficiency") under `profile`'s plan.

    results_dir  receives <name>.csv, <name>.md and <name>.json
    runs_dir     job results and trained models (the cache); force=True recomputes every job of this call
    overrides    `section.field=value` config overrides, as on the command line (they win over the plan)
    plan         Plan fields to replace (e.g. {"ablations": ("no_location_moe",)}): tests shrink the plan
    humob_paths  zero_shot only: {city name: HuMob CSV path, or a full DataConfig}; the first city is the source
                 of every pair
    methods      supervised only: a subset of SUPERVISED_METHODS
    """
    runner = Runner(name, profile, results_dir=results_dir, runs_dir=runs_dir, cache_dir=cache_dir, force=force,
                    config_path=config_path, overrides=overrides, plan=plan)
    if humob_paths and name != "zero_shot":
        raise ConfigError("humob_paths (--humob) is used by the zero_shot experiment only")
    if name == "supervised":
        notes = _supervised(runner, tuple(methods) if methods else SUPERVISED_METHODS)
    elif name == "zero_shot":
        notes = _zero_shot(runner, humob_paths)
    elif name == "ablations":
        notes = _ablations(runner)
    else:
        notes = _efficiency(runner)
    result = runner.finish(notes)
    print(f"{name} ({profile}): {result.computed} job(s) computed, {result.cached} from cache, "
          f"{result.trained} model(s) trained, {result.wall_s:.1f} s -> {result.paths['md']}", file=sys.stderr)
    return result


def plan_datasets(profile: str, *, cache_dir: str | os.PathLike = ".cache/windows",
                  plan: dict[str, Any] | None = None) -> dict[str, Windows]:
    """The windows of every dataset the profile's plan names, by name (built or read from the cache)."""
    runner = Runner("supervised", profile, cache_dir=cache_dir, plan=plan)
    return {name: runner.dataset(name).windows for name in runner.plan.datasets}


@dataclass
class TrainedModel:
    """A model the supervised experiment trains (and shares with the others): where it is and how it did."""
    method: str
    dataset: str
    config: ExperimentConfig
    run_dir: Path                    # train() output: config.yaml, best.pt, history.csv, steps.csv, metrics.json
    record: dict[str, Any]           # val / test metrics, best epoch, parameters, windows, training wall time
    windows: Windows                 # the full windows of the dataset (train.limited gives the model's subsample)


def supervised_model(profile: str, dataset: str, method: str = "nextlocmoe", *,
                     runs_dir: str | os.PathLike = "runs/experiments", cache_dir: str | os.PathLike = ".cache/windows",
                     force: bool = False, plan: dict[str, Any] | None = None) -> TrainedModel:
    """Train (or reuse) `method` on `dataset` exactly as the supervised experiment does, at its budget.

    Notebook 01 calls this to train the profile's models and show their curves; the supervised table then
    reads the same cached model instead of training it again (the cache key is the config and the data).
    """
    if method not in MODEL_METHODS:
        raise ConfigError(f"method '{method}' is not a trained model; expected one of {list(MODEL_METHODS)}")
    runner = Runner("supervised", profile, runs_dir=runs_dir, cache_dir=cache_dir, force=force, plan=plan)
    if dataset not in runner.plan.datasets:
        raise ConfigError(f"dataset '{dataset}' is not in the {profile} plan; expected one of "
                          f"{list(runner.plan.datasets)}")
    data = runner.dataset(dataset)
    cfg = runner.job_config(data.config, method_model_config(method, runner.cfg.model), runner.plan.budget)
    record = runner.trained_model(cfg, data)
    return TrainedModel(method, dataset, cfg, runner.runs_dir / record["dir"], record, data.windows)


def write_training_summary(models: dict[str, TrainedModel], profile: str,
                           results_dir: str | os.PathLike = "results") -> dict[str, Path]:
    """results/training.{csv,md,json}: validation and test metrics, best epoch, parameters and wall time of
    the models notebook 01 trains (the JSON sidecar stamps provenance)."""
    rows = []
    for method, m in models.items():
        extra = {"best_epoch": m.record["best_epoch"], "train_wall_s": m.record["train_wall_s"],
                 "trainable_params": m.record["parameters"]["trainable"], "total_params": m.record["parameters"]["total"]}
        for split in ("val", "test"):
            rows.append({"method": method, "kind": METHOD_KIND[method], "dataset": m.dataset, "split": split,
                         **m.record[split], **extra})
    table = metrics_table(rows, id_columns=("method", "kind", "dataset", "split"))
    pivot = table.pivot_table(index=["method", "dataset", "split"], columns="metric", values="value", sort=False)
    shown = [c for c in ("hit@1", "hit@5", "hit@10", "mrr", "dist_median_m", "best_epoch", "train_wall_s")
             if c in pivot.columns]
    md = markdown_table(pivot[shown].reset_index().round(4))
    results = Path(results_dir)
    checksums = {m.dataset: m.windows.meta.get("checksum") for m in models.values()}
    first = next(iter(models.values()))
    return {
        "csv": write_text_atomic(results / "training.csv", table.to_csv(index=False)),
        "md": write_text_atomic(results / "training.md", md),
        "json": write_json_atomic(results / "training.json", provenance(
            profile, seed=first.config.train.seed, data_checksum=checksums, files=["training.csv", "training.md"],
            runs={k: str(m.run_dir) for k, m in models.items()}, config={k: m.config.to_dict() for k, m in models.items()})),
    }


def summarize(table: pd.DataFrame, experiment: str, metrics: tuple[str, ...] = ("hit@1", "hit@10")) -> str:
    """Markdown bullets that state what a results table shows, computed from the table itself (so the words a
    notebook prints always match its numbers, on every profile): per dataset, the best method for each metric,
    where the paper's method (NextLocMoE, regression head) and the extension rank, and their gap to the best
    baseline; for ablations, every variant's change against the full model; for efficiency, the speed ratios."""
    t = table.copy()
    if experiment == "efficiency":
        ratio = t[t["method"] == "nextlocmoe_vs_llm_mob"].set_index("metric")["value"]
        lines = []
        if "speedup_vs_generation_b1" in ratio:
            lines.append(f"- NextLocMoE at its best batch processes {ratio['speedup_vs_generation_b1']:,.1f}x as many "
                         "samples per second as LLM-Mob-style generation at batch 1 (paper: up to 600x).")
        if "speedup_best_vs_best" in ratio:
            lines.append(f"- Both at their best batch: {ratio['speedup_best_vs_best']:,.1f}x.")
        return "\n".join(lines) + "\n"
    lines = []
    for dataset, d in t.groupby("dataset", sort=False):
        wide = d.pivot_table(index=["method", "kind", "variant"], columns="metric", values="value", sort=False)
        if experiment == "ablations":
            metric = metrics[-1]
            full = wide.xs("full", level="variant")[metric].iloc[0]
            others = wide[metric].drop(index="full", level="variant").sort_values()
            worse = [f"{v} {val - full:+.3f}" for (_, _, v), val in others.items()]
            lines.append(f"- **{dataset}**, {metric_name(metric)} of the full model {full:.3f}; change per variant "
                         f"(lowest first): " + ", ".join(worse) + ".")
            continue
        for metric in metrics:
            if metric not in wide:
                continue
            col = wide[metric].sort_values(ascending=False, kind="stable")
            labels = [m if v in ("default", "zero-shot") else f"{m} [{v}]" for m, _, v in col.index]
            kinds = [k for _, k, _ in col.index]
            parts = [f"best {labels[0]} ({col.iloc[0]:.3f})"]
            best_baseline = next((i for i, k in enumerate(kinds) if k == "baseline"), None)
            for method in ("nextlocmoe", "nextlocmoe_ranking"):
                if method in labels:
                    i = labels.index(method)
                    gap = "" if best_baseline is None else \
                        f", {col.iloc[i] - col.iloc[best_baseline]:+.3f} vs the best baseline {labels[best_baseline]}"
                    parts.append(f"{method} {col.iloc[i]:.3f} (rank {i + 1} of {len(labels)}{gap})")
            lines.append(f"- **{dataset}**, {metric_name(metric)}: " + "; ".join(parts) + ".")
    return "\n".join(lines) + "\n"


def metric_name(metric: str) -> str:
    return metric.replace("hit@", "Hit@").replace("mrr", "MRR").replace("ndcg@", "NDCG@")


def supervised(profile: str = "smoke", **options: Any) -> ExperimentResult:
    """Experiment 3: every method x dataset of the profile on the same windows (see run_experiment)."""
    return run_experiment("supervised", profile, **options)


def zero_shot(profile: str = "smoke", **options: Any) -> ExperimentResult:
    """Experiment 4: synthetic A -> B, city halves west -> east, HuMob cities when given (see run_experiment)."""
    return run_experiment("zero_shot", profile, **options)


def ablations(profile: str = "smoke", **options: Any) -> ExperimentResult:
    """Experiment 5: NextLocMoE variants at one budget (see run_experiment)."""
    return run_experiment("ablations", profile, **options)


def efficiency(profile: str = "smoke", **options: Any) -> ExperimentResult:
    """Experiment 6: parameters, speed, latency and memory; NextLocMoE vs LLM-Mob (see run_experiment)."""
    return run_experiment("efficiency", profile, **options)


# ---------------------------------------------------------------------------------------------------
# the readable table

ACCURACY_COLUMNS = {"hit@1": "Hit@1", "hit@5": "Hit@5", "hit@10": "Hit@10", "hit@20": "Hit@20", "mrr": "MRR",
                    "ndcg@10": "NDCG@10", "dist_mean_m": "mean dist (m)", "dist_median_m": "median dist (m)",
                    "n": "n", "unparsable_fraction": "unparsable"}
DESCRIPTIONS = {
    "supervised": "Fully supervised next-location prediction: every method x dataset on the same windows.",
    "zero_shot": "Zero-shot transfer: trained on the source (left of ->), tested on the target without fine-tuning.",
    "ablations": "Ablations of NextLocMoE, every variant at the same budget.",
    "efficiency": "Efficiency: parameters, training and inference speed, latency, memory.",
}


def results_markdown(table: pd.DataFrame, name: str, profile: str, notes: list[str]) -> str:
    """A pivot of the tidy table: one row per method x dataset x variant, one column per metric."""
    index = ["method", "kind", "dataset", "variant"]
    order = list(dict.fromkeys(table["metric"]))           # metrics in the order the rows produced them
    keys = list(dict.fromkeys(map(tuple, table[index].itertuples(index=False))))
    wide = table.pivot_table(index=index, columns="metric", values="value", aggfunc="first")

    def value(key: tuple, metric: str) -> float:
        return wide.loc[key, metric] if metric in wide.columns else math.nan

    if name == "efficiency":   # many metrics, few methods: one row per metric, one column per method
        order = sorted(order, key=_efficiency_order)
        methods = [key[0] for key in keys]
        labels = [m if methods.count(m) == 1 else f"{m} [{key[3]}]" for m, key in zip(methods, keys)]
        rows = [{"metric": metric, **{label: _format(metric, value(key, metric)) for label, key in zip(labels, keys)}}
                for metric in order]
    else:
        columns = {m: label for m, label in ACCURACY_COLUMNS.items() if m in order}
        rows = [{**dict(zip(index, key)), **{label: _format(metric, value(key, metric))
                                             for metric, label in columns.items()}} for key in keys]
    text = [f"# {name} (profile {profile})", "", DESCRIPTIONS[name], "", markdown_table(pd.DataFrame(rows))]
    text += ["Notes:", ""] + [f"- {note}" for note in notes]
    text += ["", f"Tidy values: {name}.csv; provenance: {name}.json; regenerate with "
                 f"`nextlocmoe run {name} --profile {profile}`.", ""]
    return "\n".join(text)


EFFICIENCY_ORDER = ("params_total", "params_trainable", "train_batch", "train_samples_per_s", "peak_memory_train_mib",
                    "infer_samples_per_s_b", "latency_ms_b1", "best_batch", "infer_samples_per_s_best",
                    "latency_ms_per_sample_best", "batch_latency_ms_best", "peak_memory_infer_mib", "prompt_tokens",
                    "new_tokens", "gen_samples_per_s_b", "gen_latency_ms_b1", "gen_best_batch",
                    "gen_samples_per_s_best",
                    "peak_memory_mib", "speedup_vs_generation_b1", "speedup_best_vs_best", "tokens_per_sample",
                    "e2e_samples_per_s_b", "bare_backbone_samples_per_s_b", "e2e_over_bare_b")


def _efficiency_order(metric: str) -> tuple[int, int, str]:
    """Sort key: the position in EFFICIENCY_ORDER (a name, or a prefix followed by a batch size), then the batch."""
    if metric in EFFICIENCY_ORDER:
        return EFFICIENCY_ORDER.index(metric), -1, metric
    match = re.fullmatch(r"(.*_b)(\d+)", metric)
    if match and match.group(1) in EFFICIENCY_ORDER:
        return EFFICIENCY_ORDER.index(match.group(1)), int(match.group(2)), metric
    return len(EFFICIENCY_ORDER), -1, metric


def _format(metric: str, value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if metric.startswith(("hit@", "ndcg@")) or metric in ("mrr", "unparsable_fraction"):
        return f"{value:.4f}"
    if metric.endswith("_m") or metric.endswith("_mib"):
        return f"{value:,.1f}"
    if float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.1f}"
