"""Model configuration of NextLocMoE: one dataclass, every field citing the paper or the reference code.

`ModelConfig.to_dict()` / `ModelConfig.from_dict()` round-trip through plain dicts (YAML); the experiment
config (`nextlocmoe.config`) nests it under `model:`. `PersonalizedMoEConfig` (the role-expert layer's settings)
lives here too, under `model.personalized`; the modules import their constants from here, never the reverse.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ConfigError
from ..io import plain

# Personalized MoE (paper Sec. 4.2): the layer in personalized_moe.py reads this config; the config imports nothing
# of the model, so every module of the package can read the constants without building anything.
ROUTINGS = ("threshold", "topk")
EXPERT_COMPUTES = ("auto", "grouped", "pairs")
# what "auto" runs on each device type: the fastest in benchmarks/bench_moe.py (results/bench_moe.csv)
AUTO_EXPERT_COMPUTE = {"cpu": "grouped", "cuda": "pairs"}


@dataclass
class PersonalizedMoEConfig:
    num_experts: int = 11          # role experts: 10 named roles + "Undefined" (paper Sec. 4.2)
    routing: str = "threshold"     # "threshold" (paper default) or "topk"
    threshold: float = 0.8         # threshold routing: cumulative gate probability to reach (paper/reference: 0.8)
    max_experts: int = 5           # threshold routing: at most this many experts per token (reference: 5)
    top_k: int = 2                 # top-k routing: experts per token (reference: 2)
    lora_r: int = 16               # LoRA rank of every expert (reference: r=16)
    lora_alpha: float = 16.0       # LoRA alpha; the low-rank update is scaled by alpha / r (reference: 16)
    lora_dropout: float = 0.02     # dropout on each LoRA input (reference: 0.02)
    gate_hidden: int = 128         # hidden width of the gate MLP; ours (no source fixes it, docs/design.md §5.2; 128
                                   # matches the Location Semantics MoE gate 352->128->5 of the reference)
    renormalize: bool = False      # divide the kept probabilities by their sum; False as in the reference
    expert_compute: str = "auto"   # ours: "grouped" (loop over experts on their own tokens), "pairs" (all
                                   # selected pairs in one batch, block matmuls); "auto" = the fastest
                                   # measured per device (AUTO_EXPERT_COMPUTE). Same function every way.

    def validate(self) -> "PersonalizedMoEConfig":
        checks = [
            ("num_experts", isinstance(self.num_experts, int) and self.num_experts >= 1, "an integer >= 1"),
            ("routing", self.routing in ROUTINGS, f"one of {list(ROUTINGS)}"),
            ("threshold", 0.0 < self.threshold <= 1.0, "a probability in (0, 1]"),
            ("max_experts", isinstance(self.max_experts, int) and self.max_experts >= 1, "an integer >= 1"),
            ("top_k", isinstance(self.top_k, int) and 1 <= self.top_k <= self.num_experts,
             f"an integer in [1, num_experts={self.num_experts}]"),
            ("lora_r", isinstance(self.lora_r, int) and self.lora_r >= 1, "an integer >= 1"),
            ("lora_alpha", self.lora_alpha > 0, "a number > 0"),
            ("lora_dropout", 0.0 <= self.lora_dropout < 1.0, "a probability in [0, 1)"),
            ("gate_hidden", isinstance(self.gate_hidden, int) and self.gate_hidden >= 1, "an integer >= 1"),
            ("expert_compute", self.expert_compute in EXPERT_COMPUTES, f"one of {list(EXPERT_COMPUTES)}"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ConfigError(f"personalized_moe.{name}={getattr(self, name)!r} is invalid; expected {expected}")
        return self


HEADS = ("regression", "ranking")
REGRESSION_ORIGINS = ("scorer", "current")   # model.regression_origin (docs/design.md §3.6)
BACKBONE_INITS = ("pretrained", "random")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelConfig:
    # backbone (paper Sec. 5.1; docs/design.md §2.9 for the offline substitutes)
    backbone: str = "smollm2"        # paper: meta-llama/Llama-3.2-3B; here SmolLM2-135M GGUF, "tiny" for tests
    num_layers: int | None = 12      # paper: first 12 of 28 decoder layers; None keeps them all
    pmoe_layers: tuple[int, ...] = (8, 10)  # decoder layers whose FFN becomes a P-MoE (reference range(8, 12, 2))
    dtype: str = "float32"           # backbone weights; reference bf16 (here bf16 comes from autocast on GPU)
    seed: int = 0                    # seeds random backbones and the fixed random parts of the model (reference 0)

    # token features (reference code)
    coord_dim: int = 128             # z-scored (x, y) -> Linear(2->128, no bias)
    time_dim: int = 16               # weekday Embedding(7,16), hour Embedding(24,16), duration Linear(1->16)

    # history-aware router (paper Sec. 4.3; reference pytorch_tcn.TCN)
    tcn_channels: tuple[int, ...] = (176,) * 5  # reference TCN(176, [176]*5): 5 levels, dilations 1..16
    tcn_kernel_size: int = 4         # reference kernel size
    tcn_dropout: float = 0.1         # reference dropout

    # Location Semantics MoE (paper Sec. 4.1)
    location_top_k: int = 2          # function experts per current token (reference top-2, not renormalised)
    location_gate_hidden: int = 128  # gate MLP [h; token] 352 -> 128 -> 5 (reference)

    # text keys: function descriptions (Sec. 4.1) and role descriptions (Sec. 4.2)
    center_text_embeddings: bool = True  # ours: subtract the mean over the set and scale to unit RMS; the reference
                                         # uses the raw mean-pooled embeddings, which are nearly parallel (cos ~0.9)

    # ablation switches (paper Sec. 5.4)
    use_prompt: bool = True          # prepend the fixed task prompt (paper); off = trajectory tokens only
    prompt_reads_history: bool = True  # paper: the prompt tokens' P-MoE gates read the sample's h; False (ours,
                                     # a speed deviation): they route with h = 0, so the prompt is the same for
                                     # every sample and runs once per batch through all layers (run_backbone)
    use_location_moe: bool = True    # off = current tokens use the plain coordinate projection
    use_personalized_moe: bool = True  # off = every layer keeps its dense frozen FFN
    use_history_router: bool = True  # off = both gates receive zeros instead of the TCN summary h
    backbone_init: str = "pretrained"  # "random": same shapes and tokenizer, weights re-drawn from `seed` (ablation:
                                       # what pretraining buys; for the random "tiny" backbone both are the same)

    # NextLocLLM-style baseline (the paper's NextLocLLM comparison: same backbone, regression + KD-tree, no MoE)
    dense_lora: bool = False         # ours: a LoRA on the gate/up/down projections of EVERY layer's FFN, with the P-MoE
                                     # experts' r/alpha/dropout (reference 16/16/0.02), so the dense model has trainable
                                     # capacity of the same order as the experts; needs use_personalized_moe=False

    # Personalized MoE (paper Sec. 4.2): 11 role experts, threshold routing 0.8 / at most 5, LoRA r=16
    personalized: PersonalizedMoEConfig = field(default_factory=PersonalizedMoEConfig)

    # head and loss (paper Sec. 4.4)
    head: str = "regression"         # "regression" (paper: point + KD-tree) or "ranking" (ours: scores candidates)
    regression_offset: bool = True   # ours: the regression head predicts an offset from the current record's place,
                                     # zero at initialisation (step 0 = "stay where you are"); False = the paper's
                                     # absolute point (docs/design.md §3.6)
    regression_origin: str = "scorer"  # ours, where the offset starts: "scorer" = the window's place that the tuned
                                     # window_time scorer ranks first (user_most_frequent without next_visit_time),
                                     # "current" = the current record's place (docs/design.md §3.6)
    regression_offset_scale: float = 1.0  # ours: the offset is this times the linear map's output, so Adam's first
                                     # steps move the prediction this much less (chosen on validation, §3.6)
    entropy_weight: float = 300.0    # lambda on the mean P-MoE gate entropy, regression loss (reference 300)
    ranking_entropy_weight: float = 1.0  # lambda with the ranking head (ours: CE is in nats, not metres)
    balance_weight: float = 1.0      # ours, beta: the routing term is lambda * (H + beta * (ln E - H(batch-mean gate)));
                                     # beta = 1 makes it lambda * (ln E - I(token; expert)), sharp gates that differ
                                     # between tokens instead of one expert for all; 0 = the paper's loss (docs §5.2)
    ranking_distance_weight: float = 0.0  # weight of the expected distance (metres) beside CE (ours; 0 = off)
    ranking_dim: int = 256           # width of candidate embeddings and of the query (ours)
    ranking_fourier_features: int = 64  # random Fourier frequencies of candidate coordinates (ours)
    ranking_fourier_max_scale: float = 128.0  # highest frequency, cycles per std of the city (ours)
    ranking_id_embedding: bool = False  # a learned embedding per candidate (ours): off, it did not help on
                                     # validation and is half the New York head's parameters (docs §3.6)
    ranking_pointer: bool = True     # ours: mix the candidate softmax with a copy distribution over the window's own
                                     # places (model/pointer.py); starts ranking like the window's most frequent place
    pointer_dim: int = 64            # width of the copy attention's queries and keys (ours)
    pointer_gate_init: str = "repeat_rate"  # copy gate at the start of training: "repeat_rate" (the training share
                                     # of targets inside their window) or "baseline" (g ~ 1: exactly the most frequent
                                     # place's ranking); model/pointer.py
    next_visit_time: bool = True     # ours: the next visit's hour and weekday (known from the last duration) added to
                                     # the prediction state (zero-initialised) and, with the copy mixture, a time
                                     # term in its attention started at the tuned window_time scorer (docs §3.9);
                                     # False = the paper's inputs only (ablation "no explicit next-visit time")

    def __post_init__(self) -> None:
        if isinstance(self.pmoe_layers, list):
            self.pmoe_layers = tuple(self.pmoe_layers)
        if isinstance(self.tcn_channels, list):
            self.tcn_channels = tuple(self.tcn_channels)
        if isinstance(self.personalized, dict):
            self.personalized = _from_plain(PersonalizedMoEConfig, self.personalized, "model.personalized")
        self.validate()

    @property
    def token_dim(self) -> int:
        """Width of one token's features: coordinates + weekday + hour + duration (reference 176)."""
        return self.coord_dim + 3 * self.time_dim

    @property
    def history_dim(self) -> int:
        """Width of the history summary h that both gates read (reference 176)."""
        return self.tcn_channels[-1]

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def validate(self) -> None:
        checks = [
            ("num_layers", self.num_layers is None or self.num_layers >= 1, "an integer >= 1 or null"),
            ("pmoe_layers", all(isinstance(i, int) and i >= 0 for i in self.pmoe_layers)
             and len(set(self.pmoe_layers)) == len(self.pmoe_layers), "distinct layer indices >= 0"),
            ("dtype", self.dtype in DTYPES, f"one of {list(DTYPES)}"),
            ("coord_dim", self.coord_dim >= 2 and self.coord_dim % 2 == 0, "an even integer >= 2"),
            ("time_dim", self.time_dim >= 1, "an integer >= 1"),
            ("tcn_channels", len(self.tcn_channels) >= 1 and all(c >= 1 for c in self.tcn_channels),
             "a non-empty list of channel counts"),
            ("tcn_kernel_size", self.tcn_kernel_size >= 1, "an integer >= 1"),
            ("tcn_dropout", 0 <= self.tcn_dropout < 1, "a probability in [0, 1)"),
            ("location_top_k", 1 <= self.location_top_k <= 5, "1..5 (there are 5 function experts)"),
            ("location_gate_hidden", self.location_gate_hidden >= 1, "an integer >= 1"),
            ("head", self.head in HEADS, f"one of {list(HEADS)}"),
            ("backbone_init", self.backbone_init in BACKBONE_INITS, f"one of {list(BACKBONE_INITS)}"),
            ("dense_lora", not (self.dense_lora and self.use_personalized_moe),
             "False while use_personalized_moe=True (the dense LoRA replaces the role experts: set "
             "use_personalized_moe=False)"),
            ("entropy_weight", self.entropy_weight >= 0, "a weight >= 0"),
            ("ranking_entropy_weight", self.ranking_entropy_weight >= 0, "a weight >= 0"),
            ("balance_weight", self.balance_weight >= 0, "a weight >= 0"),
            ("ranking_distance_weight", self.ranking_distance_weight >= 0, "a weight >= 0"),
            ("ranking_dim", self.ranking_dim >= 1, "an integer >= 1"),
            ("ranking_fourier_features", self.ranking_fourier_features >= 0, "an integer >= 0"),
            ("ranking_fourier_max_scale", self.ranking_fourier_max_scale > 0, "a frequency > 0"),
            ("pointer_dim", self.pointer_dim >= 1, "an integer >= 1"),
            ("pointer_gate_init", self.pointer_gate_init in ("repeat_rate", "baseline"), "'repeat_rate' or 'baseline'"),
            ("regression_offset_scale", self.regression_offset_scale > 0, "a value > 0"),
            ("regression_origin", self.regression_origin in REGRESSION_ORIGINS, f"one of {list(REGRESSION_ORIGINS)}"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ConfigError(f"model.{name}={getattr(self, name)!r} is invalid; expected {expected}")
        if self.num_layers is not None and any(i >= self.num_layers for i in self.pmoe_layers):
            raise ConfigError(f"model.pmoe_layers={list(self.pmoe_layers)} is invalid; every index must be below "
                              f"model.num_layers={self.num_layers}")

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (tuples become lists), ready for YAML."""
        return plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        return _from_plain(cls, d, "model")



def _from_plain(cls: type, d: dict[str, Any], where: str) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"config section '{where}' must be a mapping, got {d!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ConfigError(f"config section '{where}': unknown keys {sorted(unknown)}; known: {sorted(names)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    if cls is ModelConfig and isinstance(kwargs.get("personalized"), dict):
        kwargs["personalized"] = _from_plain(PersonalizedMoEConfig, kwargs["personalized"], f"{where}.personalized")
    return cls(**kwargs)
