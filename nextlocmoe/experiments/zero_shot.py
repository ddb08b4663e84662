"""Experiment 4 (paper Sec. 5.3): train on one city (or one half of a city), test on another without tuning.

Pairs: synthetic A -> B; the plan's region dataset west -> east (a cross-REGION transfer: both halves share
one venue set); HuMob cities when the user gives their files (`--humob CITY=PATH`, the first is the source).

Decisions (docs/design.md §5):

* Normalisation and candidates. The source model keeps the source city's z-score and duration statistics:
  the target's windows are normalised with them (`Windows.stats` swapped), because a model trained on one
  scale has no other; a target city of another extent is then part of the shift that the number measures.
  Every place id the model maps to a place is the TARGET's (`NextLocMoE.set_candidates`): retrieval uses the
  target's candidates (its KD-tree), the regression origin is the target window's place that the scorer, with its
  parameters from the source, ranks first, and the ranking head scores the target's candidates, whose embeddings
  it computes from their coordinates and function as it did the source's. The one per-candidate parameter of the
  ranking head, its bias (the source's log popularity, then trained), restarts at 0 in the target, which has no
  training data; the copy mixture over the window's places has no per-place parameter and transfers whole.
* Reference rows: "trained on target" is NextLocMoE trained and tested on the target (what zero-shot gives
  up); "history only" is the user-most-frequent baseline with its popularity tie-break removed, so it uses
  nothing but the window's own records (no training at all); "training-free (parameters from the source)" is the
  tuned window scorer (nextlocmoe.window_scorers) with its parameters chosen on the source's validation split.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..baselines import make_baseline, rank_baseline
from ..config import ExperimentConfig, training_dict
from ..data.config import DataConfig
from ..data.windows import Windows
from ..errors import ConfigError
from ..evaluation import rank_split
from ..metrics import Ranked
from ..runs import limited, load_run
from ..runtime import pick_device
from .core import Runner, budget_text, ranked_output, slug
from .datasets import REGION_RULE, DatasetHandle, dataset_config, humob_config, region_handles, second_city
from ..window_scorers import make_scorer
from .methods import LLMMobRunner, model_job
from .registry import get_method, register_experiment

TRANSFER_METHODS = ("nextlocmoe", "nextlocmoe_ranking", "nextlocllm")
# source models trained in every reproduction instead of shipped: with them checkpoints/ would pass its 100 MiB
UNSHIPPED_SOURCES = ("nextlocmoe_ranking",)


def transfer_ranks(cfg: ExperimentConfig, model_dir: Path, source: Windows, target: Windows) -> Ranked:
    """Test ranks on `target` of the model trained on `source` (its weights in model_dir), without fine-tuning:
    inputs normalised with the SOURCE statistics, every place id mapped to the TARGET's candidates (module
    docstring); either head."""
    model = load_run(model_dir, source, cfg=cfg).model
    model.set_candidates(target.candidates, target.candidate_function)
    target = limited(dataclasses.replace(target, stats=source.stats), cfg)
    device = pick_device()
    return rank_split(model, target, "test", cfg.train.eval_batch_size, device=device, desc="zero-shot test")


def history_only_job(runner: Runner, target: DatasetHandle, label: str, cfg: ExperimentConfig) -> dict[str, Any]:
    key = {"target": target.fingerprint, "budget": {k: getattr(cfg.train, k) for k in ("max_eval_windows", "max_test_windows", "seed")}}

    def compute(job_dir: Path) -> dict[str, Any]:
        windows = limited(target.windows, cfg)
        model = make_baseline("user_most_frequent").fit(windows)
        model.popularity.counts = np.zeros_like(model.popularity.counts)   # no prior: only the window's records
        return ranked_output(rank_baseline(model, windows, "test"))

    return runner.job("user_most_frequent", label, "history only (no training)", key, compute)


ZERO_SHOT_SCORER = "window_time_recency"   # the tuned training-free scorer with every ingredient


def training_free_job(runner: Runner, source: DatasetHandle, target: DatasetHandle, label: str,
                      cfg: ExperimentConfig, name: str = ZERO_SHOT_SCORER) -> dict[str, Any]:
    """The tuned training-free scorer with its parameters chosen on the SOURCE's validation split, applied to the
    target's test windows with no popularity prior (the target has no training data): nothing but the window's own
    records and the next visit's time, so it transfers trivially."""
    budget = {k: getattr(cfg.train, k) for k in ("max_eval_windows", "max_test_windows", "seed")}
    key = {"source": source.fingerprint, "target": target.fingerprint, "budget": budget,
           "scorer": make_scorer(name, use_popularity=False).cfg.to_dict()}

    def compute(job_dir: Path) -> dict[str, Any]:
        chosen = make_scorer(name, use_popularity=False).fit(limited(source.windows, cfg))   # source val only
        windows = limited(target.windows, cfg)
        scorer = make_scorer(name, use_popularity=False).fit(windows, weights=chosen.weights)
        return {**ranked_output(rank_baseline(scorer, windows, "test")), **chosen.fit_details()}
    return runner.job(name, label, "training-free (parameters from the source)", key, compute)


@register_experiment("zero_shot", order=2, notebook="03_zero_shot.ipynb",
                     description="Zero-shot transfer: trained on the source (left of ->), tested on the target "
                                 "without fine-tuning.")
def zero_shot(runner: Runner, humob_paths: dict[str, str | DataConfig] | None = None,
              methods: tuple[str, ...] = TRANSFER_METHODS) -> list[str]:
    plan = runner.plan
    synthetic = dataset_config("synthetic", runner.cfg)
    pairs: list[tuple[DatasetHandle, DatasetHandle, dict[str, Any]]] = [
        (runner.handle("synthetic_A", synthetic), runner.handle("synthetic_B", second_city(synthetic)), {})]
    west, east, split = region_handles(plan.region_dataset, dataset_config(plan.region_dataset, runner.cfg))
    pairs.append((west, east, {"split": split}))
    if humob_paths:
        names = list(humob_paths)
        if len(names) < 2:
            raise ConfigError(f"zero-shot across HuMob cities needs at least two files, got {names}")
        cities = [runner.handle(f"humob_{n}", p if isinstance(p, DataConfig) else humob_config(p, runner.cfg))
                  for n, p in humob_paths.items()]
        pairs += [(cities[0], other, {}) for other in cities[1:]]

    mob = LLMMobRunner(runner)
    runner.paired_reference = lambda records: next((r for r in records if r["method"] == ZERO_SHOT_SCORER), None)
    regions = {}
    for source, target, extra in tqdm(pairs, desc="zero-shot pairs", unit="pair", disable=None):
        runner.datasets.setdefault(source.name, source)
        runner.datasets.setdefault(target.name, target)
        label = f"{source.name}->{target.name}"
        for method in methods:
            cfg = runner.job_config(source.config, get_method(method).model_config(runner.cfg.model),
                                    plan.zero_shot_train)
            key = {"config": training_dict(cfg), "source": source.fingerprint, "target": target.fingerprint}

            def compute(job_dir: Path, cfg=cfg, source=source, target=target, extra=extra) -> dict[str, Any]:
                model = runner.trained_model(cfg, source, name=slug(method, source.name, "zero_shot_source"),
                                             ship=method not in UNSHIPPED_SOURCES)
                ranked = transfer_ranks(cfg, runner.runs_dir / model["dir"], source.windows, target.windows)
                details = {**ranked_output(ranked), "model_dir": model["dir"], "source_test": model["test"]}
                if "split" in extra:
                    details["region"] = extra["split"]().summary()
                return details

            record = runner.job(method, label, "zero-shot", key, compute)
            if "region" in record["details"]:
                regions[label] = record["details"]["region"]
        # what zero-shot gives up: the paper's model trained on the target itself
        cfg = runner.job_config(target.config, get_method("nextlocmoe").model_config(runner.cfg.model),
                                plan.zero_shot_train)
        model_job(runner, "nextlocmoe", target, cfg, variant="trained on target", label=label)
        history_only_job(runner, target, label, cfg)   # a training-free floor: the window's own records
        training_free_job(runner, source, target, label, cfg)   # the tuned one, parameters from the source
        if mob.answers_meaningfully:
            mob.job(target, label, cfg)
    if not mob.answers_meaningfully:
        runner.decisions["llm_mob"] = (f"skipped: the backbone {runner.cfg.model.backbone} is a compact export, which "
                                       "cannot generate; the cpu profile's zero-shot table has the LLM-Mob rows")
    runner.decisions["regions"] = regions
    runner.decisions["zero_shot"] = {
        "normalisation": "source city statistics", "candidates": "target city", "heads": "regression and ranking",
        "ranking_bias": "reset to 0 (no popularity prior in the target)",
        "synthetic_B": dataclasses.asdict(second_city(synthetic).synthetic)}
    return [
        "zero-shot: trained on the source (left of ->), tested on the target's test split without fine-tuning; "
        "inputs normalised with the SOURCE statistics, every place id mapped to the TARGET's candidates (the KD-tree "
        "of the regression head, its origin, the places the ranking head scores).",
        "nextlocmoe_ranking: the ranking head scores the target's candidates from their coordinates and function; its "
        "per-candidate bias (the source's popularity) restarts at 0, so places the window never visits start equally "
        "likely, and the copy mixture over the window's places transfers whole. Untrained, it ranks the window's places "
        "like window_time with its parameters from the source (the training-free row below adds recency).",
        "trained on target: NextLocMoE trained and tested on the target (the supervised reference).",
        "history only: the most frequent place of the window's own records, no training and no popularity prior.",
        f"training-free (parameters from the source): {ZERO_SHOT_SCORER}, the window's own places weighted by recency "
        "and by closeness to the next visit's hour, weekday and day type, its four parameters chosen on the source's "
        "validation split; no popularity prior. It has no trained weights, so it transfers trivially.",
        "LLM-Mob: the generative backbone prompted with the visits as text; it answers a seeded subsample of the "
        "same test windows (its n is smaller); unparsable answers count as misses.",
        f"City halves: {REGION_RULE}. A west -> east pair is a cross-REGION transfer within one city (both halves "
        "share one venue set and one normalisation), not a transfer to another city.",
        f"Every model here trains at the zero-shot budget ({budget_text(runner.job_config(synthetic, runner.cfg.model, plan.zero_shot_train).train)}).",
    ]
