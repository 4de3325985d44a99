"""The bundle manifest: its digest and a field-by-field check into one clear error.

The manifest carries what decides a verdict (front-end, thresholds, prototype ranges) and
the sha256 of every other member, so one digest over the manifest covers the whole bundle.
`digest_sha256` is the sha256 of the manifest without that field, written as canonical
JSON (sorted keys, no spaces); the loader recomputes it before it trusts any field.

The digest detects damage and edits made without msn-edge; it is not a signature (whoever
can rewrite the file can recompute it). Pin `Bundle.sha256` to tell a deliberately
replaced bundle from yours.
"""

from __future__ import annotations

import hashlib
import json
import math
import re

from msn_edge.runtime.errors import BundleError

DIGEST_KEY = "digest_sha256"
MAX_DEPTH = 16  # the deepest honest manifest is 4 levels; more is a parser attack
MAX_GROUPS = 100_000
MAX_NAME = 256  # characters in a scoring group name
MAX_EMBEDDING = 65_536
MAX_THRESHOLD = 2.0  # scores are cosine distances in [0, 2]
SAMPLE_RATES = (1_000, 384_000)  # Hz, inclusive
MAX_WINDOW_S = 600.0  # 10 minutes: the windows the models take are 10 s and 18 s
MAX_N_FFT = 65_536
MAX_FFT_FACTOR = 16
_SHA256 = re.compile(r"[0-9a-f]{64}")


def canonical(manifest: dict) -> bytes:
    """The bytes the digest is taken over: the manifest less its digest, canonical JSON."""
    body = {k: v for k, v in manifest.items() if k != DIGEST_KEY}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def manifest_digest(manifest: dict) -> str:
    return hashlib.sha256(canonical(manifest)).hexdigest()


def _depth(value: object) -> int:
    """Nesting depth without recursion (a crafted manifest must not exhaust the stack)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        deepest = max(deepest, d)
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)
    return deepest


def parse_json(data: bytes, where: str) -> dict:
    """manifest.json as a dict; malformed, deeply nested or non-finite JSON is refused."""

    def no_constants(name: str) -> float:
        raise ValueError(f"{name} is not a number JSON allows")

    try:
        manifest = json.loads(data, parse_constant=no_constants)
    except (UnicodeDecodeError, ValueError) as e:
        raise BundleError(f"{where}: manifest.json is not valid JSON ({e})") from None
    except RecursionError:
        raise BundleError(f"{where}: manifest.json is nested too deeply") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{where}: manifest.json is not a JSON object")
    if _depth(manifest) > MAX_DEPTH:
        raise BundleError(f"{where}: manifest.json is nested more than {MAX_DEPTH} levels deep")
    return manifest


def check_digest(manifest: dict, where: str) -> None:
    stated = manifest.get(DIGEST_KEY)
    if not isinstance(stated, str):
        raise BundleError(f"{where}: manifest.json has no {DIGEST_KEY}")
    try:
        actual = manifest_digest(manifest)
    except ValueError as e:  # a float like 1e400 parsed to inf
        raise BundleError(f"{where}: manifest.json holds a value JSON cannot write ({e})") from None
    if stated != actual:
        raise BundleError(
            f"{where}: manifest.json does not match its digest (the bundle was modified or "
            "damaged after export; re-export it)"
        )


class _Fields:
    """Typed getters that name the field in their error: one message per bad field."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, field: str, expected: str, value: object) -> BundleError:
        shown = repr(value)
        if len(shown) > 60:
            shown = shown[:57] + "..."
        return BundleError(f"{self.where}: manifest field {field} must be {expected}, got {shown}")

    def integer(self, d: dict, key: str, field: str, lo: int, hi: int) -> int:
        v = d.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise self.fail(field, f"an integer in [{lo}, {hi}]", v)
        return v

    def number(self, d: dict, key: str, field: str, lo: float, hi: float, *, lo_open=False):
        v = d.get(key)
        ok = (
            not isinstance(v, bool)
            and isinstance(v, int | float)
            and math.isfinite(v)
            and (lo < v if lo_open else lo <= v)
            and v <= hi
        )
        if not ok:
            interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
            raise self.fail(field, f"a finite number in {interval}", v)
        return float(v)

    def string(self, d: dict, key: str, field: str, max_len: int = MAX_NAME) -> str:
        v = d.get(key)
        if not isinstance(v, str) or not v or len(v) > max_len:
            raise self.fail(field, f"a non-empty string of at most {max_len} characters", v)
        return v

    def mapping(self, d: dict, key: str, field: str) -> dict:
        v = d.get(key)
        if not isinstance(v, dict):
            raise self.fail(field, "a JSON object", v)
        return v


def check_frontend(fe: dict, f: _Fields) -> None:
    rate = f.integer(fe, "sample_rate", "frontend.sample_rate", *SAMPLE_RATES)
    window_s = f.number(fe, "window_s", "frontend.window_s", 0.0, MAX_WINDOW_S, lo_open=True)
    n_fft = f.integer(fe, "n_fft", "frontend.n_fft", 2, MAX_N_FFT)
    f.integer(fe, "hop", "frontend.hop", 1, n_fft)
    f.integer(fe, "spectrum_fft_factor", "frontend.spectrum_fft_factor", 1, MAX_FFT_FACTOR)
    f.number(fe, "spectrum_max_hz", "frontend.spectrum_max_hz", 0.0, rate / 2, lo_open=True)
    if round(window_s * rate) <= n_fft // 2:  # reflect padding needs more samples than that
        raise f.fail("frontend.window_s", f"longer than half an FFT ({n_fft} samples)", window_s)


def check_members(listed: dict, f: _Fields) -> None:
    for name, entry in listed.items():
        field = f"members[{name!r}]"
        if not isinstance(entry, dict):
            raise f.fail(field, "a JSON object with sha256 and bytes", entry)
        if not isinstance(entry.get("sha256"), str) or not _SHA256.fullmatch(entry["sha256"]):
            raise f.fail(f"{field}.sha256", "64 lowercase hex digits", entry.get("sha256"))
        f.integer(entry, "bytes", f"{field}.bytes", 0, 1 << 40)


def check_groups(manifest: dict, f: _Fields) -> None:
    groups = manifest.get("groups")
    if not isinstance(groups, list) or not 1 <= len(groups) <= MAX_GROUPS:
        raise f.fail("groups", f"a list of 1 to {MAX_GROUPS} scoring groups", groups)
    for i, g in enumerate(groups):
        if not isinstance(g, dict):
            raise f.fail(f"groups[{i}]", "a JSON object", g)
        f.string(g, "name", f"groups[{i}].name")
        start = f.integer(g, "start", f"groups[{i}].start", 0, 1 << 31)
        f.integer(g, "stop", f"groups[{i}].stop", start + 1, 1 << 31)
        f.number(g, "threshold", f"groups[{i}].threshold", 0.0, MAX_THRESHOLD)
        if "calibration" in g:
            f.mapping(g, "calibration", f"groups[{i}].calibration")
    names = {g["name"] for g in groups}
    if manifest.get("default_group") not in names:
        raise f.fail("default_group", "the name of a listed group", manifest.get("default_group"))


def check_manifest(manifest: dict, where: str) -> None:
    """Every field the runtime uses, type- and range-checked; the first bad one is named.

    Unknown top-level fields are allowed (the digest covers them): records such as an
    enrollment's audit trail travel in the manifest without a format change.
    """
    f = _Fields(where)
    f.integer(manifest, "format", "format", 1, 1 << 20)
    f.string(manifest, "msn_edge_version", "msn_edge_version", 64)
    check_frontend(f.mapping(manifest, "frontend", "frontend"), f)
    f.integer(manifest, "embedding_dim", "embedding_dim", 1, MAX_EMBEDDING)
    check_groups(manifest, f)
    check_members(f.mapping(manifest, "members", "members"), f)
    for key in ("trained_on", "metadata"):
        if key in manifest:
            f.mapping(manifest, key, key)
