"""Static INT8 quantization of the exported fp32 graph to Q/DQ ONNX models.

Q/DQ (QuantizeLinear -> DequantizeLinear pairs around each quantized op's inputs) is the
INT8 form both targets take, but they want different activation types, so an int8
export writes two models from the same calibration data:

- for TensorRT (`model.int8.onnx`): explicit quantization needs zero points of 0 and type
  int8, so activations and weights are symmetric int8;
- for ONNX Runtime on the CPU (`model.int8-cpu.onnx`): uint8 activations with a zero
  point. Its x86 and ARM integer kernels are u8 x s8; given symmetric int8 activations,
  ONNX Runtime keeps a third of the convs in float between Q/DQ pairs and adds hundreds
  of layout Transposes, which made int8 slower than fp32 (dcase2020, 2-core x86: 1.7x
  slower; the uint8 model is 1.25x faster than fp32). Activations after ReLU are never
  negative, so the asymmetric range also spends all 256 levels on real values (min cosine
  to fp32 0.986 against 0.966).

Weights are symmetric int8 per output channel in both; the CPU model's use 7 bits
([-64, 64]). x86 CPUs without VNNI (SSE4.1, AVX2, AVX-512 before VNNI: Atoms before
Gracemont, desktop Core up to the 10th generation, AMD Zen 2 and 3) sum pairs of u8 x s8
products in a saturating 16-bit intermediate: 2 x 255 x 127 overflows it and the scores
come out wrong, 2 x 255 x 64 does not. (ONNX Runtime's own remedy, the session entry
`session.x64quantprecision`, fails to load these models in 1.32: the scanning boxes share
one encoder's weights.) The model records its weight bits; the runtime refuses an 8-bit
CPU model on such a CPU (runtime/cpu_features.py). Activation ranges are calibrated on
features of normal training clips, the data the model will see in the field.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from msn_edge.export.parity import ParityReport, compare, cpu_engine, engine_embed
from msn_edge.runtime.cpu_features import WEIGHT_BITS_KEY
from msn_edge.runtime.frontend import FrontendConfig, features

log = logging.getLogger(__name__)


TARGETS = ("tensorrt", "cpu")
# The int8 models an --int8 export writes: bundle variant -> quantization target.
INT8_VARIANTS = {"int8-cpu": "cpu", "int8": "tensorrt"}


@dataclass(frozen=True)
class Int8Config:
    target: str = "tensorrt"  # "tensorrt": int8 activations, zero point 0; "cpu": uint8
    # The ops that carry the arithmetic; Gather, Transpose and pooling stay in float
    # between them, so the scan's index plumbing is never quantized.
    op_types: tuple[str, ...] = ("Conv", "Gemm", "MatMul")
    per_channel: bool = True  # one weight scale per output channel: conv kernels vary widely
    # Ranges clipped at the 99.999th percentile: spectral magnitudes are heavy-tailed, and
    # min-max ranges spend the 8 bits on rare peaks (dcase2020, 1 epoch: cosine to fp32
    # 0.946 with percentile, 0.923 with min-max).
    calibrate_method: str = "Percentile"
    batch_size: int = 4  # most calibration windows per ONNX Runtime call

    @property
    def weight_bits(self) -> int:
        """7 for the CPU model: no u8 x s8 pair can saturate a 16-bit sum (see above)."""
        return 7 if self.target == "cpu" else 8


@contextlib.contextmanager
def _root_logging_at(level: int) -> Iterator[None]:
    root = logging.getLogger()
    before = root.level
    root.setLevel(max(level, before))
    try:
        yield
    finally:
        root.setLevel(before)


def _even_batch(n: int, most: int) -> int:
    """The largest batch <= most that divides n: onnxruntime's histogram calibrators stack
    every batch's activations into one array and fail on a shorter last batch."""
    return max(b for b in range(1, most + 1) if n % b == 0)


class _Windows:
    """onnxruntime CalibrationDataReader over windows: features computed batch by batch."""

    def __init__(
        self, windows: Sequence[np.ndarray], frontend: FrontendConfig, names: list[str], batch: int
    ):
        self._args = (windows, frontend, names, batch)
        self.rewind()

    @staticmethod
    def _iter(windows, frontend, names, batch) -> Iterator[dict[str, np.ndarray]]:
        for lo in range(0, len(windows), batch):
            spec, spectrum = features(np.stack(windows[lo : lo + batch]), frontend)
            yield dict(zip(names, (spec, spectrum), strict=True))

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)

    def rewind(self) -> None:
        self._batches = self._iter(*self._args)


def quantize_int8(
    fp32: onnx.ModelProto,
    windows: Sequence[np.ndarray],
    frontend: FrontendConfig,
    config: Int8Config = Int8Config(),
) -> onnx.ModelProto:
    """The Q/DQ int8 twin of `fp32` for `config.target`, ranges calibrated on `windows`.

    `windows` are float32 waveforms of exactly `frontend.window_samples` samples.
    """
    from onnxruntime import quantization as q  # the export extra's dependency

    if not windows:
        raise ValueError("int8 calibration needs at least one window")
    if config.target not in TARGETS:
        raise ValueError(f"unknown int8 target '{config.target}' (choose from {TARGETS})")
    for_tensorrt = config.target == "tensorrt"
    names = [i.name for i in fp32.graph.input]
    with tempfile.TemporaryDirectory(prefix="msn-int8-") as tmp:
        source, prepared, out = (Path(tmp) / f"{n}.onnx" for n in ("fp32", "prepared", "int8"))
        onnx.save(fp32, source)
        # Shape inference and BatchNorm folding first, as onnxruntime recommends: every
        # tensor then has a known shape and each Conv its own bias to quantize with.
        q.quant_pre_process(source, prepared, skip_symbolic_shape=True)
        # The quantizer logs every scale it adjusts and prints calibration progress to
        # stdout, which is for the export report: keep both out, the prints as debug logs.
        printed = io.StringIO()
        with _root_logging_at(logging.WARNING), contextlib.redirect_stdout(printed):
            q.quantize_static(
                prepared,
                out,
                _Windows(windows, frontend, names, _even_batch(len(windows), config.batch_size)),
                quant_format=q.QuantFormat.QDQ,
                op_types_to_quantize=list(config.op_types),
                per_channel=config.per_channel,
                reduce_range=config.weight_bits == 7,  # onnxruntime's name for 7-bit weights
                activation_type=q.QuantType.QInt8 if for_tensorrt else q.QuantType.QUInt8,
                weight_type=q.QuantType.QInt8,
                calibrate_method=q.CalibrationMethod[config.calibrate_method],
                extra_options={
                    "ActivationSymmetric": for_tensorrt,
                    "WeightSymmetric": True,
                    # Biases stay float: TensorRT's DequantizeLinear takes no int32 input.
                    "QuantizeBias": False,
                },
            )
        model = onnx.load(out)
    log.debug("onnxruntime quantizer: %s", printed.getvalue().strip())
    # The optimiser lists every domain it knows; keep the ones the graph uses (TensorRT's
    # parser and older runtimes then see a plain ai.onnx model).
    used = {n.domain for n in model.graph.node} | {""}
    kept = [o for o in model.opset_import if o.domain in used]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    del model.metadata_props[:]
    onnx.helper.set_model_props(
        model,
        {p.key: p.value for p in fp32.metadata_props}
        | {
            "precision": "int8",
            "int8_target": config.target,
            WEIGHT_BITS_KEY: str(config.weight_bits),
        },
    )
    onnx.checker.check_model(model, full_check=True)
    return model


@dataclass(frozen=True)
class Int8Twins:
    """The int8 models of one export and how far each is from fp32 (measured, not enforced)."""

    models: dict[str, bytes]  # bundle variant (INT8_VARIANTS) -> serialized Q/DQ model
    vs_fp32: dict[str, ParityReport]


def int8_twins(
    fp32: onnx.ModelProto,
    calibration: Sequence[np.ndarray],
    frontend: FrontendConfig,
    *,
    probe: Sequence[np.ndarray],
    prototypes: np.ndarray,
    threads: int | None = None,
) -> Int8Twins:
    """Every int8 variant of `fp32`, calibrated on the same windows, each compared with fp32
    (ONNX Runtime CPU) on the `probe` windows."""
    reference = engine_embed(cpu_engine(fp32.SerializeToString(), threads), probe, frontend)
    models, vs_fp32 = {}, {}
    for variant, target in INT8_VARIANTS.items():
        log.info(
            "quantizing to int8 for %s (Q/DQ), calibrated on %d clips", target, len(calibration)
        )
        models[variant] = quantize_int8(
            fp32, calibration, frontend, Int8Config(target=target)
        ).SerializeToString()
        vs_fp32[variant] = compare(
            reference,
            engine_embed(cpu_engine(models[variant], threads), probe, frontend),
            prototypes,
            n_real=len(probe),
            embedding_tol=None,
            score_tol=None,
        )
    return Int8Twins(models, vs_fp32)
