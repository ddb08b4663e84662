"""Command line: `nextlocmoe prepare|train|evaluate|run|notebooks --profile ... [--config FILE] [--set section.field=value]`.

`train` and `evaluate` take the method and dataset (`--method nextlocmoe_ranking --dataset synthetic`) and
resolve them exactly as the supervised experiment does (`experiments.run_config`), so `nextlocmoe train
--profile P` trains the model that `nextlocmoe run supervised --profile P` reports (same configuration hash).

Errors a user can fix (missing file, bad column, unknown parameter, an output location that cannot be written,
a full disk) print one line naming what is wrong and exit with status 2; every output location is checked
before any work starts. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .config import PROFILES, config_hash
from .baselines import NEURAL_BASELINES
from .errors import ConfigError, NextLocMoEError
from .io import check_writable, os_error_cause
from .experiments import DATASET_SOURCES, experiment_names, methods, resolve_config, run_config


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="cpu", choices=sorted(PROFILES),
                   help="named configuration (default: cpu = New York check-ins + SmolLM2 on 2 cores)")
    p.add_argument("--config", default=None,
                   help="YAML file overriding the profile (sections data/model/train/plan); applied before --set")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override one field, e.g. --set train.epochs=2 --set data.path=cityD.csv (repeatable, "
                        "applied in order after --config)")


def _add_model_choice(p: argparse.ArgumentParser, also: tuple[str, ...] = ()) -> None:
    p.add_argument("--method", default="nextlocmoe", choices=[m.name for m in methods(family="model")] + list(also),
                   help="which model (default: nextlocmoe, the paper's); the same configuration the supervised "
                        "experiment trains for this method and dataset" + (f"; or a neural baseline ({', '.join(also)})"
                                                                            if also else ""))
    p.add_argument("--dataset", default=None, choices=sorted(DATASET_SOURCES),
                   help="dataset of the profile's plan (default: the plan's first)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nextlocmoe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="load the profile's data, build windows (cached), write the statistics table")
    _add_common(p)
    p.add_argument("--results", default="results", help="directory of results files (default: results)")
    p.add_argument("--force", action="store_true", help="rebuild the windows even if cached")

    p = sub.add_parser("train", help="train NextLocMoE, keep the best checkpoint, evaluate it on the test split")
    _add_common(p)
    _add_model_choice(p)
    p.add_argument("--out", default=None, help="run directory (default: runs/<profile>-<method>-<dataset>)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved configuration and its hash, train nothing")

    p = sub.add_parser("curve", help="a learning curve: validation Hit@1 / MRR against training windows, resumable, "
                                     "written to results/learning_curve.*")
    _add_common(p)
    _add_model_choice(p, also=NEURAL_BASELINES)
    p.add_argument("--windows-per-point", type=int, required=True, help="training windows between validation points")
    p.add_argument("--points", type=int, required=True, help="validation points after the untrained start")
    p.add_argument("--val-windows", type=int, default=1000, help="validation windows per point (default: 1000)")
    p.add_argument("--out", default=None, help="run directory (default: runs/curves/<profile>-<method>-<dataset>)")
    p.add_argument("--results", default="results", help="directory of results files (default: results)")
    p.add_argument("--compare", action="store_true",
                   help="train nothing: compare the best checkpoint so far with the tuned window_time scorer on the "
                        "same validation windows (paired tests), recorded in results/learning_curve.json")

    p = sub.add_parser("evaluate", help="evaluate the best checkpoint of a run directory")
    _add_common(p)
    _add_model_choice(p)
    p.add_argument("--out", default=None, help="run directory holding best.pt (default: as train)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])

    names = experiment_names()
    p = sub.add_parser("run", help="run a named experiment of the profile's plan and write results/<experiment>.*")
    p.add_argument("experiment", choices=[*names, "all"],
                   help=f"which experiment ('all' runs {', '.join(names)} in this order)")
    _add_common(p)
    p.add_argument("--results", default="results", help="directory of results files (default: results)")
    p.add_argument("--runs", default="runs/experiments",
                   help="job results and trained models, reused across calls (default: runs/experiments)")
    p.add_argument("--force", action="store_true", help="recompute every job instead of reading cached results")
    p.add_argument("--humob", action="append", default=[], metavar="CITY=PATH",
                   help="zero_shot: a HuMob city CSV (repeatable; the first city is the source of every pair)")

    p = sub.add_parser("notebooks", help="execute the ordered notebooks with papermill (what `make reproduce` runs)")
    p.add_argument("--profile", default="cpu", choices=sorted(PROFILES),
                   help="profile passed to every notebook (default: cpu, executed in place and committed)")
    p.add_argument("--out", default=None,
                   help="relative output root for notebooks/, results/, figures/ (default: '.' for cpu, "
                        "runs/notebooks/<profile> otherwise)")
    p.add_argument("--only", action="append", default=None, metavar="NAME.ipynb",
                   help="run only this notebook (repeatable; default: all, in order)")
    p.add_argument("--force", action="store_true", help="recompute cached experiment jobs and models")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    return parser


def default_run_dir(cfg, method: str, dataset: str | None) -> str:
    return f"runs/{cfg.profile}-{method}-{dataset or cfg.plan.datasets[0]}"


def _humob_paths(items: list[str]) -> dict[str, str] | None:
    paths = {}
    for item in items:
        city, sep, path = item.partition("=")
        if not sep or not city or not path:
            raise ConfigError(f"--humob '{item}' must look like CITY=PATH, e.g. --humob D=cityD-dataset.csv")
        paths[city] = path
    return paths or None


CACHE_DIR = ".cache/windows"   # prepared windows (nextlocmoe.data.prepare)


def is_main_process() -> bool:
    """False on every rank but 0 of a torchrun / accelerate launch: only rank 0 prints results."""
    return int(os.environ.get("RANK", "0")) == 0


def check_outputs(args: argparse.Namespace, out: Path | None = None) -> None:
    """Every location this command writes must be creatable and writable before any work starts."""
    checks = [(CACHE_DIR, "window cache")]
    if args.command in ("prepare", "run", "curve"):
        checks.append((args.results, "results directory (--results)"))
    if args.command == "run":
        checks.append((args.runs, "runs directory (--runs)"))
    if args.command in ("train", "curve") and out is not None:
        checks.append((out, "run directory (--out)"))
    if args.command == "notebooks":
        from .notebooks import layout_for

        layout = layout_for(args.profile, args.out)
        checks += [(layout.notebooks, "notebooks directory"), (layout.results, "results directory"),
                   (layout.figures, "figures directory"), (layout.runs, "runs directory")]
    for path, what in checks:
        check_writable(path, what)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "notebooks":
            from .notebooks import run_notebooks

            check_outputs(args)
            records = run_notebooks(args.profile, out=args.out, names=args.only, force=args.force,
                                    device=args.device)
            print(json.dumps(records, indent=2))
            return 0
        cfg = resolve_config(args.profile, args.config, args.overrides)
        if args.command in ("prepare", "run"):
            check_outputs(args)
        if args.command == "prepare":
            from .data.prepare import dataset_statistics, prepare
            from .results import write_dataset_statistics

            windows = prepare(cfg.data, force=args.force)
            write_dataset_statistics(dataset_statistics([windows]), results_dir=args.results, profile=cfg.profile,
                                     seed=cfg.data.seed)
        elif args.command == "train":
            from .train import train

            run_cfg = run_config(cfg, args.method, args.dataset)
            out = Path(args.out or default_run_dir(cfg, args.method, args.dataset))
            if args.dry_run:
                print(run_cfg.to_yaml() + f"# config_hash: {config_hash(run_cfg)}\n# run directory: {out}")
                return 0
            check_outputs(args, out)
            result = train(run_cfg, out, resume=args.resume)
            if is_main_process():
                print(json.dumps({"best_epoch": result.best_epoch, "val": result.val, "test": result.test,
                                  "wall_s": round(result.wall_s, 1), "run_dir": str(out),
                                  "config_hash": config_hash(run_cfg)}, indent=2))
        elif args.command == "run":
            from .experiments import run_experiment

            names = experiment_names() if args.experiment == "all" else (args.experiment,)
            humob = _humob_paths(args.humob)
            for name in names:
                result = run_experiment(name, args.profile, results_dir=args.results, runs_dir=args.runs,
                                        force=args.force, config_path=args.config, overrides=args.overrides,
                                        humob_paths=humob if name == "zero_shot" else None)
                print(result.paths["md"].read_text())
        elif args.command == "curve":
            from .experiments.learning_curve import compare_with_floor, run_baseline_curve, run_learning_curve

            dataset = args.dataset or cfg.plan.datasets[0]
            if args.method in NEURAL_BASELINES:    # trains in minutes: one fit, its comparison recorded at the end
                if args.compare or args.out:
                    raise ConfigError(f"--compare and --out are for the LLM-based models' resumable curves; the "
                                      f"{args.method} curve is one fit that records its paired comparison itself")
                check_outputs(args)
                run_baseline_curve(args.profile, args.method, dataset, args.windows_per_point, args.points,
                                   results_dir=args.results, val_windows=args.val_windows, overrides=args.overrides)
                return 0
            out = Path(args.out or f"runs/curves/{cfg.profile}-{args.method}-{dataset}")
            check_outputs(args, out)
            step = compare_with_floor if args.compare else run_learning_curve
            result = step(args.profile, args.method, dataset, args.windows_per_point, args.points, out,
                          results_dir=args.results, val_windows=args.val_windows, overrides=args.overrides)
            if args.compare:
                print(json.dumps(result, indent=2))
        elif args.command == "evaluate":
            from .train import evaluate_checkpoint

            run_cfg = run_config(cfg, args.method, args.dataset)
            out = Path(args.out or default_run_dir(cfg, args.method, args.dataset))
            print(json.dumps(evaluate_checkpoint(run_cfg, out, split=args.split), indent=2))
    except NextLocMoEError as e:
        print(f"nextlocmoe {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:      # a write or read the library did not wrap: still one line, path and cause
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"nextlocmoe {args.command}: error: {where}{os_error_cause(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nextlocmoe {args.command}: interrupted (checkpoints are written atomically; use --resume)",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
