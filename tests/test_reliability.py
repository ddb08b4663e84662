"""Faults and scale: unwritable outputs, a full disk, killed writes, cache state, concurrent cache writers and
the multi-process training path. Each test reproduces a fault seen on main before the fix."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nextlocmoe.cli import main
from nextlocmoe.config import load_config
from nextlocmoe.data.prepare import load_windows, prepare, save_windows
from nextlocmoe.errors import NextLocMoEError, OutputError
from nextlocmoe.io import atomic_path, check_writable, remove_stale_temps, write_text_atomic
from nextlocmoe.runs import load_checkpoint
from nextlocmoe.train import train

SMALL = ["model.use_prompt=false", "train.max_train_windows=32", "train.max_eval_windows=16"]


def one_line_error(err: str, *needles: str) -> None:
    lines = [line for line in err.strip().splitlines() if line.startswith("nextlocmoe")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# ---------------------------------------------------------------------------------------------------------
# unwritable outputs are found before any work, and named

@pytest.mark.parametrize("command, flag", [
    (["prepare", "--profile", "smoke"], "--results"),
    (["run", "supervised", "--profile", "smoke"], "--results"),
    (["run", "supervised", "--profile", "smoke"], "--runs"),
    (["train", "--profile", "smoke"], "--out"),
])
def test_an_unwritable_output_stops_the_command_before_any_work(command, flag, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("not a directory")
    for bad, cause in ((tmp_path / "a_file" / "out", "a parent is not a directory"),
                       (Path("/proc/forbidden/out"), "cannot be created")):
        assert main(command + [flag, str(bad)]) == 2
        one_line_error(capsys.readouterr().err, str(bad), cause, flag)
    assert not list((tmp_path / ".cache" / "windows").glob("synthetic-*"))    # no windows were built first


def test_check_writable_names_the_location_and_creates_missing_folders(tmp_path):
    assert check_writable(tmp_path / "new" / "deep", "results directory").is_dir()
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match=r"results directory .*f/sub cannot be created: a parent is not a directory"):
        check_writable(tmp_path / "f" / "sub", "results directory")


# ---------------------------------------------------------------------------------------------------------
# a full disk: the message says so, names the file, and nothing half-written stays behind

def test_torchs_full_disk_error_becomes_no_space_left_naming_the_file(tmp_path, monkeypatch):
    target = tmp_path / "last.pt"
    target.write_bytes(b"the previous checkpoint")

    def full_disk_save(obj, path):
        Path(path).write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4096 vs 4000")

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1000, 1000, 0))
    with pytest.raises(OutputError, match=r"cannot write .*last\.pt: no space left on device"):
        with atomic_path(target) as tmp:
            full_disk_save({}, tmp)
    assert target.read_bytes() == b"the previous checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    with pytest.raises(ValueError):        # an error that is not a failed write keeps its own type
        with atomic_path(target):
            raise ValueError("a bug, not a disk")


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A 256 KiB tmpfs (needs root and mount); skipped where it cannot be mounted."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], capture_output=True)


def test_training_onto_a_full_disk_exits_2_with_one_line(tiny_filesystem, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tiny_filesystem / "run"
    assert main(["train", "--profile", "smoke", "--out", str(out)] + [a for s in SMALL for a in ("--set", s)]) == 2
    one_line_error(capsys.readouterr().err, "no space left on device", str(out))
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]      # no half checkpoint left
    with pytest.raises(OutputError, match="no space left on device"):
        write_text_atomic(tiny_filesystem / "big.txt", "x" * 2**20)
    assert not (tiny_filesystem / "big.txt").exists()


# ---------------------------------------------------------------------------------------------------------
# temp files of killed writes

@pytest.mark.slow
def test_resume_removes_the_temp_files_of_a_killed_write(tmp_path):
    cfg = load_config("smoke", overrides=SMALL + ["train.epochs=2"])
    windows = prepare(cfg.data, cache_dir=tmp_path / "cache")
    run = tmp_path / "run"
    train(cfg, run, windows=windows, stop_after_epochs=1)
    stale = run / ".best.pt.k1ll3d.tmp"                       # what kill -9 during torch.save leaves
    stale.write_bytes(b"half a checkpoint")
    result = train(cfg, run, windows=windows, resume=True)
    assert not stale.exists() and result.history["epoch"].tolist() == [0, 1, 2]   # the resumed run finished
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def test_stale_temps_in_a_shared_folder_are_removed_only_when_old(tmp_path):
    old, new = tmp_path / ".supervised.csv.aaa.tmp", tmp_path / ".supervised.csv.bbb.tmp"
    for p in (old, new):
        p.write_text("x")
    os.utime(old, (1, 1))
    keep = tmp_path / "supervised.csv"
    keep.write_text("kept")
    assert remove_stale_temps(tmp_path, older_than_s=3600) == [old]
    assert new.exists() and keep.exists()
    gitignore = Path(__file__).resolve().parent.parent / ".gitignore"
    assert "*.tmp" in {line.strip() for line in gitignore.read_text().splitlines()}


def test_prepare_removes_old_temporary_cache_folders_of_killed_writers(tmp_path):
    cfg = load_config("smoke")
    old, fresh = tmp_path / ".tmp-synthetic-x-killed", tmp_path / ".tmp-synthetic-y-live"
    for folder in (old, fresh):
        folder.mkdir(parents=True)
        (folder / "arrays.npz").write_bytes(b"half")
    os.utime(old, (1, 1))
    prepare(cfg.data, cache_dir=tmp_path)
    assert not old.exists() and fresh.exists()


# ---------------------------------------------------------------------------------------------------------
# tables do not depend on the cache state

@pytest.mark.slow
def test_training_table_bytes_are_the_same_cold_and_warm(tmp_path):
    from nextlocmoe.experiments import supervised_model, write_training_summary

    dirs = dict(runs_dir=tmp_path / "runs", cache_dir=tmp_path / "cache", overrides=SMALL)
    written = []
    for state in ("cold", "warm"):
        models = {m: supervised_model("smoke", "synthetic", m, **dirs) for m in ("nextlocmoe", "nextlocmoe_ranking")}
        paths = write_training_summary(models, "smoke", tmp_path / state)
        written.append({k: paths[k].read_bytes() for k in ("csv", "md")})
        written[-1]["curves"] = (tmp_path / state / "training_curves.csv").read_bytes()
    assert written[0] == written[1]
    # the floors are the baselines on the run's own validation windows
    from nextlocmoe.baselines import evaluate_baseline, make_baseline
    from nextlocmoe.results import read_table, training_floor_table
    from nextlocmoe.runs import limited

    floors = training_floor_table(read_table(tmp_path / "warm", "training_curves"))
    m = models["nextlocmoe"]
    w = limited(m.windows, m.config)
    row = floors["nextlocmoe"].set_index("floor").loc["user_most_frequent"]
    expected = evaluate_baseline(make_baseline("user_most_frequent").fit(w), w, "val")
    assert row["val_hit@10"] == pytest.approx(expected["hit@10"]) and row["val_n"] == w.n_windows("val")
    assert list(floors["nextlocmoe"]["floor"]) == ["last_location", "user_most_frequent", "window_time"]


# ---------------------------------------------------------------------------------------------------------
# concurrent writers of one cache entry

def _hammer(entry: str, rounds: int, queue) -> None:
    windows = load_windows(Path(entry))
    errors = []
    for _ in range(rounds):
        try:
            save_windows(windows, entry)
        except Exception as err:             # noqa: BLE001 - the test reports every failure
            errors.append(f"{type(err).__name__}: {err}")
    queue.put(errors)


@pytest.mark.slow
def test_two_processes_replacing_one_cache_entry_never_fail(tmp_path):
    cfg = load_config("smoke")
    prepare(cfg.data, cache_dir=tmp_path)
    entry, = [p for p in tmp_path.iterdir() if p.is_dir() and not p.name.startswith(".")]
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    workers = [ctx.Process(target=_hammer, args=(str(entry), 100, queue)) for _ in range(2)]
    for w in workers:
        w.start()
    errors = [e for _ in workers for e in queue.get(timeout=300)]
    for w in workers:
        w.join(timeout=60)
    assert errors == []
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith((".tmp-", ".old-"))]
    again = load_windows(entry)
    assert again is not None and again.n_windows("train") == prepare(cfg.data, cache_dir=tmp_path).n_windows("train")


# ---------------------------------------------------------------------------------------------------------
# the multi-process path: two CPU processes (gloo) equal one process with the same global batch

# balance_weight=0: the balance term reads each process's own batch mean (like per-device load balancing), so two
# processes of 8 and one of 16 optimise slightly different losses; every other term is a mean over samples
DETERMINISTIC = SMALL + ["train.epochs=2", "train.early_stop_patience=5", "model.tcn_dropout=0",
                         "model.personalized.lora_dropout=0", "model.balance_weight=0"]


def _train_cli(out: Path, batch: int, processes: int, cwd: Path) -> subprocess.CompletedProcess:
    sets = [a for s in DETERMINISTIC + [f"train.batch_size={batch}"] for a in ("--set", s)]
    args = ["-m", "nextlocmoe.cli", "train", "--profile", "smoke", "--out", str(out), *sets]
    if processes == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               *args]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_two_cpu_processes_train_like_one_with_the_same_global_batch(tmp_path):
    one = _train_cli(tmp_path / "one", batch=16, processes=1, cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _train_cli(tmp_path / "two", batch=8, processes=2, cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    # only the main process prints the result and writes the run directory
    assert two.stdout.count('"best_epoch"') == 1 and one.stdout.count('"best_epoch"') == 1
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert a["best_epoch"] == b["best_epoch"] and a["windows"] == b["windows"]
    # stated tolerance: weights agree to 1e-4 (gloo sums the two halves' gradients in another order)
    wa, wb = (load_checkpoint(tmp_path / d / "best.pt")["model"] for d in ("one", "two"))
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.allclose(wa[name], wb[name], rtol=1e-4, atol=1e-5), name
    for split in ("val", "test"):
        for metric in ("hit@1", "hit@10", "mrr", "dist_mean_m"):
            assert b[split][metric] == pytest.approx(a[split][metric], rel=1e-3, abs=1e-3), (split, metric)
    np.testing.assert_equal(sorted(wa), sorted(wb))


class _RunsCode:
    """A pickle payload that would run a command when unpickled without the weights-only guard."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_checkpoint_that_would_run_code_is_refused_and_a_damaged_one_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    good = tmp_path / "good.pt"
    torch.save({"model": {"w": torch.ones(2)}, "epoch": 1, "val": {"hit@10": 0.5}}, good)
    assert load_checkpoint(good)["epoch"] == 1
    evil = tmp_path / "evil.pt"
    torch.save({"model": _RunsCode()}, evil)
    with pytest.raises(NextLocMoEError, match="evil.pt is not a checkpoint this library can read safely"):
        load_checkpoint(evil)
    assert not (tmp_path / "pwned").exists()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:40])
    with pytest.raises(NextLocMoEError, match="truncated.pt is not a checkpoint"):
        load_checkpoint(truncated)
