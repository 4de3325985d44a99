"""`--format engine`: build the TensorRT engine on the target device, check it, cache it.

The build itself is the runtime's (`msn_edge.runtime.tensorrt_engine.build_engine`), so an
engine built at export is exactly the one `msn-edge monitor --backend tensorrt` would
build; it is saved in the runtime's engine cache under the key the runtime derives
(`engine_cache_entry`: TensorRT version, GPU name, compute capability, SM count, memory,
precision, ONNX sha256, batch limit), so the runtime finds it, and a mismatched engine is
rebuilt there, never loaded. Before it is cached, the engine's embeddings are compared
with ONNX Runtime CPU running the same ONNX model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from msn_edge.export.parity import ParityError, ParityReport, compare, cpu_engine, engine_embed
from msn_edge.runtime.engine_cache import DEFAULT_MAX_BATCH, save_cached_engine
from msn_edge.runtime.frontend import FrontendConfig
from msn_edge.runtime.gpu import GpuIdentity
from msn_edge.runtime.tensorrt_engine import TensorRTEngine, build_engine, engine_cache_entry

# Smallest cosine similarity between TensorRT and ONNX Runtime embeddings. fp32 allows
# TF32 convolutions (TensorRT's default on Ampere and later); int8 is compared with ONNX
# Runtime running the same Q/DQ model, whose integer kernels round differently.
MIN_COSINE = {"fp32": 0.9999, "fp16": 0.999, "int8": 0.99}


@dataclass(frozen=True)
class EngineResult:
    path: Path  # the cached plan
    tensorrt_version: str
    gpu: str
    precision: str
    engine_bytes: int
    parity: ParityReport


def build_checked_engine(
    onnx_bytes: bytes,
    precision: str,
    *,
    frontend: FrontendConfig,
    prototypes: np.ndarray,
    windows: Sequence[np.ndarray],
    n_real: int,
    cache_dir: Path,
    stem: str,
    max_batch: int = DEFAULT_MAX_BATCH,
) -> EngineResult:
    """Build, compare with ONNX Runtime on `windows` (the first `n_real` real), then cache.

    `onnx_bytes` is the model the precision runs: the fp32 graph for fp32 / fp16, the Q/DQ
    graph for int8. `stem` is the bundle's file name (the runtime's cache naming).
    """
    key, path = engine_cache_entry(
        onnx_bytes, precision, cache_dir=cache_dir, stem=stem, max_batch=max_batch
    )
    plan = build_engine(onnx_bytes, precision, max_batch=max_batch)
    engine = TensorRTEngine(plan, precision=precision, max_batch=max_batch)
    try:
        got = engine_embed(engine, windows, frontend)
    finally:
        engine.close()
    want = engine_embed(cpu_engine(onnx_bytes), windows, frontend)
    parity = compare(want, got, prototypes, n_real=n_real, embedding_tol=None, score_tol=None)
    if parity.min_cosine < MIN_COSINE[precision]:
        raise ParityError(
            f"TensorRT {precision} engine disagrees with ONNX Runtime: cosine similarity "
            f"{parity.min_cosine:.6f} < {MIN_COSINE[precision]} over {len(windows)} windows; "
            "engine not cached"
        )
    save_cached_engine(path, key, plan)
    gpu = GpuIdentity(key.gpu, key.compute_capability, key.sm_count, key.total_memory_mib)
    return EngineResult(path, key.tensorrt_version, gpu.describe(), precision, len(plan), parity)
