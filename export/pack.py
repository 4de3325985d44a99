"""A training run -> one bundle file: export, prove parity, quantize, pack.

Order matters only for safety: every check (ONNX checker, PyTorch parity, int8
calibration, the optional TensorRT build and its parity) runs before the bundle is
written, so a failed export leaves no bundle behind. The export report goes into the
bundle's metadata and is printed by the CLI.
"""

from __future__ import annotations

import logging
import math
import time
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from msn_edge.benchmarks.measure import THREADS_IDLE_S
from msn_edge.checkpoint import CHECKPOINT_FILE, LoadedRun, load_checkpoint
from msn_edge.datasets import Clip, load_wave, scan
from msn_edge.evaluate import run_dir_of
from msn_edge.export.onnx_export import GraphStats, export_onnx, graph_stats
from msn_edge.export.parity import (
    ParityReport,
    check_parity,
    compare,
    cpu_engine,
    engine_embed,
)
from msn_edge.export.quantize import Int8Config, quantize_int8
from msn_edge.export.trt_support import tensorrt_problems
from msn_edge.metrics import group_metrics, summarize
from msn_edge.prototypes import Scoring, load_scoring, score_embeddings
from msn_edge.runtime.bundle import MODEL_MEMBERS, write_bundle
from msn_edge.runtime.errors import DatasetError, MsnEdgeError
from msn_edge.runtime.frontend import FrontendConfig, fit_window
from msn_edge.training import training_clips

log = logging.getLogger(__name__)

FORMATS = ("onnx", "engine")
ENGINE_PRECISIONS = ("fp32", "fp16", "int8")
LATENCY_RUNS = 10  # timed single-window calls per model for the int8 speed ratio


@dataclass(frozen=True)
class ExportOptions:
    int8: bool = False  # also the Q/DQ int8 models (model.int8-cpu.onnx, model.int8.onnx)
    format: str = "onnx"  # "engine": also build and cache a TensorRT engine here
    precision: str | None = None  # engine precision; only with format "engine"
    eval_data: Path | None = None  # data set whose test clips give fp32 / int8 AUC
    threads: int | None = None  # ONNX Runtime CPU threads (None: all cores)
    parity_clips: int = 8  # real clips in the parity check
    # Normal training clips that calibrate int8. onnxruntime's histogram calibrator keeps
    # every activation of every window in memory: 32 dcase2020 windows peak at 4.6 GB.
    calibration_clips: int = 32
    # An int8 model whose AUC on --eval-data falls more than this below fp32's gets a
    # warning and is marked not recommended in the bundle (the monitor then refuses it
    # unless forced): post-training int8 adds embedding noise (cosine ~0.97 to fp32)
    # that can swamp a model's normal/anomalous margin.
    int8_max_auc_drop: float = 0.01
    engine_cache_dir: Path | None = None  # default: where the runtime looks (beside the bundle)

    def validate(self) -> None:
        """Incompatible options are an error, never silently rewritten."""
        if self.format not in FORMATS:
            raise MsnEdgeError(f"unknown format '{self.format}' (choose {', '.join(FORMATS)})")
        if self.precision is not None and self.format != "engine":
            raise MsnEdgeError("--precision sets the TensorRT engine's; add --format engine")
        if self.precision is not None and self.precision not in ENGINE_PRECISIONS:
            raise MsnEdgeError(
                f"unknown precision '{self.precision}' (choose {', '.join(ENGINE_PRECISIONS)})"
            )
        if self.precision == "int8" and not self.int8:
            raise MsnEdgeError("an int8 engine is built from the int8 model: add --int8")
        if self.parity_clips < 0 or self.calibration_clips < 1:
            raise MsnEdgeError("parity clips must be >= 0 and calibration clips >= 1")


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


# The int8 variants an --int8 export writes: quantization target and what each is for.
INT8_VARIANTS = {"int8-cpu": "cpu", "int8": "tensorrt"}
INT8_ROLES = {"int8-cpu": "ONNX Runtime CPU", "int8": "TensorRT; here on ONNX Runtime CPU"}


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
        return _json_safe(d)

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
            text = ", ".join(f"{k} {_pct(v)}" for k, v in values.items())
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


def _pct(v: float) -> str:
    return "n/a" if math.isnan(v) else f"{100 * v:.2f}"


def _json_safe(x):
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _spread(items: Sequence, n: int) -> list:
    """n items evenly spread over the sequence (deterministic, covers every group)."""
    if n >= len(items):
        return list(items)
    return [items[i] for i in np.linspace(0, len(items) - 1, n).round().astype(int)]


def _windows(clips: Sequence[Clip], frontend: FrontendConfig, desc: str) -> list[np.ndarray]:
    bar = tqdm(clips, desc=desc, unit="clip", leave=False, disable=len(clips) < 2)
    return [fit_window(load_wave(c, frontend), frontend.window_samples) for c in bar]


def _run_training_clips(run: LoadedRun) -> list[Clip]:
    """The run's normal training clips, if its data is still where it was trained."""
    roots = [Path(r) for r in run.meta.get("data", {}).get("roots", [])]
    if not roots or not all(r.is_dir() for r in roots):
        return []
    return training_clips(roots)


def _latencies_ms(
    models: dict[str, bytes], window: np.ndarray, frontend, threads
) -> dict[str, float]:
    """Median ms per window of each model, timed round-robin as `msn-edge bench` does: a
    pause before each call so no other session's spinning threads share the CPU."""
    engines = {name: cpu_engine(model, threads) for name, model in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(1 + LATENCY_RUNS):  # the first round warms up: allocations, kernels
        for name, engine in engines.items():
            time.sleep(THREADS_IDLE_S)
            t = time.perf_counter()
            engine_embed(engine, [window], frontend)
            times[name].append(time.perf_counter() - t)
    return {name: 1000 * float(np.median(t[1:])) for name, t in times.items()}


def int8_not_recommended(metrics: dict[str, dict[str, float]], max_drop: float) -> dict[str, str]:
    """Int8 variant -> why it is not recommended, for each whose AUC falls more than
    `max_drop` below fp32's on the evaluation data."""
    fp32 = metrics.get("fp32", {}).get("auc", math.nan)
    out = {}
    for variant, values in metrics.items():
        drop = fp32 - values.get("auc", math.nan)
        if variant != "fp32" and drop > max_drop:
            out[variant] = (
                f"AUC {100 * drop:.1f} points below fp32's ({_pct(values['auc'])} vs "
                f"{_pct(fp32)} on the export's evaluation data)"
            )
    return out


def _eval_metrics(
    models: dict[str, bytes], scoring: Scoring, test: list[Clip], frontend, threads
) -> dict[str, dict[str, float]]:
    """AUC / pAUC (the DCASE rule of the data) of each model on the test clips."""
    groups = [c.group for c in test]
    for name in sorted(set(groups)):
        scoring.group(name)  # DatasetError naming the group if the run has no prototypes
    rule = "dcase2023" if test[0].layout == "dcase2023" else "dcase2020"
    windows = _windows(test, frontend, "reading test clips")
    labels = np.array([c.label == "anomaly" for c in test], dtype=int)
    out = {}
    for precision, model in models.items():
        log.info("scoring %d test clips with the %s model", len(test), precision)
        emb = engine_embed(cpu_engine(model, threads), windows, frontend, f"{precision} test")
        scores = score_embeddings(scoring, emb, groups)
        rows = []
        for name in sorted(set(groups)):
            sel = np.array([g == name for g in groups])
            mine = [c for c, s in zip(test, sel, strict=True) if s]
            rows.append(
                group_metrics(
                    rule,
                    name,
                    mine[0].machine_type,
                    labels[sel],
                    scores[sel],
                    [c.domain for c in mine],
                )
            )
        summary = summarize(rule, rows)
        out[precision] = {**summary.overall, summary.official_name: summary.official}
    return out


def _trained_on(run: LoadedRun) -> dict:
    data = run.meta.get("data", {})
    return {
        "n_clips": data.get("n_clips"),
        "groups": data.get("groups", []),
        "classes": len(run.classes),
        "epochs": run.meta.get("epoch"),
    }


def refuse_overwrite(run_path: str | Path, out: str | Path) -> None:
    """`-o` may replace a bundle, never the run's checkpoint or any other existing file."""
    out = Path(out)
    run = Path(run_path)
    checkpoint = run / CHECKPOINT_FILE if run.is_dir() else run
    if out.exists() and checkpoint.exists() and out.resolve() == checkpoint.resolve():
        raise MsnEdgeError(
            f"{out}: is the run's checkpoint; write the bundle elsewhere (-o fan.msn)"
        )
    if out.is_dir():
        raise MsnEdgeError(f"{out}: is a directory; -o takes the bundle file to write")
    if out.exists() and not _is_bundle_file(out):
        raise MsnEdgeError(
            f"{out}: exists and is not a bundle; refusing to overwrite it (remove it first)"
        )


def _is_bundle_file(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return "manifest.json" in zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return False


def export_bundle(run_path: str | Path, out: str | Path, options: ExportOptions) -> ExportReport:
    """Export the run at `run_path` to the bundle `out`; nothing is written if a check fails."""
    options.validate()
    refuse_overwrite(run_path, out)
    started = time.perf_counter()
    out = Path(out)
    if not out.parent.is_dir():
        raise MsnEdgeError(f"{out.parent}: no such folder for the bundle")
    run = load_checkpoint(run_path)
    scoring = load_scoring(run_dir_of(run_path), run.config.model.embedding_dim)
    frontend = run.config.frontend
    train = _run_training_clips(run)
    test = scan(options.eval_data, split="test") if options.eval_data else []
    if options.eval_data and not test:
        raise DatasetError(f"{options.eval_data}: no test clips to evaluate on (--eval-data)")
    if options.int8 and not train:
        raise DatasetError(
            f"--int8 calibrates on the run's normal training clips, but its data "
            f"{run.meta.get('data', {}).get('roots')} is not there"
        )

    log.info("exporting the %s model to ONNX (this takes a while)", run.config.preset)
    proto = export_onnx(
        run.model, {"preset": run.config.preset, "window_s": f"{frontend.window_s:g}"}
    )
    fp32 = proto.SerializeToString()
    problems = tensorrt_problems(proto)
    for p in problems:
        log.warning("TensorRT would reject the graph: %s", p)

    real = _windows(_spread(test or train, options.parity_clips), frontend, "parity clips")
    log.info("checking parity: ONNX Runtime vs PyTorch on %d real + synthetic windows", len(real))
    parity = check_parity(
        run.model, fp32, frontend, scoring.prototypes, real, threads=options.threads
    )
    report = ExportReport(
        run=str(run_path),
        bundle=str(out),
        preset=run.config.preset,
        graph=graph_stats(proto, run.model),
        tensorrt_problems=problems,
        parity=parity,
    )

    int8: dict[str, bytes] = {}
    if options.int8:
        calib = _windows(_spread(train, options.calibration_clips), frontend, "calibration clips")
        probe = [*real, *calib[:4]]
        reference = engine_embed(cpu_engine(fp32, options.threads), probe, frontend)
        window = (real or calib)[0]
        vs_fp32 = {}
        for variant, target in INT8_VARIANTS.items():
            log.info("quantizing to int8 for %s (Q/DQ), calibrated on %d clips", target, len(calib))
            int8[variant] = quantize_int8(
                proto, calib, frontend, Int8Config(target=target)
            ).SerializeToString()
            vs_fp32[variant] = compare(
                reference,
                engine_embed(cpu_engine(int8[variant], options.threads), probe, frontend),
                scoring.prototypes,
                n_real=len(probe),
                embedding_tol=None,
                score_tol=None,
            )
        ms = _latencies_ms({"fp32": fp32, **int8}, window, frontend, options.threads)
        models = {
            variant: Int8Model(
                member=MODEL_MEMBERS[variant],
                onnx_bytes=len(model),
                size_ratio=len(model) / len(fp32),
                ms=ms[variant],
                vs_fp32=vs_fp32[variant],
            )
            for variant, model in int8.items()
        }
        report.int8 = Int8Report(
            fp32_ms=ms["fp32"],
            calibration_clips=len(calib),
            models=models,
        )
    if test:
        report.metrics = _eval_metrics(
            {"fp32": fp32, **int8}, scoring, test, frontend, options.threads
        )
        report.not_recommended = int8_not_recommended(report.metrics, options.int8_max_auc_drop)
        for variant, why in report.not_recommended.items():
            log.warning(
                "the %s model is marked not recommended in the bundle: %s; the monitor "
                "runs it only with --allow-not-recommended",
                variant,
                why,
            )

    if options.format == "engine":
        report.engine = _engine(options, fp32, int8.get("int8"), frontend, scoring, real, out)

    report.seconds = time.perf_counter() - started
    write_bundle(
        out,
        model_onnx=fp32,
        model_int8_onnx=int8.get("int8"),
        model_int8_cpu_onnx=int8.get("int8-cpu"),
        prototypes=scoring.prototypes,
        groups=scoring.groups,
        frontend=frontend,
        trained_on=_trained_on(run),
        metadata={
            "preset": run.config.preset,
            "model_config": _json_safe(asdict(run.config.model)),
            "export": report.to_dict(),
            "not_recommended": report.not_recommended,
        },
    )
    log.info("wrote %s", out)
    return report


def _engine(
    options: ExportOptions,
    fp32: bytes,
    int8: bytes | None,
    frontend: FrontendConfig,
    scoring: Scoring,
    real: list[np.ndarray],
    out: Path,
) -> dict:
    """Build, check and cache the TensorRT engine; its figures for the report."""
    from msn_edge.export.parity import synthetic_windows
    from msn_edge.export.tensorrt import build_checked_engine
    from msn_edge.runtime.engines import default_cache_dir

    precision = options.precision or "fp32"
    log.info("building the TensorRT %s engine on this device", precision)
    result = build_checked_engine(
        int8 if precision == "int8" else fp32,
        precision,
        frontend=frontend,
        prototypes=scoring.prototypes,
        windows=[*real, *synthetic_windows(frontend)],
        n_real=len(real),
        cache_dir=options.engine_cache_dir or default_cache_dir(out),
        stem=out.name,
    )
    return {
        "path": str(result.path),
        "tensorrt_version": result.tensorrt_version,
        "gpu": result.gpu,
        "precision": result.precision,
        "engine_bytes": result.engine_bytes,
        "min_cosine": result.parity.min_cosine,
    }
