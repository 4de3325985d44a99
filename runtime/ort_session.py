"""ONNX Runtime session options, built in one place for every session the project opens.

The engines, the benchmark's GEMM peak and per-op profile, and the latency script's
settings sweep all configure ONNX Runtime the same way (threads, one inter-op thread,
errors-only logging); only what they measure differs, and that is a keyword here.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnxruntime as ort

# Graph optimisation levels by name (ort.GraphOptimizationLevel members).
OPT_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}
LOG_ERRORS_ONLY = 3  # ORT severity: 0 verbose ... 3 error; keep stderr for our logs
# How long to pause before timing a call so that the worker threads of the session that ran
# before are idle: ONNX Runtime's pool spin-waits ~50 ms after a call (measured: one core
# busy for 20 ms pauses, half of one for 100 ms; with 20 ms pauses two sessions timed in
# turn each ran ~1.8x slower than alone). For timings only (bench, the export's report).
ORT_THREADS_IDLE_S = 0.2


def session_options(
    *,
    threads: int = 0,
    opt_level: str = "all",
    profile_prefix: str | Path | None = None,
    disable_prepacking: bool = False,
    log_level: int = LOG_ERRORS_ONLY,
) -> ort.SessionOptions:
    """SessionOptions for one session; onnxruntime must be importable (callers check).

    threads: intra-op threads, 0 = ONNX Runtime's default (every physical core). The
    inter-op pool is one thread: the graph is one chain, parallelism lives inside ops.
    profile_prefix: turn ONNX Runtime's per-node profiling on, writing there.
    disable_prepacking: keep weights in their logical shapes, so a profile shows them.
    """
    import onnxruntime as ort

    if opt_level not in OPT_LEVELS:
        raise ValueError(
            f"unknown optimisation level {opt_level!r} (choose from {list(OPT_LEVELS)})"
        )
    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPT_LEVELS[opt_level])
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = log_level
    if profile_prefix is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(profile_prefix)
    if disable_prepacking:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    return opts
