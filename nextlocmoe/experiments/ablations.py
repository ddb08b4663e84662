"""Experiment 5 (paper Sec. 5.4): NextLocMoE variants, each trained at the same budget on the plan's first
dataset. Every group below registers itself; `plan.ablations` lists the groups a profile runs.

Decisions (docs/design.md §5):

* Ablation head: with plan.ablation_head="auto" the two heads of NextLocMoE are compared on the ablation
  dataset at the supervised budget (training them if needed) and the one with the higher VALIDATION Hit@10
  is ablated (never the test split); the choice and both scores are recorded in results/ablations.json.
* Budget: the train section, changed by `plan.ablation_train` (e.g. fewer epochs on a GPU). With no change
  the "full" and "other head" variants are the supervised models themselves (one cached model each).
* Depth: the P-MoE layers keep their distance from the top of the stack (12 layers with P-MoE at 8 and 10
  -> 4 layers at 0 and 2, 8 layers at 4 and 6).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tqdm.auto import tqdm

from ..config import PlanConfig
from ..model.config import ModelConfig
from .core import Runner, budget_text, run_config, slug
from .datasets import DatasetHandle
from .methods import baseline_job, head_method, model_job
from .registry import ABLATIONS, get_method, register_ablation, register_experiment

Variants = dict[str, tuple[str, ModelConfig]]


@register_ablation("no_location_moe")
def _no_location_moe(base: ModelConfig, plan: PlanConfig) -> Variants:
    return {"no_location_moe": ("without the Location Semantics MoE", dataclasses.replace(base, use_location_moe=False))}


@register_ablation("no_personalized_moe")
def _no_personalized_moe(base: ModelConfig, plan: PlanConfig) -> Variants:
    return {"no_personalized_moe": ("without the Personalized MoE (dense frozen FFNs)",
                                    dataclasses.replace(base, use_personalized_moe=False))}


@register_ablation("no_history_router")
def _no_history_router(base: ModelConfig, plan: PlanConfig) -> Variants:
    return {"no_history_router": ("without the history-aware router (gates see zeros)",
                                  dataclasses.replace(base, use_history_router=False))}


@register_ablation("routing")
def _routing(base: ModelConfig, plan: PlanConfig) -> Variants:
    p = base.personalized
    other = "topk" if p.routing == "threshold" else "threshold"
    routed = dataclasses.replace(base, personalized=dataclasses.replace(p, routing=other))
    return {f"{other}_routing": (f"P-MoE {other} routing instead of {p.routing}", routed)}


@register_ablation("renormalize")
def _renormalize(base: ModelConfig, plan: PlanConfig) -> Variants:
    p = base.personalized
    name = "not_renormalized" if p.renormalize else "renormalized"
    text = ("kept P-MoE gate probabilities used as they are" if p.renormalize else
            "kept P-MoE gate probabilities divided by their sum (the experts' weights add up to 1)")
    return {name: (text, dataclasses.replace(base, personalized=dataclasses.replace(p, renormalize=not p.renormalize)))}


@register_ablation("prompt_history")
def _prompt_history(base: ModelConfig, plan: PlanConfig) -> Variants:
    if not base.use_prompt or not base.use_personalized_moe:
        return {}
    if base.prompt_reads_history:
        return {"prompt_without_history": ("the prompt tokens' P-MoE gates route with h = 0 (one shared prompt pass)",
                                           dataclasses.replace(base, prompt_reads_history=False))}
    return {"prompt_reads_history": ("the prompt tokens' P-MoE gates read the sample's h, as in the paper",
                                     dataclasses.replace(base, prompt_reads_history=True))}


@register_ablation("experts")
def _experts(base: ModelConfig, plan: PlanConfig) -> Variants:
    p = base.personalized
    return {f"experts_{n}": (f"{n} role expert(s) instead of {p.num_experts}", dataclasses.replace(
        base, personalized=dataclasses.replace(p, num_experts=n, top_k=min(p.top_k, n))))
        for n in plan.expert_counts if n != p.num_experts}


def shift_pmoe_layers(base: ModelConfig, depth: int) -> tuple[int, ...]:
    """P-MoE layers at the same distance from the top of a `depth`-layer stack as in `base`."""
    offsets = [base.num_layers - i for i in base.pmoe_layers]
    layers = sorted(depth - o for o in offsets if depth - o >= 0)
    return tuple(layers) if layers else (depth - 1,)


@register_ablation("depth")
def _depth(base: ModelConfig, plan: PlanConfig) -> Variants:
    if base.num_layers is None:
        return {}
    out = {}
    for n in plan.depths:
        if n != base.num_layers:
            layers = shift_pmoe_layers(base, n)
            out[f"depth_{n}"] = (f"backbone truncated to {n} layers, P-MoE at {list(layers)}",
                                 dataclasses.replace(base, num_layers=n, pmoe_layers=layers))
    return out


@register_ablation("backbone_init")
def _backbone_init(base: ModelConfig, plan: PlanConfig) -> Variants:
    return {"random_backbone": ("randomly initialised backbone of the same shape",
                                dataclasses.replace(base, backbone_init="random"))}


@register_ablation("head")
def _head(base: ModelConfig, plan: PlanConfig) -> Variants:
    other = "ranking" if base.head == "regression" else "regression"
    return {f"{other}_head": (f"{other} head instead of {base.head}", dataclasses.replace(base, head=other))}


@register_ablation("pointer")
def _pointer(base: ModelConfig, plan: PlanConfig) -> Variants:
    if base.head != "ranking" or not base.ranking_pointer:   # the copy mixture belongs to the ranking head
        return {}
    return {"no_pointer": ("ranking head without the copy mixture over the window's places",
                           dataclasses.replace(base, ranking_pointer=False))}


@register_ablation("next_visit_time")
def _next_visit_time(base: ModelConfig, plan: PlanConfig) -> Variants:
    if not base.next_visit_time:
        return {}
    return {"no_next_visit_time": ("no explicit next-visit time (the paper's inputs: the last duration only)",
                                   dataclasses.replace(base, next_visit_time=False))}


@register_ablation("prompt")
def _prompt(base: ModelConfig, plan: PlanConfig) -> Variants:
    name = "no_prompt" if base.use_prompt else "with_prompt"
    return {name: ("without the task prompt" if base.use_prompt else "with the task prompt",
                   dataclasses.replace(base, use_prompt=not base.use_prompt))}


def ablation_variants(base: ModelConfig, plan: PlanConfig) -> Variants:
    """variant name -> (description, ModelConfig); "full" is `base` itself (the head is already chosen)."""
    variants: Variants = {"full": ("the full model", base)}
    for group in plan.ablations:
        variants.update(ABLATIONS[group].variants(base, plan))
    return variants


def choose_ablation_head(runner: Runner, data: DatasetHandle) -> dict[str, Any]:
    """The head the ablations use: fixed by the plan, or the one with the higher validation Hit@10 in the
    supervised setting (both models trained at the supervised budget, shared with that experiment's cache)."""
    plan = runner.plan
    if plan.ablation_head != "auto":
        return {"head": plan.ablation_head, "rule": "fixed by the plan"}
    val = {}
    for head in ("regression", "ranking"):
        cfg = run_config(runner.cfg, head_method(head), data.name)
        val[head] = runner.trained_model(cfg, data, name=slug(head_method(head), data.name, "default"))["val"]["hit@10"]
    head = "ranking" if val["ranking"] > val["regression"] else "regression"   # a tie keeps the paper's head
    return {"head": head, "rule": "higher validation Hit@10 of the supervised models (tie: regression)",
            "val_hit@10": val}


ABLATION_FLOOR = "window_time"
FLOOR_VARIANT = "training-free floor"


@register_experiment("ablations", order=3, notebook="04_ablations.ipynb",
                     description="Ablations of NextLocMoE, every variant at the same budget.")
def ablations(runner: Runner) -> list[str]:
    plan = runner.plan
    data = runner.dataset(plan.datasets[0])
    choice = choose_ablation_head(runner, data)
    runner.paired_reference = lambda records: next((r for r in records if r["variant"] == "full"), None)
    runner.decisions["ablation_head"] = choice
    method = head_method(choice["head"])
    variants = ablation_variants(get_method(method).model_config(runner.cfg.model), plan)
    descriptions = {}
    for variant, (description, model_cfg) in tqdm(variants.items(), desc="ablations", unit="variant", disable=None):
        cfg = runner.job_config(data.config, model_cfg, plan.ablation_train)
        kind = get_method(method).kind if variant == "full" else "ablation"
        model_job(runner, method, data, cfg, variant=variant, kind=kind)
        descriptions[variant] = description
    # the floor on the same test windows: the tuned scorer the ranking head starts from (paired like a variant)
    floor_cfg = runner.job_config(data.config, runner.cfg.model, plan.ablation_train)
    baseline_job(runner, get_method(ABLATION_FLOOR), data, floor_cfg, variant=FLOOR_VARIANT)
    descriptions[FLOOR_VARIANT] = (f"{ABLATION_FLOOR}, the tuned training-free scorer the ranking head starts from, "
                                   "on the same test windows (no training)")
    runner.decisions["variants"] = descriptions
    budget = budget_text(runner.job_config(data.config, runner.cfg.model, plan.ablation_train).train)
    return [f"Ablation head: {choice['head']} ({choice['rule']}).",
            f"Every variant trains at the same budget ({budget}) on {data.name}."] + \
           [f"{name}: {text}" for name, text in descriptions.items()]
