"""Routing analysis of trained NextLocMoE models (experiment 7: expert visualisations, notebook 06).

The paper claims two kinds of structure that nobody labels: the Personalized MoE routes tokens by the
ROLE of the user (Sec. 4.2) and the Location Semantics MoE routes current locations by their FUNCTION
(Sec. 4.1). The synthetic city knows every user's role and every cell's function, and the New York data
knows each venue's category, so this module compares what the gates do with the truth:

    collect_routing(model, windows)  -> RoutingSample: gate probabilities and routing masks of a seeded
                                        sample of windows, with truth (role, function) and predictions
    expert_activation_by_role        mean P-MoE gate probability / selection rate per (true role, layer, expert)
    function_gate_by_category        mean Location-MoE gate probability per (true category, function expert)
    active_experts_per_token         how many role experts threshold routing keeps per token
    kept_mass_per_token              how much gate probability those experts hold (threshold or cap reached)
    entropy_over_training            gate entropies per training batch (steps.csv), smoothed
    routing_alignment                NMI(true role, top expert) per layer; function-expert accuracy vs chance
    prediction_sample                target, predicted point, retrieved place and error per window (maps)
    write_routing_summary / write_routing_tables   the results files notebook 06 shows and draws from

A trained model is loaded with `runs.load_run(run_dir)`.

The P-MoE token axis. `NextLocMoE.embed_inputs` builds the sequence [prompt (P); history (H); current (C)]
(P = 0 without the prompt), and every P-MoE layer sees all T = P + H + C positions: the shared-prompt-prefix
shortcut of `run_backbone` stops before the first P-MoE layer, so the gate outputs cover the prompt rows too.
The Location Semantics MoE sees only the C current tokens.

All tables are long-format pandas DataFrames so that `report.figures` and the notebook only pivot and draw.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .data.schema import FUNCTIONS, ROLES
from .data.windows import Windows, WindowDataset
from .errors import ConfigError, DataError
from .evaluation import move_batch
from .io import provenance
from .metrics import rank_predictions
from .model import NextLocMoE
from .results import markdown_table, write_results

TOKEN_KINDS = ("prompt", "history", "current")


# ---------------------------------------------------------------------------------------------------
# one pass over a sample of windows

@dataclass
class RoutingSample:
    """Gate outputs, truth and predictions of W windows of one split (W <= max_windows of collect_routing).

    P-MoE arrays index (window, P-MoE layer, token, expert); T = prompt + history + current tokens.
    """

    split: str
    window_index: np.ndarray               # (W,) int64 position of each window in the split
    user: np.ndarray                       # (W,) int64 original user of each window
    role: np.ndarray | None                # (W,) object true role name of the user (None entries: unknown);
                                           # None when the dataset has no role truth
    token_kind: np.ndarray                 # (T,) str "prompt" / "history" / "current" of the P-MoE token axis
    pmoe_layers: tuple[int, ...]           # decoder layer of each P-MoE slot, ascending
    pmoe_probs: np.ndarray | None          # (W, P, T, E) float32 gate probabilities; None without the P-MoE
    pmoe_selected: np.ndarray | None       # (W, P, T, E) bool experts kept by routing; None without the P-MoE
    location_probs: np.ndarray | None      # (W, C, 5) float32 Location-MoE gate, experts = FUNCTIONS; None when off
    location_function: np.ndarray          # (W, C) int64 true function index of the current locations, -1 unknown
    target_xy: np.ndarray                  # (W, 2) float64 metres, the true next location's point
    pred_xy: np.ndarray | None             # (W, 2) float64 metres, regressed point; None with the ranking head
    top1_xy: np.ndarray                    # (W, 2) float64 metres, the retrieved (regression) or top-scored place
    hit1: np.ndarray                       # (W,) bool, true location ranked first
    hit10: np.ndarray                      # (W,) bool, true location among the first 10
    expert_names: tuple[str, ...] = ()     # role name of each P-MoE expert (texts.role_names), () without P-MoE
    rank: np.ndarray | None = None         # (W,) int64 rank of the true location (metrics.py tie rule)

    def __post_init__(self) -> None:
        W = len(self.window_index)
        T = len(self.token_kind)
        bad_kinds = sorted(set(np.asarray(self.token_kind).tolist()) - set(TOKEN_KINDS))
        if bad_kinds:
            raise DataError(f"RoutingSample.token_kind holds {bad_kinds}; expected values in {list(TOKEN_KINDS)}")
        checks: list[tuple[str, Any, tuple[int | None, ...]]] = [
            ("user", self.user, (W,)), ("role", self.role, (W,)),
            ("pmoe_probs", self.pmoe_probs, (W, len(self.pmoe_layers), T, None)),
            ("pmoe_selected", self.pmoe_selected, (W, len(self.pmoe_layers), T, None)),
            ("location_probs", self.location_probs, (W, None, len(FUNCTIONS))),
            ("location_function", self.location_function, (W, None)),
            ("target_xy", self.target_xy, (W, 2)), ("pred_xy", self.pred_xy, (W, 2)),
            ("top1_xy", self.top1_xy, (W, 2)), ("hit1", self.hit1, (W,)), ("hit10", self.hit10, (W,)),
            ("rank", self.rank, (W,)),
        ]
        for name, array, shape in checks:
            if array is None:
                continue
            got = np.shape(array)
            if len(got) != len(shape) or any(s is not None and g != s for g, s in zip(got, shape)):
                want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
                raise DataError(f"RoutingSample.{name} has shape {got}; expected {want} "
                                f"(W={W} windows, T={T} tokens)")

    @property
    def n_windows(self) -> int:
        return int(len(self.window_index))


def _roles_of_users(windows: Windows, users: np.ndarray) -> np.ndarray | None:
    """(W,) object array of the true role of each original user, or None when the data carry no roles.

    `windows.meta["truth"]["user_role"]` is a list indexed by user id, or a {str(user): role} mapping
    (windows._jsonable_truth); a user missing from the mapping gets None.
    """
    truth = windows.meta.get("truth") or {}
    roles = truth.get("user_role")
    if roles is None:
        return None
    out = np.empty(len(users), dtype=object)
    for i, u in enumerate(users.tolist()):
        if isinstance(roles, dict):
            out[i] = roles.get(str(u))
        else:
            out[i] = roles[u] if 0 <= u < len(roles) else None
    return out


def _token_kinds(model: NextLocMoE, windows: Windows) -> np.ndarray:
    """(T,) kinds of the sequence the backbone sees: [prompt; history; current] (NextLocMoE.embed_inputs)."""
    prompt = 0 if model.prompt_embeddings is None else int(model.prompt_embeddings.shape[0])
    counts = (prompt, windows.history, windows.current)
    return np.repeat(np.array(TOKEN_KINDS), counts)


@torch.no_grad()
def collect_routing(model: NextLocMoE, windows: Windows, split: str = "test", max_windows: int | None = 200,
                    batch_size: int = 32, seed: int = 0) -> RoutingSample:
    """Run `model` on the first `max_windows` windows of a seeded permutation of `split` and keep its routing.

    The permutation is numpy's default_rng(seed).permutation(n_split); max_windows=None keeps the whole split
    (in permuted order). Batches come from the same `WindowDataset` gathering that evaluation.evaluate uses, and
    ranks follow evaluation.evaluate (regression head: KD-tree over the candidates; ranking head: by score), so
    over a whole split mean(hit1) and mean(hit10) are evaluate's Hit@1 and Hit@10.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} is invalid; expected an integer >= 1")
    if max_windows is not None and max_windows < 1:
        raise ConfigError(f"max_windows={max_windows} is invalid; expected an integer >= 1 or None (all)")
    n_split = windows.n_windows(split)
    order = np.random.default_rng(seed).permutation(n_split)
    window_index = order[:max_windows] if max_windows is not None else order              # (W,)
    dataset = WindowDataset(windows, split)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()

    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("pmoe_probs", "pmoe_selected", "location_probs",
                                                          "pred_xy", "top1_id", "rank", "user", "cur_location")}
    candidates = np.asarray(windows.candidates, dtype=np.float64)                        # (L, 2) metres
    starts = range(0, len(window_index), batch_size)
    for start in tqdm(starts, desc=f"routing {split}", leave=False, disable=None):
        idx = window_index[start:start + batch_size]
        batch = move_batch(dataset.__getitems__(idx.tolist()), device)
        out = model(batch)
        if out.personalized:
            parts["pmoe_probs"].append(torch.stack([o.gate_probs.float() for o in out.personalized], 1).cpu().numpy())
            parts["pmoe_selected"].append(torch.stack([o.selected for o in out.personalized], 1).cpu().numpy())
        if out.location_moe is not None:
            parts["location_probs"].append(out.location_moe.gate_probs.float().cpu().numpy())   # (B, C, 5)
        if out.scores is not None:   # ranked batch by batch, as `evaluation.evaluate` does
            ranked = rank_predictions(candidates, batch["target_location"].cpu(), scores=out.scores.float().cpu())
            parts["rank"].append(ranked.rank)
            parts["top1_id"].append(ranked.top1)
        else:
            parts["pred_xy"].append(out.pred_xy.float().cpu().double().numpy())          # (B, 2), as evaluate
        parts["user"].append(batch["user"].cpu().numpy())
        parts["cur_location"].append(batch["cur_location"].cpu().numpy())
    model.train(was_training)

    cat = {k: np.concatenate(v) for k, v in parts.items() if v}
    target_location = windows.location[windows.target_index(split)[window_index]].astype(np.int64)  # (W,)
    target_index = windows.target_index(split)[window_index]
    target_xy = np.stack([windows.x[target_index], windows.y[target_index]], axis=1)    # (W, 2) float64 metres
    pred_xy = cat.get("pred_xy")
    if pred_xy is not None:   # regression head: the KD-tree retrieval of evaluation.evaluate
        ranked = rank_predictions(candidates, target_location, target_xy, points=pred_xy)
        rank, top1_id = ranked.rank, ranked.top1
    else:
        rank, top1_id = cat["rank"].astype(np.int64), cat["top1_id"].astype(np.int64)
    user = cat["user"].astype(np.int64)
    return RoutingSample(
        split=split,
        window_index=window_index.astype(np.int64),
        user=user,
        role=_roles_of_users(windows, user),
        token_kind=_token_kinds(model, windows),
        pmoe_layers=tuple(sorted(int(k) for k in model.personalized_moe)),
        pmoe_probs=cat.get("pmoe_probs"),
        pmoe_selected=cat.get("pmoe_selected"),
        location_probs=cat.get("location_probs"),
        location_function=np.asarray(windows.candidate_function, dtype=np.int64)[cat["cur_location"]],
        target_xy=target_xy,
        pred_xy=pred_xy,
        top1_xy=candidates[top1_id],
        hit1=rank <= 1,
        hit10=rank <= 10,
        expert_names=tuple(model.role_names),
        rank=rank,
    )


# ---------------------------------------------------------------------------------------------------
# tables

def _require_pmoe(sample: RoutingSample, what: str) -> None:
    if sample.pmoe_probs is None or sample.pmoe_selected is None or not sample.pmoe_layers:
        raise ConfigError(f"{what}: the sample has no Personalized MoE routing (model.use_personalized_moe=False)")


def _role_order(roles: Sequence[Any]) -> list[str]:
    """Distinct known roles, in schema.ROLES order, then any other names alphabetically."""
    present = {r for r in roles if r is not None}
    return [r for r in ROLES if r in present] + sorted(present - set(ROLES))


def expert_activation_by_role(sample: RoutingSample, kinds: Sequence[str] = ("history", "current")) -> pd.DataFrame:
    """Mean P-MoE gate probability and selection rate of every expert, per true role and layer (Sec. 4.2).

    Averages over all tokens of the given kinds in the windows of users with that role (windows of unknown
    role are left out). Columns: role, layer (decoder layer index), expert (int), expert_name, mean_prob,
    selected_rate (share of those tokens for which routing kept the expert), n_tokens.
    """
    _require_pmoe(sample, "expert_activation_by_role")
    if sample.role is None:
        raise ConfigError("expert_activation_by_role: the sample has no true roles (only the synthetic city "
                          "knows them: windows.meta['truth']['user_role'])")
    kinds = tuple(kinds)
    unknown = sorted(set(kinds) - set(TOKEN_KINDS))
    if not kinds or unknown:
        raise ConfigError(f"kinds={list(kinds)} is invalid; expected a non-empty subset of {list(TOKEN_KINDS)}")
    tokens = np.isin(sample.token_kind, kinds)                                           # (T,)
    probs = sample.pmoe_probs[:, :, tokens, :]                                           # (W, P, T', E)
    selected = sample.pmoe_selected[:, :, tokens, :]
    E = probs.shape[-1]
    rows = []
    for role in _role_order(sample.role):
        mine = np.array([r == role for r in sample.role], dtype=bool)                    # (W,)
        mean_prob = probs[mine].astype(np.float64).mean(axis=(0, 2))                    # (P, E)
        selected_rate = selected[mine].mean(axis=(0, 2))                                 # (P, E)
        n_tokens = int(mine.sum()) * int(tokens.sum())
        for p, layer in enumerate(sample.pmoe_layers):
            for e in range(E):
                rows.append({"role": role, "layer": int(layer), "expert": e,
                             "expert_name": sample.expert_names[e] if e < len(sample.expert_names) else str(e),
                             "mean_prob": float(mean_prob[p, e]), "selected_rate": float(selected_rate[p, e]),
                             "n_tokens": n_tokens})
    return pd.DataFrame(rows, columns=["role", "layer", "expert", "expert_name", "mean_prob", "selected_rate",
                                       "n_tokens"])


def function_gate_by_category(sample: RoutingSample) -> pd.DataFrame:
    """Mean Location-MoE gate probability of each function expert, per true category of the current token's
    location (Sec. 4.1). Columns: function (true category, FUNCTIONS order), expert (function expert name),
    mean_prob, n_tokens. Tokens of unknown function are dropped; a category with no token keeps its rows with
    n_tokens 0 and mean_prob NaN, so every table is the full 5 x 5 grid.
    """
    if sample.location_probs is None:
        raise ConfigError("function_gate_by_category: the sample has no Location Semantics MoE routing "
                          "(model.use_location_moe=False)")
    probs = sample.location_probs.reshape(-1, len(FUNCTIONS)).astype(np.float64)        # (W * C, 5)
    truth = sample.location_function.reshape(-1)                                         # (W * C,)
    rows = []
    for f, function in enumerate(FUNCTIONS):
        mine = truth == f
        mean = probs[mine].mean(axis=0) if mine.any() else np.full(len(FUNCTIONS), np.nan)
        for e, expert in enumerate(FUNCTIONS):
            rows.append({"function": function, "expert": expert, "mean_prob": float(mean[e]),
                         "n_tokens": int(mine.sum())})
    return pd.DataFrame(rows, columns=["function", "expert", "mean_prob", "n_tokens"])


def active_experts_per_token(sample: RoutingSample) -> pd.DataFrame:
    """Distribution of the number of role experts routing keeps per token, per P-MoE layer and token kind.

    Threshold routing (Sec. 4.2) keeps 1 expert for a confident gate and up to max_experts for an unsure
    one; top-k always keeps k. Columns: layer, token_kind, n_active, tokens (how many tokens kept exactly
    n_active experts), share (tokens / all tokens of that layer and kind; sums to 1 per group). Every group
    lists the same n_active values: the observed minimum to the observed maximum over the whole sample.
    """
    _require_pmoe(sample, "active_experts_per_token")
    n_active = sample.pmoe_selected.sum(axis=-1)                                         # (W, P, T)
    values = range(int(n_active.min()), int(n_active.max()) + 1)
    rows = []
    for p, layer in enumerate(sample.pmoe_layers):
        for kind in TOKEN_KINDS:
            tokens = sample.token_kind == kind
            if not tokens.any():
                continue
            counts = n_active[:, p, tokens].reshape(-1)                                  # (W * T_kind,)
            for n in values:
                hits = int((counts == n).sum())
                rows.append({"layer": int(layer), "token_kind": kind, "n_active": n, "tokens": hits,
                             "share": hits / len(counts)})
    return pd.DataFrame(rows, columns=["layer", "token_kind", "n_active", "tokens", "share"])


def kept_mass_per_token(sample: RoutingSample, bins: int = 20) -> pd.DataFrame:
    """Distribution of the probability mass routing keeps per token (the sum of the kept experts' gate
    probabilities, which the mixture does not renormalise), per P-MoE layer and token kind, in `bins` equal bins of
    [0, 1]. Threshold routing stops at the threshold (0.8) or at the cap of experts, so where every token keeps
    the cap this shows how far below the threshold they stop. Columns: layer, token_kind, mass_lo, mass_hi,
    tokens, share (sums to 1 per layer and kind)."""
    _require_pmoe(sample, "kept_mass_per_token")
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1:
        raise ConfigError(f"bins={bins!r} is invalid; expected an integer >= 1")
    mass = (sample.pmoe_probs * sample.pmoe_selected).sum(-1)                              # (W, P, T)
    edges = np.linspace(0.0, 1.0, bins + 1)
    rows = []
    for p, layer in enumerate(sample.pmoe_layers):
        for kind in TOKEN_KINDS:
            tokens = sample.token_kind == kind
            if not tokens.any():
                continue
            values = np.clip(mass[:, p, tokens].reshape(-1), 0.0, 1.0)                      # (W * T_kind,)
            counts, _ = np.histogram(values, bins=edges)
            rows += [{"layer": int(layer), "token_kind": kind, "mass_lo": float(lo), "mass_hi": float(hi),
                      "tokens": int(c), "share": c / len(values)} for lo, hi, c in zip(edges, edges[1:], counts)]
    return pd.DataFrame(rows, columns=["layer", "token_kind", "mass_lo", "mass_hi", "tokens", "share"])


def entropy_over_training(run_dir: str | os.PathLike, smooth: int = 20) -> pd.DataFrame:
    """Mean gate entropies (nats) per training batch, from run_dir/steps.csv written by train().

    Columns: step, epoch, pmoe_entropy (mean over P-MoE layers and tokens; the loss regulariser),
    location_entropy (NaN when the Location MoE is off), and *_smooth: the rolling mean over `smooth` steps
    (min_periods=1, so the first steps average what exists).
    """
    path = Path(run_dir) / "steps.csv"
    if isinstance(smooth, bool) or not isinstance(smooth, (int, np.integer)) or smooth < 1:
        raise ConfigError(f"smooth={smooth!r} is invalid; expected an integer >= 1 (steps in the rolling mean)")
    if not path.is_file():
        raise DataError(f"{path} does not exist; runs trained before steps.csv was logged lack it "
                        "(retrain the model to record per-batch routing entropies)")
    steps = pd.read_csv(path)
    missing = [c for c in ("step", "epoch", "pmoe_entropy") if c not in steps.columns]
    if missing:
        raise DataError(f"{path} lacks columns {missing}; expected step, epoch, pmoe_entropy "
                        "(and location_entropy)")
    out = steps[["step", "epoch", "pmoe_entropy"]].copy()
    out["location_entropy"] = steps["location_entropy"] if "location_entropy" in steps.columns else np.nan
    out = out.sort_values("step", kind="stable").reset_index(drop=True)
    for column in ("pmoe_entropy", "location_entropy"):
        out[f"{column}_smooth"] = out[column].rolling(int(smooth), min_periods=1).mean()
    return out


# ---------------------------------------------------------------------------------------------------
# alignment with the truth

def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def normalized_mutual_information(labels_a: Sequence[Any], labels_b: Sequence[Any],
                                  average: str = "arithmetic") -> float:
    """NMI(a, b) = I(a; b) / mean(H(a), H(b)), in [0, 1], from the empirical joint distribution (nats).

    `average` is "arithmetic" (sklearn's default), "geometric", "min" or "max". Two constant labelings count
    as identical (1.0); one constant labeling and one not share no information (0.0). Labels may be any
    hashable values. Note that finite samples give independent labelings a small positive NMI.
    """
    a, b = list(labels_a), list(labels_b)
    if len(a) != len(b):
        raise DataError(f"normalized_mutual_information: {len(a)} and {len(b)} labels; expected equal lengths")
    if not a:
        raise DataError("normalized_mutual_information: no labels")
    means = {"arithmetic": lambda x, y: (x + y) / 2, "geometric": lambda x, y: np.sqrt(x * y),
             "min": min, "max": max}
    if average not in means:
        raise ConfigError(f"average={average!r} is invalid; expected one of {list(means)}")
    _, ia = np.unique(np.array(a, dtype=object).astype(str), return_inverse=True)
    _, ib = np.unique(np.array(b, dtype=object).astype(str), return_inverse=True)
    joint = np.zeros((ia.max() + 1, ib.max() + 1))
    np.add.at(joint, (ia, ib), 1.0)                                                     # counts (A, B)
    h_a, h_b = _entropy(joint.sum(axis=1)), _entropy(joint.sum(axis=0))
    if h_a == 0.0 and h_b == 0.0:
        return 1.0
    mutual = h_a + h_b - _entropy(joint.reshape(-1))                                     # I = H(a) + H(b) - H(a, b)
    denominator = float(means[average](h_a, h_b))
    if denominator <= 0.0:
        return 0.0
    return float(np.clip(mutual / denominator, 0.0, 1.0))


def majority_top_expert(probs: np.ndarray) -> np.ndarray:
    """(W, T, E) gate probabilities -> (W,) int64 the expert that is top-1 for the most tokens of each window;
    ties between experts go to the lower expert index."""
    top = probs.argmax(axis=-1)                                                          # (W, T)
    E = probs.shape[-1]
    votes = (top[..., None] == np.arange(E)).sum(axis=1)                                 # (W, E)
    return votes.argmax(axis=1).astype(np.int64)


def nearest_centroid_accuracy(features: np.ndarray, labels: np.ndarray) -> float:
    """Leave-one-out accuracy of a nearest-centroid classifier: each row is assigned the label whose mean
    (computed without that row) is closest in Euclidean distance after z-scoring the columns (constant
    columns dropped). features (N, F) float, labels (N,) hashable -> accuracy in [0, 1]; NaN for N < 2.

    Unlike the NMI of a top-1 choice this reads the whole gate vector, so it still has a meaningful chance
    level when every window picks the same top expert."""
    x = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels, dtype=object)
    if x.ndim != 2 or len(x) != len(labels):
        raise ConfigError(f"features must be (N, F) with one label per row; got {x.shape} and {len(labels)} labels")
    if len(x) < 2:
        return float("nan")
    std = x.std(axis=0)
    x = (x[:, std > 0] - x[:, std > 0].mean(axis=0)) / std[std > 0]
    classes, y = np.unique(labels.astype(str), return_inverse=True)
    counts = np.bincount(y, minlength=len(classes)).astype(np.float64)                   # (K,)
    sums = np.zeros((len(classes), x.shape[1]))
    np.add.at(sums, y, x)                                                               # (K, F)
    dist = np.empty((len(x), len(classes)))
    for k in range(len(classes)):
        own = y == k
        n = np.where(own, counts[k] - 1, counts[k])                                      # (N,)
        centre = (sums[k][None, :] - np.where(own[:, None], x, 0.0)) / np.maximum(n, 1)[:, None]
        dist[:, k] = np.where(n > 0, ((x - centre) ** 2).sum(axis=1), np.inf)
    return float((dist.argmin(axis=1) == y).mean())


def routing_alignment(sample: RoutingSample, shuffles: int = 20, seed: int = 0) -> dict[str, Any]:
    """How well the two routers recover the truth. Keys:

    n_windows_with_role    windows whose user's role is known (the NMI is computed over these)
    nmi_role_top_expert    {layer: NMI(true role, majority top-1 expert over the window's current tokens)}
    nmi_shuffled           {layer: mean NMI over `shuffles` seeded permutations of the roles}: the value that
                           chance alone reaches with this many windows (finite-sample NMI is biased upward)
    function_accuracy      share of current tokens of known function whose argmax function expert is the
                           true category (NaN without the Location MoE or without known functions)
    function_chance        share of the most frequent true category among those tokens (always guessing it)
    n_function_tokens      how many current tokens have a known function
    role_decoding          {layer: leave-one-out nearest-centroid accuracy of the true role from the window's
                           mean log gate over its current tokens (`nearest_centroid_accuracy`)}
    role_decoding_shuffled {layer: the same with shuffled roles, the mean over `shuffles` permutations}
    distinct_top_experts   {layer: how many experts are some current token's top-1}
    The dicts are empty when the sample has no roles or no P-MoE.
    """
    result: dict[str, Any] = {"n_windows_with_role": 0, "nmi_role_top_expert": {}, "nmi_shuffled": {},
                              "role_decoding": {}, "role_decoding_shuffled": {}, "distinct_top_experts": {}}
    if sample.role is not None and sample.pmoe_probs is not None and sample.pmoe_layers:
        known = np.array([r is not None for r in sample.role], dtype=bool)              # (W,)
        roles = np.asarray(sample.role, dtype=object)[known]
        result["n_windows_with_role"] = int(known.sum())
        current = sample.token_kind == "current"                                         # (T,)
        rng = np.random.default_rng(seed)
        permutations = [rng.permutation(len(roles)) for _ in range(shuffles)]
        if len(roles):
            for p, layer in enumerate(sample.pmoe_layers):
                top = majority_top_expert(sample.pmoe_probs[known][:, p][:, current])    # (W_known,)
                result["nmi_role_top_expert"][int(layer)] = normalized_mutual_information(roles, top)
                result["nmi_shuffled"][int(layer)] = float(np.mean(
                    [normalized_mutual_information(roles[perm], top) for perm in permutations])) if shuffles else np.nan
                probs = sample.pmoe_probs[known][:, p][:, current]                          # (W_known, C, E)
                gate = np.log(np.clip(probs, 1e-12, None)).mean(axis=1)                     # (W_known, E)
                result["role_decoding"][int(layer)] = nearest_centroid_accuracy(gate, roles)
                result["role_decoding_shuffled"][int(layer)] = float(np.mean(
                    [nearest_centroid_accuracy(gate, roles[perm]) for perm in permutations])) if shuffles else np.nan
                result["distinct_top_experts"][int(layer)] = int(len(np.unique(probs.argmax(axis=-1))))
    truth = sample.location_function.reshape(-1)                                         # (W * C,)
    known_function = truth >= 0
    result["n_function_tokens"] = int(known_function.sum())
    if sample.location_probs is None or not known_function.any():
        result["function_accuracy"] = result["function_chance"] = float("nan")
    else:
        argmax = sample.location_probs.reshape(-1, len(FUNCTIONS)).argmax(axis=1)        # (W * C,)
        result["function_accuracy"] = float((argmax[known_function] == truth[known_function]).mean())
        counts = np.bincount(truth[known_function], minlength=len(FUNCTIONS))
        result["function_chance"] = float(counts.max() / counts.sum())
    return result


# ---------------------------------------------------------------------------------------------------
# predictions

def prediction_sample(sample: RoutingSample, n: int = 200) -> pd.DataFrame:
    """The first n windows of the sample (already a seeded random draw) as points to map, in metres.

    Columns: window (index in the split), target_x, target_y, pred_x, pred_y (the regressed point; NaN with
    the ranking head), top1_x, top1_y (the retrieved / top-scored place), hit1, hit10, error_m (top-1 place
    to target, the error of the place the model would answer with).
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ConfigError(f"n={n!r} is invalid; expected an integer >= 1")
    k = min(int(n), sample.n_windows)
    pred = sample.pred_xy[:k] if sample.pred_xy is not None else np.full((k, 2), np.nan)
    target, top1 = sample.target_xy[:k], sample.top1_xy[:k]
    return pd.DataFrame({
        "window": sample.window_index[:k],
        "target_x": target[:, 0], "target_y": target[:, 1],
        "pred_x": pred[:, 0], "pred_y": pred[:, 1],
        "top1_x": top1[:, 0], "top1_y": top1[:, 1],
        "hit1": sample.hit1[:k], "hit10": sample.hit10[:k],
        "error_m": np.hypot(top1[:, 0] - target[:, 0], top1[:, 1] - target[:, 1]),
    })


# ---------------------------------------------------------------------------------------------------
# the results table of notebook 06

def write_routing_summary(samples: dict[str, RoutingSample], profile: str,
                          results_dir: str | os.PathLike = "results", *, role_dataset: str,
                          function_dataset: str, data_checksum: dict[str, Any] | None = None,
                          seed: int = 0, threshold: float = 0.8) -> dict[str, Path]:
    """results/expert_routing.{csv,md,json}: the alignment of both routers with the truth, in numbers.

    Rows (tidy: dataset, router, layer, metric, value): for `role_dataset`, NMI between the true role and
    each window's dominant role expert per P-MoE layer and the role's decodability from the window's gate vector
    (leave-one-out nearest centroid), each beside its shuffled-role chance level, and the number of distinct
    top experts; for
    `function_dataset`, the accuracy of the top function expert against the true venue category beside the
    share of the most frequent category; for both, per P-MoE layer over the trajectory tokens: the mean number
    of role experts kept, their mean summed probability (the mass the mixture keeps; not renormalised), the
    share of tokens whose kept mass reaches `threshold` (routing's; the rest hit the cap of experts) and the largest expert's share
    of top-1 choices (1/11 = 0.09 when balanced, 1 when collapsed).
    """
    for name in (role_dataset, function_dataset):
        if name not in samples:
            raise ConfigError(f"dataset '{name}' has no routing sample; collected: {sorted(samples)}")
    rows: list[dict[str, Any]] = []
    role = routing_alignment(samples[role_dataset], seed=seed)
    for layer, nmi in role["nmi_role_top_expert"].items():
        rows.append({"dataset": role_dataset, "router": "personalized", "layer": layer,
                     "metric": "nmi(role, top expert)", "value": nmi})
        rows.append({"dataset": role_dataset, "router": "personalized", "layer": layer,
                     "metric": "nmi chance (shuffled roles)", "value": role["nmi_shuffled"][layer]})
        rows.append({"dataset": role_dataset, "router": "personalized", "layer": layer,
                     "metric": "role decoding from gates", "value": role["role_decoding"][layer]})
        rows.append({"dataset": role_dataset, "router": "personalized", "layer": layer,
                     "metric": "decoding chance (shuffled roles)", "value": role["role_decoding_shuffled"][layer]})
        rows.append({"dataset": role_dataset, "router": "personalized", "layer": layer,
                     "metric": "distinct top experts", "value": float(role["distinct_top_experts"][layer])})
    fn = routing_alignment(samples[function_dataset], seed=seed)
    rows.append({"dataset": function_dataset, "router": "location", "layer": "embedding",
                 "metric": "top function expert accuracy", "value": fn["function_accuracy"]})
    rows.append({"dataset": function_dataset, "router": "location", "layer": "embedding",
                 "metric": "chance (most frequent category)", "value": fn["function_chance"]})
    for name in dict.fromkeys([role_dataset, function_dataset]):
        sample = samples[name]
        if sample.pmoe_selected is None:
            continue
        trajectory = sample.token_kind != "prompt"
        selected = sample.pmoe_selected[:, :, trajectory]                                    # (W, P, H + C, E)
        probs = sample.pmoe_probs[:, :, trajectory]                                         # (W, P, H + C, E)
        kept = selected.sum(-1)                                                              # (W, P, H + C)
        mass = (probs * selected).sum(-1)                                                    # (W, P, H + C)
        for i, layer in enumerate(sample.pmoe_layers):
            top = probs[:, i].argmax(-1).reshape(-1)                                         # (W (H + C),)
            load = np.bincount(top, minlength=probs.shape[-1]) / top.size                    # (E,)
            for metric, value in (("mean experts per token", kept[:, i].mean()),
                                  ("mean kept mass", mass[:, i].mean()),
                                  (f"share of tokens whose kept mass reaches {threshold:g}",
                                   (mass[:, i] >= threshold - 1e-6).mean()),
                                  ("largest top-1 expert load", load.max())):
                rows.append({"dataset": name, "router": "personalized", "layer": layer, "metric": metric,
                             "value": float(value)})
    table = pd.DataFrame(rows, columns=["dataset", "router", "layer", "metric", "value"])
    shown = table.assign(value=table["value"].map(lambda v: f"{v:.3f}"))
    return write_results(results_dir, "expert_routing", table, markdown_table(shown), provenance(
        profile, seed=seed, data_checksum=data_checksum,
        windows={n: int(s.n_windows) for n, s in samples.items()}, split={n: s.split for n, s in samples.items()},
        role_alignment=role, function_alignment=fn))


ROUTING_TABLES = ("routing_roles", "routing_functions", "routing_active_experts", "routing_kept_mass",
                  "routing_entropy", "routing_entropy_paper_loss", "routing_predictions")


def write_routing_tables(tables: dict[str, pd.DataFrame], profile: str, results_dir: str | os.PathLike = "results",
                         **stamp: Any) -> dict[str, Path]:
    """Each frame notebook 06 draws, as results/<name>.{csv,md,json}: the figures are then drawn from these
    files (`results.read_table`), so what a reader sees is what is committed."""
    unknown = sorted(set(tables) - set(ROUTING_TABLES))
    if unknown:
        raise ConfigError(f"routing tables {unknown} are unknown; expected names from {list(ROUTING_TABLES)}")
    paths = {}
    for name, frame in tables.items():
        summary = markdown_table(frame.head(20)) + (f"\n({len(frame):,} rows; all of them in {name}.csv)\n"
                                                    if len(frame) > 20 else "")
        paths[name] = write_results(results_dir, name, frame, summary, provenance(profile, **stamp))["csv"]
    return paths

