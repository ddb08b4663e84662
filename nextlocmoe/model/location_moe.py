"""Location Semantics MoE (paper Sec. 4.1): function-aware embeddings of the current tokens' coordinates.

A place can serve several functions (a campus has canteens, a mall has offices), and which one matters
depends on who is moving and when. The module keeps five function experts, Entertainment, Commercial,
Education, Public and Residential, each a Linear(2 -> 128) coordinate projection, beside the plain
coordinate projection of `TokenFeatures`, which acts as a shared expert that every token uses:

    g      = softmax(W2 relu(W1 [h ; token features]))          (B, C, 5)   gate over [176 + 176 = 352]
    chosen = top-2 of g                                          (B, C, 5)   not renormalised (reference)
    e(x)   = shared(x) + sum_{k in chosen} g_k * expert_k(x)     (B, C, 128)

The result replaces the 128-d coordinate part of each current token's features.

Initialisation from text (paper Sec. 4.1). Each expert starts from what the frozen backbone "knows" about
its function: the function's description (`texts.FUNCTION_DESCRIPTIONS`) is looked up in the input-embedding
table and mean-pooled (no transformer pass), then mapped to 128 dims by a fixed random Linear(D -> 128)
followed by a LayerNorm, as in the reference. That gives one 128-d vector v per function, but an expert
needs a (128, 2) weight, one column for x and one for y.

The reference copies v into both columns, so the expert sees only x + y: two places mirrored across the
line x + y = const get identical embeddings. We instead set the x column to v and the y column to v turned
by 90 degrees in each consecutive pair of dimensions, (v_0, v_1, v_2, v_3, ...) -> (-v_1, v_0, -v_3, v_2, ...).
The two columns are then orthogonal and of equal length, so at initialisation each expert maps the plane
onto a 2-D subspace without distortion (distances scale by one factor in every direction), and each
function's subspace is still set by its description. Both columns are rescaled so that their entries have
the same root-mean-square as PyTorch's default initialisation of the shared Linear(2 -> 128): function
experts and shared expert start on the same scale. After initialisation the experts train freely.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from .personalized_moe import MoEOutput, moe_output


def rotate_pairs(v: torch.Tensor) -> torch.Tensor:
    """(..., 2m) -> (..., 2m): each pair (a, b) becomes (-b, a), a 90-degree turn; orthogonal to v, same norm."""
    pairs = v.unflatten(-1, (-1, 2))                               # (..., m, 2)
    return torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)


def expert_weights_from_descriptions(description_embeddings: torch.Tensor, coord_dim: int = 128,
                                     seed: int = 0) -> torch.Tensor:
    """(E, D) mean-pooled description embeddings -> (E, coord_dim, 2) initial weights of the function experts.

    v = LayerNorm(Linear(D -> coord_dim)(description)); x column = v, y column = rotate_pairs(v); each column
    rescaled to the RMS of nn.Linear(2, coord_dim)'s default init (uniform in +-1/sqrt(2): RMS 1/sqrt(6)).
    The Linear(D -> coord_dim) is random (seeded) and used once: only the resulting weights are kept.
    """
    if coord_dim % 2:
        raise ConfigError(f"model.coord_dim={coord_dim} is invalid; expected an even number (the y column turns "
                          "pairs of dimensions)")
    description_embeddings = description_embeddings.detach().float().cpu()    # built on CPU, moved with the model
    num_experts, d_model = description_embeddings.shape
    generator = torch.Generator().manual_seed(seed)
    bound = 1 / math.sqrt(d_model)                                  # nn.Linear's default init range
    weight = (torch.rand(coord_dim, d_model, generator=generator) * 2 - 1) * bound
    bias = (torch.rand(coord_dim, generator=generator) * 2 - 1) * bound
    v = F.layer_norm(description_embeddings @ weight.T + bias, (coord_dim,))    # (E, 128), unit RMS per expert
    target_rms = 1 / math.sqrt(6)
    x_column = v * target_rms / v.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12)
    y_column = rotate_pairs(x_column)
    return torch.stack([x_column, y_column], dim=-1)               # (E, 128, 2)


def gate_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of -sum_e p_e log p_e; probs (..., E) -> scalar."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()


class LocationSemanticsMoE(nn.Module):
    """Five function experts + a shared coordinate projection, gated by [h; current token features]."""

    def __init__(self, description_embeddings: torch.Tensor, history_dim: int = 176, token_dim: int = 176,
                 coord_dim: int = 128, gate_hidden: int = 128, top_k: int = 2, seed: int = 0):
        super().__init__()
        num_experts = description_embeddings.shape[0]
        if not 1 <= top_k <= num_experts:
            raise ConfigError(f"model.location_top_k={top_k} is invalid; expected 1..{num_experts}")
        self.top_k = top_k
        # (E, 128, 2): expert k maps (x, y) to expert_weights[k] @ (x, y)
        self.expert_weights = nn.Parameter(expert_weights_from_descriptions(description_embeddings, coord_dim, seed))
        self.gate = nn.Sequential(
            nn.Linear(history_dim + token_dim, gate_hidden),      # [h ; token] 352 -> 128 (reference)
            nn.ReLU(),
            nn.Linear(gate_hidden, num_experts),                  # 128 -> 5
        )

    @property
    def num_experts(self) -> int:
        return self.expert_weights.shape[0]

    def expert_projections(self, xy: torch.Tensor) -> torch.Tensor:
        """(..., 2) z-scored coordinates -> (..., E, 128): every function expert's projection."""
        return torch.einsum("...c,edc->...ed", xy.float(), self.expert_weights)

    def forward(self, xy: torch.Tensor, history: torch.Tensor, token_features: torch.Tensor,
                shared: torch.Tensor) -> MoEOutput:
        """Function-aware coordinate embeddings of the current tokens.

        xy              (B, C, 2)    z-scored coordinates of the current records
        history         (B, H_dim)   history summary h (zeros when the history router is switched off)
        token_features  (B, C, 176)  plain token features (shared coordinate projection + time features)
        shared          (B, C, 128)  the shared expert's output, i.e. the plain coordinate projection of xy
        returns MoEOutput(output (B, C, 128), gate_probs (B, C, 5), selected (B, C, 5) bool, entropy and
        imbalance scalars)
        """
        B, C, _ = token_features.shape
        gate_input = torch.cat([history[:, None, :].expand(B, C, -1), token_features], dim=-1)  # (B, C, 352)
        gate_probs = self.gate(gate_input).float().softmax(dim=-1)                                # (B, C, 5)
        top = gate_probs.topk(self.top_k, dim=-1).indices                                         # (B, C, k)
        selected = torch.zeros_like(gate_probs, dtype=torch.bool).scatter_(-1, top, True)         # (B, C, 5)
        weights = gate_probs * selected                                   # chosen experts keep their raw probability
        experts = self.expert_projections(xy)                             # (B, C, 5, 128)
        output = shared + torch.einsum("bce,bced->bcd", weights, experts)  # (B, C, 128)
        return moe_output(output, gate_probs, selected, gate_entropy(gate_probs))

    def embed_known_function(self, xy: torch.Tensor, function: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        """Location embedding of places whose function is known (the candidate set of the ranking head).

        With no trajectory to gate on, the known label plays the gate: shared(x) + expert_f(x), weight 1;
        a place of unknown function (index -1) takes the average of the five experts.
        xy (L, 2), function (L,) int64 in -1..4, shared (L, 128) -> (L, 128)
        """
        experts = self.expert_projections(xy)                                         # (L, 5, 128)
        one_hot = F.one_hot(function.clamp_min(0), self.num_experts).float()          # (L, 5)
        uniform = torch.full_like(one_hot, 1.0 / self.num_experts)
        weights = torch.where((function >= 0)[:, None], one_hot, uniform)             # (L, 5)
        return shared + torch.einsum("le,led->ld", weights, experts)                  # (L, 128)
