"""AUC / pAUC and the DCASE summaries against hand-computed values."""

import math

import numpy as np
import pytest

from msn_edge.metrics import auc, auc_difference, group_metrics, harmonic_mean, pauc, summarize

# Ten normals at 0.0 .. 0.9 and three anomalies: 0.95 beats all ten normals, 0.85 beats
# nine, 0.05 beats one -> AUC = 20 / 30.
NORMALS = np.arange(10) / 10
ANOMALIES = np.array([0.95, 0.85, 0.05])
LABELS = np.r_[np.zeros(10, int), np.ones(3, int)]
SCORES = np.r_[NORMALS, ANOMALIES]


def _mcclish(partial: float, max_fpr: float) -> float:
    lo, hi = 0.5 * max_fpr**2, max_fpr  # area under the diagonal / a perfect curve
    return 0.5 * (1 + (partial - lo) / (hi - lo))


def _pairwise_auc(normal: np.ndarray, anomaly: np.ndarray) -> float:
    """The Mann-Whitney definition: share of (anomaly, normal) pairs ranked right, ties 1/2."""
    diff = anomaly[:, None] - normal[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def test_auc_matches_hand_count():
    assert auc(LABELS, SCORES) == pytest.approx(20 / 30)
    rng = np.random.default_rng(0)
    n, a = rng.normal(size=40), rng.normal(0.7, size=15).round(1)
    labels = np.r_[np.zeros(40, int), np.ones(15, int)]
    assert auc(labels, np.r_[n, a]) == pytest.approx(_pairwise_auc(n, a))


def test_pauc_is_mcclish_standardised():
    # FPR steps of 0.1: within FPR <= 0.1 the curve sits at TPR 1/3 (only 0.95 is above
    # every normal), so the raw partial area is 0.1 * 1/3.
    assert pauc(LABELS, SCORES) == pytest.approx(_mcclish(0.1 / 3, 0.1))
    assert pauc(LABELS, SCORES) == pytest.approx(0.649123, abs=1e-6)
    # Perfect and random-worst separations hit the ends of the standardised range.
    assert pauc(LABELS, LABELS.astype(float)) == pytest.approx(1.0)
    assert pauc(LABELS, -LABELS.astype(float)) == pytest.approx(0.5 * (1 + (0 - 0.005) / 0.095))


def test_pauc_interpolates_inside_a_step():
    # Four normals: FPR steps of 0.25. An anomaly tied with the top normal makes the
    # curve a diagonal from (0, 1/2) to (0.25, 1); FPR 0.1 falls inside it.
    labels = np.array([0, 0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.6, 0.9, 0.6])
    tpr_at = 0.5 + 0.5 * 0.1 / 0.25
    partial = 0.1 * (0.5 + tpr_at) / 2
    assert pauc(labels, scores) == pytest.approx(_mcclish(partial, 0.1))


def test_one_class_gives_nan_and_a_note():
    assert math.isnan(auc(np.zeros(4, int), np.arange(4.0)))
    assert math.isnan(pauc(np.ones(4, int), np.arange(4.0)))
    row = group_metrics("dcase2020", "fan/id_00", "fan", np.zeros(3, int), np.arange(3.0))
    assert all(math.isnan(v) for v in row.values.values())
    assert row.notes == [
        "auc: no anomalous clips (all clips)",
        "pauc: no anomalous clips (all clips)",
    ]


def test_dcase2023_domains_use_all_anomalies():
    # Source normals s, target normals t, anomalies from both domains.
    labels = np.array([0, 0, 0, 0, 1, 1])
    domains = ["source", "source", "target", "target", "source", "target"]
    scores = np.array([0.1, 0.2, 0.6, 0.7, 0.5, 0.65])
    row = group_metrics("dcase2023", "fan/section_00", "fan", labels, scores, domains)
    # Source normals 0.1, 0.2 vs anomalies 0.5, 0.65: all 4 pairs right.
    assert row.values["auc_source"] == pytest.approx(1.0)
    # Target normals 0.6, 0.7 vs anomalies 0.5, 0.65: only (0.65 > 0.6) right.
    assert row.values["auc_target"] == pytest.approx(1 / 4)
    assert row.values["pauc"] == pytest.approx(pauc(labels, scores))
    assert (row.n_normal, row.n_anomaly, row.unit) == (4, 2, "section_00")
    assert row.notes == []


def test_dcase2023_official_is_harmonic_mean_of_all_values():
    mk = lambda g, t, v: group_metrics("dcase2023", g, t, *v)  # noqa: E731
    labels = np.array([0, 0, 1, 1])
    doms = ["source", "target", "source", "target"]
    rows = [
        mk("fan/section_00", "fan", (labels, np.array([0.1, 0.2, 0.9, 0.8]), doms)),
        mk("fan/section_01", "fan", (labels, np.array([0.5, 0.2, 0.3, 0.8]), doms)),
        mk("valve/section_00", "valve", (labels, np.array([0.4, 0.1, 0.5, 0.2]), doms)),
    ]
    values = [r.values[m] for r in rows for m in ("auc_source", "auc_target", "pauc")]
    s = summarize("dcase2023", rows)
    assert s.official_name == "hmean"
    assert s.official == pytest.approx(len(values) / sum(1 / v for v in values))
    fan = [rows[0].values["auc_source"], rows[1].values["auc_source"]]
    assert s.per_type["fan"]["auc_source"] == pytest.approx(2 / (1 / fan[0] + 1 / fan[1]))


def test_dcase2020_mean_averages_ids_then_types():
    labels = np.array([0, 0, 1, 1])
    rows = [
        group_metrics("dcase2020", "fan/id_00", "fan", labels, np.array([0.1, 0.2, 0.9, 0.8])),
        group_metrics("dcase2020", "fan/id_02", "fan", labels, np.array([0.1, 0.5, 0.3, 0.8])),
        group_metrics("dcase2020", "pump/id_00", "pump", labels, np.array([0.9, 0.8, 0.1, 0.2])),
    ]
    s = summarize("dcase2020", rows)
    assert s.per_type["fan"]["auc"] == pytest.approx((1.0 + 0.75) / 2)
    assert s.per_type["pump"]["auc"] == pytest.approx(0.0)
    assert s.overall["auc"] == pytest.approx((0.875 + 0.0) / 2)
    assert s.official == pytest.approx((s.overall["auc"] + s.overall["pauc"]) / 2)
    assert s.official_name == "mean" and s.notes == []


def test_undefined_values_are_left_out_with_a_note():
    good = group_metrics("dcase2020", "fan/id_00", "fan", np.array([0, 1]), np.array([0.1, 0.9]))
    bad = group_metrics("dcase2020", "fan/id_02", "fan", np.array([0, 0]), np.array([0.1, 0.9]))
    s = summarize("dcase2020", [good, bad])
    assert s.per_type["fan"]["auc"] == pytest.approx(1.0)
    assert s.notes == ["2 of 4 group values undefined (one class missing); left out"]
    assert math.isnan(harmonic_mean([math.nan]))
    assert harmonic_mean([0.0, 0.5]) == 0.0


def test_unknown_rule_is_refused():
    with pytest.raises(ValueError, match="unknown rule"):
        group_metrics("dcase2021", "g", "t", np.array([0, 1]), np.array([0.0, 1.0]))


def test_auc_difference_is_the_difference_and_delongs_se_matches_its_spread():
    """DeLong's SE of AUC(a) - AUC(b) on shared clips, against the spread of the
    difference over many simulated test sets (seeded: the same draws everywhere)."""
    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(24), np.zeros(24)].astype(bool)
    gains, ses = [], []
    for _ in range(300):
        shared = rng.standard_normal(labels.size)  # what both scorers see alike
        a = shared + 1.0 * labels + 0.5 * rng.standard_normal(labels.size)
        b = shared + 0.3 * labels + 0.5 * rng.standard_normal(labels.size)
        gain, se = auc_difference(labels, a, b)
        assert gain == pytest.approx(auc(labels, a) - auc(labels, b))
        gains.append(gain)
        ses.append(se)
    assert np.mean(ses) == pytest.approx(np.std(gains), rel=0.2)
    # Identical scorers differ by nothing, with no uncertainty.
    assert auc_difference(labels, a, a) == (0.0, 0.0)
