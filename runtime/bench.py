"""Latency benchmark: every backend timed the same way, in one run, against the hardware peak.

Each backend runs in a fresh subprocess, so that its cold start (process exec to the first
anomaly score) and its peak memory (that process's resident high-water mark) are its own,
not those of every library the benchmark loaded before it. The hardware peak is a GEMM of the same
precision, timed in its own subprocess with the same thread count, in the same run, so
every figure can be read as a fraction of what the machine can do.

This module is torch-free (the runtime rule). The PyTorch eager baseline plugs in through
`Case.factory`, a "module:function" that the child process imports.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from msn_edge.runtime.errors import MsnEdgeError
from msn_edge.runtime.frontend import features
from msn_edge.runtime.version import __version__

RUNTIME_FACTORY = "msn_edge.runtime.bench_child:runtime_engine"
CHILD_COMMAND = "from msn_edge.runtime.bench_child import main; main()"
THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
GEMM_SIZE = {"cpu": 2048, "gpu": 8192}  # compute-bound: 17 GFLOP (CPU), 1.1 TFLOP (GPU)
GEMM_REPEATS = 5  # the peak is the best of these, after one warm-up
BUSY_LOAD_PER_CORE = 0.25  # 1-min load average above this before a run: flag the timings
# Pause before each timed call of the round-robin: the previous backend's idle worker
# threads spin-wait after a call and would otherwise eat into the next backend's call.
# ONNX Runtime's pool spins for ~50 ms (measured: one core busy for 20 ms pauses, half of
# one for 100 ms); with a 20 ms pause two ORT backends each ran ~1.8x slower than alone.
# Every call thus starts with idle threads, as a monitor's call once per hop does.
SETTLE_S = 0.2
SIGNAL_RMS = 0.1  # synthetic input: white noise at about -20 dBFS
_MiB = 1 << 20


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


@dataclass(frozen=True)
class Case:
    """One row of the benchmark: a backend at a precision, built by `factory`."""

    name: str
    backend: str  # runtime backend name, or "pytorch" for the eager baseline
    precision: str
    device: str  # "cpu" | "gpu": which GEMM peak the row is compared with
    factory: str = RUNTIME_FACTORY

    @property
    def peak_key(self) -> str:
        return f"{self.device}-{self.precision}"


EAGER = Case("pytorch-eager", "pytorch", "fp32", "cpu", "msn_edge.cli.bench:eager_engine")
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


NOTES = {
    "latency": "wall time of engine.embed() per call (GPU rows: host-device copies "
    "included), time.perf_counter_ns, warm-up excluded; backends timed round-robin, each "
    "call after a 200 ms pause (idle threads, as in monitoring)",
    "throughput": "windows per second of inference alone = batch / mean latency",
    "rtf": "real-time factor = (front-end + inference at batch 1) / audio duration; "
    "below 1 is faster than real time",
    "cold_start": "wall time from exec of a fresh Python process to its first anomaly score "
    "(imports, bundle read and verify, engine build - a TensorRT build when none is cached - "
    "front-end, inference, scoring)",
    "peak_rss": "peak resident set of that process after all its timed runs (Linux VmHWM, "
    "else ru_maxrss): host memory only (interpreter, libraries, model, arena), not GPU memory",
    "flops": "2 x multiply-accumulates of the conv and linear nodes of the fp32 graph "
    "(ONNX Runtime profile shapes)",
    "peaks": "cpu-fp32: numpy float32 matmul (the BLAS numpy links); cpu-int8: ONNX Runtime "
    "MatMulInteger uint8 x int8; gpu-*: ONNX Runtime CUDA MatMul / MatMulInteger; "
    "square, best of several runs, same thread count as the backends",
}


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
        "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
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


# --- the parent: one subprocess per backend ------------------------------------------


class _Worker:
    """A benchmark subprocess (runtime/bench_child.py): JSON job in argv, commands on
    stdin, JSON events on stdout, stderr kept for the reason when it fails."""

    def __init__(self, job: dict, threads: int) -> None:
        env = dict(os.environ, **{k: str(threads) for k in THREAD_ENV})
        self._stderr = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed by close()
        self._last_words: str | None = None
        self.started_ns = time.perf_counter_ns()
        self._proc = subprocess.Popen(
            [sys.executable, "-c", CHILD_COMMAND, json.dumps(job)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env=env,
        )

    def event(self) -> dict | None:
        """The next JSON event; None once the process has closed its stdout."""
        for line in self._proc.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue  # a library printed to stdout; only our JSON lines count
            if isinstance(event, dict):
                return event
        return None

    def send(self, command: str) -> bool:
        """One command to the child; False if it is gone (its stdin is a broken pipe)."""
        try:
            self._proc.stdin.write(command + "\n")
            self._proc.stdin.flush()
        except OSError:
            return False
        return True

    def call(self, command: str) -> int | None:
        """Time one call in the child ("1" or "n"): ns, or None if the child died."""
        event = self.event() if self.send(command) else None
        return event["ns"] if event and event.get("event") == "t" else None

    def close(self) -> str:
        """Wait for the exit (idempotent); the last line it wrote to stderr, else its status."""
        if self._last_words is None:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()  # EOF on stdin: a serving child ends
            self._proc.wait()
            self._stderr.seek(0)
            lines = [ln for ln in self._stderr.read().splitlines() if ln.strip()]
            self._stderr.close()
            self._last_words = lines[-1] if lines else f"exit status {self._proc.returncode}"
        return self._last_words


def _failure(worker: _Worker, event: dict | None) -> str:
    reason = worker.close()
    if event is not None and event.get("event") == "error":
        return event["reason"]
    return f"the benchmark process failed: {reason}"


def measure_peak(key: str, threads: int) -> Peak:
    """GEMM peak of `key` ("cpu-fp32", "cpu-int8", "gpu-fp16", ...) in a fresh process."""
    device, precision = key.split("-")
    size = GEMM_SIZE[device]
    if not (device == "cpu" and precision == "fp32") and _module_missing("onnx"):
        reason = "needs the onnx package to build the GEMM model (pip install msn-edge[export])"
        return Peak(key, "onnxruntime", threads, size, None, reason)
    worker = _Worker({"kind": "gemm", "key": key, "threads": threads, "size": size}, threads)
    event = worker.event()
    if event is None or event.get("event") != "result":
        return Peak(key, "", threads, size, None, _failure(worker, event))
    worker.close()
    return Peak(key, event["method"], threads, size, event["gflops"])


def _module_missing(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is None
    except (ImportError, ValueError):  # a blocked or broken package counts as missing
        return True


def _skip_reason(
    case: Case, bundle, reasons: dict[str, str | None], checkpoint: str | None
) -> str | None:
    if case.precision == "int8" and "int8" not in bundle.variants:
        return "the bundle has no int8 model (export it with --int8)"
    if case.backend == "pytorch":
        if _module_missing("torch"):
            return "torch not installed"
        if checkpoint is None:
            return "no --checkpoint given (the eager baseline runs the training checkpoint)"
        return None
    return reasons.get(case.backend, f"unknown backend {case.backend}")


def _start(
    bundle_path: Path, case: Case, settings: BenchSettings, checkpoint: str | None
) -> tuple[_Worker | None, CaseResult]:
    """Start a backend's process alone and wait for its first score: its cold start."""
    job = {
        "kind": "case",
        "bundle": str(bundle_path),
        "case": asdict(case),
        "settings": asdict(settings),
        "checkpoint": checkpoint,
    }
    worker = _Worker(job, settings.threads)
    event = worker.event()
    result = CaseResult(case.name, case.backend, case.precision, "ok", threads=settings.threads)
    if event is None or event.get("event") != "first_score":
        return None, replace(result, status="failed", reason=_failure(worker, event))
    result.cold_start_ms = (time.perf_counter_ns() - worker.started_ns) / 1e6
    result.first_score = event["score"]
    return worker, result


def _interleaved(
    workers: dict[str, _Worker], command: str, iterations: int, warmup: int
) -> tuple[dict[str, LatencyStats], dict[str, str]]:
    """Round-robin: each round, one call per live backend, so load drift hits all alike;
    each call after a pause that lets the previous backend's threads go idle."""
    samples: dict[str, list[int]] = {name: [] for name in workers}
    dead: dict[str, str] = {}
    for i in range(warmup + iterations):
        for name, worker in workers.items():
            if name in dead:
                continue
            time.sleep(SETTLE_S)
            ns = worker.call(command)
            if ns is None:
                dead[name] = _failure(worker, None)
            elif i >= warmup:
                samples[name].append(ns)
    stats = {n: LatencyStats.from_ns(s) for n, s in samples.items() if n not in dead}
    return stats, dead


def _finish(worker: _Worker, result: CaseResult) -> CaseResult:
    event = worker.event() if worker.send("q") else None
    if event is None or event.get("event") != "result":
        return replace(result, status="failed", reason=_failure(worker, event))
    worker.close()
    return replace(
        result,
        engine=event["engine"],
        peak_rss_mib=event["peak_rss_mib"],
        embedding=event["embedding"],
    )


def _derive(
    r: CaseResult, flops: int | None, peak: Peak | None, frontend_ms: float, window_s: float
) -> CaseResult:
    """Throughput, achieved GFLOP/s, fraction of peak and real-time factor of a result."""
    r.throughput1_wps = 1e3 / r.batch1.mean_ms
    r.throughput_n_wps = r.batch * 1e3 / r.batch_n.mean_ms
    r.rtf = (frontend_ms + r.batch1.mean_ms) / 1e3 / window_s
    if flops:
        r.gflops1 = flops * r.throughput1_wps / 1e9
        r.gflops_n = flops * r.throughput_n_wps / 1e9
        if peak is not None and peak.gflops:
            r.peak_fraction_n = r.gflops_n / peak.gflops
    return r


def _compare(results: list[CaseResult]) -> str | None:
    """Speed-up and embedding agreement of every row against the first row that ran."""
    ok = [r for r in results if r.status == "ok"]
    if not ok:
        return None
    ref = ok[0]
    ref_emb = np.asarray(ref.embedding)
    for r in ok:
        r.speedup = ref.batch1.mean_ms / r.batch1.mean_ms
        if len(r.embedding) == ref_emb.size:
            r.max_abs_diff = float(np.abs(np.asarray(r.embedding) - ref_emb).max())
    return ref.name


def run_benchmark(
    bundle_path: str | Path,
    settings: BenchSettings,
    *,
    cases: Iterable[Case] = ALL_CASES,
    checkpoint: str | Path | None = None,
    on_step: Callable[[str, int, int], None] | None = None,
) -> BenchReport:
    """Benchmark every case on one bundle, in one run; unavailable ones are skipped.

    `on_step(name, done, total)` is called before each step, for a progress bar.
    """
    from msn_edge.runtime.bundle import read_bundle
    from msn_edge.runtime.engines import available_backends
    from msn_edge.runtime.profile import graph_flops

    bundle_path = Path(bundle_path)
    bundle = read_bundle(bundle_path)
    checkpoint = str(checkpoint) if checkpoint is not None else None
    machine = machine_info()
    reasons = available_backends()
    cases = list(cases)
    skips = {c.name: _skip_reason(c, bundle, reasons, checkpoint) for c in cases}
    runnable = [c for c in cases if not skips[c.name]]
    peak_keys = list(dict.fromkeys(["cpu-fp32"] + [c.peak_key for c in runnable]))
    total = 2 + len(peak_keys) + len(runnable) + 3
    done = 0

    def step(name: str) -> None:
        nonlocal done
        if on_step is not None:
            on_step(name, done, total)
        done += 1

    fe = bundle.frontend
    step("front-end")
    wave = synthetic_windows(fe.window_samples, 1, settings.seed)
    frontend = time_call(lambda: features(wave, fe), settings.iterations, settings.warmup)
    step("FLOP count")
    flops = graph_flops(bundle.model_bytes("fp32"), features(wave, fe))
    peaks: dict[str, Peak] = {}
    for key in peak_keys:
        step(f"GEMM peak {key}")
        peaks[key] = measure_peak(key, settings.threads)

    # Start each backend alone (its cold start is uncontended), keep them all loaded, then
    # time them interleaved; a result keeps its case order.
    results: dict[str, CaseResult] = {}
    workers: dict[str, _Worker] = {}
    try:
        for case in cases:
            if skips[case.name]:
                results[case.name] = CaseResult(
                    case.name, case.backend, case.precision, "skipped", skips[case.name]
                )
                continue
            step(f"starting {case.name}")
            worker, results[case.name] = _start(bundle_path, case, settings, checkpoint)
            if worker is not None:
                workers[case.name] = worker
        for command, field_name in (("1", "batch1"), ("n", "batch_n")):
            step(f"timing batch {1 if command == '1' else settings.batch}")
            stats, dead = _interleaved(workers, command, settings.iterations, settings.warmup)
            for name, reason in dead.items():
                results[name] = replace(results[name], status="failed", reason=reason)
                del workers[name]
            for name, s in stats.items():
                setattr(results[name], field_name, s)
        step("collecting results")
        by_case = {c.name: c for c in cases}
        for name, worker in workers.items():
            r = _finish(worker, replace(results[name], batch=settings.batch))
            if r.status == "ok":
                peak = peaks.get(by_case[name].peak_key)
                r = _derive(r, flops, peak, frontend.mean_ms, fe.window_s)
            results[name] = r
    finally:  # an interrupt or a bug here must not leave children waiting
        for worker in workers.values():
            worker.close()
    if on_step is not None:
        on_step("done", total, total)
    reference = _compare(list(results.values()))
    machine["loadavg_1m_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return BenchReport(
        machine=machine,
        bundle={
            "path": str(bundle_path),
            "sha256": bundle.sha256,
            "models": bundle.variants,
            "preset": bundle.manifest.get("metadata", {}).get("preset"),
        },
        settings=settings,
        window_s=fe.window_s,
        flops_per_window=flops,
        peaks=peaks,
        frontend=frontend,
        reference=reference,
        cases=list(results.values()),
        notes=dict(NOTES),
    )


# --- the report as markdown (the CLI's output and the committed table) -------------


def _f(x: float | None, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def _ms(x: float) -> str:
    """Milliseconds: two decimals below 10 ms (the toy and GPU rows), one above."""
    return f"{x:.2f}" if x < 10 else f"{x:.1f}"


def _row(cells: Iterable[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def format_notes(notes: dict[str, str]) -> str:
    """What each figure means, as a markdown list."""
    return "\n".join(f"- {k}: {v}" for k, v in notes.items()) + "\n"


def format_report(report: BenchReport, *, notes: bool = True) -> str:
    """Markdown: the backend table (ratios from this run), skips, peaks, front-end, notes."""
    s, m = report.settings, report.machine
    gflop = report.flops_per_window / 1e9 if report.flops_per_window else None
    ref = report.reference or "–"
    lines = [
        f"Bundle `{Path(report.bundle['path']).name}` ({report.bundle.get('preset') or '?'}), "
        f"{report.window_s:g} s windows, {_f(gflop, '.4g')} GFLOP per window; "
        f"{s.threads} thread{'s' if s.threads != 1 else ''}, "
        f"{s.iterations} timed iterations after {s.warmup} warm-up, "
        f"larger batch {s.batch}.",
        "",
        _row(
            [
                "backend",
                "latency ms (batch 1) mean ± std",
                "p50",
                "p90",
                "p99",
                "windows/s @1",
                f"windows/s @{s.batch}",
                f"GFLOP/s @{s.batch}",
                "% of GEMM peak",
                "RTF",
                "peak RSS MiB",
                "cold start s",
                f"speed-up vs {ref}",
                "max abs Δ embedding",
            ]
        ),
        _row(["---"] + ["---:"] * 13),
    ]
    for r in report.cases:
        if r.status != "ok":
            continue
        b = r.batch1
        lines.append(
            _row(
                [
                    r.name,
                    f"{_ms(b.mean_ms)} ± {_ms(b.std_ms)}",
                    _ms(b.p50_ms),
                    _ms(b.p90_ms),
                    _ms(b.p99_ms),
                    f"{r.throughput1_wps:.1f}",
                    f"{r.throughput_n_wps:.1f}",
                    _f(r.gflops_n, ".1f"),
                    _f(r.peak_fraction_n and 100 * r.peak_fraction_n, ".0f"),
                    f"{r.rtf:.4f}",
                    f"{r.peak_rss_mib:.0f}",
                    f"{r.cold_start_ms / 1e3:.2f}",
                    f"{r.speedup:.2f}×",
                    _f(r.max_abs_diff, ".1e"),
                ]
            )
        )
    others = [r for r in report.cases if r.status != "ok"]
    if others:
        lines += ["", "Not measured:"]
        lines += [f"- {r.name}: {r.status}, {r.reason}" for r in others]
    fe = report.frontend
    lines += [
        "",
        f"Front-end (numpy STFT + utterance spectrum, per window): {_ms(fe.mean_ms)} ± "
        f"{_ms(fe.std_ms)} ms (p50 {_ms(fe.p50_ms)}, p99 {_ms(fe.p99_ms)}, n={fe.iterations}).",
        "",
        _row(["GEMM peak", "method", "threads", "size", "GFLOP/s (int8: GOP/s)"]),
        _row(["---", "---", "---:", "---:", "---:"]),
    ]
    for p in report.peaks.values():
        lines.append(
            _row([p.key, p.method or "–", str(p.threads), str(p.size), _f(p.gflops, ".1f")])
            if p.gflops
            else _row([p.key, f"not measured: {p.reason}", str(p.threads), str(p.size), "–"])
        )
    load = m.get("loadavg_1m")
    if load is not None and load > BUSY_LOAD_PER_CORE * (m["cores"] or 1):
        lines += [
            "",
            f"**Warning:** the 1-min load average was {load:.2f} on {m['cores']} cores when "
            "the run started: other processes shared the CPU (and its caches and memory "
            "bandwidth), so these timings are inflated.",
        ]
    lines += [
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['system']}; Python {m['python']}, "
        f"numpy {m['numpy']}, onnxruntime {m['onnxruntime']}, msn-edge {m['msn_edge']}; "
        f"load average (1 min) {_f(m.get('loadavg_1m'), '.2f')} before, "
        f"{_f(m.get('loadavg_1m_end'), '.2f')} after; scheduling: {m.get('priority')}.",
    ]
    text = "\n".join(lines) + "\n"
    return text + "\n" + format_notes(report.notes) if notes else text
