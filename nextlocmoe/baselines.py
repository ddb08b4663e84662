"""Classical next-location baselines, scored in the same harness as NextLocMoE (paper Sec. 5; docs/design.md §6).

Every baseline reads the same windows as the model (history S_h + current S_c -> next record) and gives a
score to EVERY candidate location, so `metrics.rank_predictions` ranks them by the one rule the whole
project uses (higher score first, ties broken by lower candidate id) and `evaluate_baseline` reports
exactly the columns the NextLocMoE table has (Hit@1/5/10/20, NDCG@k, MRR, distance error of the top-1
candidate).

    Popularity              how often each location is a training target (or a training record)
    LastLocation            the place of the window's last (current) record again
    WindowCentroid          the candidates nearest the mean position of the window's records (a point predictor)
    UserMostFrequent        the most visited location of the window's own H + C input records
    UserHistoryFrequency    the most visited location of the user's training records
    Markov                  first-order transitions location -> next location, from the last current record
    LSTMClassifier          id + time embeddings -> LSTM over the H + C records -> softmax over L
    TransformerClassifier   same inputs -> multi-head self-attention encoder (MHSA-style) -> softmax over L
    TransformerPointer      the same encoder with the copy mixture of NextLocMoE's ranking head (model/pointer.py):
                            softmax over L mixed with attention over the window's own places (DeepMove / RepeatNet-like)

Common interface: `fit(windows, cfg=None) -> self` learns from the training split only, and
`score(batch) -> np.ndarray (B, L)` scores one batch as `Windows.batch` (or `WindowDataset`) makes it.

What counts as "training data" (the paper is silent; chosen so no baseline sees the validation or test
period under either split protocol):

* training targets: the target record of every training window;
* training records: every record that some training window touches, inputs or target, i.e. the union of
  [s, s + H + C] over training starts s. Under the chronological split these all lie before the first
  validation target of their sub-user; under the user split they belong to training sub-users only.

Count baselines produce float64 scores that are integers (or exact ratios), so their rankings are exact:
a lexicographic preference such as "count in the window, then most recent, then popularity" is encoded
as one number without any rounding.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .errors import ConfigError, DataError
from .metrics import DEFAULT_KS, Ranked, rank_predictions
from .model.features import NextVisitTime
from .model.heads import log_popularity_prior
from .model.pointer import CopyMixture
from .utils import as_numpy, default, exists

SEQUENCE_KEYS = ("hist_location", "cur_location", "hist_weekday", "cur_weekday", "hist_hour", "cur_hour")


# ---------------------------------------------------------------------------------------------------
# helpers

def _get(batch: dict[str, Any], key: str) -> np.ndarray:
    if key not in batch:
        raise DataError(f"batch lacks key '{key}'; expected the dict of Windows.batch "
                        f"(hist_*, cur_*, target_*, user, subuser)")
    return as_numpy(batch[key])


def candidates_xy_of(windows: Any) -> np.ndarray:
    """(L, 2) float64 metres of every candidate location of a Windows object."""
    xy = getattr(windows, "candidates_xy", None)
    xy = getattr(windows, "candidates", None) if xy is None else xy
    if xy is None:
        raise DataError("windows object has neither 'candidates_xy' nor 'candidates' (the (L, 2) metres of "
                        "every candidate location)")
    return np.asarray(xy, dtype=np.float64)


def input_locations(batch: dict[str, Any]) -> np.ndarray:
    """(B, H + C) int64 location ids of the window's input records, oldest first."""
    return np.concatenate([_get(batch, "hist_location"), _get(batch, "cur_location")], axis=1).astype(np.int64)


def training_record_mask(windows: Any) -> np.ndarray:
    """(N,) bool: records that some training window touches, inputs or target (module docstring)."""
    starts = np.asarray(windows.starts["train"], dtype=np.int64)
    span = windows.history + windows.current + 1                     # S_h + S_c + target
    n = len(windows.location)
    # +1 where a window starts, -1 one past its target; starts + span <= n since the target is a record
    edges = np.bincount(starts, minlength=n + 1) - np.bincount(starts + span, minlength=n + 1)
    return np.cumsum(edges)[:n] > 0


def training_target_index(windows: Any) -> np.ndarray:
    """(W_train,) int64 flat index of every training window's target record."""
    return np.asarray(windows.starts["train"], dtype=np.int64) + windows.history + windows.current


class Baseline:
    """Shared plumbing: the number of candidates, a fitted flag and input checks."""

    name = "baseline"
    n_locations: int | None = None

    def _check_fitted(self) -> None:
        if not exists(self.n_locations):
            raise ConfigError(f"baseline '{self.name}' is not fitted; call fit(windows) before score(batch)")

    def _check_ids(self, ids: np.ndarray, key: str) -> None:
        if ids.size and (ids.min() < 0 or ids.max() >= self.n_locations):
            raise DataError(f"batch['{key}'] holds location ids in [{ids.min()}, {ids.max()}]; baseline "
                            f"'{self.name}' was fitted on {self.n_locations} candidate locations")

    def _start_fit(self, windows: Any) -> None:
        n_locations = int(len(candidates_xy_of(windows)))
        if windows.n_windows("train") == 0:
            raise DataError(f"baseline '{self.name}': the training split holds no window")
        self.n_locations = n_locations

    def fit(self, windows: Any, cfg: Any = None) -> "Baseline":
        raise NotImplementedError

    def score(self, batch: dict[str, Any]) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n_locations={self.n_locations})"


# ---------------------------------------------------------------------------------------------------
# counting baselines

class Popularity(Baseline):
    """Rank locations by how often they occur in training data, the same for every window.

    count="targets" (default) counts training targets: the empirical distribution of what is predicted.
    count="records" counts every training record (inputs and targets, each record once), which also
    credits places seen only as history. Score = the count itself.
    """

    name = "popularity"

    def __init__(self, count: str = "targets"):
        if count not in ("targets", "records"):
            raise ConfigError(f"Popularity count={count!r} is unknown; expected 'targets' or 'records'")
        self.count = count
        self.counts: np.ndarray | None = None                        # (L,) float64

    def fit(self, windows: Any, cfg: Any = None) -> "Popularity":
        self._start_fit(windows)
        if self.count == "targets":
            ids = windows.location[training_target_index(windows)]
        else:
            ids = windows.location[training_record_mask(windows)]
        self.counts = np.bincount(np.asarray(ids, dtype=np.int64), minlength=self.n_locations).astype(np.float64)
        return self

    def score(self, batch: dict[str, Any]) -> np.ndarray:
        self._check_fitted()
        n = len(_get(batch, "cur_location"))
        return np.broadcast_to(self.counts, (n, self.n_locations)).copy()   # (B, L)


class WithPopularity(Baseline):
    """A baseline that ranks the places its own rule leaves equal by training popularity."""

    def __init__(self, popularity_count: str = "targets"):
        self.popularity = Popularity(popularity_count)

    def fit(self, windows: Any, cfg: Any = None) -> "WithPopularity":
        self._start_fit(windows)
        self.popularity.fit(windows)
        return self


class LastLocation(WithPopularity):
    """The place of the last current record, i.e. "stay where you are"; the rest by training popularity.

        last place:  score = max_popularity + 1
        other:       score = popularity
    """

    name = "last_location"

    def score(self, batch: dict[str, Any]) -> np.ndarray:
        self._check_fitted()
        last = _get(batch, "cur_location")[:, -1].astype(np.int64)                # (B,)
        self._check_ids(last, "cur_location")
        scores = np.broadcast_to(self.popularity.counts, (len(last), self.n_locations)).copy()  # (B, L)
        scores[np.arange(len(last)), last] = self.popularity.counts.max() + 1.0
        return scores


class WindowCentroid(Baseline):
    """A point predictor, the floor of the regression head: the mean position of the window's H + C records.

    Candidates rank by distance to that point (nearest first), as the regression head's KD-tree ranks them
    around its predicted point, so its distance error is the error of "predict the centroid".
        score = -|| candidate - centroid ||   (metres)
    The batch carries z-scored coordinates; the training statistics of `fit` turn them back into metres.
    """

    name = "window_centroid"

    def fit(self, windows: Any, cfg: Any = None) -> "WindowCentroid":
        self._start_fit(windows)
        self.stats = windows.stats
        self.candidates_xy = candidates_xy_of(windows)
        return self

    def score(self, batch: dict[str, Any]) -> np.ndarray:
        self._check_fitted()
        z = np.concatenate([_get(batch, "hist_xy"), _get(batch, "cur_xy")], axis=1).astype(np.float64)  # (B, T, 2)
        s = self.stats
        metres = np.stack([z[..., 0] * s.x_std + s.x_mean, z[..., 1] * s.y_std + s.y_mean], axis=-1)   # (B, T, 2)
        centroid = metres.mean(axis=1)                                                     # (B, 2)
        return -np.sqrt(((centroid[:, None, :] - self.candidates_xy[None]) ** 2).sum(-1))  # (B, L)


class UserMostFrequent(WithPopularity):
    """The most frequent location among the window's H + C input records (the trivial personal baseline).

    Preference, as one exact number per candidate: first the number of visits in the window, then the most
    recent visit (later wins a tie), then, for places the window never visits, the training popularity of
    `Popularity(popularity_count)`; the metrics' lower-id rule settles what is still equal.
        visited:   score = (count * T + last_position + 1) * (max_popularity + 1)
        unvisited: score = popularity
    with T = H + C and last_position in 0..T-1, so every visited place outranks every unvisited one.
    """

    name = "user_most_frequent"

    def score(self, batch: dict[str, Any]) -> np.ndarray:
        self._check_fitted()
        loc = input_locations(batch)                                          # (B, T)
        self._check_ids(loc, "hist_location/cur_location")
        B, T = loc.shape
        same = loc[:, :, None] == loc[:, None, :]                             # (B, T, T)
        count = same.sum(axis=2)                                              # (B, T) visits of loc[b, t]
        last = np.where(same, np.arange(T)[None, None, :], -1).max(axis=2)   # (B, T) latest position of it
        scale = self.popularity.counts.max() + 1.0
        scores = np.broadcast_to(self.popularity.counts, (B, self.n_locations)).copy()  # (B, L)
        # a place repeated in the window gets the same value from each of its positions: no write order issue
        scores[np.arange(B)[:, None], loc] = (count * T + last + 1) * scale
        return scores


class UserHistoryFrequency(Baseline):
    """The user's most visited location over all of their training records, popularity breaking ties.

    Users are the original users of the dataset (`batch['user']`): under the user split a test sub-user's
    other sub-users may be in training (the paper's protocol splits sub-users), otherwise the user has no
    training records and the score falls back to popularity.
        score = user_count * (max_popularity + 1) + popularity
    """

    name = "user_history_frequency"

    def __init__(self, popularity_count: str = "targets"):
        self.popularity = Popularity(popularity_count)
        self.user_counts: sp.csr_matrix | None = None                # (U, L) visits of user u to location l

    def fit(self, windows: Any, cfg: Any = None) -> "UserHistoryFrequency":
        self._start_fit(windows)
        self.popularity.fit(windows)
        mask = training_record_mask(windows)
        user_of_record = np.asarray(windows.subuser_user, dtype=np.int64)[np.asarray(windows.subuser)[mask]]
        locations = np.asarray(windows.location, dtype=np.int64)[mask]
        n_users = int(np.max(windows.subuser_user)) + 1
        self.user_counts = sp.csr_matrix((np.ones(len(locations)), (user_of_record, locations)),
                                         shape=(n_users, self.n_locations))   # duplicates are summed
        return self

    def score(self, batch: dict[str, Any]) -> np.ndarray:
        self._check_fitted()
        user = _get(batch, "user").astype(np.int64)                           # (B,)
        known = (user >= 0) & (user < self.user_counts.shape[0])
        counts = np.zeros((len(user), self.n_locations))                      # (B, L)
        if known.any():
            counts[known] = self.user_counts[user[known]].toarray()
        return counts * (self.popularity.counts.max() + 1.0) + self.popularity.counts[None, :]


class Markov(Baseline):
    """First-order Markov chain over locations, scored from the last current record.

    Transitions are the consecutive pairs (record i -> record i+1) of the same sub-user where both records
    are training records (module docstring), each pair counted once however many windows overlap it.
    Smoothing: additive with a popularity prior (Dirichlet), for previous location a and candidate l,
        P(l | a) = (c(a, l) + alpha * pop(l)) / (c(a) + alpha),   pop = training-target frequencies.
    A place never seen as a transition source gets pure popularity. With alpha <= 1 the ranking is
    lexicographic: transition count first, popularity among equal counts (alpha * pop(l) < 1).
    """

    name = "markov"

    def __init__(self, alpha: float = 1.0, popularity_count: str = "targets"):
        if not alpha > 0:
            raise ConfigError(f"Markov alpha={alpha!r} is invalid; expected a smoothing weight > 0")
        self.alpha = float(alpha)
        self.popularity = Popularity(popularity_count)
        self.transitions: sp.csr_matrix | None = None                # (L, L) counts from -> to

    def fit(self, windows: Any, cfg: Any = None) -> "Markov":
        self._start_fit(windows)
        self.popularity.fit(windows)
        mask = training_record_mask(windows)
        subuser = np.asarray(windows.subuser)
        location = np.asarray(windows.location, dtype=np.int64)
        pair = mask[:-1] & mask[1:] & (subuser[:-1] == subuser[1:])          # (N-1,) record i -> i+1
        src, dst = location[:-1][pair], location[1:][pair]
        L = self.n_locations
        self.transitions = sp.csr_matrix((np.ones(len(src)), (src, dst)), shape=(L, L))
        self.transitions.sum_duplicates()
        self.out_counts = np.asarray(self.transitions.sum(axis=1)).ravel()  # (L,) c(a)
        self.prior = self.popularity.counts / self.popularity.counts.sum()  # (L,) pop(l)
        return self

    def score(self, batch: dict[str, Any]) -> np.ndarray:
        self._check_fitted()
        previous = _get(batch, "cur_location")[:, -1].astype(np.int64)       # (B,) last current record
        self._check_ids(previous, "cur_location")
        counts = self.transitions[previous].toarray()                          # (B, L)
        return (counts + self.alpha * self.prior[None, :]) / (self.out_counts[previous] + self.alpha)[:, None]


# ---------------------------------------------------------------------------------------------------
# neural baselines

@dataclass
class NeuralBaselineConfig:
    """Sizes and training of the LSTM / MHSA-style classifiers (small, CPU-friendly; not from the paper)."""

    embedding_dim: int = 64              # location-id, weekday and hour embeddings (summed per record)
    hidden_dim: int = 128                # LSTM hidden size / transformer model width
    layers: int = 2                      # LSTM layers / transformer encoder layers
    heads: int = 4                       # attention heads (transformer only; must divide hidden_dim)
    dropout: float = 0.1                 # dropout inside the encoder and before the output layer
    causal: bool = True                  # transformer: each record attends to itself and earlier ones only
    epochs: int = 5                      # at most this many passes over the (sub-sampled) training windows
    patience: int | None = None          # stop after this many epochs without a better validation Hit@10 and keep
                                         # the best epoch's weights (None = no validation, train all epochs)
    max_val_windows: int | None = 2000   # validation windows scored after each epoch when patience is set
    pointer_gate_init: str = "repeat_rate"  # transformer_pointer's copy gate at the start: "repeat_rate" (the training
                                         # share of targets inside their window) or "baseline" (the exact floor)
    next_visit_time: bool = True         # the next visit's hour and weekday added to the last state (zero-initialised,
                                         # model/features.py) and, for transformer_pointer, the copy attention's time
                                         # term started at the tuned window_time scorer: the same as NextLocMoE's
    lr: float = 1e-3                     # Adam learning rate (Adam defaults otherwise)
    weight_decay: float = 0.0            # Adam L2 penalty
    batch_size: int = 128                # training windows per step
    grad_clip: float = 1.0               # max global gradient norm (0 = no clipping)
    max_train_windows: int | None = None  # train on at most this many training windows (None = all)
    seed: int = 0                        # weights, dropout, subsample and batch order
    device: str | None = None            # "cpu", "cuda", ...; None = cuda when available
    progress: bool = True                # show a tqdm bar over training steps

    def validate(self, needs_heads: bool = False) -> "NeuralBaselineConfig":
        checks = [
            ("embedding_dim", self.embedding_dim >= 1, "an integer >= 1"),
            ("hidden_dim", self.hidden_dim >= 1, "an integer >= 1"),
            ("layers", self.layers >= 1, "an integer >= 1"),
            ("heads", self.heads >= 1 and (not needs_heads or self.hidden_dim % self.heads == 0),
             f"an integer >= 1 dividing hidden_dim={self.hidden_dim}"),
            ("dropout", 0.0 <= self.dropout < 1.0, "a probability in [0, 1)"),
            ("epochs", self.epochs >= 1, "an integer >= 1"),
            ("lr", self.lr > 0, "a learning rate > 0"),
            ("weight_decay", self.weight_decay >= 0, "a value >= 0"),
            ("batch_size", self.batch_size >= 1, "an integer >= 1"),
            ("grad_clip", self.grad_clip >= 0, "a norm >= 0 (0 = off)"),
            ("max_train_windows", self.max_train_windows is None or self.max_train_windows >= 1,
             "None or an integer >= 1"),
            ("patience", self.patience is None or self.patience >= 1, "None or an integer >= 1"),
            ("max_val_windows", self.max_val_windows is None or self.max_val_windows >= 1, "None or an integer >= 1"),
            ("pointer_gate_init", self.pointer_gate_init in ("repeat_rate", "baseline"), "'repeat_rate' or 'baseline'"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ConfigError(f"baseline.{name}={getattr(self, name)!r} is invalid; expected {expected}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RecordEmbedding(nn.Module):
    """A record as the sum of its location-id, weekday and hour embeddings: (B, T) ids -> (B, T, E)."""

    def __init__(self, n_locations: int, dim: int):
        super().__init__()
        self.location = nn.Embedding(n_locations, dim)
        self.weekday = nn.Embedding(7, dim)
        self.hour = nn.Embedding(24, dim)

    def forward(self, location: torch.Tensor, weekday: torch.Tensor, hour: torch.Tensor) -> torch.Tensor:
        return self.location(location) + self.weekday(weekday) + self.hour(hour)   # (B, T, E)


def with_next_visit(module: NextVisitTime | None, state: torch.Tensor, next_hour: torch.Tensor,
                    next_weekday: torch.Tensor) -> torch.Tensor:
    """The state plus the next visit's time (model/features.py), or the state itself when switched off."""
    return state if module is None else module(state, next_hour, next_weekday)


class LSTMNet(nn.Module):
    """Embeddings -> multi-layer LSTM over the records -> last hidden state -> logits over L locations."""

    def __init__(self, n_locations: int, n_positions: int, cfg: NeuralBaselineConfig):
        super().__init__()
        self.embed = RecordEmbedding(n_locations, cfg.embedding_dim)
        self.lstm = nn.LSTM(cfg.embedding_dim, cfg.hidden_dim, num_layers=cfg.layers, batch_first=True,
                            dropout=cfg.dropout if cfg.layers > 1 else 0.0)
        self.dropout = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(cfg.hidden_dim, n_locations)
        self.next_visit = NextVisitTime(cfg.hidden_dim) if cfg.next_visit_time else None   # built last

    def forward(self, location: torch.Tensor, weekday: torch.Tensor, hour: torch.Tensor,
                next_hour: torch.Tensor, next_weekday: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(location, weekday, hour)                            # (B, T, E)
        states, _ = self.lstm(tokens)                                           # (B, T, D)
        return self.classifier(self.dropout(with_next_visit(self.next_visit, states[:, -1], next_hour,
                                                            next_weekday)))   # (B, L)


class TransformerNet(nn.Module):
    """MHSA-style classifier: embeddings + learned positions -> TransformerEncoder -> last record -> logits.

    Pre-norm encoder layers (feed-forward width 2 x hidden_dim); with `causal` each record attends only to
    itself and earlier records, so the last position summarises the whole window in time order.
    """

    def __init__(self, n_locations: int, n_positions: int, cfg: NeuralBaselineConfig):
        super().__init__()
        self.causal = cfg.causal
        self.embed = RecordEmbedding(n_locations, cfg.embedding_dim)
        self.project = nn.Linear(cfg.embedding_dim, cfg.hidden_dim)
        self.position = nn.Embedding(n_positions, cfg.hidden_dim)
        layer = nn.TransformerEncoderLayer(cfg.hidden_dim, cfg.heads, dim_feedforward=2 * cfg.hidden_dim,
                                           dropout=cfg.dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.hidden_dim)
        self.classifier = nn.Linear(cfg.hidden_dim, n_locations)
        self.next_visit = NextVisitTime(cfg.hidden_dim) if cfg.next_visit_time else None   # built last

    def forward(self, location: torch.Tensor, weekday: torch.Tensor, hour: torch.Tensor,
                next_hour: torch.Tensor, next_weekday: torch.Tensor) -> torch.Tensor:
        state = self.norm(self.encode(location, weekday, hour)[:, -1])          # (B, D)
        return self.classifier(with_next_visit(self.next_visit, state, next_hour, next_weekday))   # (B, L)

    def encode(self, location: torch.Tensor, weekday: torch.Tensor, hour: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, D) encoder states before the final norm."""
        T = location.shape[1]
        if T > self.position.num_embeddings:
            raise DataError(f"window of {T} records is longer than the {self.position.num_embeddings} "
                            f"positions the transformer baseline was fitted with")
        positions = torch.arange(T, device=location.device)
        tokens = self.project(self.embed(location, weekday, hour)) + self.position(positions)  # (B, T, D)
        mask = nn.Transformer.generate_square_subsequent_mask(T, device=location.device) if self.causal else None
        return self.encoder(tokens, mask=mask, is_causal=self.causal)         # (B, T, D)


class TransformerPointerNet(TransformerNet):
    """TransformerNet whose output is the copy mixture of NextLocMoE's ranking head (model/pointer.py):
    log p = log(g * p_copy + (1 - g) * softmax(logits)), the copy attention reading the encoder's states of
    the window's records. Starts like the window's most frequent place once `start_at_popularity` is called."""

    def __init__(self, n_locations: int, n_positions: int, cfg: NeuralBaselineConfig):
        super().__init__(n_locations, n_positions, cfg)
        self.pointer = CopyMixture(cfg.hidden_dim, cfg.hidden_dim, n_positions, dim=cfg.hidden_dim // 2,
                                   time_terms=cfg.next_visit_time)

    @torch.no_grad()
    def start_at_popularity(self, counts: np.ndarray) -> None:
        """Generator = the popularity prior alone (zero weights, log-frequency biases), as in the ranking head."""
        prior = log_popularity_prior(torch.as_tensor(np.asarray(counts, dtype=np.float64), dtype=torch.float32))
        self.classifier.weight.zero_()
        self.classifier.bias.copy_(prior.to(self.classifier.bias.device))

    def forward(self, location: torch.Tensor, weekday: torch.Tensor, hour: torch.Tensor,
                next_hour: torch.Tensor, next_weekday: torch.Tensor) -> torch.Tensor:
        states = self.norm(self.encode(location, weekday, hour))                 # (B, T, D)
        state = with_next_visit(self.next_visit, states[:, -1], next_hour, next_weekday)   # (B, D)
        logits = self.classifier(state)                                         # (B, L)
        visit_time = dict(hour=hour, weekday=weekday, next_hour=next_hour, next_weekday=next_weekday)
        return self.pointer(state, states, location, logits,
                            visit_time=visit_time if self.pointer.time_terms else None)   # (B, L) log p


class NeuralBaseline(Baseline):
    """Fit a sequence classifier with cross-entropy over all L candidates (Adam), score with its logits.

    Inputs per window: the location id, weekday and hour of its H + C records, oldest first; target: the
    location id of the next record. Training uses the training split only (optionally a seeded subsample of
    `max_train_windows`); the run is deterministic for a given seed on a given device.
    """

    name = "neural"
    network: Callable[..., nn.Module]
    needs_heads = False

    def __init__(self, cfg: NeuralBaselineConfig | None = None):
        self.cfg = default(cfg, NeuralBaselineConfig()).validate(self.needs_heads)
        self.net: nn.Module | None = None
        self.loss_history: list[float] = []     # mean training cross-entropy per epoch
        self.val_history: list[float] = []      # validation Hit@10 per epoch (with cfg.patience)
        self.best_epoch: int | None = None      # the epoch whose weights are kept (1-based)
        self.step_losses: list[float] = []      # training cross-entropy per step
        self.fit_seconds: float | None = None

    def _check_fitted(self) -> None:
        if self.net is None:
            raise ConfigError(f"baseline '{self.name}' is not fitted; call fit(windows) before score(batch)")

    @property
    def device(self) -> torch.device:
        return torch.device(default(self.cfg.device, "cuda" if torch.cuda.is_available() else "cpu"))

    @property
    def n_parameters(self) -> int:
        self._check_fitted()
        return sum(p.numel() for p in self.net.parameters())

    def _inputs(self, batch: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        """(location, weekday, hour) (B, T) of the window's records, then next_hour, next_weekday (B,)."""
        arrays = {key: _get(batch, key) for key in SEQUENCE_KEYS}
        location = np.concatenate([arrays["hist_location"], arrays["cur_location"]], axis=1)  # (B, T)
        self._check_ids(location, "hist_location/cur_location")
        weekday = np.concatenate([arrays["hist_weekday"], arrays["cur_weekday"]], axis=1)    # (B, T)
        hour = np.concatenate([arrays["hist_hour"], arrays["cur_hour"]], axis=1)              # (B, T)
        as_ids = lambda a: torch.as_tensor(np.asarray(a).astype(np.int64), device=self.device)
        return (as_ids(location), as_ids(weekday), as_ids(hour), as_ids(_get(batch, "next_hour")),
                as_ids(_get(batch, "next_weekday")))

    def fit(self, windows: Any, cfg: NeuralBaselineConfig | None = None,
            observe: Callable[["NeuralBaseline", int], bool | None] | None = None,
            observe_every: int | None = None) -> "NeuralBaseline":
        """Train on the training split (class docstring). `observe(self, windows_seen)`, when given, is called with
        the network in eval mode before the first step (windows_seen = 0) and after the first step at which
        windows_seen reaches each multiple of `observe_every` (exactly there when it is a multiple of batch_size and
        the epoch's windows are); it returning True stops training there (a learning curve,
        experiments/learning_curve.py). It sees the weights as they are at that step, not the best epoch's."""
        if observe is not None and not (isinstance(observe_every, int) and observe_every >= 1):
            raise ConfigError(f"observe_every={observe_every!r}; expected an integer >= 1 (training windows)")
        if exists(cfg):
            self.cfg = cfg.validate(self.needs_heads)
        cfg = self.cfg
        self._start_fit(windows)
        train_windows = windows.subsample("train", cfg.max_train_windows, seed=cfg.seed)
        n_train = train_windows.n_windows("train")
        n_positions = windows.history + windows.current
        rng = np.random.default_rng(cfg.seed)
        self.loss_history, self.step_losses, self.val_history = [], [], []
        best: dict[str, Any] | None = None      # the best validation epoch: hit, epoch, weights
        val_windows = windows.subsample("val", cfg.max_val_windows, seed=cfg.seed) if cfg.patience else None
        if val_windows is not None and val_windows.n_windows("val") == 0:
            raise DataError(f"baseline '{self.name}': patience={cfg.patience} needs validation windows; the "
                            "validation split is empty")
        start = time.perf_counter()
        fork_devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=fork_devices):    # seed locally, leave the caller's RNG alone
            torch.manual_seed(cfg.seed)
            self.net = type(self).network(self.n_locations, n_positions, cfg)
            if hasattr(self.net, "start_at_popularity"):    # the pointer variant: generator at popularity,
                self.net.start_at_popularity(Popularity("targets").fit(windows).counts)
                if cfg.pointer_gate_init == "repeat_rate":      # gate at the repeat rate (model/pointer.py)
                    self.net.pointer.set_copy_rate(train_windows.repeat_rate("train"))
                if self.net.pointer.time_terms:                 # time term at the tuned scorer (as NextLocMoE's)
                    from .window_scorers import make_scorer     # window_scorers builds on this module
                    w = make_scorer("window_time").fit(train_windows).weights     # chosen on validation
                    self.net.pointer.set_time_prior(w.sigma, w.same_weekday, w.same_daytype)
            self.net = self.net.to(self.device)
            optimizer = torch.optim.Adam(self.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
            steps_per_epoch = -(-n_train // cfg.batch_size)
            self.net.train()
            bar = tqdm(total=cfg.epochs * steps_per_epoch, desc=f"fit {self.name}", unit="step",
                       disable=not cfg.progress, leave=False)
            seen, mark, stop = 0, observe_every, self._observe(observe, 0)
            for epoch in range(cfg.epochs if not stop else 0):
                order = rng.permutation(n_train)
                epoch_loss = 0.0
                for first in range(0, n_train, cfg.batch_size):
                    idx = order[first:first + cfg.batch_size]
                    batch = train_windows.batch("train", idx)
                    self._check_ids(batch["target_location"], "target_location")
                    target = torch.as_tensor(batch["target_location"].astype(np.int64), device=self.device)
                    logits = self.net(*self._inputs(batch))                    # (B, L)
                    loss = F.cross_entropy(logits, target)    # log p of the pointer variant: log_softmax keeps it
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if cfg.grad_clip > 0:
                        nn.utils.clip_grad_norm_(self.net.parameters(), cfg.grad_clip)
                    optimizer.step()
                    step_loss = loss.item()
                    self.step_losses.append(step_loss)
                    epoch_loss += step_loss * len(idx)
                    bar.update(1)
                    bar.set_postfix(epoch=epoch + 1, loss=f"{step_loss:.3f}")
                    seen += len(idx)
                    if observe is not None and seen >= mark:
                        mark += observe_every * (1 + (seen - mark) // observe_every)
                        if self._observe(observe, seen):
                            stop = True
                            break
                if stop:
                    break
                self.loss_history.append(epoch_loss / n_train)
                if val_windows is not None:
                    best = self._validate(val_windows, epoch, best)
                    if epoch + 1 - best["epoch"] >= cfg.patience:
                        break
            bar.close()
            if best is not None:
                self.net.load_state_dict(best["weights"])
        self.best_epoch = best["epoch"] if best is not None else len(self.loss_history)
        self.net.eval()
        self.fit_seconds = time.perf_counter() - start
        return self

    def _observe(self, observe: Callable[["NeuralBaseline", int], bool | None] | None, seen: int) -> bool:
        """Call `observe(self, seen)` with the network in eval mode (fit's docstring); True = stop training."""
        if observe is None:
            return False
        self.net.eval()
        stop = bool(observe(self, seen))
        self.net.train()
        return stop

    def _validate(self, val_windows: Any, epoch: int, best: dict[str, Any] | None) -> dict[str, Any]:
        """Validation Hit@10 after `epoch` (0-based), appended to val_history; the better of `best` and now."""
        self.net.eval()
        hit = evaluate_baseline(self, val_windows, "val", desc=f"val {self.name}")["hit@10"]
        self.net.train()
        self.val_history.append(hit)
        if best is None or hit > best["hit"]:
            best = {"hit": hit, "epoch": epoch + 1,
                    "weights": {k: v.detach().clone() for k, v in self.net.state_dict().items()}}
        return best

    @torch.no_grad()
    def score(self, batch: dict[str, Any]) -> np.ndarray:
        """Logits (B, L) float32; their order equals the softmax probabilities' order."""
        self._check_fitted()
        self.net.eval()
        return self.net(*self._inputs(batch)).float().cpu().numpy()


class LSTMClassifier(NeuralBaseline):
    """LSTM next-location classifier (the LSTM baseline of the paper's comparison, Sec. 5)."""

    name = "lstm"
    network = LSTMNet


class TransformerClassifier(NeuralBaseline):
    """Multi-head self-attention classifier (the MHSA / transformer baseline, paper Sec. 5)."""

    name = "transformer"
    network = TransformerNet
    needs_heads = True


class TransformerPointer(TransformerClassifier):
    """The transformer classifier with the copy mixture over the window's places (this project's extension)."""

    name = "transformer_pointer"
    network = TransformerPointerNet


# ---------------------------------------------------------------------------------------------------
# registry and evaluation

BASELINES: dict[str, type[Baseline]] = {
    "popularity": Popularity,
    "last_location": LastLocation,
    "window_centroid": WindowCentroid,
    "user_most_frequent": UserMostFrequent,
    "user_history_frequency": UserHistoryFrequency,
    "markov": Markov,
    "lstm": LSTMClassifier,
    "transformer": TransformerClassifier,
    "transformer_pointer": TransformerPointer,
}

NEURAL_BASELINES = ("lstm", "transformer", "transformer_pointer")


def make_baseline(name: str, cfg: NeuralBaselineConfig | None = None, **kwargs: Any) -> Baseline:
    """An unfitted baseline by registry name; `cfg` goes to the neural ones, `kwargs` to the counting ones."""
    if name not in BASELINES:
        raise ConfigError(f"baseline '{name}' is unknown; expected one of {list(BASELINES)}")
    if name in NEURAL_BASELINES:
        return BASELINES[name](cfg)
    return BASELINES[name](**kwargs)


def evaluate_baseline(model: Baseline, windows: Any, split: str = "test", batch_size: int = 256,
                      ks: tuple[int, ...] = DEFAULT_KS, desc: str | None = None) -> dict[str, float]:
    """Hit@k, NDCG@k, MRR and top-1 distance error of a fitted baseline on one split (paper Sec. 5.1)."""
    return rank_baseline(model, windows, split, batch_size, desc).metrics(ks)


def rank_baseline(model: Baseline, windows: Any, split: str = "test", batch_size: int = 256,
                  desc: str | None = None) -> Ranked:
    """Rank, top-1 candidate and distance error of every window of one split under a fitted baseline (in stored
    order, like `evaluation.rank_split`).

    Scores are made and ranked one batch at a time, so memory stays at (batch_size, L) whatever the split
    size. The distance error is from the top-1 candidate (highest score, lowest id on ties) to the true
    next record's coordinates `target_xy`.
    """
    if not (isinstance(batch_size, (int, np.integer)) and batch_size >= 1):
        raise ConfigError(f"batch_size={batch_size!r} is invalid; expected an integer >= 1")
    candidates_xy = candidates_xy_of(windows)
    if getattr(model, "n_locations", None) != len(candidates_xy):
        raise DataError(f"baseline '{getattr(model, 'name', model)}' was fitted on "
                        f"{getattr(model, 'n_locations', None)} candidate locations but these windows have "
                        f"{len(candidates_xy)}; fit it on this dataset first")
    n = windows.n_windows(split)
    if n == 0:
        raise DataError(f"split '{split}' holds no window to evaluate")
    ranked = []
    for first in tqdm(range(0, n, batch_size), desc=desc or f"eval {model.name} {split}", unit="batch",
                      leave=False, disable=None):
        batch = windows.batch(split, np.arange(first, min(first + batch_size, n)))
        scores = model.score(batch)                                            # (B, L)
        if tuple(scores.shape) != (len(batch["target_location"]), len(candidates_xy)):
            raise DataError(f"baseline '{model.name}' returned scores of shape {tuple(scores.shape)}; "
                            f"expected ({len(batch['target_location'])}, {len(candidates_xy)})")
        ranked.append(rank_predictions(candidates_xy, batch["target_location"], batch["target_xy"], scores=scores))
    return Ranked.concat(ranked)
