"""Regenerate benchmarks/results-cpu.md: every backend on real `msn-edge export` bundles.

For each preset (default: tiny and dcase2020) it makes a run folder, exports it with
`msn-edge export RUN -o B.msn --int8`, runs `msn-edge bench`'s benchmark on the bundle with
the run as the PyTorch eager baseline, and for the largest preset adds ONNX Runtime's
per-op profile and a sweep of session settings. Without --run, a run is the preset's MSN
randomly initialised (latency does not depend on the weight values; int8 accuracy does,
so the int8 row's embedding difference is that of random weights).

    python benchmarks/latency.py                                  # the committed table
    python benchmarks/latency.py --preset tiny --iterations 5 --out /tmp/tiny.md
    python benchmarks/latency.py --run dcase2020=runs/fan         # a trained run instead

Run it on an idle machine: the report records the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from msn_edge.benchmarks.cases import BenchReport, BenchSettings
from msn_edge.benchmarks.measure import BUSY_LOAD_PER_CORE, synthetic_windows
from msn_edge.benchmarks.op_profile import feeds_by_rank, format_profile, profile_model
from msn_edge.benchmarks.report import NOTES, format_notes, format_report
from msn_edge.benchmarks.runner import run_benchmark
from msn_edge.runtime.bundle import MODEL_MEMBERS, read_bundle
from msn_edge.runtime.frontend import features
from msn_edge.runtime.ort_session import session_options

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results-cpu.md"
# Real normal clips (DCASE 2020, 10 s): export calibrates the int8 model on a run's data.
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "dcase2020_id00"
N_PROTOTYPES = 16  # random unit prototypes of an untrained run: scoring cost is negligible
SWEEP_LEVELS = ("basic", "extended", "all")
COMMAND = "python benchmarks/latency.py"
LOAD_SETTLE_LIMIT_S = 180  # longest wait for the load average to settle after exporting
VARIANT_ROLES = {
    "fp32": "the ort-cpu-fp32 row",
    "int8": "int8 for TensorRT, run here on the CPU",
    "int8-cpu": "the ort-cpu-int8 row",
}


def make_random_run(preset_name: str, run_dir: Path, data: Path, seed: int = 0) -> Path:
    """A run folder the exporter accepts: an untrained MSN, random unit prototypes, and
    `data` as its training data (export calibrates int8 on those clips)."""
    import torch

    from msn_edge.checkpoint import save_checkpoint
    from msn_edge.config import preset
    from msn_edge.model import MSN
    from msn_edge.prototypes import Scoring, save_scoring
    from msn_edge.runtime.bundle import ScoringGroup

    config = preset(preset_name)
    torch.manual_seed(seed)
    model = MSN(config.model).eval()
    classes = ["bench/id_00", "bench/id_01"]
    state = {
        "config": config.to_dict(),
        "model": model.state_dict(),
        "epoch": 0,
        "classes": classes,
        "auxiliary": None,
        "data": {"roots": [str(data)], "n_clips": 0, "groups": classes},
    }
    save_checkpoint(run_dir / "checkpoint.pt", state)
    rng = np.random.default_rng(seed)
    protos = rng.standard_normal((N_PROTOTYPES, config.model.embedding_dim))
    protos = (protos / np.linalg.norm(protos, axis=1, keepdims=True)).astype(np.float32)
    group = ScoringGroup("bench", 0, N_PROTOTYPES, 0.5, {"method": "random (benchmark only)"})
    save_scoring(run_dir, Scoring(protos, [group]))
    return run_dir


def wait_for_quiet(limit_s: float = LOAD_SETTLE_LIMIT_S) -> None:
    """Wait (up to limit_s) for the 1-min load average to fall below the level at which the
    report flags a busy machine: the exports just run raise it for a minute or two."""
    busy = BUSY_LOAD_PER_CORE * (os.cpu_count() or 1)
    deadline = time.monotonic() + limit_s
    while os.getloadavg()[0] > busy and time.monotonic() < deadline:
        time.sleep(5)
    print(f"load average {os.getloadavg()[0]:.2f} before timing", file=sys.stderr)


def export_bundle(run_dir: Path, bundle: Path) -> None:
    """`msn-edge export RUN -o BUNDLE --int8`, the command users run."""
    cmd = [sys.executable, "-c", "from msn_edge.cli import main; main()"]
    cmd += ["export", str(run_dir), "-o", str(bundle), "--int8"]
    subprocess.run(cmd, check=True)


def sweep_sessions(
    model: bytes, inputs: tuple[np.ndarray, ...], threads: list[int], rounds: int
) -> list[tuple[str, int, float, float]]:
    """(opt level, threads, min ms, p50 ms) of plain ORT sessions, timed interleaved.

    Round-robin over the settings, so that a load spike on a shared machine hits every
    setting alike instead of the one that happened to run then.
    """
    import onnxruntime as ort

    sessions = {}
    for level in SWEEP_LEVELS:
        for n in threads:
            opts = session_options(threads=n, opt_level=level)
            s = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
            feeds = feeds_by_rank(s, inputs)
            s.run(None, feeds)
            sessions[(level, n)] = (s, feeds, [])
    for _ in range(rounds):
        for s, feeds, times in sessions.values():
            t0 = time.perf_counter_ns()
            s.run(None, feeds)
            times.append((time.perf_counter_ns() - t0) / 1e6)
    return [(level, n, min(t), float(np.median(t))) for (level, n), (_, _, t) in sessions.items()]


def summary(report: BenchReport) -> list[str]:
    """The figures the issue asks for, derived from one report."""
    rows = {c.name: c for c in report.cases if c.status == "ok"}
    peak = report.peaks.get("cpu-fp32")
    lines = []
    if peak and peak.gflops and report.flops_per_window:
        limit = report.flops_per_window / peak.gflops / 1e6
        lines.append(
            f"- FLOP-bound limit at the measured fp32 GEMM peak ({peak.gflops:.0f} GFLOP/s): "
            f"{limit:.1f} ms per window."
        )
        for name in ("pytorch-eager", "ort-cpu-fp32", "ort-cpu-int8"):
            if name in rows:
                r = rows[name]
                lines.append(
                    f"- {name}: p50 {r.batch1.p50_ms:.1f} ms at batch 1 = "
                    f"{r.batch1.p50_ms / limit:.2f}× that limit (min {r.batch1.min_ms:.1f} ms "
                    f"= {r.batch1.min_ms / limit:.2f}×); batch {r.batch}: "
                    f"{1e3 / r.throughput_n_wps:.1f} ms per window."
                )
    if "ort-cpu-fp32" in rows and "ort-cpu-int8" in rows:
        fp32, int8 = rows["ort-cpu-fp32"], rows["ort-cpu-int8"]
        lines.append(
            f"- int8 / fp32 (ONNX Runtime, batch 1): mean "
            f"{int8.batch1.mean_ms / fp32.batch1.mean_ms:.2f}, p50 "
            f"{int8.batch1.p50_ms / fp32.batch1.p50_ms:.2f}, min "
            f"{int8.batch1.min_ms / fp32.batch1.min_ms:.2f}"
        )
    if "pytorch-eager" in rows and "ort-cpu-fp32" in rows:
        eager, fp32 = rows["pytorch-eager"], rows["ort-cpu-fp32"]
        lines.append(
            f"- ONNX Runtime fp32 speed-up over PyTorch eager (batch 1 mean): "
            f"{eager.batch1.mean_ms / fp32.batch1.mean_ms:.2f}×"
        )
    return lines


def profile_section(bundle_path: Path, settings: BenchSettings, rounds: int) -> list[str]:
    bundle = read_bundle(bundle_path)
    fe = bundle.frontend
    inputs = features(synthetic_windows(fe.window_samples, 1, settings.seed), fe)
    lines = [
        "### Where the time goes (ONNX Runtime per-op profile, batch 1)",
        "",
        "Every model of the bundle on ONNX Runtime CPU, including the int8 model made for "
        "TensorRT (int8 activations), which the ort-cpu-int8 row does not run: its profile "
        "shows why the CPU gets a uint8-activation model of its own.",
        "",
    ]
    for variant in bundle.variants:
        p = profile_model(
            bundle.model_bytes(variant),
            inputs,
            threads=settings.threads,
            runs=10,
            warmup=3,
            label=f"{MODEL_MEMBERS[variant]} ({VARIANT_ROLES[variant]})",
        )
        lines += [format_profile(p), ""]
    lines += [
        "### ONNX Runtime session settings (batch 1, interleaved rounds)",
        "",
        "| model | graph optimisation | threads | min ms | p50 ms |",
        "|---|---|---:|---:|---:|",
    ]
    threads = sorted({1, settings.threads})
    for variant in bundle.variants:
        for level, n, best, p50 in sweep_sessions(
            bundle.model_bytes(variant), inputs, threads, rounds
        ):
            lines.append(f"| {MODEL_MEMBERS[variant]} | {level} | {n} | {best:.1f} | {p50:.1f} |")
    return lines + [""]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", action="append", help="tiny, dcase2020, dcase2023 (repeatable)")
    ap.add_argument(
        "--run",
        action="append",
        default=[],
        metavar="PRESET=RUN",
        help="use a trained run for a preset instead of random weights",
    )
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/msn-edge-bench"))
    ap.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_DATA,
        help="normal clips (DCASE layout) that calibrate int8 for random runs",
    )
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--iterations", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=BenchSettings().threads)
    ap.add_argument("--sweep-rounds", type=int, default=10)
    ap.add_argument(
        "--reuse-bundles",
        action="store_true",
        help="benchmark bundles already in --workdir instead of exporting again",
    )
    args = ap.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    presets = args.preset or ["tiny", "dcase2020"]
    runs = dict(r.split("=", 1) for r in args.run)
    settings = BenchSettings(
        iterations=args.iterations, warmup=args.warmup, batch=args.batch, threads=args.threads
    )
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# msn-edge latency on this CPU",
        "",
        f"Generated {now} by `{COMMAND}` (see benchmarks/README.md). Each backend ran in its "
        "own fresh process; all ratios come from the same run. Weights: "
        + ", ".join(f"{p}: {'trained run' if p in runs else 'random init'}" for p in presets)
        + ".",
        "",
    ]
    jobs = {}
    for name in presets:  # export everything first: its load must not flag the timings
        run_dir = Path(runs[name]) if name in runs else args.workdir / f"{name}-random"
        bundle = args.workdir / f"{name}.msn"
        if not (args.reuse_bundles and bundle.is_file()):
            if name not in runs:
                make_random_run(name, run_dir, args.data)
            export_bundle(run_dir, bundle)
        jobs[name] = (run_dir, bundle)
    wait_for_quiet()
    for name, (run_dir, bundle) in jobs.items():
        print(f"benchmarking {name} ...", file=sys.stderr)
        report = run_benchmark(bundle, settings, checkpoint=run_dir)
        lines += [f"## {name}", "", format_report(report, notes=False), *summary(report), ""]
        if name == presets[-1]:
            lines += profile_section(bundle, settings, args.sweep_rounds)
    lines += ["## What the figures are", "", format_notes(NOTES)]
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
