"""The export report: what an export measured, as the table the CLI prints and as the JSON
kept in the bundle's metadata; and the one timing it takes (int8 vs fp32 speed).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from msn_edge.evaluate import pct
from msn_edge.export.onnx_export import GraphStats
from msn_edge.export.parity import ParityReport, cpu_engine, engine_embed
from msn_edge.runtime.frontend import FrontendConfig
from msn_edge.runtime.ort_session import ORT_THREADS_IDLE_S

LATENCY_RUNS = 10  # timed single-window calls per model for the int8 speed ratio
INT8_ROLES = {"int8-cpu": "ONNX Runtime CPU", "int8": "TensorRT; here on ONNX Runtime CPU"}


@dataclass(frozen=True)
class Int8Model:
    """One int8 twin of the fp32 model, measured under ONNX Runtime on this CPU."""

    member: str  # the bundle member it is written to
    onnx_bytes: int
    size_ratio: float  # int8 / fp32 file size
    ms: float  # ONNX Runtime CPU, one window, median of LATENCY_RUNS
    vs_fp32: ParityReport  # measured, not enforced


@dataclass(frozen=True)
class Int8Report:
    fp32_ms: float  # the same timing for the fp32 model
    calibration_clips: int
    models: dict[str, Int8Model]  # bundle variant ("int8-cpu", "int8") -> figures

    def speedup(self, variant: str) -> float:
        return self.fp32_ms / self.models[variant].ms


@dataclass
class ExportReport:
    run: str
    bundle: str
    preset: str
    graph: GraphStats
    tensorrt_problems: list[str]
    parity: ParityReport
    int8: Int8Report | None = None
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # precision -> metric
    not_recommended: dict[str, str] = field(default_factory=dict)  # int8 variant -> why
    engine: dict | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["parity"] = self.parity.to_dict()
        if self.int8 is not None:
            for variant, m in self.int8.models.items():
                d["int8"]["models"][variant]["vs_fp32"] = m.vs_fp32.to_dict()
                d["int8"]["models"][variant]["speedup"] = self.int8.speedup(variant)
        d["graph"]["size_ratio"] = self.graph.size_ratio
        return json_safe(d)

    def to_markdown(self) -> str:
        g, p = self.graph, self.parity
        top_ops = ", ".join(f"{op} {n}" for op, n in list(g.ops.items())[:6])
        rows = [
            ("run", self.run),
            ("bundle", self.bundle),
            ("preset", self.preset),
            ("graph nodes", f"{g.nodes} ({top_ops}, ...)"),
            ("parameters", f"{g.parameters / 1e6:.2f} M ({_mb(g.parameter_bytes)} as float32)"),
            ("model.onnx", f"{_mb(g.onnx_bytes)} ({g.size_ratio:.3f} x the parameters)"),
            (
                "TensorRT 10 parser check",
                "passed" if not self.tensorrt_problems else "; ".join(self.tensorrt_problems[:3]),
            ),
            (
                "parity fp32: ONNX Runtime vs PyTorch",
                f"max embedding diff {p.max_abs_embedding:.2e} (limit {p.embedding_tol:g}), "
                f"max score diff {p.max_abs_score:.2e} (limit {p.score_tol:g}); "
                f"{p.n_real} real + {p.n_synthetic} synthetic windows",
            ),
        ]
        if self.int8 is not None:
            q = self.int8
            for variant, m in q.models.items():
                rows.append(
                    (
                        f"{m.member} ({INT8_ROLES[variant]})",
                        f"{_mb(m.onnx_bytes)} ({m.size_ratio:.2f} x fp32); 1 window "
                        f"{m.ms:.1f} ms vs fp32 {q.fp32_ms:.1f} ms (speed-up "
                        f"{q.speedup(variant):.2f}x); min cosine to fp32 "
                        f"{m.vs_fp32.min_cosine:.5f}, max score diff {m.vs_fp32.max_abs_score:.2e}",
                    )
                )
            rows.append(("int8 calibration", f"{q.calibration_clips} normal training clips"))
        for precision, values in self.metrics.items():
            text = ", ".join(f"{k} {pct(v)}" for k, v in values.items())
            rows.append((f"eval {precision}", text))
        if self.engine is not None:
            e = self.engine
            rows.append(
                (
                    f"TensorRT {e['precision']} engine",
                    f"{e['path']} (TensorRT {e['tensorrt_version']}, {e['gpu']}; "
                    f"min cosine vs ONNX Runtime {e['min_cosine']:.5f})",
                )
            )
        rows.append(("export time", f"{self.seconds:.0f} s"))
        lines = ["| item | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in rows]
        return "\n".join(lines) + "\n"


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def json_safe(x):
    """`x` with tuples as lists and nan/inf as None: what JSON (allow_nan=False) takes."""
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [json_safe(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def latencies_ms(
    models: dict[str, bytes],
    window: np.ndarray,
    frontend: FrontendConfig,
    threads: int | None,
) -> dict[str, float]:
    """Median ms per window of each model on ONNX Runtime CPU: one untimed call (allocations,
    kernel choice), then LATENCY_RUNS timed ones, model after model. The one pause of an
    export is here, once per model: consecutive calls of one session share its threads."""
    out = {}
    for name, model in models.items():
        engine = cpu_engine(model, threads)
        time.sleep(ORT_THREADS_IDLE_S)  # the previous model's threads stop spinning
        times = []
        for _ in range(1 + LATENCY_RUNS):
            t = time.perf_counter()
            engine_embed(engine, [window], frontend)
            times.append(time.perf_counter() - t)
        out[name] = 1000 * float(np.median(times[1:]))
    return out


def int8_report(
    models: dict[str, bytes],
    members: dict[str, str],
    vs_fp32: dict[str, ParityReport],
    fp32_bytes: int,
    ms: dict[str, float],
    calibration_clips: int,
) -> Int8Report:
    """The int8 part of the report from the int8 models (variant -> bytes) and their figures;
    `ms` also holds the fp32 model's time."""
    return Int8Report(
        fp32_ms=ms["fp32"],
        calibration_clips=calibration_clips,
        models={
            variant: Int8Model(
                member=members[variant],
                onnx_bytes=len(model),
                size_ratio=len(model) / fp32_bytes,
                ms=ms[variant],
                vs_fp32=vs_fp32[variant],
            )
            for variant, model in models.items()
        },
    )
