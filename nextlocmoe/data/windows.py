"""Records -> sub-users -> (history, current, target) windows -> train/val/test splits.

Paper Sec. 5.1 (and docs/design.md §2.7): a sample is a long-term history S_h (the H records just before the
current window), a current trajectory S_c (C records) and a target, the record right after S_c. Each
record is the 5-tuple (x, y, weekday, hour, duration), duration = hours to the sub-user's next record.

Everything here is vectorised numpy over flat per-record arrays; a window is nothing but the int64 index
of its first record, so the HuMob scale (6.7 million records, ~2 million windows) costs a few hundred MB.

    flat record arrays   x, y, weekday, hour, duration, location, subuser, timestamp   (N,)
    window start s       history = records [s, s+H), current = [s+H, s+H+C), target = s+H+C

Decisions this file takes (the paper is silent on them):

* `keep_every` thins the list of all windows, ordered by (sub-user, start), globally: window number
  0, k, 2k, ... is kept. The user partition is drawn before thinning, over the sub-users that have at
  least one window at all, so changing `keep_every` never reshuffles users.
* Splits round half up: a sub-user (chronological) or the sub-user list (user split) of n items gives
  train = round(f_train * n) and val = round((f_train + f_val) * n) - train. In the chronological split
  a sub-user with at least one window always gives its first window to train.
* Normalisation statistics come from the records that the inputs (S_h and S_c) of training windows
  touch. Under the chronological split every sub-user is a training sub-user, so "training sub-users'
  records" would leak the validation and test periods into the statistics; "touched by training
  inputs" is leak-free under both protocols.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..errors import ConfigError, DataError
from .config import DataConfig
from .schema import FUNCTIONS, MobilityData

SPLITS = ("train", "val", "test")
NS_PER_HOUR = 3_600 * 10**9
NS_PER_DAY = 24 * NS_PER_HOUR
EPOCH_WEEKDAY = 3  # 1970-01-01 was a Thursday (Monday = 0)


# ---------------------------------------------------------------------------------------------------
# containers

@dataclass
class NormStats:
    """Input normalisation fitted on the training split (reference code: z-score x/y, min-max duration)."""

    x_mean: float   # metres
    x_std: float    # metres (1.0 when the training records have a single x)
    y_mean: float   # metres
    y_std: float    # metres
    dur_min: float  # hours
    dur_max: float  # hours

    def z_xy(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Stack z-scored coordinates on a last axis of size 2, float32."""
        return np.stack([(x - self.x_mean) / self.x_std, (y - self.y_mean) / self.y_std], -1).astype(np.float32)

    def minmax_duration(self, duration: np.ndarray) -> np.ndarray:
        """Min-max scale durations into [0, 1]; values outside the training range are clipped."""
        span = self.dur_max - self.dur_min
        return np.clip((duration - self.dur_min) / (span if span > 0 else 1.0), 0.0, 1.0).astype(np.float32)


@dataclass
class Windows:
    """Every window of one dataset, as start indices into flat per-record arrays (see module docstring)."""

    # per record, N = records of kept sub-users, ordered by (sub-user, time)
    x: np.ndarray                  # (N,) float64 metres east
    y: np.ndarray                  # (N,) float64 metres north
    weekday: np.ndarray            # (N,) int8, 0 = Monday
    hour: np.ndarray               # (N,) int8, 0..23
    duration: np.ndarray           # (N,) float32 hours to the sub-user's next record (last: last_duration_h)
    location: np.ndarray           # (N,) int32 row of the candidate table
    subuser: np.ndarray            # (N,) int32 sub-user id 0..S-1
    timestamp: np.ndarray          # (N,) int64 nanoseconds since 1970 (local time)
    # windows
    starts: dict[str, np.ndarray]  # split -> (W_split,) int64 first record of each window
    history: int                   # H, records in S_h (paper: 40)
    current: int                   # C, records in S_c (paper: 5)
    stats: NormStats               # fitted on the training split only
    # candidates and users
    candidates: np.ndarray         # (L, 2) float64 metres, every location of the dataset
    candidate_function: np.ndarray  # (L,) int64 index into schema.FUNCTIONS, -1 for Unknown
    subuser_user: np.ndarray       # (S,) int64 original user of each sub-user
    meta: dict[str, Any] = field(default_factory=dict)  # dataset, checksum, config, cache_key, counts

    # -----------------------------------------------------------------------------------------------
    @property
    def n_records(self) -> int:
        return int(len(self.x))

    @property
    def n_subusers(self) -> int:
        return int(len(self.subuser_user))

    @property
    def n_locations(self) -> int:
        return int(len(self.candidates))

    def _split(self, split: str) -> np.ndarray:
        if split not in self.starts:
            raise ConfigError(f"split={split!r} is unknown; expected one of {list(self.starts)}")
        return self.starts[split]

    def n_windows(self, split: str) -> int:
        return int(len(self._split(split)))

    def target_index(self, split: str) -> np.ndarray:
        """(W_split,) int64 flat index of each window's target record."""
        return self._split(split) + self.history + self.current

    def repeat_rate(self, split: str) -> float:
        """Fraction of the split's windows whose target place is one of the window's own records (the mass a
        copy mixture can reach; model/pointer.py starts its gate there)."""
        s = self._split(split)
        if len(s) == 0:
            raise ConfigError(f"split '{split}' has no windows; the repeat rate needs at least one")
        records = self.location[s[:, None] + np.arange(self.history + self.current)]   # (W, H + C)
        target = self.location[s + self.history + self.current]                       # (W,)
        return float((records == target[:, None]).any(axis=1).mean())

    def next_visit_time(self, last: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Hour of day and weekday (int64, local time) of the visit after record(s) `last`, from the INPUT alone:
        the record's timestamp plus its duration (the hours to the next record, docs/design.md §2.2), rounded to
        the second. Within a sub-user that is the next record's own time, so a window's next_hour / next_weekday
        are its target's (tested on real data); nothing of the target record is read."""
        last = np.asarray(last, dtype=np.int64)
        gap_ns = np.round(self.duration[last].astype(np.float64) * 3_600) * 10**9    # whole seconds, in ns
        ts = self.timestamp[last] + gap_ns.astype(np.int64)                          # (B,) ns since 1970
        return (ts // NS_PER_HOUR) % 24, (ts // NS_PER_DAY + EPOCH_WEEKDAY) % 7

    def batch(self, split: str, idx: np.ndarray | list[int] | slice) -> dict[str, np.ndarray]:
        """Gather windows `idx` of `split` into model-ready numpy arrays (one fancy-index per field)."""
        s = np.asarray(self._split(split)[idx], dtype=np.int64).reshape(-1)          # (B,)
        H, C = self.history, self.current
        hist = s[:, None] + np.arange(H)                                              # (B, H)
        cur = s[:, None] + H + np.arange(C)                                           # (B, C)
        target = s + H + C                                                            # (B,)
        out: dict[str, np.ndarray] = {}
        for prefix, rows in (("hist", hist), ("cur", cur)):
            out[f"{prefix}_xy"] = self.stats.z_xy(self.x[rows], self.y[rows])          # (B, T, 2)
            out[f"{prefix}_weekday"] = self.weekday[rows].astype(np.int64)           # (B, T)
            out[f"{prefix}_hour"] = self.hour[rows].astype(np.int64)                 # (B, T)
            out[f"{prefix}_duration"] = self.stats.minmax_duration(self.duration[rows])  # (B, T)
            out[f"{prefix}_location"] = self.location[rows].astype(np.int64)         # (B, T)
        out["next_hour"], out["next_weekday"] = self.next_visit_time(cur[:, -1])      # (B,), (B,) int64
        out["target_xy"] = np.stack([self.x[target], self.y[target]], -1).astype(np.float32)  # (B, 2) metres
        out["target_location"] = self.location[target].astype(np.int64)             # (B,)
        subuser = self.subuser[s].astype(np.int64)                                    # (B,)
        out["user"] = self.subuser_user[subuser].astype(np.int64)                     # (B,)
        out["subuser"] = subuser
        return out

    def subsample(self, split: str, n: int | None, seed: int = 0) -> "Windows":
        """A view (flat arrays shared) whose `split` holds at most n windows drawn without replacement.

        The drawn windows keep their original order. n=None or n >= the split size returns self.
        """
        starts = self._split(split)
        if n is None or n >= len(starts):
            return self
        if n < 1:
            raise ConfigError(f"subsample n={n} is invalid for split '{split}'; expected an integer >= 1")
        pick = np.sort(np.random.default_rng(seed).choice(len(starts), size=n, replace=False))
        new_starts = dict(self.starts)
        new_starts[split] = starts[pick]
        meta = {**self.meta, "subsampled": {**self.meta.get("subsampled", {}), split: [int(n), int(seed)]}}
        return dataclasses.replace(self, starts=new_starts, meta=meta)


def subsample(windows: Windows, split: str, n: int | None, seed: int = 0) -> Windows:
    """Function form of `Windows.subsample` (the CPU profile trains on a subsample)."""
    return windows.subsample(split, n, seed)


# ---------------------------------------------------------------------------------------------------
# records -> windows

def _round_half_up(x: np.ndarray | float) -> np.ndarray:
    # the epsilon absorbs float error such as (0.7 + 0.1) * 5 = 3.9999999999999996
    return np.floor(np.asarray(x, dtype=np.float64) + 0.5 + 1e-9).astype(np.int64)


def _timestamps_ns(ts: pd.Series) -> np.ndarray:
    if getattr(ts.dt, "tz", None) is not None:  # the schema asks for local wall-clock time
        ts = ts.dt.tz_localize(None)
    return ts.to_numpy(dtype="datetime64[ns]").view(np.int64)


def _jsonable_truth(truth: dict[str, Any]) -> dict[str, Any]:
    """Known ground truth (e.g. role per original user) in a JSON-friendly form, kept in `meta`."""
    out: dict[str, Any] = {}
    for key, value in truth.items():
        if isinstance(value, pd.Series):
            if value.index.equals(pd.RangeIndex(len(value))):
                out[key] = value.tolist()
            else:
                out[key] = {str(k): v for k, v in value.items()}
        elif isinstance(value, np.ndarray):
            out[key] = value.tolist()
        elif isinstance(value, (str, int, float, bool, list, tuple, dict)) or value is None:
            out[key] = value
    return out


def make_windows(data: MobilityData, cfg: DataConfig) -> Windows:
    """Cut users into sub-users, build record features and windows, split them and fit normalisation.

    `cfg` should already be resolved (`cfg.resolved()`); it is resolved again here if it is not.
    """
    if any(getattr(cfg, k) is None for k in ("stride", "keep_every", "gap_hours", "min_segment", "split")):
        cfg = cfg.resolved()
    H, C = cfg.history, cfg.current
    span = H + C + 1                                              # records one window needs
    where = f"dataset '{data.name}'"
    rec = data.records

    # ---- flat arrays, ordered by (user, time) --------------------------------------------------
    user = rec["user"].to_numpy(dtype=np.int64)
    ts = _timestamps_ns(rec["timestamp"])
    order_ok = bool(np.all((user[1:] > user[:-1]) | ((user[1:] == user[:-1]) & (ts[1:] >= ts[:-1]))))
    order = None if order_ok else np.lexsort((ts, user))          # stable: equal times keep file order
    take = (lambda a: a) if order is None else (lambda a: a[order])
    user, ts = take(user), take(ts)
    x = take(rec["x"].to_numpy(dtype=np.float64))
    y = take(rec["y"].to_numpy(dtype=np.float64))
    location = take(rec["location"].to_numpy(dtype=np.int64))

    # ---- sub-users: cut at gaps > gap_hours, drop segments of <= min_segment records -------------
    new_segment = np.ones(len(user), dtype=bool)
    new_segment[1:] = (user[1:] != user[:-1]) | (np.diff(ts) > cfg.gap_hours * NS_PER_HOUR)
    segment = np.cumsum(new_segment) - 1                         # (N_raw,)
    segment_len = np.bincount(segment)                           # (segments,)
    keep_segment = segment_len > cfg.min_segment
    if not keep_segment.any():
        raise DataError(f"{where}: no sub-user has more than min_segment={cfg.min_segment} records after "
                        f"cutting at gaps over gap_hours={cfg.gap_hours}; the longest has {segment_len.max()}")
    keep = keep_segment[segment]
    subuser = (np.cumsum(keep_segment) - 1)[segment[keep]]       # (N,) renumbered 0..S-1
    subuser_user = user[new_segment][keep_segment]               # (S,)
    user, ts, x, y, location = user[keep], ts[keep], x[keep], y[keep], location[keep]
    n_records, n_sub = len(ts), int(keep_segment.sum())
    sub_len = segment_len[keep_segment]                          # (S,)
    sub_offset = np.concatenate([[0], np.cumsum(sub_len)[:-1]])  # (S,) first record of each sub-user

    # ---- per-record features ---------------------------------------------------------------------
    duration = np.empty(n_records, dtype=np.float64)
    duration[:-1] = np.diff(ts) / NS_PER_HOUR
    last_of_sub = np.ones(n_records, dtype=bool)
    last_of_sub[:-1] = subuser[1:] != subuser[:-1]
    duration[last_of_sub] = cfg.last_duration_h
    weekday = ((ts // NS_PER_DAY + EPOCH_WEEKDAY) % 7).astype(np.int8)   # floor division: also before 1970
    hour = ((ts // NS_PER_HOUR) % 24).astype(np.int8)

    # ---- windows: starts every `stride` records within each sub-user -----------------------------
    per_sub = np.where(sub_len >= span, (sub_len - span) // cfg.stride + 1, 0)   # (S,) windows per sub-user
    if per_sub.sum() == 0:
        raise DataError(f"{where}: no sub-user is long enough for one window of history={H} + current={C} "
                        f"+ 1 target = {span} records; the longest sub-user has {sub_len.max()} records")
    n_all = int(per_sub.sum())
    first_of_sub = np.repeat(np.cumsum(per_sub) - per_sub, per_sub)              # (W_all,)
    window_sub = np.repeat(np.arange(n_sub), per_sub)                             # (W_all,)
    starts_all = sub_offset[window_sub] + (np.arange(n_all) - first_of_sub) * cfg.stride
    has_window = per_sub > 0                                                       # before thinning
    thin = np.arange(n_all) % cfg.keep_every == 0
    starts_all, window_sub = starts_all[thin], window_sub[thin]

    # ---- splits ----------------------------------------------------------------------------------
    f_train, f_val, _ = cfg.split_fractions
    if cfg.split == "user":
        eligible = np.random.default_rng(cfg.seed).permutation(np.flatnonzero(has_window))
        b_train, b_val = _round_half_up(np.array([f_train, f_train + f_val]) * len(eligible))
        sub_split = np.full(n_sub, -1, dtype=np.int64)
        sub_split[eligible[:b_train]] = 0
        sub_split[eligible[b_train:b_val]] = 1
        sub_split[eligible[b_val:]] = 2
        window_split = sub_split[window_sub]
    else:  # chronological: within each sub-user, by target time
        target_ts = ts[starts_all + H + C]
        by_target = np.lexsort((starts_all, target_ts, window_sub))
        count = np.bincount(window_sub, minlength=n_sub)                          # (S,) kept windows
        rank = np.arange(len(by_target)) - np.repeat(np.cumsum(count) - count, count)  # rank in sub-user
        n = count[window_sub[by_target]]
        b_train = np.maximum(1, _round_half_up(f_train * n))
        b_val = np.maximum(b_train, _round_half_up((f_train + f_val) * n))
        window_split = np.empty(len(by_target), dtype=np.int64)
        window_split[by_target] = np.where(rank < b_train, 0, np.where(rank < b_val, 1, 2))
    starts = {name: starts_all[window_split == i].astype(np.int64) for i, name in enumerate(SPLITS)}
    empty = [name for name in SPLITS if len(starts[name]) == 0]
    if empty:
        raise DataError(f"{where}: split(s) {empty} hold no window with split='{cfg.split}', "
                        f"split_fractions={cfg.split_fractions} and {int(has_window.sum())} sub-users with "
                        f"windows; expected every split to be non-empty (more data or other fractions)")

    # ---- normalisation from the records that training inputs touch -------------------------------
    s = starts["train"]
    edges = np.bincount(s, minlength=n_records + 1) - np.bincount(s + H + C, minlength=n_records + 1)
    touched = np.cumsum(edges)[:n_records] > 0
    duration32 = duration.astype(np.float32)
    tx, ty, td = x[touched], y[touched], duration32[touched].astype(np.float64)
    norm = NormStats(x_mean=float(tx.mean()), x_std=float(tx.std()) or 1.0,
                     y_mean=float(ty.mean()), y_std=float(ty.std()) or 1.0,
                     dur_min=float(td.min()), dur_max=float(td.max()))

    # ---- candidates --------------------------------------------------------------------------------
    loc = data.locations
    candidates = np.column_stack([loc["x"].to_numpy(np.float64), loc["y"].to_numpy(np.float64)])
    function_index = {name: i for i, name in enumerate(FUNCTIONS)}
    candidate_function = loc["function"].map(function_index).fillna(-1).to_numpy(dtype=np.int64)

    meta = {
        "dataset": data.name,
        "source": data.source,
        "checksum": data.checksum,
        "config": cfg.to_dict(),
        "cache_key": None,                       # set by prepare() when the windows are cached
        "raw_users": int(data.n_users),
        "raw_records": int(len(rec)),
        "users": int(len(np.unique(subuser_user))),
        "windows_before_thinning": n_all,
        "truth": _jsonable_truth(data.truth),
    }
    return Windows(
        x=x, y=y, weekday=weekday, hour=hour, duration=duration32,
        location=location.astype(np.int32), subuser=subuser.astype(np.int32), timestamp=ts,
        starts=starts, history=H, current=C, stats=norm,
        candidates=candidates, candidate_function=candidate_function,
        subuser_user=subuser_user.astype(np.int64), meta=meta,
    )


# ---------------------------------------------------------------------------------------------------
# torch access

class WindowDataset(torch.utils.data.Dataset):
    """One split of a `Windows` as a map-style dataset; `__getitems__` gathers a whole batch at once.

    Use with `DataLoader(ds, batch_size=B, shuffle=..., collate_fn=identity_collate)`: the loader hands
    the list of indices to `__getitems__` and the collate function passes the dict through.
    """

    def __init__(self, windows: Windows, split: str):
        self.windows = windows
        self.split = split
        self._n = windows.n_windows(split)       # also validates the split name

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -self._n <= int(i) < self._n:
            raise IndexError(f"window {i} out of range for split '{self.split}' of {self._n} windows")
        return {k: v[0] for k, v in self.__getitems__([int(i) % self._n]).items()}

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        arrays = self.windows.batch(self.split, np.asarray(indices, dtype=np.int64))
        return {k: torch.from_numpy(v) for k, v in arrays.items()}


def identity_collate(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`collate_fn` for `WindowDataset`: the batch is already a dict of stacked tensors."""
    return batch


collate = identity_collate
