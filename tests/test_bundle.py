"""The bundle format: round trip, and every way a file can be damaged or hostile."""

from __future__ import annotations

import hashlib
import io
import json
import struct
import zipfile
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from toy_bundle import make_toy_bundle

from msn_edge.runtime import bundle_zip
from msn_edge.runtime.bundle import ScoringGroup, read_bundle, write_bundle
from msn_edge.runtime.errors import BundleError
from msn_edge.runtime.frontend import FrontendConfig
from msn_edge.runtime.manifest import manifest_digest
from msn_edge.runtime.version import BUNDLE_FORMAT, __version__

FRONTEND = FrontendConfig(window_s=1.0)


def _unit_rows(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _groups() -> list[ScoringGroup]:
    return [
        ScoringGroup(
            "fan/id_00", 0, 3, 0.25, {"method": "quantile", "quantile": 0.95, "n_clips": 40}
        ),
        ScoringGroup(
            "fan/id_02", 3, 5, 0.3, {"method": "quantile", "quantile": 0.95, "n_clips": 38}
        ),
    ]


def _write(path: Path, **overrides) -> Path:
    kwargs = {
        "model_onnx": b"fp32-model-bytes",
        "prototypes": _unit_rows(5, 8),
        "groups": _groups(),
        "frontend": FRONTEND,
        "trained_on": {"n_clips": 78, "groups": 2},
        "metadata": {"preset": "tiny"},
    }
    return write_bundle(path, **{**kwargs, **overrides})


def _members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


def _rezip(
    path: Path, members: dict[str, bytes], extra: list[tuple[zipfile.ZipInfo, bytes]] = ()
) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for info, data in extra:
            zf.writestr(info, data)
    return path


def _with_manifest(members: dict[str, bytes], edit, *, redigest: bool = True) -> dict[str, bytes]:
    """Edit the manifest; with `redigest`, fix its digest too, as a forger who read the code."""
    manifest = json.loads(members["manifest.json"])
    edit(manifest)
    if redigest:
        manifest["digest_sha256"] = manifest_digest(manifest)
    return {**members, "manifest.json": json.dumps(manifest).encode()}


def _rehashed(members: dict[str, bytes], name: str, data: bytes) -> dict[str, bytes]:
    """Replace a member and fix its hash, as a careful forger would."""

    def edit(m):
        m["members"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}

    return _with_manifest({**members, name: data}, edit)


def test_round_trip_keeps_everything(tmp_path):
    protos = _unit_rows(5, 8)
    path = _write(
        tmp_path / "fan.msn",
        prototypes=protos,
        model_int8_onnx=b"int8-model-bytes",
        model_int8_cpu_onnx=b"int8-cpu-model-bytes",
    )
    b = read_bundle(path)

    np.testing.assert_array_equal(b.prototypes, protos)
    assert b.prototypes.dtype == np.float32
    assert b.groups == _groups()
    assert b.frontend == FRONTEND
    assert b.variants == ["fp32", "int8", "int8-cpu"]
    assert b.model_bytes() == b"fp32-model-bytes"
    assert b.model_bytes("int8") == b"int8-model-bytes"
    assert b.model_bytes("int8-cpu") == b"int8-cpu-model-bytes"
    assert b.int8_for_cpu() == b"int8-cpu-model-bytes"
    assert b.embedding_dim == 8
    assert b.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    m = b.manifest
    assert (m["format"], m["msn_edge_version"], m["embedding_dim"]) == (
        BUNDLE_FORMAT,
        __version__,
        8,
    )
    assert datetime.fromisoformat(m["created_utc"]).utcoffset().total_seconds() == 0
    assert m["frontend"] == FRONTEND.to_dict()
    assert m["default_group"] == "fan/id_00"
    assert sorted(m["members"]) == [
        "model.int8-cpu.onnx",
        "model.int8.onnx",
        "model.onnx",
        "prototypes.npy",
    ]
    assert m["members"]["model.onnx"]["sha256"] == hashlib.sha256(b"fp32-model-bytes").hexdigest()
    assert m["trained_on"] == {"n_clips": 78, "groups": 2}
    assert m["metadata"] == {"preset": "tiny"}
    assert sorted(_members(path)) == [
        "manifest.json",
        "model.int8-cpu.onnx",
        "model.int8.onnx",
        "model.onnx",
        "prototypes.npy",
    ]


def test_group_lookup_default_and_unknown(tmp_path):
    b = read_bundle(_write(tmp_path / "fan.msn"))
    assert b.group().name == "fan/id_00"
    assert b.group("fan/id_02") == _groups()[1]
    with pytest.raises(
        BundleError, match=r"no scoring group 'pump' \(groups: fan/id_00, fan/id_02\)"
    ):
        b.group("pump")


def test_missing_int8_model_is_a_clear_error(tmp_path):
    b = read_bundle(_write(tmp_path / "fan.msn"))
    assert b.variants == ["fp32"]
    with pytest.raises(
        BundleError, match=r"fan\.msn: the bundle has no int8 model \(it holds: fp32\)"
    ):
        b.model_bytes("int8")
    with pytest.raises(BundleError, match="the bundle has no int8 model"):
        b.int8_for_cpu()
    with pytest.raises(BundleError, match="unknown model variant 'fp8'"):
        b.model_bytes("fp8")


@pytest.mark.parametrize("old", [1, 2])
def test_old_formats_without_a_digest_are_refused_with_re_export_advice(tmp_path, old):
    path = _write(tmp_path / "old.msn", model_int8_onnx=b"int8-model-bytes")
    members = _with_manifest(_members(path), lambda m: m.update(format=old))
    with pytest.raises(
        BundleError,
        match=rf"bundle format {old} \(written by msn-edge {__version__}\); this msn-edge "
        rf"{__version__} reads bundle format 3 \(older formats carry no manifest digest.*"
        r"re-export the model with `msn-edge export`",
    ):
        read_bundle(_rezip(tmp_path / "v1.msn", members))


def test_an_edited_threshold_is_refused_by_the_digest(tmp_path):
    """The issue's case: threshold 99 made every window normal; the digest catches it."""
    path = _write(tmp_path / "fan.msn")

    def edit(m):
        m["groups"][0]["threshold"] = 99

    _rezip(path, _with_manifest(_members(path), edit, redigest=False))
    with pytest.raises(BundleError, match="manifest.json does not match its digest"):
        read_bundle(path)
    # A forger who recomputes the digest still meets the range check.
    _rezip(path, _with_manifest(_members(path), edit))
    with pytest.raises(
        BundleError, match=r"manifest field groups\[0\]\.threshold must be a finite number in "
    ):
        read_bundle(path)


def test_write_is_atomic_and_validates_first(tmp_path):
    path = _write(tmp_path / "fan.msn")
    before = path.read_bytes()
    bad = _unit_rows(5, 8) * 2
    with pytest.raises(BundleError, match="row 0 has norm 2"):
        _write(path, prototypes=bad)
    too_far = [ScoringGroup("fan/id_00", 0, 6, 0.2, {})]
    with pytest.raises(BundleError, match=r"rows \[0, 6\), outside the 5 prototypes"):
        _write(path, groups=too_far)
    with pytest.raises(BundleError, match="threshold nan"):
        _write(path, groups=[ScoringGroup("g", 0, 5, float("nan"), {})])
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["fan.msn"]  # no temporary left behind


def test_toy_bundle_reads_back(tmp_path):
    b = read_bundle(make_toy_bundle(tmp_path / "toy.msn"))
    assert b.frontend.window_s == 1.0
    assert b.prototypes.shape == (8, 32)
    assert b.group().name == "toy" and b.group().threshold > 0


@pytest.fixture
def good(tmp_path) -> Path:
    return _write(tmp_path / "good.msn", model_int8_onnx=b"int8-model-bytes")


def _tamper_cases():
    def edited(m):
        return {**m, "model.onnx": m["model.onnx"][:-1] + b"!"}

    def grown(m):
        return {**m, "model.onnx": m["model.onnx"] + b"!"}

    def without(name):
        return lambda m: {k: v for k, v in m.items() if k != name}

    def added(name, data=b"x"):
        return lambda m: {**m, name: data}

    def fmt(value):
        def edit(man):
            if value is None:
                del man["format"]
            else:
                man["format"] = value

        return lambda m: _with_manifest(m, edit)

    def pickled(m):
        buf = io.BytesIO()
        np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
        return _rehashed(m, "prototypes.npy", buf.getvalue())

    def non_unit(m):
        buf = io.BytesIO()
        np.save(buf, _unit_rows(5, 8) * 0.5)
        return _rehashed(m, "prototypes.npy", buf.getvalue())

    def group_range(m):
        def edit(man):
            man["groups"][1]["stop"] = 9

        return _with_manifest(m, edit)

    return [
        ("edited member", edited, r"member 'model\.onnx' does not match its sha256"),
        ("grown member", grown, r"'model\.onnx' is 17 bytes in the archive, 16 in the manifest"),
        ("deleted member", without("prototypes.npy"), r"missing member 'prototypes\.npy'"),
        (
            "deleted listed int8",
            without("model.int8.onnx"),
            r"missing member 'model\.int8\.onnx' \(listed",
        ),
        ("added member", added("notes.txt"), r"unexpected member 'notes\.txt'"),
        ("added directory", added("models/"), r"unexpected member 'models/'"),
        (
            "wrong format",
            fmt(99),
            r"bundle format 99 \(written by msn-edge .*\); this msn-edge "
            rf"{__version__} reads bundle format 3: re-export",
        ),
        (
            "newer format with a new member",  # the format is the message, not the member
            lambda m: fmt(4)(added("model.fp8.onnx")(m)),
            r"bundle format 4 \(written by msn-edge",
        ),
        ("no format", fmt(None), "manifest.json has no format version; this msn-edge"),
        ("bad json", added("manifest.json", b"{not json"), "manifest.json is not valid JSON"),
        ("pickled prototypes", pickled, r"prototypes\.npy is not a plain numpy array"),
        (
            "non-unit prototypes",
            non_unit,
            r"prototype rows must be unit length; row 0 has norm 0\.5",
        ),
        (
            "group out of range",
            group_range,
            r"'fan/id_02' has prototype rows \[3, 9\), outside the 5",
        ),
    ]


@pytest.mark.parametrize(
    ("case", "change", "message"), _tamper_cases(), ids=lambda x: x if isinstance(x, str) else ""
)
def test_tampered_bundle_is_refused(good, case, change, message):
    _rezip(good, change(_members(good)))
    with pytest.raises(BundleError, match=message) as err:
        read_bundle(good)
    assert str(err.value).startswith(str(good))


def test_unlisted_int8_model_is_unexpected(tmp_path):
    path = _write(tmp_path / "fan.msn")
    _rezip(path, {**_members(path), "model.int8.onnx": b"smuggled"})
    with pytest.raises(
        BundleError, match=r"unexpected member 'model\.int8\.onnx' \(not in the manifest\)"
    ):
        read_bundle(path)


@pytest.mark.parametrize(
    ("name", "mode", "message"),
    [
        ("../evil", 0o100644, r"unsafe member name '\.\./evil' \(leaves the archive"),
        ("a/../../evil", 0o100644, "leaves the archive"),
        ("/etc/evil", 0o100644, r"unsafe member name '/etc/evil' \(has an absolute"),
        ("C:/evil", 0o100644, "has an absolute"),
        ("link", 0o120777, r"unsafe member name 'link' \(is a symbolic link\)"),
    ],
)
def test_unsafe_member_names_are_refused_and_nothing_is_written(good, name, mode, message):
    info = zipfile.ZipInfo(name)
    info.external_attr = mode << 16
    _rezip(good, _members(good), extra=[(info, b"/etc/passwd")])
    before = sorted(p.name for p in good.parent.iterdir())
    with pytest.raises(BundleError, match=message):
        read_bundle(good)
    assert sorted(p.name for p in good.parent.iterdir()) == before


def test_truncated_file(good):
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="not a zip archive, or the file is truncated"):
        read_bundle(good)


def test_not_a_zip_missing_file_and_directory(tmp_path):
    text = tmp_path / "notes.msn"
    text.write_text("hello")
    with pytest.raises(BundleError, match=r"notes\.msn: not an msn-edge bundle"):
        read_bundle(text)
    with pytest.raises(BundleError, match=r"absent\.msn: no such bundle file"):
        read_bundle(tmp_path / "absent.msn")
    with pytest.raises(BundleError, match="is a directory"):
        read_bundle(tmp_path)


def test_member_over_size_limit(good, monkeypatch):
    monkeypatch.setitem(bundle_zip.MEMBER_LIMITS, "model.onnx", 8)
    with pytest.raises(
        BundleError, match=r"member 'model\.onnx' is 16 bytes, over the limit of 8 bytes"
    ):
        read_bundle(good)


def test_member_understating_its_size_is_refused(good):
    """A zip whose sizes lie cannot smuggle in more bytes: the archive's size must match
    the manifest's (checked before inflating), and inflating stops at the declared size."""
    base = _members(good)
    _rezip(good, {**base, "model.onnx": b"\0" * (3 << 20)})  # a small zip bomb
    raw = bytearray(good.read_bytes())
    entry = raw.find(b"PK\x01\x02")  # central directory records: find model.onnx's
    while raw[entry + 46 : entry + 56] != b"model.onnx":
        entry = raw.find(b"PK\x01\x02", entry + 4)
        assert entry >= 0
    struct.pack_into("<I", raw, entry + 24, 1000)  # uncompressed size: "1000 bytes"
    good.write_bytes(bytes(raw))
    with pytest.raises(
        BundleError, match=r"member 'model\.onnx' is 1000 bytes in the archive, 16 in the manifest"
    ):
        read_bundle(good)

    def claim_1000(m):
        m["members"]["model.onnx"]["bytes"] = 1000

    bomb = {**base, "model.onnx": b"\0" * (3 << 20)}
    _rezip(good, _with_manifest(bomb, claim_1000))  # a forger who re-digests
    raw = bytearray(good.read_bytes())
    entry = raw.find(b"PK\x01\x02")
    while raw[entry + 46 : entry + 56] != b"model.onnx":
        entry = raw.find(b"PK\x01\x02", entry + 4)
        assert entry >= 0
    struct.pack_into("<I", raw, entry + 24, 1000)
    good.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match=r"member 'model\.onnx' is corrupt \(Bad CRC-32"):
        read_bundle(good)
