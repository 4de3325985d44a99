"""Prototypes of a scoring group (spec §4), the one implementation for training and the edge.

Prototypes: k-means centroids of the group's source-domain normal embeddings, re-normalised
to unit length, plus every target-domain embedding as its own prototype. Training fits
them on a run's clips (msn_edge/prototypes.py), `msn-edge enroll` on a new machine's audio
(runtime/enroll.py); both call `group_prototypes`, so a bundle's prototypes mean the same
whichever of the two made them.

k-means is written here in numpy rather than taken from scikit-learn: scikit-learn (with
scipy, joblib and threadpoolctl) adds ~100 MB to the edge install for one function of a
few dozen lines, and the edge box must be able to enroll. The algorithm is scikit-learn's
default, so training lost nothing by switching: greedy k-means++ seeding, Lloyd
iterations, the best of N_INIT seeded restarts by inertia.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

N_CLUSTERS = 16  # spec §4: k-means prototypes per group on source-domain embeddings
N_INIT = 10  # seeded restarts, best inertia kept: the same seed gives the same prototypes
MAX_ITER = 300  # Lloyd iterations per restart (scikit-learn's default)
TOL = 1e-4  # stop when the centres move less than this x the data's mean variance
THRESHOLD_QUANTILE = 0.95  # threshold = this quantile of held-out normal scores
CALIBRATION_FRACTION = 0.2  # share of normal windows/clips held out to calibrate it
MIN_HOLDOUT = 10  # fewer held-out scores than this -> leave-one-out instead


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (an all-zero row stays zero), float32."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norm, np.finfo(np.float32).tiny)).astype(np.float32)


def _sq_dists(x: np.ndarray, centres: np.ndarray, x_sq: np.ndarray) -> np.ndarray:
    """Squared euclidean distances (N, K), clamped at 0 against round-off."""
    d = x_sq[:, None] - 2.0 * x @ centres.T + np.einsum("kd,kd->k", centres, centres)[None]
    return np.maximum(d, 0.0)


def _kmeans_plusplus(x: np.ndarray, k: int, x_sq: np.ndarray, rng: np.random.Generator):
    """Greedy k-means++ seeding: of 2 + log k candidates, take the one that lowers the
    potential most (Arthur & Vassilvitskii 2007; scikit-learn's variant)."""
    n = x.shape[0]
    trials = 2 + int(np.log(k))
    centres = np.empty((k, x.shape[1]))
    centres[0] = x[rng.integers(n)]
    closest = _sq_dists(x, centres[:1], x_sq)[:, 0]
    for c in range(1, k):
        total = closest.sum()
        if total <= 0.0:  # every point sits on a centre already: any point will do
            candidates = rng.integers(n, size=trials)
        else:
            cumulative = np.cumsum(closest)
            picks = rng.uniform(size=trials) * total
            candidates = np.minimum(np.searchsorted(cumulative, picks), n - 1)
        d = np.minimum(closest[None], _sq_dists(x, x[candidates], x_sq).T)  # (trials, N)
        best = int(np.argmin(d.sum(axis=1)))
        centres[c] = x[candidates[best]]
        closest = d[best]
    return centres


def _lloyd(x: np.ndarray, centres: np.ndarray, x_sq: np.ndarray, tol: float):
    """Lloyd iterations from `centres`; returns (centres, inertia)."""
    k = centres.shape[0]
    labels = None
    for _ in range(MAX_ITER):
        d = _sq_dists(x, centres, x_sq)
        new_labels = d.argmin(axis=1)
        if labels is not None and np.array_equal(new_labels, labels):
            break
        labels = new_labels
        counts = np.bincount(labels, minlength=k)
        sums = np.zeros_like(centres)
        np.add.at(sums, labels, x)
        new = sums / np.maximum(counts, 1)[:, None]
        empty = np.flatnonzero(counts == 0)
        if empty.size:  # an empty cluster takes the points farthest from their centres
            far = np.argsort(-d[np.arange(len(x)), labels])[: empty.size]
            new[empty] = x[far]
        shift = float(((new - centres) ** 2).sum())
        centres = new
        if shift <= tol:
            break
    d = _sq_dists(x, centres, x_sq)
    return centres, float(d.min(axis=1).sum())


def kmeans(
    x: np.ndarray, k: int, *, seed: int = 0, n_init: int = N_INIT, tol: float = TOL
) -> np.ndarray:
    """Centres (k, D) float32 of the best of `n_init` k-means++ / Lloyd runs by inertia."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or not 0 < k <= x.shape[0]:
        raise ValueError(f"k-means needs 1 <= k <= N rows, got k={k} for shape {x.shape}")
    rng = np.random.default_rng(seed)
    x_sq = np.einsum("nd,nd->n", x, x)
    tol_abs = tol * float(np.mean(np.var(x, axis=0)))  # scale-free, as scikit-learn's
    best, best_inertia = None, np.inf
    for _ in range(n_init):
        centres, inertia = _lloyd(x, _kmeans_plusplus(x, k, x_sq, rng), x_sq, tol_abs)
        if inertia < best_inertia:
            best, best_inertia = centres, inertia
    return best.astype(np.float32)


def group_prototypes(
    emb: np.ndarray, domains: Sequence[str | None], n_clusters: int = N_CLUSTERS, seed: int = 0
) -> np.ndarray:
    """k-means of the source-domain rows (re-normalised), then every target-domain row.

    Rows without a domain (DCASE 2020, plain folders, enrolled audio) count as source. k is
    capped at the number of distinct source rows, so small groups get one prototype per row.
    """
    emb = np.asarray(emb, dtype=np.float32)
    target = np.asarray(domains, dtype=object) == "target"
    source = emb[~target]
    parts = []
    distinct = np.unique(source, axis=0)
    if len(distinct) > n_clusters:
        parts.append(unit_rows(kmeans(source, n_clusters, seed=seed)))
    elif len(distinct):
        parts.append(unit_rows(distinct))  # k = n: k-means would return the points themselves
    parts.append(unit_rows(emb[target]))
    return np.concatenate(parts).astype(np.float32)
