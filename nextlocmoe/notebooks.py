"""Run the ordered notebooks end to end with papermill (`make reproduce`, `nextlocmoe notebooks`).

Where things go. The cpu profile is the one whose outputs are committed: it executes the notebooks IN PLACE
(notebooks/*.ipynb keep the outputs of the run that wrote results/ and figures/). Every other profile writes
to a separate tree, runs/notebooks/<profile>/{notebooks,results,figures}, so that CI's smoke run or a trial gpu
run never overwrites what is committed; `--out .` publishes any profile in place (the gpu reproduction does).

Each notebook has a cell tagged `parameters` (profile, results_dir, figures_dir, runs_dir, force, device);
papermill injects the values after it. The kernel runs in the project root, so every relative path means the
same thing as on the command line. After a notebook ran, absolute paths of this machine (project root, home,
the interpreter's prefix) are replaced in its outputs and metadata, so executed notebooks can be committed.

A failing cell stops the run: the error names the notebook and the cell (its number and first line) and
`nextlocmoe notebooks` exits non-zero.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError, NextLocMoEError
from .io import atomic_path, remove_stale_temps

LESSONS_BEFORE = ("00_data_preparation.ipynb", "01_training.ipynb")   # data and training come first
LESSONS_AFTER = ("06_expert_visualisation.ipynb",)                     # the routing analysis reads their models


def notebook_list() -> tuple[str, ...]:
    """The notebooks in reading order: the lessons before, one per registered experiment, the lessons after."""
    from .experiments import EXPERIMENTS

    shown = tuple(e.notebook for e in sorted(EXPERIMENTS.values(), key=lambda e: e.order))
    return LESSONS_BEFORE + shown + LESSONS_AFTER


NOTEBOOKS = notebook_list()
PUBLISHED_PROFILE = "cpu"     # the profile whose executed notebooks, results and figures are committed
SHOWS_TAG = "shows:"          # a cell tagged "shows:<file>" displays results/<file> verbatim (tests compare them)


def project_root(start: str | os.PathLike | None = None) -> Path:
    """The directory holding pyproject.toml and nextlocmoe/, searched upwards from `start` (default: cwd)."""
    here = Path(start or Path.cwd()).resolve()
    for candidate in (here, *here.parents):
        if (candidate / "pyproject.toml").is_file() and (candidate / "nextlocmoe").is_dir():
            return candidate
    raise NextLocMoEError(f"no project root (a directory with pyproject.toml and nextlocmoe/) above {here}; "
                          "open the notebooks from a checkout of the project")


def enter_project_root() -> Path:
    """chdir to the project root (a notebook opened in notebooks/ then sees the same relative paths).

    Also silences tqdm's "IProgress not found" warning: without ipywidgets, tqdm.auto falls back to its text
    bars, which is what we want in executed notebooks (papermill shows per-cell progress instead).
    """
    import warnings

    warnings.filterwarnings("ignore", message="IProgress not found")
    root = project_root()
    os.chdir(root)
    return root


def select_device(device: str = "auto") -> str:
    """'auto' | 'cpu' | 'cuda' -> the device the library will use (`runtime.pick_device`); 'cpu' also hides GPUs
    from this kernel, so every later 'auto' in the library picks the CPU too."""
    from .runtime import DEVICES, pick_device

    if device not in DEVICES:
        raise ConfigError(f"device={device!r} is invalid; expected one of {list(DEVICES)}")
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        import torch
        if torch.cuda.is_available():
            raise ConfigError("device='cpu' was asked for but CUDA was already initialised in this kernel; restart it")
    return pick_device(device).type


@dataclass(frozen=True)
class Layout:
    """Where one execution reads and writes (paths relative to the project root)."""
    notebooks: Path     # executed notebooks
    results: Path
    figures: Path
    runs: Path          # experiment jobs and trained models (shared across profiles: keys include the config)

    def parameters(self, profile: str, force: bool, device: str) -> dict[str, Any]:
        return {"profile": profile, "results_dir": str(self.results), "figures_dir": str(self.figures),
                "runs_dir": str(self.runs), "force": force, "device": device}


def layout_for(profile: str, out: str | os.PathLike | None = None) -> Layout:
    """In place for the published profile (or out='.'), else runs/notebooks/<profile>/..."""
    if out is None:
        out = "." if profile == PUBLISHED_PROFILE else f"runs/notebooks/{profile}"
    out = Path(out)
    if out.is_absolute():
        raise ConfigError(f"--out {out} must be relative to the project root (executed notebooks record it)")
    return Layout(notebooks=out / "notebooks", results=out / "results", figures=out / "figures",
                  runs=Path("runs/experiments"))


def _machine_paths() -> list[str]:
    """Absolute paths that must not appear in committed notebooks, longest first."""
    paths = {str(project_root()), str(Path.home()), sys.prefix, sys.base_prefix, str(Path(sys.executable).parent)}
    return sorted((p for p in paths if p and p != "/"), key=len, reverse=True)


def scrub(text: str, paths: list[str] | None = None) -> str:
    """Replace this machine's absolute paths: project root -> '.', home -> '~', interpreter prefix -> '<env>'."""
    root = str(project_root())
    for p in paths if paths is not None else _machine_paths():
        replacement = "." if p == root else "~" if p == str(Path.home()) else "<env>"
        text = text.replace(p, replacement)
    return text


ABSOLUTE_PATH = re.compile(r"(?<![\w.~<>-])/(?:work|home|root|tmp|Users|opt|usr|var|mnt)/[\w.-]+")


def absolute_paths(notebook: str | os.PathLike) -> list[str]:
    """Absolute filesystem paths found anywhere in a notebook file (tests require none)."""
    return sorted(set(ABSOLUTE_PATH.findall(Path(notebook).read_text())))


def _as_terminal(text: str) -> str:
    """What a terminal shows of `text`: a carriage return sends the cursor back to the line's start and what
    follows overwrites the characters before it (a progress bar redraws itself this way), so hundreds of updates
    become the bar's final state, and a bar that blanks itself on close leaves an empty line."""
    lines = []
    for line in text.split("\n"):
        if "\r" in line:                 # other lines stay byte for byte (nbval compares some outputs)
            shown = ""
            for part in line.split("\r"):
                shown = part + shown[len(part):]
            line = shown.rstrip()
        lines.append(line)
    return "\n".join(lines)


def coalesce_streams(outputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Merge consecutive stdout (or stderr) outputs of a cell into one and resolve carriage returns, as Jupyter
    shows them: the executed notebook then holds a progress bar's last line, not every update (a reader on a
    page that renders the raw outputs would otherwise scroll through thousands of lines)."""
    merged: list[dict[str, Any]] = []
    for out in outputs:
        if (out.get("output_type") == "stream" and merged and merged[-1].get("output_type") == "stream"
                and merged[-1].get("name") == out.get("name")):
            merged[-1] = {**merged[-1], "text": "".join(merged[-1]["text"]) + "".join(out.get("text", ""))}
        else:
            merged.append(dict(out))
    for out in merged:
        if out.get("output_type") == "stream":
            text = _as_terminal("".join(out.get("text", "")))
            out["text"] = text.splitlines(keepends=True)
    return [o for o in merged if o.get("output_type") != "stream" or "".join(o["text"]).strip()]


def _scrub_notebook(path: Path, output_path: Path | None = None) -> None:
    text = scrub(path.read_text())
    nb = json.loads(text)
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "code" and cell.get("outputs"):
            cell["outputs"] = coalesce_streams(cell["outputs"])
    meta = nb.get("metadata", {}).get("papermill", {})
    meta.pop("environment_variables", None)
    for key in ("input_path", "output_path"):      # relative to the project root, else the bare file name
        if isinstance(meta.get(key), str) and Path(meta[key]).is_absolute():
            try:
                meta[key] = str(Path(meta[key]).relative_to(project_root()))
            except ValueError:
                meta[key] = Path(meta[key]).name
    if output_path is not None and "papermill" in nb.get("metadata", {}):
        meta["output_path"] = str(output_path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")


def _failed_cell(path: Path) -> str:
    """'cell N (first line)' of the first cell whose output is an error, from papermill's written output."""
    try:
        nb = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return "an unknown cell"
    code = [c for c in nb.get("cells", []) if c.get("cell_type") == "code"]
    for i, cell in enumerate(code, start=1):
        if any(o.get("output_type") == "error" for o in cell.get("outputs", [])):
            first = "".join(cell.get("source", "")).strip().splitlines()
            return f"code cell {i} ({first[0][:70] if first else 'empty'})"
    return "an unknown cell"


def run_notebooks(profile: str = PUBLISHED_PROFILE, *, out: str | os.PathLike | None = None,
                  names: list[str] | tuple[str, ...] | None = None, force: bool = False, device: str = "auto",
                  kernel: str = "python3", source_dir: str | os.PathLike = "notebooks") -> list[dict[str, Any]]:
    """Execute the notebooks in order with papermill; returns one record (name, seconds, output) per notebook.

    Runs from the project root. Raises NextLocMoEError naming the notebook and cell on the first failure.
    """
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    from .config import PROFILES
    if profile not in PROFILES:
        raise ConfigError(f"--profile '{profile}' is unknown; expected one of {list(PROFILES)}")
    root = enter_project_root()
    names = list(names or NOTEBOOKS)
    unknown = [n for n in names if n not in NOTEBOOKS]
    if unknown:
        raise ConfigError(f"notebooks {unknown} are unknown; expected names from {list(NOTEBOOKS)}")
    layout = layout_for(profile, out)
    for d in (layout.notebooks, layout.results, layout.figures):
        d.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(d, older_than_s=3600)    # leftovers of a killed run (a live writer's are fresh)
    params = layout.parameters(profile, force, device)
    records = []
    for name in names:
        source = Path(source_dir) / name
        if not source.is_file():
            raise NextLocMoEError(f"notebook {source} does not exist (run from a full checkout)")
        target = layout.notebooks / name
        started = time.perf_counter()
        print(f"[{name}] profile={profile} -> {target}", flush=True)
        # papermill writes cell by cell: execute into a hidden temporary file, rename it when all cells passed
        partial = target.with_name(f".{name}.running.ipynb")
        try:
            pm.execute_notebook(str(source), str(partial), parameters=params, kernel_name=kernel, cwd=str(root),
                                progress_bar=sys.stderr.isatty(), log_output=False,
                                request_save_on_cell_execute=False)
        except PapermillExecutionError as e:
            failed = target.with_suffix(".failed.ipynb")
            where = _failed_cell(partial)
            if partial.exists():
                partial.replace(failed)
                _scrub_notebook(failed)
            raise NextLocMoEError(f"notebook {name} failed in {where}: {e.ename}: {e.evalue} "
                                  f"(the executed copy is kept at {failed})") from None
        except BaseException:
            partial.unlink(missing_ok=True)           # interrupted: never leave a half-executed notebook behind
            raise
        _scrub_notebook(partial, output_path=target)
        partial.replace(target)
        seconds = time.perf_counter() - started
        print(f"[{name}] done in {seconds:.0f} s", flush=True)
        records.append({"notebook": name, "seconds": round(seconds, 1), "output": str(target)})
    problems = check_executed(layout.notebooks, layout.results, layout.figures, names)
    if problems:
        raise NextLocMoEError("executed notebooks disagree with their files:\n  " + "\n  ".join(problems))
    return records



class _MarkdownTable:
    """A Markdown table whose plain-text form is the same Markdown (nbval compares text/plain outputs)."""

    def __init__(self, text: str):
        self.text = text

    def _repr_markdown_(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return self.text


def show_table(path: str | os.PathLike) -> None:
    """Display a Markdown results table verbatim (a test checks the notebook shows exactly the file's text)."""
    from IPython.display import display

    path = Path(path)
    if not path.is_file():
        raise NextLocMoEError(f"{path} does not exist; run the cell that writes it (or the experiment) first")
    display(_MarkdownTable(path.read_text()))


def show_walkthrough(walk: Any, steps: list[str] | None = None, max_rows: int = 60) -> None:
    """Display a `walkthrough.Walkthrough` step by step: the equation, the tensors' shapes, a note, the table."""
    from IPython.display import Markdown, display
    chosen = [s for s in walk.steps if steps is None or s.name in steps]
    for step in chosen:
        shapes = ", ".join(f"{k} {tuple(v)}" for k, v in step.shapes.items())
        text = f"**{step.name}** · `{step.equation}`" + (f"  \nshapes: {shapes}" if shapes else "") + \
               (f"  \n{step.note}" if step.note else "")
        display(Markdown(text))
        if step.table is not None:
            display(step.table.head(max_rows))


def _outputs_text(cell: dict[str, Any], mime: str) -> list[str]:
    texts = []
    for out in cell.get("outputs", []):
        data = out.get("data", {})
        if mime in data:
            value = data[mime]
            texts.append("".join(value) if isinstance(value, list) else value)
    return texts


def check_executed(notebooks_dir: str | os.PathLike, results_dir: str | os.PathLike,
                   figures_dir: str | os.PathLike, names: list[str] | tuple[str, ...] = NOTEBOOKS) -> list[str]:
    """Problems of executed notebooks against the files they claim to show; [] when they agree.

    * every cell tagged `shows:<file>` displays exactly the text of results/<file>;
    * every PNG a notebook displays is byte-identical to a file in figures/;
    * no cell output is an error, and no absolute path of this machine appears.
    """
    import base64

    notebooks_dir, results_dir, figures_dir = Path(notebooks_dir), Path(results_dir), Path(figures_dir)
    figures = {p.read_bytes(): p.name for p in figures_dir.glob("*.png")} if figures_dir.is_dir() else {}
    problems = []
    for name in names:
        path = notebooks_dir / name
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        nb = json.loads(path.read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        if not any(c.get("outputs") for c in code):
            problems.append(f"{path}: has no outputs (not executed)")
        for i, cell in enumerate(code, start=1):
            for out in cell.get("outputs", []):
                if out.get("output_type") == "error":
                    problems.append(f"{path}: code cell {i} ends in {out.get('ename')}")
            for tag in cell.get("metadata", {}).get("tags", []):
                if tag.startswith(SHOWS_TAG):
                    shown, file = _outputs_text(cell, "text/markdown"), results_dir / tag[len(SHOWS_TAG):]
                    if not file.is_file():
                        problems.append(f"{path}: code cell {i} shows {file}, which does not exist")
                    elif shown != [file.read_text()]:
                        problems.append(f"{path}: code cell {i} does not show the current text of {file}")
            for png in _outputs_text(cell, "image/png"):
                if base64.b64decode(png) not in figures:
                    problems.append(f"{path}: code cell {i} displays a figure that is not a file in {figures_dir}")
        found = absolute_paths(path)
        if found:
            problems.append(f"{path}: absolute paths {found[:3]}")
    return problems
