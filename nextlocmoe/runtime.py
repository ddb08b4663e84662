"""Where and how fast things run: the one device helper, mixed precision, timing and peak memory.

    pick_device("auto")           CUDA when torch sees one, else the CPU ("cpu" / "cuda" force it)
    resolve_mixed_precision(s)    train.mixed_precision -> "no" | "bf16" | "fp16" ("auto": bf16 on GPU only)
    time_once(step, device)       wall time of one call, CUDA-synchronised before and after
    median_seconds(step, ...)     median of time_once over repeats after warm-up calls
    PeakMemory(device)            peak memory of a block: CUDA max_memory_allocated or the CPU process's peak RSS

The efficiency experiment, the LLM-Mob generation timing and the benchmarks all time with `median_seconds`,
so every speed figure of the project is measured the same way (warm-up, synchronise, median).
"""

from __future__ import annotations

import math
import re
import resource
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")


def pick_device(device: str | torch.device | None = "auto") -> torch.device:
    """'auto' (or None) -> CUDA when available, else CPU; 'cpu' / 'cuda' / a torch.device are taken as given."""
    if isinstance(device, torch.device):
        return device
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but torch sees no CUDA device; use 'auto' or 'cpu'")
    if device not in DEVICES and not str(device).startswith("cuda:"):
        raise ConfigError(f"device {device!r} is invalid; expected one of {list(DEVICES)}")
    return torch.device(device)


def resolve_mixed_precision(setting: str) -> str:
    """train.mixed_precision -> what accelerate is given: "auto" is bf16 on a GPU and full precision on a CPU."""
    if setting == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    if setting not in ("no", "bf16", "fp16"):
        raise ConfigError(f"train.mixed_precision='{setting}' is invalid; expected auto, no, bf16 or fp16")
    return setting


def synchronize(device: torch.device | str) -> None:
    """Wait for queued CUDA work (a no-op on the CPU), so a timer measures the work and not its launch."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(step: Callable[[], Any], device: torch.device | str = "cpu") -> float:
    """Wall time of one `step()`, synchronised before and after on a GPU."""
    synchronize(device)
    started = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - started


def median_seconds(step: Callable[[], Any], repeats: int, warmup: int = 1,
                   device: torch.device | str = "cpu") -> float:
    """Median wall time of `step()` over `repeats` runs after `warmup` unmeasured ones (CUDA-synchronised)."""
    if repeats < 1 or warmup < 0:
        raise ConfigError(f"median_seconds: repeats={repeats} must be >= 1 and warmup={warmup} >= 0")
    for _ in range(warmup):
        step()
    return statistics.median(time_once(step, device) for _ in range(repeats))


class PeakMemory:
    """Peak memory of a `with` block in MiB (`peak_mib`): CUDA max_memory_allocated, or on a CPU the process's
    peak resident set size during the block (VmHWM, reset through /proc/self/clear_refs on Linux), else the
    process-lifetime ru_maxrss; `kind` says which."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.peak_mib = math.nan
        self.kind = ""

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda max_memory_allocated"
        else:
            try:   # Linux: writing 5 resets the process's peak resident set size (VmHWM)
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.kind = "cpu peak RSS of the process during the block (VmHWM, reset before it)"
            except OSError:
                self.kind = "cpu ru_maxrss: peak RSS over the whole process lifetime"
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self.kind.startswith("cpu peak RSS"):
            status = Path("/proc/self/status").read_text()
            self.peak_mib = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024
        else:
            self.peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux
