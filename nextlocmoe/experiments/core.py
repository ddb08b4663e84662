"""The small core of the harness: one experiment call (`Runner`), its job cache, shared trained models, results.

Jobs and caching. An experiment is a list of jobs (one method on one dataset in one variant). A job's key
hashes (io.stable_hash) everything that decides its result: the experiment, method, dataset and variant, the
training configuration (data, model, train; `config.training_dict`) and the raw data's checksum. Its result
is kept in runs/experiments/<experiment>/<job>-<hash>/result.json and reused unless force=True; a changed
configuration gives a new hash, so a stale result is never read. Trained models are cached one level lower,
in runs/experiments/models/<source>-<head>-<hash>/ (the train() run directory: checkpoints, history,
metrics), keyed by (training configuration, data) alone, so the supervised, zero-shot and ablation
experiments, notebook 01 and `nextlocmoe train` with the same configuration share one model instead of
training it several times. An interrupted training resumes from its last epoch. Every file is written
atomically.

Configuration. The profile (nextlocmoe.config) holds the training section AND the plan. A supervised or
zero-shot job trains with the profile's `train` section as it is; ablation variants apply
`plan.ablation_train` on top. `run_config(cfg, method, dataset)` is the configuration of the supervised job
of (method, dataset); `nextlocmoe train --method M --dataset D` trains exactly that configuration.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from ..config import ExperimentConfig, TrainConfig, config_hash, load_config, training_dict
from ..data.config import DataConfig
from ..data.prepare import prepare
from ..errors import ConfigError
from ..io import plain, provenance, remove_stale_temps, stable_hash, write_json_atomic
from ..metrics import Ranked, metrics_table, paired_comparison
from ..model.config import ModelConfig
from ..results import ID_COLUMNS, results_markdown, write_results
from ..shipped import SHIPPED_DIR, export_model, install_model, retraining, shipped_index
from ..train import train
from .datasets import DATASET_SOURCES, DatasetHandle, dataset_config
from .registry import ABLATIONS, get_experiment, get_method, methods

JOB_FORMAT_VERSION = 4      # bump when what a job stores changes: every cached result then misses (2: config_hash;
                            # 3: 95% intervals of Hit@k and MRR; 4: test ranks window by window)
MODEL_FORMAT_VERSION = 4    # the same for trained models (2: steps.csv; 3: key without profile name and plan;
                            # 4: popularity prior + copy mixture of the ranking head)


PAIRED_KS = (1, 10)         # the Hit@k of the paired comparisons in the tables (with MRR)
STALE_AFTER_S = 3600        # a temp file of an atomic write older than this in a shared folder is a killed write


def slug(*parts: str) -> str:
    """A file-name-safe job name: letters, digits, '.', '_' and '-' only."""
    return "-".join(re.sub(r"[^A-Za-z0-9._]+", "_", str(p)).strip("_") for p in parts)


def ranked_output(ranked: Ranked) -> dict[str, Any]:
    """A job's "metrics" and "ranks" (test ranks window by window, for the paired comparisons) from a Ranked."""
    return {"metrics": ranked.metrics(), "ranks": ranked.rank.tolist()}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------------
# configurations of jobs

def job_config(cfg: ExperimentConfig, data: DataConfig, model: ModelConfig,
               train_changes: dict[str, Any] | None = None) -> ExperimentConfig:
    """The profile's configuration with this data, this model and (ablations) these train fields changed."""
    out = copy.deepcopy(cfg)
    out.data, out.model = data, model
    if train_changes:
        out.train = dataclasses.replace(out.train, **train_changes)
    return out


def run_config(cfg: ExperimentConfig, method: str, dataset: str | None = None) -> ExperimentConfig:
    """What the supervised experiment trains for (method, dataset); dataset None = the plan's first dataset."""
    m = get_method(method)
    if m.family != "model":
        raise ConfigError(f"method '{method}' is not a trained model; expected one of "
                          f"{[x.name for x in methods(family='model')]}")
    return job_config(cfg, dataset_config(dataset or cfg.plan.datasets[0], cfg), m.model_config(cfg.model))


def budget_text(train: TrainConfig) -> str:
    """A training budget in words ("all" = no subsample): the epochs (periods of the stream, or whole passes)
    over the training windows, then the validation and test windows, e.g.
    "3 periods of 256 windows from 768 training windows, 250 val / 2000 test"."""
    def n(v: int | None) -> str:
        return "all" if v is None else str(v)
    test = train.max_test_windows if train.max_test_windows is not None else train.max_eval_windows
    if train.windows_per_epoch is not None:
        seen = (f"{train.epochs} periods of {train.windows_per_epoch} windows from {n(train.max_train_windows)} "
                "training windows")
    else:
        seen = f"{train.epochs} pass(es) over {n(train.max_train_windows)} training windows"
    return f"{seen}, {n(train.max_eval_windows)} val / {n(test)} test"


def resolve_config(profile: str, config_path: str | os.PathLike | None = None,
                   overrides: list[str] | tuple[str, ...] = (), plan: dict[str, Any] | None = None) -> ExperimentConfig:
    """load_config, then `plan` (a dict of plan fields: the Python form of `--set plan.<field>=...`), then the
    checks that need the registries (dataset names, ablation groups)."""
    cfg = load_config(profile, config_path, list(overrides))
    if plan:
        known = {f.name for f in dataclasses.fields(cfg.plan)}
        unknown = sorted(set(plan) - known)
        if unknown:
            raise ConfigError(f"plan overrides {unknown} are unknown; known: {sorted(known)}")
        cfg.plan = dataclasses.replace(cfg.plan, **{k: tuple(v) if isinstance(v, list) else v
                                                    for k, v in plan.items()}).validate()
    p = cfg.plan
    for name, ok, expected in (
            ("datasets", all(d in DATASET_SOURCES for d in p.datasets), f"names from {list(DATASET_SOURCES)}"),
            ("region_dataset", p.region_dataset in DATASET_SOURCES, f"one of {list(DATASET_SOURCES)}"),
            ("ablations", all(a in ABLATIONS for a in p.ablations), f"groups from {list(ABLATIONS)}")):
        if not ok:
            raise ConfigError(f"plan.{name}={getattr(p, name)!r} is invalid; expected {expected}")
    return cfg


# ---------------------------------------------------------------------------------------------------
# one experiment call

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
    """State of one experiment call: configuration, caches, counters and the rows of its table."""

    def __init__(self, name: str, profile: str, *, results_dir: str | os.PathLike = "results",
                 runs_dir: str | os.PathLike = "runs/experiments", cache_dir: str | os.PathLike = ".cache/windows",
                 force: bool = False, config_path: str | os.PathLike | None = None,
                 overrides: list[str] | tuple[str, ...] = (), plan: dict[str, Any] | None = None,
                 shipped_dir: str | os.PathLike = SHIPPED_DIR):
        self.experiment = get_experiment(name)
        self.name, self.profile = name, profile
        self.cfg = resolve_config(profile, config_path, overrides, plan)
        self.plan = self.cfg.plan
        self.results_dir, self.runs_dir, self.cache_dir = Path(results_dir), Path(runs_dir), Path(cache_dir)
        remove_stale_temps(self.results_dir, older_than_s=STALE_AFTER_S)   # shared folder: only old leftovers
        self.force = force
        self.shipped_root = Path(shipped_dir) / profile      # the shipped models (nextlocmoe.shipped)
        self.shipped = shipped_index(self.shipped_root)
        self.retrain = retraining()
        self.ships = name in self.plan.shipped_experiments
        self.computed = self.cached = self.trained = 0
        self.retrained: set[str] = set()
        self.jobs: list[dict[str, Any]] = []
        self.rows: list[dict[str, Any]] = []
        self.records: list[dict[str, Any]] = []          # every job's record, ranks included, in order
        # the row every other row of a dataset is paired against: records of one dataset -> one of them (or None)
        self.paired_reference: Callable[[list[dict[str, Any]]], dict[str, Any] | None] | None = None
        self.decisions: dict[str, Any] = {}
        self.datasets: dict[str, DatasetHandle] = {}
        self.t0 = time.perf_counter()

    # -- datasets -----------------------------------------------------------------------------------
    def dataset(self, name: str) -> DatasetHandle:
        if name not in self.datasets:
            self.datasets[name] = self.handle(name, dataset_config(name, self.cfg))
        return self.datasets[name]

    def handle(self, name: str, config: DataConfig) -> DatasetHandle:
        return DatasetHandle(name, config, lambda: prepare(config, cache_dir=self.cache_dir))

    def job_config(self, data: DataConfig, model: ModelConfig,
                   train_changes: dict[str, Any] | None = None) -> ExperimentConfig:
        return job_config(self.cfg, data, model, train_changes)

    # -- jobs ---------------------------------------------------------------------------------------
    def job(self, method: str, dataset: str, variant: str, key: dict[str, Any],
            compute: Callable[[Path], dict[str, Any]], kind: str | None = None) -> dict[str, Any]:
        """Run (or read from the cache) one job; `compute(job_dir)` returns {"metrics": {...}, ...details}."""
        kind = kind or get_method(method).kind
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
            ranks = out.pop("ranks", None)
            record = {"hash": h, "experiment": self.name, "method": method, "kind": kind, "dataset": dataset,
                      "variant": variant, "metrics": metrics, "ranks": ranks, "details": out, "key": key,
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
        self.records.append(record)
        return record

    def trained_model(self, cfg: ExperimentConfig, data: DatasetHandle, name: str | None = None,
                      ship: bool = True) -> dict[str, Any]:
        """The record of the model of `cfg` trained on `data`: from the run cache, else installed from the shipped
        models (checkpoints/<profile>, found by the same key), else trained here (and shipped, when the plan
        ships this experiment's models and `ship` is true: then `name` names its folder). NEXTLOCMOE_RETRAIN=1
        skips the shipped ones (make retrain)."""
        key = stable_hash({"config": training_dict(cfg), "data": data.fingerprint, "format": MODEL_FORMAT_VERSION})
        model_dir = self.runs_dir / "models" / slug(data.config.source, cfg.model.head, key)
        path = model_dir / "model.json"
        fresh = self.force and key not in self.retrained
        record = None if fresh else _read_json(path)
        if record is not None and (record.get("key") != key or (self.retrain and record.get("origin") == "shipped")):
            record = None
        if record is None and not (fresh or self.retrain) and key in self.shipped:
            record = {**install_model(self.shipped[key], model_dir), "dir": str(model_dir.relative_to(self.runs_dir))}
            write_json_atomic(path, record)
        if record is None:
            result = train(cfg, model_dir, windows=data.windows, resume=not fresh)
            written = json.loads((model_dir / "metrics.json").read_text())
            record = {"key": key, "config_hash": config_hash(cfg), "dir": str(model_dir.relative_to(self.runs_dir)),
                      "best_epoch": result.best_epoch, "val": result.val, "test": result.test,
                      "parameters": written.get("parameters"), "windows": written.get("windows"),
                      "train_wall_s": result.wall_s, "data": data.fingerprint, "dataset": data.name,
                      "test_ranks": written.get("test_ranks"), "origin": "trained"}
            write_json_atomic(path, record)
            self.trained += 1
            self.retrained.add(key)
        if self.ships and ship and record.get("origin") == "trained" and key not in self.shipped:
            name = name or slug(data.name, cfg.model.head, key[:8])
            shipped = export_model(model_dir, record, cfg, data.windows, self.shipped_root / name, name)
            record = {**shipped, "dir": record["dir"], "shipped": (self.shipped_root / name).as_posix()}
            write_json_atomic(path, record)
            self.shipped[key] = self.shipped_root / name
        return record

    # -- outputs ------------------------------------------------------------------------------------
    def paired_rows(self) -> list[dict[str, Any]]:
        """Every row with test ranks against its dataset's reference row (`paired_reference`), on the same
        windows: `metrics.paired_comparison` as metrics "paired_hit@1", "paired_hit@1_lo/_hi/_p", the same for
        hit@10 and mrr (differences: row minus reference). The reference of each dataset goes to decisions."""
        if self.paired_reference is None:
            return []
        rows, chosen = [], {}
        for dataset in dict.fromkeys(r["dataset"] for r in self.records):
            group = [r for r in self.records if r["dataset"] == dataset]
            reference = self.paired_reference(group)
            if reference is None or not reference.get("ranks"):
                continue
            chosen[dataset] = {"method": reference["method"], "variant": reference["variant"]}
            rows.append({"experiment": self.name, "method": reference["method"], "kind": reference["kind"],
                         "dataset": dataset, "variant": reference["variant"], "paired_reference": 1.0})
            for r in group:
                if r is reference or not r.get("ranks") or len(r["ranks"]) != len(reference["ranks"]):
                    continue
                c = paired_comparison(r["ranks"], reference["ranks"], ks=PAIRED_KS)
                values = {}
                for m in [f"hit@{k}" for k in PAIRED_KS] + ["mrr"]:
                    values.update({f"paired_{m}": c[f"{m}_diff"], f"paired_{m}_lo": c[f"{m}_lo"],
                                   f"paired_{m}_hi": c[f"{m}_hi"], f"paired_{m}_p": c[f"{m}_p"]})
                rows.append({"experiment": self.name, "method": r["method"], "kind": r["kind"], "dataset": dataset,
                             "variant": r["variant"], **values})
        self.decisions["paired_reference"] = chosen
        return rows

    def finish(self, notes: list[str]) -> ExperimentResult:
        table = metrics_table(self.rows + self.paired_rows(), id_columns=ID_COLUMNS)
        notes = notes + [f"Paired reference on {dataset}: {ref['method']}"
                         + ("" if ref["variant"] == "default" else f" [{ref['variant']}]")
                         for dataset, ref in self.decisions.get("paired_reference", {}).items()]
        wall = time.perf_counter() - self.t0
        checksums = {h.name: h.checksum for h in self.datasets.values()}
        stamp = provenance(self.profile, seed=self.cfg.train.seed, data_checksum=checksums,
                           experiment=self.name, command=f"nextlocmoe run {self.name} --profile {self.profile}",
                           wall_s=wall, plan=plain(dataclasses.asdict(self.plan)), profile_config=self.cfg.to_dict(),
                           decisions=self.decisions, notes=notes, jobs=self.jobs, jobs_computed=self.computed,
                           jobs_cached=self.cached, models_trained=self.trained)
        markdown = results_markdown(table, self.name, self.profile, notes, self.experiment.description,
                                    self.experiment.layout)
        paths = write_results(self.results_dir, self.name, table, markdown, stamp)
        return ExperimentResult(self.name, self.profile, table, paths, self.jobs, self.computed, self.cached,
                                self.trained, wall, self.decisions)


def run_experiment(name: str, profile: str = "smoke", *, results_dir: str | os.PathLike = "results",
                   runs_dir: str | os.PathLike = "runs/experiments", cache_dir: str | os.PathLike = ".cache/windows",
                   force: bool = False, config_path: str | os.PathLike | None = None,
                   overrides: list[str] | tuple[str, ...] = (), plan: dict[str, Any] | None = None,
                   **options: Any) -> ExperimentResult:
    """Run registered experiment `name` under `profile` and write results/<name>.{csv,md,json}.

    results_dir  receives <name>.csv, <name>.md and <name>.json
    runs_dir     job results and trained models (the cache); force=True recomputes every job of this call
    overrides    `section.field=value` config overrides, as on the command line
    plan         plan fields to replace (e.g. {"ablations": ("no_location_moe",)}): `--set plan.<field>` from Python
    options      passed to the experiment (zero_shot: humob_paths; supervised: methods)
    """
    runner = Runner(name, profile, results_dir=results_dir, runs_dir=runs_dir, cache_dir=cache_dir, force=force,
                    config_path=config_path, overrides=overrides, plan=plan)
    options = {k: v for k, v in options.items() if v is not None}
    try:
        inspect.signature(runner.experiment.run).bind(runner, **options)
    except TypeError:
        raise ConfigError(f"experiment '{name}' takes no option(s) {sorted(options)}") from None
    notes = runner.experiment.run(runner, **options)
    result = runner.finish(notes)
    print(f"{name} ({profile}): {result.computed} job(s) computed, {result.cached} from cache, "
          f"{result.trained} model(s) trained, {result.wall_s:.1f} s -> {result.paths['md']}", file=sys.stderr)
    return result
