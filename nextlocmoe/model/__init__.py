"""NextLocMoE model (paper Sec. 4): backbone, token features, history router, the two MoEs and the heads.

`build_model(cfg, norm_stats, candidates_xy, candidate_function)` is the entry point; `nextlocmoe.py` reads
top-down like the paper's architecture figure. Beside it: config.py (every setting, imports nothing of the model),
decoder.py (the decoder loop with the Personalized MoE and the shared prompt prefix), backbone.py (loading,
freezing, the dense LoRA and random re-initialisation of the comparisons), and one module per new part.
"""

from .backbone import Backbone, embed_text, embed_tokens, freeze_like_paper, load_backbone
from .config import ModelConfig, PersonalizedMoEConfig
from .heads import RankingHead, RegressionHead
from .history_router import HistoryRouter
from .location_moe import LocationSemanticsMoE
from .nextlocmoe import ModelOutput, NextLocMoE, build_model
from .personalized_moe import MoEOutput, PersonalizedMoE

__all__ = [
    "Backbone", "load_backbone", "freeze_like_paper", "embed_text", "embed_tokens",
    "ModelConfig", "NextLocMoE", "ModelOutput", "build_model",
    "HistoryRouter", "LocationSemanticsMoE", "RegressionHead", "RankingHead",
    "MoEOutput", "PersonalizedMoE", "PersonalizedMoEConfig",
]
