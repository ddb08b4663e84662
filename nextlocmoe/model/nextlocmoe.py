"""NextLocMoE: the whole model, assembled top-down like the paper's architecture figure (paper Sec. 4).

    history records S_h (B, 40) --TokenFeatures--> (B, 40, 176) --HistoryRouter (causal TCN)--> h (B, 176)
            |                                          +--history_projection--> 40 history tokens (B, 40, D)
    current records S_c (B, 5)  --TokenFeatures--> (B, 5, 176)
            |     coordinates replaced by LocationSemanticsMoE([h ; features])  (Sec. 4.1)
            +--current_projection--> 5 current tokens (B, 5, D)
    [task prompt tokens ; 40 history tokens ; 5 current tokens]                   causal self-attention
        --> frozen LLaMA decoder layers; at layers 8 and 10 the FFN is a PersonalizedMoE(token, h) (Sec. 4.2)
        --> final RMSNorm (float32) on the last token = the prediction state
        --> RegressionHead: (x, y) in metres, matched to places by a KD-tree (paper, Sec. 4.4)
            or RankingHead: a score per candidate place (this project's extension)

The transformer layers are transformers' own LlamaDecoderLayer modules, called in our loop so that the
Personalized MoE can receive h; attention, rotary embeddings and the causal mask are the library's.

Two switches turn the same class into the comparisons of the experiments: `dense_lora=True` with the MoEs
and the router off is the NextLocLLM-style baseline (a peft LoRA on every dense FFN instead of role experts), and
`backbone_init="random"` keeps the backbone's shapes and tokenizer but re-draws its weights (the
pretrained-vs-random ablation).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import LlamaForCausalLM
from transformers.masking_utils import create_causal_mask

try:   # the NextLocLLM-style baseline's LoRA (add_dense_lora); the rest of the model runs without peft
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer
except ImportError:   # e.g. a lent GPU machine's image without it: then only dense_lora=True fails, clearly
    LoraConfig = inject_adapter_in_model = None
    LoraLayer = ()    # isinstance(m, ()) is False

from ..data.schema import FUNCTIONS
from ..errors import ConfigError, DataError
from .backbone import Backbone, embed_text, embed_tokens, freeze_like_paper, load_backbone
from .config import ModelConfig
from .features import TokenFeatures, TokenProjections
from .heads import RankingHead, RegressionHead, final_norm_float32
from .history_router import HistoryRouter
from .location_moe import LocationSemanticsMoE
from .personalized_moe import MoEOutput, PersonalizedMoE
from .pointer import CopyMixture
from .texts import FUNCTION_DESCRIPTIONS, ROLE_DESCRIPTIONS, TASK_PROMPT, role_names

BATCH_KEYS = ("hist_xy", "hist_weekday", "hist_hour", "hist_duration",
              "cur_xy", "cur_weekday", "cur_hour", "cur_duration")
POINTER_KEYS = ("hist_location", "cur_location")   # the window's place ids, read by the copy mixture only
WINDOW_RECORDS = 45   # S_h + S_c of the paper (40 + 5): the longest window the copy mixture's biases cover by default


class ModelOutput(NamedTuple):
    pred_xy: torch.Tensor | None         # (B, 2) float32 metres (regression head), else None
    scores: torch.Tensor | None          # (B, L) float32 candidate scores (ranking head), else None
    location_moe: MoEOutput | None       # Location Semantics MoE on the current tokens, None when switched off
    personalized: list[MoEOutput]        # one per Personalized MoE layer, in layer order ([] when switched off)
    history: torch.Tensor                # (B, 176) history summary h (zeros without the history router)


def causal_attention_mask(config, inputs_embeds: torch.Tensor, position_ids: torch.Tensor):
    """transformers' own causal mask for this config's attention implementation (None means sdpa's is_causal).

    The helper's keywords changed across transformers versions (input_embeds -> inputs_embeds, cache_position
    dropped); we pass whichever this version takes.
    """
    params = inspect.signature(create_causal_mask).parameters
    kwargs: dict[str, Any] = dict(config=config, attention_mask=None, past_key_values=None, position_ids=position_ids)
    kwargs["inputs_embeds" if "inputs_embeds" in params else "input_embeds"] = inputs_embeds
    if "cache_position" in params:
        kwargs["cache_position"] = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)
    return create_causal_mask(**kwargs)


def distinct_text_embeddings(embeddings: torch.Tensor) -> torch.Tensor:
    """(N, D) mean-pooled description embeddings -> the same with their common part removed, unit RMS overall.

    Mean-pooling the input embeddings of several paragraphs of ordinary English gives vectors dominated by
    what the paragraphs share (SmolLM2: cosine similarity ~0.9 between any two of our function or role
    descriptions). Used raw, as in the reference, the five function experts start almost identical and the
    role keys barely separate the experts in the P-MoE gate. Subtracting the mean over the set keeps what
    distinguishes each description; one common scale (not per vector) keeps their relative lengths.
    With a single description there is nothing to contrast, and only the scale is set.
    """
    embeddings = embeddings.float()
    if embeddings.shape[0] > 1:
        embeddings = embeddings - embeddings.mean(dim=0, keepdim=True)
    return embeddings / embeddings.pow(2).mean().sqrt().clamp_min(1e-12)


class PrefixCache:
    """The smallest cache transformers' attention accepts: `update(keys, values, layer_idx)`.

    While `recording`, it stores the prompt's keys/values of each layer (batch 1) and returns them unchanged;
    afterwards it returns them prepended, broadcast over the batch, to the trajectory's own keys/values.
    """

    def __init__(self) -> None:
        self.recording = True
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.recording:
            self.layers[layer_idx] = (keys, values)                                     # (1, kv_heads, P, hd)
            return keys, values
        prompt_keys, prompt_values = self.layers[layer_idx]
        B = keys.shape[0]
        return (torch.cat([prompt_keys.expand(B, -1, -1, -1), keys], dim=2),          # (B, kv_heads, P + S, hd)
                torch.cat([prompt_values.expand(B, -1, -1, -1), values], dim=2))


def routing_imbalance(gate_probs: torch.Tensor) -> torch.Tensor:
    """ln E - H(mean gate): 0 when the batch's tokens use the E experts equally on average, ln E when they
    all put their mass on the same one. gate_probs (B, T, E) -> () float32.

    The paper's entropy term H (mean over tokens of each gate's entropy) sharpens each token's gate; on its
    own it is minimised fastest by one expert for every token (a shared bias), which is what the gates here
    did within ten steps. H + imbalance = ln E - (H(mean gate) - H) = ln E - I(token; expert): penalising both
    rewards sharp gates only where different tokens pick different experts, i.e. where routing reads the
    input (Switch-style load balancing in entropy form; docs/design.md §5.2)."""
    mean = gate_probs.float().reshape(-1, gate_probs.shape[-1]).mean(0)               # (E,)
    return math.log(mean.numel()) + (mean * mean.clamp_min(1e-12).log()).sum()


def concat_moe_outputs(first: MoEOutput, second: MoEOutput) -> MoEOutput:
    """The MoEOutput of tokens [first ; second] along T, as if one call had routed them all; a batch-1 `first`
    (the shared prompt) is broadcast over the batch, and the entropy is the mean over all B x T tokens."""
    B = second.output.shape[0]
    T1, T2 = first.output.shape[1], second.output.shape[1]
    cat = lambda a, b: torch.cat([a.expand(B, *a.shape[1:]), b], dim=1)
    entropy = (first.entropy * T1 + second.entropy * T2) / (T1 + T2)
    return MoEOutput(cat(first.output, second.output), cat(first.gate_probs, second.gate_probs),
                     cat(first.selected, second.selected), entropy)


class NextLocMoE(nn.Module):
    """LLaMA backbone + Location Semantics MoE + Personalized MoE + history-aware router (paper Sec. 4)."""

    share_prompt_prefix = True  # run the prompt once per batch where that is exact (see run_backbone)

    def __init__(self, cfg: ModelConfig, backbone: Backbone, norm_stats: Any,
                 candidates_xy: Any = None, candidate_function: Any = None, window_records: int = WINDOW_RECORDS):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.backbone_name, self.backbone_source = backbone.name, backbone.source

        # --- backbone: frozen like the paper (embeddings, attention, FFNs); RMSNorms stay trainable
        freeze_like_paper(backbone.model)
        self.llama = backbone.model.model                        # LlamaModel: embed_tokens, layers, norm, rotary_emb
        d_model = self.llama.config.hidden_size
        num_layers = len(self.llama.layers)
        bad = [i for i in cfg.pmoe_layers if i >= num_layers] if cfg.use_personalized_moe else []
        if bad:
            raise ConfigError(f"model.pmoe_layers={list(cfg.pmoe_layers)}: layers {bad} do not exist in backbone "
                              f"'{backbone.name}' truncated to {num_layers} layers")
        self.backbone_dtype = self.llama.embed_tokens.weight.dtype

        # --- texts through the frozen input-embedding table (no transformer pass)
        if cfg.use_prompt:
            self.register_buffer("prompt_embeddings", embed_tokens(backbone, TASK_PROMPT), persistent=False)  # (P, D)
        else:
            self.prompt_embeddings = None

        # --- token features, history-aware router, Location Semantics MoE (Sec. 4.1, 4.3)
        self.token_features = TokenFeatures(cfg.coord_dim, cfg.time_dim)
        self.history_router = (HistoryRouter(cfg.token_dim, cfg.tcn_channels, cfg.tcn_kernel_size, cfg.tcn_dropout)
                               if cfg.use_history_router else None)
        self.location_moe = None
        if cfg.use_location_moe:
            descriptions = torch.stack([embed_text(backbone, FUNCTION_DESCRIPTIONS[f]) for f in FUNCTIONS])  # (5, D)
            if cfg.center_text_embeddings:
                descriptions = distinct_text_embeddings(descriptions)
            self.location_moe = LocationSemanticsMoE(descriptions, cfg.history_dim, cfg.token_dim, cfg.coord_dim,
                                                     cfg.location_gate_hidden, cfg.location_top_k, seed=cfg.seed)
        self.token_projections = TokenProjections(cfg.token_dim, d_model)

        # --- Personalized MoE replacing the FFN of the chosen layers (Sec. 4.2); the base FFN is shared, frozen
        self.personalized_moe = nn.ModuleDict()
        if cfg.use_personalized_moe:
            roles = role_names(cfg.personalized.num_experts)
            role_keys = torch.stack([embed_text(backbone, ROLE_DESCRIPTIONS[r]) for r in roles])  # (E, D)
            if cfg.center_text_embeddings:
                role_keys = distinct_text_embeddings(role_keys)
            for i in sorted(cfg.pmoe_layers):
                self.personalized_moe[str(i)] = PersonalizedMoE(self.llama.layers[i].mlp, cfg.history_dim,
                                                                role_keys, cfg.personalized)
        self.role_names = role_names(cfg.personalized.num_experts) if cfg.use_personalized_moe else ()

        # --- candidates (needed by the ranking head and by predict_scores of the regression head)
        self.norm_stats = {k: float(norm_stats[k] if isinstance(norm_stats, dict) else getattr(norm_stats, k))
                           for k in ("x_mean", "x_std", "y_mean", "y_std")}
        if not (self.norm_stats["x_std"] > 0 and self.norm_stats["y_std"] > 0):
            raise DataError(f"norm_stats x_std and y_std must be > 0 (metres), got {self.norm_stats}")
        self.candidates_xy = None if candidates_xy is None else self._check_candidates(candidates_xy)  # (L, 2) float64
        self.candidate_function = None
        if candidate_function is not None:
            self.candidate_function = np.asarray(candidate_function, dtype=np.int64)
            num_candidates = 0 if self.candidates_xy is None else len(self.candidates_xy)
            if self.candidate_function.shape != (num_candidates,):
                raise DataError(f"candidate_function must have shape (L,) = ({num_candidates},) matching "
                                f"candidates_xy, got {self.candidate_function.shape}")
            if ((self.candidate_function < -1) | (self.candidate_function >= len(FUNCTIONS))).any():
                raise DataError(f"candidate_function must hold indices into FUNCTIONS (0..{len(FUNCTIONS) - 1}) "
                                "or -1 for unknown")

        # --- head (Sec. 4.4)
        if cfg.head == "regression":
            self.head = RegressionHead(d_model, norm_stats)
        else:
            if self.candidates_xy is None or self.candidate_function is None:
                raise ConfigError("model.head='ranking' needs candidates_xy (L, 2) and candidate_function (L,)")
            self.head = RankingHead(d_model, self._zscore(self.candidates_xy), torch.from_numpy(self.candidate_function.copy()),
                                    cfg.coord_dim, cfg.ranking_dim, cfg.ranking_fourier_features,
                                    cfg.ranking_fourier_max_scale, cfg.ranking_id_embedding, seed=cfg.seed)
        # the copy mixture over the window's places (ours, model/pointer.py); its start = the most frequent place,
        # which needs the generator to start at the popularity prior alone: a zero query (like LoRA's B = 0)
        self.pointer = None
        if cfg.head == "ranking" and cfg.ranking_pointer:
            self.pointer = CopyMixture(d_model, d_model, window_records, cfg.pointer_dim)
            with torch.no_grad():
                self.head.query.weight.zero_()
                self.head.query.bias.zero_()

        # --- NextLocLLM-style baseline: a LoRA on every dense FFN (built last, so that every other module draws
        # the same random numbers with and without it)
        if cfg.dense_lora:
            add_dense_lora(self.llama, cfg.personalized.lora_r, cfg.personalized.lora_alpha,
                           cfg.personalized.lora_dropout)

        # Everything inside the backbone runs in the backbone's dtype; new modules outside it stay float32.
        self.personalized_moe.to(self.backbone_dtype)

    # ------------------------------------------------------------------------------------------------------
    # inputs

    def _check_candidates(self, candidates_xy: Any) -> np.ndarray:
        xy = np.asarray(candidates_xy, dtype=np.float64)
        if xy.ndim != 2 or xy.shape[1] != 2 or len(xy) == 0 or not np.isfinite(xy).all():
            raise DataError(f"candidates_xy must be a finite (L, 2) array of metres with L >= 1, got shape {xy.shape}")
        return xy

    def _zscore(self, xy: np.ndarray) -> torch.Tensor:
        s = self.norm_stats
        z = np.stack([(xy[:, 0] - s["x_mean"]) / s["x_std"], (xy[:, 1] - s["y_mean"]) / s["y_std"]], axis=1)
        return torch.from_numpy(z).float()                                         # (L, 2)

    @property
    def device(self) -> torch.device:
        return self.llama.embed_tokens.weight.device

    def embed_inputs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, MoEOutput | None]:
        """Batch -> (token sequence (B, P + H + C, D) float32, h (B, 176), Location MoE output or None)."""
        missing = [k for k in BATCH_KEYS if k not in batch]
        if missing:
            raise DataError(f"batch lacks keys {missing}; expected {list(BATCH_KEYS)}")
        b = {k: batch[k].to(self.device) for k in BATCH_KEYS}
        cfg = self.cfg

        history_features = self.token_features(b["hist_xy"], b["hist_weekday"], b["hist_hour"],
                                               b["hist_duration"])                       # (B, H, 176)
        B = history_features.shape[0]
        if self.history_router is not None:
            h = self.history_router(history_features)                                   # (B, 176)
        else:   # ablation: the gates see no history summary
            h = history_features.new_zeros(B, cfg.history_dim)                          # (B, 176)

        current_features = self.token_features(b["cur_xy"], b["cur_weekday"], b["cur_hour"],
                                               b["cur_duration"])                       # (B, C, 176)
        location = None
        if self.location_moe is not None:
            shared = current_features[..., :cfg.coord_dim]                              # (B, C, 128)
            location = self.location_moe(b["cur_xy"], h, current_features, shared)
            current_features = torch.cat([location.output, current_features[..., cfg.coord_dim:]], dim=-1)

        tokens = self.token_projections(history_features, current_features)             # (B, H + C, D)
        if self.prompt_embeddings is not None:
            prompt = self.prompt_embeddings.to(tokens.dtype).expand(B, -1, -1)          # (B, P, D)
            tokens = torch.cat([prompt, tokens], dim=1)                                 # (B, P + H + C, D)
        return tokens, h, location

    # ------------------------------------------------------------------------------------------------------
    # backbone

    def run_backbone(self, tokens: torch.Tensor, history: torch.Tensor) -> tuple[torch.Tensor, list[MoEOutput]]:
        """(B, T, D) input embeddings, h (B, 176) -> hidden states (B, T, D) BEFORE the final norm, P-MoE outputs.

        Shared prompt prefix: the prompt tokens attend only to each other (causal mask), so until something
        specific to a sample reaches them their hidden states are the same for every sample. We then run the
        prompt once (batch 1) and let the trajectory tokens attend to its cached keys/values: the same function
        (tested), at 45 instead of P + 45 tokens per sample in those layers.
          * model.prompt_reads_history=True (paper): the prompt tokens' P-MoE gates read the sample's h, so the
            prompt is shared only up to the first P-MoE layer (SmolLM2, P-MoE at 8: 8 of 12 layers);
          * model.prompt_reads_history=False (ours, docs/design.md §4): the prompt tokens route with h = 0, the
            prompt is the same for every sample through ALL layers and one prompt cache serves the batch.
        With several processes the returned prompt rows are the broadcast batch-1 states.
        """
        x = tokens.to(self.backbone_dtype)
        B, T, _ = x.shape
        P = self.prompt_length
        if not P:
            shared = 0
        elif self.cfg.prompt_reads_history:
            shared = min((int(i) for i in self.personalized_moe), default=len(self.llama.layers))
        else:
            shared = len(self.llama.layers)
        personalized: list[MoEOutput] = []
        if shared > 0 and B > 1 and self.share_prompt_prefix:
            x, personalized = self._run_shared_prefix(x, P, shared, history)          # (B, T, D) at layer `shared`
        else:
            shared = 0
        position_ids = torch.arange(T, device=x.device)[None]                          # (1, T)
        position_embeddings = self.llama.rotary_emb(x, position_ids=position_ids)       # (cos, sin), each (1, T, hd)
        mask = causal_attention_mask(self.llama.config, x, position_ids)
        for i, layer in enumerate(self.llama.layers):
            if i < shared:
                continue
            moe = self.personalized_moe[str(i)] if str(i) in self.personalized_moe else None
            if moe is None:
                out = layer(x, attention_mask=mask, position_ids=position_ids, position_embeddings=position_embeddings)
                x = out[0] if isinstance(out, tuple) else out
                continue
            # the decoder layer, spelled out so the FFN can be the Personalized MoE reading h
            attention, _ = layer.self_attn(hidden_states=layer.input_layernorm(x), attention_mask=mask,
                                           position_ids=position_ids, position_embeddings=position_embeddings)
            x = x + attention                                                           # (B, T, D)
            moe_out = self._personalized_ffn(moe, layer.post_attention_layernorm(x), history, P)
            x = x + moe_out.output                                                      # (B, T, D)
            personalized.append(moe_out)
        return x, personalized

    @property
    def prompt_length(self) -> int:
        return 0 if self.prompt_embeddings is None else int(self.prompt_embeddings.shape[0])

    def _personalized_ffn(self, moe: PersonalizedMoE, hidden: torch.Tensor, history: torch.Tensor,
                          P: int) -> MoEOutput:
        """The P-MoE on (B, T, D) FFN inputs; with prompt_reads_history=False the first P (prompt) tokens route
        with h = 0 and the rest with the sample's h."""
        if not P or self.cfg.prompt_reads_history:
            return moe(hidden, history.to(hidden.dtype))
        B = hidden.shape[0]
        prompt = moe(hidden[:, :P], history.new_zeros(B, history.shape[-1]).to(hidden.dtype))
        return concat_moe_outputs(prompt, moe(hidden[:, P:], history.to(hidden.dtype)))

    def _run_shared_prefix(self, x: torch.Tensor, P: int, shared: int,
                           history: torch.Tensor) -> tuple[torch.Tensor, list[MoEOutput]]:
        """Layers [0, shared): the prompt x[:1, :P] once, the trajectory x[:, P:] attending to its keys/values.

        A P-MoE layer among them (prompt_reads_history=False only) runs the prompt's FFN with h = 0 and the
        trajectory's with the sample's h; its MoEOutput covers all P + S tokens, the prompt rows broadcast.
        """
        B, T, _ = x.shape
        S = T - P
        prompt, trajectory = x[:1, :P], x[:, P:]                                        # (1, P, D), (B, S, D)
        pos_p = torch.arange(P, device=x.device)[None]                                  # (1, P)
        pos_s = torch.arange(P, T, device=x.device)[None]                               # (1, S)
        rope_p = self.llama.rotary_emb(prompt, position_ids=pos_p)
        rope_s = self.llama.rotary_emb(trajectory, position_ids=pos_s)
        full_mask = causal_attention_mask(self.llama.config, x[:1], torch.arange(T, device=x.device)[None])
        mask_p = None if full_mask is None else full_mask[..., :P, :P]
        if full_mask is None:   # sdpa's implicit causal mask: build the rectangular one (query j sees keys <= P + j)
            mask_s = torch.ones(S, T, dtype=torch.bool, device=x.device).tril(diagonal=P)[None, None]  # (1, 1, S, T)
        else:
            mask_s = full_mask[..., P:, :]                                              # (1, 1, S, T)
        cache = PrefixCache()
        personalized = []
        for i, layer in enumerate(self.llama.layers[:shared]):
            moe = self.personalized_moe[str(i)] if str(i) in self.personalized_moe else None
            if moe is None:
                cache.recording = True
                out = layer(prompt, attention_mask=mask_p, position_ids=pos_p, position_embeddings=rope_p,
                            past_key_values=cache)
                prompt = out[0] if isinstance(out, tuple) else out
                cache.recording = False
                out = layer(trajectory, attention_mask=mask_s, position_ids=pos_s, position_embeddings=rope_s,
                            past_key_values=cache)
                trajectory = out[0] if isinstance(out, tuple) else out
                continue
            cache.recording = True
            attention, _ = layer.self_attn(hidden_states=layer.input_layernorm(prompt), attention_mask=mask_p,
                                           position_ids=pos_p, position_embeddings=rope_p, past_key_values=cache)
            prompt = prompt + attention                                                  # (1, P, D)
            cache.recording = False
            attention, _ = layer.self_attn(hidden_states=layer.input_layernorm(trajectory), attention_mask=mask_s,
                                           position_ids=pos_s, position_embeddings=rope_s, past_key_values=cache)
            trajectory = trajectory + attention                                          # (B, S, D)
            zero_h = history.new_zeros(1, history.shape[-1]).to(prompt.dtype)
            moe_p = moe(layer.post_attention_layernorm(prompt), zero_h)
            moe_s = moe(layer.post_attention_layernorm(trajectory), history.to(trajectory.dtype))
            prompt, trajectory = prompt + moe_p.output, trajectory + moe_s.output
            personalized.append(concat_moe_outputs(moe_p, moe_s))
        return torch.cat([prompt.expand(B, -1, -1), trajectory], dim=1), personalized  # (B, T, D)

    # ------------------------------------------------------------------------------------------------------
    # forward, loss, predictions

    @torch.no_grad()
    def set_popularity_prior(self, counts: Any) -> None:
        """Start the ranking head's per-candidate bias at log training frequencies (no-op for regression)."""
        if self.cfg.head == "ranking":
            self.head.set_popularity_prior(torch.as_tensor(np.asarray(counts), dtype=torch.float32))

    @torch.no_grad()
    def set_copy_rate(self, rate: float) -> None:
        """Start the copy mixture's gate at `rate`, the share of targets inside their window (no-op without it)."""
        if self.pointer is not None:
            self.pointer.set_copy_rate(rate)

    def candidate_location_embeddings(self) -> torch.Tensor:
        """(L, 128) function-aware embeddings of all candidates, by the same encoder as the current tokens."""
        z = self.head.candidates_z                                                     # (L, 2)
        shared = self.token_features.coordinate_projection(z)                           # (L, 128)
        if self.location_moe is None:
            return shared
        return self.location_moe.embed_known_function(z, self.head.candidate_function, shared)

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        tokens, h, location = self.embed_inputs(batch)                                  # (B, T, D), (B, 176)
        hidden, personalized = self.run_backbone(tokens, h)                             # (B, T, D)
        state = final_norm_float32(self.llama.norm, hidden[:, -1])                      # (B, D) float32
        if self.cfg.head == "regression":
            return ModelOutput(self.head(state), None, location, personalized, h)
        scores = self.head(state, self.candidate_location_embeddings())                 # (B, L)
        if self.pointer is not None:    # log p of the copy mixture: still a score per candidate, normalised
            missing = [k for k in POINTER_KEYS if k not in batch]
            if missing:
                raise DataError(f"batch lacks keys {missing}; the ranking head's copy mixture reads the window's "
                                "place ids (Windows.batch gives them)")
            P = hidden.shape[1] - batch["hist_location"].shape[1] - batch["cur_location"].shape[1]
            keys = final_norm_float32(self.llama.norm, hidden[:, P:])                     # (B, H + C, D)
            window = torch.cat([batch["hist_location"], batch["cur_location"]], dim=1).to(scores.device)  # (B, H + C)
            scores = self.pointer(state, keys, window, scores)                            # (B, L) log p
        return ModelOutput(None, scores, location, personalized, h)

    def loss(self, out: ModelOutput, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Paper Sec. 4.4: mean distance in metres + lambda * mean P-MoE gate entropy (regression head);
        cross-entropy over candidates (+ optional expected distance) + the same entropy term (ranking head).
        Ours: the entropy term becomes lambda * (H + beta * imbalance), beta = model.balance_weight and imbalance
        = `routing_imbalance`; at beta = 1 that is lambda * (ln E - I(token; expert)), each averaged over layers.

        Returns (loss, parts): parts are detached scalars for logging.
        """
        cfg = self.cfg
        parts: dict[str, torch.Tensor] = {}
        if out.personalized:
            entropy = torch.stack([o.entropy.float() for o in out.personalized]).mean()
            imbalance = torch.stack([routing_imbalance(o.gate_probs) for o in out.personalized]).mean()
        else:
            entropy = imbalance = torch.zeros((), device=self.device)
        if cfg.head == "regression":
            target = batch["target_xy"].to(out.pred_xy.device, torch.float32)              # (B, 2) metres
            distance = torch.linalg.vector_norm(out.pred_xy - target, dim=-1)              # (B,)
            main = parts["distance_m"] = distance.mean()
            total = main + cfg.entropy_weight * (entropy + cfg.balance_weight * imbalance)
        else:
            target = batch["target_location"].to(out.scores.device)                        # (B,)
            # with the copy mixture the scores are already log p: log_softmax leaves them unchanged (NLL)
            main = parts["cross_entropy"] = F.cross_entropy(out.scores.float(), target)
            total = main + cfg.ranking_entropy_weight * (entropy + cfg.balance_weight * imbalance)
            if cfg.ranking_distance_weight > 0:
                expected = self.expected_distance(out.scores, batch["target_xy"])
                parts["expected_distance_m"] = expected
                total = total + cfg.ranking_distance_weight * expected
        parts["pmoe_entropy"] = entropy
        parts["pmoe_imbalance"] = imbalance
        if out.location_moe is not None:
            parts["location_entropy"] = out.location_moe.entropy
        parts = {"loss": total, **parts}
        return total, {k: v.detach() for k, v in parts.items()}

    def expected_distance(self, scores: torch.Tensor, target_xy: torch.Tensor) -> torch.Tensor:
        """Mean over the batch of sum_l softmax(scores)_l * ||candidate_l - target|| in metres."""
        s = self.norm_stats
        z = self.head.candidates_z                                                      # (L, 2)
        candidates = torch.stack([z[:, 0] * s["x_std"] + s["x_mean"], z[:, 1] * s["y_std"] + s["y_mean"]], dim=-1)  # (L, 2) m
        distance = torch.cdist(target_xy.to(z.device, torch.float32), candidates)      # (B, L)
        return (scores.float().softmax(-1) * distance).sum(-1).mean()

    @torch.no_grad()
    def predict_points(self, batch: dict[str, torch.Tensor]) -> np.ndarray:
        """(B, 2) float64 predicted points in metres: the regressed point, or the top-scoring candidate."""
        out = self(batch)
        if out.pred_xy is not None:
            return out.pred_xy.double().cpu().numpy()
        return self.candidates_xy[out.scores.argmax(-1).cpu().numpy()]

    @torch.no_grad()
    def predict_scores(self, batch: dict[str, torch.Tensor]) -> np.ndarray:
        """(B, L) scores over candidates, higher is better. The regression head scores a candidate by minus its
        distance in metres to the predicted point (float64), so ranking by score equals the KD-tree order."""
        out = self(batch)
        if out.scores is not None:
            return out.scores.float().cpu().numpy()
        if self.candidates_xy is None:
            raise DataError("predict_scores with the regression head needs candidates_xy given to build_model")
        points = out.pred_xy.double().cpu().numpy()                                    # (B, 2)
        return -np.sqrt(((points[:, None, :] - self.candidates_xy[None]) ** 2).sum(-1))  # (B, L)

    # ------------------------------------------------------------------------------------------------------
    # parameters

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_counts(self) -> dict[str, int]:
        """Scalar parameter counts; a parameter shared by two modules (the base FFN) is counted once."""
        def count(module: nn.Module | None, trainable_only: bool = True) -> int:
            if module is None:
                return 0
            return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
        params = list(self.parameters())
        total = sum(p.numel() for p in params)
        trainable = sum(p.numel() for p in params if p.requires_grad)
        dense_lora = sum(count(m.lora_A) + count(m.lora_B) for m in self.llama.modules() if isinstance(m, LoraLayer))
        return {
            "total": total,
            "trainable": trainable,
            "frozen": total - trainable,
            "trainable_backbone_norms": count(self.llama) - dense_lora,
            "trainable_dense_lora": dense_lora,
            "trainable_personalized_moe": count(self.personalized_moe),
            "trainable_location_moe": count(self.location_moe),
            "trainable_history_router": count(self.history_router),
            "trainable_token_features": count(self.token_features) + count(self.token_projections),
            "trainable_head": count(self.head),
        }


DENSE_LORA_TARGETS = ("gate_proj", "up_proj", "down_proj")   # the FFN projections that get a LoRA


def add_dense_lora(llama: nn.Module, r: int, alpha: float, dropout: float) -> int:
    """Put a peft LoRA on gate/up/down of every decoder layer's FFN (frozen base + trainable low-rank update).

    The NextLocLLM-style baseline's trainable capacity inside the backbone: the same adapter as one role expert
    of the Personalized MoE (rank r, scaling alpha / r, dropout on the LoRA input), on every layer instead of 11
    experts on two layers. `peft.inject_adapter_in_model` replaces each nn.Linear in place by a peft
    `lora.Linear` (the frozen original as `base_layer`, A and B as `lora_A.default` / `lora_B.default`), so the
    model's own layer loop runs unchanged. A is drawn like an nn.Linear's weight, B starts at zero: the wrapped
    model computes exactly the frozen FFN until training moves it. Returns the number of wrapped layers.
    """
    if inject_adapter_in_model is None:
        raise ConfigError("model.dense_lora=True needs the package 'peft', which is not installed; run `make install`")
    already = [name for name, module in llama.named_modules() if isinstance(module, LoraLayer)]
    if already:
        raise ConfigError(f"add_dense_lora: {already[0]} already holds a LoRA ({len(already)} such modules); "
                          "expected a backbone without adapters")
    targets = [f"layers.{i}.mlp.{name}" for i in range(len(llama.layers)) for name in DENSE_LORA_TARGETS]
    lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    requires_grad = {name: p.requires_grad for name, p in llama.named_parameters()}
    inject_adapter_in_model(lora, llama)
    # peft freezes every parameter that is not an adapter's; the backbone's own keep their flags (the RMSNorms
    # stay trainable, paper Sec. 4). The wrapped projections' weights are renamed `base_layer.weight` and stay frozen.
    for name, p in llama.named_parameters():
        if name in requires_grad:
            p.requires_grad_(requires_grad[name])
    return len(llama.layers)


def randomly_initialised(backbone: Backbone, seed: int) -> Backbone:
    """The same backbone (config, depth, tokenizer, dtype, device) with freshly drawn weights: the
    pretrained-vs-random ablation. transformers' own initialisation, seeded by `seed`."""
    if backbone.model is None:
        raise ConfigError(f"backbone '{backbone.name}' has no model to re-initialise (loaded with config_only)")
    weight = backbone.model.get_input_embeddings().weight
    torch.manual_seed(seed)
    with torch.device(weight.device):
        model = LlamaForCausalLM._from_config(backbone.model.config, dtype=weight.dtype)
    return dataclasses.replace(backbone, model=model.eval(), source=f"{backbone.source}+random-init",
                               config=model.config)


def build_model(cfg: ModelConfig, norm_stats: Any, candidates_xy: Any = None,
                candidate_function: Any = None, window_records: int = WINDOW_RECORDS) -> NextLocMoE:
    """Load the backbone named by `cfg`, freeze it like the paper and assemble NextLocMoE around it.

    norm_stats          NormStats-like object or dict with x_mean, x_std, y_mean, y_std (training split, metres)
    candidates_xy       (L, 2) metres of every candidate location (needed by the ranking head and predict_scores)
    candidate_function  (L,) index into FUNCTIONS, -1 when unknown (ranking head)
    window_records      S_h + S_c: the longest window the copy mixture (ranking head) will read
    """
    cfg.validate()
    backbone = load_backbone(cfg.backbone, cfg.num_layers, dtype=cfg.torch_dtype, seed=cfg.seed)
    if cfg.backbone_init == "random":
        backbone = randomly_initialised(backbone, cfg.seed)
    return NextLocMoE(cfg, backbone, norm_stats, candidates_xy, candidate_function, window_records)
