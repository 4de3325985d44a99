"""A bundle file as an untrusted zip: member names, sizes and ratios, block-wise inflation.

Everything here runs before a byte is inflated or trusted (bundle.py says what the
members mean): the file is read once into memory under MAX_BUNDLE_BYTES, each member's
name is checked for paths that could escape, its declared size against its limit, the
manifest and a compression-ratio cap, and then it is inflated block by block, hashed as it
streams, never past its declared size.
"""

from __future__ import annotations

import hashlib
import io
import stat
import zipfile
import zlib
from pathlib import Path

from msn_edge.runtime.errors import BundleError

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


def size_text(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB else f"{n} bytes"


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


def check_members(infos: list[zipfile.ZipInfo], where: str) -> dict[str, zipfile.ZipInfo]:
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


def check_names(names: list[str], where: str) -> None:
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


def check_sizes(sizes: dict[str, int], where: str) -> None:
    """Per-member limits and the total, on sizes as declared (nothing inflated yet)."""
    for name, size in sizes.items():
        limit = MEMBER_LIMITS[name]
        if size > limit:
            raise BundleError(
                f"{where}: member '{name}' is {size} bytes, over the limit of {size_text(limit)}"
            )
    total = sum(sizes.values())
    if total > MAX_BUNDLE_BYTES:
        raise BundleError(
            f"{where}: the members inflate to {total} bytes, over the bundle limit of "
            f"{size_text(MAX_BUNDLE_BYTES)}"
        )


def check_declared(infos: dict[str, zipfile.ZipInfo], manifest: dict, where: str) -> None:
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
    check_sizes({n: i.file_size for n, i in infos.items()}, where)


def read_member(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, where: str, sha256: str | None = None
) -> bytes:
    """Inflate one member block by block, never past its declared size; hash as it streams."""
    size = info.file_size
    if size > MEMBER_LIMITS[info.filename]:
        check_sizes({info.filename: size}, where)
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


def read_archive(path: Path) -> tuple[bytes, zipfile.ZipFile]:
    """The file's bytes (at most MAX_BUNDLE_BYTES) and the zip they hold, or a BundleError."""
    where = str(path)
    try:
        if not path.is_file() and path.exists() and not path.is_dir():
            raise BundleError(f"{where}: not a regular file, expected a bundle file (.msn)")
        size = path.stat().st_size
        if size > MAX_BUNDLE_BYTES:
            raise BundleError(
                f"{where}: {size} bytes, over the bundle limit of {size_text(MAX_BUNDLE_BYTES)}"
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
    return raw, zf
