"""One window through a trained model, step by step: every intermediate with its shape (notebook 01).

`walk_window(model, windows, split, index)` runs ONE real window through `NextLocMoE` by calling the model's
own pieces in the order `NextLocMoE.forward` calls them (token features, history router, Location Semantics
MoE, token projections, backbone with the Personalized MoE, final norm, head, copy mixture), and keeps what
each piece returns. A test checks that the walk ends at exactly the scores the model's forward gives, so
what the notebook shows is what the model computes, not a re-implementation of it.

Each `Step` carries the equation it implements, written out in the notation of docs/design.md (paper
Secs. 4.1-4.4), the shapes of its tensors, and a small table to show.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.spatial import cKDTree

from .data.schema import FUNCTIONS
from .data.windows import Windows
from .errors import ConfigError
from .model.nextlocmoe import NextLocMoE, final_norm_float32
from .model.personalized_moe import route

EQUATIONS: dict[str, str] = {
    "records": "a window = S_h = 40 history records + S_c = 5 current records r_t = (x_t, y_t, weekday_t, hour_t, "
               "duration_t: hours to the next record); the target is record 46",
    "features": "e_t = [W_xy z(x_t, y_t) (128) ; E_wd[weekday_t] (16) ; E_hr[hour_t] (16) ; w_d d_t + b_d (16)] "
                "(176), z = z-score over the training records",
    "history": "h = LayerNorm(TCN(e_1..e_40))_40: 5 causal levels, kernel 4, dilations 1, 2, 4, 8, 16",
    "location": "g_t = softmax(MLP([h ; e_t])) over the 5 functions; keep the top 2; "
                "loc_t = W_xy z_t + sum_{k in top2} g_t,k W_k z_t (the shared expert plus the kept function experts)",
    "tokens": "x_t = W_hist e_t (history) or W_cur [loc_t ; time part of e_t] (current), prompt embeddings in front: "
              "(1, P + 45, D)",
    "personalized": "s_t,e = MLP([x_t ; h ; k_e]) for each role key k_e; p_t = softmax(s_t); keep the most probable "
                    "experts until their mass reaches 0.8 (at most 5); FFN(x_t) -> sum_kept p_t,e FFN_e(x_t), "
                    "FFN_e = the frozen FFN with expert e's LoRA",
    "state": "s = RMSNorm(hidden state of the last current token after the last kept layer) (D)",
    "regression": "z_hat = W_o s + b_o (2 z-units), y_hat = (sigma_x z_hat_1 + mu_x, sigma_y z_hat_2 + mu_y) metres; "
                  "the answer is the KD-tree's nearest candidates to y_hat",
    "ranking": "score_l = <W_q s, c_l> / sqrt(r) * exp(tau) + b_l over the L candidate embeddings c_l; with the copy "
               "mixture log p(l) = log(g p_copy(l) + (1 - g) softmax(score)_l), g = sigmoid(w.s + c)",
    "loss": "regression: mean ||y_hat - y|| (metres) + lambda H(p); ranking: -log p(target) + lambda H(p); "
            "H = mean P-MoE gate entropy",
}


@dataclass
class Step:
    """One stage of the forward pass."""

    name: str
    equation: str
    shapes: dict[str, tuple[int, ...]]
    table: pd.DataFrame | None = None
    note: str = ""


@dataclass
class Walkthrough:
    split: str
    index: int
    head: str
    steps: list[Step] = field(default_factory=list)
    scores: torch.Tensor | None = None       # (1, L) the ranking head's final log p (None for regression)
    pred_xy: np.ndarray | None = None        # (2,) metres, the regression head's point (None for ranking)

    def step(self, name: str) -> Step:
        for s in self.steps:
            if s.name == name:
                return s
        raise ConfigError(f"walkthrough has no step '{name}'; steps: {[s.name for s in self.steps]}")

    def shapes(self) -> pd.DataFrame:
        """One row per tensor: step, tensor, shape, the equation's short form."""
        return pd.DataFrame([{"step": s.name, "tensor": k, "shape": "(" + ", ".join(map(str, v)) + ")"}
                             for s in self.steps for k, v in s.shapes.items()])


def _shape(t: torch.Tensor | np.ndarray) -> tuple[int, ...]:
    return tuple(int(d) for d in t.shape)


def tcn_receptive_field(kernel_size: int, dilations: list[int]) -> int:
    """Steps back the last output of a causal TCN sees: 1 + 2 (k - 1) sum(d) (two convolutions per level)."""
    return 1 + 2 * (kernel_size - 1) * int(sum(dilations))


@torch.no_grad()
def walk_window(model: NextLocMoE, windows: Windows, split: str = "test", index: int = 0,
                top: int = 10) -> Walkthrough:
    """Run window `index` of `split` through `model` (eval mode, batch 1) and keep every intermediate."""
    n = windows.n_windows(split)
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < n:
        raise ConfigError(f"index={index!r} is invalid; split '{split}' has {n} windows (0..{n - 1})")
    if isinstance(top, bool) or not isinstance(top, (int, np.integer)) or top < 1:
        raise ConfigError(f"top={top!r} is invalid; expected an integer >= 1")
    was_training = model.training
    model.eval()
    cfg = model.cfg
    walk = Walkthrough(split=split, index=int(index), head=cfg.head)
    arrays = windows.batch(split, [int(index)])
    batch = {k: torch.from_numpy(v).to(model.device) for k, v in arrays.items()}

    # 1. the records (raw units) and the target
    start = int(windows.starts[split][index])
    H, C = windows.history, windows.current
    rows = start + np.arange(H + C + 1)
    function = np.asarray(windows.candidate_function)[windows.location[rows]]
    records = pd.DataFrame({
        "record": [f"h{t + 1}" for t in range(H)] + [f"c{t + 1}" for t in range(C)] + ["target"],
        "x_m": windows.x[rows].astype(np.float64).round(1), "y_m": windows.y[rows].astype(np.float64).round(1),
        "weekday": windows.weekday[rows], "hour": windows.hour[rows],
        "duration_h": np.round(windows.duration[rows].astype(np.float64), 2), "place": windows.location[rows],
        "function": [FUNCTIONS[f] if f >= 0 else "unknown" for f in function],
    })
    walk.steps.append(Step("records", EQUATIONS["records"], {"history": (H, 5), "current": (C, 5)}, records))

    # 2. token features
    hist_features = model.token_features(batch["hist_xy"], batch["hist_weekday"], batch["hist_hour"],
                                         batch["hist_duration"])                          # (1, H, 176)
    cur_features = model.token_features(batch["cur_xy"], batch["cur_weekday"], batch["cur_hour"],
                                        batch["cur_duration"])                            # (1, C, 176)
    walk.steps.append(Step("features", EQUATIONS["features"],
                           {"history features": _shape(hist_features), "current features": _shape(cur_features)}))

    # 3. history router
    if model.history_router is not None:
        h = model.history_router(hist_features)                                          # (1, 176)
        levels = len(cfg.tcn_channels)
        field_ = tcn_receptive_field(cfg.tcn_kernel_size, [2 ** i for i in range(levels)])
        note = (f"receptive field of the last step: {field_} records (the window has {H}); "
                f"||h|| = {float(h.norm()):.2f}")
    else:
        h = hist_features.new_zeros(1, cfg.history_dim)
        note = "history router switched off: h = 0"
    walk.steps.append(Step("history", EQUATIONS["history"], {"h": _shape(h)}, note=note))

    # 4. Location Semantics MoE
    if model.location_moe is not None:
        shared = cur_features[..., :cfg.coord_dim]
        location = model.location_moe(batch["cur_xy"], h, cur_features, shared)
        probs = location.gate_probs[0].cpu().numpy()                                       # (C, 5)
        table = pd.DataFrame(probs.round(3), columns=list(FUNCTIONS))
        table.insert(0, "record", [f"c{t + 1}" for t in range(C)])
        table["top-2"] = [", ".join(FUNCTIONS[k] for k in np.argsort(-p, kind="stable")[:2]) for p in probs]
        table["true function"] = records["function"].iloc[H:H + C].to_numpy()
        walk.steps.append(Step("location", EQUATIONS["location"],
                               {"gate": _shape(location.gate_probs), "location embedding": _shape(location.output)},
                               table))
        cur_features = torch.cat([location.output, cur_features[..., cfg.coord_dim:]], dim=-1)
    tokens = model.token_projections(hist_features, cur_features)                          # (1, H + C, D)
    if model.prompt_embeddings is not None:
        tokens = torch.cat([model.prompt_embeddings.to(tokens.dtype)[None], tokens], dim=1)
    P = model.prompt_length
    walk.steps.append(Step("tokens", EQUATIONS["tokens"], {"backbone input": _shape(tokens)},
                           note=f"{P} prompt tokens + {H} history + {C} current; D = {tokens.shape[-1]}"))

    # 5. backbone and the Personalized MoE (batch 1: no shared prefix; the same function, tested)
    hidden, personalized = model.run_backbone(tokens, h)
    names = list(_role_names(model))
    layers = sorted(int(i) for i in model.personalized_moe) if personalized else []
    for layer, out in zip(layers, personalized):
        probs = out.gate_probs[0, P:].float().cpu().numpy()                                # (H + C, E)
        kept = route(out.gate_probs[0, P:].float(), model.personalized_moe[str(layer)].cfg).cpu().numpy()
        show = np.r_[H - 1, np.arange(H, H + C)]                                            # last history + current
        table = pd.DataFrame({
            "token": [f"h{H}"] + [f"c{t + 1}" for t in range(C)],
            "top expert": [names[int(np.argmax(probs[t]))] for t in show],
            "top p": probs[show].max(-1).round(3),
            "kept": [int(kept[t].sum()) for t in show],
            "kept mass": [round(float(probs[t][kept[t]].sum()), 3) for t in show],
            "kept experts": [", ".join(names[e] for e in np.flatnonzero(kept[t])) for t in show],
        })
        walk.steps.append(Step(f"personalized layer {layer}", EQUATIONS["personalized"],
                               {"gate": _shape(out.gate_probs), "hidden": _shape(hidden)}, table,
                               note=f"threshold {model.personalized_moe[str(layer)].cfg.threshold}, at most "
                                    f"{model.personalized_moe[str(layer)].cfg.max_experts} experts"))

    # 6. prediction state and head
    state = final_norm_float32(model.llama.norm, hidden[:, -1])                            # (1, D)
    walk.steps.append(Step("state", EQUATIONS["state"], {"state": _shape(state)}))
    target = int(arrays["target_location"][0])
    candidates = np.asarray(windows.candidates, dtype=np.float64)                          # (L, 2) metres
    if cfg.head == "regression":
        pred = model.head(state)[0].cpu().numpy().astype(np.float64)                       # (2,) metres
        dist, idx = cKDTree(candidates).query(pred, k=min(top, len(candidates)))
        idx, dist = np.atleast_1d(idx), np.atleast_1d(dist)
        table = pd.DataFrame({"rank": np.arange(1, len(idx) + 1), "place": idx, "distance_m": dist.round(1),
                              "is target": idx == target})
        walk.pred_xy = pred
        true = arrays["target_xy"][0]
        walk.steps.append(Step("regression", EQUATIONS["regression"], {"point": (2,)}, table,
                               note=f"predicted ({pred[0]:.0f}, {pred[1]:.0f}) m; target ({true[0]:.0f}, "
                                    f"{true[1]:.0f}) m; error {np.hypot(*(pred - true)):.0f} m"))
    else:
        gen = model.head(state, model.candidate_location_embeddings())                     # (1, L)
        scores, split_table = gen, None
        window = torch.cat([batch["hist_location"], batch["cur_location"]], dim=1)         # (1, H + C)
        if model.pointer is not None:
            keys = final_norm_float32(model.llama.norm, hidden[:, P:])                     # (1, H + C, D)
            scores = model.pointer(state, keys, window, gen)                               # (1, L) log p
            g = float(torch.sigmoid(model.pointer.gate_logit(state))[0, 0])
            attention = model.pointer.attention(state, keys)[0]                            # (H + C,)
            p_copy = torch.zeros(gen.shape[-1], device=gen.device).scatter_add(0, window[0], attention)
            p_gen = gen[0].float().softmax(-1)
            split_table = (g * p_copy, (1 - g) * p_gen)
        order = torch.argsort(scores[0], descending=True, stable=True)[:top].cpu().numpy()
        visits = np.bincount(window[0].cpu().numpy(), minlength=gen.shape[-1])
        table = pd.DataFrame({"rank": np.arange(1, len(order) + 1), "place": order,
                              "p": scores[0, order].exp().cpu().numpy().round(4),
                              "visits in window": visits[order], "is target": order == target})
        note = ""
        if split_table is not None:
            table["from copy"] = split_table[0][order].cpu().numpy().round(4)
            table["from generator"] = split_table[1][order].cpu().numpy().round(4)
            note = f"copy gate g = {g:.3f}: the share of probability the mixture gives to the window's own places"
        rank = int((scores[0] > scores[0, target]).sum()) + 1
        walk.scores = scores.detach().cpu()
        walk.steps.append(Step("ranking", EQUATIONS["ranking"], {"scores": _shape(scores)}, table,
                               note=(note + "; " if note else "") + f"the target (place {target}) ranks {rank}"))
    if was_training:
        model.train()
    return walk


def walk_run(run_dir: Any, windows: Windows | None = None, split: str = "test", index: int = 0, top: int = 10,
             device: str | torch.device | None = "cpu") -> Walkthrough:
    """`walk_window` on the best checkpoint of a run directory (`runs.load_run`: the model exactly as tested)."""
    from .runs import load_run
    run = load_run(run_dir, windows, device=device)
    return walk_window(run.model, run.windows, split, index, top)


def _role_names(model: NextLocMoE) -> tuple[str, ...]:
    from .model.texts import role_names
    return role_names(model.cfg.personalized.num_experts)


def describe(walk: Walkthrough) -> list[dict[str, Any]]:
    """Plain records of the steps (name, equation, shapes, note) for a notebook to print in order."""
    return [{"step": s.name, "equation": s.equation, "shapes": s.shapes, "note": s.note} for s in walk.steps]
