"""The hardware peak each row is compared with: a GEMM of the same precision.

Timed in its own worker process with the same thread count as the backends, in the same
run, so that every figure can be read as a fraction of what the machine can do. The CPU
fp32 peak is numpy's matmul (the BLAS numpy links); the others are one ONNX Runtime
MatMul / MatMulInteger node, built with the onnx package.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from msn_edge.benchmarks.cases import Peak
from msn_edge.benchmarks.measure import time_call
from msn_edge.benchmarks.worker import Worker
from msn_edge.runtime.errors import BackendError
from msn_edge.runtime.ort_session import session_options
from msn_edge.runtime.packages import module_missing

GEMM_SIZE = {"cpu": 2048, "gpu": 8192}  # compute-bound: 17 GFLOP (CPU), 1.1 TFLOP (GPU)
GEMM_REPEATS = 5  # the peak is the best of these, after one warm-up


def measure_peak(key: str, threads: int) -> Peak:
    """GEMM peak of `key` ("cpu-fp32", "cpu-int8", "gpu-fp16", ...) in a fresh process."""
    device, precision = key.split("-")
    size = GEMM_SIZE[device]
    if not (device == "cpu" and precision == "fp32") and module_missing("onnx"):
        reason = "needs the onnx package to build the GEMM model (pip install msn-edge[export])"
        return Peak(key, "onnxruntime", threads, size, None, reason)
    worker = Worker({"kind": "gemm", "key": key, "threads": threads, "size": size}, threads)
    event = worker.event()
    if event is None or event.get("event") != "result":
        return Peak(key, "", threads, size, None, worker.failure(event))
    worker.close()
    return Peak(key, event["method"], threads, size, event["gflops"])


# --- inside the worker process -------------------------------------------------------


def gemm_job(key: str, threads: int, size: int) -> dict:
    """The worker's result event: the best rate of `key`'s GEMM, and how it was done."""
    device, precision = key.split("-")
    fn, method = _gemm_call(precision, device, size, threads)
    best = time_call(fn, GEMM_REPEATS, warmup=1).min_ms
    return {"event": "result", "method": method, "gflops": 2 * size**3 / best / 1e6}


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

    opts = session_options(threads=threads)
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
