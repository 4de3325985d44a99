"""A small, real, torch-free bundle for tests: an ONNX graph built with onnx.helper.

The toy model has the contract I/O (`spectrogram` (B, F, T), `spectrum` (B, S) ->
`embedding` (B, D) unit rows) and a numpy twin (`ToyModel.embed`) to check engines
against: log(1 + magnitude) features (time-averaged spectrogram, utterance spectrum), each
projected by a fixed random matrix, concatenated, L2-normalised. Prototypes are the
embeddings of synthetic "normal" hums; the threshold is calibrated on other hums, and
`anomalous_signal` (the hum plus a loud 3 kHz whine and hiss) scores several times
above it.

Usage: `make_toy_bundle(tmp_path / "toy.msn")`, then `read_bundle` / `Detector.open`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from msn_edge.runtime.bundle import ScoringGroup, write_bundle
from msn_edge.runtime.frontend import FrontendConfig, features
from msn_edge.runtime.scorer import anomaly_scores

OPSET = 17  # ReduceMean / ReduceL2 still take `axes` as an attribute
IR_VERSION = 8  # readable by every onnxruntime msn-edge supports (>= 1.17)
LOG_EPS = 1.0  # log(magnitude + 1): the faint noise floor reads as ~0, not as loud random dB
NORM_EPS = 1e-12
HUM_HZ = 120.0  # fundamental of the normal machine
N_HARMONICS = 5
WHINE_HZ = 3000.0  # the anomaly: a bearing whine the normal machine never makes
N_PROTOTYPES = 8  # normal clips per group that become prototypes
N_CALIBRATION = 8  # other normal clips that set the threshold
THRESHOLD_MARGIN = 2.0  # threshold = margin x the largest calibration score


def normal_signal(frontend: FrontendConfig, rng: np.random.Generator) -> np.ndarray:
    """A hum: HUM_HZ harmonics with random phases and level, and a faint noise floor."""
    t = np.arange(frontend.window_samples) / frontend.sample_rate
    f0 = HUM_HZ
    wave = sum(
        np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 2 * np.pi)) / k
        for k in range(1, N_HARMONICS + 1)
    )
    wave = 0.2 * rng.uniform(0.5, 1.5) * wave + 0.0005 * rng.standard_normal(t.size)
    return wave.astype(np.float32)


def anomalous_signal(frontend: FrontendConfig, rng: np.random.Generator) -> np.ndarray:
    """The same hum with a loud WHINE_HZ whine and broadband hiss on top."""
    t = np.arange(frontend.window_samples) / frontend.sample_rate
    whine = 0.3 * np.sin(2 * np.pi * WHINE_HZ * t) + 0.05 * rng.standard_normal(t.size)
    return (normal_signal(frontend, rng) + whine).astype(np.float32)


def _projection(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    return (rng.standard_normal((rows, cols)) / np.sqrt(rows)).astype(np.float32)


@dataclass(frozen=True)
class ToyModel:
    w_spec: np.ndarray  # (F, D/2)
    w_spectrum: np.ndarray  # (S, D/2)
    n_frames: int  # T is fixed in the graph, as in exported MSNs (TensorRT needs it)

    @classmethod
    def random(cls, frontend: FrontendConfig, *, dim: int = 32, seed: int = 0) -> ToyModel:
        rng = np.random.default_rng(seed)
        half = dim // 2
        return cls(
            _projection(rng, frontend.n_freq, half),
            _projection(rng, frontend.spectrum_bins, half),
            frontend.n_frames,
        )

    @property
    def dim(self) -> int:
        return self.w_spec.shape[1] + self.w_spectrum.shape[1]

    def features(self, spec: np.ndarray, spectrum: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The graph's two MatMul inputs: log mean spectrogram (B, F), log spectrum (B, S)."""
        return np.log(spec.mean(axis=2) + LOG_EPS), np.log(spectrum + LOG_EPS)

    def embed(self, spec: np.ndarray, spectrum: np.ndarray) -> np.ndarray:
        """Numpy reference of the ONNX graph."""
        a, b = self.features(spec, spectrum)
        e = np.concatenate([a @ self.w_spec, b @ self.w_spectrum], axis=1)
        norm = np.linalg.norm(e, axis=1, keepdims=True)
        return (e / np.maximum(norm, NORM_EPS)).astype(np.float32)

    def onnx(self, act_scales: tuple[float, float] | None = None) -> bytes:
        """The fp32 graph; with `act_scales` a Q/DQ int8 graph (per-tensor, symmetric)."""
        inits = [
            numpy_helper.from_array(np.array([LOG_EPS], np.float32), "log_eps"),
            numpy_helper.from_array(np.array([NORM_EPS], np.float32), "norm_eps"),
        ]
        nodes = [
            helper.make_node("ReduceMean", ["spectrogram"], ["m"], axes=[2], keepdims=0),
            helper.make_node("Add", ["m", "log_eps"], ["m_eps"]),
            helper.make_node("Log", ["m_eps"], ["a"]),
            helper.make_node("Add", ["spectrum", "log_eps"], ["s_eps"]),
            helper.make_node("Log", ["s_eps"], ["b"]),
        ]
        matmul_inputs = []
        for i, (x, w) in enumerate((("a", self.w_spec), ("b", self.w_spectrum))):
            if act_scales is None:
                inits.append(numpy_helper.from_array(w, f"w{i}"))
                matmul_inputs.append((x, f"w{i}"))
                continue
            w_scale = float(np.abs(w).max()) / 127
            inits += [
                numpy_helper.from_array(np.round(w / w_scale).astype(np.int8), f"w{i}_q"),
                numpy_helper.from_array(np.array(w_scale, np.float32), f"w{i}_scale"),
                numpy_helper.from_array(np.array(act_scales[i], np.float32), f"x{i}_scale"),
                numpy_helper.from_array(np.array(0, np.int8), f"zero{i}"),
            ]
            nodes += [
                helper.make_node(
                    "DequantizeLinear", [f"w{i}_q", f"w{i}_scale", f"zero{i}"], [f"w{i}"]
                ),
                helper.make_node("QuantizeLinear", [x, f"x{i}_scale", f"zero{i}"], [f"{x}_q"]),
                helper.make_node(
                    "DequantizeLinear", [f"{x}_q", f"x{i}_scale", f"zero{i}"], [f"{x}_dq"]
                ),
            ]
            matmul_inputs.append((f"{x}_dq", f"w{i}"))
        nodes += [
            helper.make_node("MatMul", list(matmul_inputs[0]), ["e0"]),
            helper.make_node("MatMul", list(matmul_inputs[1]), ["e1"]),
            helper.make_node("Concat", ["e0", "e1"], ["e"], axis=1),
            helper.make_node("ReduceL2", ["e"], ["n"], axes=[1], keepdims=1),
            helper.make_node("Max", ["n", "norm_eps"], ["n_safe"]),
            helper.make_node("Div", ["e", "n_safe"], ["embedding"]),
        ]
        f, s = self.w_spec.shape[0], self.w_spectrum.shape[0]
        graph = helper.make_graph(
            nodes,
            "toy_msn",
            [
                helper.make_tensor_value_info(
                    "spectrogram", TensorProto.FLOAT, ["batch", f, self.n_frames]
                ),
                helper.make_tensor_value_info("spectrum", TensorProto.FLOAT, ["batch", s]),
            ],
            [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", self.dim])],
            initializer=inits,
        )
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION
        )
        onnx.checker.check_model(model)
        return model.SerializeToString()


def toy_frontend(window_s: float = 1.0) -> FrontendConfig:
    return FrontendConfig(window_s=window_s)


def _embed_waves(model: ToyModel, frontend: FrontendConfig, waves: list[np.ndarray]) -> np.ndarray:
    spec, spectrum = features(np.stack(waves), frontend)
    return model.embed(spec, spectrum)


def make_toy_bundle(
    path: str | Path,
    *,
    window_s: float = 1.0,
    seed: int = 0,
    dim: int = 32,
    groups: tuple[str, ...] = ("toy",),
    int8: bool = False,
    not_recommended: dict[str, str] | None = None,
) -> Path:
    """Write a toy bundle: one block of N_PROTOTYPES prototypes and a threshold per group."""
    frontend = toy_frontend(window_s)
    model = ToyModel.random(frontend, dim=dim, seed=seed)
    rng = np.random.default_rng(seed + 1)
    blocks, scoring_groups = [], []
    for i, name in enumerate(groups):
        protos = _embed_waves(
            model, frontend, [normal_signal(frontend, rng) for _ in range(N_PROTOTYPES)]
        )
        held_out = _embed_waves(
            model, frontend, [normal_signal(frontend, rng) for _ in range(N_CALIBRATION)]
        )
        cal = anomaly_scores(held_out, protos)
        blocks.append(protos)
        scoring_groups.append(
            ScoringGroup(
                name=name,
                start=i * N_PROTOTYPES,
                stop=(i + 1) * N_PROTOTYPES,
                threshold=float(THRESHOLD_MARGIN * cal.max()),
                calibration={
                    "method": "max_times_margin",
                    "margin": THRESHOLD_MARGIN,
                    "n_clips": N_CALIBRATION,
                },
            )
        )
    int8_bytes = None
    if int8:
        spec, spectrum = features(
            np.stack([normal_signal(frontend, rng) for _ in range(4)]), frontend
        )
        a, b = model.features(spec, spectrum)
        int8_bytes = model.onnx(
            act_scales=(float(np.abs(a).max()) / 127, float(np.abs(b).max()) / 127)
        )
    return write_bundle(
        path,
        model_onnx=model.onnx(),
        model_int8_onnx=int8_bytes,
        prototypes=np.concatenate(blocks).astype(np.float32),
        groups=scoring_groups,
        frontend=frontend,
        trained_on={"n_clips": N_PROTOTYPES * len(groups), "n_groups": len(groups)},
        metadata={
            "preset": "toy",
            "model": {"kind": "toy", "dim": dim, "seed": seed},
            "not_recommended": not_recommended or {},
        },
    )
