"""Windowing at the paper's HuMob (Kumamoto) scale: 6,000 users, ~6.7 million records.

Writes a HuMob-format CSV (uid,d,t,x,y) of random but plausible users to a temporary folder, reads it with
the project's HuMob loader and builds the paper's windows (history 40 + current 5, stride 3, every window
kept). Reports the wall time of loading and of windowing, and two memory figures:

    windowing_peak_traced_mib  tracemalloc peak while make_windows runs (numpy buffers are traced):
                               the memory the windowing step itself needs on top of the loaded records
    process_peak_rss_mib       resource.getrusage ru_maxrss at the end: the whole process's peak
                               (generation, CSV parsing and windowing together)

Usage:  python benchmarks/bench_windows.py [--users 6000] [--records 6700000] [--results results]
Target on a 2-core machine: windowing <= 60 s and <= 4 GiB.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd

from nextlocmoe.data.config import DataConfig
from nextlocmoe.data.sources import load_records
from nextlocmoe.data.windows import make_windows
from nextlocmoe.io import file_sha256, provenance, write_json_atomic, write_text_atomic

DAYS, SLOTS, GRID = 60, 48, 200   # HuMob: 75 days, of which 60 unmasked; 30-minute slots; 200 x 200 cells


def write_humob_like(path: Path, users: int, records: int, seed: int = 0) -> int:
    """A HuMob-format CSV with about `records` rows: users active on most days, visiting home, work and other cells."""
    rng = np.random.default_rng(seed)
    per_user_rate = rng.uniform(0.5, 1.5, users) * records / (users * DAYS * SLOTS * 0.9)   # slot probability
    active_day = rng.random((users, DAYS)) < 0.9                  # idle days give the > 24 h gaps
    visited = (rng.random((users, DAYS, SLOTS), dtype=np.float32) < per_user_rate[:, None, None]) \
        & active_day[:, :, None]
    uid, d, t = np.nonzero(visited)                               # sorted by user, day, slot
    del visited
    home, work = rng.integers(1, GRID + 1, (2, users, 2))
    kind = rng.choice(3, size=len(uid), p=[0.5, 0.3, 0.2])        # home, work, anywhere
    xy = np.where((kind == 0)[:, None], home[uid], work[uid])
    anywhere = kind == 2
    xy[anywhere] = rng.integers(1, GRID + 1, (int(anywhere.sum()), 2))
    pd.DataFrame({"uid": uid, "d": d, "t": t, "x": xy[:, 0], "y": xy[:, 1]}).to_csv(path, index=False)
    return len(uid)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=6_000)
    parser.add_argument("--records", type=int, default=6_700_000, help="expected rows of the generated file")
    parser.add_argument("--results", default="results", help="folder for bench_windows.csv/.json")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench_windows_") as tmp:
        path = Path(tmp) / "humob_synthetic.csv"
        t0 = time.perf_counter()
        rows = write_humob_like(path, args.users, args.records, args.seed)
        generate_s = time.perf_counter() - t0
        print(f"generated {rows:,} records of {args.users:,} users in {generate_s:.1f} s "
              f"({path.stat().st_size / 2**20:.0f} MiB)", file=sys.stderr)
        cfg = DataConfig(source="humob", path=str(path), history=40, current=5, stride=3, keep_every=1).resolved()

        t0 = time.perf_counter()
        data = load_records(cfg)
        load_s = time.perf_counter() - t0

        tracemalloc.start()
        t0 = time.perf_counter()
        windows = make_windows(data, cfg)
        windows_s = time.perf_counter() - t0
        _, traced_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        checksum = file_sha256(path)

    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss          # Linux: KiB
    row = {
        "records": len(data.records), "users": data.n_users, "sub_users": windows.n_subusers,
        "windows_train": windows.n_windows("train"), "windows_val": windows.n_windows("val"),
        "windows_test": windows.n_windows("test"), "history": 40, "current": 5, "stride": 3, "keep_every": 1,
        "generate_s": round(generate_s, 2), "load_s": round(load_s, 2), "windowing_s": round(windows_s, 2),
        "windowing_peak_traced_mib": round(traced_peak / 2**20, 1),
        "process_peak_rss_mib": round(rss_kib / 2**10, 1),
    }
    table = pd.DataFrame([row])
    results = Path(args.results)
    write_text_atomic(results / "bench_windows.csv", table.to_csv(index=False))
    write_json_atomic(results / "bench_windows.json", provenance(
        "bench", seed=args.seed, data_checksum=checksum, command="python benchmarks/bench_windows.py",
        memory_method={"windowing_peak_traced_mib": "tracemalloc peak during make_windows",
                       "process_peak_rss_mib": "resource.getrusage(RUSAGE_SELF).ru_maxrss"},
        target={"windowing_s": 60, "windowing_memory_gib": 4}, result=row))
    for name, value in row.items():
        print(f"{name:28s} {value:,}" if isinstance(value, int) else f"{name:28s} {value}")
    return row


if __name__ == "__main__":
    main()
