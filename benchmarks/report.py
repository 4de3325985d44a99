"""The benchmark report as markdown: the CLI's output and the committed results tables."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from msn_edge.benchmarks.cases import BenchReport
from msn_edge.benchmarks.measure import BUSY_LOAD_PER_CORE

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
