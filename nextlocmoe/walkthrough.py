"""One window through a trained model, step by step: every intermediate with its shape (notebook 01).

`walk_window(model, windows, split, index)` runs ONE real window through `NextLocMoE.forward` with
`return_intermediates=True` (the forward pass itself, recording what each stage computed: token features,
history summary, Location Semantics MoE, token sequence, backbone with the Personalized MoE, prediction
state, head, copy mixture) and lays those out stage by stage. It computes nothing of the model's own, so what
the notebook shows is what the model computes; ranks follow the one tie rule of `metrics.rank_predictions`.

Each `Step` carries the equation it implements, written out in the notation of docs/design.md (paper
Secs. 4.1-4.4), the shapes of its tensors, and a small table to show.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from .data.schema import FUNCTIONS
from .data.windows import Windows
from .errors import ConfigError
from .metrics import CandidateIndex, rank_predictions
from .model.nextlocmoe import NextLocMoE
from .model.pointer import window_places

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
    "regression": "z_hat = z_0 + W_o s + b_o (2 z-units; z_0 the origin: the window's place the tuned window_time "
                  "scorer ranks first, or the current record's; W_o = 0 at the start; the paper's form has no z_0), "
                  "y_hat = (sigma_x z_hat_1 + mu_x, sigma_y z_hat_2 + mu_y) metres; the answer is the KD-tree's "
                  "nearest candidates to y_hat",
    "ranking": "score_l = <W_q s, c_l> / sqrt(r) * exp(tau) + b_l over the L candidate embeddings c_l; with the copy "
               "mixture log p(l) = log(g p_copy(l) + (1 - g) softmax(score)_l), g = sigmoid(w.s + c)",
    "loss": "regression: mean ||y_hat - y|| (metres) + lambda (H + beta I); ranking: -log p(target) + lambda (H + "
            "beta I); H = mean P-MoE gate entropy, I = ln E - H(mean gate) the balance term, each averaged over "
            "the P-MoE layers",
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
    out = model(batch, return_intermediates=True)       # THE forward pass; the steps below only read it
    seen = out.intermediates

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
    walk.steps.append(Step("features", EQUATIONS["features"],
                           {"history features": _shape(seen["history_features"]),
                            "current features": _shape(seen["current_features"])}))

    # 3. history router
    h = out.history                                                                        # (1, 176)
    if model.history_router is not None:
        field_ = tcn_receptive_field(cfg.tcn_kernel_size, [2 ** i for i in range(len(cfg.tcn_channels))])
        note = (f"receptive field of the last step: {field_} records (the window has {H}); "
                f"||h|| = {float(h.norm()):.2f}")
    else:
        note = "history router switched off: h = 0"
    walk.steps.append(Step("history", EQUATIONS["history"], {"h": _shape(h)}, note=note))

    # 4. Location Semantics MoE
    location = out.location_moe
    if location is not None:
        probs = location.gate_probs[0].cpu().numpy()                                       # (C, 5)
        table = pd.DataFrame(probs.round(3), columns=list(FUNCTIONS))
        table.insert(0, "record", [f"c{t + 1}" for t in range(C)])
        table["top-2"] = [", ".join(FUNCTIONS[k] for k in np.argsort(-p, kind="stable")[:2]) for p in probs]
        table["true function"] = records["function"].iloc[H:H + C].to_numpy()
        walk.steps.append(Step("location", EQUATIONS["location"],
                               {"gate": _shape(location.gate_probs), "location embedding": _shape(location.output)},
                               table))
    tokens, hidden = seen["tokens"], seen["hidden"]
    P = model.prompt_length
    walk.steps.append(Step("tokens", EQUATIONS["tokens"], {"backbone input": _shape(tokens)},
                           note=f"{P} prompt tokens + {H} history + {C} current; D = {tokens.shape[-1]}"))

    # 5. backbone and the Personalized MoE (batch 1: no shared prefix; the same function, tested)
    names = list(model.role_names)
    layers = sorted(int(i) for i in model.personalized_moe) if out.personalized else []
    for layer, moe_out in zip(layers, out.personalized):
        moe_cfg = model.personalized_moe[str(layer)].cfg
        probs = moe_out.gate_probs[0, P:].float().cpu().numpy()                             # (H + C, E)
        kept = moe_out.selected[0, P:].cpu().numpy()                                         # (H + C, E) bool
        show = np.r_[H - 1, np.arange(H, H + C)]                                            # last history + current
        table = pd.DataFrame({
            "token": [f"h{H}"] + [f"c{t + 1}" for t in range(C)],
            "top expert": [names[int(np.argmax(probs[t]))] for t in show],
            "top p": probs[show].max(-1).round(3),
            "kept": [int(kept[t].sum()) for t in show],
            "kept mass": [round(float(probs[t][kept[t]].sum()), 3) for t in show],
            "kept experts": [", ".join(names[e] for e in np.flatnonzero(kept[t])[np.argsort(-probs[t][kept[t]],
                                                                                       kind="stable")])
                             for t in show],                                  # most probable first
        })
        walk.steps.append(Step(f"personalized layer {layer}", EQUATIONS["personalized"],
                               {"gate": _shape(moe_out.gate_probs), "hidden": _shape(hidden)}, table,
                               note=f"threshold {moe_cfg.threshold}, at most {moe_cfg.max_experts} experts"))

    # 6. prediction state and head; the ranks follow the one tie rule of nextlocmoe.metrics
    walk.steps.append(Step("state", EQUATIONS["state"], {"state": _shape(seen["state"])}))
    target = int(arrays["target_location"][0])
    true_xy = np.asarray(arrays["target_xy"], dtype=np.float64)                             # (1, 2) metres
    if cfg.head == "regression":
        index_ = CandidateIndex(windows.candidates)                                         # the KD-tree retrieval
        pred = out.pred_xy[0].cpu().numpy().astype(np.float64)                              # (2,) metres
        dist, idx = index_.topk(pred[None], min(top, len(index_)))                         # (1, k): ties -> lower id
        ranked = rank_predictions(index_, [target], true_xy, points=pred[None])
        table = pd.DataFrame({"rank": np.arange(1, idx.shape[1] + 1), "place": idx[0], "distance_m": dist[0].round(1),
                              "is target": idx[0] == target})
        walk.pred_xy = pred
        origin = ""                    # which place the offset starts from (model.regression_origin=scorer)
        if "regression_origin_place" in seen:
            origin = f"origin: place {int(seen['regression_origin_place'][0])} (the scorer's top); "
        walk.steps.append(Step("regression", EQUATIONS["regression"], {"point": (2,)}, table,
                               note=f"{origin}predicted ({pred[0]:.0f}, {pred[1]:.0f}) m; target ({true_xy[0, 0]:.0f}, "
                                    f"{true_xy[0, 1]:.0f}) m; error {ranked.error_m[0]:.0f} m; the target (place "
                                    f"{target}) ranks {int(ranked.rank[0])}"))
    else:
        scores = out.scores                                                                  # (1, L)
        order = torch.argsort(scores[0], descending=True, stable=True)[:top].cpu().numpy()  # ties -> lower id
        window = window_places(batch, torch.device("cpu"))[0].numpy()                     # (H + C,)
        visits = np.bincount(window, minlength=scores.shape[-1])
        table = pd.DataFrame({"rank": np.arange(1, len(order) + 1), "place": order,
                              "p": scores[0, order].exp().cpu().numpy().round(4),
                              "visits in window": visits[order], "is target": order == target})
        note = ""
        if model.pointer is not None:    # the two parts of the mixture, as the forward pass computed them
            g = float(seen["copy_gate"][0, 0])
            p_copy = np.bincount(window, weights=seen["copy_attention"][0].double().cpu().numpy(),
                                 minlength=scores.shape[-1])                                 # (L,)
            p_gen = seen["generator_scores"][0].float().softmax(-1).cpu().numpy()           # (L,)
            table["from copy"] = (g * p_copy[order]).round(4)
            table["from generator"] = ((1 - g) * p_gen[order]).round(4)
            note = f"copy gate g = {g:.3f}: the share of probability the mixture gives to the window's own places"
        ranked = rank_predictions(windows.candidates, [target], true_xy, scores=scores.float().cpu())
        walk.scores = scores.detach().cpu()
        walk.steps.append(Step("ranking", EQUATIONS["ranking"], {"scores": _shape(scores)}, table,
                               note=(note + "; " if note else "") +
                                    f"the target (place {target}) ranks {int(ranked.rank[0])}"))

    # 7. the training loss of this one window (what an optimiser step on it would minimise)
    loss, parts = model.loss(out, batch)
    lam = cfg.entropy_weight if cfg.head == "regression" else cfg.ranking_entropy_weight
    walk.steps.append(Step("loss", EQUATIONS["loss"], {"loss": ()},
                           note=", ".join(f"{k} {float(v):.4g}" for k, v in parts.items()) +
                                f"; lambda = {lam:g}, beta = {cfg.balance_weight:g}"))
    if was_training:
        model.train()
    return walk


def walk_run(run_dir: Any, windows: Windows | None = None, split: str = "test", index: int = 0, top: int = 10,
             device: str | torch.device | None = "cpu") -> Walkthrough:
    """`walk_window` on the best checkpoint of a run directory (`runs.load_run`: the model exactly as tested)."""
    from .runs import load_run
    run = load_run(run_dir, windows, device=device)
    return walk_window(run.model, run.windows, split, index, top)


def describe(walk: Walkthrough) -> list[dict[str, Any]]:
    """Plain records of the steps (name, equation, shapes, note) for a notebook to print in order."""
    return [{"step": s.name, "equation": s.equation, "shapes": s.shapes, "note": s.note} for s in walk.steps]
