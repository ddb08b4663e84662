"""The routing charts of notebook 06: what the two mixtures of experts do, drawn from the routing tables.

The frames come from `nextlocmoe.analysis` (collected from a trained model by the notebook and written to
results/routing_*.csv first); every function here only reads such a frame and returns a matplotlib `Figure`
(`canvas.save_figure` writes it). They are re-exported by `report.figures`, where the notebooks import them.

    plot_role_expert_heatmap(df)             P-MoE gate probability by true role, one heatmap per layer
    plot_function_gate_heatmap(df)           Location-MoE gate by true category, row-normalised
    plot_active_experts(df)                  how many role experts threshold routing keeps per token
    plot_routing_entropy(df)                 gate entropies over training steps, epochs marked
    plot_prediction_map(df, candidates)      targets vs predicted points and retrieved places, metres

Heatmaps and bars are seaborn's axes-level `heatmap` / `barplot` / `histplot` on an Agg figure (`ax=`, no
pyplot state). An input that lacks a column raises `ConfigError` naming it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import FuncFormatter, MaxNLocator

from ..data.schema import FUNCTIONS, ROLES, UNKNOWN_FUNCTION
from ..errors import ConfigError
from .canvas import dodged_bars, new_figure, ordered, plane_axes, require_columns, styled, thousands
from .style import NEXTLOCMOE_RED, TOKEN_KIND_COLORS, method_color

__all__ = ["plot_role_expert_heatmap", "plot_function_gate_heatmap", "plot_active_experts", "plot_routing_entropy",
           "plot_prediction_map"]


def _short_prob(v: float) -> str:
    return f"{v:.2f}".removeprefix("0") if 0 <= v < 1 else f"{v:.2f}"


def _heatmap(ax: Any, grid: np.ndarray, xlabels: list[str], ylabels: list[str], annot: Any, xrotation: float,
             **kwargs: Any) -> Any:
    """sns.heatmap of grid (R, C) with readable ticks; cell (i, j) spans [j, j+1] x [i, i+1], row 0 on top.
    NaN cells stay blank and unannotated. Returns the QuadMesh (for a shared colour bar)."""
    sns.heatmap(grid, ax=ax, annot=annot, annot_kws={"fontsize": 9}, xticklabels=xlabels, yticklabels=ylabels,
                **kwargs)
    # seaborn turns crowded tick labels vertical: set the rotation this report uses
    ax.set_xticks(np.arange(len(xlabels)) + 0.5, xlabels, rotation=xrotation, ha="right", rotation_mode="anchor")
    ax.set_yticks(np.arange(len(ylabels)) + 0.5, ylabels, rotation=0, va="center")
    return ax.collections[0]


@styled
def plot_role_expert_heatmap(df: pd.DataFrame, value: str = "mean_prob", annotate: bool | None = None) -> Figure:
    """Personalized-MoE gate by true user role (analysis.expert_activation_by_role): one heatmap per layer.

    df        role, layer, expert, mean_prob, selected_rate, n_tokens (expert_name, when present, labels columns)
    value     'mean_prob' (mean gate probability) or 'selected_rate' (share of tokens routing kept the expert)
    annotate  print each cell's value; None = when a panel has at most 121 cells

    Rows are true roles (schema.ROLES order), columns the role experts; one shared colour scale from 0.
    A role-aligned gate lights up one column per row; a uniform gate is 1/E everywhere.
    """
    require_columns(df, ["role", "layer", "expert", "mean_prob", "selected_rate", "n_tokens"],
                    "plot_role_expert_heatmap")
    if value not in ("mean_prob", "selected_rate"):
        raise ConfigError(f"value={value!r} is invalid; expected 'mean_prob' or 'selected_rate'")
    layers = sorted(df["layer"].unique())
    roles = ordered(df["role"], ROLES)
    experts = list(dict.fromkeys(df["expert"]))
    if all(isinstance(e, (int, np.integer)) for e in experts):
        experts = sorted(experts)
    if "expert_name" in df.columns:
        names = df.drop_duplicates("expert").set_index("expert")["expert_name"].to_dict()
        labels = [f"{e}: {names.get(e, e)}" if str(names.get(e, e)) != str(e) else str(e) for e in experts]
    elif len(experts) == len(ROLES) and all(isinstance(e, (int, np.integer)) for e in experts):
        labels = [f"{e}: {ROLES[int(e)]}" for e in experts]
    else:
        labels = [str(e) for e in experts]
    grids = []                                                               # one (roles, experts) grid per layer
    for layer in layers:
        sub = df[df["layer"] == layer].pivot_table(index="role", columns="expert", values=value, aggfunc="first")
        grids.append(sub.reindex(index=roles, columns=experts).to_numpy(dtype=float))
    vmax = max(float(np.nanmax(g)) if np.isfinite(g).any() else 0.0 for g in grids) or 1.0
    annotate = (len(roles) * len(experts) <= 121) if annotate is None else annotate
    fig = new_figure((min(11.0, 3.2 + 4.6 * len(layers)), 6.0))
    axes = np.atleast_1d(fig.subplots(1, len(layers), squeeze=False)[0])
    mesh = None
    for i, (ax, layer, grid) in enumerate(zip(axes, layers, grids)):
        cells = np.vectorize(_short_prob, otypes=[str])(grid) if annotate else False
        mesh = _heatmap(ax, grid, labels, [str(r) for r in roles], cells, 60, fmt="", cmap="Blues", vmin=0.0,
                        vmax=vmax, cbar=False)
        ax.set(title=f"P-MoE layer {layer}", xlabel="role expert (index: name of its key)")
        if i > 0:
            ax.tick_params(axis="y", labelleft=False)                 # the rows are the first panel's
    axes[0].set_ylabel("true role of the user")
    what = "mean gate probability" if value == "mean_prob" else "share of tokens routed to the expert"
    fig.colorbar(mesh, ax=list(axes), label=f"{what} (0-1)", shrink=0.9)
    uniform = 1.0 / len(experts)
    fig.suptitle(f"Personalized MoE: {what} by true role (uniform gate = {uniform:.2f})")
    return fig


@styled
def plot_function_gate_heatmap(df: pd.DataFrame) -> Figure:
    """Location-Semantics-MoE gate by true category (analysis.function_gate_by_category), row-normalised.

    df  function (true category of the token's location), expert (function expert), mean_prob, n_tokens.
    Each row is divided by its sum, so a cell is the share of that category's gate probability that the
    expert receives; rows without tokens (NaN) stay blank. Cells where category == expert are outlined:
    a function-aligned gate puts its mass there.
    """
    require_columns(df, ["function", "expert", "mean_prob", "n_tokens"], "plot_function_gate_heatmap")
    functions = ordered(df["function"], [*FUNCTIONS, UNKNOWN_FUNCTION])
    experts = ordered(df["expert"], FUNCTIONS)
    grid = df.pivot_table(index="function", columns="expert", values="mean_prob", aggfunc="first", dropna=False)
    grid = grid.reindex(index=functions, columns=experts).to_numpy(dtype=float)
    sums = np.nansum(grid, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(sums > 0, grid / sums, np.nan)                                  # (F, E) rows sum to 1
    tokens = df.groupby("function", sort=False)["n_tokens"].max().reindex(functions).fillna(0).astype(int)
    fig = new_figure((9, 5.6))
    ax = fig.subplots()
    _heatmap(ax, share, [str(e) for e in experts], [f"{f}\n(n={tokens[f]:,})" for f in functions], True, 20,
             fmt=".2f", cmap="Oranges", vmin=0.0, vmax=1.0,
             cbar_kws={"label": "share of the category's gate probability (row sums to 1)"})
    for i, f in enumerate(functions):
        if not np.isfinite(share[i]).any():
            ax.text(len(experts) / 2, i + 0.5, "no tokens", ha="center", va="center", fontsize=9, color="0.4")
        if f in experts:
            ax.add_patch(Rectangle((experts.index(f), i), 1, 1, fill=False, edgecolor="black", linewidth=2))
    ax.set(xlabel="function expert of the Location Semantics MoE",
           ylabel="true category of the location (tokens)")
    fig.suptitle("Location Semantics MoE: which function expert each true venue category is routed to "
                 f"(uniform = {1 / len(experts):.2f})")
    return fig


@styled
def plot_active_experts(df: pd.DataFrame, kept_mass: pd.DataFrame | None = None, threshold: float | None = 0.8,
                        title: str | None = None) -> Figure:
    """How many role experts routing keeps per token (analysis.active_experts_per_token), one panel per layer;
    with `kept_mass` (analysis.kept_mass_per_token) a second row shows the probability those experts hold, with
    routing's `threshold` marked: a token stops at the threshold or at the cap of experts, and where every token
    keeps the cap the first row is one bar and the second says why.

    df  layer, token_kind, n_active, tokens, share. Bars: share of tokens of a kind (prompt/history/current)
        that kept exactly n_active experts; the legend gives each kind's mean number of active experts.
    title  names the model and dataset (suptitle)
    """
    require_columns(df, ["layer", "token_kind", "n_active", "tokens", "share"], "plot_active_experts")
    if kept_mass is not None:
        require_columns(kept_mass, ["layer", "token_kind", "mass_lo", "mass_hi", "share"], "plot_active_experts")
    layers = sorted(df["layer"].unique())
    kinds = ordered(df["token_kind"], list(TOKEN_KIND_COLORS))
    values = sorted(int(v) for v in df["n_active"].unique())
    n_rows = 1 if kept_mass is None else 2
    fig = new_figure((min(11.0, 2.5 + 4.2 * len(layers)), 5.2 if n_rows == 1 else 7.0))
    grid = fig.subplots(n_rows, len(layers), squeeze=False)
    axes = np.atleast_1d(grid[0])
    for ax in axes[1:]:
        ax.sharey(axes[0])
    for ax, layer in zip(axes, layers):
        d = df[df["layer"] == layer]
        per_kind = {kind: k.drop_duplicates("n_active").set_index("n_active")
                    for kind, k in d.groupby("token_kind", sort=False)}
        present = [kind for kind in kinds if kind in per_kind]
        styles = {}
        for kind in present:
            k = per_kind[kind]
            total = float(k["tokens"].sum())
            mean = float((k.index.to_numpy(dtype=float) * k["tokens"]).sum() / total) if total > 0 else math.nan
            styles[kind] = {"color": TOKEN_KIND_COLORS.get(kind, method_color(str(kind))), "edgecolor": "white",
                            "linewidth": 1.0, "label": f"{kind} tokens (mean {mean:.2f})"}
        bars = dodged_bars(ax, lambda kind, v: float(per_kind[kind]["share"].get(v, 0.0)), values, present, styles)
        for (kind, v), bar in bars.items():
            bar.set_gid(f"{layer}|{kind}|{v}")
        ax.set(title=f"P-MoE layer {layer}", xlabel="role experts kept per token (count)")
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
    axes[0].set_ylabel("share of tokens (0-1)")
    axes[0].set_ylim(0, 1.05)
    if kept_mass is not None:
        for ax, layer in zip(grid[1], layers):
            d = kept_mass[kept_mass["layer"] == layer]
            for kind in [k for k in kinds if k in set(d["token_kind"])]:
                k = d[d["token_kind"] == kind].sort_values("mass_lo")
                edges = np.append(k["mass_lo"].to_numpy(dtype=float), float(k["mass_hi"].iloc[-1]))
                ax.stairs(k["share"].to_numpy(dtype=float), edges, label=f"{kind} tokens", linewidth=1.8,
                          color=TOKEN_KIND_COLORS.get(kind, method_color(str(kind))), gid=f"{layer}|{kind}|mass")
            if threshold is not None:
                ax.axvline(threshold, color="black", linestyle="--", linewidth=1.0,
                           label=f"routing threshold {threshold:g}")
            ax.set(xlim=(0, 1), title=f"layer {layer}: gate probability the kept experts hold",
                   xlabel="kept mass per token (0-1)")
            ax.grid(alpha=0.3)
            ax.set_axisbelow(True)
            ax.legend(loc="upper left", frameon=False)
        grid[1][0].set_ylabel("share of tokens (0-1)")
    fig.suptitle(title or "Personalized MoE routing: number of active role experts per token")
    return fig


@styled
def plot_routing_entropy(df: pd.DataFrame, n_role_experts: int | None = 11,
                         n_function_experts: int | None = 5, title: str | None = None,
                         paper_loss: pd.DataFrame | None = None) -> Figure:
    """Gate entropies over training (analysis.entropy_over_training), in nats, epochs marked.

    df  step, epoch, pmoe_entropy, location_entropy, pmoe_entropy_smooth, location_entropy_smooth; raw values
        thin, smoothed thick; an all-NaN entropy (module switched off) is left out.
    n_role_experts / n_function_experts  draw the entropy of a uniform gate, ln(E) (None hides it).
    title  the model and dataset, in the suptitle
    paper_loss  the same table for the same model trained with the paper's routing loss (no balance term,
        `experiments.no_balance_model`): its Personalized MoE entropy per batch, drawn dashed in black.
    """
    columns = ["step", "epoch", "pmoe_entropy", "location_entropy", "pmoe_entropy_smooth", "location_entropy_smooth"]
    require_columns(df, columns, "plot_routing_entropy")
    d = df.sort_values("step", kind="stable")
    fig = new_figure((10, 5.2))
    ax = fig.subplots()
    drawn = 0
    gates = (("pmoe_entropy", NEXTLOCMOE_RED, n_role_experts, "Personalized MoE (role gate)"),
             ("location_entropy", "#2c7fb8", n_function_experts, "Location Semantics MoE (function gate)"))
    for name, color, experts, label in gates:
        raw = pd.to_numeric(d[name], errors="coerce")
        if not np.isfinite(raw).any():
            continue
        ax.plot(d["step"], raw, color=color, alpha=0.45, linewidth=1.0, marker=".", markersize=4,
                label=f"{label}, per batch")
        ax.plot(d["step"], d[f"{name}_smooth"], color=color, linewidth=2.2, alpha=0.8, label=f"{label}, smoothed")
        if experts:
            ax.axhline(math.log(experts), color=color, linestyle=":", linewidth=1.2,
                       label=f"uniform over {experts} experts: ln {experts} = {math.log(experts):.2f}")
        drawn += 1
    if drawn == 0:
        raise ConfigError("plot_routing_entropy: columns 'pmoe_entropy' and 'location_entropy' hold no finite value")
    if paper_loss is not None:
        require_columns(paper_loss, ["step", "pmoe_entropy"], "plot_routing_entropy(paper_loss=...)")
        other = paper_loss.sort_values("step", kind="stable")
        ax.plot(other["step"], other["pmoe_entropy"], color="black", linestyle=(0, (4, 2)), linewidth=1.6,
                marker="x", markersize=4, label="Personalized MoE, the paper's loss (no balance term), per batch")
    starts = d.groupby("epoch")["step"].min().sort_index().to_numpy()[1:]
    for k, x in enumerate(starts):
        ax.axvline(x - 0.5, color="black", linestyle="--", linewidth=0.9, label="epoch boundary" if k == 0 else None)
    ax.set_ylim(bottom=0)
    ax.set(xlabel="training batch (step)", ylabel="mean gate entropy (nats)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncols=2, frameon=False)
    ax.grid(alpha=0.3)
    fig.suptitle(f"Routing entropy over training{f' ({title})' if title else ''}: lower = more confident routing")
    return fig


def _candidate_xy(candidates: Any) -> np.ndarray | None:
    if candidates is None:
        return None
    if isinstance(candidates, pd.DataFrame):
        require_columns(candidates, ["x", "y"], "plot_prediction_map (candidates)")
        return candidates[["x", "y"]].to_numpy(dtype=float)
    xy = np.asarray(candidates, dtype=float)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise ConfigError(f"plot_prediction_map: candidates must be (L, 2) metres or a frame with x, y; "
                          f"got shape {xy.shape}")
    return xy


@styled
def plot_prediction_map(df: pd.DataFrame, candidates: Any = None, max_windows: int = 200) -> Figure:
    """Where the model points (analysis.prediction_sample): targets vs predicted points and retrieved places.

    df          window, target_x, target_y, pred_x, pred_y (NaN for the ranking head), top1_x, top1_y,
                hit1, hit10, error_m (top-1 place to target, metres)
    candidates  optional (L, 2) array or frame with x, y: every candidate location, drawn faintly
    max_windows the first windows drawn on the map (all windows enter the title's rates and the histogram)

    Left: a thin line joins each target to the regressed point (or to the top-1 place without one); the
    top-1 place is green when it is the target (Hit@1). Right: histogram of error_m.
    """
    columns = ["window", "target_x", "target_y", "pred_x", "pred_y", "top1_x", "top1_y", "hit1", "hit10", "error_m"]
    require_columns(df, columns, "plot_prediction_map")
    cand = _candidate_xy(candidates)
    d = df.iloc[:max_windows]
    fig = new_figure((11, 6))
    ax_map, ax_err = fig.subplots(1, 2, width_ratios=[1.4, 1])
    if cand is not None:
        ax_map.scatter(cand[:, 0], cand[:, 1], s=3, color="0.75", linewidths=0, label="candidate location",
                       rasterized=True)
    pred = d[["pred_x", "pred_y"]].to_numpy(dtype=float)                  # (N, 2) metres, NaN for the ranking head
    target = d[["target_x", "target_y"]].to_numpy(dtype=float)
    top1 = d[["top1_x", "top1_y"]].to_numpy(dtype=float)
    has_pred = np.isfinite(pred).all(axis=1)
    end = np.where(has_pred[:, None], pred, top1)
    # one Line2D for all segments: target -> end, NaN between windows
    segments_x = np.column_stack([target[:, 0], end[:, 0], np.full(len(d), np.nan)]).ravel()
    segments_y = np.column_stack([target[:, 1], end[:, 1], np.full(len(d), np.nan)]).ravel()
    ax_map.plot(segments_x, segments_y, color="0.45", linewidth=0.6, alpha=0.7,
                label="target → predicted point" if has_pred.any() else "target → top-1 place")
    ax_map.scatter(target[:, 0], target[:, 1], s=28, facecolors="none", edgecolors="black", linewidths=1.0,
                   label="true next location", zorder=3)
    if has_pred.any():
        ax_map.scatter(pred[has_pred, 0], pred[has_pred, 1], s=26, marker="x", color=NEXTLOCMOE_RED, linewidths=1.2,
                       label="regressed point", zorder=4)
    hit1 = d["hit1"].to_numpy().astype(bool)
    ax_map.scatter(top1[~hit1, 0], top1[~hit1, 1], s=18, marker="^", color="#2c7fb8", alpha=0.8,
                   label="top-1 place (miss)", zorder=3)
    ax_map.scatter(top1[hit1, 0], top1[hit1, 1], s=22, marker="^", color="#1a9850",
                   label="top-1 place (hit)", zorder=5)
    shown = np.vstack([target, top1, pred[has_pred]])
    shown = shown[np.isfinite(shown).all(axis=1)]
    if len(shown):
        lo, hi = shown.min(axis=0), shown.max(axis=0)
        pad = 0.06 * max(float((hi - lo).max()), 1.0)
        ax_map.set_xlim(lo[0] - pad, hi[0] + pad)
        ax_map.set_ylim(lo[1] - pad, hi[1] + pad)
    plane_axes(ax_map, f"{len(d)} test windows (a seeded random draw)", adjustable="box")
    ax_map.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=3, frameon=False, markerscale=1.3)

    errors = pd.to_numeric(df["error_m"], errors="coerce").to_numpy(dtype=float)
    errors = errors[np.isfinite(errors)]
    if len(errors):
        sns.histplot(errors, bins=30, color="#4c72b0", edgecolor="white", alpha=1.0, ax=ax_err)
        median = float(np.median(errors))
        ax_err.axvline(median, color="black", linestyle="--", linewidth=1.2, label=f"median {median:,.0f} m")
        ax_err.legend(loc="upper right")
    ax_err.xaxis.set_major_formatter(FuncFormatter(thousands))
    ax_err.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax_err.set(xlabel="distance from top-1 place to target (m)", ylabel="test windows (count)",
               title="error of the answered place")
    rate1 = float(pd.to_numeric(df["hit1"]).mean())
    rate10 = float(pd.to_numeric(df["hit10"]).mean())
    fig.suptitle(f"Predictions vs truth on {len(df):,} test windows: Hit@1 = {rate1:.3f}, Hit@10 = {rate10:.3f}")
    return fig
