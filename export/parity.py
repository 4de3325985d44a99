"""Parity of an exported model with the PyTorch model it came from, proven at every export.

ONNX Runtime (CPU, the runtime's own engine class) runs the exported graph; the trained
MSN runs eagerly in PyTorch (the training module, not the export rewrite, so the rewrite
is checked too). Both see the same windows through the one numpy front-end: real clips
and synthetic ones (machine sounds, silence-like and loud noise, so the numeric range is
exercised). An export whose embeddings or scores differ beyond tolerance is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from tqdm import tqdm

from msn_edge.inference import embed_clips
from msn_edge.model import MSN
from msn_edge.runtime.engines import Engine, OrtEngine
from msn_edge.runtime.errors import MsnEdgeError
from msn_edge.runtime.frontend import FrontendConfig, features, fit_window
from msn_edge.runtime.scorer import anomaly_scores
from msn_edge.synth import KINDS, machine_clip

EMBEDDING_TOL = 1e-4  # fp32: max |embedding difference| (unit vectors)
SCORE_TOL = 1e-5  # fp32: max |anomaly score difference| (cosine distances)
NOISE_LEVELS = (1e-4, 0.5)  # peak amplitude of the synthetic noise windows: near-silent, loud
BATCH = 8  # windows per inference call


class ParityError(MsnEdgeError):
    """The exported model does not compute what the trained model computes."""


@dataclass(frozen=True)
class ParityReport:
    n_real: int
    n_synthetic: int
    max_abs_embedding: float
    max_abs_score: float
    min_cosine: float  # smallest cosine similarity between paired embeddings
    embedding_tol: float | None  # None: measured, not enforced (int8, fp16)
    score_tol: float | None

    @property
    def passed(self) -> bool:
        return (self.embedding_tol is None or self.max_abs_embedding <= self.embedding_tol) and (
            self.score_tol is None or self.max_abs_score <= self.score_tol
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def synthetic_windows(frontend: FrontendConfig, seed: int = 0) -> list[np.ndarray]:
    """One normal clip of every synthetic machine kind, and white noise at NOISE_LEVELS."""
    rng = np.random.default_rng(seed)
    n = frontend.window_samples
    waves = [
        machine_clip(kind, 0, rng, seconds=frontend.window_s, sample_rate=frontend.sample_rate)
        for kind in KINDS
    ]
    waves += [(level * rng.uniform(-1, 1, n)).astype(np.float32) for level in NOISE_LEVELS]
    return [fit_window(w, n) for w in waves]


def cpu_engine(onnx_bytes: bytes, threads: int | None = None) -> OrtEngine:
    """The runtime's ONNX Runtime CPU engine for a model (as `msn-edge score` runs it)."""
    return OrtEngine(onnx_bytes, providers=["CPUExecutionProvider"], threads=threads, name="cpu")


def engine_embed(
    engine: Engine,
    windows: Sequence[np.ndarray],
    frontend: FrontendConfig,
    progress: str | None = None,
) -> np.ndarray:
    """Embeddings (N, D) of windows by an inference engine, BATCH at a time.

    `progress`: label of a progress bar on stderr (none if None).
    """
    out = []
    starts = range(0, len(windows), BATCH)
    for lo in tqdm(starts, desc=progress, unit="batch", leave=False, disable=progress is None):
        spec, spectrum = features(np.stack(windows[lo : lo + BATCH]), frontend)
        out.append(engine.embed(spec, spectrum))
    return np.concatenate(out)


def compare(
    reference: np.ndarray,
    candidate: np.ndarray,
    prototypes: np.ndarray,
    *,
    n_real: int,
    embedding_tol: float | None,
    score_tol: float | None,
) -> ParityReport:
    """Embedding and score differences of paired (N, D) embeddings."""
    unit = candidate / np.maximum(np.linalg.norm(candidate, axis=1, keepdims=True), 1e-12)
    return ParityReport(
        n_real=n_real,
        n_synthetic=len(reference) - n_real,
        max_abs_embedding=float(np.abs(reference - candidate).max()),
        max_abs_score=float(
            np.abs(
                anomaly_scores(reference, prototypes) - anomaly_scores(candidate, prototypes)
            ).max()
        ),
        min_cosine=float((reference * unit).sum(axis=1).min()),
        embedding_tol=embedding_tol,
        score_tol=score_tol,
    )


def check_parity(
    model: MSN,
    onnx_bytes: bytes,
    frontend: FrontendConfig,
    prototypes: np.ndarray,
    real_windows: Sequence[np.ndarray] = (),
    *,
    threads: int | None = None,
    embedding_tol: float = EMBEDDING_TOL,
    score_tol: float = SCORE_TOL,
) -> ParityReport:
    """ONNX Runtime CPU vs eager PyTorch on real and synthetic windows; ParityError if off.

    Scores are computed against `prototypes` (the run's), as the bundle will score.
    """
    windows = [*real_windows, *synthetic_windows(frontend)]
    reference = embed_clips(model, windows, frontend, batch_size=BATCH)
    exported = engine_embed(cpu_engine(onnx_bytes, threads), windows, frontend)
    report = compare(
        reference,
        exported,
        prototypes,
        n_real=len(real_windows),
        embedding_tol=embedding_tol,
        score_tol=score_tol,
    )
    if not report.passed:
        raise ParityError(
            f"exported model differs from the PyTorch model: max embedding difference "
            f"{report.max_abs_embedding:.3g} (limit {embedding_tol:g}), max score difference "
            f"{report.max_abs_score:.3g} (limit {score_tol:g}) over {len(windows)} windows; "
            "no bundle written"
        )
    return report
