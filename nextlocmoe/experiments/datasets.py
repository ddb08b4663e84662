"""Datasets of the experiments by name, built only when a job needs them, and the city-halves rule.

    synthetic   the synthetic city (nextlocmoe.data.synthetic): known roles and functions
    nyc         New York Foursquare check-ins (the mat-data package)
    humob       a HuMob-format city file the user holds (Kumamoto = city D)

Decisions (docs/design.md §5):

* Synthetic A -> B: B has layout_seed + 1, seed + 1 and a larger grid (grid + max(2, grid // 5)).
* City halves ("NYC across regions"): a user's home is their most visited location over all their records
  (ties: the lowest location id); homes strictly west of the median home longitude (x in metres for grid
  data, where there is no longitude) form the source region, all other users the target region. The two
  user sets are disjoint and cover every user; each half is windowed and split on its own (its own training
  statistics), and both keep the whole city's candidate set.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd

from ..config import ExperimentConfig
from ..data.config import DataConfig
from ..data.prepare import key_config, raw_checksum
from ..data.schema import MobilityData
from ..data.sources import load_records
from ..data.windows import Windows, make_windows
from ..errors import ConfigError, DataError

DATASET_SOURCES = {"synthetic": "synthetic", "nyc": "nyc_foursquare", "humob": "humob"}


class DatasetHandle:
    """A named dataset whose windows are built only when a job needs them; `fingerprint` enters job keys."""

    def __init__(self, name: str, config: DataConfig, build: Callable[[], Windows],
                 extra_fingerprint: dict[str, Any] | None = None):
        self.name = name
        self.config = config
        resolved = config.resolved()
        self.checksum = raw_checksum(resolved)
        # no name: two handles of the same data (e.g. "synthetic" and "synthetic_A") share trained models
        self.fingerprint = {"config": key_config(resolved), "raw_checksum": self.checksum,
                            **(extra_fingerprint or {})}
        self._build = build
        self._windows: Windows | None = None

    @property
    def windows(self) -> Windows:
        if self._windows is None:
            self._windows = self._build()
        return self._windows


def dataset_config(name: str, cfg: ExperimentConfig) -> DataConfig:
    """The profile's own data config when it has this source (so --set data.* applies), else the source's
    defaults (the synthetic default city: 40 x 40 cells, 500 users, 28 days)."""
    if name not in DATASET_SOURCES:
        raise ConfigError(f"dataset '{name}' is unknown; expected one of {list(DATASET_SOURCES)}")
    source = DATASET_SOURCES[name]
    if cfg.data.source == source:
        return cfg.data
    if source == "humob":
        raise ConfigError("dataset 'humob' needs a HuMob file: use the paper profile or "
                          "--set data.source=humob --set data.path=<cityD-dataset.csv>")
    return DataConfig(source=source, seed=cfg.data.seed, history=cfg.data.history, current=cfg.data.current)


def second_city(config: DataConfig) -> DataConfig:
    """City B of the synthetic zero-shot pair: another layout, other people and a larger grid."""
    syn = config.synthetic
    return dataclasses.replace(config, synthetic=dataclasses.replace(
        syn, layout_seed=syn.layout_seed + 1, seed=syn.seed + 1, grid=syn.grid + max(2, syn.grid // 5)))


def humob_config(path: str | os.PathLike, cfg: ExperimentConfig) -> DataConfig:
    """A HuMob city file with the profile's HuMob settings (grid, cell size, start date, window sizes)."""
    base = cfg.data if cfg.data.source == "humob" else DataConfig(
        source="humob", humob_grid=cfg.data.humob_grid, humob_cell_m=cfg.data.humob_cell_m,
        humob_start=cfg.data.humob_start, history=cfg.data.history, current=cfg.data.current, seed=cfg.data.seed)
    return dataclasses.replace(base, path=str(path))


@dataclass
class RegionSplit:
    """Users split into two halves of a city by where they live (module docstring)."""

    west_users: np.ndarray      # user ids whose home is strictly west of the median home
    east_users: np.ndarray      # every other user
    median: float               # median home coordinate (degrees of longitude, or metres east)
    coordinate: str             # "lon" or "x"
    home: pd.Series             # home location id per user

    def summary(self) -> dict[str, Any]:
        return {"rule": REGION_RULE, "coordinate": self.coordinate, "median_home": self.median,
                "source_users": int(len(self.west_users)), "target_users": int(len(self.east_users))}


REGION_RULE = ("home = the user's most visited location over all records (ties: lowest location id); "
               "source = users whose home is strictly west of the median home longitude (x in metres for grid "
               "data), target = all other users")


def home_regions(data: MobilityData) -> RegionSplit:
    """Split the users of `data` into a western (source) and an eastern (target) half; see REGION_RULE."""
    visits = data.records.groupby(["user", "location"]).size().reset_index(name="visits")
    visits = visits.sort_values(["user", "visits", "location"], ascending=[True, False, True], kind="stable")
    home = visits.drop_duplicates("user").set_index("user")["location"]                  # (U,) location id
    lon = data.locations["lon"].to_numpy(dtype=np.float64)[home.to_numpy()]
    coordinate = "lon" if np.isfinite(lon).all() else "x"
    position = lon if coordinate == "lon" else data.locations["x"].to_numpy(dtype=np.float64)[home.to_numpy()]
    median = float(np.median(position))
    users = home.index.to_numpy(dtype=np.int64)
    west = position < median
    if west.all() or not west.any():
        raise DataError(f"dataset '{data.name}': every home lies on one side of the median {coordinate}; "
                        "the region split needs users on both sides")
    return RegionSplit(users[west], users[~west], median, coordinate, home)


def filter_users(data: MobilityData, users: np.ndarray, suffix: str) -> MobilityData:
    """The records of `users` only (ids unchanged); the candidate set stays the whole city's."""
    records = data.records[data.records["user"].isin(users)].reset_index(drop=True)
    return MobilityData(f"{data.name}_{suffix}", records, data.locations, data.source, data.checksum, data.truth)


def region_handles(name: str, config: DataConfig) -> tuple[DatasetHandle, DatasetHandle, Callable[[], RegionSplit]]:
    """(west, east, split) handles over one dataset; the records are read once, when first needed."""
    state: dict[str, Any] = {}

    def split() -> RegionSplit:
        if "split" not in state:
            state["data"] = load_records(config)
            state["split"] = home_regions(state["data"])
        return state["split"]

    def build(region: str) -> Callable[[], Windows]:
        def windows() -> Windows:
            s = split()
            users = s.west_users if region == "west" else s.east_users
            return make_windows(filter_users(state["data"], users, region), config.resolved())
        return windows

    handles = tuple(DatasetHandle(f"{name}_{region}", config, build(region),
                                  {"region": region, "region_rule": REGION_RULE}) for region in ("west", "east"))
    return handles[0], handles[1], split


def named_handle(name: str, cfg: ExperimentConfig, cache_dir: str | os.PathLike = ".cache/windows") -> DatasetHandle:
    """The handle of any dataset an experiment names: a source of DATASET_SOURCES ("nyc", "synthetic"), the
    synthetic zero-shot pair ("synthetic_A", "synthetic_B") or a half of the region dataset ("nyc_west",
    "nyc_east"); a shipped model's record names the one it was trained on (tests re-evaluate it)."""
    from ..data.prepare import prepare

    def handle(label: str, config: DataConfig) -> DatasetHandle:
        return DatasetHandle(label, config, lambda: prepare(config, cache_dir=cache_dir))

    if name in DATASET_SOURCES:
        return handle(name, dataset_config(name, cfg))
    synthetic = dataset_config("synthetic", cfg)
    if name in ("synthetic_A", "synthetic_B"):
        return handle(name, synthetic if name == "synthetic_A" else second_city(synthetic))
    region = cfg.plan.region_dataset
    if name in (f"{region}_west", f"{region}_east"):
        west, east, _ = region_handles(region, dataset_config(region, cfg))
        return west if name.endswith("_west") else east
    raise ConfigError(f"dataset '{name}' is unknown; expected one of {list(DATASET_SOURCES)}, synthetic_A, "
                      f"synthetic_B, {region}_west or {region}_east")
