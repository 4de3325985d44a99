"""ONNX Runtime's TensorRT execution provider: its options, batch profile and cache folder.

The provider builds TensorRT engines itself (engines.py starts it); what it needs from
msn-edge is one optimisation profile for every batch size, precision flags, and a cache
folder keyed by everything an engine depends on.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from msn_edge.runtime.engine_cache import engine_cache_key
from msn_edge.runtime.errors import BackendError
from msn_edge.runtime.gpu import query_gpu, tensorrt_version


def profile_shape_options(
    inputs: Mapping[str, tuple[int, ...]], max_batch: int, opt_batch: int = 1
) -> dict[str, str]:
    """ONNX Runtime TensorRT provider options for one optimisation profile, batch 1 to
    `max_batch` (tuned for `opt_batch`): without them, the provider builds an engine for
    the first batch size it sees and rebuilds (minutes on a Jetson) for every larger one."""
    if not 1 <= opt_batch <= max_batch:
        raise BackendError(f"profile batch range 1..{max_batch} does not contain {opt_batch}")

    def shapes(batch: int) -> str:
        return ",".join(
            f"{name}:{'x'.join(str(d) for d in (batch, *dims))}" for name, dims in inputs.items()
        )

    return {
        "trt_profile_min_shapes": shapes(1),
        "trt_profile_opt_shapes": shapes(opt_batch),
        "trt_profile_max_shapes": shapes(max_batch),
    }


def ort_tensorrt_options(
    folder: Path, precision: str, inputs: Mapping[str, tuple[int, ...]], max_batch: int
) -> dict:
    """The TensorRT provider's options: profile shapes, precision flags, and its engine and
    timing caches in `folder`, which must be keyed by everything the engines depend on."""
    return {
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(folder),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(folder),
        "trt_fp16_enable": precision == "fp16",
        # Q/DQ models carry their own scales: int8 needs no calibration table, only the flag.
        "trt_int8_enable": precision == "int8",
        **profile_shape_options(inputs, max_batch),
    }


def ort_tensorrt_cache_folder(
    cache_dir: Path, stem: str, model: bytes, precision: str, max_batch: int, ort_version: str
) -> Path:
    """`<stem>.ort-trt/<precision>-<key hash>`: ONNX Runtime names cached engines by graph
    and compute capability only, so one folder per full key (model sha256, TensorRT and
    ONNX Runtime versions, GPU name, SM count, memory, batch limit) keeps it from loading
    an engine built for another model, TensorRT or Orin module."""
    key = engine_cache_key(
        model,
        precision,
        tensorrt_version=tensorrt_version() or "unknown",
        gpu=query_gpu(),
        max_batch=max_batch,
        builder=f"onnxruntime {ort_version}",
    )
    return Path(cache_dir) / f"{stem}.ort-trt" / f"{precision}-{key.digest}"
