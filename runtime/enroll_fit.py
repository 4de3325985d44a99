"""Enrollment's prototypes and threshold, fit the way training fits them (spec §4).

Replacing or adding a group fits k-means prototypes of the new windows, as training does
for source-domain clips; an update keeps the group's prototypes and adds every new window
as a target-domain prototype, so the machine's old and new normal both count.

The threshold comes from windows held out of the fit: the latest share in time (the
machine as it runs now), and never a window that shares audio with one the calibration
prototypes were fit on (with a hop shorter than the window, neighbours overlap and would
score each other near zero, setting the threshold too low). Too few for a held-out share:
leave-one-out, each window against the prototypes of every window it shares no audio with.
As in training, the final prototypes are then refit on all windows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from msn_edge.runtime.bundle import ScoringGroup
from msn_edge.runtime.enroll_feed import Embedded
from msn_edge.runtime.errors import MsnEdgeError
from msn_edge.runtime.frontend import FrontendConfig
from msn_edge.runtime.prototypes import (
    CALIBRATION_FRACTION,
    MIN_HOLDOUT,
    N_CLUSTERS,
    THRESHOLD_QUANTILE,
    group_prototypes,
)
from msn_edge.runtime.scorer import anomaly_scores
from msn_edge.runtime.stream import hop_samples

SECONDS_PER_DAY = 86_400.0


@dataclass(frozen=True)
class EnrollOptions:
    group: str  # the scoring group (machine) to enroll
    update: bool = False  # add target-domain prototypes to the group instead of replacing it
    hop_s: float | None = None  # window hop; None: the window (also the monitor's default)
    max_seconds: float | None = None  # read at most this much audio
    quantile: float | None = None  # threshold = this quantile of held-out scores
    false_alarms_per_day: float | None = None  # ... or the score this rate of windows exceeds
    calibration_fraction: float = CALIBRATION_FRACTION
    n_clusters: int = N_CLUSTERS
    seed: int = 0  # k-means restarts

    def hop(self, frontend: FrontendConfig) -> int:
        """Validate the options for this bundle; the hop in samples."""
        if not isinstance(self.group, str) or not self.group.strip():
            raise MsnEdgeError("the group to enroll needs a name (--group NAME)")
        if self.quantile is not None and self.false_alarms_per_day is not None:
            raise MsnEdgeError("give --quantile or --false-alarms-per-day, not both")
        if self.quantile is not None and not 0.0 < self.quantile < 1.0:
            raise MsnEdgeError(f"--quantile must be between 0 and 1, got {self.quantile:g}")
        fa = self.false_alarms_per_day
        if fa is not None and not (math.isfinite(fa) and fa > 0):
            raise MsnEdgeError(f"--false-alarms-per-day must be more than 0, got {fa:g}")
        if self.max_seconds is not None and not (
            math.isfinite(self.max_seconds) and self.max_seconds > 0
        ):
            raise MsnEdgeError(
                f"the audio to enroll must be more than 0 s, got {self.max_seconds:g}"
            )
        if self.hop_s is not None and not math.isfinite(self.hop_s):
            raise MsnEdgeError(f"--hop must be a number of seconds, got {self.hop_s:g}")
        if not 0.0 < self.calibration_fraction < 1.0 or self.n_clusters < 1:
            raise MsnEdgeError("calibration fraction must be in (0, 1) and clusters at least 1")
        return hop_samples(frontend, self.hop_s)


def _overlaps(segments: np.ndarray, starts: np.ndarray, rows: np.ndarray, size: int):
    """(len(rows), N) bool: window rows[i] shares audio with window j (itself included)."""
    same = segments[rows][:, None] == segments[None, :]
    return same & (np.abs(starts[rows][:, None] - starts[None, :]) < size)


def independent_windows(segments: np.ndarray, starts: np.ndarray, size: int) -> int:
    """How many windows can be picked that share no audio (greedy in stream order)."""
    count, last = 0, {}
    for seg, start in zip(segments.tolist(), starts.tolist(), strict=True):
        if seg not in last or start - last[seg] >= size:
            count += 1
            last[seg] = start
    return count


def exponential_tail(scores: np.ndarray, p: float) -> float:
    """The score exceeded with probability `p`, from an exponential fit to the upper half.

    Peaks over threshold: above the median u, excesses are modelled as exponential (a
    generalised Pareto with shape 0, the usual model for a light tail) with the mean excess
    b, so P(score > u + x) = P(score > u) exp(-x / b). Lighter than a log-normal tail,
    heavier than a normal one, and it needs only a mean.
    """
    u = float(np.median(scores))
    above = scores[scores > u]
    if above.size == 0:  # every score the same: nothing to extrapolate
        return u
    p_u = above.size / scores.size
    return u + float((above - u).mean()) * math.log(p_u / p) if p < p_u else u


def threshold_from(scores: np.ndarray, options: EnrollOptions, hop_s: float) -> tuple[float, dict]:
    """A quantile of held-out normal scores, or the score that `false_alarms_per_day` of
    the day's windows (at this hop) exceed.

    One false alarm a day at a 10 s hop is the 0.99988 quantile: measured only with over
    8640 held-out windows. With fewer, the tail is extrapolated (`exponential_tail`), and
    the threshold is never below the largest score measured.
    """
    fa = options.false_alarms_per_day
    if fa is None:
        q = THRESHOLD_QUANTILE if options.quantile is None else options.quantile
        return float(np.quantile(scores, q)), {"quantile": q, "false_alarms_per_day": None}
    per_day = SECONDS_PER_DAY / hop_s
    if fa >= per_day:
        raise MsnEdgeError(
            f"--false-alarms-per-day {fa:g} is every window or more ({per_day:.0f} windows a "
            f"day at a {hop_s:g} s hop)"
        )
    p = fa / per_day
    extrapolated = scores.size * p < 1.0
    if extrapolated:
        threshold = max(exponential_tail(scores, p), float(scores.max()))
    else:
        threshold = float(np.quantile(scores, 1.0 - p))
    return threshold, {
        "quantile": 1.0 - p,
        "false_alarms_per_day": fa,
        "windows_per_day": per_day,
        "extrapolated": bool(extrapolated),
        "tail_fit": "exponential over the median" if extrapolated else None,
    }


@dataclass(frozen=True)
class GroupFit:
    prototypes: np.ndarray  # the group's rows in the new bundle
    threshold: float
    calibration: dict
    held_scores: np.ndarray  # normal scores the threshold came from


def fit_group(
    data: Embedded,
    window_samples: int,
    hop_s: float,
    options: EnrollOptions,
    previous: ScoringGroup | None = None,
    previous_prototypes: np.ndarray | None = None,
) -> GroupFit:
    """Prototypes and threshold of the group from these windows' embeddings.

    With `options.update`, `previous` (its prototypes `previous_prototypes`) stays, every
    new window joins as a target-domain prototype, and the threshold is the larger of the
    previous one and the new calibration: both normals stay below it.
    """
    emb, n = data.emb, len(data.emb)

    def prototypes_of(rows: np.ndarray) -> np.ndarray:
        if options.update:
            new = group_prototypes(rows, ["target"] * len(rows))
            return np.concatenate([previous_prototypes, new]).astype(np.float32)
        return group_prototypes(rows, [None] * len(rows), options.n_clusters, options.seed)

    n_held = int(options.calibration_fraction * n)
    held = np.zeros(n, dtype=bool)
    held[n - n_held :] = True  # the latest windows: calibration on audio the fit never heard
    touching = _overlaps(data.segments, data.starts, np.flatnonzero(held), window_samples)
    fit = ~held & ~touching.any(axis=0)
    if n_held >= MIN_HOLDOUT and fit.any():
        scores = anomaly_scores(emb[held], prototypes_of(emb[fit]))
        info = {"method": "holdout", "n_fit": int(fit.sum()), "held_out": "latest windows"}
    else:  # too few for a held-out share: each window against all that share no audio with it
        near = _overlaps(data.segments, data.starts, np.arange(n), window_samples)
        scores = np.array(
            [anomaly_scores(emb[i : i + 1], prototypes_of(emb[~near[i]]))[0] for i in range(n)],
            dtype=np.float32,
        )
        held[:] = True
        info = {"method": "leave-one-out", "n_fit": int(n - near.sum(axis=1).max())}
    threshold, rule = threshold_from(scores, options, hop_s)
    info.update(
        rule,
        n_clips=int(scores.size),  # the name training's calibration uses
        n_windows=n,
        hop_s=hop_s,
        score_min=float(scores.min()),
        score_mean=float(scores.mean()),
        score_std=float(scores.std()),
        score_max=float(scores.max()),
        prototypes=f"refit on all {n} windows after calibration",
        by="msn-edge enroll",
    )
    if options.update:
        info["calibrated_threshold"] = threshold
        info["previous_threshold"] = previous.threshold
        threshold = max(threshold, previous.threshold)
    return GroupFit(prototypes_of(emb), float(threshold), info, scores)
