"""History-aware router (paper Sec. 4.3): a causal TCN summarises the long-term history into one vector h.

    history features (B, H=40, 176) -> TCN(176, [176]*5, kernel 4, dilations 1,2,4,8,16, causal, weight norm)
                                    -> LayerNorm -> last time step -> h (B, 176)

h is not a token: it is an extra input of BOTH gates, the Location Semantics MoE gate and every
Personalized MoE gate, so expert choice can depend on long-term habits and not only on the few current
records. With 5 levels of kernel 4 and dilations up to 16 the last step sees 1 + 2*3*(1+2+4+8+16) = 187
steps back, more than the 40 history records. The TCN comes from PyPI `pytorch-tcn`, as in the reference.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from pytorch_tcn import TCN


class HistoryRouter(nn.Module):
    """Causal TCN + LayerNorm over the history token features; returns the last step's summary h."""

    def __init__(self, token_dim: int = 176, channels: tuple[int, ...] = (176,) * 5, kernel_size: int = 4,
                 dropout: float = 0.1):
        super().__init__()
        self.tcn = TCN(
            num_inputs=token_dim,
            num_channels=list(channels),
            kernel_size=kernel_size,
            dilations=[2 ** i for i in range(len(channels))],  # 1, 2, 4, 8, 16 for the reference's 5 levels
            dropout=dropout,
            causal=True,
            use_norm="weight_norm",
            input_shape="NLC",                                  # (B, T, C) in and out
        )
        self.norm = nn.LayerNorm(channels[-1])
        self.dim = channels[-1]

    def forward(self, history_features: torch.Tensor) -> torch.Tensor:
        """(B, H, token_dim) -> h (B, channels[-1])."""
        sequence = self.norm(self.tcn(history_features.float()))   # (B, H, 176), step t sees steps <= t only
        return sequence[:, -1]                                      # (B, 176)
