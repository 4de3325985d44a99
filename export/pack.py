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
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from msn_edge.checkpoint import CHECKPOINT_FILE, LoadedRun, load_checkpoint
from msn_edge.datasets import Clip, load_wave, scan
from msn_edge.evaluate import pct, run_dir_of, summary_of
from msn_edge.export import FORMATS
from msn_edge.export.onnx_export import export_onnx, graph_stats
from msn_edge.export.parity import check_parity, cpu_engine, engine_embed
from msn_edge.export.quantize import int8_twins
from msn_edge.export.report import ExportReport, int8_report, json_safe, latencies_ms
from msn_edge.export.trt_support import tensorrt_problems
from msn_edge.prototypes import Scoring, load_scoring, score_embeddings
from msn_edge.runtime.bundle import MODEL_MEMBERS, is_bundle_file, write_bundle
from msn_edge.runtime.cpu_features import x86_without_vnni
from msn_edge.runtime.engines import check_precision
from msn_edge.runtime.errors import DatasetError, MsnEdgeError
from msn_edge.runtime.frontend import FrontendConfig, fit_window
from msn_edge.train_data import training_clips

log = logging.getLogger(__name__)


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
        if self.precision is not None:
            check_precision(self.precision)
        if self.precision == "int8" and not self.int8:
            raise MsnEdgeError("an int8 engine is built from the int8 model: add --int8")
        if self.parity_clips < 0 or self.calibration_clips < 1:
            raise MsnEdgeError("parity clips must be >= 0 and calibration clips >= 1")


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


def int8_not_recommended(metrics: dict[str, dict[str, float]], max_drop: float) -> dict[str, str]:
    """Int8 variant -> why it is not recommended, for each whose AUC falls more than
    `max_drop` below fp32's on the evaluation data."""
    fp32 = metrics.get("fp32", {}).get("auc", math.nan)
    out = {}
    for variant, values in metrics.items():
        drop = fp32 - values.get("auc", math.nan)
        if variant != "fp32" and drop > max_drop:
            out[variant] = (
                f"AUC {100 * drop:.1f} points below fp32's ({pct(values['auc'])} vs "
                f"{pct(fp32)} on the export's evaluation data)"
            )
    return out


def _eval_metrics(
    models: dict[str, bytes], scoring: Scoring, test: list[Clip], frontend, threads
) -> dict[str, dict[str, float]]:
    """AUC / pAUC (the DCASE rule of the data, as `msn-edge evaluate`) of each model."""
    groups = [c.group for c in test]
    for name in sorted(set(groups)):
        scoring.group(name)  # DatasetError naming the group if the run has no prototypes
    windows = _windows(test, frontend, "reading test clips")
    out = {}
    for precision, model in models.items():
        log.info("scoring %d test clips with the %s model", len(test), precision)
        emb = engine_embed(cpu_engine(model, threads), windows, frontend, f"{precision} test")
        summary = summary_of(test, score_embeddings(scoring, emb, groups))
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
    if out.exists() and not is_bundle_file(out):
        raise MsnEdgeError(
            f"{out}: exists and is not a bundle; refusing to overwrite it (remove it first)"
        )


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
        twins = int8_twins(
            proto,
            calib,
            frontend,
            probe=[*real, *calib[:4]],
            prototypes=scoring.prototypes,
            threads=options.threads,
        )
        int8 = twins.models
        if x86_without_vnni():
            log.warning(
                "this CPU has no VNNI: ONNX Runtime's int8 products saturate with the "
                "TensorRT model's 8-bit weights, so its figures here understate it (the CPU "
                "int8 model has 7-bit weights and is computed exactly)"
            )
        window = (real or calib)[0]
        ms = latencies_ms({"fp32": fp32, **int8}, window, frontend, options.threads)
        report.int8 = int8_report(
            int8, MODEL_MEMBERS, twins.vs_fp32, len(fp32), ms, calibration_clips=len(calib)
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
            "model_config": json_safe(asdict(run.config.model)),
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
