"""Retrieval and ranking metrics: KD-tree candidate retrieval, exact ranks, Hit@k, NDCG@k, MRR.

The paper's model regresses a point (x, y) in metres; a KD-tree over every candidate location then
retrieves the k candidates nearest to that point, and Hit@k asks whether the true next location is among
them (paper Sec. 5.1; with one true location per sample this is LibCity's Recall@k). Classification
baselines instead score every candidate. Both paths reduce to ONE notion of rank, so their numbers are
comparable:

    rank(target) = 1 + #{candidates strictly better than the target}
                     + #{candidates exactly as good as the target with a lower candidate id}

"Better" means a smaller squared Euclidean distance (computed in float64, always by `squared_distance`)
for the regression path and a larger score for the classification path. Ties are therefore broken by
lower candidate id, and the k candidates that `CandidateIndex.topk` returns are exactly the candidates of
rank 1..k, in that order. From the rank of each sample:

    hit@k   = mean [rank <= k]
    ndcg@k  = mean [rank <= k] / log2(rank + 1)     (one relevant item, so the ideal DCG is 1)
    mrr     = mean 1 / rank                         (full rank over all candidates, no cut-off)

Every Hit@k and the MRR also carry a 95% confidence interval over the n test windows: the Wilson score
interval for Hit@k (one binary outcome per window; `wilson_interval`) and a percentile bootstrap with a fixed
seed for MRR (a mean of values in (0, 1] with no closed form; `bootstrap_interval`). They are the metrics
"hit@{k}_lo" / "hit@{k}_hi" and "mrr_lo" / "mrr_hi" of `retrieval_metrics`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, NamedTuple, Sequence

import numpy as np
import pandas as pd
import torch
from scipy.spatial import cKDTree
from tqdm.auto import tqdm

from .errors import ConfigError, DataError

DEFAULT_KS = (1, 5, 10, 20)          # paper Tables 2-4 report Hit@1/5/10/20
DEFAULT_MAX_CHUNK_ELEMENTS = 1 << 22  # entries of one (rows x candidates) block: 4M float64 = 32 MiB
INTERVAL_Z = 1.96                     # two-sided 95% normal quantile (Wilson intervals of Hit@k)
BOOTSTRAP_RESAMPLES = 1000            # resamples of the MRR bootstrap
BOOTSTRAP_SEED = 0                    # fixed, so the same ranks always give the same interval

# Safety band of the KD-tree counting fast path in `CandidateIndex.rank_of` (see there). Both are far
# wider than float64 rounding (~1e-16 relative), so a candidate the tree might misjudge always falls into
# the band and its row is settled by the exact brute-force count instead.
_RELATIVE_BAND = 1e-9                 # relative to the target's squared distance
_ABSOLUTE_BAND = 1e-10                # relative to (largest coordinate magnitude)^2, covers tiny distances


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------

def exists(value: Any) -> bool:
    return value is not None


def _to_numpy(array: Any) -> np.ndarray:
    """numpy view of a numpy array, list or (possibly GPU, possibly grad-tracking) torch tensor."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu()
        if array.dtype in (torch.bfloat16, torch.float16):
            array = array.float()
        return array.numpy()
    return np.asarray(array)


def _as_points(points: Any, name: str) -> np.ndarray:
    """Check an (N, 2) array of finite metres and return it as float64."""
    points = _to_numpy(points)
    if points.ndim != 2 or points.shape[1] != 2:
        raise DataError(f"{name} must have shape (N, 2) (x, y in metres), got shape {points.shape}")
    if not np.issubdtype(points.dtype, np.number) or np.issubdtype(points.dtype, np.complexfloating):
        raise DataError(f"{name} must hold real numbers, got dtype {points.dtype}")
    points = points.astype(np.float64, copy=False)
    if not np.isfinite(points).all():
        bad = int((~np.isfinite(points).all(axis=1)).sum())
        raise DataError(f"{name} holds NaN or infinite coordinates in {bad} of {len(points)} rows")
    return points


def _as_target_ids(target_ids: Any, n_rows: int, n_candidates: int, name: str = "target_ids") -> np.ndarray:
    """Check a (N,) array of integer candidate ids in [0, n_candidates) and return it as int64."""
    ids = _to_numpy(target_ids)
    if ids.ndim != 1 or len(ids) != n_rows:
        raise DataError(f"{name} must have shape ({n_rows},) to match the predictions, got {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise DataError(f"{name} must hold integer candidate ids, got dtype {ids.dtype}")
    ids = ids.astype(np.int64, copy=False)
    if n_rows and (ids.min() < 0 or ids.max() >= n_candidates):
        raise DataError(f"{name} must lie in [0, {n_candidates}) (one id per candidate location), "
                        f"got values in [{ids.min()}, {ids.max()}]")
    return ids


def _check_k(k: Any, n_candidates: int, name: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n_candidates:
        raise ConfigError(f"{name} must be an integer in [1, {n_candidates}] (number of candidates), "
                          f"got {k!r}")
    return int(k)


def _check_ks(ks: Iterable[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise ConfigError(f"ks must be a non-empty sequence of positive integers, got {ks!r}")
    return tuple(sorted(set(int(k) for k in ks)))


def _check_chunk(max_chunk_elements: int) -> int:
    if isinstance(max_chunk_elements, bool) or not isinstance(max_chunk_elements, (int, np.integer)) \
            or max_chunk_elements < 1:
        raise ConfigError(f"max_chunk_elements must be a positive integer, got {max_chunk_elements!r}")
    return int(max_chunk_elements)


def squared_distance(points: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """(px - cx)^2 + (py - cy)^2 in float64, broadcasting `points[..., :]` against `candidates[..., :]`.

    Every distance comparison in this module goes through this one expression, so a tie between two
    candidates is a tie everywhere (top-k, exact rank, brute-force fallback) and never an accident of
    evaluation order.
    """
    dx = points[..., 0] - candidates[..., 0]
    dy = points[..., 1] - candidates[..., 1]
    return dx * dx + dy * dy


# ---------------------------------------------------------------------------------------------------
# regression path: KD-tree over candidate locations
# ---------------------------------------------------------------------------------------------------

class CandidateIndex:
    """All candidate locations of a dataset behind a KD-tree (paper Sec. 5.1: retrieval by KD-tree).

    Candidate id i is row i of `candidates_xy` (the row of the location table). `topk` and `rank_of` share
    the tie rule of this module: equal squared distances are ordered by lower candidate id.
    """

    def __init__(self, candidates_xy: Any, workers: int = 1,
                 max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS):
        candidates_xy = _as_points(candidates_xy, "candidates_xy")
        if len(candidates_xy) == 0:
            raise DataError("candidates_xy is empty: the candidate set needs at least one location")
        self.candidates_xy = candidates_xy.copy()                  # (L, 2) metres
        self.candidates_xy.flags.writeable = False
        self.workers = int(workers)                                # cKDTree threads (-1: all cores)
        self.max_chunk_elements = _check_chunk(max_chunk_elements)  # bound of one (rows x L) block
        self.tree = cKDTree(self.candidates_xy)
        self.candidate_ids = np.arange(len(self.candidates_xy), dtype=np.int64)  # (L,)
        self._coordinate_scale = float(np.abs(self.candidates_xy).max())

    @classmethod
    def from_locations(cls, locations: pd.DataFrame, **kwargs: Any) -> "CandidateIndex":
        """Index of a location table (columns x, y in metres; row i = location id i)."""
        missing = [c for c in ("x", "y") if c not in locations.columns]
        if missing:
            raise DataError(f"location table lacks columns {missing}; expected metres in 'x' and 'y'")
        return cls(locations[["x", "y"]].to_numpy(dtype=np.float64), **kwargs)

    def __len__(self) -> int:
        return len(self.candidates_xy)

    def __repr__(self) -> str:
        return f"CandidateIndex(n_candidates={len(self)})"

    # -- top-k retrieval ---------------------------------------------------------------------------

    def topk(self, points: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest candidates of each point: (dist (N, k) metres, idx (N, k) int64), nearest first.

        cKDTree does not order candidates at equal distance by id, and a tie can straddle the k-th
        place. So we ask the tree for more neighbours than needed, recompute their squared distances
        with `squared_distance`, sort by (distance, id), and accept a row only when its k-th candidate is
        strictly closer than anything the tree left out; rows that fail are asked again with twice as
        many neighbours (ties are rare off a grid, so this almost never loops).
        """
        points = _as_points(points, "points")
        k = _check_k(k, len(self))
        n_points, n_candidates = len(points), len(self)
        if n_points == 0:
            return np.empty((0, k), dtype=np.float64), np.empty((0, k), dtype=np.int64)
        dist = np.empty((n_points, k), dtype=np.float64)           # (N, k)
        idx = np.empty((n_points, k), dtype=np.int64)              # (N, k)
        pending = np.arange(n_points)                              # rows not yet settled
        n_query = min(n_candidates, k + max(k, 8))
        while pending.size:
            query_points = points[pending]                         # (n, 2)
            tree_dist, tree_idx = self.tree.query(query_points, k=n_query, workers=self.workers)
            tree_dist = tree_dist.reshape(len(pending), n_query)  # (n, m); k=1 comes back as (n,)
            tree_idx = tree_idx.reshape(len(pending), n_query).astype(np.int64)
            d2 = squared_distance(query_points[:, None, :], self.candidates_xy[tree_idx])  # (n, m)
            order = np.lexsort((tree_idx, d2), axis=-1)            # by distance, then by id
            d2 = np.take_along_axis(d2, order, axis=-1)
            tree_idx = np.take_along_axis(tree_idx, order, axis=-1)
            if n_query == n_candidates:                            # the tree returned every candidate
                settled = np.ones(len(pending), dtype=bool)
            else:                                                  # anything left out is at least this far
                left_out_d2 = tree_dist[:, -1] ** 2 * (1.0 - _RELATIVE_BAND)
                settled = d2[:, k - 1] < left_out_d2
            dist[pending[settled]] = np.sqrt(d2[settled, :k])
            idx[pending[settled]] = tree_idx[settled, :k]
            pending = pending[~settled]
            n_query = min(n_candidates, 2 * n_query)
        return dist, idx

    # -- exact rank among all candidates -----------------------------------------------------------

    def rank_of(self, points: Any, target_ids: Any) -> np.ndarray:
        """Exact rank (N,) int64 of each target among ALL candidates, by distance to the predicted point.

        Fast path: the tree counts the candidates inside two discs around the point, one slightly smaller
        and one slightly larger than the target's distance. When only the target lies between them, every
        other candidate is certainly strictly closer (inside the small disc) or strictly farther, and
        rank = 1 + count(small disc). Rows with anything else in the band (exact ties, duplicates, points
        sitting on a candidate) get the exact brute-force count over all candidates, in chunks of at most
        `max_chunk_elements` distances, so memory stays bounded for any N x L.
        """
        points = _as_points(points, "points")
        target_ids = _as_target_ids(target_ids, len(points), len(self))
        if len(points) == 0:
            return np.empty(0, dtype=np.int64)
        target_d2 = squared_distance(points, self.candidates_xy[target_ids])  # (N,)
        scale = max(self._coordinate_scale, float(np.abs(points).max(initial=0.0)), 1.0)
        band = _ABSOLUTE_BAND * scale * scale                       # m^2
        inner_d2 = target_d2 * (1.0 - _RELATIVE_BAND) - band       # (N,) certainly closer below this
        outer_d2 = target_d2 * (1.0 + _RELATIVE_BAND) + band       # (N,) certainly farther above this

        inner_count = np.zeros(len(points), dtype=np.int64)
        has_inner = inner_d2 > 0
        if has_inner.any():
            inner_count[has_inner] = self.tree.query_ball_point(
                points[has_inner], np.sqrt(inner_d2[has_inner]), return_length=True, workers=self.workers)
        outer_count = np.asarray(self.tree.query_ball_point(
            points, np.sqrt(outer_d2), return_length=True, workers=self.workers), dtype=np.int64)

        ranks = inner_count + 1
        undecided = np.flatnonzero(outer_count - inner_count != 1)
        if undecided.size:
            ranks[undecided] = self._rank_brute_force(points[undecided], target_ids[undecided])
        return ranks

    def _rank_brute_force(self, points: np.ndarray, target_ids: np.ndarray) -> np.ndarray:
        """rank = 1 + #closer + #equally close with lower id, over all L candidates, chunked by rows."""
        n_candidates = len(self)
        rows_per_chunk = max(1, self.max_chunk_elements // n_candidates)
        starts = range(0, len(points), rows_per_chunk)
        ranks = np.empty(len(points), dtype=np.int64)
        for start in tqdm(starts, desc="exact ranks", unit="chunk", leave=False, disable=len(starts) < 16):
            stop = start + rows_per_chunk
            chunk_points, chunk_targets = points[start:stop], target_ids[start:stop]
            d2 = squared_distance(chunk_points[:, None, :], self.candidates_xy[None, :, :])  # (n, L)
            target_d2 = d2[np.arange(len(chunk_points)), chunk_targets][:, None]          # (n, 1)
            ranks[start:stop] = 1 + _count_better(d2 < target_d2, d2 == target_d2, chunk_targets,
                                                  self.candidate_ids)
        return ranks


def _count_better(strictly_better: np.ndarray, equal: np.ndarray, target_ids: np.ndarray,
                  candidate_ids: np.ndarray) -> np.ndarray:
    """#strictly better + #equal with a lower id, per row of (n, L) boolean masks."""
    count = np.count_nonzero(strictly_better, axis=1).astype(np.int64)  # (n,)
    tied_rows = np.flatnonzero(np.count_nonzero(equal, axis=1) > 1)    # the target always equals itself
    if tied_rows.size:
        lower_id = candidate_ids[None, :] < target_ids[tied_rows, None]   # (t, L)
        count[tied_rows] += np.count_nonzero(equal[tied_rows] & lower_id, axis=1)
    return count


# ---------------------------------------------------------------------------------------------------
# classification path: a score per candidate
# ---------------------------------------------------------------------------------------------------

def ranks_from_scores(scores: Any, target_ids: Any,
                      max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS) -> np.ndarray:
    """Rank (N,) int64 of each target under a score matrix (N, L), higher score = better.

    Same rule as the regression path: 1 + #higher scores + #equal scores with a lower candidate id.
    Accepts numpy arrays or torch tensors (compared on their own device, in their own dtype, so ties in
    low precision count as ties). NaN scores are rejected; -inf is allowed (e.g. masked candidates).
    """
    max_chunk_elements = _check_chunk(max_chunk_elements)
    if not isinstance(scores, torch.Tensor):
        scores = np.asarray(scores)
        if not (np.issubdtype(scores.dtype, np.floating) or np.issubdtype(scores.dtype, np.integer)):
            raise DataError(f"scores must hold real numbers, got dtype {scores.dtype}")
        scores = torch.from_numpy(scores)
    if scores.ndim != 2 or scores.shape[1] == 0:
        raise DataError(f"scores must have shape (N, L) with L >= 1 candidates, got {tuple(scores.shape)}")
    if scores.is_complex() or scores.dtype == torch.bool:
        raise DataError(f"scores must hold real numbers, got dtype {scores.dtype}")
    if scores.is_floating_point() and torch.isnan(scores).any():
        n_bad = int(torch.isnan(scores).any(dim=1).sum())
        raise DataError(f"scores hold NaN in {n_bad} of {len(scores)} rows")
    n_rows, n_candidates = scores.shape
    targets = torch.from_numpy(_as_target_ids(target_ids, n_rows, n_candidates)).to(scores.device)
    candidate_ids = torch.arange(n_candidates, device=scores.device)
    rows_per_chunk = max(1, max_chunk_elements // n_candidates)
    starts = range(0, n_rows, rows_per_chunk)
    ranks = torch.empty(n_rows, dtype=torch.int64, device=scores.device)
    for start in tqdm(starts, desc="ranks from scores", unit="chunk", leave=False, disable=len(starts) < 16):
        chunk, chunk_targets = scores[start:start + rows_per_chunk], targets[start:start + rows_per_chunk]
        target_score = chunk.gather(1, chunk_targets[:, None])              # (n, 1)
        better = chunk > target_score                                       # (n, L)
        tied_lower = (chunk == target_score) & (candidate_ids[None, :] < chunk_targets[:, None])  # (n, L)
        ranks[start:start + rows_per_chunk] = 1 + better.sum(dim=1) + tied_lower.sum(dim=1)
    return ranks.cpu().numpy()


# ---------------------------------------------------------------------------------------------------
# metrics from ranks
# ---------------------------------------------------------------------------------------------------

def hit_at_k(ranks: np.ndarray, k: int) -> float:
    """Fraction of samples whose target is among the top k (= LibCity Recall@k, one true location)."""
    return float(np.mean(ranks <= k))


def ndcg_at_k(ranks: np.ndarray, k: int) -> float:
    """NDCG@k with one relevant item: the ideal DCG is 1, so a sample scores 1/log2(rank+1) within k."""
    gains = np.where(ranks <= k, 1.0 / np.log2(ranks.astype(np.float64) + 1.0), 0.0)
    return float(np.mean(gains))


def mean_reciprocal_rank(ranks: np.ndarray) -> float:
    """Mean of 1/rank over the full ranking (no cut-off)."""
    return float(np.mean(1.0 / ranks.astype(np.float64)))


def wilson_interval(successes: Any, n: Any, z: float = INTERVAL_Z) -> tuple[Any, Any]:
    """Wilson score interval (lo, hi) of a binomial proportion successes / n; floats, or arrays for arrays.

    Why Wilson: Hit@k is one binary outcome per test window, so its count is binomial. The Wilson interval
    inverts the score test (all p0 with |p_hat - p0| <= z * sqrt(p0 (1 - p0) / n)), which keeps close to
    nominal coverage for small n and for proportions near 0 or 1 (Hit@1 of a weak model is often 0), where
    the Wald interval p_hat +- z * sqrt(p_hat (1 - p_hat) / n) collapses to a point. Closed form:

        centre = (p_hat + z^2 / 2n) / (1 + z^2 / n)
        half   = z / (1 + z^2 / n) * sqrt(p_hat (1 - p_hat) / n + z^2 / 4n^2)

    e.g. 8 of 10 at z = 1.96 gives [0.490, 0.943]; 0 of n gives lo = 0 exactly and hi = z^2 / (n + z^2).
    """
    successes = np.asarray(successes, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    if np.any(n < 1) or np.any(successes < 0) or np.any(successes > n):
        raise DataError(f"wilson_interval needs n >= 1 and 0 <= successes <= n, got successes={successes}, n={n}")
    if not z > 0:
        raise ConfigError(f"z must be a positive normal quantile (1.96 for 95%), got {z!r}")
    p = successes / n
    z2 = z * z
    denominator = 1.0 + z2 / n
    centre = (p + z2 / (2.0 * n)) / denominator
    half = z / denominator * np.sqrt(p * (1.0 - p) / n + z2 / (4.0 * n * n))
    # the bounds are exactly 0 (1) when no (every) window is a hit; clip float rounding elsewhere
    lo = np.where(successes == 0, 0.0, np.clip(centre - half, 0.0, 1.0))
    hi = np.where(successes == n, 1.0, np.clip(centre + half, 0.0, 1.0))
    if lo.ndim == 0:
        return float(lo), float(hi)
    return lo, hi


def bootstrap_interval(values: Any, statistic: Callable[..., Any] = np.mean, resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = BOOTSTRAP_SEED, level: float = 0.95,
                       max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS) -> tuple[float, float]:
    """Percentile bootstrap interval (lo, hi) of `statistic` over the samples `values` (N,).

    Why a bootstrap: MRR is a mean of 1/rank in (0, 1], a skewed variable with no closed-form interval; the
    percentile bootstrap resamples the N test windows with replacement, recomputes the statistic and takes
    the (1 - level) / 2 and (1 + level) / 2 quantiles of the resampled statistics. The generator is
    `np.random.default_rng(seed)`, so the same values always give the same interval. The resamples are
    drawn in blocks of at most `max_chunk_elements` indices ((resamples_per_block, N) int64), so memory stays
    bounded for N = 30,000 and more. `statistic(samples, axis=1)` must reduce each row of a (B, N) block.
    """
    values = _to_numpy(values).astype(np.float64)
    if values.ndim != 1 or len(values) == 0:
        raise DataError(f"bootstrap_interval needs a non-empty 1-D array of values, got shape {values.shape}")
    if not np.isfinite(values).all():
        raise DataError("bootstrap_interval: values hold NaN or infinite entries")
    if isinstance(resamples, bool) or not isinstance(resamples, (int, np.integer)) or resamples < 1:
        raise ConfigError(f"resamples must be a positive integer, got {resamples!r}")
    if not 0.0 < level < 1.0:
        raise ConfigError(f"level must lie in (0, 1) (0.95 for a 95% interval), got {level!r}")
    n = len(values)
    rng = np.random.default_rng(seed)
    per_block = max(1, _check_chunk(max_chunk_elements) // n)
    stats = np.empty(int(resamples), dtype=np.float64)         # (B,)
    for start in range(0, int(resamples), per_block):
        stop = min(start + per_block, int(resamples))
        idx = rng.integers(0, n, size=(stop - start, n))       # (b, N) windows drawn with replacement
        stats[start:stop] = statistic(values[idx], axis=1)
    lo, hi = np.quantile(stats, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(lo), float(hi)


def retrieval_metrics(ranks: Any, ks: Sequence[int] = DEFAULT_KS,
                      distance_error_m: Any = None) -> dict[str, float]:
    """Hit@k, NDCG@k, MRR (fractions in [0, 1]), optional distance error in metres, 95% intervals, and n.

    Keys, in this order: "hit@{k}" for every k, "ndcg@{k}" for every k > 1 (NDCG@1 equals Hit@1), "mrr",
    and, when `distance_error_m` (N,) is given, "dist_mean_m" and "dist_median_m"; then the 95% intervals
    over the N test windows, "hit@{k}_lo" / "hit@{k}_hi" for every k (Wilson score interval) and "mrr_lo" /
    "mrr_hi" (percentile bootstrap, 1,000 resamples, seed 0); last "n", the number of samples.
    """
    ks = _check_ks(ks)
    ranks = _to_numpy(ranks)
    if ranks.ndim != 1 or len(ranks) == 0:
        raise DataError(f"ranks must be a non-empty 1-D array, got shape {ranks.shape}")
    if not np.issubdtype(ranks.dtype, np.integer):
        raise DataError(f"ranks must hold integers (1 = best), got dtype {ranks.dtype}")
    if ranks.min() < 1:
        raise DataError(f"ranks must be >= 1 (1 = best), got minimum {ranks.min()}")
    metrics: dict[str, float] = {}
    for k in ks:
        metrics[f"hit@{k}"] = hit_at_k(ranks, k)
    for k in ks:
        if k > 1:
            metrics[f"ndcg@{k}"] = ndcg_at_k(ranks, k)
    metrics["mrr"] = mean_reciprocal_rank(ranks)
    if exists(distance_error_m):
        errors = _to_numpy(distance_error_m).astype(np.float64)
        if errors.shape != ranks.shape:
            raise DataError(f"distance_error_m must have shape {ranks.shape} like ranks, got {errors.shape}")
        if not np.isfinite(errors).all() or errors.min() < 0:
            raise DataError("distance_error_m must hold finite, non-negative metres")
        metrics["dist_mean_m"] = float(errors.mean())
        metrics["dist_median_m"] = float(np.median(errors))
    for k in ks:
        lo, hi = wilson_interval(int(np.count_nonzero(ranks <= k)), len(ranks))
        metrics[f"hit@{k}_lo"], metrics[f"hit@{k}_hi"] = lo, hi
    metrics["mrr_lo"], metrics["mrr_hi"] = bootstrap_interval(1.0 / ranks.astype(np.float64))
    metrics["n"] = int(len(ranks))
    return metrics


def paired_comparison(ranks_a: Any, ranks_b: Any, ks: Sequence[int] = (1, 10), resamples: int = BOOTSTRAP_RESAMPLES,
                      seed: int = BOOTSTRAP_SEED) -> dict[str, float]:
    """Method A against method B on the SAME windows (ranks (N,) each, window by window): for each k the
    difference of Hit@k (A - B), its 95% paired-bootstrap interval and the exact McNemar p-value; for MRR the
    difference, its paired-bootstrap interval and a two-sided bootstrap p-value, add-one corrected so that it is
    never below 2 / (resamples + 1) (0.002 at the default 1,000 resamples: "no resample crossed zero").

    McNemar (exact): only the discordant windows carry information, b = #(A hits, B misses) and c = #(A misses,
    B hits); under "no difference" b ~ Binomial(b + c, 1/2), so p = min(1, 2 P(X <= min(b, c))) (1 when b + c = 0).
    Paired bootstrap: the same resampled windows for both methods (seed fixed), so the interval of the difference
    reflects the windows' shared difficulty, which two separate intervals ignore. Keys: "hit@k_diff",
    "hit@k_lo", "hit@k_hi", "hit@k_p", "hit@k_a_only" (b), "hit@k_b_only" (c), "mrr_diff", "mrr_lo", "mrr_hi",
    "mrr_p", "n".
    """
    from scipy.stats import binom

    a, b = _to_numpy(ranks_a).astype(np.int64), _to_numpy(ranks_b).astype(np.int64)
    if a.ndim != 1 or a.shape != b.shape or len(a) == 0:
        raise DataError(f"paired_comparison needs two non-empty 1-D rank arrays of one length (the same windows), "
                        f"got shapes {a.shape} and {b.shape}")
    if a.min() < 1 or b.min() < 1:
        raise DataError("paired_comparison: ranks must be >= 1 (1 = best)")
    ks = _check_ks(ks)
    n = len(a)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(int(resamples), n))                        # (R, N) shared resamples
    out: dict[str, float] = {}
    for k in ks:
        hit_a, hit_b = a <= k, b <= k
        only_a, only_b = int(np.count_nonzero(hit_a & ~hit_b)), int(np.count_nonzero(~hit_a & hit_b))
        d = hit_a.astype(np.float64) - hit_b.astype(np.float64)              # (N,)
        boot = d[idx].mean(axis=1)
        discordant = only_a + only_b
        p = 1.0 if discordant == 0 else min(1.0, 2.0 * float(binom.cdf(min(only_a, only_b), discordant, 0.5)))
        out.update({f"hit@{k}_diff": float(d.mean()), f"hit@{k}_lo": float(np.quantile(boot, 0.025)),
                    f"hit@{k}_hi": float(np.quantile(boot, 0.975)), f"hit@{k}_p": p,
                    f"hit@{k}_a_only": only_a, f"hit@{k}_b_only": only_b})
    d = 1.0 / a - 1.0 / b
    boot = d[idx].mean(axis=1)
    # add-one (Davison & Hinkley): a bootstrap with R resamples cannot show p below 2 / (R + 1), never 0
    tail = min(int(np.sum(boot <= 0)), int(np.sum(boot >= 0)))
    p = min(1.0, 2.0 * (tail + 1) / (len(boot) + 1))
    out.update({"mrr_diff": float(d.mean()), "mrr_lo": float(np.quantile(boot, 0.025)),
                "mrr_hi": float(np.quantile(boot, 0.975)), "mrr_p": p, "n": n})
    return out


# ---------------------------------------------------------------------------------------------------
# from predictions to ranks: the one function every evaluation calls
# ---------------------------------------------------------------------------------------------------

class Ranked(NamedTuple):
    """Each window's rank under the module's tie rule, its rank-1 candidate and its distance error."""
    rank: np.ndarray      # (N,) int64, 1 = best: 1 + #better + #as good with a lower candidate id
    top1: np.ndarray      # (N,) int64 id of the rank-1 candidate (the KD-tree's nearest, or the highest score)
    error_m: np.ndarray   # (N,) float64 metres to the true next record: from the predicted point (points) or
                          # from the rank-1 candidate (scores)

    @classmethod
    def concat(cls, parts: Sequence["Ranked"]) -> "Ranked":
        """One Ranked from the Ranked of consecutive batches, in order."""
        if not parts:
            raise DataError("Ranked.concat needs at least one batch of ranked predictions")
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in cls._fields))

    def first(self, n: int) -> "Ranked":
        """The first n windows."""
        return type(self)(*(getattr(self, f)[:n] for f in self._fields))

    def metrics(self, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
        """`retrieval_metrics` of these ranks with their distance errors."""
        return retrieval_metrics(self.rank, ks=ks, distance_error_m=self.error_m)


def rank_predictions(candidates: "CandidateIndex | Any", target_ids: Any, target_xy: Any = None, *,
                     scores: Any = None, points: Any = None) -> Ranked:
    """Rank the true next location of each window among all L candidates; exactly one of `scores`, `points`.

    candidates  a CandidateIndex, or the (L, 2) candidate coordinates in metres (an index is built; pass the
                index when ranking many batches of points)
    target_ids  (N,) the true candidate ids
    target_xy   (N, 2) metres of the true next records (e.g. the raw GPS fix); default: the targets' candidates
    scores      (N, L) a score per candidate, higher is better (classification heads, baselines, ranked lists);
                numpy or torch, compared in their own dtype (`ranks_from_scores`)
    points      (N, 2) predicted points in metres (the paper's regression head: KD-tree retrieval, `rank_of`)

    Both paths follow the tie rule of the module docstring: equal scores or equal distances are ordered by lower
    candidate id, so the rank-1 candidate is the first maximum of the scores (argmax) or the first of
    `CandidateIndex.topk(points, 1)`.
    """
    if (scores is None) == (points is None):
        raise ConfigError("rank_predictions takes exactly one of scores= (N, L) or points= (N, 2)")
    index = candidates if isinstance(candidates, CandidateIndex) else None
    candidates_xy = index.candidates_xy if index is not None else _as_points(candidates, "candidates")
    n_candidates = len(candidates_xy)
    if points is not None:
        points = _as_points(points, "points")
        if index is None:
            index = CandidateIndex(candidates_xy)
        target_ids = _as_target_ids(target_ids, len(points), n_candidates)
        rank = index.rank_of(points, target_ids)
        top1 = index.topk(points, 1)[1][:, 0].astype(np.int64) if len(points) else np.empty(0, dtype=np.int64)
        predicted_xy = points
    else:
        if not isinstance(scores, torch.Tensor):
            scores = np.asarray(scores)
        if scores.ndim != 2 or scores.shape[1] != n_candidates:
            raise DataError(f"scores must have shape (N, {n_candidates}) to match the candidates, "
                            f"got {tuple(scores.shape)}")
        rank = ranks_from_scores(scores, target_ids)                        # validates the scores and ids
        target_ids = _as_target_ids(target_ids, len(scores), n_candidates)
        # argmax returns the first maximum, i.e. the lowest id among tied scores: the rank-1 candidate
        top1 = _to_numpy(scores.argmax(dim=1) if isinstance(scores, torch.Tensor) else scores.argmax(axis=1))
        top1 = top1.astype(np.int64)
        predicted_xy = candidates_xy[top1]
    target_xy = candidates_xy[target_ids] if target_xy is None else _as_points(target_xy, "target_xy")
    if target_xy.shape != (len(target_ids), 2):
        raise DataError(f"target_xy must have shape ({len(target_ids)}, 2), one row per prediction, "
                        f"got {target_xy.shape}")
    return Ranked(rank.astype(np.int64), top1, np.sqrt(squared_distance(predicted_xy, target_xy)))


# ---------------------------------------------------------------------------------------------------
# results tables
# ---------------------------------------------------------------------------------------------------

def metrics_table(rows: list[dict[str, Any]],
                  id_columns: Sequence[str] = ("method", "dataset")) -> pd.DataFrame:
    """Tidy long table (columns: *id_columns, metric, value) from one dict per (method, dataset) run.

    Each row holds its identifiers (by default "method" and "dataset") and any number of numeric
    metrics, e.g. {"method": "markov", "dataset": "nyc", **retrieval_metrics(...)}. Metric order follows
    the rows, so the table reads like the results files that feed it.
    """
    id_columns = tuple(id_columns)
    records = []
    for position, row in enumerate(rows):
        missing = [c for c in id_columns if c not in row]
        if missing:
            raise DataError(f"metrics_table: row {position} lacks identifier keys {missing}; "
                            f"expected {list(id_columns)} plus numeric metrics")
        for metric, value in row.items():
            if metric in id_columns:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise DataError(f"metrics_table: row {position} metric '{metric}' must be a number, "
                                f"got {type(value).__name__}")
            records.append({**{c: row[c] for c in id_columns}, "metric": metric, "value": float(value)})
    return pd.DataFrame(records, columns=[*id_columns, "metric", "value"])
