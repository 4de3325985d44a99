"""What identifies this GPU and this TensorRT for a cached engine, and which are supported.

Asked of the CUDA driver (libcuda) and TensorRT's library (libnvinfer) through ctypes, so
that the answer needs no GPU Python package and is the same for the native TensorRT
backend and for ONNX Runtime's TensorRT provider. The parsing and the support rules are
pure functions, tested without a GPU.

A TensorRT engine is tuned for one GPU configuration. Every Jetson Orin module is sm_87
and may report the same name ("Orin"); the SM count and total memory tell most apart
(Orin Nano 4 GB: 4 SMs; Orin Nano 8 GB and Orin NX: 8 SMs with 8 or 16 GB; AGX Orin: 14
or 16 SMs with 32 or 64 GB). An Orin Nano 8 GB and an Orin NX 8 GB still look alike; the
engine cache lives on each box, so only a cache copied between the two would meet that.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re
from dataclasses import dataclass

from msn_edge.runtime.errors import BackendError

_CU_ATTR_SM_COUNT = 16  # CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT
_CU_ATTR_CC_MAJOR = 75  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
_CU_ATTR_CC_MINOR = 76  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR
_NAME_BYTES = 256
_MiB = 1 << 20
MIN_TENSORRT = (10, 0)  # TensorRT 8.6 (JetPack 6.0) builds implicit-batch-era networks
# The oldest ONNX Runtime whose TensorRT provider is built for each TensorRT major.
ORT_FOR_TENSORRT = {10: (1, 18), 11: (1, 27)}
TENSORRT_LIBRARIES = ("libnvinfer.so.10", "libnvinfer.so.11")


@dataclass(frozen=True)
class GpuIdentity:
    """The properties a TensorRT engine is tuned to; any difference means a rebuild."""

    name: str
    compute_capability: str  # e.g. "8.7"
    sm_count: int
    total_memory_mib: int

    def describe(self) -> str:
        sm = self.compute_capability.replace(".", "")
        return f"{self.name} sm_{sm}, {self.sm_count} SMs, {self.total_memory_mib} MiB"


def gpu_identity(
    name: bytes | str, major: int, minor: int, sm_count: int, total_bytes: int
) -> GpuIdentity:
    """A GpuIdentity from raw device properties (C string name, bytes of memory)."""
    if isinstance(name, bytes):
        name = name.split(b"\0", 1)[0].decode(errors="replace")
    return GpuIdentity(name.strip(), f"{major}.{minor}", int(sm_count), int(total_bytes) // _MiB)


def query_gpu(ordinal: int = 0, driver=None) -> GpuIdentity:
    """The identity of CUDA device `ordinal` (the one both TensorRT backends run on)."""
    if driver is None:
        try:
            driver = ctypes.CDLL("libcuda.so.1")
        except OSError:
            raise BackendError("no NVIDIA GPU (libcuda.so.1 is not installed)") from None

    def check(result: int, call: str) -> None:
        if result != 0:
            raise BackendError(f"CUDA driver call {call} failed with error {result}")

    check(driver.cuInit(0), "cuInit")
    dev = ctypes.c_int(0)
    check(driver.cuDeviceGet(ctypes.byref(dev), ordinal), "cuDeviceGet")
    name = ctypes.create_string_buffer(_NAME_BYTES)
    check(driver.cuDeviceGetName(name, _NAME_BYTES, dev), "cuDeviceGetName")
    values = []
    for attr in (_CU_ATTR_CC_MAJOR, _CU_ATTR_CC_MINOR, _CU_ATTR_SM_COUNT):
        value = ctypes.c_int(0)
        check(driver.cuDeviceGetAttribute(ctypes.byref(value), attr, dev), "cuDeviceGetAttribute")
        values.append(value.value)
    memory = ctypes.c_size_t(0)
    check(driver.cuDeviceTotalMem_v2(ctypes.byref(memory), dev), "cuDeviceTotalMem")
    return gpu_identity(name.value, *values, memory.value)


def decode_tensorrt_version(number: int) -> str:
    """getInferLibVersion()'s integer as text: 10.x and later encode major * 10000 + minor
    * 100 + patch (100300 = 10.3.0), 8.x and earlier major * 1000 + ... (8601 = 8.6.1)."""
    if number >= 100_000:
        major, rest = divmod(number, 10_000)
    else:
        major, rest = divmod(number, 1_000)
    minor, patch = divmod(rest, 100)
    return f"{major}.{minor}.{patch}"


def tensorrt_version() -> str | None:
    """The TensorRT here: the Python package's version, else libnvinfer's; None if neither."""
    try:
        import tensorrt

        return str(tensorrt.__version__)
    except ImportError:
        pass
    found = ctypes.util.find_library("nvinfer")
    for soname in (*TENSORRT_LIBRARIES, *([found] if found else [])):
        try:
            lib = ctypes.CDLL(soname)
        except OSError:
            continue
        lib.getInferLibVersion.restype = ctypes.c_int32
        return decode_tensorrt_version(lib.getInferLibVersion())
    return None


def version_tuple(text: str) -> tuple[int, ...]:
    """(1, 20, 1) from "1.20.1", "1.20.1+cu126" or "10.3.0.30"."""
    return tuple(int(p) for p in re.findall(r"\d+", text.split("+")[0])[:3])


def tensorrt_unsupported(trt_version: str) -> str | None:
    """Why msn-edge cannot build with this TensorRT, or None."""
    if version_tuple(trt_version)[:2] < MIN_TENSORRT:
        return (
            f"TensorRT {trt_version} is too old: msn-edge needs TensorRT 10 or later "
            "(JetPack 6.0 ships 8.6; use JetPack 6.1 or 6.2, which ship 10.3)"
        )
    return None


def ort_tensorrt_mismatch(ort_version: str, trt_version: str) -> str | None:
    """Why ONNX Runtime `ort_version`'s TensorRT provider cannot load `trt_version`, or None."""
    too_old = tensorrt_unsupported(trt_version)
    if too_old:
        return too_old
    major = version_tuple(trt_version)[0]
    needed = ORT_FOR_TENSORRT.get(major, ORT_FOR_TENSORRT[max(ORT_FOR_TENSORRT)])
    if version_tuple(ort_version)[:2] < needed:
        want = ".".join(map(str, needed))
        return (
            f"onnxruntime {ort_version}'s TensorRT provider is not built for TensorRT "
            f"{trt_version}: TensorRT {major} needs onnxruntime-gpu >= {want}"
        )
    return None
