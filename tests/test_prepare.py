"""The prepared-data cache (never stale, never half-read) and the dataset statistics table."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from nextlocmoe.data import prepare as prep
from nextlocmoe.data import sources
from nextlocmoe.data.config import CsvColumns, DataConfig, SyntheticConfig
from nextlocmoe.data.prepare import cache_key, dataset_statistics, load_windows, prepare, raw_checksum
from nextlocmoe.results import write_dataset_statistics
from nextlocmoe.data.windows import make_windows
from nextlocmoe.errors import DataError
from nextlocmoe.io import file_sha256


def write_humob(path: Path, seed: int = 0, users: int = 14, days: int = 8) -> pd.DataFrame:
    """A small HuMob CSV: users with idle days (gaps over 24 h) and a few masked rows (x = y = 999)."""
    rng = np.random.default_rng(seed)
    active = (rng.random((users, days, 48)) < 0.3) & (rng.random((users, days)) < 0.8)[:, :, None]
    uid, d, t = np.nonzero(active)
    xy = rng.integers(1, 21, (len(uid), 2))
    masked = rng.random(len(uid)) < 0.03
    xy[masked] = 999
    frame = pd.DataFrame({"uid": uid + 100, "d": d, "t": t, "x": xy[:, 0], "y": xy[:, 1]})
    frame.to_csv(path, index=False)
    return frame


@pytest.fixture
def humob(tmp_path):
    path = tmp_path / "city.csv"
    frame = write_humob(path)
    cfg = DataConfig(source="humob", path=str(path), humob_grid=20, history=6, current=3, keep_every=1)
    return path, frame, cfg


@pytest.fixture
def load_calls(monkeypatch):
    """Count calls of sources.load_records (a cache hit must not read the raw file)."""
    calls = []
    real = sources.load_records

    def counting(cfg):
        calls.append(cfg)
        return real(cfg)

    monkeypatch.setattr(sources, "load_records", counting)
    return calls


def assert_same_windows(a, b):
    for f in dataclasses.fields(a):
        va, vb = getattr(a, f.name), getattr(b, f.name)
        if isinstance(va, np.ndarray):
            assert va.dtype == vb.dtype, f.name
            np.testing.assert_array_equal(va, vb, err_msg=f.name)
        elif f.name == "starts":
            assert set(va) == set(vb)
            for split in va:
                np.testing.assert_array_equal(va[split], vb[split])
        elif f.name == "meta":  # JSON round trip turns tuples into lists
            assert json.loads(json.dumps(va, default=str)) == json.loads(json.dumps(vb, default=str))
        else:
            assert va == vb, f.name


# ---------------------------------------------------------------------------------------------------
# cache behaviour

def test_prepare_caches_and_reloads_identically(humob, tmp_path, load_calls):
    path, _, cfg = humob
    cache = tmp_path / "cache"
    first = prepare(cfg, cache_dir=cache)
    assert len(load_calls) == 1
    fresh = make_windows(sources.LOADERS["humob"](cfg.resolved()), cfg.resolved())
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(first.starts[split], fresh.starts[split])
    np.testing.assert_array_equal(first.x, fresh.x)
    assert first.meta["cache_key"] == cache_key(cfg.resolved(), file_sha256(path))
    second = prepare(cfg, cache_dir=cache)
    assert len(load_calls) == 1                       # served from the cache
    assert_same_windows(first, second)
    prepare(cfg, cache_dir=cache, force=True)
    assert len(load_calls) == 2                       # force rebuilds
    entries = [p.name for p in cache.iterdir() if not p.name.endswith(".lock")]   # the entry's lock file stays
    assert len(entries) == 1 and not entries[0].startswith(".")


def test_editing_the_raw_file_misses_the_cache(humob, tmp_path, load_calls):
    path, frame, cfg = humob
    cache = tmp_path / "cache"
    before = prepare(cfg, cache_dir=cache)
    edited = frame.copy()
    row = int(np.flatnonzero(edited["x"].to_numpy() != 999)[5])
    edited.loc[row, "x"] = 1 if edited.loc[row, "x"] != 1 else 2      # move one visit by one cell
    edited.to_csv(path, index=False)
    after = prepare(cfg, cache_dir=cache)
    assert len(load_calls) == 2
    assert after.meta["cache_key"] != before.meta["cache_key"]
    assert not np.array_equal(after.x, before.x)
    fresh = make_windows(sources.LOADERS["humob"](cfg.resolved()), cfg.resolved())
    np.testing.assert_array_equal(after.x, fresh.x)


# Every DataConfig field, with a changed value. A new field must be added here (see the coverage check).
CHANGED = {
    "history": 7, "current": 4, "stride": 2, "keep_every": 3, "gap_hours": 12.0, "min_segment": 5,
    "last_duration_h": 0.5, "split": "chronological", "split_fractions": (0.6, 0.2, 0.2), "seed": 1,
    "humob_cell_m": 250.0, "humob_grid": 25, "humob_start": "2023-01-09",
}
ONLY_FOR = {"synthetic": "synthetic", "csv": "csv"}   # sub-configs read by one source only


def test_cache_key_changes_with_every_parameter(humob):
    path, _, cfg = humob
    covered = set(CHANGED) | set(ONLY_FOR) | {"source", "path"}
    assert covered == {f.name for f in dataclasses.fields(DataConfig)}
    checksum = raw_checksum(cfg.resolved())
    base = cache_key(cfg.resolved(), checksum)
    keys = {base}
    for name, value in CHANGED.items():
        key = cache_key(dataclasses.replace(cfg, **{name: value}).resolved(), checksum)
        assert key not in keys, name
        keys.add(key)
    other_path = path.with_name("copy.csv")
    shutil.copy(path, other_path)
    assert cache_key(dataclasses.replace(cfg, path=str(other_path)).resolved(), checksum) not in keys
    assert cache_key(cfg.resolved(), "another checksum") != base
    # a None left to the source default is the same config as the default written out
    assert cache_key(dataclasses.replace(cfg, stride=None).resolved(), checksum) == \
        cache_key(dataclasses.replace(cfg, stride=3).resolved(), checksum)
    # every field is in the key, even one this source ignores: a rebuild at worst, never a stale cache
    assert cache_key(dataclasses.replace(cfg, synthetic=SyntheticConfig(users=7)).resolved(), checksum) != base
    assert cache_key(dataclasses.replace(cfg, csv=CsvColumns(user="uid")).resolved(), checksum) != base


def test_cache_key_follows_the_synthetic_and_csv_sub_configs(tmp_path):
    syn = DataConfig(source="synthetic").resolved()
    base = cache_key(syn, raw_checksum(syn))
    for field in dataclasses.fields(SyntheticConfig):
        value = getattr(syn.synthetic, field.name)
        changed = dataclasses.replace(syn, synthetic=dataclasses.replace(syn.synthetic,
                                                                         **{field.name: value + 1}))
        assert cache_key(changed, raw_checksum(changed)) != base, field.name
    csv_path = tmp_path / "visits.csv"
    csv_path.write_text("user,timestamp,lat,lon\n1,2024-01-01 10:00,40.7,-74.0\n")
    csv = DataConfig(source="csv", path=str(csv_path)).resolved()
    base = cache_key(csv, raw_checksum(csv))
    for field in dataclasses.fields(CsvColumns):
        changed = dataclasses.replace(csv, csv=dataclasses.replace(csv.csv, **{field.name: "other"}))
        assert cache_key(changed, raw_checksum(changed)) != base, field.name


def test_leftover_temporary_entry_is_never_read(humob, tmp_path, load_calls):
    _, _, cfg = humob
    cache = tmp_path / "cache"
    good = prepare(cfg, cache_dir=cache)
    entry = next(p for p in cache.iterdir() if p.is_dir())
    # a complete-looking copy under the temporary name, holding wrong numbers, and no real entry
    leftover = cache / f".tmp-{entry.name}-crashed"
    entry.rename(leftover)
    meta = json.loads((leftover / "meta.json").read_text())
    meta["stats"]["x_mean"] += 1e6
    (leftover / "meta.json").write_text(json.dumps(meta))
    again = prepare(cfg, cache_dir=cache)
    assert len(load_calls) == 2                       # rebuilt, not read from the leftover
    assert again.stats == good.stats


def test_half_written_entry_is_rebuilt(humob, tmp_path, load_calls):
    _, _, cfg = humob
    cache = tmp_path / "cache"
    good = prepare(cfg, cache_dir=cache)
    entry = next(p for p in cache.iterdir() if p.is_dir())
    blob = (entry / "arrays.npz").read_bytes()
    (entry / "arrays.npz").write_bytes(blob[: len(blob) // 3])      # truncated
    assert load_windows(entry, good.meta["cache_key"]) is None
    again = prepare(cfg, cache_dir=cache)
    assert len(load_calls) == 2
    assert_same_windows(good, again)
    (entry / "meta.json").unlink()                                  # meta missing
    assert load_windows(entry, good.meta["cache_key"]) is None
    prepare(cfg, cache_dir=cache)
    assert len(load_calls) == 3
    assert load_windows(entry, "a different key") is None          # a key mismatch is a miss too


def test_crash_while_saving_leaves_no_entry(humob, tmp_path, monkeypatch):
    _, _, cfg = humob
    cache = tmp_path / "cache"

    def crash(file, **arrays):
        Path(file).write_bytes(b"PK\x03\x04 partial")
        raise KeyboardInterrupt("simulated crash while writing")

    monkeypatch.setattr(prep.np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, cache_dir=cache)
    assert list(cache.iterdir()) == []                # neither an entry nor a temporary folder
    monkeypatch.undo()
    assert prepare(cfg, cache_dir=cache).n_windows("train") > 0


def test_missing_raw_file_is_a_data_error(tmp_path):
    cfg = DataConfig(source="humob", path=str(tmp_path / "absent.csv"))
    with pytest.raises(DataError, match="absent.csv"):
        prepare(cfg, cache_dir=tmp_path / "cache")


# ---------------------------------------------------------------------------------------------------
# statistics table

def test_dataset_statistics_and_files(humob, tmp_path, capsys):
    path, frame, cfg = humob
    w = prepare(cfg, cache_dir=tmp_path / "cache")
    syn = prepare(DataConfig(source="synthetic", synthetic=SyntheticConfig(grid=10, users=30, days=7),
                             history=6, current=3), cache_dir=tmp_path / "cache")
    df = dataset_statistics([w, syn])
    row = df.iloc[0]
    kept = frame[~((frame.x == 999) & (frame.y == 999))]
    assert row["dataset"] == "humob"
    assert row["users"] == kept["uid"].nunique()
    assert row["records"] == len(kept)
    assert row["locations"] == 20 * 20
    assert row["sub-users"] == len(np.unique(w.subuser))
    assert row["records in sub-users"] == len(w.x)
    for split in ("train", "val", "test"):
        assert row[f"windows {split}"] == len(w.starts[split])
    assert (row["history"], row["current"], row["split"]) == (6, 3, "user 70/10/20")
    assert df.iloc[1]["dataset"] == "synthetic" and df.iloc[1]["locations"] == 100
    assert row["test targets inside their window"] == pytest.approx(round(w.repeat_rate("test"), 3))
    assert 0.0 <= df.iloc[1]["test targets inside their window"] <= 1.0

    paths = write_dataset_statistics(df, results_dir=tmp_path / "results", profile="test")
    back = pd.read_csv(paths["csv"])
    assert back["windows train"].tolist() == df["windows train"].tolist()
    md = paths["md"].read_text().splitlines()
    assert len(md) == 2 + len(df) and md[0].startswith("| dataset | users |")
    assert f"| humob | {row['users']:,} |" in md[2]
    sidecar = json.loads(paths["json"].read_text())
    assert sidecar["profile"] == "test" and "git_sha" in sidecar
    assert sidecar["data_checksum"]["humob"] == file_sha256(path)
    assert "| humob |" in capsys.readouterr().out
    assert not [p for p in (tmp_path / "results").iterdir() if p.name.startswith(".")]


def test_git_sha_comes_from_the_environment_where_there_is_no_checkout(tmp_path, monkeypatch):
    from nextlocmoe.io import git_sha

    monkeypatch.delenv("NEXTLOCMOE_GIT_SHA", raising=False)
    assert git_sha(tmp_path) == "unknown"                     # a copy of the tree without .git
    monkeypatch.setenv("NEXTLOCMOE_GIT_SHA", "abc123-dirty")  # set by .ci/gpu/run.sh on the lent GPU machine
    assert git_sha(tmp_path) == "abc123-dirty"


def test_device_name_says_which_cpu_and_vector_instructions_ran_a_measurement(monkeypatch):
    import torch

    from nextlocmoe.io import device_name

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    name = device_name()
    assert name.startswith("cpu (") and "cores" in name
    assert torch.backends.cpu.get_cpu_capability() in name


def test_git_sha_is_dirty_for_changed_code_but_not_for_rewritten_outputs(tmp_path, monkeypatch):
    import subprocess

    from nextlocmoe.io import git_sha

    monkeypatch.delenv("NEXTLOCMOE_GIT_SHA", raising=False)
    run = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)  # noqa: E731
    run("init", "-q")
    (tmp_path / "results").mkdir()
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "results" / "table.csv").write_text("a\n")
    run("add", ".")
    run("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    clean = git_sha(tmp_path)
    assert not clean.endswith("-dirty") and len(clean) == 40
    (tmp_path / "results" / "table.csv").write_text("b\n")       # a run rewrote a committed table
    assert git_sha(tmp_path) == clean
    (tmp_path / "code.py").write_text("x = 2\n")                  # the code changed
    assert git_sha(tmp_path) == clean + "-dirty"
