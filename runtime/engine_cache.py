"""TensorRT engine caches: what an engine depends on (its key), where it is kept, and
reads and writes that never load a mismatched or damaged engine.

One key derivation serves every builder: the native TensorRT backend at run time, the
engine that `msn-edge export --format engine` builds for it, and ONNX Runtime's TensorRT
provider (whose own cache names engines by graph and compute capability only, not by
weights, SM count, memory or TensorRT version, so msn-edge gives it a folder per key).
The key's hash is in the file (or folder) name, the whole key in a JSON sidecar with the
engine's own sha256.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from msn_edge.runtime.atomic import write_atomic
from msn_edge.runtime.gpu import GpuIdentity

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 8  # optimisation profile: min 1, opt 1 (streaming), max this
NATIVE_BUILDER = "msn-edge"  # the native backend (runtime and export); else "onnxruntime X"


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine depends on; any difference means a rebuild."""

    tensorrt_version: str
    gpu: str  # the device's name, e.g. "Orin"
    compute_capability: str  # e.g. "8.7"
    sm_count: int
    total_memory_mib: int
    precision: str
    onnx_sha256: str
    max_batch: int
    builder: str = NATIVE_BUILDER

    @property
    def digest(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def engine_cache_key(
    onnx_bytes: bytes,
    precision: str,
    *,
    tensorrt_version: str,
    gpu: GpuIdentity,
    max_batch: int = DEFAULT_MAX_BATCH,
    builder: str = NATIVE_BUILDER,
) -> EngineKey:
    """The key of an engine built from `onnx_bytes` at `precision` on `gpu`."""
    return EngineKey(
        tensorrt_version=tensorrt_version,
        gpu=gpu.name,
        compute_capability=gpu.compute_capability,
        sm_count=gpu.sm_count,
        total_memory_mib=gpu.total_memory_mib,
        precision=precision,
        onnx_sha256=hashlib.sha256(onnx_bytes).hexdigest(),
        max_batch=max_batch,
        builder=builder,
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


def save_cached_engine(engine_path: Path, key: EngineKey, plan: bytes) -> None:
    """Engine first, sidecar last: an interrupted save leaves a cache that is rebuilt."""
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(engine_path, plan)
    meta = {
        "key": asdict(key),
        "engine_sha256": hashlib.sha256(plan).hexdigest(),
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_atomic(sidecar_path(engine_path), json.dumps(meta, indent=2).encode())


def drop_cached_engine(engine_path: Path) -> None:
    """Remove an engine and its sidecar (sidecar first: a half-removed cache is rebuilt)."""
    for path in (sidecar_path(engine_path), engine_path):
        path.unlink(missing_ok=True)
