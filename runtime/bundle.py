"""The bundle: one zip file that carries everything the edge needs to score a machine.

Members: `manifest.json` (versions, front-end config, scoring groups, sha256 and size of
every other member, and a digest of the manifest itself: see manifest.py), `model.onnx`
(fp32), optionally the int8 Q/DQ twins `model.int8.onnx` (int8 activations: the form
TensorRT takes) and `model.int8-cpu.onnx` (uint8 activations: the form ONNX Runtime's CPU
kernels run fast; see export/quantize.py), and `prototypes.npy` (float32 unit rows).

Reading trusts nothing: the file (at most MAX_BUNDLE_BYTES) is read once into memory, so
what is verified is what is used; the manifest's digest and every field are checked; each
member's declared size is checked against the manifest, its limit and a compression-ratio
cap before it is inflated, then it is inflated block by block and hashed as it streams.
Nothing is ever written to disk. No member can execute code: the manifest is JSON and the
prototypes' .npy header is parsed and checked against its size before any allocation."""

from __future__ import annotations

import hashlib
import io
import json
import math
import stat
import zipfile
import zlib
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from msn_edge.runtime.atomic import atomic_writer
from msn_edge.runtime.errors import BundleError
from msn_edge.runtime.frontend import FrontendConfig
from msn_edge.runtime.manifest import (
    DIGEST_KEY,
    check_digest,
    check_manifest,
    manifest_digest,
    parse_json,
)
from msn_edge.runtime.version import BUNDLE_FORMAT, READABLE_FORMATS, __version__

MANIFEST = "manifest.json"
BUNDLE_SUFFIX = ".msn"
PROTOTYPES = "prototypes.npy"
# Model variant -> member. "int8" is the TensorRT form; "int8-cpu" (format 2 on) the CPU one.
MODEL_MEMBERS = {
    "fp32": "model.onnx",
    "int8": "model.int8.onnx",
    "int8-cpu": "model.int8-cpu.onnx",
}
MiB = 1 << 20
# Largest uncompressed size accepted per member: a guard against zip bombs and absurd
# files, with wide headroom (the full MSN is ~42 MB fp32; 64 MiB holds 65 536 prototypes
# of 256 floats). All are checked against the zip's declared sizes before inflating.
MEMBER_LIMITS = {
    MANIFEST: 1 * MiB,
    MODEL_MEMBERS["fp32"]: 256 * MiB,
    MODEL_MEMBERS["int8"]: 256 * MiB,
    MODEL_MEMBERS["int8-cpu"]: 256 * MiB,
    PROTOTYPES: 64 * MiB,
}
MAX_BUNDLE_BYTES = 512 * MiB  # the file, and all members inflated together: an edge box has 4 GB
MAX_RATIO = 100  # inflated / compressed per member; ONNX weights deflate ~1.1x, JSON ~5x
RATIO_FLOOR = 1 * MiB  # smaller members may compress as they like: they are cheap anyway
READ_BLOCK = 1 * MiB  # members are inflated and hashed block by block
REQUIRED = (MANIFEST, MODEL_MEMBERS["fp32"], PROTOTYPES)
UNIT_TOLERANCE = 1e-3  # |‖row‖ - 1| allowed for prototype rows (float32 round-off)


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

    def not_recommended(self, variant: str) -> str | None:
        """Why the export marked this model variant not recommended, or None."""
        marked = self.manifest.get("metadata", {}).get("not_recommended", {})
        why = marked.get(variant) if isinstance(marked, dict) else None
        return str(why) if why else None

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
    """Write a new bundle from a model, its prototypes and scoring groups (see pack_bundle).

    `enrollments` is the audit trail of `msn-edge enroll` (runtime/history.py), written
    only when there is one.
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
        "trained_on": trained_on,
        "metadata": metadata or {},
    }
    if enrollments:
        manifest["enrollments"] = enrollments
    return pack_bundle(path, manifest, members)


def pack_bundle(path: str | Path, manifest: dict, members: dict[str, bytes]) -> Path:
    """Write a bundle from its manifest and members, atomically (temporary file, rename).

    The one writer of bundle files (`write_bundle` and enrollment call it): it sets the
    format, lists each member's sha256 and size and the manifest digest itself (values the
    caller passes for these are replaced), then runs every check the reader runs on the
    result, so an invalid bundle is never written. Other manifest fields pass through.
    """
    path = Path(path)
    where = str(path)
    if MANIFEST in members:
        raise BundleError(f"{where}: pass the manifest as a dict, not as a member")
    _check_names([MANIFEST, *members], where)
    manifest = {k: v for k, v in manifest.items() if k != DIGEST_KEY}
    manifest["format"] = BUNDLE_FORMAT
    manifest["members"] = {
        name: {"sha256": _sha256(data), "bytes": len(data)} for name, data in members.items()
    }
    try:
        manifest[DIGEST_KEY] = manifest_digest(manifest)
        manifest_bytes = json.dumps(manifest, indent=2, allow_nan=False).encode()
    except (TypeError, ValueError) as e:
        raise BundleError(f"{where}: the manifest cannot be written as JSON ({e})") from None
    _check_sizes({MANIFEST: len(manifest_bytes), **{n: len(d) for n, d in members.items()}}, where)
    _decode(manifest, members, where)  # the reader's own checks, before anything is written

    try:
        with atomic_writer(path) as f, zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(MANIFEST, manifest_bytes)
            for name, data in members.items():
                zf.writestr(name, data)
    except OSError as e:
        raise BundleError(f"{where}: cannot write the bundle ({e.strerror})") from None
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


def _check_sizes(sizes: dict[str, int], where: str) -> None:
    """Per-member limits and the total, on sizes as declared (nothing inflated yet)."""
    for name, size in sizes.items():
        limit = MEMBER_LIMITS[name]
        if size > limit:
            raise BundleError(
                f"{where}: member '{name}' is {size} bytes, over the limit of {_size(limit)}"
            )
    total = sum(sizes.values())
    if total > MAX_BUNDLE_BYTES:
        raise BundleError(
            f"{where}: the members inflate to {total} bytes, over the bundle limit of "
            f"{_size(MAX_BUNDLE_BYTES)}"
        )


def _check_declared(infos: dict[str, zipfile.ZipInfo], manifest: dict, where: str) -> None:
    """Before inflating: the zip's sizes agree with the manifest's, and ratios are sane."""
    listed = manifest["members"]
    for name in listed:
        if name not in infos:
            raise BundleError(f"{where}: missing member '{name}' (listed in the manifest)")
    for name, info in infos.items():
        if name == MANIFEST:
            continue
        if name not in listed:
            raise BundleError(f"{where}: unexpected member '{name}' (not in the manifest)")
        if info.file_size != listed[name]["bytes"]:
            raise BundleError(
                f"{where}: member '{name}' is {info.file_size} bytes in the archive, "
                f"{listed[name]['bytes']} in the manifest (the bundle was modified or damaged)"
            )
        if info.file_size > RATIO_FLOOR and info.file_size > MAX_RATIO * info.compress_size:
            ratio = info.file_size / max(info.compress_size, 1)
            raise BundleError(
                f"{where}: member '{name}' would inflate {ratio:.0f}x "
                f"(more than {MAX_RATIO}x): refused as a decompression bomb"
            )
    _check_sizes({n: i.file_size for n, i in infos.items()}, where)


def _read_member(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, where: str, sha256: str | None = None
) -> bytes:
    """Inflate one member block by block, never past its declared size; hash as it streams."""
    size = info.file_size
    if size > MEMBER_LIMITS[info.filename]:
        _check_sizes({info.filename: size}, where)
    digest = hashlib.sha256()
    out = bytearray()
    try:
        with zf.open(info) as f:
            while len(out) <= size:
                block = f.read(min(READ_BLOCK, size + 1 - len(out)))
                if not block:
                    break
                digest.update(block)
                out += block
    except (zipfile.BadZipFile, zlib.error, RuntimeError, NotImplementedError, EOFError) as e:
        raise BundleError(f"{where}: member '{info.filename}' is corrupt ({e})") from None
    if len(out) != size:
        raise BundleError(
            f"{where}: member '{info.filename}' inflates to {len(out)} bytes, "
            f"its header says {size}"
        )
    if sha256 is not None and digest.hexdigest() != sha256:
        raise BundleError(
            f"{where}: member '{info.filename}' does not match its sha256 in the manifest "
            "(the bundle was modified or damaged after export)"
        )
    return bytes(out)


def _check_format(manifest: dict, where: str) -> None:
    fmt = manifest.get("format")
    if fmt is None:
        raise BundleError(
            f"{where}: manifest.json has no format version; this msn-edge {__version__} "
            f"writes bundle format {BUNDLE_FORMAT}"
        )
    if fmt not in READABLE_FORMATS:
        made_by = manifest.get("msn_edge_version", "an unknown version")
        if not isinstance(made_by, str):
            made_by = "an unknown version"
        readable = " and ".join(str(f) for f in READABLE_FORMATS)
        why = (
            " (older formats carry no manifest digest, so their thresholds could be edited "
            "unnoticed)"
            if isinstance(fmt, int) and not isinstance(fmt, bool) and fmt < min(READABLE_FORMATS)
            else ""
        )
        raise BundleError(
            f"{where}: bundle format {fmt!r:.20} (written by msn-edge {made_by:.40}); this "
            f"msn-edge {__version__} reads bundle format {readable}{why}: re-export the model "
            "with `msn-edge export`, or install the matching msn-edge"
        )


def _load_prototypes(data: bytes, where: str) -> np.ndarray:
    """A float32 (P, D) .npy, its header checked against its size before any allocation."""
    f = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"npy version {version}")
    except (ValueError, EOFError, OSError, SyntaxError) as e:
        raise BundleError(f"{where}: prototypes.npy is not a plain numpy array ({e})") from None
    if dtype.hasobject:
        raise BundleError(f"{where}: prototypes.npy is not a plain numpy array (object dtype)")
    if dtype != np.dtype("<f4") or len(shape) != 2 or fortran:
        raise BundleError(
            f"{where}: prototypes must be a non-empty float32 (P, D) array, got {dtype} {shape}"
        )
    body = len(data) - f.tell()
    if shape[0] * shape[1] * 4 != body:
        raise BundleError(
            f"{where}: prototypes.npy claims shape {shape} but holds {body} bytes of data"
        )
    return np.frombuffer(data, dtype="<f4", offset=f.tell()).reshape(shape).copy()


def _decode(manifest: dict, members: dict[str, bytes], where: str) -> Bundle:
    """Checked manifest and verified members -> Bundle (the reader and the writer share it)."""
    check_manifest(manifest, where)
    prototypes = _load_prototypes(members[PROTOTYPES], where)
    _check_prototypes(prototypes, where)
    if manifest["embedding_dim"] != prototypes.shape[1]:
        raise BundleError(
            f"{where}: manifest embedding size {manifest['embedding_dim']} does not match "
            f"the prototypes ({prototypes.shape[1]})"
        )
    groups = [
        ScoringGroup(
            name=g["name"],
            start=g["start"],
            stop=g["stop"],
            threshold=float(g["threshold"]),
            calibration=dict(g.get("calibration", {})),
        )
        for g in manifest["groups"]
    ]
    _check_groups(groups, prototypes.shape[0], where)
    frontend = FrontendConfig.from_dict(manifest["frontend"])
    models = {p: members[m] for p, m in MODEL_MEMBERS.items() if m in members}
    return Bundle(
        path=Path(where),
        manifest=manifest,
        frontend=frontend,
        prototypes=prototypes,
        groups=groups,
        _models=models,
    )


def is_bundle_file(path: str | Path) -> bool:
    """A zip file with a top-level manifest.json (a torch checkpoint is a zip file too)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return MANIFEST in zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return False  # read_bundle (or read_checkpoint) then says what is wrong


def looks_like_bundle(path: str | Path) -> bool:
    """A bundle by name (.msn) or by content: which reader `score` should use."""
    return Path(path).suffix == BUNDLE_SUFFIX or is_bundle_file(path)


def read_bundle(path: str | Path) -> Bundle:
    """Open and verify a bundle; every problem is a BundleError naming the file.

    Order: file size cap; member names; the manifest (1 MiB at most) parsed, its format,
    digest and every field checked; each member's declared size against the manifest,
    the limits and a compression-ratio cap; only then are members inflated, block by
    block, hashed as they stream.
    """
    path = Path(path)
    where = str(path)
    try:
        if not path.is_file() and path.exists() and not path.is_dir():
            raise BundleError(f"{where}: not a regular file, expected a bundle file (.msn)")
        size = path.stat().st_size
        if size > MAX_BUNDLE_BYTES:
            raise BundleError(
                f"{where}: {size} bytes, over the bundle limit of {_size(MAX_BUNDLE_BYTES)}"
            )
        raw = path.read_bytes()
    except FileNotFoundError:
        raise BundleError(f"{where}: no such bundle file") from None
    except IsADirectoryError:
        raise BundleError(f"{where}: is a directory, expected a bundle file (.msn)") from None
    except OSError as e:
        raise BundleError(f"{where}: cannot read the bundle ({e.strerror})") from None
    try:
        zf = zipfile.ZipFile(io.BytesIO(raw))
    except (zipfile.BadZipFile, ValueError, EOFError):
        raise BundleError(
            f"{where}: not an msn-edge bundle (not a zip archive, or the file is truncated)"
        ) from None
    with zf:
        infos = _check_members(zf.infolist(), where)
        manifest = parse_json(_read_member(zf, infos[MANIFEST], where), where)
        _check_format(manifest, where)
        check_digest(manifest, where)
        check_manifest(manifest, where)
        _check_names(list(infos), where)
        _check_declared(infos, manifest, where)
        listed = manifest["members"]
        members = {
            n: _read_member(zf, i, where, listed[n]["sha256"])
            for n, i in infos.items()
            if n != MANIFEST
        }
    bundle = _decode(manifest, members, where)
    bundle._sha256 = _sha256(raw)
    return bundle
