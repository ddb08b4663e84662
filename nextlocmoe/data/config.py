"""Data configuration: which source, and how records become windows.

Fields left as None take the per-source default of `SOURCE_DEFAULTS` (see `resolved`), so a config
names only what differs from the documented protocol of its source.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..errors import ConfigError

SOURCES = ("nyc_foursquare", "humob", "foursquare_tsmc", "csv", "synthetic")


@dataclass
class SyntheticConfig:
    """A generated grid city with known cell functions and user roles (HuMob format)."""

    grid: int = 40                 # cells per side (HuMob: 200)
    cell_m: float = 500.0          # cell size in metres (HuMob: 500 m)
    users: int = 500               # number of users, each with one of the 11 roles (500: over 2,000 test
                                   # windows under the user split, enough for +-2-point intervals)
    days: int = 28                 # days simulated, 48 half-hour slots each
    explore: float = 0.1           # probability that a visit goes to a random cell of the right function
    layout_seed: int = 0           # seed of the city layout (which cell has which function)
    seed: int = 0                  # seed of the users and their schedules


@dataclass
class CsvColumns:
    """Column names of a generic CSV (source 'csv'); give either lat/lon or x/y."""

    user: str = "user"
    timestamp: str = "timestamp"
    lat: str | None = "lat"
    lon: str | None = "lon"
    x: str | None = None
    y: str | None = None
    location: str | None = None    # place id; when absent, identical coordinates are one location
    category: str | None = None    # free-text category, mapped to FUNCTIONS by keyword when given


@dataclass
class DataConfig:
    source: str = "nyc_foursquare"  # one of SOURCES
    path: str | None = None         # raw file (humob, foursquare_tsmc, csv); nyc reads the mat-data package
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    csv: CsvColumns = field(default_factory=CsvColumns)
    humob_cell_m: float = 500.0     # HuMob grid cell size (paper: 500 m cells, 200x200 grid)
    humob_grid: int = 200           # HuMob grid cells per side; rows outside are errors
    humob_start: str = "2023-01-02" # date of HuMob day 0 (a Monday), to give slots a weekday
    # windows (paper Sec. 5.1 and the reference loader)
    history: int = 40               # long-term history records S_h
    current: int = 5                # current trajectory records S_c
    stride: int | None = None       # step between window starts (HuMob reference: 3)
    keep_every: int | None = None   # keep every n-th window (HuMob reference loader: 20)
    gap_hours: float | None = None  # cut a user into sub-users at gaps longer than this (HuMob: 24)
    min_segment: int | None = None  # drop sub-users with this many records or fewer (HuMob: 10)
    last_duration_h: float = 0.1    # duration-to-next of a sub-user's last record (reference: 0.1 h)
    split: str | None = None        # "user" (paper: 70/10/20 by sub-user) or "chronological" per user
    split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)  # train / validation / test
    seed: int = 0                   # seed of the user split

    def resolved(self) -> "DataConfig":
        """A copy with every None replaced by the source's default; checks every value."""
        if self.source not in SOURCES:
            raise ConfigError(f"data.source='{self.source}' is unknown; expected one of {list(SOURCES)}")
        defaults = SOURCE_DEFAULTS[self.source]
        cfg = replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})
        cfg.split_fractions = tuple(float(f) for f in cfg.split_fractions)
        checks = [
            ("history", cfg.history >= 1, "an integer >= 1"),
            ("current", cfg.current >= 1, "an integer >= 1"),
            ("stride", cfg.stride >= 1, "an integer >= 1"),
            ("keep_every", cfg.keep_every >= 1, "an integer >= 1"),
            ("gap_hours", cfg.gap_hours > 0, "hours > 0"),
            ("min_segment", cfg.min_segment >= 0, "an integer >= 0"),
            ("split", cfg.split in ("user", "chronological"), "'user' or 'chronological'"),
            ("split_fractions", len(cfg.split_fractions) == 3 and all(f >= 0 for f in cfg.split_fractions)
             and abs(sum(cfg.split_fractions) - 1) < 1e-6, "three fractions >= 0 summing to 1"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ConfigError(f"data.{name}={getattr(cfg, name)!r} is invalid; expected {expected}")
        if cfg.source in ("humob", "foursquare_tsmc", "csv") and not cfg.path:
            raise ConfigError(f"data.path is required for source '{cfg.source}' (the raw file to read)")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Documented protocol per source. HuMob follows the paper's Kumamoto protocol (docs/design.md §2.2).
# Check-in data are sparse (a few visits a day, weeks between some): users are not cut at one-day gaps
# but at gaps over two weeks, and split chronologically per user, the usual check-in protocol.
SOURCE_DEFAULTS: dict[str, dict[str, Any]] = {
    "humob":           dict(stride=3, keep_every=20, gap_hours=24.0, min_segment=10, split="user"),
    "synthetic":       dict(stride=3, keep_every=1, gap_hours=24.0, min_segment=10, split="user"),
    "nyc_foursquare":  dict(stride=1, keep_every=1, gap_hours=14 * 24.0, min_segment=10, split="chronological"),
    "foursquare_tsmc": dict(stride=1, keep_every=1, gap_hours=14 * 24.0, min_segment=10, split="chronological"),
    "csv":             dict(stride=1, keep_every=1, gap_hours=14 * 24.0, min_segment=10, split="chronological"),
}
