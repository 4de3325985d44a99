"""INT8: Q/DQ graphs for TensorRT and for the CPU, calibrated, and close to the fp32 model."""

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from export_helpers import exported_bundle
from onnx import numpy_helper

from msn_edge.checkpoint import load_checkpoint
from msn_edge.cli import main
from msn_edge.export.pack import int8_not_recommended
from msn_edge.export.parity import cpu_engine, engine_embed, synthetic_windows
from msn_edge.export.quantize import Int8Config, quantize_int8
from msn_edge.runtime import cpu_features
from msn_edge.runtime.bundle import read_bundle, write_bundle
from msn_edge.runtime.cpu_features import WEIGHT_BITS_KEY
from msn_edge.runtime.engines import make_engine
from msn_edge.runtime.errors import BackendError


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return exported_bundle(tmp_path_factory)


def _qdq(model: onnx.ModelProto) -> tuple[list[np.ndarray], list[np.ndarray], int]:
    """Activation zero points, weight zero points, and per-channel conv weights."""
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    activations, weights, per_channel = [], [], 0
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 3:
            continue
        zero = consts[node.input[2]]
        if node.input[0] in consts:  # a DequantizeLinear of a stored weight
            weights.append(zero)
            weight = consts[node.input[0]]
            assert weight.dtype == np.int8
            if weight.ndim == 4:  # a conv kernel: one scale per output channel
                per_channel += 1
                assert consts[node.input[1]].shape == (weight.shape[0],)
        else:
            activations.append(zero)
    return activations, weights, per_channel


def _common_checks(model: onnx.ModelProto, target: str) -> None:
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > 0
    assert not {"QLinearConv", "ConvInteger", "MatMulInteger"} & set(ops)  # Q/DQ form only
    assert {o.domain for o in model.opset_import} == {""}
    props = {p.key: p.value for p in model.metadata_props}
    assert (props["precision"], props["int8_target"]) == ("int8", target)


@pytest.mark.slow  # reads the shared --int8 export (export_helpers.exported_bundle)
def test_tensorrt_int8_is_symmetric_int8_throughout(exported):
    model = onnx.load_from_string(exported.member("model.int8.onnx"))
    _common_checks(model, "tensorrt")
    activations, weights, per_channel = _qdq(model)
    for zero in activations + weights:  # TensorRT: type int8, zero point 0
        assert zero.dtype == np.int8 and not zero.any()
    assert per_channel > 10 and len(activations) > 10


@pytest.mark.slow  # reads the shared --int8 export (export_helpers.exported_bundle)
def test_cpu_int8_has_uint8_activations_with_zero_points(exported):
    model = onnx.load_from_string(exported.member("model.int8-cpu.onnx"))
    _common_checks(model, "cpu")
    activations, weights, per_channel = _qdq(model)
    assert activations and all(z.dtype == np.uint8 for z in activations)
    # Asymmetric: post-ReLU tensors put their zero point at 0, others inside the range.
    values = {int(z) for z in activations}
    assert 0 in values and len(values) > 2, values
    assert all(z.dtype == np.int8 and not z.any() for z in weights)  # weights stay symmetric
    assert per_channel > 10


@pytest.mark.slow  # reads the shared --int8 export (export_helpers.exported_bundle)
def test_cpu_int8_weights_have_7_bits_and_say_so(exported):
    """2 x 255 x 64 fits the 16-bit sum of x86 CPUs without VNNI; 2 x 255 x 127 does not."""
    bits = {}
    for member in ("model.int8-cpu.onnx", "model.int8.onnx"):
        model = onnx.load_from_string(exported.member(member))
        consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        stored = [
            consts[n.input[0]]
            for n in model.graph.node
            if n.op_type == "DequantizeLinear" and n.input[0] in consts
        ]
        bits[member] = (
            max(int(np.abs(w.astype(np.int16)).max()) for w in stored),
            {p.key: p.value for p in model.metadata_props}[WEIGHT_BITS_KEY],
        )
    assert bits["model.int8-cpu.onnx"] == (64, "7")
    assert bits["model.int8.onnx"] == (127, "8")  # TensorRT: GPUs do not saturate


@pytest.mark.slow  # reads the shared --int8 export (export_helpers.exported_bundle)
def test_an_8_bit_cpu_int8_model_is_refused_on_an_x86_without_vnni(exported, tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_features, "x86_without_vnni", lambda *_: True)
    bundle = read_bundle(exported.bundle)
    make_engine(bundle, "cpu", precision="int8")  # 7-bit weights: fine on any CPU
    # A bundle with only the TensorRT form (8-bit weights) makes the CPU run that one.
    old = write_bundle(
        tmp_path / "tensorrt_only.msn",
        model_onnx=bundle.model_bytes("fp32"),
        model_int8_onnx=bundle.model_bytes("int8"),
        prototypes=bundle.prototypes,
        groups=bundle.groups,
        frontend=bundle.frontend,
        trained_on=bundle.manifest["trained_on"],
    )
    with pytest.raises(BackendError, match="no VNNI.*scores would be wrong"):
        make_engine(read_bundle(old), "cpu", precision="int8")
    make_engine(read_bundle(old), "cpu", precision="fp32")  # fp32 is never refused
    # What a technician sees: one line, no traceback, no score, a failing exit status.
    clip = next((exported.data / "fan" / "test").glob("*.wav"))
    args = ["score", str(old), str(clip), "--backend", "cpu", "--precision", "int8"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    assert "no VNNI" in result.stderr and "Traceback" not in result.output
    assert result.stdout == ""


@pytest.mark.parametrize("variant", ["int8", "int8-cpu"])
@pytest.mark.slow  # reads the shared --int8 export (export_helpers.exported_bundle)
def test_int8_is_smaller_and_close_to_fp32(exported, variant):
    bundle = read_bundle(exported.bundle)
    fp32, int8 = bundle.model_bytes("fp32"), bundle.model_bytes(variant)
    assert len(int8) < 0.5 * len(fp32)
    windows = synthetic_windows(bundle.frontend)[:3]
    a = engine_embed(cpu_engine(fp32), windows, bundle.frontend)
    b = engine_embed(cpu_engine(int8), windows, bundle.frontend)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    cosine = (a * b).sum(axis=1)
    # Random weights quantize worse than trained ones; still clearly the same embedding.
    assert cosine.min() > 0.8, cosine
    assert np.abs(a - b).max() > 1e-5  # it really is a different (quantized) model


@pytest.mark.slow  # reads the shared --int8 export (export_helpers.exported_bundle)
def test_cpu_backend_runs_the_cpu_int8_model(exported):
    bundle = read_bundle(exported.bundle)
    windows = synthetic_windows(bundle.frontend)[:2]
    chosen = engine_embed(make_engine(bundle, "cpu", precision="int8"), windows, bundle.frontend)
    for variant, same in (("int8-cpu", True), ("int8", False)):
        direct = engine_embed(cpu_engine(bundle.model_bytes(variant)), windows, bundle.frontend)
        assert np.array_equal(chosen, direct) is same, variant


@pytest.mark.slow  # reads the shared --int8 export (export_helpers.exported_bundle)
def test_export_reports_int8_figures_side_by_side(exported):
    report = exported.manifest()["metadata"]["export"]
    q = report["int8"]
    assert q["fp32_ms"] > 0
    assert q["calibration_clips"] == 12  # every normal training clip of the run
    assert set(q["models"]) == {"int8", "int8-cpu"}
    for variant, m in q["models"].items():
        assert m["member"] == f"model.{variant}.onnx"
        assert m["onnx_bytes"] == len(exported.member(m["member"]))
        assert 0 < m["size_ratio"] < 0.5 and m["ms"] > 0
        assert m["speedup"] == pytest.approx(q["fp32_ms"] / m["ms"])
        assert 0.8 < m["vs_fp32"]["min_cosine"] < 1.0
    assert set(report["metrics"]) == {"fp32", "int8", "int8-cpu"}
    for values in report["metrics"].values():
        assert set(values) == {"auc", "pauc", "mean"}
        assert all(0.0 <= v <= 1.0 for v in values.values())
    rows = ("model.int8-cpu.onnx (ONNX Runtime CPU)", "model.int8.onnx (TensorRT; here on")
    for row in (*rows, "int8 calibration", "eval fp32", "eval int8-cpu", "eval int8"):
        assert f"| {row}" in exported.stdout


@pytest.mark.slow  # reads the shared --int8 export (export_helpers.exported_bundle)
def test_calibration_needs_windows(exported):
    run = load_checkpoint(exported.run)
    fp32 = onnx.load_from_string(exported.member("model.onnx"))
    with pytest.raises(ValueError, match="at least one window"):
        quantize_int8(fp32, [], run.config.frontend)


def test_int8_losing_auc_is_marked_not_recommended():
    metrics = {
        "fp32": {"auc": 0.90, "pauc": 0.80},
        "int8-cpu": {"auc": 0.895, "pauc": 0.79},  # within 1 point: recommended
        "int8": {"auc": 0.55, "pauc": 0.50},
    }
    marked = int8_not_recommended(metrics, max_drop=0.01)
    assert list(marked) == ["int8"]
    assert marked["int8"].startswith("AUC 35.0 points below fp32's (55.00 vs 90.00")
    assert int8_not_recommended(metrics, max_drop=0.5) == {}
    assert int8_not_recommended({"fp32": {"auc": 0.9}}, max_drop=0.0) == {}


@pytest.mark.parametrize("target", ["cpu", "tensorrt"])
@pytest.mark.slow  # reads the shared --int8 export (export_helpers.exported_bundle)
def test_calibration_on_a_window_count_no_batch_divides(exported, target):
    # 5 windows: batches of 4 would leave a last batch of 1, which onnxruntime's
    # histogram calibrator cannot stack (a run with 10 training clips failed this way).
    run = load_checkpoint(exported.run)
    fp32 = onnx.load_from_string(exported.member("model.onnx"))
    windows = synthetic_windows(run.config.frontend)[:5]
    assert len(windows) == 5
    model = quantize_int8(fp32, windows, run.config.frontend, Int8Config(target=target))
    assert {p.key: p.value for p in model.metadata_props}["int8_target"] == target


def test_int8_timing_pauses_once_per_model(tmp_path, monkeypatch):
    # The int8 speed ratio times each model in one run of calls, after one pause for the
    # previous model's spinning threads: an --int8 export pauses 3 times, not 33 (6.6 s).
    from toy_bundle import make_toy_bundle

    from msn_edge.export import report

    bundle = read_bundle(make_toy_bundle(tmp_path / "toy.msn"))
    pauses: list[float] = []
    monkeypatch.setattr(report.time, "sleep", pauses.append)
    fe = bundle.frontend
    models = {"fp32": bundle.model_bytes("fp32"), "again": bundle.model_bytes("fp32")}
    ms = report.latencies_ms(models, np.zeros(fe.window_samples, np.float32), fe, threads=1)
    assert set(ms) == set(models) and all(v > 0 for v in ms.values())
    assert pauses == [report.ORT_THREADS_IDLE_S] * len(models)
