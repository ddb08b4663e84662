"""Personalized MoE: role experts that replace the FFN of chosen decoder layers (paper Sec. 4.2).

Each of the 11 role experts (Student, Teacher, ..., Undefined) is the layer's original, frozen LLaMA FFN

    FFN(x) = W_down( act(W_gate x) * (W_up x) )

with its own LoRA adapter on the gate, up and down projections. A gate scores every (token, expert) pair with
an MLP over [token hidden state; history summary h from the TCN router; the expert's fixed role key], and a
softmax over the experts turns the scores into probabilities. Routing keeps a few experts per token and the
layer returns the probability-weighted sum of their outputs.

Two formulations of the same function live here:

* `PersonalizedMoE`, the one the model uses. LoRA is additive and the down projection is linear, so all
  experts can share ONE frozen base FFN (docs/design.md §3.5, §4.10):

      g_e = W_gate x + s B_gate,e A_gate,e x          (base part once per token, low-rank part per expert)
      u_e = W_up   x + s B_up,e   A_up,e   x
      a_e = act(g_e) * u_e
      y   = W_down (sum_e w_e a_e) + sum_e w_e s B_down,e A_down,e a_e

  so the three big matmuls run once per token whatever the number of experts, and only the (token, expert)
  pairs that routing selected are computed at all. Two ways to run it give the same function
  (`expert_compute`; "auto" picks per device from `AUTO_EXPERT_COMPUTE`):
    "grouped"  loops over the experts, each on its own tokens, through autograd (fewest FLOPs);
    "pairs"    puts all selected pairs in one batch and multiplies block-stacked LoRA matrices (a few large
               kernels instead of a loop; fastest on a GPU, where every launched operation costs time).

  Where the time goes (`benchmarks/bench_moe.py` prints this floor): the dense frozen FFN costs 12 D F FLOPs
  per token forward + backward; each selected pair adds 18 r (D + F) FLOPs of LoRA (+ ~30 F elementwise):
  1.31x the FFN at 5 pairs per token at SmolLM2 width (D 576, F 1536), 1.06x at the 3B width. But the pair
  terms are memory-bound: every eager elementwise/gather op moves one F-wide row per pair, ~30-40 such passes
  forward + backward, and at SmolLM2 width the FFN does only ~50 (fp32) to ~120 (bf16) FLOPs per token for
  each of those bytes per pair, so on a CPU or a bf16 GPU the extra time is set by those passes, not by
  FLOPs. Only a kernel that keeps a token's g, u and its experts' rank-r codes in registers would reach the FLOP floor.

  Measured costs of each formulation over a dense FFN (CPU and a lent H100, at threshold and top-2 routing)
  are in results/bench_moe.csv and results/bench_moe_h100.csv (`benchmarks/bench_moe.py` writes them, with the
  machine in their provenance); "auto" picks per device from those measurements (AUTO_EXPERT_COMPUTE in
  model/config.py). Formulations tried and dropped (a dense mask over all experts, a fused autograd Function
  with recompute, torch.compile of the per-expert block) are listed in docs/design.md §3.5.
* `NaivePersonalizedMoE`, the reference code's formulation (one deep copy of the FFN per expert, every expert
  on every token); kept as the trusted baseline of the tests and the benchmark.
"""

from __future__ import annotations

import copy
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .config import AUTO_EXPERT_COMPUTE, ROUTINGS, PersonalizedMoEConfig

class MoEOutput(NamedTuple):
    """What an MoE layer returns: its output and, beside it, the gate and the two auxiliary loss terms."""
    output: torch.Tensor       # (B, T, D) the layer's output, in place of the FFN's
    gate_probs: torch.Tensor   # (B, T, E) softmax over the experts, float32
    selected: torch.Tensor     # (B, T, E) bool, the experts routing kept for each token
    entropy: torch.Tensor      # () mean over tokens of the entropy of gate_probs (the paper's regulariser)
    imbalance: torch.Tensor    # () ln E - H(mean gate over the tokens): `routing_imbalance` (our balance term)


# ----------------------------------------------------------------------------------------------------------
# routing

def route(probs: torch.Tensor, cfg: PersonalizedMoEConfig) -> torch.Tensor:
    """Which experts each token keeps: a bool mask shaped like `probs` (..., E). Paper Sec. 4.2.

    Experts are ranked by probability, ties broken by the lower expert index (a stable sort).
      "topk":      the first `top_k` of the ranking.
      "threshold": the shortest prefix of the ranking whose cumulative probability reaches `threshold`
                   (>=, in float32), cut to at most `max_experts`. A confident gate keeps one expert, an
                   unsure one keeps several.

    Note on the reference code: its threshold branch builds the cumulative-probability mask in *sorted*
    order and then applies it to the probabilities in *original* expert order, and a later assignment
    overwrites the cap of 5. The experts it keeps are therefore not the most probable ones (in practice 10
    of the 11 run for every token, and the one left out may be the favourite). This function implements the
    rule the paper describes instead; results will differ from the reference wherever that bug matters.
    """
    ranked_probs, ranked_experts = probs.float().sort(dim=-1, descending=True, stable=True)   # (..., E)
    rank = torch.arange(probs.shape[-1], device=probs.device)                                 # (E,)
    if cfg.routing == "topk":
        keep_ranked = rank < cfg.top_k                                                         # (E,)
        keep_ranked = keep_ranked.expand_as(ranked_probs)
    elif cfg.routing == "threshold":
        # probability of the experts ranked above each rank (an exclusive cumulative sum, no subtraction error)
        mass_before = F.pad(ranked_probs.cumsum(dim=-1)[..., :-1], (1, 0))                    # (..., E)
        # keep rank j while the experts above it have not reached the threshold yet: the minimal prefix
        keep_ranked = (mass_before < cfg.threshold) & (rank < cfg.max_experts)
        keep_ranked[..., 0] = True                                     # always at least the favourite
    else:
        raise ConfigError(f"personalized_moe.routing={cfg.routing!r} is unknown; expected one of {list(ROUTINGS)}")
    # back from ranked order to expert order: the step the reference code misses
    return torch.zeros_like(probs, dtype=torch.bool).scatter(-1, ranked_experts, keep_ranked)


def routing_weights(probs: torch.Tensor, selected: torch.Tensor, renormalize: bool) -> torch.Tensor:
    """Mixture weights (..., E): the gate probability of each kept expert, 0 elsewhere.

    Without renormalisation (the reference's choice, our default) the weights of a token sum to the kept
    probability mass (>= 0.8 under threshold routing unless capped), so the layer's output is scaled down a
    little where the gate is unsure. With `renormalize=True` they sum to 1.
    """
    weights = probs * selected
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights


def gate_entropy(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities (float32) and the mean over tokens of their entropy, from logits (..., E)."""
    log_probs = logits.float().log_softmax(dim=-1)
    probs = log_probs.exp()
    entropy = -(probs * log_probs).sum(dim=-1).mean()
    return probs, entropy


def routing_imbalance(gate_probs: torch.Tensor) -> torch.Tensor:
    """ln E - H(mean gate): 0 when the tokens use the E experts equally on average, ln E when they all put
    their mass on the same one. gate_probs (..., E) -> () float32.

    The paper's entropy term H (mean over tokens of each gate's entropy) sharpens each token's gate; on its
    own it is minimised fastest by one expert for every token (a shared bias), which is what the gates here
    did within ten steps. H + imbalance = ln E - (H(mean gate) - H) = ln E - I(token; expert): penalising both
    rewards sharp gates only where different tokens pick different experts, i.e. where routing reads the
    input (Switch-style load balancing in entropy form; docs/design.md §5.2). The model's loss weighs it by
    model.balance_weight."""
    mean = gate_probs.float().reshape(-1, gate_probs.shape[-1]).mean(0)               # (E,)
    return math.log(mean.numel()) + (mean * mean.clamp_min(1e-12).log()).sum()


def moe_output(output: torch.Tensor, probs: torch.Tensor, selected: torch.Tensor,
               entropy: torch.Tensor) -> MoEOutput:
    """MoEOutput with its balance term computed from `probs` (every MoE layer builds its result here)."""
    return MoEOutput(output, probs, selected, entropy, routing_imbalance(probs))


def concat_moe_outputs(first: MoEOutput, second: MoEOutput) -> MoEOutput:
    """The MoEOutput of tokens [first ; second] along T, as if one call had routed them all; a batch-1 `first`
    (the shared prompt) is broadcast over the batch. The entropy is the mean over all B x T tokens and the
    imbalance is recomputed from the concatenated gates (a mean gate does not split into the parts' terms)."""
    B = second.output.shape[0]
    T1, T2 = first.output.shape[1], second.output.shape[1]
    cat = lambda a, b: torch.cat([a.expand(B, *a.shape[1:]), b], dim=1)
    entropy = (first.entropy * T1 + second.entropy * T2) / (T1 + T2)
    return moe_output(cat(first.output, second.output), cat(first.gate_probs, second.gate_probs),
                      cat(first.selected, second.selected), entropy)


# ----------------------------------------------------------------------------------------------------------
# the gate (shared by both formulations)

class RoleGate(nn.Module):
    """Per (token, expert) score: MLP([x; h; k_e]) -> scalar, with x the token's hidden state, h the history
    summary and k_e the role key (paper Sec. 4.2, history-aware routing of Sec. 4.3).

    The first layer is one Linear over the concatenation, as in the reference, but `forward` applies it
    separably: W [x; h; k] = W_x x + W_h h + W_k k, with W_x x computed once per token, W_h h once per sample
    and W_k k once per expert, then broadcast-added. That avoids materialising (B, T, E, D + D_h + D_key).
    """

    def __init__(self, hidden_dim: int, history_dim: int, key_dim: int, gate_hidden: int):
        super().__init__()
        self.dims = (hidden_dim, history_dim, key_dim)
        self.proj_in = nn.Linear(hidden_dim + history_dim + key_dim, gate_hidden)   # over [x; h; k]
        self.act = nn.ReLU()
        self.proj_out = nn.Linear(gate_hidden, 1)

    def forward(self, hidden: torch.Tensor, history: torch.Tensor, role_keys: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, D), history (B, D_h), role_keys (E, D_key) -> logits (B, T, E)."""
        d, d_h, _ = self.dims
        w = self.proj_in.weight                                            # (G, D + D_h + D_key)
        token_part = F.linear(hidden, w[:, :d])                            # (B, T, G)
        history_part = F.linear(history, w[:, d:d + d_h])                  # (B, G)
        role_part = F.linear(role_keys, w[:, d + d_h:], self.proj_in.bias)  # (E, G)
        pre = token_part[:, :, None, :] + history_part[:, None, None, :] + role_part  # (B, T, E, G)
        return self.proj_out(self.act(pre)).squeeze(-1)                   # (B, T, E)

    def forward_concatenated(self, hidden: torch.Tensor, history: torch.Tensor,
                             role_keys: torch.Tensor) -> torch.Tensor:
        """The same logits from the explicit concatenation (B, T, E, D + D_h + D_key): the reference form."""
        b, t, _ = hidden.shape
        e = role_keys.shape[0]
        features = torch.cat([
            hidden[:, :, None, :].expand(b, t, e, -1),
            history[:, None, None, :].expand(b, t, e, -1),
            role_keys[None, None].expand(b, t, e, -1),
        ], dim=-1)                                                          # (B, T, E, D + D_h + D_key)
        return self.proj_out(self.act(self.proj_in(features))).squeeze(-1)  # (B, T, E)


def _check_inputs(hidden: torch.Tensor, history: torch.Tensor, dims: tuple[int, int, int]) -> None:
    d, d_h, _ = dims
    if hidden.dim() != 3 or hidden.shape[-1] != d:
        raise ConfigError(f"personalized MoE: hidden must be (B, T, {d}), got {tuple(hidden.shape)}")
    if history.shape != (hidden.shape[0], d_h):
        raise ConfigError(f"personalized MoE: history must be (B={hidden.shape[0]}, history_dim={d_h}), "
                          f"got {tuple(history.shape)}")


def _check_role_keys(role_keys: torch.Tensor, cfg: PersonalizedMoEConfig) -> None:
    if role_keys.dim() != 2 or role_keys.shape[0] != cfg.num_experts:
        raise ConfigError(f"personalized MoE: role_keys must be (num_experts={cfg.num_experts}, D_key), "
                          f"got {tuple(role_keys.shape)}")


# ----------------------------------------------------------------------------------------------------------
# the efficient layer: one shared frozen FFN

class PersonalizedMoE(nn.Module):
    """Drop-in replacement of a decoder layer's LlamaMLP by 11 LoRA role experts over one shared frozen FFN.

    base_mlp     the layer's LlamaMLP; kept (not copied) and frozen
    history_dim  width of the history summary h (176 in the reference: the TCN's channels)
    role_keys    (E, D_key) fixed role keys (mean-pooled input embeddings of the role descriptions); a buffer
    cfg          PersonalizedMoEConfig

    Why hand-written and not peft: peft adapts one Linear with one or several named adapters (the active ones
    added alike for every token), but it does not compute a per-token, gate-weighted mixture of adapters that
    share one base down projection, which is what this layer is. With a single expert (gate weight exactly 1)
    the layer is peft's LoRA on gate/up/down; tests/test_peft_lora.py proves that equality (outputs, gradients).
    """

    def __init__(self, base_mlp: nn.Module, history_dim: int, role_keys: torch.Tensor,
                 cfg: PersonalizedMoEConfig | None = None):
        super().__init__()
        self.cfg = cfg = (cfg or PersonalizedMoEConfig()).validate()
        _check_role_keys(role_keys, cfg)
        self.base_mlp = base_mlp.requires_grad_(False)
        d = base_mlp.gate_proj.in_features
        f = base_mlp.gate_proj.out_features
        e, r = cfg.num_experts, cfg.lora_r
        self.hidden_dim, self.ffn_dim = d, f
        self.scaling = cfg.lora_alpha / cfg.lora_r
        self.register_buffer("role_keys", role_keys.detach().clone().to(base_mlp.gate_proj.weight.dtype))
        self.gate = RoleGate(d, history_dim, role_keys.shape[1], cfg.gate_hidden)

        # Stacked LoRA factors, laid out so that x @ A @ B is the update (A: (in, r), B: (r, out)).
        # A as nn.Linear / peft initialise it (kaiming-uniform, a=sqrt(5): U(-1/sqrt(in), 1/sqrt(in))), B zero,
        # so every expert starts as exactly the frozen FFN.
        def lora_pair(d_in: int, d_out: int) -> tuple[nn.Parameter, nn.Parameter]:
            bound = 1.0 / math.sqrt(d_in)
            a = torch.empty(e, d_in, r).uniform_(-bound, bound)
            return nn.Parameter(a), nn.Parameter(torch.zeros(e, r, d_out))

        dtype = base_mlp.gate_proj.weight.dtype
        self.lora_A_gate, self.lora_B_gate = lora_pair(d, f)    # (E, D, r), (E, r, F)
        self.lora_A_up, self.lora_B_up = lora_pair(d, f)        # (E, D, r), (E, r, F)
        self.lora_A_down, self.lora_B_down = lora_pair(f, d)    # (E, F, r), (E, r, D)
        self.to(device=base_mlp.gate_proj.weight.device, dtype=dtype)
        self.lora_dropout = nn.Dropout(cfg.lora_dropout)

    def gate_logits(self, hidden: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        """(B, T, D), (B, D_h) -> (B, T, E) expert scores before the softmax."""
        return self.gate(hidden, history.to(hidden.dtype), self.role_keys.to(hidden.dtype))

    def gate_logits_concatenated(self, hidden: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        """The same scores via the explicit concatenation (slower; for tests)."""
        return self.gate.forward_concatenated(hidden, history.to(hidden.dtype), self.role_keys.to(hidden.dtype))

    def forward(self, hidden: torch.Tensor, history: torch.Tensor) -> MoEOutput:
        """hidden (B, T, D): the FFN's input (after post_attention_layernorm); history (B, D_h): the router's h."""
        _check_inputs(hidden, history, self.gate.dims)
        probs, entropy = gate_entropy(self.gate_logits(hidden, history))          # (B, T, E), ()
        selected = route(probs.detach(), self.cfg)                                # (B, T, E) bool
        weights = routing_weights(probs, selected, self.cfg.renormalize)          # (B, T, E)
        output = self.mix_experts(hidden, weights.to(hidden.dtype), selected)     # (B, T, D)
        return moe_output(output, probs, selected, entropy)

    def resolved_expert_compute(self, device: torch.device) -> str:
        """The formulation `expert_compute` stands for on `device` ("auto": the fastest measured there)."""
        compute = self.cfg.expert_compute
        if compute == "auto":
            return AUTO_EXPERT_COMPUTE.get(device.type, AUTO_EXPERT_COMPUTE["cpu"])
        return compute

    def mix_experts(self, hidden: torch.Tensor, weights: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
        """sum_e w_e expert_e(x) for hidden (B, T, D), weights (B, T, E), selected (B, T, E) -> (B, T, D)."""
        compute = self.resolved_expert_compute(hidden.device)
        return getattr(self, f"mix_experts_{compute}")(hidden, weights, selected)

    def mix_experts_grouped(self, hidden: torch.Tensor, weights: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
        """sum_e w_e expert_e(x) over the selected (token, expert) pairs, expert by expert (best on CPU).

        The selected pairs are grouped by expert (one host sync for the group sizes); each expert then works
        on its own tokens only. Rows are gathered per expert with `gather_row_groups`, whose backward fills
        one shared gradient buffer, and scattered back with in-place index_add_, whose backward is a gather:
        no tensor larger than (N, F) is ever made, and no (N, F) buffer is made per expert.
        """
        b, t, d = hidden.shape
        n = b * t
        x = hidden.reshape(n, d)                                   # (N, D)
        w = weights.reshape(n, -1)                                 # (N, E)
        base, s, drop = self.base_mlp, self.scaling, self.lora_dropout

        gate_base = base.gate_proj(x)                              # (N, F) once per token
        up_base = base.up_proj(x)                                  # (N, F)

        pair_token, pair_expert = selected.reshape(n, -1).nonzero(as_tuple=True)    # (P,), (P,)
        order = pair_expert.argsort(stable=True)                   # group the pairs by expert
        pair_token, pair_expert = pair_token[order], pair_expert[order]
        counts = torch.bincount(pair_expert, minlength=self.cfg.num_experts).tolist()
        experts = [e for e, count in enumerate(counts) if count > 0]
        tokens = [group for group in pair_token.split(counts) if group.numel() > 0]   # per used expert (n_e,)

        # LoRA dropout on the token inputs is drawn once per token (one mask for the gate LoRAs, one for the up
        # LoRAs) and shared by the experts of that token; the naive form draws one per expert. Each expert sees
        # the same distribution; only the correlation between experts differs, and 2 (P - N) D random draws are
        # saved. The activation inputs of the down LoRAs are per pair anyway and get their own masks.
        x_gate_groups = gather_row_groups(drop(x), *tokens)       # (n_e, D) each
        dropout_active = self.training and drop.p > 0
        x_up_groups = gather_row_groups(drop(x), *tokens) if dropout_active else x_gate_groups
        gate_groups = gather_row_groups(gate_base, *tokens)        # (n_e, F) each
        up_groups = gather_row_groups(up_base, *tokens)            # (n_e, F) each
        # unbind once: indexing a stacked parameter per expert would cost a full-size zero gradient per expert
        A_gate, B_gate, A_up, B_up, A_down, B_down = (p.unbind(0) for p in (
            self.lora_A_gate, self.lora_B_gate, self.lora_A_up, self.lora_B_up, self.lora_A_down, self.lora_B_down))

        mixed = x.new_zeros(n, self.ffn_dim)                       # (N, F)  sum_e w_e a_e
        lora_down = x.new_zeros(n, d)                              # (N, D)  sum_e w_e s B_down,e A_down,e a_e
        for e, idx, x_g, x_u, g0, u0 in zip(experts, tokens, x_gate_groups, x_up_groups, gate_groups, up_groups):
            g = torch.addmm(g0, x_g @ A_gate[e], B_gate[e], alpha=s)               # (n_e, F)  g_e
            u = torch.addmm(u0, x_u @ A_up[e], B_up[e], alpha=s)                   # (n_e, F)  u_e
            a = base.act_fn(g) * u                                                # (n_e, F)  a_e
            w_e = w[idx, e, None]                                                 # (n_e, 1)
            mixed.index_add_(0, idx, a * w_e)
            lora_down.index_add_(0, idx, (drop(a) @ A_down[e]) @ B_down[e] * (s * w_e))

        out = F.linear(mixed, base.down_proj.weight) + lora_down                  # ONE base down projection
        if base.down_proj.bias is not None:   # each expert adds the bias once: sum_e w_e b
            out = out + w.sum(dim=-1, keepdim=True) * base.down_proj.bias
        return out.reshape(b, t, d)

    def mix_experts_pairs(self, hidden: torch.Tensor, weights: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
        """The same mixture with every selected (token, expert) pair in one flat batch and no loop over
        experts: a few large kernels, for GPUs (one host sync, to count the pairs).

        The per-pair low-rank terms use block matrices: a token's low-rank codes for all E experts, (E r,),
        masked to the pair's expert, times the stacked B (E r, F). That costs E r F multiply-adds per pair and
        projection where a per-expert loop spends r F; it is cheap against the base projection's D F per
        token where D is large (3B width, 5 pairs per token: +29%), less so at SmolLM2 width (+150%).
        """
        b, t, d = hidden.shape
        n = b * t
        e_count, r = self.cfg.num_experts, self.cfg.lora_r
        x = hidden.reshape(n, d)                                                    # (N, D)
        w = weights.reshape(n, -1)                                                  # (N, E)
        base, s, drop = self.base_mlp, self.scaling, self.lora_dropout

        pair_token, pair_expert = selected.reshape(n, -1).nonzero(as_tuple=True)   # (P,), (P,)
        pair_weight = w[pair_token, pair_expert][:, None]                          # (P, 1)
        experts = torch.arange(e_count, device=x.device)
        pair_onehot = (pair_expert[:, None] == experts).to(x.dtype)                 # (P, E); F.one_hot syncs
        num_pairs = pair_token.numel()

        def stacked_in(A: torch.Tensor) -> torch.Tensor:     # (E, in, r) -> (in, E r)
            return A.permute(1, 0, 2).reshape(A.shape[1], e_count * r)

        def per_pair_low_rank(codes: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
            """codes (N, E r) of every expert -> (P, out): each pair through its own expert's B."""
            blocks = pair_onehot[..., None] * codes[pair_token].view(num_pairs, e_count, r)   # (P, E, r)
            return blocks.reshape(num_pairs, e_count * r) @ B.reshape(e_count * r, -1)

        gate_codes = s * (drop(x) @ stacked_in(self.lora_A_gate))                  # (N, E r)
        up_codes = s * (drop(x) @ stacked_in(self.lora_A_up))                      # (N, E r)
        g = base.gate_proj(x)[pair_token] + per_pair_low_rank(gate_codes, self.lora_B_gate)   # (P, F)
        u = base.up_proj(x)[pair_token] + per_pair_low_rank(up_codes, self.lora_B_up)         # (P, F)
        a = base.act_fn(g) * u                                                      # (P, F)  a_e per pair
        mixed = x.new_zeros(n, self.ffn_dim).index_add_(0, pair_token, a * pair_weight)   # (N, F)

        down_codes = (drop(a) @ stacked_in(self.lora_A_down)).view(num_pairs, e_count, r)  # (P, E, r)
        down_codes = down_codes * ((s * pair_weight) * pair_onehot)[..., None]     # only the pair's expert
        down_codes = x.new_zeros(n, e_count * r).index_add_(0, pair_token, down_codes.reshape(num_pairs, -1))
        lora_down = down_codes @ self.lora_B_down.reshape(e_count * r, d)          # (N, D)

        out = F.linear(mixed, base.down_proj.weight) + lora_down                  # ONE base down projection
        if base.down_proj.bias is not None:
            out = out + w.sum(dim=-1, keepdim=True) * base.down_proj.bias
        return out.reshape(b, t, d)


class _GatherRowGroups(torch.autograd.Function):
    """Rows of `source` for several index groups; the backward sums every group into ONE zero buffer (autograd's
    own index_select would allocate and add a full-size gradient per group)."""

    @staticmethod
    def forward(ctx, source: torch.Tensor, *groups: torch.Tensor):
        ctx.save_for_backward(*groups)
        ctx.source_shape = source.shape
        return tuple(source.index_select(0, group) for group in groups)

    @staticmethod
    def backward(ctx, *grads):
        groups = ctx.saved_tensors
        grad_source = None
        if ctx.needs_input_grad[0]:
            reference = next(g for g in grads if g is not None)
            grad_source = reference.new_zeros(ctx.source_shape)
            for group, grad in zip(groups, grads):
                if grad is not None:
                    grad_source.index_add_(0, group, grad)
        return (grad_source, *(None for _ in groups))


def gather_row_groups(source: torch.Tensor, *groups: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(source[group_1], source[group_2], ...) for a 2-d source, with a single-buffer backward."""
    if not groups:
        return ()
    return _GatherRowGroups.apply(source, *groups)


# ----------------------------------------------------------------------------------------------------------
# the naive reference formulation (tests and benchmark)

class LoRALinear(nn.Module):
    """A frozen Linear plus a trainable low-rank update: base(x) + s * B(A(dropout(x)))."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout)
        self.scaling = alpha / r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scaling * self.lora_B(self.lora_A(self.dropout(x)))


class LoRAExpertFFN(nn.Module):
    """One role expert as the reference builds it: a private copy of the FFN with LoRA on its projections."""

    def __init__(self, base_mlp: nn.Module, r: int, alpha: float, dropout: float):
        super().__init__()
        ffn = copy.deepcopy(base_mlp)
        self.gate_proj = LoRALinear(ffn.gate_proj, r, alpha, dropout)
        self.up_proj = LoRALinear(ffn.up_proj, r, alpha, dropout)
        self.down_proj = LoRALinear(ffn.down_proj, r, alpha, dropout)
        self.act_fn = ffn.act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class NaivePersonalizedMoE(nn.Module):
    """The reference formulation: E deep copies of the FFN, each with its own LoRA, every expert run on every
    token, output = sum_e w_e expert_e(x). Same gate and routing rule as `PersonalizedMoE` (its gate in the
    concatenated form); same function, ~E times the FFN weights and compute."""

    def __init__(self, base_mlp: nn.Module, history_dim: int, role_keys: torch.Tensor,
                 cfg: PersonalizedMoEConfig | None = None):
        super().__init__()
        self.cfg = cfg = (cfg or PersonalizedMoEConfig()).validate()
        _check_role_keys(role_keys, cfg)
        d = base_mlp.gate_proj.in_features
        self.register_buffer("role_keys", role_keys.detach().clone().to(base_mlp.gate_proj.weight.dtype))
        self.gate = RoleGate(d, history_dim, role_keys.shape[1], cfg.gate_hidden).to(base_mlp.gate_proj.weight)
        self.experts = nn.ModuleList(
            LoRAExpertFFN(base_mlp, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout) for _ in range(cfg.num_experts))

    @classmethod
    def from_efficient(cls, moe: PersonalizedMoE) -> "NaivePersonalizedMoE":
        """A naive copy holding exactly the efficient module's weights (gate, role keys, every LoRA factor)."""
        naive = cls(moe.base_mlp, moe.gate.dims[1], moe.role_keys, moe.cfg)
        naive.gate.load_state_dict(moe.gate.state_dict())
        with torch.no_grad():
            for e, expert in enumerate(naive.experts):
                for proj in ("gate", "up", "down"):
                    lora = getattr(expert, f"{proj}_proj")
                    lora.lora_A.weight.copy_(getattr(moe, f"lora_A_{proj}")[e].T)   # (r, in)
                    lora.lora_B.weight.copy_(getattr(moe, f"lora_B_{proj}")[e].T)   # (out, r)
        return naive.train(moe.training)

    def forward(self, hidden: torch.Tensor, history: torch.Tensor) -> MoEOutput:
        _check_inputs(hidden, history, self.gate.dims)
        logits = self.gate.forward_concatenated(hidden, history.to(hidden.dtype), self.role_keys.to(hidden.dtype))
        probs, entropy = gate_entropy(logits)                                        # (B, T, E), ()
        selected = route(probs.detach(), self.cfg)                                   # (B, T, E)
        weights = routing_weights(probs, selected, self.cfg.renormalize).to(hidden.dtype)
        expert_outputs = torch.stack([expert(hidden) for expert in self.experts], dim=-2)   # (B, T, E, D)
        output = (weights[..., None] * expert_outputs).sum(dim=-2)                   # (B, T, D)
        return moe_output(output, probs, selected, entropy)
