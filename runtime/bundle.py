"""The bundle: one zip file that carries everything the edge needs to score a machine.

Members: `manifest.json` (versions, front-end config, scoring groups, sha256 of every
other member), `model.onnx` (fp32), optionally the int8 Q/DQ twins `model.int8.onnx`
(int8 activations: the form TensorRT takes) and `model.int8-cpu.onnx` (uint8 activations:
the form ONNX Runtime's CPU kernels run fast; see export/quantize.py), and
`prototypes.npy` (float32 unit rows). Reading trusts nothing: the whole file is read
once into memory (so what is verified is what is used), every member name, size and hash
is checked, and nothing is ever written to disk. No member can execute code: the manifest
is JSON and the prototypes are loaded with `allow_pickle=False`.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import stat
import zipfile
import zlib
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from msn_edge.runtime.errors import BundleError
from msn_edge.runtime.frontend import FrontendConfig
from msn_edge.runtime.version import BUNDLE_FORMAT, READABLE_FORMATS, __version__

MANIFEST = "manifest.json"
PROTOTYPES = "prototypes.npy"
# Model variant -> member. "int8" is the TensorRT form; "int8-cpu" (format 2 on) the CPU one.
MODEL_MEMBERS = {
    "fp32": "model.onnx",
    "int8": "model.int8.onnx",
    "int8-cpu": "model.int8-cpu.onnx",
}
MiB = 1 << 20
# Largest uncompressed size accepted per member: a guard against zip bombs and absurd
# files, with wide headroom (the full MSN is ~42 MB fp32; 256 MiB holds 262 144
# prototypes of 256 floats). ONNX protobufs cannot exceed 2 GiB anyway.
MEMBER_LIMITS = {
    MANIFEST: 1 * MiB,
    MODEL_MEMBERS["fp32"]: 1024 * MiB,
    MODEL_MEMBERS["int8"]: 1024 * MiB,
    MODEL_MEMBERS["int8-cpu"]: 1024 * MiB,
    PROTOTYPES: 256 * MiB,
}
REQUIRED = (MANIFEST, MODEL_MEMBERS["fp32"], PROTOTYPES)
UNIT_TOLERANCE = 1e-3  # |‖row‖ - 1| allowed for prototype rows (float32 round-off)
_HEADER_SLACK = 1 * MiB  # zip headers and central directory on top of the members


@dataclass(frozen=True)
class ScoringGroup:
    """One machine (type / ID / section): its prototype rows [start, stop) and threshold."""

    name: str
    start: int
    stop: int
    threshold: float
    calibration: dict  # how the threshold was chosen: method, quantile, n_clips, ...


@dataclass
class Bundle:
    path: Path
    manifest: dict
    frontend: FrontendConfig
    prototypes: np.ndarray  # (P, D) float32 unit rows
    groups: list[ScoringGroup]
    _models: dict[str, bytes] = field(repr=False, default_factory=dict)  # precision -> ONNX
    _sha256: str = field(repr=False, default="")

    def group(self, name: str | None = None) -> ScoringGroup:
        """The named scoring group; None gives the default (the first)."""
        wanted = self.manifest["default_group"] if name is None else name
        for g in self.groups:
            if g.name == wanted:
                return g
        names = ", ".join(g.name for g in self.groups)
        raise BundleError(f"{self.path}: no scoring group '{wanted}' (groups: {names})")

    def model_bytes(self, variant: str = "fp32") -> bytes:
        """The verified ONNX model of a variant: "fp32", "int8" or "int8-cpu"."""
        if variant not in MODEL_MEMBERS:
            raise BundleError(
                f"unknown model variant '{variant}' (a bundle holds {', '.join(MODEL_MEMBERS)})"
            )
        if variant not in self._models:
            raise BundleError(
                f"{self.path}: the bundle has no {variant} model (it holds: "
                f"{', '.join(self.variants)}); export it with --int8"
            )
        return self._models[variant]

    def int8_for_cpu(self) -> bytes:
        """The int8 model ONNX Runtime's CPU kernels run best; format-1 bundles have one."""
        return self.model_bytes("int8-cpu" if "int8-cpu" in self._models else "int8")

    @property
    def variants(self) -> list[str]:
        """The model variants the bundle holds, in MODEL_MEMBERS order."""
        return [p for p in MODEL_MEMBERS if p in self._models]

    @property
    def embedding_dim(self) -> int:
        return int(self.prototypes.shape[1])

    @property
    def sha256(self) -> str:
        """sha256 of the bundle file as read."""
        return self._sha256


def _size(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB else f"{n} bytes"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_prototypes(prototypes: np.ndarray, where: str) -> None:
    if prototypes.dtype != np.float32 or prototypes.ndim != 2 or prototypes.shape[0] == 0:
        raise BundleError(
            f"{where}: prototypes must be a non-empty float32 (P, D) array, "
            f"got {prototypes.dtype} {prototypes.shape}"
        )
    norms = np.linalg.norm(prototypes.astype(np.float64), axis=1)
    bad = np.flatnonzero(~(np.abs(norms - 1.0) <= UNIT_TOLERANCE))  # also catches NaN
    if bad.size:
        raise BundleError(
            f"{where}: prototype rows must be unit length; "
            f"row {bad[0]} has norm {norms[bad[0]]:.6g}"
        )


def _check_groups(groups: list[ScoringGroup], n_prototypes: int, where: str) -> None:
    if not groups:
        raise BundleError(f"{where}: a bundle needs at least one scoring group")
    names = [g.name for g in groups]
    if len(set(names)) != len(names):
        raise BundleError(f"{where}: scoring group names repeat: {names}")
    for g in groups:
        if not (isinstance(g.name, str) and g.name):
            raise BundleError(f"{where}: scoring group name must be a non-empty string: {g!r}")
        if not (0 <= g.start < g.stop <= n_prototypes):
            raise BundleError(
                f"{where}: scoring group '{g.name}' has prototype rows [{g.start}, {g.stop}), "
                f"outside the {n_prototypes} prototypes"
            )
        if not math.isfinite(g.threshold):
            raise BundleError(f"{where}: scoring group '{g.name}' has threshold {g.threshold}")


def write_bundle(
    path: str | Path,
    *,
    model_onnx: bytes,
    prototypes: np.ndarray,
    groups: list[ScoringGroup],
    frontend: FrontendConfig,
    trained_on: dict,
    metadata: dict | None = None,
    model_int8_onnx: bytes | None = None,
    model_int8_cpu_onnx: bytes | None = None,
    enrollments: list[dict] | None = None,
) -> Path:
    """Write a bundle atomically: a temporary file beside `path`, then a rename.

    The inputs are validated with the reader's own checks, so an invalid bundle is never
    written. `enrollments` is the audit trail of `msn-edge enroll` (runtime/history.py),
    written only when there is one.
    """
    path = Path(path)
    _check_prototypes(prototypes, str(path))
    _check_groups(groups, prototypes.shape[0], str(path))
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(prototypes), allow_pickle=False)
    members = {MODEL_MEMBERS["fp32"]: model_onnx, PROTOTYPES: buf.getvalue()}
    if model_int8_onnx is not None:
        members[MODEL_MEMBERS["int8"]] = model_int8_onnx
    if model_int8_cpu_onnx is not None:
        members[MODEL_MEMBERS["int8-cpu"]] = model_int8_cpu_onnx
    manifest = {
        "format": BUNDLE_FORMAT,
        "msn_edge_version": __version__,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "frontend": frontend.to_dict(),
        "embedding_dim": int(prototypes.shape[1]),
        "groups": [
            {
                **asdict(g),
                "start": int(g.start),
                "stop": int(g.stop),
                "threshold": float(g.threshold),
            }
            for g in groups
        ],
        "default_group": groups[0].name,
        "members": {
            name: {"sha256": _sha256(data), "bytes": len(data)} for name, data in members.items()
        },
        "trained_on": trained_on,
        "metadata": metadata or {},
    }
    if enrollments:
        manifest["enrollments"] = enrollments
    manifest_bytes = json.dumps(manifest, indent=2, allow_nan=False).encode()

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as zf:
                zf.writestr(MANIFEST, manifest_bytes)
                for name, data in members.items():
                    zf.writestr(name, data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _unsafe_reason(info: zipfile.ZipInfo) -> str | None:
    """Why a member could escape or trick an extractor, or None if its name is plain."""
    name = info.filename
    if stat.S_ISLNK(info.external_attr >> 16):
        return "is a symbolic link"
    if "\\" in name or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return "has an absolute or non-POSIX path"
    if ".." in name.split("/"):
        return "leaves the archive with '..'"
    return None


def _check_members(infos: list[zipfile.ZipInfo], where: str) -> dict[str, zipfile.ZipInfo]:
    for info in infos:
        reason = _unsafe_reason(info)
        if reason:
            raise BundleError(f"{where}: unsafe member name '{info.filename}' ({reason})")
    names = [i.filename for i in infos]
    if len(set(names)) != len(names):
        raise BundleError(f"{where}: the archive lists a member twice")
    if MANIFEST not in names:
        raise BundleError(f"{where}: missing member '{MANIFEST}'")
    return {i.filename: i for i in infos}


def _check_names(names: list[str], where: str) -> None:
    """After the format check: a bundle of another format gets that message instead."""
    for name in names:
        if name not in MEMBER_LIMITS:
            raise BundleError(
                f"{where}: unexpected member '{name}' (a bundle holds only "
                f"{', '.join(MEMBER_LIMITS)})"
            )
    for name in REQUIRED:
        if name not in names:
            raise BundleError(f"{where}: missing member '{name}'")


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, where: str) -> bytes:
    limit = MEMBER_LIMITS[info.filename]
    if info.file_size > limit:
        raise BundleError(
            f"{where}: member '{info.filename}' is {info.file_size} bytes, over the "
            f"limit of {_size(limit)}"
        )
    try:
        with zf.open(info) as f:
            data = f.read(limit + 1)  # bounded even if the header lies about the size
    except (zipfile.BadZipFile, zlib.error, RuntimeError, NotImplementedError, EOFError) as e:
        raise BundleError(f"{where}: member '{info.filename}' is corrupt ({e})") from None
    if len(data) > limit:
        raise BundleError(f"{where}: member '{info.filename}' is over the limit of {_size(limit)}")
    return data


def _parse_manifest(data: bytes, where: str) -> dict:
    try:
        manifest = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{where}: manifest.json is not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{where}: manifest.json is not a JSON object")
    fmt = manifest.get("format")
    if fmt is None:
        raise BundleError(
            f"{where}: manifest.json has no format version; this msn-edge {__version__} "
            f"writes bundle format {BUNDLE_FORMAT}"
        )
    if fmt not in READABLE_FORMATS:
        made_by = manifest.get("msn_edge_version", "an unknown version")
        readable = " and ".join(str(f) for f in READABLE_FORMATS)
        raise BundleError(
            f"{where}: bundle format {fmt} (written by msn-edge {made_by}); this msn-edge "
            f"{__version__} reads bundle formats {readable}: re-export the model or "
            "install the matching msn-edge"
        )
    return manifest


def _verify_hashes(members: dict[str, bytes], manifest: dict, where: str) -> None:
    listed = manifest.get("members")
    if not isinstance(listed, dict):
        raise BundleError(f"{where}: manifest.json has no member hashes")
    for name in listed:
        if name not in members:
            raise BundleError(f"{where}: missing member '{name}' (listed in the manifest)")
    for name, data in members.items():
        if name not in listed:
            raise BundleError(f"{where}: unexpected member '{name}' (not in the manifest)")
        entry = listed[name]
        if not isinstance(entry, dict) or _sha256(data) != entry.get("sha256"):
            raise BundleError(
                f"{where}: member '{name}' does not match its sha256 in the manifest "
                "(the bundle was modified or damaged after export)"
            )


def _parse_groups(manifest: dict, where: str) -> list[ScoringGroup]:
    try:
        groups = [
            ScoringGroup(
                name=g["name"],
                start=int(g["start"]),
                stop=int(g["stop"]),
                threshold=float(g["threshold"]),
                calibration=dict(g.get("calibration", {})),
            )
            for g in manifest["groups"]
        ]
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{where}: manifest.json has malformed scoring groups ({e!r})") from None
    return groups


def read_bundle(path: str | Path) -> Bundle:
    """Open and verify a bundle; every problem is a BundleError naming the file."""
    path = Path(path)
    where = str(path)
    try:
        size = path.stat().st_size
        if size > sum(MEMBER_LIMITS.values()) + _HEADER_SLACK:
            raise BundleError(f"{where}: {size} bytes is larger than any bundle can be")
        raw = path.read_bytes()
    except FileNotFoundError:
        raise BundleError(f"{where}: no such bundle file") from None
    except IsADirectoryError:
        raise BundleError(f"{where}: is a directory, expected a bundle file (.msn)") from None
    except OSError as e:
        raise BundleError(f"{where}: cannot read the bundle ({e.strerror})") from None
    try:
        zf = zipfile.ZipFile(io.BytesIO(raw))
    except zipfile.BadZipFile:
        raise BundleError(
            f"{where}: not an msn-edge bundle (not a zip archive, or the file is truncated)"
        ) from None
    with zf:
        infos = _check_members(zf.infolist(), where)
        manifest = _parse_manifest(_read_member(zf, infos[MANIFEST], where), where)
        _check_names(list(infos), where)
        members = {n: _read_member(zf, i, where) for n, i in infos.items() if n != MANIFEST}
    _verify_hashes(members, manifest, where)

    try:
        prototypes = np.load(io.BytesIO(members[PROTOTYPES]), allow_pickle=False)
    except (ValueError, EOFError, OSError) as e:
        raise BundleError(f"{where}: prototypes.npy is not a plain numpy array ({e})") from None
    _check_prototypes(prototypes, where)
    if manifest.get("embedding_dim") != prototypes.shape[1]:
        raise BundleError(
            f"{where}: manifest embedding size {manifest.get('embedding_dim')} does not match "
            f"the prototypes ({prototypes.shape[1]})"
        )
    groups = _parse_groups(manifest, where)
    _check_groups(groups, prototypes.shape[0], where)
    if manifest.get("default_group") not in {g.name for g in groups}:
        raise BundleError(f"{where}: default group {manifest.get('default_group')!r} is not listed")
    try:
        frontend = FrontendConfig.from_dict(manifest["frontend"])
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(
            f"{where}: manifest.json has an unusable front-end config ({e})"
        ) from None
    models = {p: members[m] for p, m in MODEL_MEMBERS.items() if m in members}
    return Bundle(
        path=path,
        manifest=manifest,
        frontend=frontend,
        prototypes=prototypes,
        groups=groups,
        _models=models,
        _sha256=_sha256(raw),
    )
