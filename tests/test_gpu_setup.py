"""The GPU paths' set-up logic, on the CPU: device identity, TensorRT versions, ONNX Runtime's
TensorRT provider options, page-locked buffers, and the one engine key that export and
runtime share. What needs a real GPU is in test_tensorrt.py and test_engines.py (skipped
here with the reason)."""

from __future__ import annotations

import ctypes
import logging
from types import SimpleNamespace

import numpy as np
import pytest
from toy_bundle import make_toy_bundle, normal_signal

from msn_edge.runtime import engines, ort_tensorrt
from msn_edge.runtime import tensorrt_engine as trt_engine
from msn_edge.runtime.bundle import read_bundle
from msn_edge.runtime.engine_cache import load_cached_engine
from msn_edge.runtime.engines import OrtEngine, make_engine, model_inputs
from msn_edge.runtime.errors import BackendError
from msn_edge.runtime.frontend import features
from msn_edge.runtime.gpu import (
    GpuIdentity,
    decode_tensorrt_version,
    gpu_identity,
    ort_tensorrt_mismatch,
    query_gpu,
    tensorrt_unsupported,
    version_tuple,
)
from msn_edge.runtime.ort_tensorrt import profile_shape_options

ORIN_NANO = GpuIdentity("Orin", "8.7", 8, 7620)
AGX_ORIN = GpuIdentity("Orin", "8.7", 16, 62_841)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return read_bundle(make_toy_bundle(tmp_path_factory.mktemp("b") / "toy.msn", int8=True))


def test_gpu_identity_from_raw_properties():
    props = gpu_identity(b"Orin\0\0garbage", 8, 7, 8, 7620 * 2**20 + 12_345)
    assert props == ORIN_NANO
    assert props.describe() == "Orin sm_87, 8 SMs, 7620 MiB"
    assert gpu_identity(" NVIDIA H100 80GB HBM3 ", 9, 0, 132, 85_030_000_000).name == (
        "NVIDIA H100 80GB HBM3"
    )


class FakeDriver:
    """libcuda's five calls, answering through the ctypes pointers as the real one does."""

    def __init__(self, name: bytes, attrs: dict[int, int], memory: int, fail: str = ""):
        self.name, self.attrs, self.memory, self.fail, self.calls = name, attrs, memory, fail, []

    def _ok(self, call: str) -> int:
        self.calls.append(call)
        return 100 if call == self.fail else 0  # 100: CUDA_ERROR_NO_DEVICE

    def cuInit(self, flags):
        return self._ok("cuInit")

    def cuDeviceGet(self, dev, ordinal):
        dev._obj.value = 40 + ordinal  # a handle, not the ordinal
        return self._ok("cuDeviceGet")

    def cuDeviceGetName(self, buf, size, dev):
        assert dev.value == 40 and size == len(buf)
        buf.value = self.name
        return self._ok("cuDeviceGetName")

    def cuDeviceGetAttribute(self, value, attr, dev):
        value._obj.value = self.attrs[attr]
        return self._ok("cuDeviceGetAttribute")

    def cuDeviceTotalMem_v2(self, size, dev):
        size._obj.value = self.memory
        return self._ok("cuDeviceTotalMem")


def test_query_gpu_reads_name_capability_sms_and_memory():
    driver = FakeDriver(b"Orin", {75: 8, 76: 7, 16: 16}, 65_894_000_000)
    assert query_gpu(0, driver) == GpuIdentity("Orin", "8.7", 16, 62_841)
    assert driver.calls[:2] == ["cuInit", "cuDeviceGet"]
    failing = FakeDriver(b"Orin", {}, 0, fail="cuInit")
    with pytest.raises(BackendError, match="CUDA driver call cuInit failed with error 100"):
        query_gpu(0, failing)


@pytest.mark.parametrize(
    ("number", "text"),
    [(100300, "10.3.0"), (101301, "10.13.1"), (110100, "11.1.0"), (8601, "8.6.1"), (8502, "8.5.2")],
)
def test_tensorrt_library_version_decoding(number, text):
    assert decode_tensorrt_version(number) == text


def test_versions_and_tensorrt_support_rules():
    assert version_tuple("1.20.1+cu126") == (1, 20, 1)
    assert version_tuple("10.3.0.30") == (10, 3, 0)
    assert tensorrt_unsupported("10.3.0") is None
    assert "JetPack 6.0 ships 8.6" in tensorrt_unsupported("8.6.2")
    assert ort_tensorrt_mismatch("1.20.1", "10.3.0") is None  # JetPack 6.1/6.2 wheel
    assert ort_tensorrt_mismatch("1.27.0", "11.1.0") is None
    assert ort_tensorrt_mismatch("1.17.3", "10.3.0") == (
        "onnxruntime 1.17.3's TensorRT provider is not built for TensorRT 10.3.0: "
        "TensorRT 10 needs onnxruntime-gpu >= 1.18"
    )
    assert "TensorRT 11 needs onnxruntime-gpu >= 1.27" in ort_tensorrt_mismatch("1.23.2", "11.1.0")
    assert "too old" in ort_tensorrt_mismatch("1.23.2", "8.6.2")


def test_profile_shape_options_cover_the_batch_range():
    inputs = {"spectrogram": (513, 313), "spectrum": (80_000,)}
    assert profile_shape_options(inputs, 8) == {
        "trt_profile_min_shapes": "spectrogram:1x513x313,spectrum:1x80000",
        "trt_profile_opt_shapes": "spectrogram:1x513x313,spectrum:1x80000",
        "trt_profile_max_shapes": "spectrogram:8x513x313,spectrum:8x80000",
    }
    assert profile_shape_options(inputs, 8, 4)["trt_profile_opt_shapes"] == (
        "spectrogram:4x513x313,spectrum:4x80000"
    )
    with pytest.raises(BackendError, match="does not contain 9"):
        profile_shape_options(inputs, 8, 9)


def test_model_inputs_come_from_the_model(toy):
    fe = toy.frontend
    assert model_inputs(toy.model_bytes()) == {
        "spectrogram": (fe.n_freq, fe.n_frames),
        "spectrum": (fe.spectrum_bins,),
    }


@pytest.fixture
def fake_gpu_box(monkeypatch):
    """This machine as a Jetson whose onnxruntime has the TensorRT provider."""
    box = SimpleNamespace(gpu=ORIN_NANO, trt="10.3.0", sessions=[])
    monkeypatch.setattr(engines, "available_backends", lambda: dict.fromkeys(engines.BACKENDS))
    monkeypatch.setattr(ort_tensorrt, "query_gpu", lambda: box.gpu)
    monkeypatch.setattr(ort_tensorrt, "tensorrt_version", lambda: box.trt)

    class Session:  # records what the provider is given; pretends it started
        def __init__(self, model, **kwargs):
            box.sessions.append(kwargs)
            self.providers = [engines.ORT_PROVIDERS[kwargs["name"]]]
            self.name, self.precision = kwargs["name"], kwargs["precision"]

    monkeypatch.setattr(engines, "OrtEngine", Session)
    return box


def test_ort_tensorrt_gets_profile_shapes_and_a_fully_keyed_cache(toy, tmp_path, fake_gpu_box):
    engine = make_engine(toy, "ort-tensorrt", cache_dir=tmp_path)
    assert engine.name == "ort-tensorrt"
    session = fake_gpu_box.sessions[-1]
    assert session["max_batch"] == 8  # larger batches run in chunks, within the profile
    (name, options), *lesser = session["providers"]
    assert name == "TensorrtExecutionProvider"
    assert lesser == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    fe = toy.frontend
    spec, spectrum = f"{fe.n_freq}x{fe.n_frames}", f"{fe.spectrum_bins}"
    assert options["trt_profile_min_shapes"] == f"spectrogram:1x{spec},spectrum:1x{spectrum}"
    assert options["trt_profile_max_shapes"] == f"spectrogram:8x{spec},spectrum:8x{spectrum}"
    assert not options["trt_fp16_enable"] and not options["trt_int8_enable"]
    folder = options["trt_engine_cache_path"]
    assert options["trt_timing_cache_path"] == folder
    assert folder.startswith(str(tmp_path / "toy.msn.ort-trt" / "fp32-"))

    def folder_for(**change) -> str:
        for attr, value in change.items():
            setattr(fake_gpu_box, attr, value)
        make_engine(toy, "ort-tensorrt", cache_dir=tmp_path)
        return fake_gpu_box.sessions[-1]["providers"][0][1]["trt_engine_cache_path"]

    assert folder_for() == folder  # the same box: the same cache
    agx = folder_for(gpu=AGX_ORIN)  # same name and sm_87, more SMs and memory
    newer = folder_for(trt="10.7.0")
    assert len({folder, agx, newer}) == 3
    make_engine(toy, "ort-tensorrt", precision="int8", cache_dir=tmp_path)
    int8 = fake_gpu_box.sessions[-1]["providers"][0][1]
    assert int8["trt_int8_enable"] and "/fp32-" not in int8["trt_engine_cache_path"]


def test_ort_engine_runs_large_batches_in_profile_sized_chunks(toy):
    rng = np.random.default_rng(3)
    batch = features(np.stack([normal_signal(toy.frontend, rng) for _ in range(5)]), toy.frontend)
    whole = OrtEngine(toy.model_bytes(), providers=["CPUExecutionProvider"], name="cpu")
    chunked = OrtEngine(
        toy.model_bytes(), providers=["CPUExecutionProvider"], name="cpu", max_batch=2
    )
    calls = []
    run = chunked._run
    chunked._run = lambda s, p: calls.append(s.shape[0]) or run(s, p)
    np.testing.assert_allclose(chunked.embed(*batch), whole.embed(*batch), atol=1e-6)
    assert calls == [2, 2, 1]


def test_pinned_array_is_a_view_of_the_host_memory():
    raw = ctypes.create_string_buffer(2 * 3 * 4)
    view = trt_engine.pinned_array(ctypes.addressof(raw), (2, 3), np.float32)
    assert view.shape == (2, 3) and view.dtype == np.float32 and view.flags.writeable
    view[1, 2] = 1.5
    assert np.frombuffer(raw.raw, np.float32)[5] == 1.5  # written where cudaMemcpy reads
    assert view.ctypes.data == ctypes.addressof(raw)


def test_export_caches_under_the_key_the_runtime_looks_up(toy, tmp_path, monkeypatch, caplog):
    """`export --format engine` and the runtime derive one key: the runtime finds the
    exported engine instead of building its own (TensorRT faked by ONNX Runtime CPU)."""
    from msn_edge.export import tensorrt as export_trt
    from msn_edge.export.parity import synthetic_windows

    builds = []
    monkeypatch.setattr(
        trt_engine, "_import_tensorrt", lambda: SimpleNamespace(__version__="10.3.0")
    )
    monkeypatch.setattr(trt_engine, "query_gpu", lambda: ORIN_NANO)
    build = lambda onnx, p, **kw: builds.append(p) or onnx  # noqa: E731 - the "plan" is the ONNX
    monkeypatch.setattr(trt_engine, "build_engine", build)
    monkeypatch.setattr(export_trt, "build_engine", build)
    monkeypatch.setattr(
        export_trt,
        "TensorRTEngine",
        lambda plan, **kw: OrtEngine(plan, providers=["CPUExecutionProvider"], name="tensorrt"),
    )
    onnx_bytes = toy.model_bytes()
    result = export_trt.build_checked_engine(
        onnx_bytes,
        "fp32",
        frontend=toy.frontend,
        prototypes=toy.prototypes,
        windows=synthetic_windows(toy.frontend)[:2],
        n_real=0,
        cache_dir=tmp_path,
        stem="toy.msn",
    )
    assert (result.tensorrt_version, result.gpu) == ("10.3.0", "Orin sm_87, 8 SMs, 7620 MiB")
    assert result.parity.min_cosine > 0.9999
    with caplog.at_level(logging.INFO, logger="msn_edge.runtime.tensorrt_engine"):
        plan = trt_engine.load_or_build_engine(
            onnx_bytes, "fp32", cache_dir=tmp_path, stem="toy.msn"
        )
    assert plan == onnx_bytes and builds == ["fp32"]  # built once, at export
    assert f"TensorRT engine from cache: {result.path}" in caplog.text
    key = trt_engine.current_engine_key(onnx_bytes, "fp32")
    assert load_cached_engine(result.path, key) == onnx_bytes
