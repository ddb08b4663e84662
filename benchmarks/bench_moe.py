"""Cost of the Personalized MoE layer against a dense FFN of the same width (docs/design.md §3.5, §4.10).

Forward + backward time (frozen base weights, gradients to the input and to every trainable parameter) of:

    ffn                   the plain frozen LlamaMLP, the layer the MoE replaces
    lora_ffn              the same FFN with one LoRA (r=16) on gate/up/down: a NextLocLLM-style dense layer
    moe_threshold         PersonalizedMoE, 11 experts, threshold routing, gate as initialised (near-uniform
                          probabilities, so the cap of 5 experts per token binds: the costly case)
    moe_threshold_sharp   the same with the gate's output scaled until ~2 experts per token are kept, as
                          after training with the entropy penalty
    moe_topk2             PersonalizedMoE, top-2 routing
    naive_threshold       the reference formulation: 11 deep copies of the FFN, every expert on every token

Every MoE method is timed once per `expert_compute` formulation (grouped, pairs; column
`expert_compute`), all in the same round-robin, so the formulations are compared under the same load. The
reference `naive_threshold` and the dense layers appear once.

The run also prints (and stores in the JSON, key "cost_model") the floor: the FLOPs of the dense FFN's
forward + backward against the extra FLOPs of the expert terms per selected (token, expert) pair, and the
F-wide memory traffic of those terms as each formulation runs them (see `cost_model`).

Measured at SmolLM2 width (d 576, ffn 1536; 32 x 80 tokens) and at LLaMA-3.2-3B width (d 3072, ffn 8192; fewer
tokens on a CPU). Methods are timed round-robin (one repeat of each in turn) after warm-up, so a change in
background load affects all of them alike; the table gives medians. Target: moe_threshold <= 1.5 x ffn.

Usage:  python benchmarks/bench_moe.py [--device cpu|cuda] [--dtype fp32|bf16] [--repeats 7] [--results results]
Writes results/bench_moe.csv and results/bench_moe.json (with provenance).
"""

from __future__ import annotations

import argparse
import functools
import io
import os
import statistics
import sys
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from nextlocmoe.errors import ConfigError
from nextlocmoe.io import provenance, write_json_atomic, write_text_atomic
from nextlocmoe.runtime import time_once
from nextlocmoe.model.config import EXPERT_COMPUTES, PersonalizedMoEConfig
from nextlocmoe.model.personalized_moe import LoRAExpertFFN, NaivePersonalizedMoE, PersonalizedMoE

HISTORY_DIM = 176   # TCN history summary width (reference)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Width:
    name: str
    d_model: int
    d_ffn: int
    batch: int
    seq: int


def widths_for(device: str) -> list[Width]:
    on_gpu = device.startswith("cuda")
    return [
        Width("smollm2", 576, 1536, 32, 80),                                          # SmolLM2-135M
        Width("llama3.2-3b", 3072, 8192, 32 if on_gpu else 2, 80 if on_gpu else 40),  # LLaMA-3.2-3B
    ]


def sharpen_gate(moe: PersonalizedMoE, hidden, history, target_mean: float = 2.0) -> None:
    """Scale the gate's output layer until threshold routing keeps about `target_mean` experts per token."""
    with torch.no_grad():
        for _ in range(20):
            if moe(hidden, history).selected.sum(-1).float().mean() <= target_mean:
                return
            moe.gate.proj_out.weight.mul_(1.5)


def build(width: Width, device: str, dtype: torch.dtype, seed: int, lora_dropout: float = 0.02,
          expert_computes: tuple[str, ...] = ("auto",)) -> dict[str, tuple[nn.Module, bool]]:
    """Every method at this width: name -> (module, is_moe)."""
    torch.manual_seed(seed)
    mlp = LlamaMLP(LlamaConfig(hidden_size=width.d_model, intermediate_size=width.d_ffn)).to(device, dtype)
    mlp.requires_grad_(False)
    role_keys = torch.randn(11, width.d_model)
    cfg = PersonalizedMoEConfig(lora_dropout=lora_dropout)

    def moe(**overrides) -> PersonalizedMoE:
        layer_cfg = PersonalizedMoEConfig(lora_dropout=lora_dropout, **overrides)
        layer = PersonalizedMoE(mlp, HISTORY_DIM, role_keys, layer_cfg).to(device, dtype)
        with torch.no_grad():   # non-zero B, as after some training (B = 0 would not change the cost)
            for name in ("lora_B_gate", "lora_B_up", "lora_B_down"):
                getattr(layer, name).normal_(0.0, 0.01)
        return layer

    lora_ffn = LoRAExpertFFN(mlp, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout).to(device, dtype)
    threshold = moe()
    methods = {"ffn": (mlp, False), "lora_ffn": (lora_ffn, False)}
    for compute in expert_computes:
        # every formulation shares the threshold layer's weights: same routing, same function
        for name, layer in (("moe_threshold", threshold), ("moe_threshold_sharp", threshold),
                            ("moe_topk2", threshold)):
            twin = moe(routing="topk") if name == "moe_topk2" else moe()
            twin.load_state_dict(layer.state_dict())
            twin.cfg.expert_compute = compute
            methods[f"{name}[{compute}]"] = (twin, True)
    methods["naive_threshold"] = (NaivePersonalizedMoE.from_efficient(threshold), True)
    return methods


def bench_width(width: Width, device: str, dtype: torch.dtype, repeats: int, warmup: int, seed: int,
                lora_dropout: float, expert_computes: tuple[str, ...]) -> list[dict]:
    methods = build(width, device, dtype, seed, lora_dropout, expert_computes)
    hidden = torch.randn(width.batch, width.seq, width.d_model, device=device, dtype=dtype)   # (B, T, D)
    history = torch.randn(width.batch, HISTORY_DIM, device=device, dtype=dtype)              # (B, D_h)
    readout = torch.randn_like(hidden)
    for name, (module, _) in methods.items():
        if name.startswith("moe_threshold_sharp"):
            sharpen_gate(module, hidden, history)
    for module, _ in methods.values():
        module.train()

    selections: dict[str, torch.Tensor] = {}   # read after timing: .item() inside a step would sync the GPU

    def step(name: str) -> Callable[[], None]:
        module, is_moe = methods[name]

        def run() -> None:
            x = hidden.detach().requires_grad_(True)
            if is_moe:
                out = module(x, history)
                loss = (out.output * readout).sum() + out.entropy
                selections[name] = out.selected
            else:
                loss = (module(x) * readout).sum()
            loss.backward()
            module.zero_grad(set_to_none=True)
        return run

    timer = functools.partial(time_once, device=device)   # synchronised wall time of one call
    runs = {name: step(name) for name in methods}
    for _ in range(warmup):
        for run in runs.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in tqdm(range(repeats), desc=f"{width.name} ({width.batch}x{width.seq} tokens)", file=sys.stderr):
        for name, run in runs.items():
            times[name].append(timer(run))

    active = {name: sel.sum(-1).float().mean().item() for name, sel in selections.items()}
    ffn_ms = statistics.median(times["ffn"]) * 1e3
    lora_ms = statistics.median(times["lora_ffn"]) * 1e3
    rows = []
    for name, (module, _) in methods.items():
        ms = statistics.median(times[name]) * 1e3
        rows.append({
            "width": width.name, "d_model": width.d_model, "d_ffn": width.d_ffn,
            "tokens": width.batch * width.seq, "method": name.split("[")[0],
            "median_ms": round(ms, 3), "min_ms": round(min(times[name]) * 1e3, 3),
            "max_ms": round(max(times[name]) * 1e3, 3),
            "x_ffn": round(ms / ffn_ms, 3), "x_lora_ffn": round(ms / lora_ms, 3),
            "active_experts": round(active[name], 2) if name in active else None,
            "expert_compute": resolved_compute(module, device),
            "trainable_params": sum(p.numel() for p in module.parameters() if p.requires_grad),
            "weight_params": sum(p.numel() for p in module.parameters()),
        })
    return rows


def resolved_compute(module: nn.Module, device: str) -> str:
    if isinstance(module, PersonalizedMoE):
        return module.resolved_expert_compute(torch.device(device))
    return "naive" if isinstance(module, NaivePersonalizedMoE) else "dense_ffn"


# F-wide memory passes per selected (token, expert) pair, forward + backward, counted from the code: every
# elementwise op, gather and scatter reads and/or writes one (pairs, F) row per pair. "grouped" runs the
# per-pair work through autograd (gathers of g0/u0 and their scatter-add backward, addmm, act, mul, weight,
# dropout, index_add, each with its backward); "fused" keeps nothing F-wide between forward and backward and
# recomputes g, u, a in the backward (9 passes forward, ~20 backward). A single fused kernel would need ~0:
# a pair's rank-16 codes and its expert's B fit in cache, only g0/u0/mixed per TOKEN touch memory.
F_WIDE_PASSES = {"grouped": 38, "fused": 29}


def cost_model(width: Width, bytes_per_element: int, lora_r: int = 16) -> dict:
    """The floor of the MoE's extra cost over the dense FFN, per token and per selected pair.

    Dense frozen FFN, forward + backward (gradient to the input only):  3 matmuls x 2 D F forward,
    3 x 2 D F backward = 12 D F FLOPs per token.
    Expert terms per pair: LoRA gate/up (D -> r -> F) and down (F -> r -> D), 2 r (D + F) FLOPs each
    forward; backward twice that (input and weight gradients): 18 r (D + F). The activation product
    act(g + dg_e) (u + du_e), its weighting and accumulation: ~10 F forward, ~20 F backward (negligible).
    Bytes: each F-wide pass moves F x bytes_per_element per pair; `F_WIDE_PASSES` counts the passes.
    """
    d, f = width.d_model, width.d_ffn
    ffn_flops = 12 * d * f
    pair_flops = 18 * lora_r * (d + f) + 30 * f
    return {
        "width": width.name, "d_model": d, "d_ffn": f, "bytes_per_element": bytes_per_element,
        "ffn_flops_per_token": ffn_flops,
        "pair_flops": pair_flops,
        "flop_floor_x_ffn_at_5_pairs": round(1 + 5 * pair_flops / ffn_flops, 3),
        "flop_floor_x_ffn_at_2_pairs": round(1 + 2 * pair_flops / ffn_flops, 3),
        "pair_bytes": {mode: passes * f * bytes_per_element for mode, passes in F_WIDE_PASSES.items()},
        "ffn_flops_per_pair_byte": {mode: round(ffn_flops / (passes * f * bytes_per_element), 1)
                                    for mode, passes in F_WIDE_PASSES.items()},
    }


def print_cost_model(costs: list[dict]) -> None:
    print("\nfloor (FLOPs): dense FFN fwd+bwd = 12 D F per token; expert terms = 18 r (D + F) + ~30 F per pair")
    for c in costs:
        print(f"  {c['width']:12s} FFN {c['ffn_flops_per_token'] / 1e6:7.1f} MFLOP/token, pair "
              f"{c['pair_flops'] / 1e6:5.2f} MFLOP -> FLOP floor {c['flop_floor_x_ffn_at_5_pairs']:.2f}x FFN at "
              f"5 pairs/token, {c['flop_floor_x_ffn_at_2_pairs']:.2f}x at 2; F-wide traffic per pair: "
              + ", ".join(f"{m} {b / 1e3:.0f} kB" for m, b in c["pair_bytes"].items())
              + " (the FFN does " + ", ".join(f"{v:g}" for v in c["ffn_flops_per_pair_byte"].values())
              + " FLOPs per token for each such byte per pair: the pairs are memory-bound)")


def to_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    columns = list(rows[0])
    out.write(",".join(columns) + "\n")
    for row in rows:
        out.write(",".join("" if row[c] is None else str(row[c]) for c in columns) + "\n")
    return out.getvalue()


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per method (medians reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--widths", default="smollm2,llama3.2-3b", help="comma-separated subset of the widths")
    parser.add_argument("--batch", type=int, default=None, help="override the batch size of every width")
    parser.add_argument("--seq", type=int, default=None, help="override the tokens per sample of every width")
    parser.add_argument("--results", default="results", help="folder for bench_moe.csv/.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: every core available). On a machine that other jobs keep busy, "
                             "fewer threads than cores avoids stalls at each operator's thread barrier")
    parser.add_argument("--expert-compute", default="grouped,pairs",
                        help="comma-separated PersonalizedMoE formulations to time side by side "
                             f"(any of {list(EXPERT_COMPUTES)})")
    parser.add_argument("--lora-dropout", type=float, default=0.02,
                        help="LoRA dropout of every method (reference 0.02; layers run in training mode)")
    args = parser.parse_args(argv)

    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = args.threads or available
    torch.set_num_threads(threads)
    dtype = DTYPES[args.dtype]
    chosen = set(args.widths.split(","))
    expert_computes = tuple(args.expert_compute.split(","))
    unknown = [c for c in expert_computes if c not in EXPERT_COMPUTES]
    if unknown:
        raise ConfigError(f"--expert-compute: {unknown} unknown; expected a comma-separated subset of "
                          f"{list(EXPERT_COMPUTES)}")
    rows = []
    for width in widths_for(args.device):
        if width.name in chosen:
            width.batch = args.batch or width.batch
            width.seq = args.seq or width.seq
            rows += bench_width(width, args.device, dtype, args.repeats, args.warmup, args.seed, args.lora_dropout,
                                expert_computes)

    header = (f"{'width':12s} {'tokens':>6s} {'method':20s} {'compute':9s} {'median ms':>10s} {'x ffn':>7s} "
              f"{'x lora_ffn':>10s} {'experts':>7s}")
    print(header)
    for r in rows:
        experts = "" if r["active_experts"] is None else f"{r['active_experts']:.2f}"
        print(f"{r['width']:12s} {r['tokens']:6d} {r['method']:20s} {r['expert_compute']:9s} {r['median_ms']:10.2f} "
              f"{r['x_ffn']:7.2f} {r['x_lora_ffn']:10.2f} {experts:>7s}")
    costs = [cost_model(w, torch.finfo(dtype).bits // 8) for w in widths_for(args.device) if w.name in chosen]
    print_cost_model(costs)

    write_text_atomic(os.path.join(args.results, "bench_moe.csv"), to_csv(rows))
    write_json_atomic(os.path.join(args.results, "bench_moe.json"), {
        "provenance": provenance("bench", seed=args.seed, device_arg=args.device, dtype=args.dtype,
                                 threads=threads, repeats=args.repeats, warmup=args.warmup,
                                 lora_dropout=args.lora_dropout, expert_compute=args.expert_compute),
        "cost_model": costs,
        "rows": rows,
    })
    return rows


if __name__ == "__main__":
    main()
