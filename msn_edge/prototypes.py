"""Prototypes and decision thresholds per scoring group (spec §4).

Prototypes of a group: k-means centroids of its source-domain normal training embeddings,
re-normalised to unit length, plus every target-domain embedding as its own prototype.
The anomaly score of a clip is its minimum cosine distance to its group's prototypes
(`msn_edge.runtime.scorer.anomaly_scores`, the same function the edge runs).

The threshold is a quantile of scores of normal clips that the prototypes scoring them
were not fit on: a held-out share of the group, or, when that share would be too small
for a quantile to mean much, leave-one-out over the whole group. Afterwards the final
prototypes are refit on all of the group's clips: that is the paper's prototype set (and
keeps every scarce target-domain clip as a prototype), and a threshold calibrated against
prototypes fit on fewer clips errs slightly high, on the side of fewer false alarms.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from msn_edge.config import Config, ScoringConfig
from msn_edge.datasets import Clip
from msn_edge.inference import embed_clips
from msn_edge.model import MSN
from msn_edge.runtime.bundle import ScoringGroup
from msn_edge.runtime.errors import DatasetError, MsnEdgeError
from msn_edge.runtime.prototypes import MIN_HOLDOUT, group_prototypes
from msn_edge.runtime.scorer import anomaly_scores

SCORING_FORMAT = 1
PROTOTYPES_FILE = "scoring.npz"
GROUPS_FILE = "scoring.json"


@dataclass
class Scoring:
    """Prototypes (P, D) float32 unit rows; each group owns rows [start, stop)."""

    prototypes: np.ndarray
    groups: list[ScoringGroup]

    def group(self, name: str) -> ScoringGroup:
        for g in self.groups:
            if g.name == name:
                return g
        known = ", ".join(g.name for g in self.groups)
        raise DatasetError(f"no prototypes for scoring group {name!r} (the run has: {known})")

    def prototypes_of(self, name: str) -> np.ndarray:
        g = self.group(name)
        return self.prototypes[g.start : g.stop]


def split_holdout(domains: Sequence[str], fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the clips held out for calibration: floor(fraction) of each domain.

    Stratified by domain so the held-out clips mix source and target as the group does;
    seeded, so the same run holds out the same clips.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"calibration_fraction must be in (0, 1), got {fraction}")
    domains = np.asarray(domains)
    rng = np.random.default_rng(seed)
    held = np.zeros(domains.size, dtype=bool)
    for d in sorted(set(domains.tolist())):
        idx = np.flatnonzero(domains == d)
        held[rng.permutation(idx)[: int(fraction * idx.size)]] = True
    return held


def calibrate(
    name: str, emb: np.ndarray, domains: Sequence[str], cfg: ScoringConfig, seed: int
) -> tuple[float, dict]:
    """Threshold of one group from normal clips its calibration prototypes never saw."""
    domains = np.asarray(domains)
    n = len(emb)
    held = split_holdout(domains, cfg.calibration_fraction, seed)
    if held.sum() >= MIN_HOLDOUT:
        fit = group_prototypes(emb[~held], domains[~held], cfg.n_clusters, seed)
        scores = anomaly_scores(emb[held], fit)
        info = {"method": "holdout", "n_fit": int((~held).sum())}
    elif n >= 2:
        scores = np.empty(n, dtype=np.float32)
        for i in range(n):
            rest = np.arange(n) != i
            fit = group_prototypes(emb[rest], domains[rest], cfg.n_clusters, seed)
            scores[i] = anomaly_scores(emb[i : i + 1], fit)[0]
        info = {"method": "leave-one-out", "n_fit": n - 1}
    else:
        raise DatasetError(
            f"scoring group {name!r} has 1 normal training clip; at least 2 are needed "
            "(one to fit prototypes on, one to calibrate the threshold with)"
        )
    threshold = float(np.quantile(scores, cfg.threshold_quantile))
    info.update(
        quantile=cfg.threshold_quantile,
        n_clips=int(scores.size),
        score_min=float(scores.min()),
        score_mean=float(scores.mean()),
        score_std=float(scores.std()),
        score_max=float(scores.max()),
        n_source=int((domains != "target").sum()),
        n_target=int((domains == "target").sum()),
        prototypes=f"refit on all {n} clips after calibration",
    )
    return threshold, info


def fit_scoring_embeddings(
    emb: np.ndarray,
    groups: Sequence[str],
    domains: Sequence[str],
    cfg: ScoringConfig,
    seed: int,
) -> Scoring:
    """Prototypes and a calibrated threshold for every group of these normal embeddings."""
    names = np.asarray(groups)
    domains = np.asarray(domains)
    parts, out, start = [], [], 0
    for name in sorted(set(names.tolist())):
        sel = names == name
        threshold, info = calibrate(name, emb[sel], domains[sel], cfg, seed)
        protos = group_prototypes(emb[sel], domains[sel], cfg.n_clusters, seed)
        parts.append(protos)
        out.append(ScoringGroup(name, start, start + len(protos), threshold, info))
        start += len(protos)
    return Scoring(np.concatenate(parts).astype(np.float32), out)


def fit_scoring(
    model: MSN,
    config: Config,
    clips: Sequence[Clip],
    *,
    device: str = "cpu",
    progress: bool = False,
) -> Scoring:
    """Embed the normal training clips and fit prototypes and thresholds per Clip.group."""
    if not clips:
        raise DatasetError("no normal training clips to fit prototypes on")
    for c in clips:
        if c.label != "normal":
            raise DatasetError(f"{c.path}: prototypes are fit on normal clips only, got {c.label}")
    emb = embed_clips(model, clips, config.frontend, device=device, progress=progress)
    return fit_scoring_embeddings(
        emb, [c.group for c in clips], [c.domain for c in clips], config.scoring, config.train.seed
    )


def score_embeddings(scoring: Scoring, emb: np.ndarray, groups: Sequence[str]) -> np.ndarray:
    """Anomaly score of each row against the prototypes of its group."""
    names = np.asarray(groups)
    scores = np.empty(len(names), dtype=np.float32)
    for name in sorted(set(names.tolist())):
        sel = names == name
        scores[sel] = anomaly_scores(emb[sel], scoring.prototypes_of(name))
    return scores


def score_clips(
    model: MSN,
    config: Config,
    scoring: Scoring,
    clips: Sequence[Clip],
    *,
    device: str = "cpu",
    progress: bool = False,
) -> np.ndarray:
    """Anomaly scores of clips, each against its own group's prototypes."""
    groups = [c.group for c in clips]
    for name in sorted(set(groups)):
        scoring.group(name)  # fail before the slow part if a group has no prototypes
    emb = embed_clips(model, clips, config.frontend, device=device, progress=progress)
    return score_embeddings(scoring, emb, groups)


def save_scoring(run_dir: str | Path, scoring: Scoring) -> None:
    """RUN/scoring.npz (prototypes) and RUN/scoring.json (groups, thresholds, calibration)."""
    run_dir = Path(run_dir)
    np.savez(run_dir / PROTOTYPES_FILE, prototypes=scoring.prototypes.astype(np.float32))
    doc = {"format": SCORING_FORMAT, "groups": [asdict(g) for g in scoring.groups]}
    (run_dir / GROUPS_FILE).write_text(json.dumps(doc, indent=2) + "\n")


def load_scoring(run_dir: str | Path, embedding_dim: int | None = None) -> Scoring:
    """Read what save_scoring wrote, checking that groups and prototype rows agree.

    With `embedding_dim`, also that the prototypes fit the model that will be scored.
    """
    run_dir = Path(run_dir)
    npz, meta = run_dir / PROTOTYPES_FILE, run_dir / GROUPS_FILE
    for p in (npz, meta):
        if not p.is_file():
            raise MsnEdgeError(f"{p}: missing; the run has no prototypes (training writes them)")
    try:
        with np.load(npz, allow_pickle=False) as f:
            prototypes = f["prototypes"].astype(np.float32)
        doc = json.loads(meta.read_text())
        if doc.get("format") != SCORING_FORMAT:
            raise ValueError(f"format {doc.get('format')!r}, expected {SCORING_FORMAT}")
        groups = [ScoringGroup(**g) for g in doc["groups"]]
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise MsnEdgeError(f"{run_dir}: unreadable scoring files ({e})") from None
    stop = 0
    for g in groups:
        if g.start != stop or not g.start < g.stop <= len(prototypes):
            raise MsnEdgeError(f"{meta}: group {g.name!r} rows do not match {npz}")
        stop = g.stop
    if prototypes.ndim != 2 or stop != len(prototypes):
        raise MsnEdgeError(f"{meta}: groups cover {stop} rows, {npz} has {len(prototypes)}")
    if embedding_dim is not None and prototypes.shape[1] != embedding_dim:
        raise MsnEdgeError(
            f"{npz}: prototypes of size {prototypes.shape[1]}, the model's embedding has "
            f"{embedding_dim}; they belong to another model"
        )
    return Scoring(prototypes, groups)
