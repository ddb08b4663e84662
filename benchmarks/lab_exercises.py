"""The lab of README ("A 90-minute lab"), run as a student would, with each exercise's wall time.

Every exercise starts from a shipped model (checkpoints/cpu/, `make reproduce` or a fresh clone has them) and
changes one thing at evaluation time (nextlocmoe.lab), except the last, which trains a small model. What each
prints is what the student should find; the times go into README.

Usage:  python benchmarks/lab_exercises.py [--checkpoints checkpoints/cpu] [--skip-training]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from nextlocmoe import analysis, lab
from nextlocmoe.evaluation import rank_split
from nextlocmoe.metrics import paired_comparison
from nextlocmoe.runs import load_run

SMALL = ["--set", "train.max_train_windows=256", "--set", "train.windows_per_epoch=null", "--set", "train.epochs=1",
         "--set", "train.max_test_windows=250"]


def timed(name: str):
    def wrap(fn):
        def run(*args, **kwargs):
            print(f"\n=== {name}", flush=True)
            started = time.perf_counter()
            fn(*args, **kwargs)
            print(f"--- {name}: {time.perf_counter() - started:.0f} s", flush=True)
        return run
    return wrap


@timed("0. load the shipped ranking model (New York)")
def load(folder: Path, state: dict) -> None:
    state["run"] = load_run(folder)
    run = state["run"]
    print(f"{folder.name}: {run.windows.n_windows('test'):,} test windows, "
          f"{sum(p.numel() for p in run.model.parameters() if p.requires_grad):,} trainable parameters")


@timed("1. the next visit's time switched off (paired on the same test windows)")
def next_visit_time(state: dict) -> None:
    run = state["run"]
    base = rank_split(run.model, run.windows, "test")
    with lab.next_visit_time_off(run.model):
        off = rank_split(run.model, run.windows, "test")
    state["base"] = base
    c = paired_comparison(off.rank, base.rank)
    print(f"Hit@1 {base.metrics()['hit@1']:.3f} -> {off.metrics()['hit@1']:.3f} "
          f"(paired difference {c['hit@1_diff']:+.3f} [{c['hit@1_lo']:+.3f}, {c['hit@1_hi']:+.3f}], McNemar p = "
          f"{c['hit@1_p']:.2g}); MRR {c['mrr_diff']:+.4f} (p = {c['mrr_p']:.2g})")


@timed("2. the copy gate: how much of each prediction copies the window")
def copy_gate(state: dict) -> None:
    run = state["run"]
    g = lab.copy_gates(run.model, run.windows, "test")
    hist, edges = np.histogram(g, bins=10, range=(0, 1))
    print(f"copy probability g over {len(g):,} test windows: mean {g.mean():.3f}, quartiles "
          f"{np.quantile(g, 0.25):.3f} / {np.median(g):.3f} / {np.quantile(g, 0.75):.3f}; "
          f"training windows whose target is one of their own places: {run.windows.repeat_rate('train'):.3f}")
    print("histogram (tenths of g):", hist.tolist())


@timed("3. the routing threshold at evaluation time (500 test windows)")
def threshold(state: dict) -> None:
    run = state["run"]
    base = state["base"].first(500)
    for t in (0.3, 0.8, 1.0):
        with lab.routing_threshold(run.model, t):
            sample = analysis.collect_routing(run.model, run.windows, split="test", max_windows=100)
            ranked = rank_split(run.model, run.windows, "test", max_windows=500)
        active = analysis.active_experts_per_token(sample)
        mean = float((active["n_active"] * active["tokens"]).sum() / active["tokens"].sum())
        c = paired_comparison(ranked.rank, base.rank)
        print(f"threshold {t:.1f}: {mean:.2f} experts per token; Hit@10 {ranked.metrics()['hit@10']:.3f} "
              f"(vs 0.8: {c['hit@10_diff']:+.3f}, p = {c['hit@10_p']:.2g})")


@timed("4. train a small ranking model on the synthetic city (256 windows)")
def small_training(out: Path) -> None:
    command = [sys.executable, "-m", "nextlocmoe", "train", "--profile", "cpu", "--method", "nextlocmoe_ranking", "--dataset", "synthetic",
               *SMALL, "--out", str(out)]
    print("nextlocmoe " + " ".join(command[3:]), flush=True)
    subprocess.run(command, check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", default="checkpoints/cpu")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--out", default="runs/lab-small")
    args = parser.parse_args()
    state: dict = {}
    load(Path(args.checkpoints) / "nextlocmoe_ranking-nyc-default", state)
    next_visit_time(state)
    copy_gate(state)
    threshold(state)
    if not args.skip_training:
        small_training(Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
