"""Where an ONNX model's time goes: ONNX Runtime's per-node profile, aggregated.

ONNX Runtime (SessionOptions.enable_profiling) writes one JSON event per executed node
with its duration and its input/output shapes. Summing those by op type and by node-name
prefix ("/m/scanning/encoder") shows whether the convolutions or the scan's data movement
dominate; the same shapes give the FLOPs of a window without onnx or torch installed.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from msn_edge.runtime.engines import require_onnxruntime
from msn_edge.runtime.ort_session import session_options

if TYPE_CHECKING:
    import onnxruntime as ort

KERNEL_SUFFIX = "_kernel_time"  # ORT's event for a node's compute (fences are separate)
NO_PATH = "(nodes without a module path)"
_CALL_SUFFIX = re.compile(r"_\d+$")  # torch.onnx names the k-th call of a module "name_k"
# Ops whose multiply-accumulates are counted (the convention of model.count_macs: conv and
# linear layers; element-wise ops, pooling and normalisation are left out), with the
# input that holds the conv weight or the matmul's left operand.
_CONV_WEIGHT = {"Conv": 1, "FusedConv": 1, "NhwcConv": 1, "ConvInteger": 1, "QLinearConv": 3}
_MATMUL_OPS = {"MatMul", "FusedMatMul", "MatMulInteger", "MatMulIntegerToFloat"}
_MATMUL_OPS |= {"QLinearMatMul", "QGemm"}  # left operand first; QGemm without transA
_GEMM_OPS = {"Gemm", "FusedGemm"}


@dataclass(frozen=True)
class OpTime:
    """One row of a breakdown: time per run, share of the kernel time, calls per run."""

    key: str
    ms: float
    share: float
    calls: float
    gflops: float | None = None  # achieved: the row's conv/linear FLOPs per run / its time


@dataclass(frozen=True)
class OpProfile:
    label: str  # what was profiled, e.g. "ort-cpu-fp32"
    runs: int  # profiled runs (warm-up excluded)
    batch: int
    opt_level: str
    threads: int
    run_ms: float  # mean wall time of a run (ORT's model_run event)
    kernel_ms: float  # mean sum of node kernel times per run
    flops: int | None  # conv and linear FLOPs of one run (None: not counted)
    by_op_type: list[OpTime]
    by_prefix: list[OpTime]
    by_node: list[OpTime]  # the slowest single nodes

    def to_dict(self) -> dict:
        return asdict(self)


def _shape(entry: dict) -> list[int]:
    (dims,) = entry.values()  # {"float": [1, 16, 257, 157]}
    return [int(d) for d in dims]


def node_flops(op: str, inputs: list[list[int]], outputs: list[list[int]]) -> int:
    """2 x multiply-accumulates of one executed node, from its shapes; 0 for other ops.

    Shapes are the logical ones ONNX Runtime reports, also for its blocked (NCHWc) and
    quantized kernels, as long as weights are not pre-packed (see `_session`). Per output
    element a conv does weight[1:] MACs (c_in/groups x kernel area), a matmul does K =
    the left operand's last dimension, a Gemm does size(B) / N whether or not B is
    transposed.
    """
    if not outputs or not outputs[0]:
        return 0
    out = math.prod(outputs[0])
    if op in _CONV_WEIGHT and len(inputs) > _CONV_WEIGHT[op]:
        return 2 * out * math.prod(inputs[_CONV_WEIGHT[op]][1:])
    if op in _MATMUL_OPS and inputs:
        return 2 * out * inputs[0][-1]
    if op in _GEMM_OPS and len(inputs) >= 2:
        return 2 * out * (math.prod(inputs[1]) // outputs[0][-1])
    return 0


def _read_events(session: ort.InferenceSession) -> list[dict]:
    path = Path(session.end_profiling())
    try:
        return json.loads(path.read_text())
    finally:
        path.unlink(missing_ok=True)


def _kept_node_events(events: list[dict], warmup: int) -> tuple[list[dict], list[float]]:
    """Kernel events of the runs after the first `warmup`, and those runs' durations (us)."""
    runs = sorted(
        (e["ts"], e["ts"] + e["dur"])
        for e in events
        if e.get("cat") == "Session" and e.get("name") == "model_run"
    )[warmup:]
    if not runs:
        return [], []
    kept = [
        e
        for e in events
        if e.get("cat") == "Node"
        and e["name"].endswith(KERNEL_SUFFIX)
        and any(lo <= e["ts"] <= hi for lo, hi in runs)
    ]
    return kept, [hi - lo for lo, hi in runs]


def name_prefix(node_name: str, depth: int) -> str:
    """'/scanning/encoder_3/net/net.0/Conv' -> '/scanning/encoder' at depth 2.

    Call suffixes ("encoder_3": the 4th box through the shared encoder) are dropped, so
    every call of a module adds up in one row; ONNX Runtime's fused nodes ("fused /...")
    group with their path. Nodes without a module path (made up by ONNX Runtime, or from
    an exporter that names nodes by op) share one row.
    """
    node_name = node_name.removeprefix("fused ")
    if not node_name.startswith("/"):
        return NO_PATH
    parts = [_CALL_SUFFIX.sub("", p) for p in node_name.strip("/").split("/")]
    return "/" + "/".join(parts[: min(depth, len(parts) - 1) or 1])


class _View:
    """One way of summing node events: microseconds, calls and FLOPs per key."""

    def __init__(self) -> None:
        self.us: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.flops: dict[str, int] = defaultdict(int)

    def rows(self, runs: int, top: int | None) -> list[OpTime]:
        total = sum(self.us.values()) or 1.0
        rows = []
        for k in sorted(self.us, key=self.us.get, reverse=True)[:top]:
            ms = self.us[k] / runs / 1e3
            rate = self.flops[k] / ms / 1e6 if self.flops[k] and ms > 0 else None
            rows.append(OpTime(k, ms, self.us[k] / total, self.calls[k] / runs, rate))
        return rows


def feeds_by_rank(session: ort.InferenceSession, inputs: Sequence[np.ndarray]) -> dict:
    """Map arrays to the session's input names by rank (the spectrogram is the rank-3 one)."""
    by_rank = {a.ndim: a for a in inputs}
    return {i.name: by_rank[len(i.shape)] for i in session.get_inputs()}


def _session(
    model: bytes | str,
    threads: int,
    opt_level: str,
    providers: list[str] | None,
    tmp: str,
    *,
    keep_weight_shapes: bool = False,
) -> ort.InferenceSession:
    opts = session_options(
        threads=threads,
        opt_level=opt_level,
        profile_prefix=Path(tmp) / "ort_profile",
        disable_prepacking=keep_weight_shapes,  # pre-packed weights lose their input shapes
    )
    providers = providers or ["CPUExecutionProvider"]
    return require_onnxruntime().InferenceSession(model, opts, providers=providers)


def profile_model(
    model: bytes | str,
    inputs: Sequence[np.ndarray],
    *,
    threads: int,
    runs: int = 5,
    warmup: int = 2,
    opt_level: str = "all",
    prefix_depth: int = 2,
    top_nodes: int = 15,
    providers: list[str] | None = None,
    label: str = "model",
    count_flops: bool = True,
) -> OpProfile:
    """Profile `runs` runs (after `warmup`) and aggregate node time three ways.

    With `count_flops`, rows also get their achieved GFLOP/s: FLOPs from one more run of
    the same optimised graph with weight pre-packing off, so that shapes are visible.
    """
    if runs < 1:
        raise ValueError(f"runs must be at least 1, got {runs}")
    with tempfile.TemporaryDirectory() as tmp:
        session = _session(model, threads, opt_level, providers, tmp)
        feeds = feeds_by_rank(session, inputs)
        for _ in range(warmup + runs):
            session.run(None, feeds)
        events = _read_events(session)
    kept, run_us = _kept_node_events(events, warmup)
    node_flops_of = node_flops_table(model, inputs, opt_level) if count_flops else {}
    keys_of = {}  # node -> (its op type, its prefix, its own row): the three views
    for e in kept:
        name = e["name"][: -len(KERNEL_SUFFIX)]
        op = e["args"]["op_name"]
        keys_of[name] = (op, name_prefix(name, prefix_depth), f"{name} ({op})")
    views = [_View() for _ in range(3)]
    for e in kept:
        for view, key in zip(views, keys_of[e["name"][: -len(KERNEL_SUFFIX)]], strict=True):
            view.us[key] += e["dur"]
            view.calls[key] += 1
    for name, keys in keys_of.items():  # FLOPs are per run: once per node
        for view, key in zip(views, keys, strict=True):
            view.flops[key] += node_flops_of.get(name, 0)
    n = len(run_us)
    op_rows, prefix_rows, node_rows = (
        v.rows(n, top) for v, top in zip(views, (None, None, top_nodes), strict=True)
    )
    return OpProfile(
        label=label,
        runs=n,
        batch=inputs[0].shape[0],
        opt_level=opt_level,
        threads=threads,
        run_ms=sum(run_us) / n / 1e3,
        kernel_ms=sum(views[0].us.values()) / n / 1e3,
        flops=sum(node_flops_of.values()) or None,
        by_op_type=op_rows,
        by_prefix=prefix_rows,
        by_node=node_rows,
    )


def node_flops_table(
    model: bytes | str, inputs: Sequence[np.ndarray], opt_level: str = "disable"
) -> dict[str, int]:
    """FLOPs of every conv / linear node of one run on `inputs`, keyed by node name.

    At the opt level of a timed profile the names are those of the nodes it timed:
    pre-packing is a kernel detail, not a graph rewrite, so switching it off renames nothing.
    """
    with tempfile.TemporaryDirectory() as tmp:
        session = _session(model, 1, opt_level, None, tmp, keep_weight_shapes=True)
        session.run(None, feeds_by_rank(session, inputs))
        events = _read_events(session)
    table = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith(KERNEL_SUFFIX):
            args = e["args"]
            flops = node_flops(
                args["op_name"],
                [_shape(s) for s in args.get("input_type_shape", [])],
                [_shape(s) for s in args.get("output_type_shape", [])],
            )
            if flops:
                table[e["name"][: -len(KERNEL_SUFFIX)]] = flops
    return table


def graph_flops(model: bytes | str, inputs: Sequence[np.ndarray]) -> int:
    """FLOPs (2 x MACs of conv and linear nodes) of one run on `inputs`, graph unoptimised."""
    return sum(node_flops_table(model, inputs).values())


def _table(title: str, rows: list[OpTime]) -> list[str]:
    with_flops = any(r.gflops for r in rows)
    extra = " GFLOP/s |" if with_flops else ""
    lines = [f"| {title} | ms per run | share | calls per run |{extra}"]
    lines.append("|---|---:|---:|---:|" + ("---:|" if with_flops else ""))
    for r in rows:
        cells = f"| {r.key} | {r.ms:.2f} | {100 * r.share:.1f} % | {r.calls:g} |"
        if with_flops:
            cells += f" {r.gflops:.1f} |" if r.gflops else " – |"
        lines.append(cells)
    return lines + [""]


def format_profile(p: OpProfile, top: int = 12) -> str:
    """Markdown: the op-type, prefix and slowest-node breakdowns of one profile."""
    head = (
        f"Per-op profile of {p.label}: batch {p.batch}, {p.threads} threads, graph "
        f"optimisation '{p.opt_level}', {p.runs} runs: {p.run_ms:.1f} ms per run, of which "
        f"{p.kernel_ms:.1f} ms in node kernels"
        + (
            f"; {p.flops / 1e9:.3g} GFLOP, {p.flops / p.run_ms / 1e6:.1f} GFLOP/s."
            if p.flops
            else "."
        )
    )
    lines = [head, ""]
    lines += _table("op type", p.by_op_type[:top])
    if any(r.key != NO_PATH for r in p.by_prefix):
        lines += _table("node-name prefix", p.by_prefix[:top])
    lines += _table("slowest nodes", p.by_node[:top])
    return "\n".join(lines)
