"""TensorRT engines built at export: parity with ONNX Runtime and the runtime's cache.

These need tensorrt, cuda-python and an NVIDIA GPU; elsewhere they are skipped with the
reason. The static parser check (test_trt_support.py) covers the graphs everywhere.
"""

import numpy as np
import pytest
from export_helpers import exported_bundle

from msn_edge.export.parity import synthetic_windows
from msn_edge.runtime.bundle import read_bundle
from msn_edge.runtime.engines import available_backends
from msn_edge.runtime.frontend import features

REASON = available_backends()["tensorrt"]
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(REASON is not None, reason=f"TensorRT cannot run here: {REASON}"),
]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return read_bundle(exported_bundle(tmp_path_factory).bundle)


@pytest.mark.parametrize(
    ("precision", "member"), [("fp32", "fp32"), ("fp16", "fp32"), ("int8", "int8")]
)
def test_engine_matches_onnx_runtime_and_is_cached_for_the_runtime(
    bundle, tmp_path, precision, member
):
    from msn_edge.export.tensorrt import MIN_COSINE, build_checked_engine
    from msn_edge.runtime.tensorrt_engine import TensorRTEngine, load_or_build_engine

    windows = synthetic_windows(bundle.frontend)
    try:
        result = build_checked_engine(
            bundle.model_bytes(member),
            precision,
            frontend=bundle.frontend,
            prototypes=bundle.prototypes,
            windows=windows,
            n_real=0,
            cache_dir=tmp_path,
            stem=bundle.path.name,
        )
    except Exception as e:  # TensorRT >= 11 has no fp16 flag: the runtime refuses, says why
        if precision == "fp16" and "strongly typed" in str(e):
            pytest.skip(str(e))
        raise
    assert result.parity.min_cosine >= MIN_COSINE[precision]
    assert result.path.is_file() and result.path.with_name(result.path.name + ".json").is_file()
    # The runtime finds this engine in its cache instead of building another.
    before = result.path.stat().st_mtime_ns
    plan = load_or_build_engine(
        bundle.model_bytes(member), precision, cache_dir=tmp_path, stem=bundle.path.name
    )
    assert result.path.stat().st_mtime_ns == before
    engine = TensorRTEngine(plan, precision=precision)
    try:
        assert engine.embed(*features(np.stack(windows[:2]), bundle.frontend)).shape == (
            2,
            bundle.embedding_dim,
        )
    finally:
        engine.close()


def test_cached_plan_that_does_not_deserialize_is_rebuilt(bundle, tmp_path):
    """A plan under the right key that TensorRT cannot read is rebuilt, not fatal."""
    from msn_edge.runtime.engine_cache import cache_path, load_cached_engine, save_cached_engine
    from msn_edge.runtime.tensorrt_engine import TensorRTEngine, current_engine_key

    onnx_bytes = bundle.model_bytes("fp32")
    key = current_engine_key(onnx_bytes, "fp32")
    path = cache_path(tmp_path, bundle.path.name, key)
    save_cached_engine(path, key, b"not a TensorRT plan")  # sidecar and sha256 match
    engine = TensorRTEngine.from_bundle(bundle, precision="fp32", cache_dir=tmp_path)
    try:
        windows = synthetic_windows(bundle.frontend)[:2]
        emb = engine.embed(*features(np.stack(windows), bundle.frontend))
        assert emb.shape == (2, bundle.embedding_dim) and np.all(np.isfinite(emb))
    finally:
        engine.close()
    assert load_cached_engine(path, key) not in (None, b"not a TensorRT plan")


def test_host_buffers_are_page_locked_and_reused(bundle, tmp_path):
    from msn_edge.runtime.tensorrt_engine import TensorRTEngine, _import_cudart

    cudart = _import_cudart()
    engine = TensorRTEngine.from_bundle(bundle, precision="fp32", cache_dir=tmp_path)
    try:
        for name, view in engine._host.items():
            assert view.ctypes.data == int(engine._pinned[name])
            err, attrs = cudart.cudaPointerGetAttributes(view.ctypes.data)
            assert err == cudart.cudaError_t.cudaSuccess
            assert attrs.type == cudart.cudaMemoryType.cudaMemoryTypeHost, name
        windows = np.stack(synthetic_windows(bundle.frontend)[:3])
        spec, spectrum = features(windows, bundle.frontend)
        first = engine.embed(spec, spectrum)
        again = engine.embed(spec[:1], spectrum[:1])  # the buffers are reused, not aliased
        np.testing.assert_allclose(again[0], first[0], rtol=1e-5, atol=1e-6)
        assert first.shape == (3, bundle.embedding_dim)
    finally:
        engine.close()
