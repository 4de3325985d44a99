"""How many 10 s streams one box monitors in real time: the monitor itself, N synthetic streams.

Streams come from synthetic 8-channel "devices" (the interfaces a box listens through),
each paced at real time and started at a random phase, so that windows of different
devices become ready at different moments, as on a real box. Every stream runs through
the real monitor: windowers, batched calls of one shared ONNX Runtime engine, scorers,
alarm states and events. After `--seconds` the devices end their audio and the monitor
drains what it holds (for at most a hop). A stream count is *held* when every window
whose audio ended before the stop was scored, nothing was dropped, and the p99 latency
(from a window's last sample to its event) stays below the hop (capacity_criterion.py).

Beside it, the FLOP bound: the model's FLOPs per window over the fp32 GEMM peak measured
in the same run, and the engine's batched time per window against it.

    python benchmarks/capacity.py                          # exports a random dcase2020 bundle
    python benchmarks/capacity.py --bundle fan.msn --streams 64,128,160 --seconds 40
    python benchmarks/capacity.py --out benchmarks/results-capacity.md

Run it on an idle machine; the report records the load average before and after.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from msn_edge.benchmarks.capacity_criterion import Scored, judge
from msn_edge.benchmarks.measure import synthetic_windows
from msn_edge.benchmarks.op_profile import graph_flops
from msn_edge.benchmarks.peaks import measure_peak
from msn_edge.runtime.bundle import read_bundle
from msn_edge.runtime.detector import SharedEngine
from msn_edge.runtime.engines import make_engine
from msn_edge.runtime.frontend import features
from msn_edge.runtime.monitor import Input, Monitor, Stream
from msn_edge.runtime.monitor_config import BatchPolicy
from msn_edge.runtime.sources import LiveSource

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "dcase2020_id00"
CHANNELS = 8  # streams per synthetic device
CHUNK_S = 0.1  # a device period
BLOCK_S = 3.0  # synthetic audio is cycled from blocks this long


class SyntheticDevice:
    """A CaptureReader: CHANNELS channels of noise at real time, first chunk after `phase_s`.

    Its audio ends (read() gives None) with the last chunk that is complete by `end_at`
    (time.monotonic()), as a device unplugged then would.
    """

    overruns = 0

    def __init__(self, rate: int, phase_s: float, seed: int, end_at: float) -> None:
        rng = np.random.default_rng(seed)
        self.channels = CHANNELS
        self.rate = rate
        self.chunk = int(CHUNK_S * rate)
        n = int(BLOCK_S * rate) // self.chunk * self.chunk
        self.block = (rng.standard_normal((n, CHANNELS)) * 3000).astype(np.int16)
        self.pos = 0
        self.t0: float | None = None  # monotonic time of stream position 0
        self.phase_s = phase_s
        self.end_at = end_at

    def read(self) -> np.ndarray | None:
        if self.t0 is None:
            time.sleep(self.phase_s)
            self.t0 = time.monotonic()
        due = self.t0 + (self.pos + self.chunk) / self.rate
        if due > self.end_at:
            return None
        time.sleep(max(0.0, due - time.monotonic()))
        start = self.pos % self.block.shape[0]
        self.pos += self.chunk
        return self.block[start : start + self.chunk]

    def close(self) -> None:
        pass


def run_streams(shared: SharedEngine, n_streams: int, seconds: float, policy: BatchPolicy) -> dict:
    """N streams whose audio ends after `seconds`, drained; the verdict and its figures.

    The monitor runs until every device has ended and every window in hand is scored,
    or until a hop after the stop, when it is stopped: a window not scored by then has
    waited longer than the hop, and counts as missing.
    """
    rate = shared.frontend.sample_rate
    window_s = shared.frontend.window_s
    size = shared.frontend.window_samples
    rng = np.random.default_rng(n_streams)
    devices: list[tuple[SyntheticDevice, list[str]]] = []
    inputs = []
    device_of: dict[str, SyntheticDevice] = {}
    scored: list[Scored] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds
    with contextlib.ExitStack() as stack:
        for d in range(-(-n_streams // CHANNELS)):
            dev = SyntheticDevice(rate, float(rng.uniform(0, window_s)), seed=d, end_at=stop_at)
            source = stack.enter_context(LiveSource(f"dev{d}", rate, lambda dev=dev: dev))
            members = []
            for ch in range(min(CHANNELS, n_streams - d * CHANNELS)):
                stream = Stream(f"d{d}c{ch}", shared, shared.scorer(), alarm_after=3)
                device_of[stream.name] = dev  # for the latency of its events
                members.append((ch, stream))
            devices.append((dev, [s.name for _, s in members]))
            inputs.append(Input(source, members, pumped=True))

        def sink(event: dict) -> None:
            if event["event"] != "window":
                return
            now = time.monotonic()
            dev = device_of[event["stream"]]
            # The window's last sample was read at t0 + its end (hop = window).
            end = dev.t0 + (event["index"] + 1) * window_s
            with lock:
                scored.append(Scored(event["stream"], event["index"], now - end))

        monitor = Monitor(inputs, sink, policy=policy)
        # The drain's bound: a hop after the audio ended.
        timer = threading.Timer(max(0.0, stop_at + window_s - time.monotonic()), monitor.stop)
        timer.start()
        cpu0 = time.process_time()
        result = monitor.run()
        ended = time.monotonic()
        cpu_s = time.process_time() - cpu0
        drained = timer.is_alive()  # ended on its own, before the bound
        timer.cancel()
        # Per device (its channels' streams all carry the same counters).
        losses = [inp.source.snapshot() for inp in inputs]
    # Due: every window whose audio the device delivered (it ends before the stop).
    due = {name: dev.pos // size for dev, names in devices for name in names}
    dropped = sum(x.dropped_samples for x in losses)
    verdict = judge(due, scored, dropped=dropped, hop_s=window_s)
    sizes = [s for v in result.calls.values() for s in v]
    return {
        "streams": n_streams,
        "verdict": verdict,
        "due": verdict.due,
        "scored": verdict.scored,
        "overruns": sum(x.overruns for x in losses),
        "dropped": dropped,
        "calls": len(sizes),
        "mean_batch": float(np.mean(sizes)) if sizes else 0.0,
        "p50": verdict.percentile(50),
        "p90": verdict.percentile(90),
        "p99": verdict.percentile(99),
        "max": float(verdict.latencies.max()) if verdict.latencies.size else float("nan"),
        "cpu_s": cpu_s,
        "wall_s": result.wall_s,
        "drain_s": max(0.0, ended - stop_at) if drained else float("nan"),
    }


def held(row: dict) -> bool:
    return row["verdict"].held


def batched_ms(shared: SharedEngine, batch: int, iterations: int) -> float:
    """Median ms per window of back-to-back engine calls at `batch` (inference only)."""
    fe = shared.frontend
    spec, spectrum = features(synthetic_windows(fe.window_samples, batch, 0), fe)
    shared.engine.embed(spec, spectrum)
    times = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        shared.engine.embed(spec, spectrum)
        times.append((time.perf_counter() - t0) * 1e3 / batch)
    return float(np.median(times))


def frontend_ms(shared: SharedEngine, batch: int = 8) -> float:
    fe = shared.frontend
    windows = synthetic_windows(fe.window_samples, batch, 1)
    features(windows, fe)
    t0 = time.perf_counter()
    for _ in range(3):
        features(windows, fe)
    return (time.perf_counter() - t0) * 1e3 / (3 * batch)


def make_bundle(work: Path) -> Path:
    """A random-weight dcase2020 run, exported with `msn-edge export` (fp32 only)."""
    from msn_edge.benchmarks.latency import make_random_run

    bundle = work / "dcase2020.msn"
    if not bundle.exists():
        run = make_random_run("dcase2020", work / "run", DEFAULT_DATA)
        cmd = [sys.executable, "-c", "from msn_edge.cli import main; main()"]
        subprocess.run([*cmd, "export", str(run), "-o", str(bundle)], check=True)
    return bundle


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", type=Path, help="bundle to run [default: export dcase2020]")
    p.add_argument("--work", type=Path, help="where to export the bundle [a temp folder]")
    p.add_argument("--streams", default="64,128,160", help="stream counts to try")
    p.add_argument("--seconds", type=float, default=35.0, help="wall time per count")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="inference threads")
    p.add_argument("--max-batch", type=int, default=BatchPolicy.max_batch)
    p.add_argument("--max-wait", type=float, default=BatchPolicy.max_wait_s)
    p.add_argument("--iterations", type=int, default=5, help="calls per batched timing")
    p.add_argument("--out", type=Path, help="write the markdown report here")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    logging.getLogger("msn_edge.runtime.monitor").setLevel(logging.ERROR)  # noise raises alarms

    with tempfile.TemporaryDirectory() as tmp:
        bundle_path = args.bundle or make_bundle(args.work or Path(tmp))
        load_before = os.getloadavg()[0]
        bundle = read_bundle(bundle_path)
        shared = SharedEngine(bundle, make_engine(bundle, "cpu", threads=args.threads))
        fe = bundle.frontend
        spec, spectrum = features(synthetic_windows(fe.window_samples, 1, 0), fe)
        flops = graph_flops(bundle.model_bytes("fp32"), (spec, spectrum))
        peak = measure_peak("cpu-fp32", args.threads).gflops
        flop_ms = flops / peak / 1e6
        fe_ms = frontend_ms(shared)
        batched = {b: batched_ms(shared, b, args.iterations) for b in (1, 8, 16)}
        policy = BatchPolicy(args.max_batch, args.max_wait)
        rows = []
        for n in (int(x) for x in args.streams.split(",")):
            row = run_streams(shared, n, args.seconds, policy)
            rows.append(row)
            shown = {k: v for k, v in row.items() if k != "verdict"}
            print(shown, "; ".join(row["verdict"].reasons) or "held", file=sys.stderr, flush=True)
        load_after = os.getloadavg()[0]

    hop = fe.window_s
    best = max((r["streams"] for r in rows if held(r)), default=0)
    lines = [
        "# Capacity: streams monitored in real time",
        "",
        f"Generated by `python benchmarks/capacity.py` on "
        f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}: bundle "
        f"{bundle_path.name} ({fe.window_s:g} s windows, hop = window), ONNX Runtime CPU "
        f"fp32, {args.threads} threads, {os.cpu_count()} cores; batches of up to "
        f"{policy.max_batch}, wait at most {policy.max_wait_s:g} s; {args.seconds:g} s of "
        f"audio per row, then drained; streams from {CHANNELS}-channel synthetic devices at random "
        f"phases. 1-min load average {load_before:.2f} before, {load_after:.2f} after"
        + (
            " — **the machine was busy: these figures are a lower bound**."
            if load_before > 0.5 * (os.cpu_count() or 1)
            else "."
        ),
        "",
        "| streams | windows due | scored | dropped samples | engine calls | mean batch "
        "| latency p50 s | p90 s | p99 s | max s | drain s | monitor CPU s | held |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['streams']} | {r['due']} | {r['scored']} | {r['dropped']} | {r['calls']} "
            f"| {r['mean_batch']:.1f} | {r['p50']:.2f} | {r['p90']:.2f} | {r['p99']:.2f} "
            f"| {r['max']:.2f} | {r['drain_s']:.1f} | {r['cpu_s']:.0f} "
            f"| {'yes' if held(r) else 'no: ' + '; '.join(r['verdict'].reasons)} |"
        )
    lines += [
        "",
        "Latency is from a window's last sample to its event: queueing, batching, front-end, "
        "inference and scoring. Each row's devices end their audio after the stated time; "
        "the monitor then scores what it holds (*drain*: from the end of the audio to the "
        "last event; it is stopped if that takes a hop, so that a window not scored by "
        "then is missing). *Windows due*: every window whose audio ended before the stop. "
        "*Held*: every due window scored, nothing dropped, p99 below the hop "
        "(benchmarks/capacity_criterion.py).",
        "",
        "## Beside the FLOP bound",
        "",
        f"- Model: {flops / 1e9:.2f} GFLOP per window; fp32 GEMM peak measured in this run "
        f"{peak:.0f} GFLOP/s: FLOP-bound inference {flop_ms:.1f} ms per window.",
        f"- Front-end (numpy): {fe_ms:.1f} ms per window.",
        f"- FLOP bound on streams: {hop:g} s / ({flop_ms:.1f} + {fe_ms:.1f}) ms = "
        f"{hop * 1e3 / (flop_ms + fe_ms):.0f} streams (inference alone: "
        f"{hop * 1e3 / flop_ms:.0f}).",
        f"- Held here: {best} streams = {best / (hop * 1e3 / (flop_ms + fe_ms)):.0%} of that "
        "bound.",
        "",
        "| batch | ms per window (median of back-to-back calls) | × FLOP bound |",
        "|---:|---:|---:|",
    ]
    lines += [f"| {b} | {ms:.1f} | {ms / flop_ms:.2f} |" for b, ms in batched.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
