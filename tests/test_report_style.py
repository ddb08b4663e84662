"""The report layer stands on its own: it loads no training stack, and it has a style for every method.

The first test imports the report in a fresh interpreter (this test process has torch loaded already by
other tests, so `sys.modules` here says nothing). The second is the one place that reads both the experiments
registry and the report's style table: the registry says what a method is, the report how it is drawn.
"""

import subprocess
import sys

from matplotlib.colors import is_color_like

from nextlocmoe.report.style import FALLBACK_COLORS, METHOD_STYLES, method_color

HEAVY = ("torch", "nextlocmoe.train", "transformers", "accelerate")


def test_the_report_imports_without_torch_or_the_training_stack():
    code = ("import nextlocmoe.report.figures, nextlocmoe.report.summaries, nextlocmoe.report.paper, sys; "
            f"bad=[m for m in {HEAVY!r} if m in sys.modules]; assert not bad, bad")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_also_without_the_experiments_package():
    code = ("import nextlocmoe, nextlocmoe.report, nextlocmoe.report.figures, nextlocmoe.report.routing_figures, "
            "nextlocmoe.report.summaries, sys; "
            "bad=[m for m in sys.modules if m.startswith('nextlocmoe.experiments') or m == 'nextlocmoe.model']; "
            "assert not bad, bad")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_every_registered_method_has_a_style_and_every_style_a_method():
    from nextlocmoe.experiments import METHODS

    missing = sorted(set(METHODS) - set(METHOD_STYLES))
    assert not missing, f"methods without a colour in nextlocmoe/report/style.py: {missing}"
    stale = sorted(set(METHOD_STYLES) - set(METHODS))
    assert not stale, f"styles of methods the registry does not have: {stale}"
    for name, style in METHOD_STYLES.items():
        assert is_color_like(style.color), (name, style.color)
    colours = [style.color for style in METHOD_STYLES.values()]
    assert len(set(colours)) == len(colours), "two methods share a colour"
    # the emphasised rows are the paper's model and its extension, as the registry's kinds say
    ours = {name for name, m in METHODS.items() if m.kind in ("paper method", "extension")}
    assert {name for name, style in METHOD_STYLES.items() if style.emphasised} == ours


def test_an_unknown_method_gets_a_stable_fallback_colour():
    assert method_color("a_method_added_in_a_notebook") in FALLBACK_COLORS
    assert method_color("a_method_added_in_a_notebook") == method_color("a_method_added_in_a_notebook")
