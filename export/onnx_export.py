"""Export a trained MSN to ONNX: the gather rewrite, dynamic batch, checked, with metadata.

Exporter: torch.onnx's dynamo exporter (torch.export + ONNX Script), chosen on purpose.
It is the maintained path (the TorchScript exporter is deprecated since torch 2.9 and
warns on every call), it translates `index_select` to one Gather with the index vector
stored once as an initializer, and its optimiser folds constants and removes the shape
arithmetic the TorchScript exporter leaves behind (about 400 nodes for tiny where
TorchScript gives about 850), which keeps the TensorRT parser on plain layers. Its cost
is export time (tens of seconds on 2 cores).

Opset 18: the newest opset TensorRT 10.0 (JetPack 6) parses is 20 and ONNX Runtime
>= 1.14 runs 18; 18 is the first opset where every Reduce op takes `axes` as an input,
so the graph has one form for them. The IR version is pinned to 8 (the IR of the onnx
release that introduced opset 18), which every ONNX Runtime msn-edge supports (>= 1.17)
and TensorRT 10's parser reads.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import torch

from msn_edge.export.scan import ExportableMSN
from msn_edge.model import MSN
from msn_edge.runtime.version import __version__

OPSET = 18
IR_VERSION = 8
INPUT_NAMES = ("spectrogram", "spectrum")
OUTPUT_NAME = "embedding"
BATCH_DIM = "batch"
_EXAMPLE_BATCH = 2  # torch.export specialises sizes 0 and 1; 2 keeps the batch symbolic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GraphStats:
    """What an exported graph holds: for the export report and the size check."""

    nodes: int
    ops: dict[str, int]  # op type -> count, most frequent first
    onnx_bytes: int  # serialised model
    initializer_bytes: int  # weights, BN statistics, index vectors
    parameters: int  # trainable parameters of the torch model
    parameter_bytes: int  # their float32 bytes

    @property
    def size_ratio(self) -> float:
        """ONNX file bytes / parameter bytes: ~1 means the weights are stored once."""
        return self.onnx_bytes / self.parameter_bytes


def graph_stats(proto: onnx.ModelProto, model: MSN) -> GraphStats:
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    params = sum(p.numel() for p in model.parameters())
    weights = sum(
        int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        for t in proto.graph.initializer
    )
    return GraphStats(
        nodes=len(proto.graph.node),
        ops=dict(ops.most_common()),
        onnx_bytes=proto.ByteSize(),
        initializer_bytes=weights,
        parameters=params,
        parameter_bytes=4 * params,
    )


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter logs missing optional packages (torchvision) and warns about dim names."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _name_batch_dims(proto: onnx.ModelProto) -> None:
    """Call the symbolic batch dimension of every graph input and output `batch`."""
    for value in [*proto.graph.input, *proto.graph.output]:
        dim = value.type.tensor_type.shape.dim[0]
        if not dim.dim_param:
            raise RuntimeError(f"export gave {value.name} a fixed batch of {dim.dim_value}")
        dim.dim_param = BATCH_DIM


def _strip_node_metadata(proto: onnx.ModelProto) -> None:
    """Drop the exporter's per-node provenance (module paths, source lines): ~20 % of the
    file for tiny, and it would publish the exporting machine's file paths."""
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""


def export_onnx(model: MSN, metadata: Mapping[str, str] | None = None) -> onnx.ModelProto:
    """The ONNX model of a trained MSN: (spectrogram, spectrum) -> unit `embedding`.

    The graph is checked with `onnx.checker.check_model(full_check=True)`; `metadata` is
    added to its metadata_props beside the msn-edge version and opset.
    """
    cfg = model.cfg
    twin = ExportableMSN.from_trained(model)
    example = (
        torch.zeros(_EXAMPLE_BATCH, cfg.n_freq, cfg.n_frames),
        torch.zeros(_EXAMPLE_BATCH, cfg.spectrum_bins),
    )
    batch = torch.export.Dim(BATCH_DIM)
    with _quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            twin,
            example,
            dynamo=True,
            opset_version=OPSET,
            input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME],
            dynamic_shapes={"spectrogram": {0: batch}, "spectrum": {0: batch}},
            optimize=True,
            verbose=False,
        )
    proto = program.model_proto
    proto.ir_version = IR_VERSION
    _strip_node_metadata(proto)
    _name_batch_dims(proto)
    props = {
        "msn_edge_version": __version__,
        "opset": str(OPSET),
        "exporter": f"torch.onnx dynamo (torch {torch.__version__})",
        **(metadata or {}),
    }
    onnx.helper.set_model_props(proto, props)
    proto.doc_string = "MSN anomalous sound detector: unit-length embedding of one window"
    onnx.checker.check_model(proto, full_check=True)
    return proto
