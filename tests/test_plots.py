"""Figures of nextlocmoe.report.figures, read back from their artists.

Every frame here is built by hand with the column sets the real files carry (results/*.csv in the tidy
schema, train()'s history.csv / steps.csv, nextlocmoe.analysis tables). The expected numbers are computed
in the test from those hand-made inputs (pivots, row sums, means written out), never by calling plots.py,
and compared with what the figure's bars, heatmap cells, lines and texts hold.
"""

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgba
from matplotlib.container import ErrorbarContainer
from matplotlib.figure import Figure
from matplotlib.collections import QuadMesh
from matplotlib.patches import Rectangle
from matplotlib.text import Text

from nextlocmoe.report import figures as plots
from nextlocmoe.data.schema import FUNCTIONS, ROLES, MobilityData
from nextlocmoe.errors import ConfigError

TIDY = ["experiment", "method", "kind", "dataset", "variant", "metric", "value"]


# --- helpers ----------------------------------------------------------------------------------------

def tidy(experiment, rows):
    """rows: (method, kind, dataset, variant, {metric: value}) -> a tidy frame as the experiments write it."""
    out = [{"experiment": experiment, "method": m, "kind": k, "dataset": d, "variant": v, "metric": metric,
            "value": value} for m, k, d, v, metrics in rows for metric, value in metrics.items()]
    return pd.DataFrame(out, columns=TIDY)


def bars_by_gid(fig):
    """gid -> bar patch, over every axes of the figure."""
    return {p.get_gid(): p for ax in fig.axes for p in ax.patches if p.get_gid()}


def error_bars(fig):
    """gid -> [(x or y centre, lo, hi)] of every error bar, read back from the ErrorbarContainers' segments."""
    out = {}
    for ax in fig.axes:
        for container in ax.containers:
            if isinstance(container, ErrorbarContainer):
                (lines,) = container.lines[2]           # the LineCollection of the whiskers
                vertical = container.has_yerr
                out[lines.get_gid()] = [(seg[0, 0], seg[0, 1], seg[1, 1]) if vertical else
                                        (seg[0, 1], seg[0, 0], seg[1, 0]) for seg in lines.get_segments()]
    return out


def with_intervals(rows, half=0.05):
    """The rows with "<metric>_lo" / "<metric>_hi" = value -+ half (clipped to [0, 1]) for Hit@k and MRR."""
    out = []
    for m, k, d, v, metrics in rows:
        bounds = {}
        for metric, value in metrics.items():
            if metric.startswith("hit@") or metric == "mrr":
                bounds[f"{metric}_lo"] = max(value - half, 0.0)
                bounds[f"{metric}_hi"] = min(value + half, 1.0)
        out.append((m, k, d, v, {**metrics, **bounds}))
    return out


def heatmap_cells(ax):
    """The (rows, columns) values of the one heatmap of `ax` (seaborn draws a QuadMesh), NaN where blank."""
    (mesh,) = [a for a in ax.get_children() if isinstance(a, QuadMesh)]
    return np.ma.filled(np.ma.asarray(mesh.get_array(), dtype=float), np.nan)


def data_axes(fig):
    """Axes that hold the plot (colour bars left out)."""
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


def check_readable(fig):
    """Title, size and fonts every figure must have (prompt: readable at 100% zoom, fontsize >= 9)."""
    assert isinstance(fig, Figure)
    assert fig._suptitle is not None and len(fig._suptitle.get_text()) > 20
    width, height = fig.get_size_inches()
    assert 8.5 <= width <= 11.0 and 4.5 <= height <= 7.0, (width, height)
    for text in fig.findobj(Text):
        if text.get_visible() and text.get_text().strip():
            assert text.get_fontsize() >= 9, (text.get_text(), text.get_fontsize())
    for ax in data_axes(fig):
        assert ax.get_xlabel() or ax.get_ylabel()


SUPERVISED = [
    ("popularity", "baseline", "synthetic", "default", {"hit@1": 0.05, "hit@5": 0.10, "hit@10": 0.15, "mrr": 0.08,
                                                        "dist_mean_m": 4000.0, "n": 32}),
    ("markov", "baseline", "synthetic", "default", {"hit@1": 0.20, "hit@5": 0.30, "hit@10": 0.35, "mrr": 0.25,
                                                    "dist_mean_m": 2500.0, "n": 32}),
    ("nextlocmoe", "paper method", "synthetic", "default", {"hit@1": 0.25, "hit@5": 0.45, "hit@10": 0.55,
                                                            "mrr": 0.33, "dist_mean_m": 1500.0, "n": 32}),
    ("nextlocmoe_ranking", "extension", "synthetic", "default", {"hit@1": 0.30, "hit@5": 0.50, "hit@10": 0.60,
                                                                 "mrr": 0.40, "dist_mean_m": 1400.0, "n": 32}),
    ("popularity", "baseline", "nyc_foursquare", "default", {"hit@1": 0.01, "hit@5": 0.02, "hit@10": 0.04,
                                                             "mrr": 0.02, "dist_mean_m": 9000.0, "n": 200}),
    ("nextlocmoe", "paper method", "nyc_foursquare", "default", {"hit@1": 0.11, "hit@5": 0.21, "hit@10": 0.31,
                                                                 "mrr": 0.16, "dist_mean_m": 3000.0, "n": 200}),
]


# --- 02 supervised ----------------------------------------------------------------------------------

def test_supervised_bar_heights_equal_the_table():
    table = tidy("supervised", SUPERVISED)
    fig = plots.plot_supervised(table)
    check_readable(fig)
    axes = data_axes(fig)
    assert [ax.get_title() for ax in axes] == ["dataset: synthetic", "dataset: nyc_foursquare"]
    bars = bars_by_gid(fig)
    metrics = ["hit@1", "hit@5", "hit@10", "mrr"]
    # one bar per (method present in that dataset) x metric: 4 x 4 + 2 x 4
    assert len(bars) == 4 * 4 + 2 * 4
    assert sum(len(ax.patches) for ax in axes) == 24
    for method, _kind, dataset, variant, values in SUPERVISED:
        for metric in metrics:
            assert bars[f"{dataset}|{method}|{variant}|{metric}"].get_height() == pytest.approx(values[metric])
    # bars of a metric group sit left to right in table order
    xs = [bars[f"synthetic|{m}|default|hit@10"].get_x() for m in ("popularity", "markov", "nextlocmoe")]
    assert xs == sorted(xs)


def test_method_colours_and_kind_hatches_are_fixed_across_figures():
    sup = bars_by_gid(plots.plot_supervised(tidy("supervised", SUPERVISED)))
    zero = bars_by_gid(plots.plot_zero_shot(tidy("zero_shot", [
        ("nextlocmoe", "paper method", "A->B", "zero-shot", {"hit@1": 0.1, "hit@5": 0.2, "hit@10": 0.3, "mrr": 0.15}),
        ("markov", "baseline", "A->B", "zero-shot", {"hit@1": 0.1, "hit@5": 0.2, "hit@10": 0.3, "mrr": 0.15}),
    ])))
    red = to_rgba(plots.method_color("nextlocmoe"))
    assert sup["synthetic|nextlocmoe|default|hit@1"].get_facecolor() == pytest.approx(red)
    assert zero["A->B|nextlocmoe|zero-shot|hit@1"].get_facecolor() == pytest.approx(red)
    assert sup["synthetic|markov|default|mrr"].get_facecolor() == zero["A->B|markov|zero-shot|mrr"].get_facecolor()
    # NextLocMoE stands out (black edge); the extension kind is hatched, baselines are not
    assert sup["synthetic|nextlocmoe|default|hit@1"].get_edgecolor() == pytest.approx(to_rgba("black"))
    assert sup["synthetic|nextlocmoe_ranking|default|hit@1"].get_hatch() == plots.KIND_HATCHES["extension"] == "//"
    assert not sup["synthetic|markov|default|hit@1"].get_hatch()
    # the kind is in the legend
    labels = [t.get_text() for legend in plots.plot_supervised(tidy("supervised", SUPERVISED)).legends
              for t in legend.get_texts()]
    assert "nextlocmoe (paper method)" in labels and "nextlocmoe_ranking (extension)" in labels
    assert plots.method_color("some_new_method") == plots.method_color("some_new_method")


def test_supervised_errors_name_the_missing_column_or_metric():
    table = tidy("supervised", SUPERVISED)
    with pytest.raises(ConfigError, match="kind"):
        plots.plot_supervised(table.drop(columns="kind"))
    with pytest.raises(ConfigError, match="ndcg@5"):
        plots.plot_supervised(table, metrics=("hit@1", "ndcg@5"))
    with pytest.raises(ConfigError, match="no rows"):
        plots.plot_supervised(table.iloc[:0])
    # the experiment column is optional; a custom metric list draws exactly those groups
    fig = plots.plot_supervised(table.drop(columns="experiment"), metrics=("dist_mean_m",))
    assert bars_by_gid(fig)["nyc_foursquare|nextlocmoe|default|dist_mean_m"].get_height() == 3000.0
    assert "(m)" in data_axes(fig)[0].get_ylabel()


def test_supervised_error_bars_from_interval_metrics():
    rows = with_intervals(SUPERVISED)
    fig = plots.plot_supervised(tidy("supervised", rows))
    check_readable(fig)
    bars = bars_by_gid(fig)
    assert len(bars) == 24                          # the bounds are not bars of their own
    errors = error_bars(fig)
    assert len(errors) == len(SUPERVISED)           # one error-bar container per (dataset, method, variant)
    metrics = ["hit@1", "hit@5", "hit@10", "mrr"]
    for method, _kind, dataset, variant, values in rows:
        segments = errors[f"{dataset}|{method}|{variant}|interval"]
        assert len(segments) == len(metrics)
        for (centre, lo, hi), metric in zip(segments, metrics):
            bar = bars[f"{dataset}|{method}|{variant}|{metric}"]
            assert centre == pytest.approx(bar.get_x() + bar.get_width() / 2)
            assert (lo, hi) == pytest.approx((values[f"{metric}_lo"], values[f"{metric}_hi"]))
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert any("95%" in label for label in labels)
    # asking for a bound as a metric draws nothing extra; an old table (no bounds) draws no error bar
    fig = plots.plot_supervised(tidy("supervised", rows), metrics=("hit@1", "hit@1_lo", "hit@1_hi"))
    assert sorted(gid.rsplit("|", 1)[1] for gid in bars_by_gid(fig)) == ["hit@1"] * len(SUPERVISED)
    old = plots.plot_supervised(tidy("supervised", SUPERVISED))
    assert not error_bars(old) and not any("95%" in t.get_text() for t in old.legends[0].get_texts())


def test_error_bars_only_where_a_row_has_its_bounds():
    rows = with_intervals(SUPERVISED[:2]) + SUPERVISED[2:4]      # markov and popularity with bounds, ours without
    fig = plots.plot_supervised(tidy("supervised", rows))
    errors = error_bars(fig)
    assert set(errors) == {"synthetic|popularity|default|interval", "synthetic|markov|default|interval"}
    # a zero-width bound (Hit@1 of 0 with lo = 0) is a zero-length bar below, not an error
    zero = [("markov", "baseline", "A->B", "zero-shot", {"hit@1": 0.0, "hit@1_lo": 0.0, "hit@1_hi": 0.3,
                                                        "hit@5": 0.2, "hit@10": 0.3, "mrr": 0.1})]
    segments = error_bars(plots.plot_zero_shot(tidy("zero_shot", zero)))["A->B|markov|zero-shot|interval"]
    assert [(lo, hi) for _x, lo, hi in segments] == [(0.0, 0.3)]


# --- 03 zero-shot -----------------------------------------------------------------------------------

def test_zero_shot_pairs_and_variants():
    rows = [
        ("nextlocmoe", "paper method", "synthetic_A->synthetic_B", "zero-shot",
         {"hit@1": 0.0625, "hit@5": 0.0625, "hit@10": 0.125, "mrr": 0.0864}),
        ("nextlocmoe", "paper method", "synthetic_A->synthetic_B", "trained on target",
         {"hit@1": 0.0, "hit@5": 0.0, "hit@10": 0.125, "mrr": 0.0388}),
        ("llm_mob", "baseline", "synthetic_A->synthetic_B", "zero-shot (prompted, no training)",
         {"hit@1": 0.0, "hit@5": 0.0, "hit@10": 0.0, "mrr": 0.0051, "unparsable_fraction": 1.0}),
        ("nextlocmoe", "paper method", "nyc_west->nyc_east", "zero-shot",
         {"hit@1": 0.01, "hit@5": 0.05, "hit@10": 0.09, "mrr": 0.03}),
    ]
    fig = plots.plot_zero_shot(tidy("zero_shot", rows))
    check_readable(fig)
    axes = data_axes(fig)
    assert len(axes) == 2
    assert "synthetic_A" in axes[0].get_title() and "synthetic_B" in axes[0].get_title()
    assert "→" in axes[0].get_title()
    bars = bars_by_gid(fig)
    assert len(bars) == 3 * 4 + 1 * 4
    for method, _kind, dataset, variant, values in rows:
        for metric in ("hit@1", "hit@5", "hit@10", "mrr"):
            assert bars[f"{dataset}|{method}|{variant}|{metric}"].get_height() == pytest.approx(values[metric])
    # the two NextLocMoE variants share the colour family but are told apart
    zs = bars["synthetic_A->synthetic_B|nextlocmoe|zero-shot|mrr"].get_facecolor()
    tt = bars["synthetic_A->synthetic_B|nextlocmoe|trained on target|mrr"].get_facecolor()
    assert zs != tt
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "nextlocmoe · trained on target (paper method)" in labels


# --- 04 ablations -----------------------------------------------------------------------------------

ABLATION_ROWS = [
    ("nextlocmoe", "paper method", "synthetic", "full", {"hit@10": 0.25, "dist_median_m": 1600.0}),
    ("nextlocmoe", "ablation", "synthetic", "no_location_moe", {"hit@10": 0.5, "dist_median_m": 1300.0,
                                                                "paired_hit@10_p": 0.001}),
    ("nextlocmoe", "ablation", "synthetic", "no_personalized_moe", {"hit@10": 0.125, "dist_median_m": 1800.0,
                                                                    "paired_hit@10_p": 0.3}),
    ("nextlocmoe", "ablation", "synthetic", "topk_routing", {"hit@10": 0.25, "dist_median_m": 1600.0}),
]


def test_ablation_bars_and_printed_differences():
    fig = plots.plot_ablations(tidy("ablations", ABLATION_ROWS))
    check_readable(fig)
    (ax,) = data_axes(fig)
    assert len(ax.patches) == 4
    bars = bars_by_gid(fig)
    for _m, _k, dataset, variant, values in ABLATION_ROWS:
        assert bars[f"{dataset}|nextlocmoe|{variant}|hit@10"].get_width() == pytest.approx(values["hit@10"])
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[0] == "full" and ax.get_yticklabels()[0].get_fontweight() == "bold"
    texts = {round(t.get_position()[1]): t for t in ax.texts}
    assert "reference" in texts[0].get_text()
    assert "Δ +0.25, p = 0.001" in texts[1].get_text()          # 0.5 - 0.25
    assert "Δ -0.125, p = 0.3" in texts[2].get_text()           # 0.125 - 0.25
    assert "Δ +0)" in texts[3].get_text()                       # no paired test: no p
    # colour only where the paired test says beyond noise: a large drop with p = 0.3 stays grey
    green, grey = to_rgba("#1a7f37"), to_rgba("0.3")
    assert [to_rgba(texts[i].get_color()) for i in (1, 2, 3)] == [green, grey, grey]
    assert fig.get_suptitle().startswith("Ablations of NextLocMoE (nextlocmoe)\nHit@10")   # the title names the head


def test_ablation_floor_row_is_labelled_by_its_method_and_not_named_as_a_head():
    rows = ABLATION_ROWS + [("window_time", "baseline", "synthetic", "training-free floor", {"hit@10": 0.3})]
    fig = plots.plot_ablations(tidy("ablations", rows))
    (ax,) = data_axes(fig)
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[0] == "full" and labels[-1] == "window_time · training-free floor"   # head rows: variant only
    assert "window_time" not in fig.get_suptitle().splitlines()[0]
    # the full model is marked by a line at its value
    assert any(np.allclose(line.get_xdata(), 0.25) for line in ax.lines)


def test_ablations_lower_is_better_for_distances_and_errors():
    fig = plots.plot_ablations(tidy("ablations", ABLATION_ROWS), metric="dist_median_m")
    (ax,) = data_axes(fig)
    texts = {round(t.get_position()[1]): t for t in ax.texts}
    assert "Δ -300" in texts[1].get_text() and to_rgba(texts[1].get_color()) == to_rgba("0.3")   # no paired test
    assert "(m)" in ax.get_xlabel()
    table = tidy("ablations", ABLATION_ROWS)
    with pytest.raises(ConfigError, match="'full'"):
        plots.plot_ablations(table[table["variant"] != "full"])
    with pytest.raises(ConfigError, match="hit@20"):
        plots.plot_ablations(table, metric="hit@20")
    with pytest.raises(ConfigError, match="variant"):
        plots.plot_ablations(table.drop(columns="variant"))


def test_ablation_error_bars_from_interval_metrics():
    rows = [(m, k, d, v, {**values, "hit@10_lo": values["hit@10"] - 0.1, "hit@10_hi": values["hit@10"] + 0.1})
            for m, k, d, v, values in ABLATION_ROWS]
    fig = plots.plot_ablations(tidy("ablations", rows))
    check_readable(fig)
    (ax,) = data_axes(fig)
    assert len(ax.patches) == 4
    (segments,) = error_bars(fig).values()
    bars = bars_by_gid(fig)
    for (centre, lo, hi), (_m, _k, dataset, variant, values) in zip(segments, rows):
        bar = bars[f"{dataset}|nextlocmoe|{variant}|hit@10"]
        assert centre == pytest.approx(bar.get_y() + bar.get_height() / 2)
        assert (lo, hi) == pytest.approx((values["hit@10_lo"], values["hit@10_hi"]))
    # the printed value sits right of the whisker, inside the axes
    texts = {round(t.get_position()[1]): t for t in ax.texts}
    assert texts[1].get_position()[0] > 0.6 and ax.get_xlim()[1] > texts[1].get_position()[0]
    assert not error_bars(plots.plot_ablations(tidy("ablations", ABLATION_ROWS)))
    assert not error_bars(plots.plot_ablations(tidy("ablations", rows), metric="dist_median_m"))
    with pytest.raises(ConfigError, match="bound of an interval"):
        plots.plot_ablations(tidy("ablations", rows), metric="hit@10_lo")


# --- 05 efficiency ----------------------------------------------------------------------------------

EFFICIENCY_ROWS = [
    ("nextlocllm", "baseline", "synthetic", "inference + training",
     {"params_total": 241106.0, "train_samples_per_s": 62.3, "infer_samples_per_s_b1": 41.2,
      "infer_samples_per_s_b4": 163.7, "infer_samples_per_s_b16": 188.2, "infer_samples_per_s_best": 188.2,
      "latency_ms_b1": 24.2, "peak_memory_train_mib": 1134.4}),
    ("nextlocmoe", "paper method", "synthetic", "inference + training",
     {"params_total": 1775353.0, "train_samples_per_s": 0.72, "infer_samples_per_s_b1": 0.178,
      "infer_samples_per_s_b4": 23.9, "infer_samples_per_s_b16": 15.9, "infer_samples_per_s_best": 23.9,
      "latency_ms_b1": 5627.9, "peak_memory_train_mib": 1262.7}),
    ("llm_mob", "baseline", "synthetic", "generation",
     {"gen_samples_per_s_b1": 0.507, "gen_samples_per_s_b4": 19.9, "gen_samples_per_s_best": 19.9,
      "prompt_tokens": 832.0, "new_tokens": 30.0}),
    ("nextlocmoe_vs_llm_mob", "comparison", "synthetic", "samples/s ratio",
     {"speedup_vs_generation_b1": 47.13, "speedup_best_vs_best": 1.2}),
]


def test_efficiency_throughput_sweep_and_ratios():
    fig = plots.plot_efficiency(tidy("efficiency", EFFICIENCY_ROWS))
    check_readable(fig)
    ax_bar, ax_sweep, ax_ratio = data_axes(fig)
    bars = bars_by_gid(fig)
    expected = {
        "nextlocmoe|inference + training|train_samples_per_s": 0.72,
        "nextlocmoe|inference + training|infer_samples_per_s_b1": 0.178,
        "nextlocllm|inference + training|infer_samples_per_s_best": 188.2,
        "llm_mob|generation|gen_samples_per_s_b1": 0.507,       # LLM-Mob's batch-1 bar is its generation speed
        "llm_mob|generation|gen_samples_per_s_best": 19.9,
        "nextlocmoe_vs_llm_mob|samples/s ratio|speedup_vs_generation_b1": 47.13,
        "nextlocmoe_vs_llm_mob|samples/s ratio|speedup_best_vs_best": 1.2,
    }
    for gid, value in expected.items():
        assert bars[f"synthetic|{gid}"].get_height() == pytest.approx(value)
    assert len(ax_ratio.patches) == 2
    # values from 0.18 to 188 samples/s span three decades: log scale
    assert ax_bar.get_yscale() == "log" and ax_ratio.get_yscale() == "log"
    # the sweep: one line per method with a batch sweep, x = batch sizes, y = samples/s
    lines = {line.get_label(): line for line in ax_sweep.lines}
    assert list(lines["nextlocmoe"].get_xdata()) == [1, 4, 16]
    assert list(lines["nextlocmoe"].get_ydata()) == pytest.approx([0.178, 23.9, 15.9])
    assert list(lines["llm_mob"].get_xdata()) == [1, 4]
    texts = [t.get_text() for t in ax_ratio.texts]
    assert "47.1×" in texts
    # the paper's claim and the 1x line are drawn on the ratio panel
    assert sorted(round(line.get_ydata()[0]) for line in ax_ratio.lines) == [1, 600]


def test_efficiency_errors():
    table = tidy("efficiency", EFFICIENCY_ROWS)
    with pytest.raises(ConfigError, match="nextlocmoe_vs_llm_mob"):
        plots.plot_efficiency(table[table["method"] != "nextlocmoe_vs_llm_mob"])
    with pytest.raises(ConfigError, match="throughput"):
        plots.plot_efficiency(table[~table["metric"].str.contains("samples_per_s")])
    two = pd.concat([table, table.assign(dataset="nyc")])
    with pytest.raises(ConfigError, match="dataset="):
        plots.plot_efficiency(two)
    assert bars_by_gid(plots.plot_efficiency(two, dataset="nyc"))["nyc|nextlocmoe|inference + training|"
                                                                   "train_samples_per_s"].get_height() == 0.72


# --- 01 training ------------------------------------------------------------------------------------

def training_frames():
    history = pd.DataFrame({
        "epoch": [1, 2, 3], "train_loss": [9.0, 8.0, 7.5], "train_cross_entropy": [8.9, 7.9, 7.4],
        "train_pmoe_entropy": [0.1, 0.05, 0.02], "train_location_entropy": [1.6, 1.5, 1.4],
        "val_hit@1": [0.02, 0.04, 0.03], "val_hit@5": [0.05, 0.09, 0.08], "val_hit@10": [0.07, 0.12, 0.11],
        "val_hit@20": [0.1, 0.15, 0.14], "val_mrr": [0.04, 0.06, 0.05], "val_n": [500, 500, 500],
        "lr": [1e-3, 1e-3, 5e-4], "seconds": [250.0, 240.0, 245.0]})
    steps = pd.DataFrame({"epoch": np.repeat([1, 2, 3], 10), "step": np.arange(1, 31),
                          "loss": np.linspace(9, 7, 30), "cross_entropy": np.linspace(8.9, 6.9, 30),
                          "pmoe_entropy": np.full(30, 0.1), "location_entropy": np.full(30, 1.5)})
    return history, steps


def test_training_curves_lines_and_epoch_marks():
    history, steps = training_frames()
    fig = plots.plot_training_curves(history, steps)
    check_readable(fig)
    ax_loss, ax_val = data_axes(fig)
    raw = next(line for line in ax_loss.lines if line.get_label() == "loss (per batch)")
    assert list(raw.get_ydata()) == pytest.approx(list(np.linspace(9, 7, 30)))
    boundaries = sorted(float(line.get_xdata()[0]) for line in ax_loss.lines
                        if line.get_linestyle() == ":" and len(set(line.get_xdata())) == 1)
    assert boundaries == [10.5, 20.5]                 # epochs 2 and 3 start at steps 11 and 21
    assert "nats" in ax_loss.get_ylabel()             # cross_entropy: the ranking head's loss
    curves = {line.get_label(): line for line in ax_val.lines}
    for k in (1, 5, 10):
        assert list(curves[f"Hit@{k}"].get_ydata()) == pytest.approx(list(history[f"val_hit@{k}"]))
    best = next(line for label, line in curves.items() if label.startswith("best: epoch 2"))
    assert best.get_xdata()[0] == 2                   # argmax of val_hit@10 (no train_windows column: x = epoch)
    # with the untrained start and training windows: x in windows, the start can be the best point
    start = pd.concat([history.iloc[:1].assign(epoch=0, **{"val_hit@10": 0.5}), history], ignore_index=True)
    start["train_windows"] = [0, 256, 512, 768]
    ax_val = data_axes(plots.plot_training_curves(start, steps))[1]
    best = next(line for line in ax_val.lines if line.get_label().startswith("best: the untrained start"))
    assert best.get_xdata()[0] == 0 and "training windows" in ax_val.get_xlabel()
    # floors on the same validation windows: a line per floor at its Hit@1 and Hit@10, the axis reaching them;
    # a regression run (train_distance_m) gets the median-error panel with the floors' errors
    floors = pd.DataFrame([{"floor": "window_time", "val_hit@1": 0.6, "val_hit@10": 0.9, "val_dist_median_m": 800.0}])
    regression = start.assign(train_distance_m=100.0, val_dist_median_m=[900.0, 950.0, 1000.0, 990.0])
    fig = plots.plot_training_curves(regression, steps, floors=floors)
    check_readable(fig)
    ax_val, ax_dist = data_axes(fig)[1:]
    levels = sorted(float(line.get_ydata()[0]) for line in ax_val.lines if list(line.get_xdata()) == [0, 1])
    assert levels == [0.6, 0.9] and ax_val.get_ylim()[1] >= 0.9
    assert "floor: window_time (Hit@1, Hit@10)" in [line.get_label() for line in ax_val.lines]
    assert list(ax_dist.lines[0].get_ydata()) == [900.0, 950.0, 1000.0, 990.0]
    assert ax_dist.lines[1].get_ydata()[0] == 800.0 and "(m)" in ax_dist.get_ylabel()


def test_training_curves_without_steps_and_errors():
    history, steps = training_frames()
    fig = plots.plot_training_curves(history, None)
    ax_loss = data_axes(fig)[0]
    assert list(ax_loss.lines[0].get_ydata()) == [9.0, 8.0, 7.5]
    with pytest.raises(ConfigError, match="val_hit@5"):
        plots.plot_training_curves(history.drop(columns="val_hit@5"), steps)
    with pytest.raises(ConfigError, match="loss"):
        plots.plot_training_curves(history, steps.drop(columns="loss"))
    with pytest.raises(ConfigError, match="train_loss"):
        plots.plot_training_curves(history.drop(columns="train_loss"), None)


# --- 06 expert visualisation ------------------------------------------------------------------------

def role_frame(with_name=True):
    roles = ["Visitor", "Student", "Undefined"]         # deliberately not in ROLES order
    rows = []
    for layer in (8, 10):
        for r, role in enumerate(roles):
            for e in range(4):
                rows.append({"role": role, "layer": layer, "expert": e, "expert_name": ROLES[e],
                             "mean_prob": 0.01 * (layer + 3 * r + e), "selected_rate": 0.1 * e, "n_tokens": 45})
    frame = pd.DataFrame(rows)
    return frame if with_name else frame.drop(columns="expert_name")


def test_role_expert_heatmap_cells():
    df = role_frame()
    fig = plots.plot_role_expert_heatmap(df)
    check_readable(fig)
    axes = data_axes(fig)
    assert [ax.get_title() for ax in axes] == ["P-MoE layer 8", "P-MoE layer 10"]
    order = ["Student", "Visitor", "Undefined"]          # schema.ROLES order
    assert [t.get_text() for t in axes[0].get_yticklabels()] == order
    for ax, layer in zip(axes, (8, 10)):
        cells = heatmap_cells(ax)
        assert cells.shape == (3, 4)
        for i, role in enumerate(order):
            r = ["Visitor", "Student", "Undefined"].index(role)
            assert cells[i] == pytest.approx([0.01 * (layer + 3 * r + e) for e in range(4)])
        assert len(ax.texts) == 12                      # annotated
    assert axes[0].get_xticklabels()[1].get_text() == "1: Teacher"
    # one shared colour scale, one colour bar
    assert len(fig.axes) == 3
    selected = plots.plot_role_expert_heatmap(role_frame(with_name=False), value="selected_rate")
    assert heatmap_cells(data_axes(selected)[0])[0] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    with pytest.raises(ConfigError, match="selected_rate"):
        plots.plot_role_expert_heatmap(df.drop(columns="selected_rate"))


def test_function_gate_heatmap_is_row_normalised():
    raw = np.array([[0.5, 0.2, 0.1, 0.1, 0.1],
                    [0.1, 0.6, 0.1, 0.1, 0.1],
                    [2.0, 1.0, 1.0, 0.0, 0.0],          # does not sum to 1: normalising shows 0.5, 0.25, ...
                    [np.nan] * 5,                        # a category without tokens
                    [0.2, 0.2, 0.2, 0.2, 0.2]])
    rows = [{"function": f, "expert": e, "mean_prob": raw[i, j], "n_tokens": 0 if i == 3 else 100 + i}
            for i, f in enumerate(FUNCTIONS) for j, e in enumerate(FUNCTIONS)]
    fig = plots.plot_function_gate_heatmap(pd.DataFrame(rows))
    check_readable(fig)
    (ax,) = data_axes(fig)
    cells = heatmap_cells(ax)
    assert cells.shape == (5, 5)
    assert cells[2] == pytest.approx([0.5, 0.25, 0.25, 0.0, 0.0])
    assert cells[0] == pytest.approx(raw[0])
    assert np.isnan(cells[3]).all()
    assert sum(t.get_text() == "no tokens" for t in ax.texts) == 1
    assert sum(t.get_text() == "0.25" for t in ax.texts) == 2
    outlined = [p for p in ax.patches if isinstance(p, Rectangle) and not p.get_fill()]
    assert len(outlined) == 5                           # category == expert on the diagonal
    assert "n=102" in ax.get_yticklabels()[2].get_text()
    with pytest.raises(ConfigError, match="n_tokens"):
        plots.plot_function_gate_heatmap(pd.DataFrame(rows).drop(columns="n_tokens"))


def test_active_expert_bars_and_means():
    rows = []
    for layer in (8, 10):
        for kind, counts in (("history", [30, 60, 10]), ("current", [5, 0, 5])):
            for n, c in zip((1, 2, 3), counts):
                rows.append({"layer": layer, "token_kind": kind, "n_active": n, "tokens": c,
                             "share": c / sum(counts)})
    fig = plots.plot_active_experts(pd.DataFrame(rows))
    check_readable(fig)
    axes = data_axes(fig)
    assert len(axes) == 2
    bars = bars_by_gid(fig)
    assert len(bars) == 2 * 2 * 3
    assert bars["8|history|2"].get_height() == pytest.approx(0.6)
    assert bars["10|current|3"].get_height() == pytest.approx(0.5)
    legend = [t.get_text() for t in axes[0].get_legend().get_texts()]
    # means: history (30*1 + 60*2 + 10*3) / 100 = 1.8; current (5*1 + 5*3) / 10 = 2.0
    assert legend == ["history tokens (mean 1.80)", "current tokens (mean 2.00)"]
    with pytest.raises(ConfigError, match="token_kind"):
        plots.plot_active_experts(pd.DataFrame(rows).drop(columns="token_kind"))

    # with the kept mass: a second row of panels, one step line per token kind, the threshold marked
    mass = pd.DataFrame([{"layer": layer, "token_kind": kind, "mass_lo": lo, "mass_hi": lo + 0.5, "tokens": 1,
                          "share": 0.5} for layer in (8, 10) for kind in ("history", "current") for lo in (0.0, 0.5)])
    fig = plots.plot_active_experts(pd.DataFrame(rows), kept_mass=mass, threshold=0.8, title="routing of nextlocmoe_ranking on nyc")
    check_readable(fig)
    assert len(data_axes(fig)) == 4 and fig.get_suptitle() == "routing of nextlocmoe_ranking on nyc"
    lower = data_axes(fig)[2]
    assert {a.get_gid() for a in lower.patches} == {"8|history|mass", "8|current|mass"}
    assert any(np.allclose(line.get_xdata(), 0.8) for line in lower.lines)


def test_routing_entropy_lines_epochs_and_uniform_levels():
    steps = np.arange(1, 13)
    df = pd.DataFrame({"step": steps, "epoch": np.repeat([1, 2, 3], 4),
                       "pmoe_entropy": np.linspace(2.3, 1.0, 12), "location_entropy": np.nan,
                       "pmoe_entropy_smooth": np.linspace(2.2, 1.1, 12), "location_entropy_smooth": np.nan})
    fig = plots.plot_routing_entropy(df, title="nextlocmoe_ranking on nyc")
    check_readable(fig)
    assert "(nextlocmoe_ranking on nyc)" in fig.get_suptitle()
    (ax,) = data_axes(fig)
    labels = [line.get_label() for line in ax.lines]
    assert not any("Location" in label for label in labels)       # all-NaN entropy is left out
    lines = {line.get_label(): line for line in ax.lines}
    smooth, raw = lines["Personalized MoE (role gate), smoothed"], lines["Personalized MoE (role gate), per batch"]
    assert list(smooth.get_ydata()) == pytest.approx(list(np.linspace(2.2, 1.1, 12)))
    assert list(raw.get_ydata()) == pytest.approx(list(np.linspace(2.3, 1.0, 12)))     # in the legend, visible
    assert raw.get_marker() == "."
    uniform = next(line for line in ax.lines if line.get_label().startswith("uniform over 11"))
    assert uniform.get_ydata()[0] == pytest.approx(math.log(11))
    boundaries = sorted(float(line.get_xdata()[0]) for line in ax.lines if line.get_linestyle() == "--")
    assert boundaries == [4.5, 8.5]
    # the paper's loss beside it: one dashed black line per batch, in the legend
    paper = df.assign(pmoe_entropy=np.geomspace(2.3, 0.001, 12))
    fig = plots.plot_routing_entropy(df, title="nextlocmoe_ranking on nyc", paper_loss=paper)
    (ax,) = data_axes(fig)
    line = next(ln for ln in ax.lines if "paper's loss" in ln.get_label())
    assert list(line.get_ydata()) == pytest.approx(list(np.geomspace(2.3, 0.001, 12))) and line.get_color() == "black"
    with pytest.raises(ConfigError, match="paper_loss"):
        plots.plot_routing_entropy(df, paper_loss=paper.drop(columns="pmoe_entropy"))
    with pytest.raises(ConfigError, match="pmoe_entropy_smooth"):
        plots.plot_routing_entropy(df.drop(columns="pmoe_entropy_smooth"))
    with pytest.raises(ConfigError, match="no finite"):
        plots.plot_routing_entropy(df.assign(pmoe_entropy=np.nan))


def test_prediction_map_points_and_lines():
    df = pd.DataFrame({"window": [5, 9, 2, 7],
                       "target_x": [0.0, 1000.0, 2000.0, 500.0], "target_y": [0.0, 0.0, 1000.0, 500.0],
                       "pred_x": [100.0, 900.0, np.nan, 600.0], "pred_y": [50.0, 100.0, np.nan, 400.0],
                       "top1_x": [0.0, 1000.0, 1500.0, 500.0], "top1_y": [0.0, 500.0, 1000.0, 1000.0],
                       "hit1": [True, False, False, False], "hit10": [True, True, False, True],
                       "error_m": [0.0, 500.0, 500.0, 500.0]})
    candidates = np.array([[0.0, 0.0], [1000.0, 0.0], [1000.0, 500.0], [1500.0, 1000.0], [500.0, 1000.0]])
    fig = plots.plot_prediction_map(df, candidates)
    check_readable(fig)
    ax_map, ax_err = data_axes(fig)
    (segments,) = [line for line in ax_map.lines]
    xs = np.asarray(segments.get_xdata(), dtype=float).reshape(-1, 3)
    ys = np.asarray(segments.get_ydata(), dtype=float).reshape(-1, 3)
    # each window: target -> regressed point, or -> top-1 place where there is no regressed point (row 3)
    assert xs[:, :2] == pytest.approx(np.array([[0, 100], [1000, 900], [2000, 1500], [500, 600]], dtype=float))
    assert ys[:, :2] == pytest.approx(np.array([[0, 50], [0, 100], [1000, 1000], [500, 400]], dtype=float))
    groups = {c.get_label(): len(c.get_offsets()) for c in ax_map.collections}
    assert groups == {"candidate location": 5, "true next location": 4, "regressed point": 3,
                      "top-1 place (miss)": 3, "top-1 place (hit)": 1}
    assert sum(p.get_height() for p in ax_err.patches) == 4        # histogram counts every window
    assert "Hit@1 = 0.250" in fig._suptitle.get_text() and "Hit@10 = 0.750" in fig._suptitle.get_text()
    with pytest.raises(ConfigError, match="error_m"):
        plots.plot_prediction_map(df.drop(columns="error_m"))
    with pytest.raises(ConfigError, match="candidates"):
        plots.plot_prediction_map(df, np.zeros((3, 3)))


# --- 00 data ----------------------------------------------------------------------------------------

def tiny_mobility_data():
    locations = pd.DataFrame({"x": [0.0, 500.0, 1000.0, 1500.0], "y": [0.0, 0.0, 500.0, 500.0],
                              "lat": np.nan, "lon": np.nan,
                              "function": ["Residential", "Commercial", "Commercial", "Unknown"],
                              "name": ["a", "b", "c", "d"]})
    user = np.array([0] * 5 + [1] * 2 + [2] * 9)
    location = np.arange(len(user)) % 4
    records = pd.DataFrame({"user": user,
                            "timestamp": pd.Timestamp("2024-01-01") + pd.to_timedelta(np.arange(len(user)), "h"),
                            "x": locations["x"].to_numpy()[location], "y": locations["y"].to_numpy()[location],
                            "lat": np.nan, "lon": np.nan, "location": location,
                            "function": locations["function"].to_numpy()[location]})
    return MobilityData(name="tiny", records=records, locations=locations, source="hand", checksum="0")


def test_dataset_overview_from_records_and_from_windows():
    fig = plots.plot_dataset_overview(tiny_mobility_data())
    check_readable(fig)
    ax_map, ax_hist = data_axes(fig)
    groups = {c.get_label(): c for c in ax_map.collections}
    assert set(groups) == {"Residential (1)", "Commercial (2)", "Unknown (1)"}
    assert groups["Unknown (1)"].get_facecolor()[0] == pytest.approx(to_rgba(plots.FUNCTION_COLORS["Unknown"], 0.8))
    assert np.asarray(groups["Commercial (2)"].get_offsets()).tolist() == [[500.0, 0.0], [1000.0, 500.0]]
    assert sum(p.get_height() for p in ax_hist.patches) == 3          # three users
    assert "metres" in ax_map.get_xlabel() or "(m)" in ax_map.get_xlabel()
    assert "tiny" in fig._suptitle.get_text()

    # a Windows-like object: candidates + function codes (-1 = Unknown) + per-record sub-users
    windows = SimpleNamespace(candidates=np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]),
                              candidate_function=np.array([FUNCTIONS.index("Education"), -1, 0]),
                              subuser=np.array([0, 0, 1, 1, 1, 2]), subuser_user=np.array([0, 0, 1]),
                              meta={"dataset": "win"})
    fig = plots.plot_dataset_overview(windows)
    ax_map, ax_hist = data_axes(fig)
    assert {c.get_label() for c in ax_map.collections} == {"Education (1)", "Unknown (1)", "Entertainment (1)"}
    assert sum(p.get_height() for p in ax_hist.patches) == 2          # sub-users 0, 1 -> user 0; 2 -> user 1
    with pytest.raises(ConfigError, match="MobilityData"):
        plots.plot_dataset_overview(pd.DataFrame())


# --- saving -----------------------------------------------------------------------------------------

def test_save_figure_writes_a_png_atomically(tmp_path):
    fig = plots.plot_supervised(tidy("supervised", SUPERVISED))
    target = tmp_path / "new" / "dir" / "supervised.png"
    out = plots.save_figure(fig, target, dpi=60)
    assert out == target and target.is_file()
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in target.parent.iterdir()] == ["supervised.png"]   # no temp file left behind
    with pytest.raises(ConfigError, match=".png"):
        plots.save_figure(fig, tmp_path / "figure.pdf")
    with pytest.raises(ConfigError, match="dpi"):
        plots.save_figure(fig, tmp_path / "figure.png", dpi=0)
    assert not (tmp_path / "figure.png").exists()


def test_moe_benchmark_bars_equal_the_ratios():
    from nextlocmoe.report.figures import plot_moe_benchmark

    table = pd.DataFrame({
        "width": ["smollm2"] * 3 + ["llama3.2-3b"] * 2, "tokens": [2560] * 3 + [80] * 2,
        "method": ["ffn", "moe_threshold", "naive_threshold", "ffn", "moe_topk2"],
        "x_ffn": [1.0, 2.95, 18.7, 1.0, 1.16], "expert_compute": ["dense_ffn", "grouped", "naive", "dense_ffn", "pairs"],
        "active_experts": [np.nan, 5.0, 5.0, np.nan, 2.0]})
    fig = plot_moe_benchmark(table)
    bars = {p.get_gid(): p.get_width() for ax in fig.axes for p in ax.patches if p.get_gid()}
    assert bars == {"smollm2|ffn|dense_ffn": 1.0, "smollm2|moe_threshold|grouped": 2.95,
                    "smollm2|naive_threshold|naive": 18.7, "llama3.2-3b|ffn|dense_ffn": 1.0,
                    "llama3.2-3b|moe_topk2|pairs": 1.16}
    with pytest.raises(ConfigError, match="x_ffn"):
        plot_moe_benchmark(table.drop(columns="x_ffn"))


# --- learning curves --------------------------------------------------------------------------------

def test_learning_curves_draw_each_point_and_each_floor_with_its_band():
    rows = []
    for w, h, m in ((0, 0.18, 0.28), (1024, 0.19, 0.29), (2048, 0.20, 0.30)):
        rows.append({"curve": "nextlocmoe_ranking/nyc", "kind": "model", "method": "nextlocmoe_ranking",
                     "point": w // 1024, "train_windows": w, "hit@1": h, "hit@1_lo": h - 0.02, "hit@1_hi": h + 0.02,
                     "hit@10": 0.5, "mrr": m, "mrr_lo": m - 0.02, "mrr_hi": m + 0.02, "n": 1000})
    for name, h, m in (("user_most_frequent", 0.14, 0.24), ("window_time", 0.185, 0.285)):
        rows.append({"curve": "nextlocmoe_ranking/nyc", "kind": "floor", "method": name, "point": None,
                     "train_windows": None, "hit@1": h, "hit@1_lo": h - 0.02, "hit@1_hi": h + 0.02, "hit@10": 0.5,
                     "mrr": m, "mrr_lo": m - 0.02, "mrr_hi": m + 0.02, "n": 1000})
    table = pd.DataFrame(rows)
    fig = plots.plot_learning_curves(table)
    check_readable(fig)
    ax_hit, ax_mrr = data_axes(fig)
    line = next(l for l in ax_hit.lines if l.get_label() == "nextlocmoe_ranking (validation)")
    assert list(line.get_xdata()) == [0, 1024, 2048] and list(line.get_ydata()) == pytest.approx([0.18, 0.19, 0.20])
    floor = next(l for l in ax_mrr.lines if l.get_label().startswith("window_time"))
    assert floor.get_ydata()[0] == pytest.approx(0.285)
    with pytest.raises(ConfigError, match="mrr_lo"):
        plots.plot_learning_curves(table.drop(columns="mrr_lo"))
    # by dataset: a second model's curve on the same validation windows joins the same panel, the floors once
    other = table.assign(curve="transformer_pointer/nyc", method=table["method"].where(table["kind"] == "floor",
                                                                                        "transformer_pointer"))
    other.loc[other["kind"] == "model", "hit@1"] += 0.01
    both = pd.concat([table, other], ignore_index=True).assign(dataset="nyc")
    fig = plots.plot_learning_curves(both, by="dataset")
    check_readable(fig)
    ax_hit, _ = data_axes(fig)
    labels = [l.get_label() for l in ax_hit.lines]
    assert "nextlocmoe_ranking (validation), best 0.200" in labels
    assert "transformer_pointer (validation), best 0.210" in labels
    assert sum(label.startswith("window_time") for label in labels) == 1
    assert ax_hit.get_title() == "nyc: nextlocmoe_ranking vs transformer_pointer"
    with pytest.raises(ConfigError, match="by="):
        plots.plot_learning_curves(both, by="method")


def test_curve_summary_finds_the_best_point_where_it_flattens_and_compares_with_the_floor():
    from nextlocmoe.experiments.learning_curve import curve_summary
    rows = [{"curve": "m/d", "kind": "model", "method": "m", "train_windows": w, "hit@1": h, "mrr": m,
             "mrr_lo": m - 0.01, "mrr_hi": m + 0.01}
            for w, h, m in ((0, 0.10, 0.200), (100, 0.12, 0.230), (200, 0.13, 0.248), (300, 0.13, 0.250),
                            (400, 0.12, 0.246))]
    rows.append({"curve": "m/d", "kind": "floor", "method": "window_time", "train_windows": None, "hit@1": 0.11,
                 "mrr": 0.235, "mrr_lo": 0.225, "mrr_hi": 0.245})
    s = curve_summary(pd.DataFrame(rows)).iloc[0]
    assert s["best_train_windows"] == 300 and s["flattens_at"] == 200 and s["points"] == 4
    assert s["start_mrr"] == 0.2 and s["window_time_mrr"] == 0.235 and bool(s["beats_floor"])   # 0.240 > 0.235
    rows[3]["mrr_lo"] = 0.23
    assert not bool(curve_summary(pd.DataFrame(rows)).iloc[0]["beats_floor"])
