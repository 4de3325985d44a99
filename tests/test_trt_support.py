"""The static TensorRT 10 parser check: passes our graphs, rejects what TensorRT cannot take."""

import re

import numpy as np
import onnx
import pytest
from export_helpers import exported_bundle
from onnx import TensorProto, helper, numpy_helper

from msn_edge.export.trt_support import tensorrt_problems


def model(nodes, inputs, outputs, inits=(), opset=18):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def tensor(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


X = tensor("x", [1, 4, 8, 8])
Y = tensor("y", None)


def test_a_plain_graph_passes():
    w = numpy_helper.from_array(np.ones((4, 4, 3, 3), np.float32), "w")
    axes = numpy_helper.from_array(np.array([2, 3], np.int64), "axes")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("MaxPool", ["c"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("ReduceMean", ["p", "axes"], ["y"]),
    ]
    assert tensorrt_problems(model(nodes, [X], [Y], [w, axes])) == []


def const(name, value, dtype):
    return numpy_helper.from_array(np.array(value, dtype), name)


SCALE = const("s", 0.1, np.float32)
CASES = {
    "unsupported op": (
        [helper.make_node("Unique", ["x"], ["y"])],
        [],
        "Unique.*not supported by TensorRT",
    ),
    "unknown op": ([helper.make_node("Foo", ["x"], ["y"])], [], "not in TensorRT's support matrix"),
    "custom domain": (
        [helper.make_node("Relu", ["x"], ["y"], domain="com.example")],
        [],
        "custom domain 'com.example' needs a TensorRT plugin",
    ),
    "dilated pooling": (
        [helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], dilations=[2, 2])],
        [],
        "dilations other than 1",
    ),
    "pooling indices": (
        [
            helper.make_node("MaxPool", ["x"], ["y", "i"], kernel_shape=[2, 2]),
        ],
        [],
        "the Indices output",
    ),
    "1-D pooling": (
        [helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2])],
        [],
        "1-D pooling",
    ),
    "runtime reduce axes": (
        [
            helper.make_node("Shape", ["x"], ["shape"], start=2),
            helper.make_node("ReduceMean", ["x", "shape"], ["y"]),
        ],
        [],
        "axes that is not a constant",
    ),
    "runtime slice axes": (
        [
            helper.make_node("Shape", ["x"], ["shape"], start=3),
            helper.make_node("Slice", ["x", "starts", "ends", "shape"], ["y"]),
        ],
        [const("starts", [0], np.int64), const("ends", [4], np.int64)],
        r"node 'y' \(Slice\): axes that is not a constant is not supported",
    ),
    "runtime pad axes": (
        [
            helper.make_node("Shape", ["x"], ["shape"], start=3),
            helper.make_node("Pad", ["x", "pads", "", "shape"], ["y"]),
        ],
        [const("pads", [1, 1], np.int64)],
        r"node 'y' \(Pad\): axes that is not a constant is not supported",
    ),
    "non-zero zero point": (
        [
            helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"]),
        ],
        [SCALE, const("zp", 3, np.int8)],
        "non-zero y_zero_point",
    ),
    "uint8 quantization": (
        [
            helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"]),
        ],
        [SCALE, const("zp", 0, np.uint8)],
        "tensor 'q' has type UINT8",
    ),
    "int32 dequantize (quantized bias)": (
        [helper.make_node("DequantizeLinear", ["b", "s", "zb"], ["y"])],
        [const("b", [5, -3], np.int32), SCALE, const("zb", 0, np.int32)],
        "DequantizeLinear.*INT32 input",
    ),
    "cubic resize": (
        [helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="cubic")],
        [const("scales", [1, 1, 2, 2], np.float32)],
        "mode cubic",
    ),
    "unsorted top-k": (
        [helper.make_node("TopK", ["x", "k"], ["y", "i"], sorted=0)],
        [const("k", [2], np.int64)],
        "sorted=0",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_unsupported_ops_and_attributes_are_rejected(case):
    nodes, inits, expected = CASES[case]
    problems = tensorrt_problems(model(nodes, [X], [Y], inits))
    assert any(re.search(expected, p) for p in problems), problems


def test_pad_and_slice_with_constant_or_default_axes_pass():
    nodes = [
        helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["s"]),  # initializer axes
        helper.make_node(
            "Constant", [], ["pad_axes"], value=numpy_helper.from_array(np.array([3], np.int64))
        ),
        helper.make_node("Pad", ["s", "pads", "", "pad_axes"], ["p"]),  # Constant-node axes
        helper.make_node("Slice", ["p", "starts", "ends"], ["y"]),  # no axes: all of them
    ]
    inits = [
        const("starts", [0], np.int64),
        const("ends", [4], np.int64),
        const("axes", [3], np.int64),
        const("pads", [1, 1], np.int64),
    ]
    assert tensorrt_problems(model(nodes, [X], [Y], inits)) == []


def test_opset_outside_tensorrt_10_range_is_rejected():
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    problems = tensorrt_problems(model(nodes, [X], [Y], opset=21))
    assert problems == ["opset 21: TensorRT 10 parses opsets 9 to 20"]


@pytest.mark.slow  # reads the shared --int8 export (export_helpers.exported_bundle)
def test_our_fp32_and_int8_graphs_pass(tmp_path_factory):
    exported = exported_bundle(tmp_path_factory)
    for member in ("model.onnx", "model.int8.onnx"):
        graph = onnx.load_from_string(exported.member(member))
        assert tensorrt_problems(graph) == [], member
