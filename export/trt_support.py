"""Static check that TensorRT 10's ONNX parser takes a graph, for CI machines without a GPU.

The table is onnx-tensorrt's operator support matrix, docs/operators.md
(https://github.com/onnx/onnx-tensorrt/blob/main/docs/operators.md, the TensorRT 10.x
release branches): the operators marked Y, and the restrictions column turned into
checks where it names an attribute or input we can see in the graph (e.g. the `axes` of
Pad, Slice, Squeeze and Unsqueeze must be initializers; a Constant node counts, as the
parser folds it into one). The opset range is the one TensorRT 10.0, the oldest TensorRT
10, states there: opset 9 to 20. On a Jetson that means JetPack 6.1 or 6.2 (TensorRT
10.3); JetPack 6.0 ships TensorRT 8.6, which msn-edge does not support (docs/jetson.md).
"Quantized types" (INT8 etc.) are allowed only as Quantize/DequantizeLinear data, and
UINT8 only as a network input or output, as the same page says. Operators newer than
opset 20 that later 10.x releases added (Attention, RMSNormalization, RotaryEmbedding,
TensorScatter) are left out: the oldest TensorRT 10 must take our graphs.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import numpy_helper

OPSET_RANGE = (9, 20)  # TensorRT 10.0: "opset 9 to opset 20"
STANDARD_DOMAINS = ("", "ai.onnx")


def _names(text: str) -> frozenset[str]:
    return frozenset(text.split())


_REDUCE = _names(
    """
    ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin
    ReduceProd ReduceSum ReduceSumSquare
    """
)
_SUPPORTED_PLAIN = _names(
    """
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh BatchNormalization
    BlackmanWindow Cast CastLike Ceil Celu Clip Concat ConstantOfShape Conv
    ConvTranspose Cos Cosh DeformConv DepthToSpace Div Einsum Elu Equal Erf Exp Expand
    EyeLike Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool
    GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization GRU
    HammingWindow HannWindow HardSigmoid HardSwish Hardmax Identity If ImageScaler
    InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log
    LogSoftmax Loop LRN LpNormalization MatMul Max Mean MeanVarianceNormalization Min
    Mish Mod Mul Neg NonMaxSuppression NonZero Not Or ParametricSoftplus Pow PRelu
    RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal Relu
    Reshape ReverseSequence RNN RoiAlign Round ScaledTanh Scan Scatter ScatterElements
    Selu Shape Shrink Sigmoid Sign Sin Sinh Size Softmax Softplus Softsign
    SpaceToDepth Split Sqrt Sub Sum Tan Tanh ThresholdedRelu Tile Transpose Trilu
    Upsample Where Xor
    """
)
# Marked N in the matrix: named so the message says "not supported", not "unknown".
UNSUPPORTED = _names(
    """
    AffineGrid Bernoulli BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor Col2Im
    CenterCropPad Compress ConcatFromSequence ConvInteger DFT Det DynamicQuantizeLinear
    ImageDecoder MatMulInteger MaxRoiPool MaxUnpool MelWeightMatrix Multinomial
    NegativeLogLikelihoodLoss Optional OptionalGetElement OptionalHasElement QLinearConv
    QLinearMatMul RegexFullMatch SequenceAt SequenceConstruct SequenceEmpty
    SequenceErase SequenceInsert SequenceLength SequenceMap SoftmaxCrossEntropyLoss
    SplitToSequence StringConcat StringNormalizer StringSplit TfIdfVectorizer Unique
    """
)
T = onnx.TensorProto
# Tensor types the parser takes anywhere; int8 only through Q/DQ, uint8 only at the edges.
PLAIN_TYPES = {T.FLOAT, T.FLOAT16, T.BFLOAT16, T.DOUBLE, T.INT32, T.INT64, T.BOOL}
QUANTIZED_TYPES = {T.INT8, T.INT4, T.FLOAT8E4M3FN}
IO_ONLY_TYPES = {T.UINT8}
RESIZE_COORDS = {
    "half_pixel",
    "pytorch_half_pixel",
    "tf_half_pixel_for_nn",
    "asymmetric",
    "align_corners",
}
RESIZE_MODES = {"nearest", "linear"}
RESIZE_NEAREST = {"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"}
TOPK_MAX = 3840


class _Graph:
    """What the checks need to know about a graph: constants and tensor types."""

    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        self.constants = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        for node in g.node:
            if node.op_type == "Constant" and node.attribute[0].name == "value":
                self.constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        try:
            inferred = list(onnx.shape_inference.infer_shapes(model).graph.value_info)
        except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError):
            inferred = list(g.value_info)  # e.g. a custom domain: check the declared types
        self.types = {
            v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.output, *inferred]
        }
        self.types.update({t.name: t.data_type for t in g.initializer})
        self.io = {v.name for v in [*g.input, *g.output]}

    def constant(self, node: onnx.NodeProto, i: int) -> np.ndarray | None:
        """Input i of node if it is a build-time constant, else None (absent: empty array)."""
        if i >= len(node.input) or not node.input[i]:
            return np.array([])
        return self.constants.get(node.input[i])


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _pool(node, graph) -> str | None:
    kernel = _attr(node, "kernel_shape", [])
    if len(kernel) not in (2, 3):
        return f"{len(kernel)}-D pooling (only 2-D or 3-D)"
    if any(d != 1 for d in _attr(node, "dilations", [])):
        return "dilations other than 1"
    if node.op_type == "MaxPool" and len(node.output) > 1 and node.output[1]:
        return "the Indices output"
    return None


def _constant_input(i: int, what: str) -> Callable:
    def check(node, graph) -> str | None:
        return None if graph.constant(node, i) is not None else f"{what} that is not a constant"

    return check


def _zero_point(i: int, name: str) -> Callable:
    """Zero point must be a constant 0; its type (int8, not uint8) is checked with the rest."""

    def check(node, graph) -> str | None:
        zp = graph.constant(node, i)
        if zp is None:
            return f"{name} that is not a constant"
        return f"non-zero {name}" if zp.size and np.any(zp != 0) else None

    return check


def _dequantize(node, graph) -> str | None:
    elem = graph.types.get(node.input[0], T.UNDEFINED)
    if elem not in QUANTIZED_TYPES | {T.UNDEFINED}:
        kind = onnx.TensorProto.DataType.Name(elem)
        return f"a {kind} input (int8, int4 or fp8 only; keep biases float)"
    return _zero_point(2, "x_zero_point")(node, graph)


def _dropout(node, graph) -> str | None:
    training = graph.constant(node, 2)
    if training is None or (training.size and bool(training.reshape(-1)[0])):
        return "is_training that is not a constant False"
    return None


def _topk(node, graph) -> str | None:
    k = graph.constant(node, 1)
    if _attr(node, "sorted", 1) != 1:
        return "sorted=0"
    if k is None or not k.size or int(k.reshape(-1)[0]) >= TOPK_MAX:
        return f"K that is not a constant below {TOPK_MAX}"
    return None


def _resize(node, graph) -> str | None:
    coords = _text(_attr(node, "coordinate_transformation_mode", "half_pixel"))
    mode = _text(_attr(node, "mode", "nearest"))
    nearest = _text(_attr(node, "nearest_mode", "round_prefer_floor"))
    if coords not in RESIZE_COORDS:
        return f"coordinate_transformation_mode {coords}"
    if mode not in RESIZE_MODES:
        return f"mode {mode}"
    if mode == "nearest" and nearest not in RESIZE_NEAREST:
        return f"nearest_mode {nearest}"
    if _attr(node, "antialias", 0):
        return "antialiasing"
    return None


def _attr_equals(name: str, allowed) -> Callable:
    def check(node, graph) -> str | None:
        value = _attr(node, name)
        if value is not None and _text(value) != str(allowed):
            return f"{name}={_text(value)} (only {allowed})"
        return None

    return check


def _constant_node(node, graph) -> str | None:
    bad = {a.name for a in node.attribute} & {"sparse_value", "value_string", "value_strings"}
    return f"attribute {sorted(bad)[0]}" if bad else None


def _lstm(node, graph) -> str | None:
    for name in ("input_forget", "layout"):
        if _attr(node, name, 0) != 0:
            return f"{name}={_attr(node, name)} (only 0)"
    return None


def _reduce(node, graph) -> str | None:
    if _attr(node, "axes") is not None:  # opset < 18: axes is an attribute, always constant
        return None
    return _constant_input(1, "axes")(node, graph)


# Operator -> check returning the problem, or None. Restrictions from the matrix's last column.
CHECKS: dict[str, Callable | None] = {op: None for op in _SUPPORTED_PLAIN}
CHECKS.update({op: _reduce for op in _REDUCE})
CHECKS.update(
    {
        "AveragePool": _pool,
        "MaxPool": _pool,
        "LpPool": _pool,
        "Constant": _constant_node,
        "CumSum": _constant_input(1, "axis"),
        "Squeeze": _constant_input(1, "axes"),
        "Unsqueeze": _constant_input(1, "axes"),
        "Pad": _constant_input(3, "axes"),  # opset >= 18 (data, pads, constant_value, axes)
        "Slice": _constant_input(3, "axes"),  # opset >= 10 (data, starts, ends, axes, steps)
        "OneHot": _constant_input(1, "depth"),
        "QuantizeLinear": _zero_point(2, "y_zero_point"),
        "DequantizeLinear": _dequantize,
        "Dropout": _dropout,
        "TopK": _topk,
        "Resize": _resize,
        "ScatterND": _attr_equals("reduction", "none"),
        "LSTM": _lstm,
    }
)


def _type_problems(graph: _Graph, model: onnx.ModelProto) -> list[str]:
    quantized_ok = set()  # Q outputs, DQ inputs and both ops' zero points
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            quantized_ok.update(node.input[2:3])
        if node.op_type == "QuantizeLinear":
            quantized_ok.add(node.output[0])
        elif node.op_type == "DequantizeLinear":
            quantized_ok.add(node.input[0])
    problems = []
    for name, elem in sorted(graph.types.items()):
        if elem in PLAIN_TYPES or elem == T.UNDEFINED:
            continue
        if elem in QUANTIZED_TYPES and name in quantized_ok:
            continue
        if elem in IO_ONLY_TYPES and name in graph.io:
            continue
        kind = onnx.TensorProto.DataType.Name(elem)
        problems.append(f"tensor '{name}' has type {kind}, which TensorRT does not take there")
    return problems


def tensorrt_problems(model: onnx.ModelProto) -> list[str]:
    """Everything in `model` that TensorRT 10's ONNX parser would reject; [] if none."""
    problems = []
    opset = next((o.version for o in model.opset_import if o.domain in STANDARD_DOMAINS), None)
    lo, hi = OPSET_RANGE
    if opset is None or not lo <= opset <= hi:
        problems.append(f"opset {opset}: TensorRT 10 parses opsets {lo} to {hi}")
    graph = _Graph(model)
    for node in model.graph.node:
        where = f"node '{node.name or node.output[0]}' ({node.op_type})"
        if node.domain not in STANDARD_DOMAINS:
            problems.append(f"{where}: custom domain '{node.domain}' needs a TensorRT plugin")
        elif node.op_type in UNSUPPORTED:
            problems.append(f"{where}: operator not supported by TensorRT")
        elif node.op_type not in CHECKS:
            problems.append(f"{where}: operator not in TensorRT's support matrix")
        elif CHECKS[node.op_type] is not None:
            problem = CHECKS[node.op_type](node, graph)
            if problem:
                problems.append(f"{where}: {problem} is not supported by TensorRT")
    return problems + _type_problems(graph, model)
