"""Property tests (hypothesis): hostile bytes and values give a typed error, never a crash.

Example counts are small so that the suite stays fast on two cores; each property still
meets hundreds of distinct inputs across CI runs (hypothesis varies them).
"""

from __future__ import annotations

import contextlib
import io
import math
import zipfile

import numpy as np
import soundfile as sf
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from msn_edge.cli import main
from msn_edge.runtime.audio import read_audio
from msn_edge.runtime.bundle import read_bundle
from msn_edge.runtime.errors import MsnEdgeError
from msn_edge.runtime.manifest import check_manifest, parse_json
from msn_edge.runtime.sources import RawPcmSource

FAST = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
RATE = 16_000

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
manifest_keys = st.sampled_from(
    [
        "format",
        "msn_edge_version",
        "frontend",
        "embedding_dim",
        "groups",
        "default_group",
        "members",
    ]
)


@FAST
@given(st.dictionaries(manifest_keys, json_values, max_size=7))
def test_manifest_checker_raises_only_bundle_errors(manifest):
    try:
        check_manifest(manifest, "fuzz.msn")
    except MsnEdgeError as e:
        assert str(e).startswith("fuzz.msn: ")


@FAST
@given(st.binary(max_size=2000))
def test_manifest_parser_on_arbitrary_bytes(data):
    try:
        parse_json(data, "fuzz.msn")
    except MsnEdgeError as e:
        assert "\n" not in str(e)


@FAST
@given(st.binary(max_size=4000))
def test_bundle_reader_on_arbitrary_bytes(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "x.msn"
    path.write_bytes(data)
    with contextlib.suppress(MsnEdgeError):
        read_bundle(path)


@FAST
@given(
    st.dictionaries(
        st.sampled_from(["manifest.json", "model.onnx", "prototypes.npy", "x"]),
        st.binary(max_size=300),
        min_size=1,
    )
)
def test_bundle_reader_on_arbitrary_zips(tmp_path_factory, members):
    path = tmp_path_factory.mktemp("fuzz") / "x.msn"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    with contextlib.suppress(MsnEdgeError):
        read_bundle(path)


@FAST
@given(st.binary(max_size=3000))
def test_wav_reader_on_arbitrary_bytes(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "x.wav"
    path.write_bytes(data)
    try:
        wave = read_audio(path, RATE)
    except MsnEdgeError:
        return
    assert wave.dtype == np.float32 and wave.ndim == 1


@FAST
@given(st.integers(1, 4000), st.integers(0, 3000))
def test_wav_reader_on_cut_real_wavs(tmp_path_factory, n, cut):
    buf = io.BytesIO()
    sf.write(buf, np.linspace(-0.5, 0.5, n, dtype=np.float32), RATE, subtype="PCM_16", format="WAV")
    data = buf.getvalue()
    data = data[: max(0, len(data) - cut)]
    path = tmp_path_factory.mktemp("fuzz") / "cut.wav"
    path.write_bytes(data)
    try:
        wave = read_audio(path, RATE)
    except MsnEdgeError as e:
        assert "truncated" in str(e) or "not readable" in str(e) or "no samples" in str(e)
        return
    assert wave.size == n  # whatever is accepted is whole


@FAST
@given(st.binary(max_size=3000), st.integers(1, 7))
def test_stream_reader_on_arbitrary_bytes(data, split):
    class Trickle(io.RawIOBase):
        def __init__(self):
            self.pos = 0

        def read(self, n=-1):
            out = data[self.pos : self.pos + min(n, split)]
            self.pos += len(out)
            return out

    try:
        source = RawPcmSource(Trickle(), RATE)
        while (chunk := source.read()) is not None:
            assert chunk.samples.ndim == 1
    except MsnEdgeError:
        pass


@FAST
@given(
    st.sampled_from(["--hop", "--duration", "--threshold", "--max-windows", "--alarm-after"]),
    st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(str), st.text(max_size=6)),
)
def test_monitor_options_never_trace_back(tmp_path_factory, option, value):
    result = CliRunner().invoke(main, ["monitor", "absent.msn", "--input", "-", option, value])
    assert result.exit_code in (1, 2)
    assert result.exception is None or isinstance(result.exception, SystemExit)


@FAST
@given(st.floats(allow_nan=True, allow_infinity=True))
def test_finite_float_option_accepts_exactly_the_finite_numbers(value):
    result = CliRunner().invoke(
        main, ["monitor", "absent.msn", "--input", "-", "--duration", repr(value)]
    )
    if math.isfinite(value) and value > 0:
        assert "absent.msn: no such bundle file" in result.stderr
    else:
        assert result.exit_code == 2 and "Invalid value for '--duration'" in result.stderr
