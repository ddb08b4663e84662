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

The transformer layers are transformers' own LlamaDecoderLayer modules, called in our loop (model/decoder.py)
so that the Personalized MoE can receive h; attention, rotary embeddings and the causal mask are the library's.

`model(batch, return_intermediates=True)` is the same forward pass that also hands back what each stage
computed (token features, h, the token sequence, the hidden states, the prediction state, the generator's
scores and the copy mixture's gate and attention), the way transformers returns `output_hidden_states`;
the one-window walkthrough (nextlocmoe/walkthrough.py) is built on it and runs no code of its own.

Two switches turn the same class into the comparisons of the experiments: `dense_lora=True` with the MoEs
and the router off is the NextLocLLM-style baseline (a peft LoRA on every dense FFN instead of role experts), and
`backbone_init="random"` keeps the backbone's shapes and tokenizer but re-draws its weights (the
pretrained-vs-random ablation).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.schema import FUNCTIONS
from ..errors import ConfigError, DataError
from .backbone import (Backbone, LoraLayer, add_dense_lora, embed_text, embed_tokens, freeze_like_paper,
                       load_backbone, randomly_initialised)
from .config import ModelConfig
from .decoder import run_decoder
from .features import NextVisitTime, TokenFeatures, TokenProjections
from .heads import RankingHead, RegressionHead, ScorerOrigin, final_norm_float32
from .history_router import HistoryRouter
from .location_moe import LocationSemanticsMoE
from .personalized_moe import MoEOutput, PersonalizedMoE
from .pointer import CopyMixture, window_places, window_visit_time
from .texts import FUNCTION_DESCRIPTIONS, ROLE_DESCRIPTIONS, TASK_PROMPT, role_names

BATCH_KEYS = ("hist_xy", "hist_weekday", "hist_hour", "hist_duration",
              "cur_xy", "cur_weekday", "cur_hour", "cur_duration")
POINTER_KEYS = ("hist_location", "cur_location")   # the window's place ids, read by the copy mixture only
NEXT_VISIT_KEYS = ("next_hour", "next_weekday")     # the next visit's time (model.next_visit_time)
VISIT_TIME_KEYS = ("hist_hour", "cur_hour", "hist_weekday", "cur_weekday") + NEXT_VISIT_KEYS   # the time terms
WINDOW_RECORDS = 45   # S_h + S_c of the paper (40 + 5): the longest window the copy mixture's biases cover by default


class ModelOutput(NamedTuple):
    pred_xy: torch.Tensor | None         # (B, 2) float32 metres (regression head), else None
    scores: torch.Tensor | None          # (B, L) float32 candidate scores (ranking head), else None
    location_moe: MoEOutput | None       # Location Semantics MoE on the current tokens, None when switched off
    personalized: list[MoEOutput]        # one per Personalized MoE layer, in layer order ([] when switched off)
    history: torch.Tensor                # (B, 176) history summary h (zeros without the history router)
    intermediates: dict[str, torch.Tensor] | None = None   # forward(..., return_intermediates=True): INTERMEDIATES


INTERMEDIATES = {   # what forward(return_intermediates=True) records, in the order it computes them
    "history_features": "(B, H, 176) token features of the history records",
    "current_features": "(B, C, 176) token features of the current records (before the Location Semantics MoE)",
    "tokens": "(B, P + H + C, D) the backbone's input sequence: prompt, history and current tokens",
    "hidden": "(B, P + H + C, D) the last decoder layer's hidden states, before the final norm",
    "state": "(B, D) float32 the prediction state: final RMSNorm of the last token, plus the next visit's time "
             "(model.next_visit_time)",
    "generator_scores": "(B, L) the ranking head's scores before the copy mixture (ranking head only)",
    "regression_origin": "(B, 2) z-scored origin of the offset regression head (the scorer's top place or the current "
                         "record's; regression head with model.regression_offset only)",
    "regression_origin_place": "(B,) the place id of that origin (model.regression_origin=scorer only)",
    "copy_gate": "(B, 1) g, the probability of copying (ranking head with the copy mixture only)",
    "copy_attention": "(B, H + C) the copy mixture's attention over the window's records (idem)",
}


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


def check_inputs(norm_stats: Any, candidates_xy: Any, candidate_function: Any
                 ) -> tuple[dict[str, float], np.ndarray | None, np.ndarray | None]:
    """The model's data-dependent inputs, checked: (norm_stats as floats, candidates (L, 2) float64 metres or
    None, candidate functions (L,) int64 index into FUNCTIONS, -1 unknown, or None)."""
    stats = {k: float(norm_stats[k] if isinstance(norm_stats, dict) else getattr(norm_stats, k))
             for k in ("x_mean", "x_std", "y_mean", "y_std")}
    if not (stats["x_std"] > 0 and stats["y_std"] > 0):
        raise DataError(f"norm_stats x_std and y_std must be > 0 (metres), got {stats}")
    xy = None
    if candidates_xy is not None:
        xy = np.asarray(candidates_xy, dtype=np.float64)
        if xy.ndim != 2 or xy.shape[1] != 2 or len(xy) == 0 or not np.isfinite(xy).all():
            raise DataError(f"candidates_xy must be a finite (L, 2) array of metres with L >= 1, got shape {xy.shape}")
    function = None
    if candidate_function is not None:
        function = np.asarray(candidate_function, dtype=np.int64)
        num_candidates = 0 if xy is None else len(xy)
        if function.shape != (num_candidates,):
            raise DataError(f"candidate_function must have shape (L,) = ({num_candidates},) matching "
                            f"candidates_xy, got {function.shape}")
        if ((function < -1) | (function >= len(FUNCTIONS))).any():
            raise DataError(f"candidate_function must hold indices into FUNCTIONS (0..{len(FUNCTIONS) - 1}) "
                            "or -1 for unknown")
    return stats, xy, function


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
        self.norm_stats, self.candidates_xy, self.candidate_function = check_inputs(norm_stats, candidates_xy,
                                                                                    candidate_function)

        # --- head (Sec. 4.4)
        self.origin = None    # the offset regression head's origin when it is the scorer's top place
        if cfg.head == "regression":
            self.head = RegressionHead(d_model, norm_stats, offset=cfg.regression_offset,
                                       offset_scale=cfg.regression_offset_scale)
            if cfg.regression_offset and cfg.regression_origin == "scorer":   # built after the head: no random draws
                if self.candidates_xy is None:
                    raise ConfigError("model.regression_origin='scorer' needs candidates_xy (L, 2): the origin is a "
                                      "candidate place (or set model.regression_origin=current)")
                self.origin = ScorerOrigin(window_records, self._zscore(self.candidates_xy),
                                           time_terms=cfg.next_visit_time)
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
            self.pointer = CopyMixture(d_model, d_model, window_records, cfg.pointer_dim,
                                       time_terms=cfg.next_visit_time)
            with torch.no_grad():
                self.head.query.weight.zero_()
                self.head.query.bias.zero_()

        # --- NextLocLLM-style baseline: a LoRA on every dense FFN (built last, so that every other module draws
        # the same random numbers with and without it)
        if cfg.dense_lora:
            add_dense_lora(self.llama, cfg.personalized.lora_r, cfg.personalized.lora_alpha,
                           cfg.personalized.lora_dropout)
        # --- the next visit's time added to the prediction state, zero at the start (ours, features.py; built last
        # for the same reason)
        self.next_visit = NextVisitTime(d_model) if cfg.next_visit_time else None

        # Everything inside the backbone runs in the backbone's dtype; new modules outside it stay float32.
        self.personalized_moe.to(self.backbone_dtype)

    # ------------------------------------------------------------------------------------------------------
    # inputs

    def _zscore(self, xy: np.ndarray) -> torch.Tensor:
        s = self.norm_stats
        z = np.stack([(xy[:, 0] - s["x_mean"]) / s["x_std"], (xy[:, 1] - s["y_mean"]) / s["y_std"]], axis=1)
        return torch.from_numpy(z).float()                                         # (L, 2)

    @property
    def device(self) -> torch.device:
        return self.llama.embed_tokens.weight.device

    def embed_inputs(self, batch: dict[str, torch.Tensor], seen: dict[str, torch.Tensor] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, MoEOutput | None]:
        """Batch -> (token sequence (B, P + H + C, D) float32, h (B, 176), Location MoE output or None).
        `seen`, when given, receives the token features (INTERMEDIATES)."""
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
        if seen is not None:
            seen.update(history_features=history_features, current_features=current_features)
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
        The decoder loop with the Personalized MoE and the shared prompt prefix: model/decoder.py."""
        return run_decoder(self.llama, self.personalized_moe, tokens.to(self.backbone_dtype), history,
                           self.prompt_length, self.cfg.prompt_reads_history, self.share_prompt_prefix)

    @property
    def prompt_length(self) -> int:
        return 0 if self.prompt_embeddings is None else int(self.prompt_embeddings.shape[0])

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

    @torch.no_grad()
    def set_time_prior(self, weights: Any) -> None:
        """Start the time terms at a tuned scorer's parameters (window_scorers.WindowWeights: sigma, same_weekday,
        same_daytype): the copy mixture's attention (ranking head) or the regression origin's vote (ScorerOrigin);
        a no-op where neither has time terms (model.next_visit_time off, or the current place as origin)."""
        if self.pointer is not None and self.pointer.time_terms:
            self.pointer.set_time_prior(weights.sigma, weights.same_weekday, weights.same_daytype)
        if self.origin is not None:
            self.origin.set_time_prior(weights.sigma, weights.same_weekday, weights.same_daytype)

    @torch.no_grad()
    def set_candidates(self, candidates_xy: Any, candidate_function: Any) -> None:
        """Point the model at another city's candidates (zero-shot transfer, docs/design.md §5): (L', 2) metres,
        z-scored with THIS model's statistics, and (L',) function indices. The target windows hold target place
        ids, so every module that maps a place id to a place follows: the regression origin (the scorer's top place)
        and the ranking head, whose candidate embeddings are computed from coordinates and function. The ranking
        head's per-candidate bias (the source city's log popularity, then trained) has no counterpart in the target,
        which has no training data: it restarts at 0, every target place equally likely a priori, as for the
        training-free scorers without their popularity prior. A learned embedding per source candidate
        (model.ranking_id_embedding) cannot be transferred at all: refused."""
        _, xy, function = check_inputs(self.norm_stats, candidates_xy, candidate_function)
        if xy is None or function is None:
            raise DataError("set_candidates needs candidates_xy (L, 2) and candidate_function (L,) of the target")
        self.candidates_xy, self.candidate_function = xy, function
        if self.origin is not None:
            self.origin.candidates_z = self._zscore(xy).to(self.origin.candidates_z.device)
        if self.cfg.head == "ranking":
            head = self.head
            if head.candidate_id_embedding is not None:
                raise ConfigError("model.ranking_id_embedding=true: the ranking head learned one embedding per "
                                  "SOURCE candidate, which has no meaning for another city's places; zero-shot "
                                  "transfer needs a head without them (false, the default)")
            device = head.candidate_bias.device
            head.candidates_z = self._zscore(xy).to(device)
            head.candidate_function = torch.from_numpy(function.copy()).to(device)
            head.candidate_bias = nn.Parameter(torch.zeros(len(xy), device=device))

    @property
    def uses_time_prior(self) -> bool:
        """Whether `set_time_prior` changes this model (the copy mixture's or the regression origin's time term)."""
        return ((self.pointer is not None and self.pointer.time_terms)
                or (self.origin is not None and self.origin.time_terms))

    def candidate_location_embeddings(self) -> torch.Tensor:
        """(L, 128) function-aware embeddings of all candidates, by the same encoder as the current tokens."""
        z = self.head.candidates_z                                                     # (L, 2)
        shared = self.token_features.coordinate_projection(z)                           # (L, 128)
        if self.location_moe is None:
            return shared
        return self.location_moe.embed_known_function(z, self.head.candidate_function, shared)

    def forward(self, batch: dict[str, torch.Tensor], return_intermediates: bool = False) -> ModelOutput:
        """The paper's figure, top to bottom. With `return_intermediates` the output also carries a dict of what
        each stage computed (INTERMEDIATES); the computation is the same either way."""
        seen: dict[str, torch.Tensor] | None = {} if return_intermediates else None
        tokens, h, location = self.embed_inputs(batch, seen)                            # (B, T, D), (B, 176)
        hidden, personalized = self.run_backbone(tokens, h)                             # (B, T, D)
        state = final_norm_float32(self.llama.norm, hidden[:, -1])                      # (B, D) float32
        if self.next_visit is not None:
            missing = [k for k in NEXT_VISIT_KEYS if k not in batch]
            if missing:
                raise DataError(f"batch lacks keys {missing}; model.next_visit_time=true reads the next visit's "
                                "hour and weekday (Windows.batch gives them; false switches them off)")
            state = self.next_visit(state, batch["next_hour"], batch["next_weekday"])    # (B, D)
        if seen is not None:
            seen.update(tokens=tokens, hidden=hidden, state=state)
        if self.cfg.head == "regression":   # the offset head starts from its origin (model.regression_origin)
            origin = None                                                               # the paper's absolute point
            if self.origin is not None:                                                 # the scorer's top place
                missing = [k for k in POINTER_KEYS + VISIT_TIME_KEYS if k not in batch]
                if missing:
                    raise DataError(f"batch lacks keys {missing}; model.regression_origin=scorer reads the window's "
                                    "places and times (Windows.batch gives them)")
                visit_time = window_visit_time(batch, state.device) if self.origin.time_terms else None
                place = self.origin.top_place(window_places(batch, state.device), visit_time)   # (B,) place ids
                origin = self.origin.candidates_z[place]                                        # (B, 2) z
                if seen is not None:
                    seen["regression_origin_place"] = place
            elif self.cfg.regression_offset:                                            # the current record's place
                origin = batch["cur_xy"][:, -1].to(state.device)                        # (B, 2) z
            if seen is not None and origin is not None:
                seen["regression_origin"] = origin
            return ModelOutput(self.head(state, origin), None, location, personalized, h, seen)
        scores = self.head(state, self.candidate_location_embeddings())                 # (B, L)
        if seen is not None:
            seen["generator_scores"] = scores
        if self.pointer is not None:    # log p of the copy mixture: still a score per candidate, normalised
            missing = [k for k in POINTER_KEYS if k not in batch]
            if missing:
                raise DataError(f"batch lacks keys {missing}; the ranking head's copy mixture reads the window's "
                                "place ids (Windows.batch gives them)")
            P = hidden.shape[1] - batch["hist_location"].shape[1] - batch["cur_location"].shape[1]
            keys = final_norm_float32(self.llama.norm, hidden[:, P:])                     # (B, H + C, D)
            window = window_places(batch, scores.device)                                  # (B, H + C)
            visit_time = window_visit_time(batch, scores.device) if self.pointer.time_terms else None
            scores = self.pointer(state, keys, window, scores, seen, visit_time)          # (B, L) log p
        return ModelOutput(None, scores, location, personalized, h, seen)

    def loss(self, out: ModelOutput, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Paper Sec. 4.4: mean distance in metres + lambda * mean P-MoE gate entropy (regression head);
        cross-entropy over candidates (+ optional expected distance) + the same entropy term (ranking head).
        Ours: the entropy term becomes lambda * (H + beta * imbalance), beta = model.balance_weight and imbalance
        the P-MoE layer's balance term (`personalized_moe.routing_imbalance`); at beta = 1 that is
        lambda * (ln E - I(token; expert)), each averaged over layers (docs/design.md §5.2).

        Returns (loss, parts): parts are detached scalars for logging.
        """
        cfg = self.cfg
        parts: dict[str, torch.Tensor] = {}
        if out.personalized:
            entropy = torch.stack([o.entropy.float() for o in out.personalized]).mean()
            imbalance = torch.stack([o.imbalance for o in out.personalized]).mean()
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
            "trainable_copy_mixture": count(self.pointer),
            "trainable_next_visit_time": count(self.next_visit),
        }


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
