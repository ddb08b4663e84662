"""Named experiments that regenerate the paper's tables by profile (paper Sec. 5; docs/design.md §7).

    supervised   every supervised method x dataset, all on the SAME windows, splits, candidates and test
                 subsample (supervised.py)
    zero_shot    train on one city (or one half of a city), test on another without fine-tuning (zero_shot.py)
    ablations    NextLocMoE variants, each at the same budget (ablations.py)
    efficiency   parameters, training / inference speed, latency and memory; NextLocMoE vs LLM-Mob generation
                 (efficiency.py)

`run_experiment(name, profile)` runs one experiment and writes results/<name>.csv (tidy: experiment, method,
kind, dataset, variant, metric, value), results/<name>.md (a readable pivot) and results/<name>.json
(provenance: git SHA, profile, device, packages, data checksums, seed, wall time, the plan and every job).
`nextlocmoe run <name> --profile <profile>` is the same from a shell.

Layout: registry.py (methods, experiments, ablation groups), core.py (the runner: job cache, shared trained
models, results), datasets.py (datasets by name, the city-halves rule), methods.py (the registered methods and
their job bodies), then one file per experiment, each registering itself on import.
"""

from . import ablations as _ablations  # noqa: F401  (each recipe registers itself)
from . import efficiency as _efficiency  # noqa: F401
from . import supervised as _supervised  # noqa: F401
from . import zero_shot as _zero_shot  # noqa: F401
from .ablations import ablation_variants, choose_ablation_head
from .core import ExperimentResult, Runner, budget_text, job_config, resolve_config, run_config, run_experiment
from .datasets import DATASET_SOURCES, DatasetHandle, dataset_config, home_regions, second_city
from .efficiency import backbone_overhead, measure_generation, measure_model
from .methods import COMPACT_STAND_IN, LLMMobRunner, head_method
from .registry import (ABLATIONS, EXPERIMENTS, METHODS, Experiment, Method, experiment_names, get_experiment,
                       get_method, methods, register_ablation, register_experiment, register_method,
                       unregister_method)
from .supervised import (TrainedModel, best_supervised_model, no_balance_model, plan_datasets, supervised_model,
                         write_training_summary)
from .zero_shot import transfer_ranks


def supervised(profile: str = "smoke", **options) -> ExperimentResult:
    """Experiment 3: every method x dataset of the profile on the same windows (see run_experiment)."""
    return run_experiment("supervised", profile, **options)


def zero_shot(profile: str = "smoke", **options) -> ExperimentResult:
    """Experiment 4: synthetic A -> B, city halves west -> east, HuMob cities when given (see run_experiment)."""
    return run_experiment("zero_shot", profile, **options)


def ablations(profile: str = "smoke", **options) -> ExperimentResult:
    """Experiment 5: NextLocMoE variants at one budget (see run_experiment)."""
    return run_experiment("ablations", profile, **options)


def efficiency(profile: str = "smoke", **options) -> ExperimentResult:
    """Experiment 6: parameters, speed, latency and memory; NextLocMoE vs LLM-Mob (see run_experiment)."""
    return run_experiment("efficiency", profile, **options)
