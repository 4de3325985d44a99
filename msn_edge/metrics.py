"""AUC and pAUC by the official DCASE rules (spec §5), per group and summarised.

DCASE 2020: AUC and pAUC per machine ID, averaged per machine type; the headline is the
mean of the per-type AUC and pAUC averages (the paper's "mean"). DCASE 2023: per machine
type and section, AUC(source) on source normals + all anomalies, AUC(target) on target
normals + all anomalies, pAUC on all clips; the official score is the harmonic mean of
all of those values. A group where one class is missing gets NaN and a note, not a crash:
small sample sets (and real recordings of one healthy machine) hit that routinely.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

import numpy as np
from sklearn.metrics import roc_auc_score

MAX_FPR = 0.1  # DCASE pAUC: the ROC area over FPR in [0, 0.1]
RULES = ("dcase2020", "dcase2023")
METRICS = {  # metric names per rule, in table order
    "dcase2020": ("auc", "pauc"),
    "dcase2023": ("auc_source", "auc_target", "pauc"),
}


def missing_class(labels: np.ndarray) -> str | None:
    """Why an AUC cannot be computed on these labels (1 = anomaly), or None if it can."""
    labels = np.asarray(labels)
    if labels.size == 0:
        return "no clips"
    if not labels.any():
        return "no anomalous clips"
    if labels.all():
        return "no normal clips"
    return None


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (1 = anomaly, higher score = more anomalous); NaN if undefined."""
    if missing_class(labels):
        return math.nan
    return float(roc_auc_score(labels, scores))


def pauc(labels: np.ndarray, scores: np.ndarray, max_fpr: float = MAX_FPR) -> float:
    """McClish-standardised partial AUC over FPR in [0, max_fpr], as the DCASE evaluators."""
    if missing_class(labels):
        return math.nan
    return float(roc_auc_score(labels, scores, max_fpr=max_fpr))


def auc_standard_error(value: float, n_anomaly: int, n_normal: int) -> float:
    """Standard error of an AUC estimated from n_anomaly and n_normal clips (Hanley and
    McNeil, 1982): what a margin between two AUCs must be measured in."""
    q1 = value / (2 - value)
    q2 = 2 * value**2 / (1 + value)
    var = (
        value * (1 - value) + (n_anomaly - 1) * (q1 - value**2) + (n_normal - 1) * (q2 - value**2)
    ) / (n_anomaly * n_normal)
    return math.sqrt(max(var, 0.0))


def auc_difference(
    labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray
) -> tuple[float, float]:
    """AUC(a) − AUC(b) of two scorers of the same clips, and its standard error by
    DeLong's method for correlated ROC curves (DeLong et al., 1988): scoring the same
    clips makes the two AUCs covary, which a difference must account for."""
    labels = np.asarray(labels, dtype=bool)
    pos_a, neg_a = scores_a[labels], scores_a[~labels]
    pos_b, neg_b = scores_b[labels], scores_b[~labels]

    def components(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # psi(x, y) = 1 if x > y, 1/2 on ties: per anomaly (V10) and per normal (V01).
        psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
        return psi.mean(axis=1), psi.mean(axis=0)

    v10_a, v01_a = components(pos_a, neg_a)
    v10_b, v01_b = components(pos_b, neg_b)
    s10 = np.cov(np.stack([v10_a, v10_b]))
    s01 = np.cov(np.stack([v01_a, v01_b]))
    cov = s10 / len(pos_a) + s01 / len(neg_a)
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    return float(v10_a.mean() - v10_b.mean()), math.sqrt(max(float(var), 0.0))


@dataclass
class GroupMetrics:
    """One scoring group's metrics (fractions in [0, 1], NaN where undefined)."""

    group: str  # "fan/id_00", "fan/section_00" or a plain folder name
    machine_type: str
    n_normal: int
    n_anomaly: int
    values: dict[str, float]
    notes: list[str] = field(default_factory=list)

    @property
    def unit(self) -> str:
        """The part of the group name after the machine type (id_XX / section_XX), or ""."""
        return self.group.partition("/")[2]


def group_metrics(
    rule: str,
    group: str,
    machine_type: str,
    labels: np.ndarray,
    scores: np.ndarray,
    domains: list[str] | None = None,
) -> GroupMetrics:
    """The rule's metrics for one group; `domains` ("source"/"target") only for dcase2023."""
    labels = np.asarray(labels, dtype=int)
    scores = np.asarray(scores, dtype=float)
    subsets = {"auc": ("all clips", None), "pauc": ("all clips", None)}
    if rule == "dcase2023":
        if domains is None:
            raise ValueError("dcase2023 metrics need each clip's domain")
        dom = np.asarray(domains)
        anomaly = labels == 1
        subsets = {
            "auc_source": ("source", anomaly | (dom == "source")),
            "auc_target": ("target", anomaly | (dom == "target")),
            "pauc": ("all clips", None),
        }
    elif rule != "dcase2020":
        raise ValueError(f"unknown rule {rule!r}; choose one of {', '.join(RULES)}")
    values: dict[str, float] = {}
    notes: list[str] = []
    for name, (what, mask) in subsets.items():
        sel = np.ones(labels.size, bool) if mask is None else mask
        reason = missing_class(labels[sel])
        if reason:
            notes.append(f"{name}: {reason} ({what})")
        fn = pauc if name == "pauc" else auc
        values[name] = fn(labels[sel], scores[sel])
    return GroupMetrics(
        group=group,
        machine_type=machine_type,
        n_normal=int((labels == 0).sum()),
        n_anomaly=int((labels == 1).sum()),
        values=values,
        notes=notes,
    )


def harmonic_mean(values: list[float]) -> float:
    """Harmonic mean of the defined values (NaN if none); 0 if any value is 0."""
    defined = [v for v in values if not math.isnan(v)]
    return statistics.harmonic_mean(defined) if defined else math.nan


def arithmetic_mean(values: list[float]) -> float:
    """Mean of the defined values (NaN if none)."""
    defined = [v for v in values if not math.isnan(v)]
    return statistics.fmean(defined) if defined else math.nan


@dataclass
class Summary:
    """Per-machine-type averages and the rule's official score."""

    rule: str
    per_type: dict[str, dict[str, float]]  # machine type -> metric -> average over its groups
    overall: dict[str, float]  # metric -> average over machine types / all groups
    official_name: str  # "mean" (dcase2020) or "hmean" (dcase2023)
    official: float
    notes: list[str] = field(default_factory=list)


def summarize(rule: str, rows: list[GroupMetrics]) -> Summary:
    """Averages per machine type and the official score, leaving undefined values out."""
    names = METRICS[rule]
    average = harmonic_mean if rule == "dcase2023" else arithmetic_mean
    types = sorted({r.machine_type for r in rows})
    per_type = {
        t: {m: average([r.values[m] for r in rows if r.machine_type == t]) for m in names}
        for t in types
    }
    if rule == "dcase2023":
        # Official: one harmonic mean over every group's AUC_s, AUC_t and pAUC values.
        overall = {m: harmonic_mean([r.values[m] for r in rows]) for m in names}
        official = harmonic_mean([r.values[m] for r in rows for m in names])
        official_name = "hmean"
    else:
        # Paper's tables: AUC and pAUC averaged per type, then over types; headline = mean.
        overall = {m: arithmetic_mean([per_type[t][m] for t in types]) for m in names}
        official = arithmetic_mean(list(overall.values()))
        official_name = "mean"
    n_undefined = sum(math.isnan(r.values[m]) for r in rows for m in names)
    notes = []
    if n_undefined:
        total = len(rows) * len(names)
        notes.append(
            f"{n_undefined} of {total} group values undefined (one class missing); left out"
        )
    return Summary(rule, per_type, overall, official_name, official, notes)
