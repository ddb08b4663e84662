"""The registered methods (rows of the tables) and the two job bodies every experiment uses.

    popularity, last_location, user_most_frequent, markov, lstm, transformer, transformer_pointer
                        classical baselines (nextlocmoe.baselines); transformer_pointer carries this project's
                        copy mixture, to ask what the LLM and the MoEs add beyond a small model with the same head
    nextlocllm          NextLocLLM-style: same backbone and prompt, regression head + KD-tree, no MoE and no
                        router; a peft LoRA on every FFN gives it trainable capacity inside the backbone
    nextlocmoe          the paper's model: both MoEs, the history router, regression head + KD-tree
    nextlocmoe_ranking  the same with this project's ranking head
    llm_mob             LLM-Mob-style prompting of the generative backbone (zero-shot and efficiency only)

`baseline_job` fits a baseline on the (subsampled) training split and tests it; `model_job` trains (or
reuses) a model and reports the test metrics of its best-validation checkpoint. Both go through the runner's
job cache (core.py).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from ..baselines import BASELINES, NeuralBaselineConfig, evaluate_baseline, rank_baseline
from ..config import ExperimentConfig, config_hash, training_dict
from ..model.backbone import RANDOM_BACKBONES
from ..model.compact import is_compact_dir
from ..model.config import ModelConfig
from ..runs import limited
from ..runtime import pick_device
from ..window_scorers import make_scorer
from .core import Runner, ranked_output, slug
from .datasets import DatasetHandle
from .registry import Method, register_method


def _counting(name: str):
    return lambda plan, seed: BASELINES[name]()


def _neural(name: str):
    def make(plan, seed):
        budget = plan.baseline_budget(name)
        return BASELINES[name](NeuralBaselineConfig(epochs=budget["epochs"], patience=budget["patience"], seed=seed))
    return make


# figure colours are the report's (nextlocmoe/report/style.py); tests/test_report_style.py checks every
# method registered here has one
for _order, (_name, _label, _make) in enumerate([
        ("popularity", "most popular training target, same for everyone", _counting("popularity")),
        ("last_location", "the current place again (stay where you are; popularity for the rest)",
         _counting("last_location")),
        ("window_centroid", "the places nearest the mean position of the window (the regression head's floor)",
         _counting("window_centroid")),
        ("user_most_frequent", "most frequent place of the window's own records (popularity breaks ties)",
         _counting("user_most_frequent")),
        ("markov", "first-order transitions from the current place (smoothed, popularity prior)",
         _counting("markov")),
        ("lstm", "LSTM classifier over the window's place ids and times", _neural("lstm")),
        ("transformer", "MHSA-style (causal transformer) classifier over the window", _neural("transformer")),
        ("transformer_pointer", "the same transformer with the ranking head's copy mixture over the window's places",
         _neural("transformer_pointer"))]):
    register_method(Method(_name, "baseline", "baseline", _label, make=_make, order=10 + _order))


# the tuned training-free scorers (nextlocmoe.window_scorers): the floor every learned model must clear
for _order, (_name, _label) in enumerate([
        ("window_recency", "training-free: the window's places weighted by recency (half-life chosen on validation)"),
        ("window_time", "training-free: the window's places weighted by closeness to the next visit's hour, "
                        "weekday and day type (chosen on validation)"),
        ("window_time_recency", "training-free: recency and closeness to the next visit's time together (chosen on "
                                "validation)")]):
    register_method(Method(_name, "baseline", "baseline", _label, make=lambda plan, seed, name=_name: make_scorer(name),
                           order=18 + _order))


def _nextlocllm(base: ModelConfig) -> ModelConfig:
    return dataclasses.replace(base, head="regression", use_location_moe=False, use_personalized_moe=False,
                               use_history_router=False, dense_lora=True)


register_method(Method("nextlocllm", "baseline", "model", "NextLocLLM-style: same backbone and prompt, regression "
                       "head, no MoE, no router, LoRA on every FFN", model_config=_nextlocllm, order=20))
register_method(Method("nextlocmoe", "paper method", "model", "NextLocMoE as in the paper (regression head + KD-tree)",
                       model_config=lambda base: dataclasses.replace(base, head="regression"), order=30))
register_method(Method("nextlocmoe_absolute", "ablation", "model", "NextLocMoE with the paper's absolute regression "
                       "point (no offset from the current place; docs/design.md §3.6)",
                       model_config=lambda base: dataclasses.replace(base, head="regression", regression_offset=False),
                       order=32))
register_method(Method("nextlocmoe_ranking", "extension", "model", "NextLocMoE with this project's ranking head "
                       "(candidate softmax + copy mixture over the window)",
                       model_config=lambda base: dataclasses.replace(base, head="ranking"), order=31))
register_method(Method("llm_mob", "baseline", "prompted", "LLM-Mob-style: the generative backbone prompted with the "
                       "visits as text, no training", supervised=False, order=40))


def head_method(head: str) -> str:
    """The model method of NextLocMoE with this head."""
    return "nextlocmoe" if head == "regression" else "nextlocmoe_ranking"


# ---------------------------------------------------------------------------------------------------
# job bodies

def _budget(cfg: ExperimentConfig, *fields: str) -> dict[str, Any]:
    return {k: getattr(cfg.train, k) for k in fields}


def baseline_job(runner: Runner, method: Method, data: DatasetHandle, cfg: ExperimentConfig,
                 variant: str = "default") -> dict[str, Any]:
    """Fit a classical baseline on plan.baseline_train_windows training windows (None = all; a neural one on its
    plan.baseline_budget, stopping early on validation Hit@10) and test it on the same validation and test windows
    as every other method."""
    model = method.make(runner.plan, cfg.train.seed)
    baseline_cfg = getattr(model, "cfg", None)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, max_train_windows=runner.plan.baseline_budget(method.name)["train_windows"]))
    key = {"data": data.fingerprint,
           "budget": _budget(cfg, "max_train_windows", "max_eval_windows", "max_test_windows", "seed"),
           "baseline_config": baseline_cfg.to_dict() if hasattr(baseline_cfg, "to_dict") else None}

    def compute(job_dir: Path) -> dict[str, Any]:
        windows = limited(data.windows, cfg)
        model.fit(windows)
        extra = {}
        if hasattr(model, "loss_history"):   # the neural ones: their training curve and the epoch kept
            extra = {"loss_history": model.loss_history, "val_history": model.val_history,
                     "best_epoch": model.best_epoch, "fit_seconds": model.fit_seconds}
        if hasattr(model, "fit_details"):    # the tuned scorers: the parameters chosen on validation
            extra = model.fit_details()
        return {**ranked_output(rank_baseline(model, windows, "test")),
                "val": evaluate_baseline(model, windows, "val"),
                "windows": {s: windows.n_windows(s) for s in ("train", "val", "test")}, **extra}

    return runner.job(method.name, data.name, variant, key, compute)


def model_job(runner: Runner, method: str, data: DatasetHandle, cfg: ExperimentConfig, variant: str = "default",
              kind: str | None = None, label: str | None = None) -> dict[str, Any]:
    """Train (or reuse) a model and report its test metrics (best checkpoint by validation Hit@10); `label`
    names the dataset column when it is not the data's own name (zero-shot pairs)."""
    key = {"config": training_dict(cfg), "data": data.fingerprint}

    def compute(job_dir: Path) -> dict[str, Any]:
        model = runner.trained_model(cfg, data, name=slug(method, label or data.name, variant))
        return {"metrics": model["test"], "ranks": model.get("test_ranks"), "val": model["val"], "model_dir": model["dir"],
                "config_hash": config_hash(cfg), "best_epoch": model["best_epoch"],
                "parameters": model["parameters"], "windows": model["windows"]}

    return runner.job(method, label or data.name, variant, key, compute, kind=kind)


# ---------------------------------------------------------------------------------------------------
# the prompted method: LLM-Mob on the profile's backbone

COMPACT_STAND_IN = "smollm2-shape"


def is_compact_backbone(name: str) -> bool:
    return name.startswith("compact:") or (os.path.isdir(name) and is_compact_dir(name))


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
            from ..llm_mob import LLMMob

            device = pick_device()
            dtype = torch.bfloat16 if device.type == "cuda" else self.runner.cfg.model.torch_dtype
            # the full generative model (all layers): LLM-Mob prompts the whole LLM
            self._mob = LLMMob.from_backbone(self.backbone, None, dtype=dtype, device=device,
                                             seed=self.runner.cfg.model.seed)
        return self._mob

    def config(self):
        from ..llm_mob import LLMMobConfig

        plan, cfg = self.runner.plan, self.runner.cfg
        # a chat template only where the tokenizer has one (the random backbones' byte codec has none)
        chat = self.backbone not in RANDOM_BACKBONES
        return LLMMobConfig(max_history=plan.llm_mob_history, max_samples=plan.llm_mob_samples, seed=cfg.train.seed,
                            use_chat_template=chat, progress=True)

    def job(self, target: DatasetHandle, dataset_label: str, cfg: ExperimentConfig) -> dict[str, Any]:
        mob_cfg = self.config()
        key = {"backbone": self.backbone, "llm_mob": mob_cfg.to_dict(), "target": target.fingerprint,
               "budget": _budget(cfg, "max_eval_windows", "max_test_windows", "seed")}

        def compute(job_dir: Path) -> dict[str, Any]:
            mob = self.mob
            if mob_cfg.use_chat_template and mob.codec.chat is None:
                mob_cfg.use_chat_template = False
            windows = limited(target.windows, cfg)
            return {"metrics": mob.evaluate(windows, "test", mob_cfg), "backbone": self.backbone}

        return self.runner.job("llm_mob", dataset_label, "zero-shot (prompted, no training)", key, compute)

