"""The three registries of the harness: methods, experiments and ablation groups.

Everything that lists methods or experiments reads these tables: the supervised experiment's rows, the CLI's
choices (`nextlocmoe run <experiment>`, `nextlocmoe train --method`) and the notebook list (nextlocmoe.notebooks).
The report layer does not: it reads the results files (each row carries its method's kind) and owns how it
draws and words them (colours: nextlocmoe/report/style.py, wording: nextlocmoe/report/summaries.py), so that
figures and summaries never import this package (core -> train -> torch). A test checks that every method
registered here has a colour there.

Adding a method is one `register_method(Method(...))` call (README, "Add a method"); adding an experiment is
one file with a function decorated by `@register_experiment(...)` (README, "Add an experiment"); adding an
ablation is one function decorated by `@register_ablation(name)` in ablations.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from ..errors import ConfigError

if TYPE_CHECKING:   # only for annotations: the registry imports nothing heavy
    from ..config import PlanConfig
    from ..model.config import ModelConfig

KINDS = ("paper method", "extension", "baseline", "ablation", "comparison", "reference")
FAMILIES = ("model", "baseline", "prompted")


@dataclass(frozen=True)
class Method:
    """One row family of the results tables.

    family "model":    a NextLocMoE-class network trained by `nextlocmoe.train`; `model_config(base)` derives its
                       ModelConfig from the profile's model section
    family "baseline": `make(plan, seed)` returns an object with `fit(windows)` and `score(batch)`
                       (nextlocmoe.baselines.Baseline), fitted on the training split and scored like every method
    family "prompted": a generative LLM prompted without training (LLM-Mob); run by the zero-shot experiment
    """
    name: str
    kind: str                                    # one of KINDS: written into every results row (the report
                                                 # takes legend text and bar hatch from there)
    family: str                                  # one of FAMILIES
    label: str                                   # one line that says what the method is (read by people; the
                                                 # report shows method names, not this)
    supervised: bool = True                      # a row of the supervised table
    model_config: Callable[["ModelConfig"], "ModelConfig"] | None = None
    make: Callable[["PlanConfig", int], Any] | None = None
    order: int = 100                             # position in tables (lower first); ties keep registration order

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"method '{self.name}': kind '{self.kind}' is invalid; expected one of {list(KINDS)}")
        if self.family not in FAMILIES:
            raise ConfigError(f"method '{self.name}': family '{self.family}' is invalid; expected {list(FAMILIES)}")
        if self.family == "model" and self.model_config is None:
            raise ConfigError(f"method '{self.name}': a model method needs model_config(base) -> ModelConfig")
        if self.family == "baseline" and self.make is None:
            raise ConfigError(f"method '{self.name}': a baseline method needs make(plan, seed) -> Baseline")


@dataclass(frozen=True)
class Experiment:
    """One results table: `run(runner)` adds its rows to the runner and returns the notes printed under it."""
    name: str
    run: Callable[[Any], list[str]]
    description: str                             # first line of results/<name>.md
    notebook: str                                # the notebook that shows it
    order: int                                   # position in `nextlocmoe run all` and in the notebook list
    layout: str = "methods"                      # .md pivot: "methods" (a row per method) or "metrics" (a row per
                                                 # metric, a column per method: the efficiency table)


@dataclass(frozen=True)
class AblationGroup:
    """`variants(base, plan)` -> {variant name: (description, ModelConfig)}; "full" is never among them."""
    name: str
    variants: Callable[["ModelConfig", "PlanConfig"], dict[str, tuple[str, "ModelConfig"]]]


METHODS: dict[str, Method] = {}
EXPERIMENTS: dict[str, Experiment] = {}
ABLATIONS: dict[str, AblationGroup] = {}


def register_method(method: Method, *, replace: bool = False) -> Method:
    if method.name in METHODS and not replace:
        raise ConfigError(f"method '{method.name}' is registered already (pass replace=True to redefine it)")
    METHODS[method.name] = method
    return method


def unregister_method(name: str) -> None:
    METHODS.pop(name, None)


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"method '{name}' is unknown; expected one of {list(METHODS)}")
    return METHODS[name]


def methods(*, family: str | None = None, supervised: bool | None = None) -> list[Method]:
    """Registered methods in table order, optionally only one family or only the supervised rows."""
    found = [m for m in METHODS.values() if (family is None or m.family == family)
             and (supervised is None or m.supervised == supervised)]
    return sorted(found, key=lambda m: m.order)


def register_experiment(name: str, *, description: str, notebook: str, order: int, layout: str = "methods"
                        ) -> Callable[[Callable[[Any], list[str]]], Callable[[Any], list[str]]]:
    """Decorator: register `run(runner) -> notes` as experiment `name` (how its summary is worded is the
    report's: report.summaries.WORDING)."""
    def wrap(run: Callable[[Any], list[str]]) -> Callable[[Any], list[str]]:
        if name in EXPERIMENTS:
            raise ConfigError(f"experiment '{name}' is registered already")
        EXPERIMENTS[name] = Experiment(name, run, description, notebook, order, layout)
        return run
    return wrap


def get_experiment(name: str) -> Experiment:
    if name not in EXPERIMENTS:
        raise ConfigError(f"experiment '{name}' is unknown; expected one of {experiment_names()}")
    return EXPERIMENTS[name]


def experiment_names() -> list[str]:
    return [e.name for e in sorted(EXPERIMENTS.values(), key=lambda e: e.order)]


def register_ablation(name: str) -> Callable[[Callable], Callable]:
    """Decorator: register `variants(base, plan)` as ablation group `name` (plan.ablations lists groups)."""
    def wrap(variants: Callable) -> Callable:
        if name in ABLATIONS:
            raise ConfigError(f"ablation group '{name}' is registered already")
        ABLATIONS[name] = AblationGroup(name, variants)
        return variants
    return wrap
