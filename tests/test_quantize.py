"""INT8: a Q/DQ graph TensorRT can take, calibrated, and close to the fp32 model."""

import numpy as np
import onnx
import pytest
from export_helpers import exported_bundle
from onnx import numpy_helper

from msn_edge.checkpoint import load_checkpoint
from msn_edge.export.parity import cpu_engine, engine_embed, synthetic_windows
from msn_edge.export.quantize import quantize_int8
from msn_edge.runtime.bundle import read_bundle


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return exported_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def int8(exported):
    return onnx.load_from_string(exported.member("model.int8.onnx"))


def test_int8_graph_is_qdq_with_symmetric_per_channel_weights(int8):
    ops = [n.op_type for n in int8.graph.node]
    consts = {t.name: numpy_helper.to_array(t) for t in int8.graph.initializer}
    assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > 0
    assert not {"QLinearConv", "ConvInteger", "MatMulInteger"} & set(ops)
    conv_weights = 0
    for node in int8.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
            zero = consts[node.input[2]]
            assert zero.dtype == np.int8 and not zero.any(), node.name  # TensorRT: int8, zp 0
        if node.op_type == "DequantizeLinear" and node.input[0] in consts:
            weight = consts[node.input[0]]
            assert weight.dtype == np.int8
            if weight.ndim == 4:  # a conv kernel: one scale per output channel
                conv_weights += 1
                assert consts[node.input[1]].shape == (weight.shape[0],)
    assert conv_weights > 10
    assert {o.domain for o in int8.opset_import} == {""}
    assert {p.key: p.value for p in int8.metadata_props}["precision"] == "int8"


def test_int8_is_smaller_and_close_to_fp32(exported):
    bundle = read_bundle(exported.bundle)
    fp32, int8 = bundle.model_bytes("fp32"), bundle.model_bytes("int8")
    assert len(int8) < 0.5 * len(fp32)
    windows = synthetic_windows(bundle.frontend)[:3]
    a = engine_embed(cpu_engine(fp32), windows, bundle.frontend)
    b = engine_embed(cpu_engine(int8), windows, bundle.frontend)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    cosine = (a * b).sum(axis=1)
    # Random weights quantize worse than trained ones; still clearly the same embedding.
    assert cosine.min() > 0.8, cosine
    assert np.abs(a - b).max() > 1e-5  # it really is a different (quantized) model


def test_export_reports_int8_figures_side_by_side(exported):
    report = exported.manifest()["metadata"]["export"]
    q = report["int8"]
    assert 0 < q["size_ratio"] < 0.5 and q["fp32_ms"] > 0 and q["int8_ms"] > 0
    assert q["calibration_clips"] == 12  # every normal training clip of the run
    assert set(report["metrics"]) == {"fp32", "int8"}
    for values in report["metrics"].values():
        assert set(values) == {"auc", "pauc", "mean"}
        assert all(0.0 <= v <= 1.0 for v in values.values())
    for row in ("model.int8.onnx", "ONNX Runtime CPU, 1 window", "eval fp32", "eval int8"):
        assert f"| {row} |" in exported.stdout


def test_calibration_needs_windows(exported):
    run = load_checkpoint(exported.run)
    fp32 = onnx.load_from_string(exported.member("model.onnx"))
    with pytest.raises(ValueError, match="at least one window"):
        quantize_int8(fp32, [], run.config.frontend)
