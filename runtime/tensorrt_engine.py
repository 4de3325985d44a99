"""Native TensorRT backend: build an engine from the bundle's ONNX on the target, cache it,
and run it with cuda-python.

A TensorRT engine runs only with the TensorRT version and GPU that built it, so it is built
on the edge box on first use and cached beside the bundle (or in `cache_dir`). The cache
is keyed by TensorRT version, GPU, precision, batch limit and the ONNX sha256: the key's
hash is in the file name, the whole key in a JSON sidecar with the engine's own sha256.
A cache whose sidecar does not match, or whose bytes do not match the sidecar, is rebuilt,
never loaded.

Precision. TensorRT 10 (weak typing): fp32 builds strongly typed from the fp32 ONNX; fp16
sets BuilderFlag.FP16 on it; int8 builds the bundle's Q/DQ model with BuilderFlag.INT8
(scales come from the graph, no calibrator). TensorRT >= 11 removed the precision flags
(strong typing only): fp32 and int8 (Q/DQ) build as before because their precision is in
the ONNX, but fp16 would need an fp16 ONNX (ModelOpt AutoCast) that bundles do not carry,
so it is refused with that explanation instead of being built as fp32 behind the user's
back.

tensorrt and cuda-python are imported lazily: this module imports without them, and its
plain-Python parts (cache key, sidecar check, `build_engine`) serve `msn-edge export
--format engine` too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from msn_edge.runtime.bundle import Bundle
from msn_edge.runtime.engines import TENSORRT_HINT, Engine, check_inputs
from msn_edge.runtime.errors import BackendError

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 8  # optimisation profile: min 1, opt 1 (streaming), max this
DEFAULT_WORKSPACE_MB = 1024  # builder scratch memory; Jetson Orin Nano has 8 GB shared
PRECISIONS = ("fp32", "fp16", "int8")
_MiB = 1 << 20


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine depends on; any difference means a rebuild."""

    tensorrt_version: str
    gpu: str  # name and compute capability, e.g. "Orin sm_87"
    precision: str
    onnx_sha256: str
    max_batch: int

    @property
    def digest(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def engine_cache_key(
    onnx_bytes: bytes,
    precision: str,
    *,
    tensorrt_version: str,
    gpu: str,
    max_batch: int = DEFAULT_MAX_BATCH,
) -> EngineKey:
    return EngineKey(
        tensorrt_version=tensorrt_version,
        gpu=gpu,
        precision=precision,
        onnx_sha256=hashlib.sha256(onnx_bytes).hexdigest(),
        max_batch=max_batch,
    )


def cache_path(cache_dir: Path, stem: str, key: EngineKey) -> Path:
    """`<stem>.<precision>.<key hash>.engine`, e.g. fan.msn.fp16.3f2a9c0d1b7e4a55.engine."""
    return Path(cache_dir) / f"{stem}.{key.precision}.{key.digest}.engine"


def sidecar_path(engine_path: Path) -> Path:
    return engine_path.with_name(engine_path.name + ".json")


def load_cached_engine(engine_path: Path, key: EngineKey) -> bytes | None:
    """The cached engine if its sidecar matches `key` and its bytes; else None (rebuild)."""
    if not engine_path.is_file():
        return None
    try:
        meta = json.loads(sidecar_path(engine_path).read_text())
        plan = engine_path.read_bytes()
    except (OSError, ValueError) as e:
        log.info("rebuilding %s: no readable sidecar (%s)", engine_path.name, e)
        return None
    wanted = asdict(key)
    found = meta.get("key") if isinstance(meta, dict) else None
    if found != wanted:
        differ = sorted(
            k for k in wanted if not isinstance(found, dict) or found.get(k) != wanted[k]
        )
        log.info("rebuilding %s: cache built for another %s", engine_path.name, ", ".join(differ))
        return None
    if meta.get("engine_sha256") != hashlib.sha256(plan).hexdigest():
        log.info("rebuilding %s: the engine file does not match its sidecar", engine_path.name)
        return None
    return plan


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_cached_engine(engine_path: Path, key: EngineKey, plan: bytes) -> None:
    """Engine first, sidecar last: an interrupted save leaves a cache that is rebuilt."""
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(engine_path, plan)
    meta = {
        "key": asdict(key),
        "engine_sha256": hashlib.sha256(plan).hexdigest(),
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    _write_atomic(sidecar_path(engine_path), json.dumps(meta, indent=2).encode())


@dataclass(frozen=True)
class BuildPlan:
    strongly_typed: bool  # NetworkDefinitionCreationFlag.STRONGLY_TYPED
    builder_flags: tuple[str, ...]  # names in trt.BuilderFlag


def precision_plan(precision: str, *, weak_typing: bool) -> BuildPlan:
    """How to build `precision`; `weak_typing`: this TensorRT still has BuilderFlag.FP16 (10.x)."""
    if precision not in PRECISIONS:
        raise BackendError(f"unknown precision '{precision}' (choose from {', '.join(PRECISIONS)})")
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


def gpu_name() -> str:
    """The current CUDA device's name and compute capability, e.g. "NVIDIA H100 sm_90"."""
    cudart = _import_cudart()
    device = _cuda_call(cudart, cudart.cudaGetDevice())
    props = _cuda_call(cudart, cudart.cudaGetDeviceProperties(device))
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else props.name
    return f"{name.rstrip(chr(0)).strip()} sm_{props.major}{props.minor}"


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


def load_or_build_engine(
    onnx_bytes: bytes,
    precision: str,
    *,
    cache_dir: Path,
    stem: str,
    max_batch: int = DEFAULT_MAX_BATCH,
) -> bytes:
    """The cached engine for this TensorRT, GPU and model, building (and caching) it if needed."""
    trt = _import_tensorrt()
    gpu = gpu_name()
    key = engine_cache_key(
        onnx_bytes, precision, tensorrt_version=trt.__version__, gpu=gpu, max_batch=max_batch
    )
    path = cache_path(cache_dir, stem, key)
    plan = load_cached_engine(path, key)
    if plan is not None:
        log.info("TensorRT engine from cache: %s", path)
        return plan
    log.info(
        "building a TensorRT %s engine on %s (first run here: this takes a while)", precision, gpu
    )
    plan = build_engine(onnx_bytes, precision, max_batch=max_batch)
    try:
        save_cached_engine(path, key, plan)
        log.info("TensorRT engine cached at %s", path)
    except OSError as e:
        log.warning("cannot cache the engine at %s (%s): it is rebuilt next run", path, e.strerror)
    return plan


class TensorRTEngine(Engine):
    """Runs a TensorRT plan: device buffers sized for max_batch, one CUDA stream."""

    def __init__(self, plan: bytes, *, precision: str, max_batch: int = DEFAULT_MAX_BATCH) -> None:
        trt = _import_tensorrt()
        self._cudart = cudart = _import_cudart()
        self.name = "tensorrt"
        self.precision = precision
        self.max_batch = max_batch
        self._buffers: dict[str, int] = {}
        self._stream = None
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engine = self._runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            raise BackendError("TensorRT could not load the engine (see its log above)")
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
            per_item = math.prod(tuple(engine.get_tensor_shape(n))[1:])
            ptr = _cuda_call(
                cudart, cudart.cudaMalloc(max_batch * per_item * self._dtypes[n].itemsize)
            )
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
        plan = load_or_build_engine(
            onnx_bytes,
            precision,
            cache_dir=Path(cache_dir) if cache_dir is not None else bundle.path.parent,
            stem=bundle.path.name,
            max_batch=max_batch,
        )
        return cls(plan, precision=precision, max_batch=max_batch)

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
        hosts = []  # kept alive until the stream is synchronised
        for name, x in ((self._spec_name, spec), (self._spectrum_name, spectrum)):
            host = np.ascontiguousarray(x, dtype=self._dtypes[name])
            hosts.append(host)
            if not self._context.set_input_shape(name, host.shape):
                raise BackendError(
                    f"input '{name}' shape {host.shape} is outside the engine profile"
                )
            _cuda_call(
                cudart,
                cudart.cudaMemcpyAsync(
                    self._buffers[name], host.ctypes.data, host.nbytes, to_device, self._stream
                ),
            )
        out = np.empty(
            tuple(self._context.get_tensor_shape(self._out_name)),
            dtype=self._dtypes[self._out_name],
        )
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
        return out.astype(np.float32)

    def close(self) -> None:
        cudart = self._cudart
        for ptr in self._buffers.values():
            cudart.cudaFree(ptr)
        self._buffers = {}
        if self._stream is not None:
            cudart.cudaStreamDestroy(self._stream)
            self._stream = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown may have unloaded cudart
            self.close()
