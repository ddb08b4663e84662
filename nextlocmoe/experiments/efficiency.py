"""Experiment 6 (paper Sec. 5.5): parameters, training / inference speed, latency and memory of the model
methods, and NextLocMoE against LLM-Mob-style generation on the same hardware (the paper: "up to 600x").

Every time is `runtime.median_seconds` (warm-up, CUDA-synchronised, median) and every memory figure
`runtime.PeakMemory`: on a GPU torch.cuda.max_memory_allocated, on a CPU the process's peak resident set size
during the measurement (VmHWM, reset through /proc/self/clear_refs on Linux, else the process-lifetime
ru_maxrss); the results say which. Weights are untrained: speed does not depend on their values.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import ExperimentConfig, training_dict
from ..data.windows import Windows
from ..io import device_name
from ..llm_mob import batch_prompts, generation_throughput
from ..model import NextLocMoE, build_model, load_backbone
from ..model.backbone import RANDOM_BACKBONES
from ..model.config import ModelConfig
from ..runs import limited
from ..runtime import PeakMemory, median_seconds, pick_device, resolve_mixed_precision
from .core import Runner
from .methods import LLMMobRunner
from .registry import get_method, methods, register_experiment

def _batch(windows: Windows, split: str, size: int, device: torch.device) -> dict[str, torch.Tensor]:
    n = windows.n_windows(split)
    arrays = windows.batch(split, np.arange(size) % n)          # cycles when the split is smaller than `size`
    return {k: torch.from_numpy(v).to(device) for k, v in arrays.items()}


def measure_model(cfg: ExperimentConfig, windows: Windows, batch_sizes: tuple[int, ...], repeats: int,
                  warmup: int = 1) -> tuple[dict[str, float], dict[str, Any]]:
    """Parameters, training and inference throughput, latency and peak memory of one model (untrained weights:
    speed does not depend on their values). Returns (metrics, details)."""

    device = pick_device()
    autocast = resolve_mixed_precision(cfg.train.mixed_precision) == "bf16"
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, windows.stats, windows.candidates, windows.candidate_function,
                        windows.history + windows.current).to(device)
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

    device = device or pick_device()
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


@register_experiment("efficiency", order=4, notebook="05_efficiency.ipynb", layout="metrics",
                     description="Efficiency: parameters, training and inference speed, latency, memory.")
def efficiency(runner: Runner) -> list[str]:
    plan = runner.plan
    data = runner.dataset(plan.datasets[0])
    device_key = {"device": device_name(), "threads": torch.get_num_threads(), "torch": torch.__version__}
    records = {}
    for method in tqdm([m.name for m in methods(family="model")], desc="efficiency", unit="method", disable=None):
        cfg = runner.job_config(data.config, get_method(method).model_config(runner.cfg.model))
        key = {"config": training_dict(cfg), "data": data.fingerprint, "machine": device_key,
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
        cfg = runner.job_config(data.config, runner.cfg.model)
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
            cfg = runner.job_config(data.config, large_cfg)
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
