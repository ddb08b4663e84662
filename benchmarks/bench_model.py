"""Training and inference samples/s of the whole NextLocMoE model, both heads, on one profile's data.

    python benchmarks/bench_model.py                       # cpu profile: NYC + SmolLM2 (12 layers), batch 32
    python benchmarks/bench_model.py --profile smoke --steps 5

Training = forward + loss + backward + Adam step on a fixed batch; inference = forward under no_grad.
Each figure is the median of `--steps` timed repeats after `--warmup` untimed ones, all in one process.
Writes results/bench_model.csv and results/bench_model.json (provenance).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nextlocmoe.config import load_config  # noqa: E402
from nextlocmoe.data.prepare import prepare  # noqa: E402
from nextlocmoe.io import atomic_path, provenance, write_json_atomic  # noqa: E402
from nextlocmoe.model import build_model  # noqa: E402
from nextlocmoe.runtime import median_seconds  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", default="cpu")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default=str(ROOT / "results"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = load_config(args.profile)
    windows = prepare(cfg.data)
    batch = {k: torch.as_tensor(v) for k, v in windows.batch("train", list(range(args.batch))).items()}
    rows = []
    for head in ("regression", "ranking"):
        cfg_h = load_config(args.profile, overrides=[f"model.head={head}"])
        torch.manual_seed(0)
        model = build_model(cfg_h.model, windows.stats, windows.candidates, windows.candidate_function)
        opt = torch.optim.Adam([q for q in model.parameters() if q.requires_grad], lr=1e-4)

        def train_step():
            out = model(batch)
            loss, _ = model.loss(out, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def infer_step():
            with torch.no_grad():
                model(batch)

        model.train()
        t_train = median_seconds(train_step, args.steps, args.warmup)
        model.eval()
        t_infer = median_seconds(infer_step, args.steps, args.warmup)
        counts = model.parameter_counts()
        prompt = model.prompt_embeddings
        tokens = batch["hist_xy"].shape[1] + batch["cur_xy"].shape[1] + (0 if prompt is None else len(prompt))
        rows.append(dict(profile=args.profile, head=head, backbone=cfg_h.model.backbone,
                         layers=cfg_h.model.num_layers, batch=args.batch, sequence_tokens=tokens,
                         train_samples_per_s=args.batch / t_train, infer_samples_per_s=args.batch / t_infer,
                         train_step_s=t_train, infer_step_s=t_infer, threads=torch.get_num_threads(),
                         total_params=counts["total"], trainable_params=counts["trainable"]))
        print(f"{head:10s} train {rows[-1]['train_samples_per_s']:7.1f} samples/s  "
              f"infer {rows[-1]['infer_samples_per_s']:7.1f} samples/s  ({tokens} tokens)", flush=True)

    df = pd.DataFrame(rows)
    out = Path(args.out)
    with atomic_path(out / "bench_model.csv") as tmp:
        df.to_csv(tmp, index=False)
    write_json_atomic(out / "bench_model.json", provenance(
        args.profile, seed=0, data_checksum=windows.meta.get("checksum"),
        command="python benchmarks/bench_model.py " + " ".join(argv or sys.argv[1:]),
        method=f"median of {args.steps} steps after {args.warmup} warm-up steps, one process"))
    print(df.to_string(index=False))


if __name__ == "__main__":
    main()
