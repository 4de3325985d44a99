"""Inference backends: one small class per backend, all with `embed(spec, spectrum)`.

ONNX Runtime runs the bundle's ONNX on the CPU, on CUDA, or through its TensorRT execution
provider (options in ort_tensorrt.py); the native TensorRT backend (tensorrt_engine.py)
builds and caches its own engine. GPU packages are optional: a backend that cannot run
here says why and what to install, and `auto` takes the best one that can.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from msn_edge.runtime import ort_install
from msn_edge.runtime.bundle import Bundle
from msn_edge.runtime.cpu_features import WEIGHT_BITS_KEY, int8_refusal
from msn_edge.runtime.engine_cache import DEFAULT_MAX_BATCH
from msn_edge.runtime.errors import BackendError
from msn_edge.runtime.gpu import (
    ort_tensorrt_mismatch,
    tensorrt_unsupported,
    tensorrt_version,
)
from msn_edge.runtime.ort_session import session_options
from msn_edge.runtime.ort_tensorrt import ort_tensorrt_cache_folder, ort_tensorrt_options
from msn_edge.runtime.packages import module_missing

try:  # the base install has none: the extra `cpu` or `gpu` chooses which (ort_install.py)
    import onnxruntime as ort
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state
except ImportError:
    ort = None

log = logging.getLogger(__name__)

BACKENDS = ("auto", "cpu", "cuda", "ort-tensorrt", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8")  # every backend's, the CLI's and the export's list
ORT_CHAIN = ("ort-tensorrt", "cuda", "cpu")  # best first; also each EP's fallback order
ORT_PROVIDERS = {
    "ort-tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
TENSORRT_BACKENDS = ("ort-tensorrt", "tensorrt")  # the only ones that can run fp16
JETSON_HINT = "on a Jetson: docs/jetson.md"  # TensorRT and onnxruntime-gpu are not PyPI's there
GPU_HINT = f"install msn-edge[gpu]; {JETSON_HINT}"
TENSORRT_HINT = f"pip install msn-edge[tensorrt]; {JETSON_HINT}"
_ORT_ERRORS = (
    (
        ort_state.Fail,
        ort_state.InvalidArgument,
        ort_state.InvalidGraph,
        ort_state.InvalidProtobuf,
        ort_state.NoSuchFile,
        ort_state.NotImplemented,
        ort_state.RuntimeException,
    )
    if ort is not None
    else ()
)


def require_onnxruntime():
    """The onnxruntime module, or BackendError saying which extra installs one."""
    if ort is None:
        raise BackendError(ort_install.MISSING)
    return ort


def check_precision(precision: str) -> None:
    """BackendError unless `precision` is one of PRECISIONS."""
    if precision not in PRECISIONS:
        raise BackendError(f"unknown precision '{precision}' (choose from {', '.join(PRECISIONS)})")


def check_inputs(spec: np.ndarray, spectrum: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Contiguous float32 spectrogram (B, F, T) and spectrum (B, S) with the same B."""
    spec = np.ascontiguousarray(spec, dtype=np.float32)
    spectrum = np.ascontiguousarray(spectrum, dtype=np.float32)
    if spec.ndim != 3 or spectrum.ndim != 2 or spec.shape[0] != spectrum.shape[0]:
        raise ValueError(
            "expected spectrogram (B, F, T) and spectrum (B, S) with the same B, "
            f"got {spec.shape} and {spectrum.shape}"
        )
    return spec, spectrum


class Engine(ABC):
    """Spectrogram (B, F, T) + spectrum (B, S), float32 -> embeddings (B, D), float32."""

    name: str  # the backend that actually runs ("cpu", "cuda", "ort-tensorrt", "tensorrt")
    precision: str  # "fp32" | "fp16" | "int8"

    @abstractmethod
    def embed(self, spec: np.ndarray, spectrum: np.ndarray) -> np.ndarray: ...

    def close(self) -> None:  # noqa: B027 - optional hook; only device backends hold resources
        """Release device memory and streams."""


class OrtEngine(Engine):
    """An ONNX Runtime session configured explicitly (providers, threads, optimisation)."""

    def __init__(
        self,
        model_bytes: bytes,
        *,
        providers: list[str | tuple[str, dict]],
        threads: int | None = None,
        name: str,
        precision: str = "fp32",
        max_batch: int | None = None,
    ) -> None:
        if threads is not None and threads < 1:
            raise BackendError(f"threads must be at least 1, got {threads}")
        require_onnxruntime()
        self.max_batch = max_batch  # larger batches run in chunks (a TensorRT profile's max)
        opts = session_options(threads=threads or 0)  # 0: every physical core
        try:
            self._session = ort.InferenceSession(model_bytes, opts, providers=providers)
        except _ORT_ERRORS as e:
            raise BackendError(f"onnxruntime cannot load the model on {name}: {e}") from None
        self.name = name
        self.precision = precision
        inputs = self._session.get_inputs()
        by_rank = {len(i.shape): i.name for i in inputs}
        if len(inputs) != 2 or set(by_rank) != {2, 3}:
            found = ", ".join(f"{i.name} {i.shape}" for i in inputs)
            raise BackendError(
                f"the model's inputs are {found}; expected a spectrogram (B, F, T) "
                "and a spectrum (B, S)"
            )
        self._spec_name, self._spectrum_name = by_rank[3], by_rank[2]
        self._output_name = self._session.get_outputs()[0].name
        self.metadata = dict(self._session.get_modelmeta().custom_metadata_map)

    @property
    def input_shapes(self) -> tuple[list, list]:
        """Declared shapes of (spectrogram, spectrum); a dynamic dimension is a string."""
        shapes = {i.name: list(i.shape) for i in self._session.get_inputs()}
        return shapes[self._spec_name], shapes[self._spectrum_name]

    @property
    def providers(self) -> list[str]:
        """Execution providers the session really runs on, best first."""
        return self._session.get_providers()

    def embed(self, spec: np.ndarray, spectrum: np.ndarray) -> np.ndarray:
        spec, spectrum = check_inputs(spec, spectrum)
        step = self.max_batch
        if step is not None and spec.shape[0] > step:
            parts = range(0, spec.shape[0], step)
            return np.concatenate(
                [self._run(spec[i : i + step], spectrum[i : i + step]) for i in parts]
            )
        return self._run(spec, spectrum)

    def _run(self, spec: np.ndarray, spectrum: np.ndarray) -> np.ndarray:
        feeds = {self._spec_name: spec, self._spectrum_name: spectrum}
        try:
            (emb,) = self._session.run([self._output_name], feeds)
        except _ORT_ERRORS as e:
            raise BackendError(f"inference failed on {self.name}: {e}") from None
        return np.asarray(emb, dtype=np.float32)


@functools.lru_cache(maxsize=1)
def _gpu_missing_reason() -> str | None:
    """None if the CUDA driver sees a GPU.

    Asks the driver library (libcuda, Linux) directly through ctypes, so the answer needs
    no GPU Python package and is the same on a Jetson and on a workstation.
    """
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "no NVIDIA GPU (the CUDA driver libcuda.so.1 is not installed)"
    count = ctypes.c_int(0)
    if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return "no NVIDIA GPU (the CUDA driver could not initialise one)"
    if count.value == 0:
        return "no NVIDIA GPU (the CUDA driver found no device)"
    return None


def _native_tensorrt_reason() -> str | None:
    if module_missing("tensorrt"):
        return f"tensorrt not installed ({TENSORRT_HINT})"
    if module_missing("cuda.bindings") and module_missing("cuda.cudart"):
        return f"cuda-python not installed ({TENSORRT_HINT})"
    version = tensorrt_version()
    too_old = tensorrt_unsupported(version) if version else None
    return too_old or _gpu_missing_reason()


def _ort_reason(backend: str, providers: set[str], hint: str) -> str | None:
    if ORT_PROVIDERS[backend] not in providers:
        clash = ort_install.conflict()  # the usual cause of a missing GPU provider
        return clash or f"onnxruntime has no {ORT_PROVIDERS[backend]} ({hint})"
    return _gpu_missing_reason()


def _ort_tensorrt_reason(providers: set[str]) -> str | None:
    reason = _ort_reason(
        "ort-tensorrt", providers, f"install msn-edge[gpu,tensorrt]; {JETSON_HINT}"
    )
    if reason is not None:
        return reason
    version = tensorrt_version()
    if version is None:
        return f"TensorRT libraries (libnvinfer) not found ({TENSORRT_HINT})"
    return ort_tensorrt_mismatch(ort.__version__, version)


@functools.lru_cache(maxsize=1)
def _warn_about_conflict() -> None:
    clash = ort_install.conflict()
    if clash:
        log.warning(clash)


def available_backends() -> dict[str, str | None]:
    """Every backend mapped to None if it can run here, else the reason and the fix."""
    if ort is None:
        no_ort = {b: ort_install.MISSING for b in ORT_CHAIN}
        return {**no_ort, "tensorrt": _native_tensorrt_reason()}
    _warn_about_conflict()
    providers = set(ort.get_available_providers())
    return {
        "cpu": None,
        "cuda": _ort_reason("cuda", providers, GPU_HINT),
        "ort-tensorrt": _ort_tensorrt_reason(providers),
        "tensorrt": _native_tensorrt_reason(),
    }


def default_cache_dir(bundle_path: Path) -> Path:
    """Where built TensorRT engines go: beside the bundle if writable, else the user cache."""
    parent = Path(bundle_path).resolve().parent
    if os.access(parent, os.W_OK):
        return parent
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "msn-edge"


def _pick_auto(reasons: dict[str, str | None], precision: str) -> str:
    candidates = ("ort-tensorrt",) if precision == "fp16" else ORT_CHAIN
    for backend in candidates:
        if reasons[backend] is None:
            return backend
    why = "; ".join(f"{b}: {reasons[b]}" for b in candidates)
    raise BackendError(f"no backend can run precision {precision} here ({why})")


def model_inputs(model: bytes) -> dict[str, tuple[int, ...]]:
    """Each input's name and its dimensions after the (dynamic) batch, from the model."""
    require_onnxruntime()
    opts = session_options(opt_level="disable")  # names only
    try:
        session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    except _ORT_ERRORS as e:
        raise BackendError(f"onnxruntime cannot load the model: {e}") from None
    inputs = {}
    for i in session.get_inputs():
        rest = tuple(i.shape[1:])
        if not all(isinstance(d, int) and d > 0 for d in rest):
            raise BackendError(
                f"ONNX input '{i.name}' has shape {i.shape}; expected a dynamic batch and "
                "fixed other dimensions"
            )
        inputs[i.name] = rest
    return inputs


def make_engine(
    bundle: Bundle,
    backend: str = "auto",
    *,
    precision: str = "fp32",
    threads: int | None = None,
    cache_dir: Path | None = None,
    allow_not_recommended: bool = False,
) -> Engine:
    """The engine for `backend` at `precision`; BackendError with an install hint if missing.

    precision "fp32" and "int8" pick the bundle's fp32 / Q/DQ model (on the CPU its CPU
    int8 model where it has one); "fp16" builds the fp32 model in half precision and so
    needs a TensorRT backend. An int8 model that the export marked not recommended (it
    lost accuracy) is refused unless `allow_not_recommended`.
    """
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend '{backend}' (choose from {', '.join(BACKENDS)})")
    check_precision(precision)
    if ort is None and backend != "tensorrt":
        raise BackendError(ort_install.MISSING)
    reasons = available_backends()
    auto = backend == "auto"
    if auto:
        backend = _pick_auto(reasons, precision)
    elif reasons[backend] is not None:
        raise BackendError(f"backend '{backend}' cannot run here: {reasons[backend]}")
    if precision == "fp16" and backend not in TENSORRT_BACKENDS:
        raise BackendError(
            f"precision fp16 needs a TensorRT backend ({' or '.join(TENSORRT_BACKENDS)}); "
            f"on {backend} use fp32 or int8"
        )
    if precision == "int8" and not allow_not_recommended:
        variant = "int8-cpu" if backend == "cpu" and "int8-cpu" in bundle.variants else "int8"
        why = bundle.not_recommended(variant)
        if why:
            raise BackendError(
                f"{bundle.path}: the export marked its {variant} model not recommended ({why}); "
                "run fp32, or pass --allow-not-recommended"
            )
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir(bundle.path)
    if backend == "tensorrt":
        from msn_edge.runtime.tensorrt_engine import TensorRTEngine

        return TensorRTEngine.from_bundle(bundle, precision=precision, cache_dir=cache_dir)

    if precision != "int8":
        model = bundle.model_bytes("fp32")
    elif backend == "cpu":  # uint8 activations: ONNX Runtime's CPU integer kernels
        model = bundle.int8_for_cpu()
    else:  # int8 activations with zero point 0: what TensorRT's explicit quantization takes
        model = bundle.model_bytes("int8")
    providers: list[str | tuple[str, dict]] = []
    max_batch = None
    for b in ORT_CHAIN[ORT_CHAIN.index(backend) :]:  # lesser EPs take the ops an EP lacks
        if b == "ort-tensorrt":
            max_batch = DEFAULT_MAX_BATCH
            folder = ort_tensorrt_cache_folder(
                cache_dir, bundle.path.name, model, precision, max_batch, ort.__version__
            )
            folder.mkdir(parents=True, exist_ok=True)
            options = ort_tensorrt_options(folder, precision, model_inputs(model), max_batch)
            log.info(
                "onnxruntime TensorRT: engine cache in %s (the first run on a device builds "
                "it, which takes minutes)",
                options["trt_engine_cache_path"],
            )
            providers.append((ORT_PROVIDERS[b], options))
        else:
            providers.append(ORT_PROVIDERS[b])
    engine = OrtEngine(
        model,
        providers=providers,
        threads=threads,
        name=backend,
        precision=precision,
        max_batch=max_batch,
    )
    active = engine.providers[0]
    if active != ORT_PROVIDERS[backend]:
        if not auto or precision == "fp16":  # fp16 only exists on TensorRT: no silent fp32
            raise BackendError(
                f"onnxruntime could not start {ORT_PROVIDERS[backend]} (it fell back to "
                f"{active}); check that the CUDA, cuDNN and TensorRT libraries match "
                "onnxruntime-gpu"
            )
        engine.name = next(b for b, p in ORT_PROVIDERS.items() if p == active)
    if engine.name == "cpu" and precision == "int8":
        why = int8_refusal(engine.metadata.get(WEIGHT_BITS_KEY))
        if why:
            raise BackendError(f"{bundle.path}: {why}")
    log.info(
        "inference backend: %s (onnxruntime %s, %s)%s",
        engine.name,
        active,
        precision,
        " picked by auto" if auto else "",
    )
    return engine
