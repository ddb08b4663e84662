"""Training and inference samples/s of the whole NextLocMoE model, both heads, old and new settings side by side.

    python benchmarks/bench_model.py --threads 2           # cpu profile: NYC + SmolLM2 (12 layers), batch 32
    python benchmarks/bench_model.py --profile smoke --steps 5

Settings measured in ONE process, one after the other on the same batch (medians of `--steps` timed repeats
after `--warmup` untimed ones), so their ratios are comparable even on a noisy machine:

    paper           the prompt's P-MoE gates read h (the prompt is shared only up to the first P-MoE layer)
    shared_prompt   model.prompt_reads_history=false: one prompt pass per batch through all layers
    shared_bf16     the same under CPU bf16 autocast (heads stay float32), only where the CPU has native bf16
                    matmuls (the measured bf16 matmul ceiling is above the fp32 one)

Training = forward + loss + backward + Adam step on a fixed batch; inference = forward under no_grad. The
machine's ceiling comes first: fp32 and bf16 matmul GFLOP/s at the backbone's shapes, measured in the same process.

Each figure sits beside that ceiling: the FLOPs of one inference step and one training step are counted once per
(head, setting) with torch's FlopCounterMode (matmuls, attention, convolutions: the operations that carry the
arithmetic; elementwise work and the optimiser are not counted, so the count is a slight underestimate), divided by
the batch for FLOPs per window, and the achieved rate (counted FLOPs / measured seconds) is reported as a fraction
of the matmul ceiling of the step's dtype (fp32, or bf16 under autocast), the mean of a reading before and one
after the models (both are written). Writes results/bench_model.csv and results/bench_model.json (provenance).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nextlocmoe.baselines import Popularity  # noqa: E402
from nextlocmoe.config import load_config  # noqa: E402
from nextlocmoe.data.prepare import prepare  # noqa: E402
from nextlocmoe.io import atomic_path, provenance, write_json_atomic  # noqa: E402
from nextlocmoe.model import build_model  # noqa: E402
from nextlocmoe.runtime import median_seconds  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

SETTINGS = {   # name -> (--set overrides, bf16 autocast)
    "paper": (["model.prompt_reads_history=true"], False),
    "shared_prompt": (["model.prompt_reads_history=false"], False),
    "shared_bf16": (["model.prompt_reads_history=false"], True),
}


def native_bf16(ceiling: dict[str, float]) -> bool:
    """Whether this CPU multiplies bf16 natively, read off the measured ceiling: a native bf16 matmul (AVX512_BF16,
    AMX) is faster than fp32, an emulated one slower. torch's get_cpu_capability() names only the vector ISA it
    dispatches to ("AVX512" on an AMX machine), so it cannot tell."""
    return ceiling["bf16_matmul_gflops"] > ceiling["fp32_matmul_gflops"]


def matmul_gflops(dtype: torch.dtype, m: int = 32 * 146, k: int = 576, n: int = 1536, repeats: int = 25) -> float:
    """GFLOP/s of one (m, k) x (k, n) product, the shape of an FFN projection over a batch of sequences."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    seconds = median_seconds(lambda: a @ b, repeats, warmup=2)
    return 2 * m * k * n / seconds / 1e9


def counted_flops(step) -> int:
    """FLOPs that torch's FlopCounterMode counts in one call of `step` (module docstring: matmul-class ops)."""
    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", default="cpu")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--out", default=str(ROOT / "results"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    capability = torch.backends.cpu.get_cpu_capability()
    # the ceiling is measured before the models and again after them (a shared 2-core machine drifts by tens of
    # per cent over minutes); the fractions use the mean of the two, and both readings are written
    before = {"fp32": matmul_gflops(torch.float32), "bf16": matmul_gflops(torch.bfloat16)}
    ceiling = {"fp32_matmul_gflops": before["fp32"], "bf16_matmul_gflops": before["bf16"]}
    print(f"CPU capability {capability}: matmul fp32 {ceiling['fp32_matmul_gflops']:.0f} GFLOP/s, "
          f"bf16 {ceiling['bf16_matmul_gflops']:.0f} GFLOP/s", flush=True)
    settings = [s for s in args.settings if not (SETTINGS[s][1] and not native_bf16(ceiling))]
    skipped = sorted(set(args.settings) - set(settings))
    if skipped:
        print(f"skipped {skipped}: no native bf16 matmul on this CPU ({capability}; bf16 slower than fp32)", flush=True)

    cfg = load_config(args.profile)
    windows = prepare(cfg.data)
    batch = {k: torch.as_tensor(v) for k, v in windows.batch("train", list(range(args.batch))).items()}
    counts = Popularity("targets").fit(windows).counts
    rows = []
    for head in ("regression", "ranking"):
        for setting in settings:
            overrides, bf16 = SETTINGS[setting]
            cfg_h = load_config(args.profile, overrides=[f"model.head={head}", *overrides])
            torch.manual_seed(0)
            model = build_model(cfg_h.model, windows.stats, windows.candidates, windows.candidate_function,
                                windows.history + windows.current)
            model.set_popularity_prior(counts)
            opt = torch.optim.Adam([q for q in model.parameters() if q.requires_grad], lr=1e-4)
            autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

            def train_step():
                with autocast():
                    out = model(batch)
                    loss, _ = model.loss(out, batch)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            def infer_step():
                with torch.no_grad(), autocast():
                    model(batch)

            model.train()
            t_train = median_seconds(train_step, args.steps, args.warmup)
            train_flops = counted_flops(train_step)       # one more step, outside the timing
            model.eval()
            t_infer = median_seconds(infer_step, args.steps, args.warmup)
            infer_flops = counted_flops(infer_step)
            peak = ceiling["bf16_matmul_gflops" if bf16 else "fp32_matmul_gflops"]
            params = model.parameter_counts()
            tokens = batch["hist_xy"].shape[1] + batch["cur_xy"].shape[1] + model.prompt_length
            rows.append(dict(profile=args.profile, head=head, setting=setting, backbone=cfg_h.model.backbone,
                             layers=cfg_h.model.num_layers, batch=args.batch, sequence_tokens=tokens,
                             train_samples_per_s=args.batch / t_train, infer_samples_per_s=args.batch / t_infer,
                             train_step_s=t_train, infer_step_s=t_infer, threads=torch.get_num_threads(),
                             total_params=params["total"], trainable_params=params["trainable"],
                             train_gflop_per_window=train_flops / args.batch / 1e9,
                             infer_gflop_per_window=infer_flops / args.batch / 1e9,
                             train_gflops=train_flops / t_train / 1e9, infer_gflops=infer_flops / t_infer / 1e9,
                             train_fraction_of_ceiling=train_flops / t_train / 1e9 / peak,
                             infer_fraction_of_ceiling=infer_flops / t_infer / 1e9 / peak,
                             autocast_bf16=bf16, cpu_capability=capability))
            r = rows[-1]
            print(f"{head:10s} {setting:14s} train {r['train_samples_per_s']:6.1f} samples/s "
                  f"({r['train_gflop_per_window']:.2f} GFLOP/window, {r['train_fraction_of_ceiling']:.2f} of the "
                  f"ceiling)  infer {r['infer_samples_per_s']:6.1f} samples/s ({r['infer_gflop_per_window']:.2f} "
                  f"GFLOP/window, {r['infer_fraction_of_ceiling']:.2f}; fractions of the first ceiling reading)",
                  flush=True)

    after = {"fp32": matmul_gflops(torch.float32), "bf16": matmul_gflops(torch.bfloat16)}
    print(f"ceiling again after the models: fp32 {after['fp32']:.0f} GFLOP/s, bf16 {after['bf16']:.0f} GFLOP/s",
          flush=True)
    df = pd.DataFrame(rows)
    for dtype in ("fp32", "bf16"):
        df[f"{dtype}_matmul_gflops_before"], df[f"{dtype}_matmul_gflops_after"] = before[dtype], after[dtype]
        df[f"{dtype}_matmul_gflops"] = (before[dtype] + after[dtype]) / 2
    peak = df["bf16_matmul_gflops"].where(df["autocast_bf16"], df["fp32_matmul_gflops"])   # the step's dtype
    df["train_fraction_of_ceiling"] = df["train_gflops"] / peak
    df["infer_fraction_of_ceiling"] = df["infer_gflops"] / peak
    for metric in ("train_samples_per_s", "infer_samples_per_s"):   # speed-up over the paper setting, same head
        paper = df[df["setting"] == "paper"].set_index("head")[metric]
        df[metric.replace("_samples_per_s", "_speedup")] = df[metric] / df["head"].map(paper)
    out = Path(args.out)
    with atomic_path(out / "bench_model.csv") as tmp:
        df.to_csv(tmp, index=False)
    write_json_atomic(out / "bench_model.json", provenance(
        args.profile, seed=0, data_checksum=windows.meta.get("checksum"),
        command="python benchmarks/bench_model.py " + " ".join(argv or sys.argv[1:]),
        method=f"median of {args.steps} steps after {args.warmup} warm-up steps, all settings in one process"))
    print(df[["head", "setting", "train_samples_per_s", "infer_samples_per_s", "train_speedup", "infer_speedup",
              "train_fraction_of_ceiling", "infer_fraction_of_ceiling"]].to_string(index=False))


if __name__ == "__main__":
    main()
