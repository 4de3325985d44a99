"""Anomaly score = min over prototypes of (1 - cosine similarity) (spec §4).

This is the one scoring function: evaluation, threshold calibration and the edge all call
`anomaly_scores`, so a threshold means the same number everywhere.
"""

from __future__ import annotations

import numpy as np

_EPS = 1e-12  # keeps an all-zero embedding finite (it scores 1: orthogonal to everything)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, _EPS)


def _as_prototypes(prototypes: np.ndarray) -> np.ndarray:
    prototypes = np.asarray(prototypes, dtype=np.float32)
    if prototypes.ndim != 2 or prototypes.shape[0] == 0:
        raise ValueError(f"prototypes must be a non-empty (P, D) array, got {prototypes.shape}")
    return prototypes


def anomaly_scores(emb: np.ndarray, prototypes: np.ndarray) -> np.ndarray:
    """Scores (B,) in [0, 2] for embeddings (B, D) against prototypes (P, D); higher = worse.

    Both sides are L2-normalised here, so a model output that is not exactly unit length
    (fp16, int8) still scores as a cosine distance.
    """
    emb = np.atleast_2d(np.asarray(emb, dtype=np.float32))
    prototypes = _as_prototypes(prototypes)
    if emb.ndim != 2 or emb.shape[1] != prototypes.shape[1]:
        raise ValueError(
            f"embeddings {emb.shape} do not match prototypes of size {prototypes.shape[1]}"
        )
    similarity = _unit_rows(emb) @ _unit_rows(prototypes).T  # (B, P)
    return 1.0 - similarity.max(axis=1)


class Scorer:
    """One scoring group: its prototypes and the threshold above which a window is anomalous."""

    def __init__(self, prototypes: np.ndarray, threshold: float) -> None:
        self.prototypes = _unit_rows(_as_prototypes(prototypes))
        self.threshold = float(threshold)

    def score(self, emb: np.ndarray) -> np.ndarray:
        return anomaly_scores(emb, self.prototypes)

    def verdict(self, scores: np.ndarray) -> np.ndarray:
        """True where a score is strictly above the threshold."""
        return np.asarray(scores) > self.threshold
