"""Native TensorRT backend: build an engine from the bundle's ONNX on the target, cache it,
and run it with cuda-python.

A TensorRT engine runs only with the TensorRT version and GPU that built it, so it is built
on the edge box on first use and cached beside the bundle (or in `cache_dir`), keyed by
TensorRT version, GPU (name, compute capability, SM count, memory), precision, batch limit
and the ONNX sha256 (engine_cache.py). A cache that does not match is rebuilt, never
loaded; one that matches but that TensorRT still cannot deserialize is rebuilt too.

Precision. TensorRT 10 (weak typing): fp32 builds strongly typed from the fp32 ONNX; fp16
sets BuilderFlag.FP16 on it; int8 builds the bundle's Q/DQ model with BuilderFlag.INT8
(scales come from the graph, no calibrator). TensorRT >= 11 removed the precision flags
(strong typing only): fp32 and int8 (Q/DQ) build as before because their precision is in
the ONNX, but fp16 would need an fp16 ONNX (ModelOpt AutoCast) that bundles do not carry,
so it is refused with that explanation instead of being built as fp32 behind the user's
back. TensorRT 8.x (JetPack 6.0) is refused with the versions to use.

Host staging buffers are page-locked (cudaMallocHost), so the asynchronous copies really
are asynchronous DMA instead of a staged copy through a driver buffer.

tensorrt and cuda-python are imported lazily: this module imports without them, and its
plain-Python parts (cache key, `build_engine`) serve `msn-edge export --format engine` too.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from msn_edge.runtime.bundle import Bundle
from msn_edge.runtime.engine_cache import (
    DEFAULT_MAX_BATCH,
    EngineKey,
    cache_path,
    drop_cached_engine,
    engine_cache_key,
    load_cached_engine,
    save_cached_engine,
)
from msn_edge.runtime.engines import TENSORRT_HINT, Engine, check_inputs, check_precision
from msn_edge.runtime.errors import BackendError
from msn_edge.runtime.gpu import query_gpu, tensorrt_unsupported

log = logging.getLogger(__name__)

DEFAULT_WORKSPACE_MB = 1024  # builder scratch memory; Jetson Orin Nano has 8 GB shared
_MiB = 1 << 20
T = TypeVar("T")


class EngineLoadError(BackendError):
    """TensorRT could not deserialize a plan (another TensorRT or GPU, or damaged bytes)."""


@dataclass(frozen=True)
class BuildPlan:
    strongly_typed: bool  # NetworkDefinitionCreationFlag.STRONGLY_TYPED
    builder_flags: tuple[str, ...]  # names in trt.BuilderFlag


def precision_plan(precision: str, *, weak_typing: bool) -> BuildPlan:
    """How to build `precision`; `weak_typing`: this TensorRT still has BuilderFlag.FP16 (10.x)."""
    check_precision(precision)
    if precision == "fp32":
        return BuildPlan(strongly_typed=True, builder_flags=())
    if weak_typing:
        return BuildPlan(strongly_typed=False, builder_flags=(precision.upper(),))
    if precision == "int8":
        return BuildPlan(strongly_typed=True, builder_flags=())  # the Q/DQ nodes set it
    raise BackendError(
        "TensorRT >= 11 builds only strongly typed networks, and fp16 there needs an fp16 "
        "ONNX model (NVIDIA ModelOpt AutoCast) that msn-edge bundles do not carry; "
        "use precision fp32 or int8"
    )


def _import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendError(f"tensorrt not installed ({TENSORRT_HINT})") from None
    return trt


def _import_cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            raise BackendError(f"cuda-python not installed ({TENSORRT_HINT})") from None
    return cudart


def _cuda_call(cudart, result: tuple):
    """cuda-python returns (error, *values): raise on error, else the value(s)."""
    err, *values = result
    if err != cudart.cudaError_t.cudaSuccess:
        raise BackendError(f"CUDA error: {getattr(err, 'name', err)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def current_engine_key(
    onnx_bytes: bytes, precision: str, *, max_batch: int = DEFAULT_MAX_BATCH
) -> EngineKey:
    """The cache key of an engine built here: this TensorRT and this GPU. The one key
    derivation of the runtime and of `msn-edge export --format engine`."""
    trt = _import_tensorrt()
    too_old = tensorrt_unsupported(trt.__version__)
    if too_old:
        raise BackendError(too_old)
    return engine_cache_key(
        onnx_bytes,
        precision,
        tensorrt_version=trt.__version__,
        gpu=query_gpu(),
        max_batch=max_batch,
    )


def engine_cache_entry(
    onnx_bytes: bytes,
    precision: str,
    *,
    cache_dir: Path,
    stem: str,
    max_batch: int = DEFAULT_MAX_BATCH,
) -> tuple[EngineKey, Path]:
    """This TensorRT and GPU's key for the engine of `onnx_bytes`, and the file it is cached
    in: where the runtime looks, and where `msn-edge export --format engine` saves."""
    key = current_engine_key(onnx_bytes, precision, max_batch=max_batch)
    return key, cache_path(cache_dir, stem, key)


def build_engine(
    onnx_bytes: bytes,
    precision: str,
    *,
    max_batch: int = DEFAULT_MAX_BATCH,
    workspace_mb: int = DEFAULT_WORKSPACE_MB,
) -> bytes:
    """Serialised TensorRT engine (plan) for this GPU, dynamic batch 1..max_batch.

    Pass the bundle's fp32 ONNX for fp32 / fp16 and its Q/DQ ONNX for int8.
    """
    trt = _import_tensorrt()
    plan = precision_plan(precision, weak_typing=hasattr(trt.BuilderFlag, "FP16"))
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strong = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    flags = 1 << int(strong) if plan.strongly_typed and strong is not None else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = "; ".join(parser.get_error(i).desc() for i in range(parser.num_errors))
        raise BackendError(f"TensorRT cannot parse the ONNX model: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb * _MiB)
    for flag in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        batch, *rest = tuple(tensor.shape)
        if batch != -1 or any(d < 0 for d in rest):
            raise BackendError(
                f"ONNX input '{tensor.name}' has shape {tuple(tensor.shape)}; expected a "
                "dynamic batch (-1) and fixed other dimensions"
            )
        profile.set_shape(tensor.name, (1, *rest), (1, *rest), (max_batch, *rest))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError(f"TensorRT could not build a {precision} engine (see its log above)")
    return bytes(serialized)


def _build_and_cache(onnx_bytes: bytes, key: EngineKey, path: Path) -> bytes:
    log.info(
        "building a TensorRT %s engine on %s (first run here: this takes a while)",
        key.precision,
        key.gpu,
    )
    plan = build_engine(onnx_bytes, key.precision, max_batch=key.max_batch)
    try:
        save_cached_engine(path, key, plan)
        log.info("TensorRT engine cached at %s", path)
    except OSError as e:
        log.warning("cannot cache the engine at %s (%s): it is rebuilt next run", path, e.strerror)
    return plan


def load_or_build_engine(
    onnx_bytes: bytes,
    precision: str,
    *,
    cache_dir: Path,
    stem: str,
    max_batch: int = DEFAULT_MAX_BATCH,
) -> bytes:
    """The cached engine for this TensorRT, GPU and model, building (and caching) it if needed."""
    keep = lambda plan: plan  # noqa: E731 - the plan itself is what is loaded
    return open_cached_engine(
        onnx_bytes, precision, keep, cache_dir=cache_dir, stem=stem, max_batch=max_batch
    )


def open_cached_engine(
    onnx_bytes: bytes,
    precision: str,
    load: Callable[[bytes], T],
    *,
    cache_dir: Path,
    stem: str,
    max_batch: int = DEFAULT_MAX_BATCH,
) -> T:
    """`load(plan)` of the cached engine, built if needed. A cached plan whose key matches
    but that TensorRT cannot deserialize (a TensorRT rebuild under the same version, a
    driver change, bytes damaged along with their sidecar) is dropped and rebuilt once."""
    key, path = engine_cache_entry(
        onnx_bytes, precision, cache_dir=cache_dir, stem=stem, max_batch=max_batch
    )
    plan = load_cached_engine(path, key)
    if plan is not None:
        try:
            engine = load(plan)
        except EngineLoadError as e:
            log.warning("%s matches this TensorRT and GPU but %s: rebuilding it", path.name, e)
            drop_cached_engine(path)
        else:
            log.info("TensorRT engine from cache: %s", path)
            return engine
    return load(_build_and_cache(onnx_bytes, key, path))


def pinned_array(address: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A numpy array over host memory at `address` (page-locked, from cudaMallocHost)."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    return np.frombuffer((ctypes.c_byte * nbytes).from_address(address), dtype).reshape(shape)


class TensorRTEngine(Engine):
    """Runs a TensorRT plan: device and page-locked host buffers sized for max_batch, one
    CUDA stream."""

    def __init__(self, plan: bytes, *, precision: str, max_batch: int = DEFAULT_MAX_BATCH) -> None:
        trt = _import_tensorrt()
        self._cudart = cudart = _import_cudart()
        self.name = "tensorrt"
        self.precision = precision
        self.max_batch = max_batch
        self._buffers: dict[str, int] = {}  # device memory
        self._pinned: dict[str, int] = {}  # page-locked host memory
        self._host: dict[str, np.ndarray] = {}  # numpy views of the pinned memory
        self._stream = None
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        try:
            self._engine = self._runtime.deserialize_cuda_engine(plan)
        except RuntimeError as e:
            raise EngineLoadError(f"TensorRT could not deserialize it ({e})") from None
        if self._engine is None:
            raise EngineLoadError("TensorRT could not deserialize it (see its log above)")
        self._context = self._engine.create_execution_context()

        engine = self._engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        by_rank = {len(engine.get_tensor_shape(n)): n for n in inputs}
        if len(inputs) != 2 or set(by_rank) != {2, 3} or len(outputs) != 1:
            raise BackendError(
                f"engine tensors {names}: expected inputs spectrogram (B, F, T) and "
                "spectrum (B, S) and one embedding output"
            )
        self._spec_name, self._spectrum_name, self._out_name = by_rank[3], by_rank[2], outputs[0]
        self._dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        self._stream = _cuda_call(cudart, cudart.cudaStreamCreate())
        for n in names:
            shape = (max_batch, *tuple(engine.get_tensor_shape(n))[1:])
            nbytes = math.prod(shape) * self._dtypes[n].itemsize
            self._pinned[n] = _cuda_call(cudart, cudart.cudaMallocHost(nbytes))
            self._host[n] = pinned_array(int(self._pinned[n]), shape, self._dtypes[n])
            ptr = _cuda_call(cudart, cudart.cudaMalloc(nbytes))
            self._buffers[n] = ptr
            if not self._context.set_tensor_address(n, int(ptr)):
                raise BackendError(f"TensorRT refused the device buffer for '{n}'")

    @classmethod
    def from_bundle(
        cls,
        bundle: Bundle,
        *,
        precision: str = "fp32",
        cache_dir: Path | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
    ) -> TensorRTEngine:
        onnx_bytes = bundle.model_bytes("int8" if precision == "int8" else "fp32")
        return open_cached_engine(
            onnx_bytes,
            precision,
            lambda plan: cls(plan, precision=precision, max_batch=max_batch),
            cache_dir=Path(cache_dir) if cache_dir is not None else bundle.path.parent,
            stem=bundle.path.name,
            max_batch=max_batch,
        )

    def embed(self, spec: np.ndarray, spectrum: np.ndarray) -> np.ndarray:
        spec, spectrum = check_inputs(spec, spectrum)
        step = self.max_batch
        chunks = [
            self._run(spec[i : i + step], spectrum[i : i + step])
            for i in range(0, spec.shape[0], step)
        ]
        return np.concatenate(chunks)

    def _run(self, spec: np.ndarray, spectrum: np.ndarray) -> np.ndarray:
        cudart = self._cudart
        to_device = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        for name, x in ((self._spec_name, spec), (self._spectrum_name, spectrum)):
            if not self._context.set_input_shape(name, x.shape):
                raise BackendError(f"input '{name}' shape {x.shape} is outside the engine profile")
            host = self._host[name][: x.shape[0]]
            host[...] = x  # into page-locked memory (and the engine's dtype)
            _cuda_call(
                cudart,
                cudart.cudaMemcpyAsync(
                    self._buffers[name], host.ctypes.data, host.nbytes, to_device, self._stream
                ),
            )
        batch = tuple(self._context.get_tensor_shape(self._out_name))[0]
        out = self._host[self._out_name][:batch]
        if not self._context.execute_async_v3(int(self._stream)):
            raise BackendError("TensorRT inference failed (see its log above)")
        _cuda_call(
            cudart,
            cudart.cudaMemcpyAsync(
                out.ctypes.data,
                self._buffers[self._out_name],
                out.nbytes,
                cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost,
                self._stream,
            ),
        )
        _cuda_call(cudart, cudart.cudaStreamSynchronize(self._stream))
        return out.astype(np.float32)  # a copy: the pinned buffer is reused by the next call

    def close(self) -> None:
        cudart = self._cudart
        if self._stream is not None:
            cudart.cudaStreamSynchronize(self._stream)
        self._host = {}  # no view may outlive the memory under it
        for ptr in self._buffers.values():
            cudart.cudaFree(ptr)
        for ptr in self._pinned.values():
            cudart.cudaFreeHost(ptr)
        self._buffers, self._pinned = {}, {}
        if self._stream is not None:
            cudart.cudaStreamDestroy(self._stream)
            self._stream = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown may have unloaded cudart
            self.close()
