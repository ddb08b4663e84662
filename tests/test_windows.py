"""Windows, sub-users, splits and normalisation against an independent per-user Python-loop construction."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest
import torch

from nextlocmoe.data.config import DataConfig
from nextlocmoe.data.schema import FUNCTIONS, MobilityData
from nextlocmoe.data.windows import WindowDataset, Windows, identity_collate, make_windows, subsample
from nextlocmoe.errors import ConfigError, DataError

START = pd.Timestamp("2023-03-01 06:13")


def random_mobility(seed: int = 0, n_users: int = 9, n_locations: int = 40, big_gap_p: float = 0.04,
                    lengths: list[int] | None = None) -> MobilityData:
    """Several users of random length (some too short for a window), with occasional multi-day gaps."""
    rng = np.random.default_rng(seed)
    loc = pd.DataFrame({
        "x": rng.uniform(-8000, 8000, n_locations), "y": rng.uniform(-6000, 6000, n_locations),
        "lat": np.nan, "lon": np.nan,
        "function": rng.choice(list(FUNCTIONS) + ["Unknown"], n_locations),
        "name": [f"cell{i}" for i in range(n_locations)],
    })
    lengths = lengths or list(rng.integers(3, 160, n_users))
    frames = []
    for u, n in enumerate(lengths):
        minutes = rng.integers(10, 400, n).astype(float)
        minutes[rng.random(n) < big_gap_p] = rng.integers(25 * 60, 80 * 60)   # gaps over a day
        t = START + pd.Timedelta(days=int(rng.integers(0, 20))) + pd.to_timedelta(np.cumsum(minutes), "min")
        ids = rng.integers(0, n_locations, n)
        frames.append(pd.DataFrame({"user": u, "timestamp": t, "x": loc.x.to_numpy()[ids],
                                    "y": loc.y.to_numpy()[ids], "lat": np.nan, "lon": np.nan,
                                    "location": ids, "function": loc.function.to_numpy()[ids]}))
    rec = pd.concat(frames, ignore_index=True)
    rec["timestamp"] = rec["timestamp"].astype("datetime64[ns]")
    return MobilityData(name="toy", records=rec, locations=loc, source="generated", checksum="toy",
                        truth={"user_role": pd.Series(["Student"] * len(lengths))})


def config(**kw) -> DataConfig:
    base = dict(source="synthetic", history=6, current=3, stride=2, keep_every=1, gap_hours=24.0,
                min_segment=10, split="user", seed=0)
    base.update(kw)
    return DataConfig(**base).resolved()


# ---------------------------------------------------------------------------------------------------
# the independent reference: one user at a time, plain Python

def reference_windows(data: MobilityData, cfg: DataConfig) -> dict:
    """Sub-users, per-record features and windows built with explicit loops and datetime objects."""
    H, C = cfg.history, cfg.current
    subusers, windows = [], []
    for u, grp in data.records.groupby("user", sort=True):
        grp = grp.sort_values("timestamp", kind="stable")
        recs = list(zip(grp.timestamp, grp.x, grp.y, grp.location))
        segment = [recs[0]]
        segments = []
        for prev, cur in zip(recs, recs[1:]):
            if (cur[0] - prev[0]).total_seconds() / 3600 > cfg.gap_hours:
                segments.append(segment)
                segment = []
            segment.append(cur)
        segments.append(segment)
        for seg in segments:
            if len(seg) <= cfg.min_segment:
                continue
            feats = []
            for i, (t, x, y, l) in enumerate(seg):
                py = t.to_pydatetime()
                dur = (seg[i + 1][0] - t).total_seconds() / 3600 if i + 1 < len(seg) else cfg.last_duration_h
                feats.append(dict(x=x, y=y, weekday=py.weekday(), hour=py.hour, duration=dur, location=l, t=t))
            sid = len(subusers)
            subusers.append(dict(user=u, records=feats))
            s = 0
            while s + H + C + 1 <= len(feats):
                windows.append(dict(subuser=sid, user=u, hist=feats[s:s + H], cur=feats[s + H:s + H + C],
                                    target=feats[s + H + C]))
                s += cfg.stride
    windows = windows[::cfg.keep_every]
    return dict(subusers=subusers, windows=windows)


def all_windows_in_order(w: Windows) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Batches of every split concatenated and reordered by start index, plus the split labels."""
    parts = [w.batch(s, np.arange(w.n_windows(s))) for s in ("train", "val", "test")]
    starts = np.concatenate([w.starts[s] for s in ("train", "val", "test")])
    labels = np.concatenate([np.full(w.n_windows(s), i) for i, s in enumerate(("train", "val", "test"))])
    order = np.argsort(starts, kind="stable")
    merged = {k: np.concatenate([p[k] for p in parts])[order] for k in parts[0]}
    return merged, labels[order]


# ---------------------------------------------------------------------------------------------------
# contents

@pytest.mark.parametrize("seed,stride,keep_every", [(0, 1, 1), (1, 2, 1), (2, 3, 2), (3, 1, 5)])
def test_window_contents_equal_reference(seed, stride, keep_every):
    data = random_mobility(seed)
    cfg = config(stride=stride, keep_every=keep_every)
    w = make_windows(data, cfg)
    ref = reference_windows(data, cfg)
    got, _ = all_windows_in_order(w)
    assert len(got["target_location"]) == len(ref["windows"]) > 0
    n = w.stats
    for i, rw in enumerate(ref["windows"]):
        for prefix, recs in (("hist", rw["hist"]), ("cur", rw["cur"])):
            xy = np.array([[(r["x"] - n.x_mean) / n.x_std, (r["y"] - n.y_mean) / n.y_std] for r in recs])
            np.testing.assert_allclose(got[f"{prefix}_xy"][i], xy, rtol=1e-5, atol=1e-5)
            assert got[f"{prefix}_weekday"][i].tolist() == [r["weekday"] for r in recs]
            assert got[f"{prefix}_hour"][i].tolist() == [r["hour"] for r in recs]
            assert got[f"{prefix}_location"][i].tolist() == [r["location"] for r in recs]
            dur = [min(max((r["duration"] - n.dur_min) / (n.dur_max - n.dur_min), 0.0), 1.0) for r in recs]
            np.testing.assert_allclose(got[f"{prefix}_duration"][i], dur, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got["target_xy"][i], [rw["target"]["x"], rw["target"]["y"]], rtol=1e-6)
        assert got["target_location"][i] == rw["target"]["location"]
        assert got["subuser"][i] == rw["subuser"] and got["user"][i] == rw["user"]


def test_durations_and_subusers_equal_reference():
    data = random_mobility(4, big_gap_p=0.08)
    cfg = config(min_segment=7, gap_hours=20.0)
    w = make_windows(data, cfg)
    ref = reference_windows(data, cfg)
    assert w.n_subusers == len(ref["subusers"])
    assert w.subuser_user.tolist() == [s["user"] for s in ref["subusers"]]
    flat = [r for s in ref["subusers"] for r in s["records"]]
    assert w.n_records == len(flat)
    np.testing.assert_allclose(w.duration, [r["duration"] for r in flat], rtol=1e-6)
    assert w.timestamp.tolist() == [r["t"].value for r in flat]
    assert np.all(np.diff(w.subuser) >= 0)
    # the last record of every sub-user carries last_duration_h
    last = np.r_[w.subuser[1:] != w.subuser[:-1], True]
    np.testing.assert_allclose(w.duration[last], cfg.last_duration_h, rtol=1e-6)


def test_unsorted_records_give_the_same_windows():
    data = random_mobility(5)
    shuffled = data.records.sample(frac=1.0, random_state=0).reset_index(drop=True)
    other = MobilityData(name="toy", records=shuffled, locations=data.locations, source="x", checksum="x")
    a, b = make_windows(data, config()), make_windows(other, config())
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(a.starts[split], b.starts[split])
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.timestamp, b.timestamp)


def test_weekday_and_hour_from_calendar():
    data = random_mobility(6)
    w = make_windows(data, config())
    py = [dt.datetime(1970, 1, 1) + dt.timedelta(microseconds=int(t) // 1000) for t in w.timestamp[::37]]
    assert w.weekday[::37].tolist() == [d.weekday() for d in py]
    assert w.hour[::37].tolist() == [d.hour for d in py]


def test_min_segment_boundary_and_gap_cut():
    # user 0: 12 records, a 30 h gap, then 11 records; user 1: exactly 10 records -> dropped at min_segment=10
    rng = np.random.default_rng(0)
    loc = pd.DataFrame({"x": [0.0, 100.0], "y": [0.0, 50.0], "lat": np.nan, "lon": np.nan,
                        "function": ["Residential", "Unknown"], "name": ["a", "b"]})
    t0 = pd.Timestamp("2024-01-01")
    times = ([t0 + pd.Timedelta(hours=i) for i in range(12)]
             + [t0 + pd.Timedelta(hours=11 + 30 + i) for i in range(11)]
             + [t0 + pd.Timedelta(hours=i) for i in range(10)])
    users = [0] * 23 + [1] * 10
    ids = rng.integers(0, 2, len(users))
    rec = pd.DataFrame({"user": users, "timestamp": pd.to_datetime(times).astype("datetime64[ns]"),
                        "x": loc.x.to_numpy()[ids], "y": loc.y.to_numpy()[ids], "lat": np.nan, "lon": np.nan,
                        "location": ids, "function": loc.function.to_numpy()[ids]})
    data = MobilityData(name="edge", records=rec, locations=loc, source="t", checksum="t")
    w = make_windows(data, config(history=4, current=2, stride=1, split="chronological"))
    assert w.n_subusers == 2 and w.subuser_user.tolist() == [0, 0]
    assert np.bincount(w.subuser).tolist() == [12, 11]
    # 12 records, window span 7, stride 1 -> 6 windows; 11 records -> 5 windows
    assert sum(w.n_windows(s) for s in ("train", "val", "test")) == 11
    assert w.duration[11] == pytest.approx(0.1)   # last record before the gap
    assert w.candidate_function.tolist() == [FUNCTIONS.index("Residential"), -1]
    np.testing.assert_array_equal(w.candidates, [[0.0, 0.0], [100.0, 50.0]])
    w11 = make_windows(data, config(history=4, current=2, stride=1, min_segment=11, split="chronological"))
    assert w11.n_subusers == 1


@pytest.mark.parametrize("stride,keep_every", [(1, 1), (3, 1), (2, 4), (5, 3)])
def test_stride_and_keep_every_counts(stride, keep_every):
    data = random_mobility(7, n_users=12)
    cfg = config(stride=stride, keep_every=keep_every, split_fractions=(0.5, 0.25, 0.25))
    w = make_windows(data, cfg)
    H, C = cfg.history, cfg.current
    lengths = np.bincount(w.subuser)
    per_sub = [len(range(0, n - (H + C + 1) + 1, stride)) if n >= H + C + 1 else 0 for n in lengths]
    total = sum(per_sub)
    assert sum(w.n_windows(s) for s in ("train", "val", "test")) == -(-total // keep_every)
    starts = np.sort(np.concatenate(list(w.starts.values())))
    offsets = np.r_[0, np.cumsum(lengths)[:-1]]
    if keep_every == 1:   # every start lies on the stride grid of its sub-user
        assert np.all((starts - offsets[w.subuser[starts]]) % stride == 0)
    # a window never crosses a sub-user
    assert np.all(w.subuser[starts] == w.subuser[starts + H + C])


# ---------------------------------------------------------------------------------------------------
# splits

def test_user_split_disjoint_and_fractions():
    data = random_mobility(8, n_users=40)
    cfg = config(split="user", split_fractions=(0.7, 0.1, 0.2))
    w = make_windows(data, cfg)
    subs = {s: set(w.subuser[w.starts[s]].tolist()) for s in ("train", "val", "test")}
    assert not subs["train"] & subs["val"] and not subs["train"] & subs["test"] and not subs["val"] & subs["test"]
    lengths = np.bincount(w.subuser)
    eligible = int((lengths >= cfg.history + cfg.current + 1).sum())
    assert len(subs["train"] | subs["val"] | subs["test"]) == eligible
    n_train = int(0.7 * eligible + 0.5)
    n_val = int(0.8 * eligible + 0.5) - n_train
    assert (len(subs["train"]), len(subs["val"]), len(subs["test"])) == (n_train, n_val, eligible - n_train - n_val)
    # deterministic given the seed, different with another seed
    again = make_windows(data, cfg)
    other = make_windows(data, config(split="user", seed=1))
    np.testing.assert_array_equal(w.starts["test"], again.starts["test"])
    assert set(other.subuser[other.starts["test"]].tolist()) != subs["test"]


@pytest.mark.parametrize("fractions,keep_every", [((0.7, 0.1, 0.2), 1), ((0.2, 0.3, 0.5), 7)])
def test_chronological_split_orders_targets(fractions, keep_every):
    data = random_mobility(9, n_users=10)
    cfg = config(split="chronological", stride=1, split_fractions=fractions, keep_every=keep_every)
    f_train, f_val, _ = fractions
    w = make_windows(data, cfg)
    H, C = cfg.history, cfg.current
    target_t = {s: w.timestamp[w.starts[s] + H + C] for s in ("train", "val", "test")}
    owner = {s: w.subuser[w.starts[s]] for s in ("train", "val", "test")}
    for sub in np.unique(np.concatenate(list(owner.values()))):
        t = {s: target_t[s][owner[s] == sub] for s in owner}
        n = sum(len(v) for v in t.values())
        assert n >= 1 and len(t["train"]) >= 1     # every sub-user with a window trains first
        n_train = max(1, int(f_train * n + 0.5 + 1e-9))
        n_val = max(n_train, int((f_train + f_val) * n + 0.5 + 1e-9)) - n_train
        assert (len(t["train"]), len(t["val"]), len(t["test"])) == (n_train, n_val, n - n_train - n_val)
        if len(t["val"]):
            assert t["train"].max() <= t["val"].min()
        if len(t["test"]):
            assert max(t["train"].max(), t["val"].max() if len(t["val"]) else 0) <= t["test"].min()


# ---------------------------------------------------------------------------------------------------
# normalisation

def reference_norm(w: Windows) -> tuple[float, ...]:
    touched = sorted({i for s in w.starts["train"] for i in range(s, s + w.history + w.current)})
    x, y, d = w.x[touched], w.y[touched], w.duration[touched].astype(float)
    return x.mean(), x.std(), y.mean(), y.std(), d.min(), d.max()


def norm_tuple(w: Windows) -> tuple[float, ...]:
    n = w.stats
    return n.x_mean, n.x_std, n.y_mean, n.y_std, n.dur_min, n.dur_max


def _with_moved_records(data: MobilityData, keys: set[tuple[int, int]]) -> MobilityData:
    rec = data.records.copy()
    hit = np.array([(u, t) in keys for u, t in zip(rec.user, rec.timestamp.astype("int64"))])
    assert hit.any()
    rec.loc[hit, "x"] += 50_000.0
    rec.loc[hit, "y"] -= 30_000.0
    return MobilityData(name=data.name, records=rec, locations=data.locations, source="m", checksum="m")


@pytest.mark.parametrize("split", ["user", "chronological"])
def test_normalisation_from_train_only(split):
    data = random_mobility(10, n_users=15)
    cfg = config(split=split, stride=1)
    w = make_windows(data, cfg)
    np.testing.assert_allclose(norm_tuple(w), reference_norm(w), rtol=1e-9)
    touched = np.zeros(w.n_records, bool)
    for s in w.starts["train"]:
        touched[s:s + w.history + w.current] = True
    key = lambda idx: {(int(w.subuser_user[w.subuser[i]]), int(w.timestamp[i])) for i in idx}
    # moving records no training input touches leaves the statistics unchanged ...
    moved = make_windows(_with_moved_records(data, key(np.flatnonzero(~touched))), cfg)
    for s in ("train", "val", "test"):
        np.testing.assert_array_equal(moved.starts[s], w.starts[s])
    assert norm_tuple(moved) == norm_tuple(w)
    # ... while moving training records changes them (so the check above can fail)
    moved_train = make_windows(_with_moved_records(data, key(np.flatnonzero(touched)[:5])), cfg)
    assert norm_tuple(moved_train) != norm_tuple(w)


# ---------------------------------------------------------------------------------------------------
# batches and torch access

def test_batch_shapes_and_dtypes():
    w = make_windows(random_mobility(11), config())
    H, C, B = w.history, w.current, 5
    b = w.batch("train", np.arange(B))
    expect = {
        "hist_xy": ((B, H, 2), np.float32), "hist_weekday": ((B, H), np.int64), "hist_hour": ((B, H), np.int64),
        "hist_duration": ((B, H), np.float32), "hist_location": ((B, H), np.int64),
        "cur_xy": ((B, C, 2), np.float32), "cur_weekday": ((B, C), np.int64), "cur_hour": ((B, C), np.int64),
        "cur_duration": ((B, C), np.float32), "cur_location": ((B, C), np.int64),
        "target_xy": ((B, 2), np.float32), "target_location": ((B,), np.int64),
        "user": ((B,), np.int64), "subuser": ((B,), np.int64),
        "next_hour": ((B,), np.int64), "next_weekday": ((B,), np.int64),
    }
    assert set(b) == set(expect)
    for k, (shape, dtype) in expect.items():
        assert b[k].shape == shape and b[k].dtype == dtype, k
    assert (b["hist_duration"] >= 0).all() and (b["hist_duration"] <= 1).all()
    assert b["hist_weekday"].max() < 7 and b["hist_hour"].max() < 24
    # targets are in metres: they match a candidate exactly
    cand = w.candidates[b["target_location"]].astype(np.float32)
    np.testing.assert_array_equal(b["target_xy"], cand)
    assert (w.x.dtype, w.weekday.dtype, w.hour.dtype, w.duration.dtype, w.location.dtype, w.subuser.dtype,
            w.timestamp.dtype) == (np.float64, np.int8, np.int8, np.float32, np.int32, np.int32, np.int64)
    assert all(s.dtype == np.int64 for s in w.starts.values())


def test_dataset_and_dataloader():
    w = make_windows(random_mobility(12), config())
    ds = WindowDataset(w, "val")
    assert len(ds) == w.n_windows("val")
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False, collate_fn=identity_collate)
    batches = list(loader)
    assert sum(len(b["target_location"]) for b in batches) == len(ds)
    first = batches[0]
    assert isinstance(first, dict) and first["hist_xy"].shape == (min(4, len(ds)), w.history, 2)
    np.testing.assert_array_equal(first["cur_location"].numpy(), w.batch("val", np.arange(len(first["user"])))["cur_location"])
    one = ds[1]
    assert one["hist_xy"].shape == (w.history, 2) and one["target_location"].ndim == 0
    assert torch.equal(one["hist_location"], first["hist_location"][1])
    with pytest.raises(IndexError):
        ds[len(ds)]
    with pytest.raises(ConfigError, match="split"):
        WindowDataset(w, "training")


def test_subsample():
    w = make_windows(random_mobility(13, n_users=20), config(stride=1))
    small = subsample(w, "train", 7, seed=3)
    assert small.n_windows("train") == 7 and small.n_windows("test") == w.n_windows("test")
    assert set(small.starts["train"]) <= set(w.starts["train"])
    assert np.all(np.diff(small.starts["train"]) > 0)
    assert small.x is w.x                                   # a view: flat arrays are shared
    np.testing.assert_array_equal(small.starts["train"], w.subsample("train", 7, seed=3).starts["train"])
    assert w.subsample("train", 10**9) is w
    assert w.n_windows("train") > 7                         # the original is untouched


# ---------------------------------------------------------------------------------------------------
# errors

def test_error_when_windows_longer_than_any_subuser():
    data = random_mobility(14)
    longest = max(np.bincount(make_windows(data, config()).subuser))
    with pytest.raises(DataError, match=rf"history=200.*current=3.*longest sub-user has {longest}"):
        make_windows(data, config(history=200))


def test_error_on_empty_split():
    data = random_mobility(15, lengths=[60, 70], big_gap_p=0.0)    # two sub-users: 70/10/20 leaves test empty
    with pytest.raises(DataError, match=r"split_fractions=\(0\.7, 0\.1, 0\.2\)"):
        make_windows(data, config(split="user"))


def test_error_when_every_segment_is_too_short():
    data = random_mobility(16, lengths=[5, 8, 9])
    with pytest.raises(DataError, match="min_segment=10"):
        make_windows(data, config())
