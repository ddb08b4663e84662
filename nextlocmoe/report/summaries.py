"""Sentences computed from a results table, so the words a notebook prints always match its numbers.

`summarize(table, experiment)` picks its wording from the experiment's registry entry (`summary`):
"ranking" (best method per metric, where the paper's method and the extension rank, their gap to the best
baseline), "ablation" (every variant's change against the full model) or "speed" (the speed ratios).
"""

from __future__ import annotations

import pandas as pd

from ..experiments.registry import EXPERIMENTS, METHODS


def summarize(table: pd.DataFrame, experiment: str, metrics: tuple[str, ...] = ("hit@1", "hit@10")) -> str:
    """Markdown bullets that state what a results table shows, computed from the table itself (so the words a
    notebook prints always match its numbers, on every profile): per dataset, the best method for each metric,
    where the paper's method (NextLocMoE, regression head) and the extension rank, and their gap to the best
    baseline; for ablations, every variant's change against the full model; for efficiency, the speed ratios."""
    t = table.copy()
    style = EXPERIMENTS[experiment].summary if experiment in EXPERIMENTS else "ranking"
    if style == "speed":
        ratio = t[t["method"] == "nextlocmoe_vs_llm_mob"].set_index("metric")["value"]
        lines = []
        if "speedup_vs_generation_b1" in ratio:
            lines.append(f"- NextLocMoE at its best batch processes {ratio['speedup_vs_generation_b1']:,.1f}x as many "
                         "samples per second as LLM-Mob-style generation at batch 1 (paper: up to 600x).")
        if "speedup_best_vs_best" in ratio:
            lines.append(f"- Both at their best batch: {ratio['speedup_best_vs_best']:,.1f}x.")
        return "\n".join(lines) + "\n"
    lines = []
    # the rows the sentences single out: the paper's method and this project's extension (by registry kind)
    ours = [m.name for m in METHODS.values() if m.kind in ("paper method", "extension") and m.family == "model"]
    for dataset, d in t.groupby("dataset", sort=False):
        wide = d.pivot_table(index=["method", "kind", "variant"], columns="metric", values="value", sort=False)
        if style == "ablation":
            metric = metrics[-1]
            full = wide.xs("full", level="variant")[metric].iloc[0]
            others = wide[metric].drop(index="full", level="variant").sort_values()
            worse = [f"{v} {val - full:+.3f}" for (_, _, v), val in others.items()]
            lines.append(f"- **{dataset}**, {metric_name(metric)} of the full model {full:.3f}; change per variant "
                         f"(lowest first): " + ", ".join(worse) + ".")
            continue
        for metric in metrics:
            if metric not in wide:
                continue
            col = wide[metric].sort_values(ascending=False, kind="stable")
            labels = [m if v in ("default", "zero-shot") else f"{m} [{v}]" for m, _, v in col.index]
            kinds = [k for _, k, _ in col.index]
            parts = [f"best {labels[0]} ({col.iloc[0]:.3f})"]
            best_baseline = next((i for i, k in enumerate(kinds) if k == "baseline"), None)
            for method in ours:
                if method in labels:
                    i = labels.index(method)
                    gap = "" if best_baseline is None else \
                        f", {col.iloc[i] - col.iloc[best_baseline]:+.3f} vs the best baseline {labels[best_baseline]}"
                    parts.append(f"{method} {col.iloc[i]:.3f} (rank {i + 1} of {len(labels)}{gap})")
            lines.append(f"- **{dataset}**, {metric_name(metric)}: " + "; ".join(parts) + ".")
    return "\n".join(lines) + "\n"


def metric_name(metric: str) -> str:
    return metric.replace("hit@", "Hit@").replace("mrr", "MRR").replace("ndcg@", "NDCG@")
