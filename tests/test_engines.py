"""Inference backends: real ONNX Runtime sessions against the toy graph's numpy twin,
backend discovery and its error messages, and the TensorRT engine cache logic."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import soundfile as sf
from click.testing import CliRunner
from toy_bundle import ToyModel, anomalous_signal, make_toy_bundle, normal_signal

from msn_edge.cli import main
from msn_edge.runtime import engines
from msn_edge.runtime import tensorrt_engine as trt_engine
from msn_edge.runtime.bundle import read_bundle
from msn_edge.runtime.engine_cache import (
    EngineKey,
    cache_path,
    engine_cache_key,
    load_cached_engine,
    save_cached_engine,
    sidecar_path,
)
from msn_edge.runtime.engines import OrtEngine, available_backends, make_engine
from msn_edge.runtime.errors import BackendError, BundleError
from msn_edge.runtime.frontend import features
from msn_edge.runtime.gpu import GpuIdentity
from msn_edge.runtime.tensorrt_engine import precision_plan

NOTHING_INSTALLED = {
    "cpu": None,
    "cuda": "onnxruntime has no CUDAExecutionProvider (install msn-edge[gpu]; on a Jetson: "
    "docs/jetson.md)",
    "ort-tensorrt": "onnxruntime has no TensorrtExecutionProvider (install "
    "msn-edge[gpu,tensorrt]; on a Jetson: docs/jetson.md)",
    "tensorrt": "tensorrt not installed (pip install msn-edge[tensorrt]; on a Jetson: "
    "docs/jetson.md)",
}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return read_bundle(make_toy_bundle(tmp_path_factory.mktemp("b") / "toy.msn", int8=True))


@pytest.fixture(scope="module")
def batch(toy):
    rng = np.random.default_rng(11)
    waves = [normal_signal(toy.frontend, rng) for _ in range(3)]
    waves += [anomalous_signal(toy.frontend, rng) for _ in range(2)]
    return features(np.stack(waves), toy.frontend)


@pytest.fixture
def cpu_only(monkeypatch):
    """This machine as if no GPU package were installed, whatever is really there."""
    monkeypatch.setattr(engines.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    monkeypatch.setattr(engines, "module_missing", lambda name: True)


def test_ort_cpu_embeddings_equal_reference_math(toy, batch):
    engine = OrtEngine(toy.model_bytes(), providers=["CPUExecutionProvider"], threads=1, name="cpu")
    reference = ToyModel.random(toy.frontend, dim=toy.embedding_dim, seed=0).embed(*batch)
    emb = engine.embed(*batch)
    assert emb.dtype == np.float32 and emb.shape == (5, 32)
    np.testing.assert_allclose(emb, reference, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    one = engine.embed(batch[0][:1], batch[1][:1])  # the batch dimension is dynamic
    np.testing.assert_allclose(one, reference[:1], rtol=1e-4, atol=1e-5)
    assert engine._session.get_session_options().intra_op_num_threads == 1
    assert engine.providers == ["CPUExecutionProvider"]


def test_ort_input_names_come_from_the_session(toy, batch):
    model = onnx.load_from_string(toy.model_bytes())
    rename = {"spectrogram": "stft_mag", "spectrum": "fft_mag"}
    for node in model.graph.node:
        node.input[:] = [rename.get(n, n) for n in node.input]
    for inp in model.graph.input:
        inp.name = rename[inp.name]
    model.graph.input.reverse()  # and in the other order
    engine = OrtEngine(model.SerializeToString(), providers=["CPUExecutionProvider"], name="cpu")
    reference = OrtEngine(toy.model_bytes(), providers=["CPUExecutionProvider"], name="cpu")
    np.testing.assert_allclose(engine.embed(*batch), reference.embed(*batch), atol=1e-6)


def test_ort_rejects_a_model_without_the_contract_inputs():
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "other",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    with pytest.raises(BackendError, match=r"inputs are x \['b', 4\]; expected a spectrogram"):
        OrtEngine(model.SerializeToString(), providers=["CPUExecutionProvider"], name="cpu")
    with pytest.raises(BackendError, match="onnxruntime cannot load the model on cpu"):
        OrtEngine(b"not onnx", providers=["CPUExecutionProvider"], name="cpu")


def test_available_backends_reasons_without_gpu_packages(cpu_only):
    assert available_backends() == NOTHING_INSTALLED


def test_available_backends_reasons_without_a_gpu(monkeypatch):
    monkeypatch.setattr(
        engines.ort,
        "get_available_providers",
        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    monkeypatch.setattr(engines, "module_missing", lambda name: False)
    monkeypatch.setattr(engines, "_gpu_missing_reason", lambda: "no NVIDIA GPU (test)")
    assert available_backends() == {
        "cpu": None,
        "cuda": "no NVIDIA GPU (test)",
        "ort-tensorrt": "no NVIDIA GPU (test)",
        "tensorrt": "no NVIDIA GPU (test)",
    }
    monkeypatch.setattr(engines, "_gpu_missing_reason", lambda: None)
    monkeypatch.setattr(engines, "tensorrt_version", lambda: "10.3.0")
    assert set(available_backends().values()) == {None}
    monkeypatch.setattr(engines, "tensorrt_version", lambda: "8.6.2")  # JetPack 6.0
    reasons = available_backends()
    assert "JetPack 6.0 ships 8.6" in reasons["ort-tensorrt"]
    assert reasons["tensorrt"].startswith("TensorRT 8.6.2 is too old: msn-edge needs TensorRT 10")


def test_make_engine_missing_backends_say_what_to_install(toy, cpu_only):
    with pytest.raises(
        BackendError, match=r"backend 'cuda' cannot run here: .*install msn-edge\[gpu\]"
    ):
        make_engine(toy, "cuda")
    with pytest.raises(
        BackendError, match=r"'tensorrt' cannot run here: tensorrt not installed \(pip"
    ):
        make_engine(toy, "tensorrt")
    with pytest.raises(BackendError, match=r"unknown backend 'tpu' \(choose from auto, cpu, cuda"):
        make_engine(toy, "tpu")
    with pytest.raises(BackendError, match=r"unknown precision 'fp8'"):
        make_engine(toy, "cpu", precision="fp8")
    with pytest.raises(BackendError, match="precision fp16 needs a TensorRT backend"):
        make_engine(toy, "cpu", precision="fp16")
    with pytest.raises(BackendError, match="no backend can run precision fp16 here"):
        make_engine(toy, "auto", precision="fp16")


def test_make_engine_auto_picks_cpu_and_logs_it(toy, batch, cpu_only, caplog):
    with caplog.at_level(logging.INFO, logger="msn_edge.runtime.engines"):
        engine = make_engine(toy, threads=1)
    assert (engine.name, engine.precision) == ("cpu", "fp32")
    assert (
        "inference backend: cpu (onnxruntime CPUExecutionProvider, fp32) picked by auto"
        in caplog.text
    )


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")
def test_explicit_gpu_backend_that_falls_back_is_an_error(toy, monkeypatch):
    """ONNX Runtime quietly runs on the CPU when an EP cannot start; msn-edge says so."""
    if "CUDAExecutionProvider" in engines.ort.get_available_providers():
        pytest.skip("onnxruntime here has a CUDA EP: the fallback cannot be provoked")
    said_ok = {"cpu": None, "cuda": None, "ort-tensorrt": "test", "tensorrt": "test"}
    monkeypatch.setattr(engines, "available_backends", lambda: said_ok)
    with pytest.raises(BackendError, match=r"could not start CUDAExecutionProvider \(it fell back"):
        make_engine(toy, "cuda")
    assert make_engine(toy, "auto").name == "cpu"  # auto reports what really runs


def test_int8_precision(toy, batch, tmp_path):
    fp32 = make_engine(toy, "cpu").embed(*batch)
    engine = make_engine(toy, "cpu", precision="int8")
    assert engine.precision == "int8"
    int8 = engine.embed(*batch)
    assert not np.array_equal(int8, fp32)  # really the quantised graph
    np.testing.assert_array_less(0.99, np.sum(int8 * fp32, axis=1))  # cosine to fp32
    plain = read_bundle(make_toy_bundle(tmp_path / "plain.msn"))
    with pytest.raises(BundleError, match=r"plain\.msn: the bundle has no int8 model"):
        make_engine(plain, "cpu", precision="int8")


def test_int8_marked_not_recommended_is_refused_unless_allowed(tmp_path, batch):
    why = "AUC 3.0 points below fp32's (80.00 vs 83.00 on the export's evaluation data)"
    path = make_toy_bundle(tmp_path / "marked.msn", int8=True, not_recommended={"int8": why})
    marked = read_bundle(path)
    assert marked.not_recommended("int8") == why and marked.not_recommended("fp32") is None
    with pytest.raises(BackendError, match=r"marked its int8 model not recommended \(AUC 3\.0"):
        make_engine(marked, "cpu", precision="int8")
    make_engine(marked, "cpu").embed(*batch)  # fp32 is fine
    engine = make_engine(marked, "cpu", precision="int8", allow_not_recommended=True)
    assert engine.precision == "int8" and engine.embed(*batch).shape[0] == len(batch[0])
    # The monitor says so in one line, and runs it when told to.
    wave = tmp_path / "w.wav"
    sf.write(wave, np.zeros(16_000 * 3, dtype=np.int16) + 100, 16_000, subtype="PCM_16")
    args = ["monitor", str(path), "--input", str(wave), "--backend", "cpu", "--precision", "int8"]
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code != 0 and "Traceback" not in refused.output
    assert "not recommended" in refused.stderr and "--allow-not-recommended" in refused.stderr
    allowed = CliRunner().invoke(main, [*args, "--allow-not-recommended"])
    assert allowed.exit_code == 0, allowed.output
    assert sum('"event": "window"' in line for line in allowed.stdout.splitlines()) == 3


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "ort-tensorrt", "tensorrt"])
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_gpu_backend_matches_cpu(toy, batch, backend, precision, tmp_path):
    reason = available_backends()[backend]
    if reason:
        pytest.skip(f"{backend}: {reason}")
    want = make_engine(toy, "cpu", precision=precision).embed(*batch)
    engine = make_engine(toy, backend, precision=precision, cache_dir=tmp_path)
    try:
        got = engine.embed(*batch)
    finally:
        engine.close()
    assert engine.name == backend
    np.testing.assert_array_less(0.999, np.sum(got * want, axis=1))


@pytest.mark.gpu
def test_ort_tensorrt_builds_one_engine_for_every_batch_size(toy, tmp_path):
    """The optimisation profile (batch 1..8) means no rebuild when the batch grows; larger
    batches run in chunks of 8."""
    reason = available_backends()["ort-tensorrt"]
    if reason:
        pytest.skip(f"ort-tensorrt: {reason}")
    rng = np.random.default_rng(5)
    waves = np.stack([normal_signal(toy.frontend, rng) for _ in range(11)])
    spec, spectrum = features(waves, toy.frontend)
    want = make_engine(toy, "cpu").embed(spec, spectrum)
    engine = make_engine(toy, "ort-tensorrt", cache_dir=tmp_path)
    (folder,) = (tmp_path / "toy.msn.ort-trt").iterdir()

    def engines_built() -> dict:
        return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.engine")}

    built = None
    for n in (1, 3, 8, 11):
        got = engine.embed(spec[:n], spectrum[:n])
        np.testing.assert_array_less(0.999, np.sum(got * want[:n], axis=1))
        built = built or engines_built()
        assert built and engines_built() == built, n  # the batch-1 engines, never rebuilt


# TensorRT cache: plain Python, no TensorRT needed.
ORIN_NANO_8GB = GpuIdentity("Orin", "8.7", 8, 7620)
KEY = engine_cache_key(b"onnx", "fp16", tensorrt_version="10.3.0", gpu=ORIN_NANO_8GB)


def test_engine_key_changes_with_every_field():
    assert (
        EngineKey("10.3.0", "Orin", "8.7", 8, 7620, "fp16", hashlib.sha256(b"onnx").hexdigest(), 8)
        == KEY
    )
    assert KEY.builder == "msn-edge"
    digests = {KEY.digest}
    for name, value in [
        ("tensorrt_version", "10.3.1"),
        ("gpu", "NVIDIA H100"),
        ("compute_capability", "9.0"),
        ("sm_count", 16),  # an AGX Orin 64 GB: also "Orin", also sm_87
        ("total_memory_mib", 15_600),  # an Orin NX 16 GB: also 8 SMs
        ("precision", "fp32"),
        ("onnx_sha256", "cd" * 32),
        ("max_batch", 16),
        ("builder", "onnxruntime 1.20.1"),
    ]:
        digests.add(dataclasses.replace(KEY, **{name: value}).digest)
    assert len(digests) == 10 and all(len(d) == 16 for d in digests)
    path = cache_path(Path("/cache"), "fan.msn", KEY)
    assert path == Path(f"/cache/fan.msn.fp16.{KEY.digest}.engine")
    assert sidecar_path(path).name == f"fan.msn.fp16.{KEY.digest}.engine.json"


def test_cached_engine_loads_only_when_everything_matches(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="msn_edge.runtime.engine_cache")
    path = cache_path(tmp_path, "fan.msn", KEY)
    assert load_cached_engine(path, KEY) is None  # nothing cached yet
    save_cached_engine(path, KEY, b"plan-bytes")
    assert load_cached_engine(path, KEY) == b"plan-bytes"

    agx = dataclasses.replace(KEY, sm_count=16, total_memory_mib=62_800)
    assert load_cached_engine(path, agx) is None  # same file name forced: still refused
    assert "cache built for another sm_count, total_memory_mib" in caplog.text

    path.write_bytes(b"plan-bytes, damaged")
    assert load_cached_engine(path, KEY) is None
    assert "does not match its sidecar" in caplog.text

    path.write_bytes(b"plan-bytes")
    sidecar_path(path).write_text("{broken")
    assert load_cached_engine(path, KEY) is None
    sidecar_path(path).unlink()
    assert load_cached_engine(path, KEY) is None


@pytest.fixture
def fake_tensorrt(monkeypatch):
    """TensorRT and the GPU as the cache logic sees them: a version, an identity, a build."""
    box = SimpleNamespace(trt=SimpleNamespace(__version__="10.3.0"), gpu=ORIN_NANO_8GB, builds=[])

    def fake_build(onnx_bytes, precision, *, max_batch):
        box.builds.append((box.trt.__version__, box.gpu.sm_count, precision))
        return f"plan for {box.trt.__version__} on {box.gpu.sm_count} SMs".encode()

    monkeypatch.setattr(trt_engine, "_import_tensorrt", lambda: box.trt)
    monkeypatch.setattr(trt_engine, "query_gpu", lambda: box.gpu)
    monkeypatch.setattr(trt_engine, "build_engine", fake_build)
    return box


def test_load_or_build_rebuilds_a_mismatched_cache(tmp_path, fake_tensorrt):
    def load() -> bytes:
        return trt_engine.load_or_build_engine(b"onnx", "fp16", cache_dir=tmp_path, stem="fan.msn")

    assert load() == b"plan for 10.3.0 on 8 SMs"
    assert load() == b"plan for 10.3.0 on 8 SMs"
    assert fake_tensorrt.builds == [("10.3.0", 8, "fp16")]  # the second run: from the cache
    fake_tensorrt.trt.__version__ = "10.7.0"  # TensorRT upgraded on the box
    assert load() == b"plan for 10.7.0 on 8 SMs"
    fake_tensorrt.gpu = GpuIdentity("Orin", "8.7", 16, 62_800)  # the cache moved to an AGX
    assert load() == b"plan for 10.7.0 on 16 SMs"
    assert len(fake_tensorrt.builds) == 3
    assert len(list(tmp_path.glob("fan.msn.fp16.*.engine"))) == 3


def test_a_matching_plan_that_does_not_deserialize_is_rebuilt(tmp_path, fake_tensorrt, caplog):
    loaded = []

    def load(plan: bytes) -> str:
        if plan.startswith(b"stale"):  # what TensorRT says of a plan it cannot read
            raise trt_engine.EngineLoadError("TensorRT could not deserialize it")
        loaded.append(plan)
        return "engine"

    key = trt_engine.current_engine_key(b"onnx", "fp16")
    path = cache_path(tmp_path, "fan.msn", key)
    save_cached_engine(path, key, b"stale plan, right key")

    def open_engine():
        return trt_engine.open_cached_engine(
            b"onnx", "fp16", load, cache_dir=tmp_path, stem="fan.msn"
        )

    with caplog.at_level(logging.WARNING, logger="msn_edge.runtime.tensorrt_engine"):
        assert open_engine() == "engine"
    assert "matches this TensorRT and GPU but TensorRT could not deserialize it" in caplog.text
    assert loaded == [b"plan for 10.3.0 on 8 SMs"] and len(fake_tensorrt.builds) == 1
    assert load_cached_engine(path, key) == b"plan for 10.3.0 on 8 SMs"  # replaced in the cache
    assert open_engine() == "engine" and len(fake_tensorrt.builds) == 1  # now from the cache

    def broken(plan: bytes) -> str:  # a fresh build that does not load either: an error
        raise trt_engine.EngineLoadError("TensorRT could not deserialize it")

    with pytest.raises(BackendError, match="could not deserialize"):
        trt_engine.open_cached_engine(b"other", "fp16", broken, cache_dir=tmp_path, stem="x")


def test_tensorrt_8_is_refused_with_the_jetpack_to_use(fake_tensorrt):
    fake_tensorrt.trt.__version__ = "8.6.2"
    with pytest.raises(BackendError, match=r"TensorRT 8\.6\.2 is too old.*JetPack 6\.1 or 6\.2"):
        trt_engine.current_engine_key(b"onnx", "fp32")


def test_precision_plan_for_tensorrt_10_and_11():
    assert precision_plan("fp32", weak_typing=True) == trt_engine.BuildPlan(True, ())
    assert precision_plan("fp16", weak_typing=True) == trt_engine.BuildPlan(False, ("FP16",))
    assert precision_plan("int8", weak_typing=True) == trt_engine.BuildPlan(False, ("INT8",))
    assert precision_plan("fp32", weak_typing=False) == trt_engine.BuildPlan(True, ())
    assert precision_plan("int8", weak_typing=False) == trt_engine.BuildPlan(True, ())
    with pytest.raises(BackendError, match=r"TensorRT >= 11 .* fp16 ONNX model"):
        precision_plan("fp16", weak_typing=False)


def test_native_tensorrt_without_the_package(toy, monkeypatch):
    if not engines.module_missing("tensorrt"):
        pytest.skip("tensorrt is installed here")
    with pytest.raises(
        BackendError,
        match=r"tensorrt not installed \(pip install msn-edge\[tensorrt\]; on a Jetson",
    ):
        trt_engine.TensorRTEngine.from_bundle(toy)
