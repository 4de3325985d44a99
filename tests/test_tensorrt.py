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
