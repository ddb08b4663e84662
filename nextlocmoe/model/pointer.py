"""A copy (pointer) mixture over the window's own places: this project's extension of the ranking head.

Most next places are places the window already holds: on New York check-ins the user's most frequent place
among the 45 input records is right for about four windows in ten at Hit@10, while a softmax over ~15k
venue ids needs far more data than a CPU budget gives to learn the same. A model that can point at its
input places starts where that baseline ends (RepeatNet's repeat/explore mixture, the pointer-generator):

    p(l)       = g * p_copy(l) + (1 - g) * p_gen(l)
    p_copy(l)  = sum_t a_t [loc_t = l]             a = softmax_t(<W_q s, W_k k_t> / sqrt(r) + b_t)
    g          = sigmoid(<w, s> + c)

with s the prediction state (B, D), k_t the final hidden state of window record t (B, T, D), loc_t its place
id, b_t a learned bias per window position and p_gen the generator's softmax over all L candidates (the
ranking head's scores, or a classifier's logits).

With `time_terms` (ours; docs/design.md §3.9) the attention logit of record t also gets a time-closeness term,
the log of the tuned training-free scorer's visit weight (window_scorers.py), with three learned scalars:

    + tau_t = -kappa dh_t^2 + u [weekday_t = next weekday] + v [weekend_t = next visit on a weekend]

dh_t the circular hour difference between record t and the NEXT visit (the window knows its hour: the last
record's duration), kappa = 1 / (2 sigma^2), u = ln(1 + same_weekday), v = ln(1 + same_daytype). Since
p_copy(l) is proportional to sum_t exp(b_t + tau_t) [loc_t = l], `set_time_prior` with the tuned scorer's
parameters makes the copy distribution rank the window's places exactly like that scorer (which breaks ties
with the same recency slope b_t); kappa = u = v = 0 switches the term off. The result is a normalised log-probability log p (B, L),
so the ranking metrics and the rest of the harness do not change; training minimises -log p(target).

Initialisation = the "most frequent place of the window" baseline. With W_q = 0 and w = 0 the attention
reads only the position biases b_t = beta * t: p_copy(l) is then the number of visits of l in the window,
each weighted by exp(beta * t). beta is small enough that one visit more always outweighs any recency
(beta (T - 1) < ln(1 + 1/c) for every count c a tie can involve), so places rank by visit count first and,
among places with as many visits, the more recent ones first (for places visited once: exactly the latest
visit first). A large gate bias c makes (1 - g) p_gen too small to reorder visited places, and places the
window never visits rank by p_gen, which the caller starts at the popularity prior. So the untrained model
ranks like `baselines.UserMostFrequent` (tested on real windows), and training moves it from there; after
`set_time_prior` it ranks like the tuned `window_time` scorer instead (tested too).

Training first calls `set_copy_rate` with the training split's repeat rate (the share of targets the window
holds; 0.63 on the cpu NYC budget): the gate starts at the constant that maximises the likelihood, not at
g = 1 - 4.5e-5, where an unvisited target costs ~10 nats of gate alone and the first steps go into calibrating
one scalar. Visited places then compete with popular unvisited ones through (1 - g) p_gen; on the cpu NYC
validation windows the untrained ranking stays within one window of the baseline's (Hit@10 0.500 either way).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import DataError

GATE_BIAS = 10.0   # 1 - g = 4.5e-5 at initialisation (module docstring)


def recency_slope(positions: int) -> float:
    """beta such that one visit more outranks any recency within a window of `positions` records.

    The tightest case: c + 1 visits at the oldest positions against c visits at the newest, with
    c = (T - 1) // 2 the most visits two places can both have once the second one has c + 1.
    We take half the bound: beta = ln(1 + 1/c) / (2 (T - 1)).
    """
    if positions < 2:
        return 0.0
    c = max(1, (positions - 1) // 2)
    return math.log1p(1.0 / c) / (2 * (positions - 1))


WEEKEND = 5     # weekday index of Saturday (Monday = 0): 5 and 6 are the weekend


def circular_hour_difference(hour: torch.Tensor, next_hour: torch.Tensor) -> torch.Tensor:
    """|hour - next_hour| on the 24-hour clock in [0, 12]: hour (B, T), next_hour (B,) -> (B, T) float32."""
    d = (hour.float() - next_hour.float()[:, None]).abs() % 24
    return torch.minimum(d, 24 - d)


def time_prior_values(sigma: float, same_weekday: float, same_daytype: float) -> tuple[float, float, float]:
    """(kappa, u, v) of the module docstring from a tuned scorer's (sigma, same_weekday, same_daytype): the log of
    its visit weight. sigma = inf switches the hour term off (kappa = 0); bonuses of 0 switch theirs off."""
    if not (sigma > 0 and same_weekday >= 0 and same_daytype >= 0):
        raise DataError(f"set_time_prior(sigma={sigma!r}, same_weekday={same_weekday!r}, "
                        f"same_daytype={same_daytype!r}); expected sigma > 0 (hours, inf = off) and bonuses >= 0")
    return (0.0 if math.isinf(sigma) else 1.0 / (2.0 * sigma ** 2), math.log1p(same_weekday), math.log1p(same_daytype))


def time_logits(visit_time: dict[str, torch.Tensor], hour_precision: torch.Tensor, same_weekday_bonus: torch.Tensor,
                same_daytype_bonus: torch.Tensor) -> torch.Tensor:
    """tau (B, T) float32 = -kappa dh^2 + u [same weekday] + v [same day type] (module docstring).

    visit_time: "hour", "weekday" (B, T) of the window's records and "next_hour", "next_weekday" (B,) of the visit
    to predict (batch keys of Windows.batch); the three scalars kappa, u, v."""
    missing = [k for k in ("hour", "weekday", "next_hour", "next_weekday") if k not in visit_time]
    if missing:
        raise DataError(f"the time term needs {missing} (batch keys next_hour / next_weekday come from "
                        "Windows.batch)")
    hour, weekday = visit_time["hour"], visit_time["weekday"]
    next_hour, next_weekday = visit_time["next_hour"], visit_time["next_weekday"]
    same_weekday = (weekday == next_weekday[:, None]).float()
    same_daytype = ((weekday >= WEEKEND) == (next_weekday[:, None] >= WEEKEND)).float()
    return (-hour_precision * circular_hour_difference(hour, next_hour) ** 2
            + same_weekday_bonus * same_weekday + same_daytype_bonus * same_daytype)   # (B, T)


def window_places(batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """(B, H + C) the place ids of a model batch's window (history, then current records), on `device`."""
    return torch.cat([batch["hist_location"], batch["cur_location"]], dim=1).to(device)


def window_visit_time(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The `visit_time` of a model batch: the window's hours and weekdays (history, then current records) and the
    next visit's, on `device`."""
    return {"hour": torch.cat([batch["hist_hour"], batch["cur_hour"]], dim=1).to(device),
            "weekday": torch.cat([batch["hist_weekday"], batch["cur_weekday"]], dim=1).to(device),
            "next_hour": batch["next_hour"].to(device), "next_weekday": batch["next_weekday"].to(device)}


class CopyMixture(nn.Module):
    """g * p_copy + (1 - g) * p_gen over L candidates, from the state and the window's hidden states."""

    def __init__(self, state_dim: int, key_dim: int, positions: int, dim: int = 64, gate_bias: float = GATE_BIAS,
                 time_terms: bool = False):
        super().__init__()
        self.positions = positions
        self.dim = dim
        self.time_terms = time_terms
        if time_terms:   # kappa, u, v of the module docstring; zero = no time term until set_time_prior
            self.hour_precision = nn.Parameter(torch.zeros(()))
            self.same_weekday_bonus = nn.Parameter(torch.zeros(()))
            self.same_daytype_bonus = nn.Parameter(torch.zeros(()))
        self.query = nn.Linear(state_dim, dim)
        self.key = nn.Linear(key_dim, dim, bias=False)
        self.position_bias = nn.Parameter(recency_slope(positions) * torch.arange(positions, dtype=torch.float32))
        self.gate = nn.Linear(state_dim, 1)
        with torch.no_grad():    # the baseline's ranking at step 0 (module docstring)
            self.query.weight.zero_()
            self.query.bias.zero_()
            self.gate.weight.zero_()
            self.gate.bias.fill_(gate_bias)

    @torch.no_grad()
    def set_copy_rate(self, rate: float) -> None:
        """Start g at `rate` (bias = logit(rate), gate weights unchanged), clipped into [0.001, 0.999]."""
        if not 0.0 <= rate <= 1.0:
            raise DataError(f"copy rate {rate!r} is not a probability; expected the share of targets in [0, 1] "
                            "that their window holds")
        rate = min(max(rate, 1e-3), 1 - 1e-3)
        self.gate.bias.fill_(math.log(rate / (1 - rate)))

    @torch.no_grad()
    def set_time_prior(self, sigma: float, same_weekday: float, same_daytype: float) -> None:
        """Start the time term at a tuned scorer's parameters (window_scorers.WindowWeights; sigma = inf: off)."""
        if not self.time_terms:
            raise DataError("set_time_prior: this copy mixture was built without time terms (time_terms=False)")
        for param, value in zip((self.hour_precision, self.same_weekday_bonus, self.same_daytype_bonus),
                                time_prior_values(sigma, same_weekday, same_daytype)):
            param.fill_(value)

    def time_logits(self, visit_time: dict[str, torch.Tensor]) -> torch.Tensor:
        """tau (B, T) float32 of the module docstring (see `time_logits`)."""
        return time_logits(visit_time, self.hour_precision, self.same_weekday_bonus, self.same_daytype_bonus)

    def attention(self, state: torch.Tensor, keys: torch.Tensor,
                  visit_time: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """state (B, Ds), keys (B, T, Dk) -> copy attention a (B, T) float32, rows summing to 1. With time terms,
        `visit_time` (see time_logits) is required."""
        T = keys.shape[1]
        if T > self.positions:
            raise DataError(f"window of {T} records is longer than the {self.positions} positions the copy "
                            "mixture was built for")
        # a window shorter than `positions` uses the newest biases: the most recent record is always the last
        q = self.query(state.float())                                           # (B, r)
        k = self.key(keys.float())                                              # (B, T, r)
        logits = torch.einsum("br,btr->bt", q, k) / math.sqrt(self.dim)         # (B, T)
        if self.time_terms:
            if visit_time is None:
                raise DataError("this copy mixture has time terms: pass visit_time (the window's hours and weekdays "
                                "and the next visit's)")
            logits = logits + self.time_logits(visit_time)
        return (logits + self.position_bias[self.positions - T:]).softmax(-1)  # (B, T)

    def gate_logit(self, state: torch.Tensor) -> torch.Tensor:
        """(B, Ds) -> (B, 1) logit of g, the probability of copying."""
        return self.gate(state.float())

    def forward(self, state: torch.Tensor, keys: torch.Tensor, window_location: torch.Tensor,
                gen_logits: torch.Tensor, seen: dict[str, torch.Tensor] | None = None,
                visit_time: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """state (B, Ds), keys (B, T, Dk), window_location (B, T) ids in [0, L), gen_logits (B, L)
        -> log p (B, L) float32, a normalised log-probability over candidates. `seen`, when given, receives
        "copy_gate" g (B, 1) and "copy_attention" a (B, T); `visit_time` feeds the time term (time_logits)."""
        B, L = gen_logits.shape
        if window_location.shape != keys.shape[:2]:
            raise DataError(f"window_location has shape {tuple(window_location.shape)}; expected "
                            f"{tuple(keys.shape[:2])} like the keys (batch, window records)")
        if window_location.numel() and (window_location.min() < 0 or window_location.max() >= L):
            raise DataError(f"window_location holds place ids in [{int(window_location.min())}, "
                            f"{int(window_location.max())}]; expected ids of the {L} candidates")
        attention = self.attention(state, keys, visit_time)                     # (B, T)
        copy = torch.zeros(B, L, dtype=torch.float32, device=gen_logits.device)
        copy = copy.scatter_add(1, window_location.long(), attention)          # (B, L) p_copy
        visited = copy > 0
        # log p_copy where the window visits l, -inf elsewhere; the inner where keeps log's gradient finite
        log_copy = torch.where(visited, torch.log(torch.where(visited, copy, torch.ones_like(copy))),
                               torch.full_like(copy, -math.inf))
        gate = self.gate_logit(state)                                           # (B, 1)
        if seen is not None:
            seen.update(copy_gate=torch.sigmoid(gate), copy_attention=attention)
        log_gen = F.log_softmax(gen_logits.float(), dim=-1)                     # (B, L)
        return torch.logaddexp(F.logsigmoid(gate) + log_copy, F.logsigmoid(-gate) + log_gen)   # (B, L)
