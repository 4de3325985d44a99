"""Latency benchmark: every backend timed the same way, in one run, against the hardware peak.

Each backend runs in its own worker process (worker.py), started alone so that its cold
start and peak memory are its own; then all of them are timed round-robin, so a load
change on a shared machine hits every row alike. Each row is compared with a GEMM peak of
its precision measured in the same run (peaks.py). Torch-free: the PyTorch eager baseline
plugs in through `Case.factory` (eager.py), imported only in its own worker process.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from msn_edge.benchmarks import measure
from msn_edge.benchmarks.cases import (
    ALL_CASES,
    BenchReport,
    BenchSettings,
    Case,
    CaseResult,
    Peak,
    select_cases,
)
from msn_edge.benchmarks.measure import (
    LatencyStats,
    load_average,
    machine_info,
    synthetic_windows,
    time_call,
)
from msn_edge.benchmarks.op_profile import OpProfile, format_profile, graph_flops, profile_model
from msn_edge.benchmarks.peaks import measure_peak
from msn_edge.benchmarks.report import NOTES, format_report
from msn_edge.benchmarks.worker import Worker
from msn_edge.runtime.frontend import features
from msn_edge.runtime.packages import module_missing


def _skip_reason(
    case: Case, bundle, reasons: dict[str, str | None], checkpoint: str | None
) -> str | None:
    if case.precision == "int8" and "int8" not in bundle.variants:
        return "the bundle has no int8 model (export it with --int8)"
    if case.backend == "pytorch":
        if module_missing("torch"):
            return "torch not installed"
        if checkpoint is None:
            return "no --checkpoint given (the eager baseline runs the training checkpoint)"
        return None
    return reasons.get(case.backend, f"unknown backend {case.backend}")


def _start(
    bundle_path: Path, case: Case, settings: BenchSettings, checkpoint: str | None
) -> tuple[Worker | None, CaseResult]:
    """Start a backend's process alone and wait for its first score: its cold start."""
    job = {
        "kind": "case",
        "bundle": str(bundle_path),
        "case": asdict(case),
        "settings": asdict(settings),
        "checkpoint": checkpoint,
    }
    worker = Worker(job, settings.threads)
    event = worker.event()
    result = CaseResult(case.name, case.backend, case.precision, "ok", threads=settings.threads)
    if event is None or event.get("event") != "first_score":
        return None, replace(result, status="failed", reason=worker.failure(event))
    result.cold_start_ms = (time.perf_counter_ns() - worker.started_ns) / 1e6
    result.first_score = event["score"]
    return worker, result


def _interleaved(
    workers: dict[str, Worker], command: str, iterations: int, warmup: int
) -> tuple[dict[str, LatencyStats], dict[str, str]]:
    """Round-robin: each round, one call per live backend, so load drift hits all alike;
    each call after a pause that lets the previous backend's threads go idle."""
    samples: dict[str, list[int]] = {name: [] for name in workers}
    dead: dict[str, str] = {}
    for i in range(warmup + iterations):
        for name, worker in workers.items():
            if name in dead:
                continue
            time.sleep(measure.THREADS_IDLE_S)
            ns = worker.call(command)
            if ns is None:
                dead[name] = worker.failure(None)
            elif i >= warmup:
                samples[name].append(ns)
    stats = {n: LatencyStats.from_ns(s) for n, s in samples.items() if n not in dead}
    return stats, dead


def _finish(worker: Worker, result: CaseResult) -> CaseResult:
    event = worker.event() if worker.send("q") else None
    if event is None or event.get("event") != "result":
        return replace(result, status="failed", reason=worker.failure(event))
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
    workers: dict[str, Worker] = {}
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
    machine["loadavg_1m_end"] = load_average()
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


# --- `msn-edge bench`: the benchmark, optionally with per-op profiles ----------------


@dataclass
class BenchRun:
    """What `msn-edge bench` prints and writes: the report and the per-op profiles."""

    report: BenchReport
    profiles: list[OpProfile] = field(default_factory=list)

    def markdown(self) -> str:
        parts = [format_report(self.report), *(format_profile(p) for p in self.profiles)]
        return "".join(part + "\n" for part in parts)

    def to_dict(self) -> dict:
        data = self.report.to_dict()
        data["profiles"] = [p.to_dict() for p in self.profiles]
        return data


def bench_bundle(
    bundle_path: str | Path,
    settings: BenchSettings,
    *,
    backends: Iterable[str] = (),
    checkpoint: str | Path | None = None,
    profile: bool = False,
    on_step: Callable[[str, int, int], None] | None = None,
) -> BenchRun:
    """Benchmark the rows named by `backends` (names or prefixes; all if none), and with
    `profile` add ONNX Runtime's per-op profile of each CPU model those rows run."""
    cases = select_cases(backends)
    report = run_benchmark(
        bundle_path, settings, cases=cases, checkpoint=checkpoint, on_step=on_step
    )
    profiles = cpu_profiles(bundle_path, settings, cases) if profile else []
    return BenchRun(report, profiles)


def cpu_profiles(
    bundle_path: str | Path, settings: BenchSettings, cases: Iterable[Case]
) -> list[OpProfile]:
    """Per-op profiles of the bundle's CPU models that the selected rows use."""
    from msn_edge.runtime.bundle import read_bundle

    bundle = read_bundle(bundle_path)
    fe = bundle.frontend
    inputs = features(synthetic_windows(fe.window_samples, 1, settings.seed), fe)
    models = {"fp32": bundle.model_bytes("fp32")}
    if "int8" in bundle.variants:
        models["int8"] = bundle.int8_for_cpu()  # the model the ort-cpu-int8 row runs
    wanted = [c.precision for c in cases if c.backend == "cpu"]
    return [
        profile_model(
            model,
            inputs,
            threads=settings.threads,
            runs=max(1, min(settings.iterations, 10)),
            warmup=max(1, settings.warmup),
            label=f"ort-cpu-{p}",
        )
        for p, model in models.items()
        if p in wanted
    ]
