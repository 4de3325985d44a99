"""Benchmark settings for tests, which check the report's figures, not the timings."""

from __future__ import annotations

import pytest

from msn_edge.benchmarks import measure, peaks

SMALL_GEMM = {"cpu": 256, "gpu": 1024}  # a GEMM peak measured in milliseconds
FAST_THREADS_IDLE_S = 0.01  # short pauses between the round-robin calls


def make_bench_fast(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(peaks, "GEMM_SIZE", SMALL_GEMM)
    mp.setattr(measure, "THREADS_IDLE_S", FAST_THREADS_IDLE_S)
