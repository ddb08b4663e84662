"""Prediction heads on the last token's state: the paper's coordinate regression and our candidate ranking.

Both heads read the prediction state AFTER the backbone's final RMSNorm (the reference skips that norm and
reads the raw residual stream, docs/design.md §4.2) and both run in float32 with autocast switched off, even
when the backbone runs in bf16: a bf16 coordinate keeps about three significant digits, i.e. tens of metres
across a city.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import DataError
from .pointer import recency_slope, time_logits, time_prior_values


def _float32_region(device: torch.device):
    """A block where autocast (e.g. accelerate's bf16 mixed precision) leaves matmuls in float32."""
    return torch.autocast(device_type=device.type, enabled=False)


def final_norm_float32(norm: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The backbone's final RMSNorm computed in float32: (..., D) any dtype -> (..., D) float32.

    Same function as transformers' LlamaRMSNorm, x / sqrt(mean(x^2) + eps) * weight, without its cast back
    to the backbone's dtype before the weight is applied.
    """
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    with _float32_region(hidden.device):
        x = hidden.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return x * norm.weight.float()


def _stat(stats: Any, name: str) -> float:
    """Read one normalisation statistic from a NormStats-like object or a dict."""
    value = stats[name] if isinstance(stats, dict) else getattr(stats, name)
    return float(value)


# ---------------------------------------------------------------------------------------------------------
# regression (the paper's head)


def log_popularity_prior(counts: torch.Tensor) -> torch.Tensor:
    """Centred log visit frequencies, add-one smoothed: the bias that makes a softmax rank by popularity.
    counts (L,) -> (L,) float32 with mean 0 (the ranking head's and the transformer pointer's start)."""
    counts = torch.as_tensor(counts, dtype=torch.float32)
    prior = torch.log((counts + 1) / (counts.sum() + counts.numel()))
    return prior - prior.mean()

class RegressionHead(nn.Module):
    """Paper Sec. 4.4: Linear(D -> 2) on the prediction state, de-normalised with the training statistics.

    The model predicts z-scored (x, y); adding back the training mean and std gives metres, in float32
    throughout. The statistics are plain floats, not buffers, so casting the module never rounds them.

    offset=True (ours, model.regression_offset): the linear map predicts a displacement from `origin_z` and starts
    at zero (weight and bias, like LoRA's B), so at step 0 the head predicts the origin and training moves it from
    there. The model picks the origin (model.regression_origin): the window's current (last) record, the "stay
    where you are" floor (last_location), or the window's place that the tuned training-free scorer ranks first
    (`ScorerOrigin`); `offset_scale` multiplies the displacement (a smaller one makes Adam's first steps
    move the prediction less). offset=False is the paper's absolute point from a default-initialised Linear.
    """

    def __init__(self, d_model: int, norm_stats: Any, offset: bool = False, offset_scale: float = 1.0):
        super().__init__()
        self.projection = nn.Linear(d_model, 2)   # drawn in both cases: the other modules see the same random stream
        self.offset, self.offset_scale = offset, float(offset_scale)
        if offset:
            with torch.no_grad():
                self.projection.weight.zero_()
                self.projection.bias.zero_()
        self.x_mean, self.x_std = _stat(norm_stats, "x_mean"), _stat(norm_stats, "x_std")
        self.y_mean, self.y_std = _stat(norm_stats, "y_mean"), _stat(norm_stats, "y_std")

    def forward(self, state: torch.Tensor, origin_z: torch.Tensor | None = None) -> torch.Tensor:
        """state (B, D) normed prediction state, origin_z (B, 2) z-scored current place (offset head only)
        -> (B, 2) float32 metres."""
        if self.offset and origin_z is None:
            raise DataError("the offset regression head needs origin_z (B, 2), the z-scored coordinates of the "
                            "window's current record (batch['cur_xy'][:, -1])")
        with _float32_region(state.device):
            z = F.linear(state.float(), self.projection.weight.float(), self.projection.bias.float())  # (B, 2)
            if self.offset:
                z = origin_z.float() + self.offset_scale * z                              # (B, 2) displacement
            # python-float scalars: no host-to-device copy, no sync on GPU
            return torch.stack([z[:, 0] * self.x_std + self.x_mean, z[:, 1] * self.y_std + self.y_mean], dim=-1)

    def extra_repr(self) -> str:
        return f"x: {self.x_mean:.1f} +- {self.x_std:.1f} m, y: {self.y_mean:.1f} +- {self.y_std:.1f} m"


class ScorerOrigin(nn.Module):
    """Where the offset regression head starts with model.regression_origin="scorer" (ours, docs/design.md §3.6):
    the window's place that the tuned training-free scorer ranks first.

    Each record t of the window (T = H + C, t = 0 oldest) votes for its place with the weight of
    window_scorers.py, in log form exactly as in the copy mixture's attention (model/pointer.py):

        log w_t = tau_t + beta t       tau_t = -kappa dh_t^2 + u [same weekday] + v [same day type]

    and the origin is the coordinates of the place with the largest sum of weights: `set_time_prior` with the
    tuned window_time parameters makes it that scorer's top-1 (tested); with kappa = u = v = 0 (no time prior,
    model.next_visit_time off) it is the window's most frequent place, the latest among equals, i.e.
    user_most_frequent's top-1. The argmax passes no gradient, so kappa, u and v are buffers, not parameters:
    training leaves them where `set_time_prior` put them, and `stored_buffers` makes every checkpoint carry them
    (runs.stored_tensors), so a loaded model has the scorer it was trained from.
    """

    stored_buffers = ("hour_precision", "same_weekday_bonus", "same_daytype_bonus")

    def __init__(self, positions: int, candidates_z: torch.Tensor, time_terms: bool = True):
        super().__init__()
        self.positions, self.time_terms = positions, time_terms
        if not time_terms:
            self.stored_buffers = ()
        for name in self.stored_buffers:     # kappa, u, v; zero = no time term until set_time_prior
            self.register_buffer(name, torch.zeros(()))
        self.register_buffer("position_bias", recency_slope(positions) * torch.arange(positions, dtype=torch.float32),
                             persistent=False)
        self.register_buffer("candidates_z", torch.as_tensor(candidates_z, dtype=torch.float32), persistent=False)

    @torch.no_grad()
    def set_time_prior(self, sigma: float, same_weekday: float, same_daytype: float) -> None:
        """The tuned scorer's parameters (window_scorers.WindowWeights); a no-op without time terms."""
        if self.time_terms:
            for buffer, value in zip((self.hour_precision, self.same_weekday_bonus, self.same_daytype_bonus),
                                     time_prior_values(sigma, same_weekday, same_daytype)):
                buffer.fill_(value)

    @torch.no_grad()
    def top_place(self, window_location: torch.Tensor, visit_time: dict[str, torch.Tensor] | None) -> torch.Tensor:
        """window_location (B, T) place ids -> (B,) the id of the place with the largest summed weight."""
        T = window_location.shape[1]
        if T > self.positions:
            raise DataError(f"window of {T} records is longer than the {self.positions} positions the regression "
                            "origin was built for")
        logits = self.position_bias[self.positions - T:].expand(window_location.shape[0], T)          # (B, T)
        if self.time_terms:
            if visit_time is None:
                raise DataError("the regression origin has time terms: pass visit_time (the window's hours and "
                                "weekdays and the next visit's)")
            logits = logits + time_logits(visit_time, self.hour_precision, self.same_weekday_bonus,
                                          self.same_daytype_bonus)
        weight = torch.exp(logits - logits.amax(-1, keepdim=True))                                    # (B, T)
        same_place = window_location[:, :, None] == window_location[:, None, :]                       # (B, T, T)
        place_weight = (same_place * weight[:, None, :]).sum(-1)                                      # (B, T)
        return window_location.gather(1, place_weight.argmax(-1, keepdim=True)).squeeze(1)            # (B,)


# ---------------------------------------------------------------------------------------------------------
# ranking (this project's extension)

def fourier_frequencies(num: int, max_scale: float, min_scale: float = 0.25, seed: int = 0) -> torch.Tensor:
    """(2, num) fixed random 2-D frequencies, in cycles per unit of z-scored coordinate.

    Directions are uniform on the circle; magnitudes are log-uniform between `min_scale` (patterns the size
    of the whole city) and `max_scale` (about one block when the city spans a few std units).
    """
    generator = torch.Generator().manual_seed(seed)
    angle = torch.rand(num, generator=generator) * 2 * math.pi
    log_lo, log_hi = math.log(min_scale), math.log(max(max_scale, min_scale))
    magnitude = torch.exp(log_lo + torch.rand(num, generator=generator) * (log_hi - log_lo))
    return torch.stack([magnitude * angle.cos(), magnitude * angle.sin()])   # (2, num)


class RankingHead(nn.Module):
    """Scores every candidate location against the prediction state (ours, not the paper's).

    The paper regresses one point and retrieves the nearest candidates. A point is the conditional mean of
    a distribution that is often multimodal (home or office?), and on dense check-in venues its nearest
    neighbours are rarely the place visited. This head instead puts a softmax over all L candidates (about
    15k venues or 40k grid cells: one (B, r) x (r, L) product, cheap) and trains it with cross-entropy.

    score(b, l) = exp(s) * <q_b, c_l> / sqrt(r) + bias_l
        q_b = Linear(D -> r)(state_b)                                    the query, float32
        c_l = MLP([fourier(z_l) ; loc_l]) + id_l                          the candidate embedding, (L, r)

    Why the candidate side is built this way. A candidate embedding LINEAR in its coordinates (e.g. the
    coordinate projection alone) gives scores linear in (x, y): the argmax then always lies on the convex
    hull of the candidates, and no interior place can ever rank first. So:
      * fourier(z_l): sin/cos of fixed random multi-scale frequencies of the z-scored coordinates, fed
        through an MLP, make the score a smooth NONLINEAR function of place (nearby places score alike);
      * loc_l: the embedding of candidate l by the SAME function-aware location encoder as the current
        tokens (shared coordinate projection + the function expert of the candidate's known function, see
        `LocationSemanticsMoE.embed_known_function`), so the Location Semantics MoE shapes the ranking and
        places of one function share structure;
      * id_l: a learned per-candidate vector (initialised small, std 0.02) separates venues too close for
        any smooth function of position (two shops in one building);
      * bias_l: a learned per-candidate prior, the popularity a place has whatever the trajectory
        (`set_popularity_prior` can start it at log-frequencies);
      * s: a learned log-temperature (starts at 0).
    The candidate matrix is computed once per forward pass and shared by the batch.
    """

    def __init__(self, d_model: int, candidates_z: torch.Tensor, candidate_function: torch.Tensor,
                 coord_dim: int = 128, dim: int = 256, fourier_features: int = 64, fourier_max_scale: float = 128.0,
                 id_embedding: bool = True, seed: int = 0):
        super().__init__()
        num_candidates = candidates_z.shape[0]
        self.register_buffer("candidates_z", candidates_z.float(), persistent=False)               # (L, 2)
        self.register_buffer("candidate_function", candidate_function.long(), persistent=False)    # (L,)
        self.register_buffer("frequencies", fourier_frequencies(fourier_features, fourier_max_scale, seed=seed),
                             persistent=False)                                                     # (2, K)
        self.query = nn.Linear(d_model, dim)
        self.candidate_mlp = nn.Sequential(
            nn.Linear(2 * fourier_features + coord_dim, dim),
            nn.GELU(),
            nn.Linear(dim, dim),
        )
        self.candidate_id_embedding = nn.Embedding(num_candidates, dim) if id_embedding else None
        if self.candidate_id_embedding is not None:
            nn.init.normal_(self.candidate_id_embedding.weight, std=0.02)
        self.candidate_bias = nn.Parameter(torch.zeros(num_candidates))
        self.log_scale = nn.Parameter(torch.zeros(()))
        self.dim = dim

    @property
    def num_candidates(self) -> int:
        return self.candidates_z.shape[0]

    def fourier(self, z: torch.Tensor) -> torch.Tensor:
        """(L, 2) z-scored coordinates -> (L, 2K) [sin ; cos] of the fixed frequencies."""
        angles = 2 * math.pi * z.float() @ self.frequencies                 # (L, K)
        return torch.cat([angles.sin(), angles.cos()], dim=-1)               # (L, 2K)

    def candidate_embeddings(self, location_embedding: torch.Tensor) -> torch.Tensor:
        """(L, coord_dim) function-aware location embeddings -> (L, r) candidate embeddings."""
        with _float32_region(location_embedding.device):
            features = torch.cat([self.fourier(self.candidates_z), location_embedding.float()], dim=-1)  # (L, 2K+128)
            embedding = self.candidate_mlp(features)                                                     # (L, r)
            if self.candidate_id_embedding is not None:
                embedding = embedding + self.candidate_id_embedding.weight.float()
            return embedding

    def forward(self, state: torch.Tensor, location_embedding: torch.Tensor) -> torch.Tensor:
        """state (B, D) normed prediction state, location_embedding (L, coord_dim) -> scores (B, L) float32."""
        candidates = self.candidate_embeddings(location_embedding)                         # (L, r)
        with _float32_region(state.device):
            query = F.linear(state.float(), self.query.weight.float(), self.query.bias.float())  # (B, r)
            scores = query @ candidates.T * (self.log_scale.exp() / math.sqrt(self.dim))     # (B, L)
            return scores + self.candidate_bias.float()

    @torch.no_grad()
    def set_popularity_prior(self, counts: torch.Tensor) -> None:
        """Start the per-candidate bias at log visit frequencies (add-one smoothed), e.g. from training targets."""
        counts = torch.as_tensor(counts, dtype=torch.float32, device=self.candidate_bias.device)
        if counts.shape != self.candidate_bias.shape:
            raise DataError(f"popularity counts must have shape ({self.num_candidates},), got {tuple(counts.shape)}")
        self.candidate_bias.copy_(log_popularity_prior(counts))
