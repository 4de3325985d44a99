"""What a benchmark run measures and reports: its settings, its rows (cases), its results.

Plain dataclasses, so that a report is JSON as it stands (`BenchReport.to_dict`) and a
case crosses to its worker process as a dict.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

from msn_edge.benchmarks.measure import LatencyStats
from msn_edge.runtime.errors import MsnEdgeError

RUNTIME_FACTORY = "msn_edge.benchmarks.worker:runtime_engine"
EAGER_FACTORY = "msn_edge.benchmarks.eager:eager_engine"  # imports torch, in its own process


@dataclass(frozen=True)
class BenchSettings:
    iterations: int = 20  # timed calls per batch size
    warmup: int = 3  # untimed calls first: lazy allocation, kernel selection, caches
    batch: int = 8  # the larger batch (batch 1 is always measured)
    threads: int = os.cpu_count() or 1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("iterations", "batch", "threads"):
            if getattr(self, name) < 1:
                raise MsnEdgeError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise MsnEdgeError(f"--warmup must be 0 or more, got {self.warmup}")


@dataclass(frozen=True)
class Case:
    """One row of the benchmark: a backend at a precision, built by `factory`.

    `factory` is a "module:function" that the worker process imports: the PyTorch eager
    baseline plugs in that way, so that only its own process ever imports torch.
    """

    name: str
    backend: str  # runtime backend name, or "pytorch" for the eager baseline
    precision: str
    device: str  # "cpu" | "gpu": which GEMM peak the row is compared with
    factory: str = RUNTIME_FACTORY

    @property
    def peak_key(self) -> str:
        return f"{self.device}-{self.precision}"


EAGER = Case("pytorch-eager", "pytorch", "fp32", "cpu", EAGER_FACTORY)
RUNTIME_CASES = (
    Case("ort-cpu-fp32", "cpu", "fp32", "cpu"),
    Case("ort-cpu-int8", "cpu", "int8", "cpu"),
    Case("ort-cuda-fp32", "cuda", "fp32", "gpu"),
    Case("ort-tensorrt-fp16", "ort-tensorrt", "fp16", "gpu"),
    Case("ort-tensorrt-int8", "ort-tensorrt", "int8", "gpu"),
    Case("tensorrt-fp32", "tensorrt", "fp32", "gpu"),
    Case("tensorrt-fp16", "tensorrt", "fp16", "gpu"),
    Case("tensorrt-int8", "tensorrt", "int8", "gpu"),
)
ALL_CASES = (EAGER, *RUNTIME_CASES)


def select_cases(patterns: Iterable[str] = ()) -> list[Case]:
    """Cases whose name equals or starts with one of `patterns` ("ort-cpu"); all if none."""
    patterns = list(patterns)
    if not patterns:
        return list(ALL_CASES)
    chosen = [c for c in ALL_CASES if any(c.name.startswith(p) for p in patterns)]
    unknown = [p for p in patterns if not any(c.name.startswith(p) for c in ALL_CASES)]
    if unknown:
        names = ", ".join(c.name for c in ALL_CASES)
        raise MsnEdgeError(f"unknown backend {', '.join(unknown)} (choose from {names})")
    return chosen


@dataclass(frozen=True)
class Peak:
    """Best GEMM rate of one precision on one device, as GFLOP/s (int8: GOP/s)."""

    key: str  # "cpu-fp32", "cpu-int8", "gpu-fp16", ...
    method: str
    threads: int
    size: int
    gflops: float | None
    reason: str | None = None  # why it was not measured


@dataclass
class CaseResult:
    name: str
    backend: str
    precision: str
    status: str  # "ok" | "skipped" | "failed"
    reason: str | None = None
    engine: str | None = None  # what actually ran, as the engine reports it
    threads: int | None = None
    cold_start_ms: float | None = None  # process exec -> first anomaly score
    peak_rss_mib: float | None = None  # peak resident set of the backend's own process
    batch1: LatencyStats | None = None
    batch_n: LatencyStats | None = None
    batch: int | None = None
    throughput1_wps: float | None = None  # windows per second, inference only
    throughput_n_wps: float | None = None
    gflops1: float | None = None  # achieved: model FLOPs x batch / mean time
    gflops_n: float | None = None
    peak_fraction_n: float | None = None  # gflops_n / the same-precision GEMM peak
    rtf: float | None = None  # (front-end + inference at batch 1) / audio duration
    speedup: float | None = None  # reference mean / this mean, batch 1
    max_abs_diff: float | None = None  # |embedding - reference embedding|, first window
    first_score: float | None = None
    embedding: list[float] | None = field(default=None, repr=False)


@dataclass
class BenchReport:
    machine: dict
    bundle: dict
    settings: BenchSettings
    window_s: float
    flops_per_window: int | None
    peaks: dict[str, Peak]
    frontend: LatencyStats
    reference: str | None
    cases: list[CaseResult]
    notes: dict[str, str]

    def to_dict(self) -> dict:
        d = asdict(self)
        for case in d["cases"]:
            case.pop("embedding")
        return d
