"""runtime.ort_session: the one place ONNX Runtime session options are built."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from msn_edge.runtime.ort_session import LOG_ERRORS_ONLY, OPT_LEVELS, session_options


def test_defaults_are_the_engines_settings():
    opts = session_options()
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert opts.intra_op_num_threads == 0  # ONNX Runtime's default: every physical core
    assert opts.inter_op_num_threads == 1
    assert opts.log_severity_level == LOG_ERRORS_ONLY == 3
    assert not opts.enable_profiling
    with pytest.raises(RuntimeError, match="does not have configuration"):
        opts.get_session_config_entry("session.disable_prepacking")  # prepacking stays on


@pytest.mark.parametrize("name", list(OPT_LEVELS))
def test_every_optimisation_level_by_name(name):
    level = session_options(opt_level=name).graph_optimization_level
    assert level == getattr(ort.GraphOptimizationLevel, OPT_LEVELS[name])


def test_threads_profiling_and_prepacking(tmp_path):
    opts = session_options(threads=3, profile_prefix=tmp_path / "p", disable_prepacking=True)
    assert opts.intra_op_num_threads == 3
    assert opts.enable_profiling and opts.profile_file_prefix == str(tmp_path / "p")
    assert opts.get_session_config_entry("session.disable_prepacking") == "1"


def test_unknown_level_names_the_choices():
    with pytest.raises(ValueError, match="unknown optimisation level 'fast'.*'extended'"):
        session_options(opt_level="fast")


def _int8_conv_at_full_scale(k: int = 64) -> tuple[bytes, np.ndarray, float]:
    """A Q/DQ 1x1 conv (what the int8 export makes) whose u8 x s8 products all sit at full
    scale: 255 x 127, summed over k input channels. Pairs of them overflow the 16-bit
    intermediate of x86 CPUs without VNNI (2 x 255 x 127 > 32767)."""
    x_scale, w_scale = 1.0 / 255, 1.0 / 127
    exact = k * 1.0 * 1.0  # every input 1.0 (u8 255), every weight 1.0 (s8 127)
    y_scale = exact / 200  # the exact sum quantizes to 200; a halved one to ~100
    init = [
        numpy_helper.from_array(np.full((4, k, 1, 1), 127, np.int8), "w_q"),
        numpy_helper.from_array(np.array(w_scale, np.float32), "w_s"),
        numpy_helper.from_array(np.array(0, np.int8), "w_z"),
        numpy_helper.from_array(np.array(x_scale, np.float32), "x_s"),
        numpy_helper.from_array(np.array(0, np.uint8), "x_z"),
        numpy_helper.from_array(np.array(y_scale, np.float32), "y_s"),
        numpy_helper.from_array(np.array(0, np.uint8), "y_z"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_s", "x_z"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "x_s", "x_z"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["wd"]),
        helper.make_node("Conv", ["xd", "wd"], ["c"]),
        helper.make_node("QuantizeLinear", ["c", "y_s", "y_z"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "y_s", "y_z"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "full_scale",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k, 1, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 1, 1])],
        init,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString(), np.ones((1, k, 1, 1), np.float32), exact


def test_int8_products_are_exact_on_every_x86_cpu():
    """Without VNNI, ONNX Runtime's default u8 x s8 kernels saturate pairs of products and
    this conv gives about half its value. The session options ask for exact products
    there. (A CPU with VNNI, or ARM, is exact either way: there the entry asserted below
    is what keeps a non-VNNI box right.)"""
    model, x, exact = _int8_conv_at_full_scale()
    opts = session_options()
    assert opts.get_session_config_entry("session.x64quantprecision") == "1"
    session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": x})
    np.testing.assert_allclose(y.ravel(), exact, rtol=0.01)
