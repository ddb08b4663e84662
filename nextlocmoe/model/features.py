"""Token features: one visit record -> a 176-d feature vector -> a backbone-width token (paper Sec. 4).

Each record (x, y, weekday, hour, duration) becomes, as in the reference code,

    [ Linear(2->128, no bias)(z-scored x, y) ; Embedding(7,16)(weekday) ; Embedding(24,16)(hour) ;
      Linear(1->16)(duration in [0, 1]) ]                                              -> 176 dims

and two separate bias-free linear maps lift history tokens and current tokens to the backbone width D.
For the current tokens the coordinate part is replaced by the Location Semantics MoE output
(`location_moe.py`); the plain coordinate projection then serves as that MoE's shared expert.

The next visit's time (ours, docs/design.md §3.9): the last record's duration says when the next visit happens,
so its hour and weekday are known (batch keys "next_hour", "next_weekday"). `next_visit_features` writes them
as five numbers, the same for every learned model of the project; `NextVisitTime` adds a linear map of them to a
model's prediction state, zero at initialisation so that an untrained model is unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

NEXT_VISIT_FEATURES = 5     # sin / cos of the hour, sin / cos of the weekday, weekend


def next_visit_features(next_hour: torch.Tensor, next_weekday: torch.Tensor) -> torch.Tensor:
    """(B,) hour of day in [0, 24) and weekday (Monday = 0) of the next visit -> (B, 5) float32:
    [sin, cos of 2 pi hour / 24, sin, cos of 2 pi weekday / 7, 1 on Saturday and Sunday]."""
    hour = next_hour.float() * (2 * math.pi / 24)
    day = next_weekday.float() * (2 * math.pi / 7)
    weekend = (next_weekday >= 5).float()
    return torch.stack([hour.sin(), hour.cos(), day.sin(), day.cos(), weekend], dim=-1)


class NextVisitTime(nn.Module):
    """state (B, D) + W next_visit_features (B, 5), W zero at initialisation (module docstring)."""

    def __init__(self, state_dim: int):
        super().__init__()
        self.projection = nn.Linear(NEXT_VISIT_FEATURES, state_dim, bias=False)
        nn.init.zeros_(self.projection.weight)

    def forward(self, state: torch.Tensor, next_hour: torch.Tensor, next_weekday: torch.Tensor) -> torch.Tensor:
        features = next_visit_features(next_hour.to(state.device), next_weekday.to(state.device))   # (B, 5)
        return state + self.projection(features).to(state.dtype)                                  # (B, D)


class TokenFeatures(nn.Module):
    """Spatial and temporal features of visit records, shared by history and current tokens."""

    def __init__(self, coord_dim: int = 128, time_dim: int = 16):
        super().__init__()
        self.coord_dim, self.time_dim = coord_dim, time_dim
        self.coordinate_projection = nn.Linear(2, coord_dim, bias=False)  # also the location MoE's shared expert
        self.weekday_embedding = nn.Embedding(7, time_dim)   # Monday = 0
        self.hour_embedding = nn.Embedding(24, time_dim)
        self.duration_projection = nn.Linear(1, time_dim)    # duration min-max normalised to [0, 1]

    @property
    def dim(self) -> int:
        return self.coord_dim + 3 * self.time_dim

    def time_features(self, weekday: torch.Tensor, hour: torch.Tensor, duration: torch.Tensor) -> torch.Tensor:
        """(B, T) weekday, hour (int64) and duration (float) -> (B, T, 3 * time_dim)."""
        return torch.cat([
            self.weekday_embedding(weekday),                       # (B, T, 16)
            self.hour_embedding(hour),                             # (B, T, 16)
            self.duration_projection(duration.float().unsqueeze(-1)),  # (B, T, 16)
        ], dim=-1)

    def forward(self, xy: torch.Tensor, weekday: torch.Tensor, hour: torch.Tensor,
                duration: torch.Tensor) -> torch.Tensor:
        """(B, T, 2) z-scored coordinates + (B, T) times -> (B, T, coord_dim + 3 * time_dim)."""
        coordinates = self.coordinate_projection(xy.float())       # (B, T, 128)
        return torch.cat([coordinates, self.time_features(weekday, hour, duration)], dim=-1)  # (B, T, 176)


class TokenProjections(nn.Module):
    """Separate bias-free maps of history and current token features to the backbone width (reference)."""

    def __init__(self, token_dim: int, d_model: int):
        super().__init__()
        self.history_projection = nn.Linear(token_dim, d_model, bias=False)
        self.current_projection = nn.Linear(token_dim, d_model, bias=False)

    def forward(self, history_features: torch.Tensor, current_features: torch.Tensor) -> torch.Tensor:
        """(B, H, 176) and (B, C, 176) -> (B, H + C, D) trajectory tokens, history first."""
        return torch.cat([self.history_projection(history_features),
                          self.current_projection(current_features)], dim=1)
