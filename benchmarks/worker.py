"""The benchmark's worker process: how the parent drives one, and what runs inside it.

Each backend (and each GEMM peak) runs in a fresh process, so that its cold start
(process exec to the first anomaly score) and its peak memory are its own, not those of
every library the parent loaded. A backend process builds its engine and scores one
window (the parent's cold-start clock stops at that event), then waits for commands on
stdin: "1" times one batch-1 call, "n" one call at the larger batch, "q" ends with its
memory high-water mark. Events are JSON lines on stdout; stderr is kept for the reason
when a process fails. Torch-free, except what a case's factory imports (the eager row).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np

from msn_edge.benchmarks.cases import BenchSettings, Case
from msn_edge.benchmarks.measure import peak_rss_mib, synthetic_windows
from msn_edge.runtime.errors import MsnEdgeError
from msn_edge.runtime.frontend import features

CHILD_COMMAND = "from msn_edge.benchmarks.worker import main; main()"
THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


# --- the parent's side ------------------------------------------------------------


class Worker:
    """A worker process: JSON job in argv, commands on stdin, JSON events on stdout."""

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

    def failure(self, event: dict | None) -> str:
        """Why the worker failed: its error event, else the last words of its exit."""
        reason = self.close()
        if event is not None and event.get("event") == "error":
            return event["reason"]
        return f"the benchmark process failed: {reason}"


# --- the worker's side: one backend serving timed calls ------------------------------


def _emit(obj: dict) -> None:
    """One event to the parent."""
    print(json.dumps(obj), flush=True)


def runtime_engine(bundle, case: Case, settings: BenchSettings, checkpoint: str | None):
    """The runtime backend of `case` (ONNX Runtime or native TensorRT)."""
    from msn_edge.runtime.engines import make_engine

    return make_engine(bundle, case.backend, precision=case.precision, threads=settings.threads)


def _resolve(factory: str) -> Callable:
    module, _, func = factory.partition(":")
    return getattr(importlib.import_module(module), func)


def _serve(bundle_path: str, case: Case, settings: BenchSettings, checkpoint: str | None):
    """Build and score one window, then time the calls the parent asks for."""
    from msn_edge.runtime.bundle import read_bundle
    from msn_edge.runtime.scorer import anomaly_scores

    bundle = read_bundle(bundle_path)
    engine = _resolve(case.factory)(bundle, case, settings, checkpoint)
    fe = bundle.frontend
    waves = synthetic_windows(fe.window_samples, settings.batch, settings.seed)
    spec, spectrum = features(waves, fe)
    emb = engine.embed(spec[:1], spectrum[:1])
    _emit({"event": "first_score", "score": float(anomaly_scores(emb, bundle.prototypes)[0])})
    calls = {
        "1": lambda: engine.embed(spec[:1], spectrum[:1]),
        "n": lambda: engine.embed(spec, spectrum),
    }
    for line in sys.stdin:
        command = line.strip()
        if command == "q":
            break
        t0 = time.perf_counter_ns()
        calls[command]()
        _emit({"event": "t", "ns": time.perf_counter_ns() - t0})
    _emit(
        {
            "event": "result",
            "engine": getattr(engine, "name", case.backend),
            "embedding": np.asarray(emb[0], dtype=np.float64).tolist(),
            "peak_rss_mib": peak_rss_mib(),
        }
    )


def main() -> None:
    """Entry point: argv[1] is the JSON job; events go to stdout as JSON lines."""
    job = json.loads(sys.argv[1])
    try:
        if job["kind"] == "gemm":
            from msn_edge.benchmarks.peaks import gemm_job

            _emit(gemm_job(job["key"], job["threads"], job["size"]))
        else:
            settings = BenchSettings(**job["settings"])
            _serve(job["bundle"], Case(**job["case"]), settings, job["checkpoint"])
    except (MsnEdgeError, ImportError) as e:
        _emit({"event": "error", "reason": str(e)})
        sys.exit(1)
