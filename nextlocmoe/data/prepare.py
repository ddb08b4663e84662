"""Prepared data: windows cached on disk, and the per-dataset statistics (experiment 1; written by nextlocmoe.results).

`prepare(cfg)` = resolve the config, load the records (`sources.load_records`), build the windows
(`windows.make_windows`), and keep the result under `.cache/windows/<source>-<key>/`. The key hashes the
resolved config, the checksum of the raw file and `WINDOWS_FORMAT_VERSION`, so editing the data file or
any parameter that shapes the windows never reuses a stale entry. An entry is written into a hidden
temporary folder and renamed into place in one step: a run that dies halfway leaves only a temporary
folder, which no reader ever opens.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from filelock import FileLock

from ..errors import DataError
from ..io import file_sha256, output_error, stable_hash
from .config import DataConfig
from .windows import SPLITS, NormStats, Windows, make_windows

# Bump whenever make_windows or the cache layout changes what an entry holds: old entries then miss.
WINDOWS_FORMAT_VERSION = 1

_ARRAY_FIELDS = ("x", "y", "weekday", "hour", "duration", "location", "subuser", "timestamp",
                 "candidates", "candidate_function", "subuser_user")


# ---------------------------------------------------------------------------------------------------
# cache key

def raw_file(cfg: DataConfig) -> Path | None:
    """The raw file a source reads (None for generated data)."""
    if cfg.source == "synthetic":
        return None
    if cfg.source == "nyc_foursquare" and not cfg.path:
        from .sources import nyc_sample_path
        return nyc_sample_path()
    return Path(cfg.path).expanduser()


def raw_checksum(cfg: DataConfig) -> str:
    """sha256 of the raw file; for synthetic data, of the generator's source (its parameters are in the key)."""
    path = raw_file(cfg)
    if path is None:
        generator = Path(__file__).with_name("synthetic.py")
        return file_sha256(generator) if generator.exists() else "generated"
    if not path.is_file():
        raise DataError(f"data.path='{path}' (source '{cfg.source}') does not exist or is not a file")
    return file_sha256(path)


def key_config(cfg: DataConfig) -> dict[str, Any]:
    """The whole resolved config: a field the source ignores costs at most a rebuild, never a stale cache."""
    d = cfg.to_dict()
    d["split_fractions"] = [float(f) for f in d["split_fractions"]]
    return d


def cache_key(cfg: DataConfig, checksum: str) -> str:
    """stable_hash of (resolved config, raw-file checksum, WINDOWS_FORMAT_VERSION)."""
    return stable_hash({"config": key_config(cfg), "raw_checksum": checksum,
                        "format_version": WINDOWS_FORMAT_VERSION})


# ---------------------------------------------------------------------------------------------------
# cache entries: <cache_dir>/<source>-<key>/{arrays.npz, meta.json}

def save_windows(windows: Windows, entry: str | os.PathLike) -> Path:
    """Write `windows` to the folder `entry` atomically: built in a private temporary folder, then put in place
    under a file lock (`.<entry>.lock`), so processes that replace the same entry at once never collide (one
    wins each turn; every one of them leaves a complete entry and no temporary folder). Readers take no lock:
    between the two renames of a replacement they see no entry, which is a cache miss, never a half entry."""
    entry = Path(entry)
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name}-", dir=entry.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; a cache entry is as readable as any other folder
        arrays = {name: getattr(windows, name) for name in _ARRAY_FIELDS}
        arrays.update({f"starts_{split}": windows.starts[split] for split in SPLITS})
        np.savez(tmp / "arrays.npz", **arrays)
        meta = {"format_version": WINDOWS_FORMAT_VERSION, "history": windows.history,
                "current": windows.current, "stats": dataclasses.asdict(windows.stats), "meta": windows.meta}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
        with FileLock(entry.parent / f".{entry.name}.lock"):
            if entry.exists():  # force=True, or a concurrent run finished first: replace in two renames
                trash = Path(tempfile.mkdtemp(prefix=f".old-{entry.name}-", dir=entry.parent))
                try:
                    os.replace(entry, trash / "entry")
                    os.replace(tmp, entry)
                finally:
                    shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(tmp, entry)
    except OSError as err:
        raise output_error(entry, err, "cannot write the window cache entry") from err
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return entry


def load_windows(entry: str | os.PathLike, key: str | None = None) -> Windows | None:
    """Read a cache entry; None when it is absent, incomplete, of another format or another key."""
    entry = Path(entry)
    try:
        meta = json.loads((entry / "meta.json").read_text())
        if meta.get("format_version") != WINDOWS_FORMAT_VERSION:
            return None
        if key is not None and meta["meta"].get("cache_key") != key:
            return None
        with np.load(entry / "arrays.npz", allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
        return Windows(
            **{name: arrays[name] for name in _ARRAY_FIELDS},
            starts={split: arrays[f"starts_{split}"] for split in SPLITS},
            history=int(meta["history"]), current=int(meta["current"]),
            stats=NormStats(**meta["stats"]), meta=meta["meta"],
        )
    except FileNotFoundError:
        return None
    except Exception as err:  # truncated zip, bad JSON, missing array...: a miss, rebuilt by the caller
        print(f"windows: ignoring unreadable cache entry {entry} ({type(err).__name__}: {err})", file=sys.stderr)
        return None


STALE_AFTER_S = 3600   # a temporary folder older than this was left by a killed writer


def remove_stale_folders(cache_dir: str | os.PathLike, older_than_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove the temporary folders (`.tmp-*`, `.old-*`) that killed writers left in the cache."""
    removed = []
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        return removed
    now = time.time()
    for p in cache_dir.iterdir():
        if p.is_dir() and p.name.startswith((".tmp-", ".old-")):
            try:
                if now - p.stat().st_mtime >= older_than_s:
                    shutil.rmtree(p, ignore_errors=True)
                    removed.append(p)
            except OSError:
                pass
    return removed


def prepare(cfg: DataConfig, cache_dir: str | os.PathLike = ".cache/windows", force: bool = False) -> Windows:
    """Windows of `cfg`'s dataset, from the cache when an entry for exactly this config and raw file exists."""
    cfg = cfg.resolved()
    remove_stale_folders(cache_dir)
    checksum = raw_checksum(cfg)
    key = cache_key(cfg, checksum)
    entry = Path(cache_dir) / f"{cfg.source}-{key}"
    if not force:
        cached = load_windows(entry, key)
        if cached is not None:
            print(f"windows: cache hit {entry}", file=sys.stderr)
            return cached
    from . import sources  # imported here: the sources pull in their readers

    data = sources.load_records(cfg)
    windows = make_windows(data, cfg)
    if raw_checksum(cfg) != checksum:  # the file changed while we read it: never file it under the old key
        print(f"windows: the raw file of source '{cfg.source}' changed while it was read; not cached",
              file=sys.stderr)
        return windows
    windows.meta.update(cache_key=key, raw_checksum=checksum, format_version=WINDOWS_FORMAT_VERSION)
    save_windows(windows, entry)
    print(f"windows: built and cached {entry}", file=sys.stderr)
    return windows


# ---------------------------------------------------------------------------------------------------
# statistics table (experiment 1)

def _split_protocol(cfg: dict[str, Any]) -> str:
    fractions = "/".join(f"{round(100 * f):g}" for f in cfg["split_fractions"])
    return f"{cfg['split']} {fractions}"


def dataset_statistics(windows_list: list[Windows]) -> pd.DataFrame:
    """One row per dataset: users, sub-users, records, locations, windows per split, the protocol and the share
    of test targets found inside their own window (`Windows.repeat_rate`).

    `users` and `records` count what the source loaded; `sub-users` and `records in sub-users` count what
    survives cutting at `gap_hours` and dropping short segments (paper, Kumamoto: 17,965 sub-users).
    """
    rows = []
    for w in windows_list:
        cfg = w.meta.get("config", {})
        rows.append({
            "dataset": w.meta.get("dataset", "?"),
            "users": w.meta.get("raw_users"),
            "sub-users": w.n_subusers,
            "records": w.meta.get("raw_records"),
            "records in sub-users": w.n_records,
            "locations": w.n_locations,
            "windows train": w.n_windows("train"),
            "windows val": w.n_windows("val"),
            "windows test": w.n_windows("test"),
            "history": w.history,
            "current": w.current,
            "stride": cfg.get("stride"),
            "keep every": cfg.get("keep_every"),
            "split": _split_protocol(cfg) if cfg else "?",
            # share of test targets that their own 45-record window holds: the ceiling of any copy-based
            # prediction and where the "most frequent place" baseline gets all its accuracy
            "test targets inside their window": round(w.repeat_rate("test"), 3) if w.n_windows("test") else None,
        })
    df = pd.DataFrame(rows)
    df.attrs["data_checksum"] = {w.meta.get("dataset", "?"): w.meta.get("checksum") for w in windows_list}
    df.attrs["cache_key"] = {w.meta.get("dataset", "?"): w.meta.get("cache_key") for w in windows_list}
    return df
