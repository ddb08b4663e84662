"""The notebooks: structure, no logic of their own, committed outputs that agree with results/ and figures/,
and the papermill runner (failure names the notebook and cell; paths are scrubbed; nothing half-written).

Executing every notebook on the smoke profile is `make test`'s second step (`nextlocmoe notebooks --profile
smoke`, then nbval); here one tiny notebook exercises the runner itself.
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import nbformat
import pytest

from nextlocmoe.errors import ConfigError, NextLocMoEError
from nextlocmoe.notebooks import (NOTEBOOKS, SHOWS_TAG, absolute_paths, check_executed, layout_for, project_root,
                                  run_notebooks, scrub)

ROOT = project_root(Path(__file__).parent)
PARAMETERS = {"profile", "results_dir", "figures_dir", "runs_dir", "force", "device"}

pytestmark = pytest.mark.slow      # the notebooks tier: make test-fast skips this file, make test runs it


def load(name: str) -> nbformat.NotebookNode:
    return nbformat.read(ROOT / "notebooks" / name, as_version=4)


def code_cells(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_opens_with_its_purpose_and_a_parameters_cell(name):
    nb = load(name)
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith(f"# {name[:2]}")
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters' (papermill injects after it)"
    assigned = {t.id for node in ast.parse(tagged[0].source).body for t in node.targets}
    assert assigned == PARAMETERS
    assert nb.cells[-1].cell_type == "markdown", "a notebook ends by saying what the numbers mean"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebooks_hold_no_logic_of_their_own(name):
    """Functions, classes and loops over data belong in the library; a notebook calls it and draws."""
    for cell in code_cells(load(name)):
        source = "\n".join(line for line in cell.source.splitlines() if not line.lstrip().startswith("%"))
        tree = ast.parse(source)
        defined = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.Lambda))]
        assert not defined, f"{name}: cell defines {[getattr(n, 'name', 'lambda') for n in defined]}"


def test_every_notebook_writes_its_figures_under_stable_names():
    for name in NOTEBOOKS:
        sources = "\n".join(c.source for c in code_cells(load(name)))
        assert f'figures_dir / "{name[:2]}_' in sources or f'figures_dir / f"{name[:2]}_' in sources, name


# ---------------------------------------------------------------------------------------------------
# committed outputs

def test_committed_notebooks_show_the_committed_results_and_figures():
    """The executed notebooks in notebooks/ are the run that wrote results/ and figures/: every table a
    notebook shows is the file's current text and every figure it shows is the file's bytes."""
    assert check_executed(ROOT / "notebooks", ROOT / "results", ROOT / "figures") == []


def test_committed_results_name_the_profile_of_the_notebooks():
    for name in NOTEBOOKS:
        nb = load(name)
        injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
        assert injected and 'profile = "cpu"' in injected[0].source, f"{name} was not executed on the cpu profile"
        for cell in code_cells(nb):
            for tag in cell.metadata.get("tags", []):
                if tag.startswith(SHOWS_TAG):
                    sidecar = (ROOT / "results" / tag[len(SHOWS_TAG):]).with_suffix(".json")
                    assert json.loads(sidecar.read_text())["profile"] == "cpu", sidecar


def test_check_executed_finds_a_table_that_changed(tmp_path):
    """check_executed can fail: a results file edited after the run no longer matches the notebook."""
    for sub in ("notebooks", "results", "figures"):
        (tmp_path / sub).mkdir()
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("show_table(results_dir / 't.md')", metadata={"tags": [f"{SHOWS_TAG}t.md"]})
    cell.outputs = [nbformat.v4.new_output("display_data", data={"text/markdown": "| a |\n| 1 |\n",
                                                                   "text/plain": "| a |\n| 1 |\n"})]
    png = b"\x89PNG\r\n\x1a\nfake"
    figure_cell = nbformat.v4.new_code_cell("display(Image(...))")
    figure_cell.outputs = [nbformat.v4.new_output("display_data", data={
        "image/png": __import__("base64").b64encode(png).decode(), "text/plain": "<Image>"})]
    nb.cells = [cell, figure_cell]
    nbformat.write(nb, tmp_path / "notebooks" / "x.ipynb")
    (tmp_path / "results" / "t.md").write_text("| a |\n| 1 |\n")
    (tmp_path / "figures" / "f.png").write_bytes(png)
    args = (tmp_path / "notebooks", tmp_path / "results", tmp_path / "figures", ["x.ipynb"])
    assert check_executed(*args) == []
    (tmp_path / "results" / "t.md").write_text("| a |\n| 2 |\n")
    (tmp_path / "figures" / "f.png").write_bytes(png + b"changed")
    problems = check_executed(*args)
    assert len(problems) == 2 and "t.md" in problems[0] and "figure" in problems[1]


def test_no_absolute_machine_paths_in_the_repository_notebooks():
    for name in NOTEBOOKS:
        assert absolute_paths(ROOT / "notebooks" / name) == [], name


def test_scrub_replaces_root_home_and_interpreter_paths():
    text = f"{ROOT}/results/x.csv and {Path.home()}/.cache and {sys.prefix}/lib/site-packages/torch"
    out = scrub(text)
    assert str(ROOT) not in out and "./results/x.csv" in out and "<env>/lib/site-packages" in out
    assert absolute_paths_in(out) == []


def absolute_paths_in(text: str) -> list[str]:
    from nextlocmoe.notebooks import ABSOLUTE_PATH
    return ABSOLUTE_PATH.findall(text)


# ---------------------------------------------------------------------------------------------------
# the runner

def test_layout_keeps_non_published_profiles_out_of_the_committed_tree():
    assert layout_for("cpu").results == Path("results") and layout_for("cpu").notebooks == Path("notebooks")
    smoke = layout_for("smoke")
    assert smoke.results == Path("runs/notebooks/smoke/results") and smoke.figures.parts[:3] == ("runs", "notebooks",
                                                                                                 "smoke")
    assert layout_for("gpu", out=".").results == Path("results")
    with pytest.raises(ConfigError, match="relative"):
        layout_for("smoke", out=Path.cwd().anchor + "x")   # any absolute path


def _tiny_notebook(path: Path, body: str) -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    params = nbformat.v4.new_code_cell('profile = "cpu"\nresults_dir = "results"\nfigures_dir = "figures"\n'
                                       'runs_dir = "runs/experiments"\nforce = False\ndevice = "auto"',
                                       metadata={"tags": ["parameters"]})
    nb.cells = [nbformat.v4.new_markdown_cell("# 00 tiny"), params, nbformat.v4.new_code_cell(body)]
    nbformat.write(nb, path)


@pytest.mark.slow
def test_runner_injects_parameters_scrubs_paths_and_names_the_failing_cell(tmp_path, monkeypatch):
    # The runner works in the project root it finds above the cwd; a throwaway one in tmp_path keeps the
    # checkout's runs/ untouched (only the markers project_root looks for: pyproject.toml and nextlocmoe/).
    root = tmp_path / "project"
    (root / "nextlocmoe").mkdir(parents=True)
    (root / "pyproject.toml").write_text("")
    monkeypatch.chdir(root)
    assert project_root() == root.resolve()
    source = tmp_path / "src"
    source.mkdir()
    out = Path("runs/notebooks/test-runner")
    _tiny_notebook(source / NOTEBOOKS[0], "import os\nprint(profile, results_dir)\nprint(os.getcwd())")
    records = run_notebooks("smoke", out=out, names=[NOTEBOOKS[0]], source_dir=source)
    executed = root / out / "notebooks" / NOTEBOOKS[0]
    assert records[0]["notebook"] == NOTEBOOKS[0] and executed.is_file()
    text = executed.read_text()
    assert "smoke runs/notebooks/test-runner/results" in text      # papermill injected the layout
    assert str(root) not in text and absolute_paths(executed) == []  # the kernel's cwd was printed, then scrubbed

    _tiny_notebook(source / NOTEBOOKS[0], "x = 1\nraise ValueError('broken on purpose')")
    before = executed.read_text()
    with pytest.raises(NextLocMoEError, match=r"00_data_preparation\.ipynb failed in code cell 3 \(x = 1\).*"
                                              r"ValueError: broken on purpose"):
        run_notebooks("smoke", out=out, names=[NOTEBOOKS[0]], source_dir=source)
    assert executed.read_text() == before, "a failed run must not replace the previous good notebook"
    assert (root / out / "notebooks" / NOTEBOOKS[0]).with_suffix(".failed.ipynb").is_file()
    assert not list((root / out / "notebooks").glob(".*running*"))


def test_runner_rejects_unknown_notebooks_and_profiles():
    with pytest.raises(ConfigError, match="unknown"):
        run_notebooks("smoke", names=["99_nothing.ipynb"])
    with pytest.raises(ConfigError, match="profile"):
        run_notebooks("laptop")


def test_deterministic_tables_are_checked_by_nbval():
    """nbval (lax) compares only tagged cells: the tables that a cached re-run must reproduce exactly."""
    for name, table in (("00_data_preparation.ipynb", "dataset_statistics.md"), ("02_supervised.ipynb", "supervised.md"),
                        ("03_zero_shot.ipynb", "zero_shot.md"), ("04_ablations.ipynb", "ablations.md")):
        tagged = [c for c in code_cells(load(name)) if "nbval-check-output" in c.metadata.get("tags", [])]
        assert [t for c in tagged for t in c.metadata["tags"] if t.startswith(SHOWS_TAG)] == [SHOWS_TAG + table]


def test_coalesce_streams_keeps_what_a_terminal_shows():
    from nextlocmoe.notebooks import coalesce_streams
    bar = [{"output_type": "stream", "name": "stderr", "text": f"\rfit: {i}/3"} for i in range(4)]
    outputs = ([{"output_type": "stream", "name": "stdout", "text": ["a\n", "b\n"]},
                {"output_type": "stream", "name": "stdout", "text": "c\n"}]
               + bar + [{"output_type": "stream", "name": "stderr", "text": "\n"},
                        {"output_type": "display_data", "data": {"text/plain": "x"}, "metadata": {}},
                        {"output_type": "stream", "name": "stderr", "text": "\rbar 50%\r       \r\n"},
                        {"output_type": "stream", "name": "stdout", "text": "done\r\n"}])
    out = coalesce_streams(outputs)
    assert [o["output_type"] for o in out] == ["stream", "stream", "display_data", "stream"]
    assert "".join(out[0]["text"]) == "a\nb\nc\n"                   # consecutive stdout merged
    assert "".join(out[1]["text"]) == "fit: 3/3\n"                  # a bar's updates: its last state only
    assert "".join(out[3]["text"]) == "done\n"                      # a bar that blanked itself leaves nothing
    assert out[2] == outputs[-3]                                     # other outputs untouched


def test_committed_notebooks_hold_no_progress_bar_updates():
    for name in NOTEBOOKS:
        nb = json.loads((project_root() / "notebooks" / name).read_text())
        for cell in nb["cells"]:
            streams = [o for o in cell.get("outputs", []) if o.get("output_type") == "stream"]
            assert not any("\r" in "".join(o["text"]) for o in streams), name
            outputs = cell.get("outputs", [])
            assert not any(a.get("output_type") == b.get("output_type") == "stream" and a["name"] == b["name"]
                           for a, b in zip(outputs, outputs[1:])), name
