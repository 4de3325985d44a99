"""What runs inside a benchmark subprocess: a GEMM peak, or one backend serving timed calls.

A backend process builds its engine and scores one window (the parent's cold-start clock
stops at that event), then waits for commands on stdin: "1" times one batch-1 call, "n"
one call at the larger batch, "q" ends with its memory high-water mark. The parent sends
the commands round-robin over every live backend, so a load change on a shared machine
hits all of them alike. Events are JSON lines on stdout; torch-free like all the runtime.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from collections.abc import Callable

import numpy as np

from msn_edge.runtime.bench import (
    GEMM_REPEATS,
    BenchSettings,
    Case,
    peak_rss_mib,
    synthetic_windows,
    time_call,
)
from msn_edge.runtime.errors import BackendError, MsnEdgeError
from msn_edge.runtime.frontend import features


def _emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


# --- hardware peak: a GEMM of the same precision -----------------------------------


def _blas_name() -> str:
    try:
        return np.show_config(mode="dicts")["Build Dependencies"]["blas"]["name"]
    except (TypeError, KeyError):  # numpy < 1.26 has no dict form
        return "BLAS"


def _matmul_model(precision: str, device: str) -> bytes:
    """One MatMul (fp32/fp16) or MatMulInteger (int8) node; needs the onnx package."""
    from onnx import TensorProto, helper

    if precision == "int8":
        # MLAS's fast CPU path is uint8 x int8; the CUDA kernel takes int8 x int8 only.
        a_type = TensorProto.UINT8 if device == "cpu" else TensorProto.INT8
        op, types, out_type = "MatMulInteger", (a_type, TensorProto.INT8), TensorProto.INT32
    else:
        t = TensorProto.FLOAT16 if precision == "fp16" else TensorProto.FLOAT
        op, types, out_type = "MatMul", (t, t), t
    graph = helper.make_graph(
        [helper.make_node(op, ["a", "b"], ["c"])],
        "gemm_peak",
        [helper.make_tensor_value_info(n, t, ["n", "n"]) for n, t in zip("ab", types, strict=True)],
        [helper.make_tensor_value_info("c", out_type, ["n", "n"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return model.SerializeToString()


def _gemm_operands(precision: str, device: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    if precision == "int8":
        a_type = np.uint8 if device == "cpu" else np.int8
        info = np.iinfo(a_type)
        a = rng.integers(info.min, info.max, (n, n), dtype=a_type)
        return a, rng.integers(-127, 127, (n, n), dtype=np.int8)
    dtype = np.float16 if precision == "fp16" else np.float32
    return rng.standard_normal((n, n)).astype(dtype), rng.standard_normal((n, n)).astype(dtype)


def _gemm_call(precision: str, device: str, n: int, threads: int) -> tuple[Callable, str]:
    """A zero-argument GEMM call and how it is done."""
    a, b = _gemm_operands(precision, device, n)
    if device == "cpu" and precision == "fp32":
        c = np.empty((n, n), np.float32)
        return (lambda: np.matmul(a, b, out=c)), f"numpy matmul ({_blas_name()})"
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    provider = "CPUExecutionProvider" if device == "cpu" else "CUDAExecutionProvider"
    session = ort.InferenceSession(_matmul_model(precision, device), opts, providers=[provider])
    if session.get_providers()[0] != provider:
        raise BackendError(f"onnxruntime could not start {provider}")
    # Operands and result stay on the device: the peak is the GEMM, not the copies.
    ort_device = "cpu" if device == "cpu" else "cuda"
    binding = session.io_binding()
    for name, x in (("a", a), ("b", b)):
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(x, ort_device, 0))
    binding.bind_output("c", ort_device)
    op = "MatMulInteger" if precision == "int8" else "MatMul"
    return (lambda: session.run_with_iobinding(binding)), f"onnxruntime {op} on {provider}"


def _gemm(key: str, threads: int, size: int) -> None:
    device, precision = key.split("-")
    fn, method = _gemm_call(precision, device, size, threads)
    best = time_call(fn, GEMM_REPEATS, warmup=1).min_ms
    _emit({"event": "result", "method": method, "gflops": 2 * size**3 / best / 1e6})


# --- one backend serving timed calls ------------------------------------------------


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
            _gemm(job["key"], job["threads"], job["size"])
        else:
            settings = BenchSettings(**job["settings"])
            _serve(job["bundle"], Case(**job["case"]), settings, job["checkpoint"])
    except (MsnEdgeError, ImportError) as e:
        _emit({"event": "error", "reason": str(e)})
        sys.exit(1)
