"""How the benchmarks measure: timing statistics, the synthetic input, memory, the machine.

Shared by the parent (front-end timing, machine facts), the worker processes (timed calls,
their own memory peak) and the exporter's latency check (the pause between timed calls).
"""

from __future__ import annotations

import os
import platform
import resource
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from msn_edge.runtime.ort_session import ORT_THREADS_IDLE_S
from msn_edge.runtime.version import __version__

BUSY_LOAD_PER_CORE = 0.25  # 1-min load average above this before a run: flag the timings
# Pause before each timed call of a round-robin (tests shorten it): every call thus starts
# with idle threads, as a monitor's call once per hop does.
THREADS_IDLE_S = ORT_THREADS_IDLE_S
SIGNAL_RMS = 0.1  # synthetic input: white noise at about -20 dBFS
_MiB = 1 << 20


@dataclass(frozen=True)
class LatencyStats:
    """Wall time of one call, in milliseconds, over `iterations` timed calls."""

    iterations: int
    mean_ms: float
    std_ms: float
    min_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float

    @classmethod
    def from_ns(cls, samples_ns: Iterable[int]) -> LatencyStats:
        ms = np.asarray(list(samples_ns), dtype=np.float64) / 1e6
        if ms.size == 0:
            raise ValueError("no timing samples")
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        return cls(
            iterations=int(ms.size),
            mean_ms=float(ms.mean()),
            std_ms=float(ms.std(ddof=1)) if ms.size > 1 else 0.0,
            min_ms=float(ms.min()),
            p50_ms=float(p50),
            p90_ms=float(p90),
            p99_ms=float(p99),
        )


def time_call(fn: Callable[[], Any], iterations: int, warmup: int) -> LatencyStats:
    """Call `fn` warmup times untimed, then `iterations` times, each timed on its own."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iterations):
        t0 = time.perf_counter_ns()
        fn()
        samples.append(time.perf_counter_ns() - t0)
    return LatencyStats.from_ns(samples)


def synthetic_windows(n_samples: int, batch: int, seed: int) -> np.ndarray:
    """Seeded white noise (batch, n_samples): timing does not depend on the content."""
    rng = np.random.default_rng(seed)
    return (SIGNAL_RMS * rng.standard_normal((batch, n_samples))).astype(np.float32)


def peak_rss_mib() -> float:
    """This process's peak resident set size, in MiB.

    Linux: VmHWM, the high-water mark of this process's own address space. Not ru_maxrss:
    Linux carries the parent's resident size at fork into the child's ru_maxrss across
    exec, so a fresh child of a 500 MiB parent would report 500 MiB. Elsewhere ru_maxrss
    (KiB on Linux, bytes on macOS).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / _MiB if sys.platform == "darwin" else rss / 1024


def load_average() -> float | None:
    """The 1-min load average, where the system has one."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def machine_info() -> dict:
    """What the numbers depend on, and how busy the machine was."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from msn_edge.runtime.engines import require_onnxruntime

    ort = require_onnxruntime()
    return {
        "cpu": cpu or platform.machine(),
        "cores": os.cpu_count(),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": ort.__version__,
        "msn_edge": __version__,
        "loadavg_1m": load_average(),
        "priority": _priority(),
    }


def _priority() -> str:
    """The scheduling weight the run had: nice, and on Linux its autogroup's nice.

    With autogroup scheduling the CPU is shared between sessions first, so on a shared
    machine a session's autogroup nice decides how much of it a benchmark gets.
    """
    text = f"nice {os.nice(0)}"
    try:
        group = Path("/proc/self/autogroup").read_text().split()
        return f"{text}, autogroup nice {group[-1]}"
    except (OSError, IndexError):
        return text
