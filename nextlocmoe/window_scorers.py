"""Tuned training-free scorers over the window's own places: the floor every learned model must clear.

Most next places are places the window already holds (the repeat rate, `Windows.repeat_rate`), and the window
also says WHEN the next visit happens: its last record's duration is the time to the next record, so the next
visit's hour of day and weekday are known (`Windows.next_visit_time`, batch keys "next_hour", "next_weekday").
A scorer with no trained weights can use both. Each visit t of the window (T = H + C records, t = 0 oldest)
votes for its place with a weight

    w_t = 2^(-age_t / half_life)                          recency: age_t = T - 1 - t records back from the last
        * exp(-dh_t^2 / (2 sigma^2))                      hour closeness: dh_t = circular |hour_t - next_hour| (h)
        * (1 + same_weekday [weekday_t = next_weekday])   the same weekday as the next visit
        * (1 + same_daytype [weekend_t = next weekend])   the same kind of day (Saturday/Sunday or not)
        * exp(beta t)                                     a tie-break: beta = model.pointer.recency_slope(T)

and a place scores the sum of its visits' weights. The last factor is the copy mixture's recency slope, so
small that one visit more always outweighs it in a count; it ranks equal weights by recency (for
visits at equal hours: the latest first) the way `baselines.UserMostFrequent` does, and it makes the copy
mixture of the ranking head, started at a scorer's parameters (`CopyMixture.set_time_prior`), rank exactly
like the scorer. Places the window never visits rank below every visited one,
by training popularity (or not at all, where there is no training data: zero-shot). With half_life = sigma = inf
and both bonuses 0 the places rank like `baselines.UserMostFrequent`.

A family (`SCORERS`), one per combination of the four ingredients; each has a small grid of its parameters, and
`fit` picks the grid point with the highest MRR on the VALIDATION split (never test; seconds). The grid is
searched by an exact, vectorised rank of the target (`window_ranks`), which a test checks against the harness's
`metrics.rank_predictions` of `score`.

    window_recency        frequency x recency                     (half_life)
    window_time           frequency x hour x weekday x day type   (sigma, same_weekday, same_daytype)
    window_time_recency   all four                                 (half_life, sigma, same_weekday, same_daytype)
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .baselines import WithPopularity, _get, input_locations
from .errors import ConfigError, DataError
from .metrics import mean_reciprocal_rank
from .model.pointer import WEEKEND, recency_slope

INF = math.inf

# the grid of each parameter (inf / 0 switch the ingredient off)
HALF_LIVES = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, INF)          # records
SIGMAS = (0.25, 0.5, 1.0, 2.0, 3.0, 4.0, 6.0, INF)           # hours
WEEKDAY_BONUSES = (0.0, 0.5, 1.0, 2.0, 4.0)
DAYTYPE_BONUSES = (0.0, 0.5, 1.0, 2.0)


@dataclass(frozen=True)
class WindowWeights:
    """The four parameters of the visit weight (module docstring)."""
    half_life: float = INF       # records; inf = no recency
    sigma: float = INF           # hours; inf = the hour does not matter
    same_weekday: float = 0.0    # bonus of a visit on the next visit's weekday
    same_daytype: float = 0.0    # bonus of a visit on the next visit's kind of day (weekend or not)

    def validate(self) -> "WindowWeights":
        for name in ("half_life", "sigma"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}={getattr(self, name)!r} is invalid; expected a number > 0 (inf = off)")
        for name in ("same_weekday", "same_daytype"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name}={value!r} is invalid; expected a finite number >= 0 (0 = off)")
        return self

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def circular_hour_difference(hour: np.ndarray, next_hour: np.ndarray) -> np.ndarray:
    """|hour - next_hour| on the 24-hour clock, in [0, 12]; hour (B, T), next_hour (B,) -> (B, T)."""
    d = np.abs(np.asarray(hour, dtype=np.float64) - np.asarray(next_hour, dtype=np.float64)[:, None]) % 24
    return np.minimum(d, 24 - d)


def visit_weights(batch: dict[str, Any], p: WindowWeights) -> np.ndarray:
    """(B, T) float64 weight of each of the window's visits (history then current) under parameters `p`."""
    hour = np.concatenate([_get(batch, "hist_hour"), _get(batch, "cur_hour")], axis=1)          # (B, T)
    weekday = np.concatenate([_get(batch, "hist_weekday"), _get(batch, "cur_weekday")], axis=1)  # (B, T)
    next_hour, next_weekday = _get(batch, "next_hour"), _get(batch, "next_weekday")              # (B,), (B,)
    T = hour.shape[1]
    w = np.broadcast_to(np.exp(recency_slope(T) * np.arange(T, dtype=np.float64))[None, :], hour.shape).copy()
    if math.isfinite(p.half_life):
        w = w * np.exp2(-(T - 1 - np.arange(T, dtype=np.float64)) / p.half_life)[None, :]
    if math.isfinite(p.sigma):
        w = w * np.exp(-circular_hour_difference(hour, next_hour) ** 2 / (2 * p.sigma ** 2))
    if p.same_weekday:
        w = w * (1 + p.same_weekday * (weekday == next_weekday[:, None]))
    if p.same_daytype:
        w = w * (1 + p.same_daytype * ((weekday >= WEEKEND) == (next_weekday[:, None] >= WEEKEND)))
    return w


def place_scores(loc: np.ndarray, w: np.ndarray) -> np.ndarray:
    """(B, T) places and visit weights -> (B, T) the summed weight of the place of each record."""
    same = loc[:, :, None] == loc[:, None, :]                                  # (B, T, T)
    return np.einsum("bts,bs->bt", same, w)


def window_ranks(loc: np.ndarray, w: np.ndarray, target: np.ndarray, unvisited_rank: np.ndarray) -> np.ndarray:
    """Exact rank (B,) int64 of each target under the scorer, without building (B, L) scores.

    A target the window visits ranks 1 + #visited places scoring more + #as much with a lower id (the metrics'
    tie rule); one it does not visit ranks after every visited place: `unvisited_rank` (B,) holds that rank,
    which does not depend on the weights (popularity order among the places the window does not visit).
    """
    B, T = loc.shape
    score = place_scores(loc, w)                                                # (B, T)
    first = np.ones((B, T), dtype=bool)                                         # one entry per distinct place
    first[:, 1:] = ~(np.triu(loc[:, :, None] == loc[:, None, :], k=1).any(axis=1))[:, 1:]
    hit = loc == target[:, None]                                                # (B, T)
    visited = hit.any(axis=1)
    target_score = np.where(hit, score, -np.inf).max(axis=1)[:, None]           # (B, 1)
    better = first & (score > target_score)
    tied_lower = first & (score == target_score) & (loc < target[:, None])
    return np.where(visited, 1 + better.sum(1) + tied_lower.sum(1), unvisited_rank).astype(np.int64)


@dataclass(frozen=True)
class ScorerSettings:
    """What defines a scorer's result besides the data: its grid and whether unvisited places use popularity
    (the experiments' job cache keys on `to_dict()`, so a changed grid never reuses an old result)."""
    name: str
    grid: tuple[tuple[str, tuple[float, ...]], ...]
    use_popularity: bool
    max_grid_windows: int | None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "grid": {k: [str(v) for v in values] for k, values in self.grid},
                "use_popularity": self.use_popularity, "max_grid_windows": self.max_grid_windows}


class WindowScorer(WithPopularity):
    """A tuned training-free scorer (module docstring): visits weighted by recency and closeness in time."""

    def __init__(self, name: str, grid: dict[str, tuple[float, ...]], use_popularity: bool = True,
                 max_grid_windows: int | None = None):
        super().__init__("targets")
        unknown = sorted(set(grid) - set(WindowWeights.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"scorer '{name}': grid names unknown parameters {unknown}; expected some of "
                              f"{list(WindowWeights.__dataclass_fields__)}")
        self.name = name
        self.grid = {k: tuple(v) for k, v in grid.items()}
        self.use_popularity = use_popularity
        self.max_grid_windows = max_grid_windows
        self.weights: WindowWeights | None = None
        self.search: list[dict[str, float]] = []     # every grid point with its validation MRR and Hit@1

    @property
    def cfg(self) -> ScorerSettings:
        return ScorerSettings(self.name, tuple(self.grid.items()), self.use_popularity, self.max_grid_windows)

    def fit_details(self) -> dict[str, Any]:
        """The chosen parameters and the best validation figures of the grid (for the results' job record)."""
        best = max(self.search, key=lambda row: row["val_mrr"]) if self.search else {}
        return {"weights": None if self.weights is None else self.weights.to_dict(), "grid_points": len(self.search),
                "val_mrr": best.get("val_mrr"), "val_hit@1": best.get("val_hit@1")}

    def grid_points(self) -> list[WindowWeights]:
        names = list(self.grid)
        return [WindowWeights(**dict(zip(names, values))).validate()
                for values in itertools.product(*(self.grid[n] for n in names))]

    def fit(self, windows: Any, cfg: Any = None, weights: WindowWeights | None = None) -> "WindowScorer":
        """Training popularity for the places a window does not visit, then the grid point with the best
        validation MRR (ties: the first in grid order). `weights` skips the search (e.g. a transfer)."""
        super().fit(windows)
        if not self.use_popularity:
            self.popularity.counts = np.zeros_like(self.popularity.counts)      # only the window's own records
        if weights is not None:
            self.weights = weights.validate()
            return self
        n = windows.n_windows("val")
        if n == 0:
            raise DataError(f"scorer '{self.name}' chooses its parameters on the validation split, which is empty")
        idx = np.arange(n if self.max_grid_windows is None else min(n, self.max_grid_windows))
        batch = windows.batch("val", idx)                                      # the validation split only
        loc = input_locations(batch)                                           # (W, T)
        target = _get(batch, "target_location").astype(np.int64)              # (W,)
        unvisited = self._unvisited_rank(loc, target)
        best = None
        self.search = []
        for p in tqdm(self.grid_points(), desc=f"{self.name} grid", unit="point", leave=False, disable=None):
            ranks = window_ranks(loc, visit_weights(batch, p), target, unvisited)
            row = {**p.to_dict(), "val_mrr": mean_reciprocal_rank(ranks), "val_hit@1": float(np.mean(ranks == 1))}
            self.search.append(row)
            if best is None or row["val_mrr"] > best[0]:
                best = (row["val_mrr"], p)
        self.weights = best[1]
        return self

    def _unvisited_rank(self, loc: np.ndarray, target: np.ndarray) -> np.ndarray:
        """(W,) rank of each target among the places its window does not visit, after every visited place."""
        pop = self.popularity.counts                                           # (L,)
        B = len(loc)
        distinct = np.array([len(np.unique(row)) for row in loc])              # (W,)
        # places strictly more popular, or as popular with a lower id, than the target: over all L, then minus
        # those the window visits (they rank above anyway and are already counted in `distinct`)
        ahead_all = (pop[None, :] > pop[target][:, None]).sum(1) + \
            ((pop[None, :] == pop[target][:, None]) & (np.arange(len(pop))[None, :] < target[:, None])).sum(1)
        visited_ahead = np.zeros(B, dtype=np.int64)
        for b in range(B):
            places = np.unique(loc[b])
            visited_ahead[b] = ((pop[places] > pop[target[b]]) |
                                ((pop[places] == pop[target[b]]) & (places < target[b]))).sum()
        return distinct + 1 + ahead_all - visited_ahead

    def score(self, batch: dict[str, Any]) -> np.ndarray:
        """(B, L) float64: a visited place scores its summed visit weight (> 0); an unvisited one
        -1 / (1 + popularity) (< 0), so every visited place outranks every unvisited one and no score is
        shifted by a constant that could merge two close sums."""
        self._check_fitted()
        if self.weights is None:
            raise ConfigError(f"scorer '{self.name}' has no parameters; call fit(windows) first")
        loc = input_locations(batch)                                           # (B, T)
        self._check_ids(loc, "hist_location/cur_location")
        B = loc.shape[0]
        scores = np.broadcast_to(-1.0 / (1.0 + self.popularity.counts), (B, self.n_locations)).copy()  # (B, L)
        scores[np.arange(B)[:, None], loc] = place_scores(loc, visit_weights(batch, self.weights))
        return scores

    def __repr__(self) -> str:
        return f"WindowScorer({self.name!r}, weights={self.weights})"


SCORERS: dict[str, dict[str, tuple[float, ...]]] = {
    "window_recency": {"half_life": HALF_LIVES},
    "window_time": {"sigma": SIGMAS, "same_weekday": WEEKDAY_BONUSES, "same_daytype": DAYTYPE_BONUSES},
    "window_time_recency": {"half_life": HALF_LIVES, "sigma": SIGMAS, "same_weekday": WEEKDAY_BONUSES,
                            "same_daytype": DAYTYPE_BONUSES},
}


def make_scorer(name: str, use_popularity: bool = True, max_grid_windows: int | None = None) -> WindowScorer:
    """An unfitted scorer of the family by name."""
    if name not in SCORERS:
        raise ConfigError(f"scorer '{name}' is unknown; expected one of {list(SCORERS)}")
    return WindowScorer(name, SCORERS[name], use_popularity, max_grid_windows)
