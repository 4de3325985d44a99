"""Prototypes, thresholds and scoring per group (spec §4), and embedding clips."""

import json

import numpy as np
import pytest
import torch

from msn_edge.config import ScoringConfig, preset
from msn_edge.datasets import load_wave, scan
from msn_edge.inference import embed_clips
from msn_edge.model import MSN
from msn_edge.prototypes import (
    MIN_HOLDOUT,
    Scoring,
    fit_scoring,
    fit_scoring_embeddings,
    group_prototypes,
    load_scoring,
    save_scoring,
    score_clips,
    score_embeddings,
    split_holdout,
)
from msn_edge.runtime.bundle import ScoringGroup
from msn_edge.runtime.errors import DatasetError, MsnEdgeError
from msn_edge.runtime.scorer import anomaly_scores

ONE_PROTOTYPE_PER_CLIP = ScoringConfig(n_clusters=10_000)  # k-means returns the points


def unit_rows(n: int, d: int = 8, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def sorted_rows(x: np.ndarray) -> np.ndarray:
    return x[np.lexsort(x.T[::-1])]


def test_kmeans_prototypes_are_unit_rows_capped_at_n_clusters():
    protos = group_prototypes(unit_rows(40), ["source"] * 40, n_clusters=16, seed=0)
    assert protos.shape == (16, 8) and protos.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(protos, axis=1), 1.0, atol=1e-6)
    # Fewer clips than clusters: one prototype per clip, the clips themselves.
    few = unit_rows(5)
    protos = group_prototypes(few, [None] * 5, n_clusters=16, seed=0)
    np.testing.assert_allclose(sorted_rows(protos), sorted_rows(few), atol=1e-6)
    # Duplicated clips do not ask k-means for more clusters than there are points.
    dup = np.concatenate([few, few])
    assert group_prototypes(dup, ["source"] * 10, n_clusters=16, seed=0).shape == (5, 8)


def test_target_clips_are_their_own_prototypes():
    emb = unit_rows(33)
    domains = ["source"] * 30 + ["target"] * 3
    protos = group_prototypes(emb, domains, n_clusters=16, seed=0)
    assert protos.shape == (19, 8)
    np.testing.assert_allclose(protos[16:], emb[30:], atol=1e-6)
    # Only target clips: no k-means at all.
    assert group_prototypes(emb[30:], domains[30:], 16, 0).shape == (3, 8)


def test_training_embeddings_score_zero():
    emb = unit_rows(74)
    groups = ["fan/section_00"] * 64 + ["valve/section_00"] * 10
    domains = ["source"] * 60 + ["target"] * 4 + ["source"] * 10
    scoring = fit_scoring_embeddings(emb, groups, domains, ScoringConfig(), seed=0)
    assert [g.name for g in scoring.groups] == ["fan/section_00", "valve/section_00"]
    fan, valve = scoring.groups
    assert (fan.start, fan.stop, valve.start, valve.stop) == (0, 20, 20, 30)
    scores = score_embeddings(scoring, emb, groups)
    np.testing.assert_allclose(scores[60:], 0.0, atol=1e-5)  # target rows and small group
    # 60 source clips share 16 centroids: only a cluster of one can sit on its centroid.
    assert (scores[:60] > 1e-4).sum() >= 60 - 16
    # Scored against their own group only: valve rows are far from fan's prototypes.
    assert anomaly_scores(emb[64:], scoring.prototypes_of("fan/section_00")).min() > 1e-3


def test_split_holdout_is_stratified_and_seeded():
    domains = ["source"] * 50 + ["target"] * 10
    held = split_holdout(domains, 0.2, seed=3)
    assert held[:50].sum() == 10 and held[50:].sum() == 2
    assert np.array_equal(held, split_holdout(domains, 0.2, seed=3))
    assert not np.array_equal(held, split_holdout(domains, 0.2, seed=4))
    with pytest.raises(ValueError, match="calibration_fraction"):
        split_holdout(domains, 1.0, seed=0)


def test_threshold_is_a_quantile_of_held_out_clips_only():
    n = 5 * MIN_HOLDOUT
    emb = unit_rows(n, seed=1)
    domains = ["source"] * n
    scoring = fit_scoring_embeddings(emb, ["m"] * n, domains, ONE_PROTOTYPE_PER_CLIP, seed=7)
    (g,) = scoring.groups
    cal = g.calibration
    assert cal["method"] == "holdout"
    assert (cal["n_clips"], cal["n_fit"]) == (n // 5, n - n // 5)
    # Every fit clip is its own prototype and scores 0, so the calibration scores are
    # exactly those of the held-out clips against the others: none of them was fit on.
    held = split_holdout(domains, ONE_PROTOTYPE_PER_CLIP.calibration_fraction, seed=7)
    expected = anomaly_scores(emb[held], emb[~held])
    assert cal["score_min"] == pytest.approx(expected.min(), abs=1e-6)
    assert g.threshold == pytest.approx(np.quantile(expected, 0.95), abs=1e-6)
    assert cal["score_max"] == pytest.approx(expected.max(), abs=1e-6)
    # The final prototypes are refit on every clip.
    assert scoring.prototypes.shape == (n, 8)
    assert cal["prototypes"] == f"refit on all {n} clips after calibration"


def test_small_group_uses_leave_one_out():
    emb = unit_rows(6, seed=2)
    scoring = fit_scoring_embeddings(emb, ["m"] * 6, ["source"] * 6, ONE_PROTOTYPE_PER_CLIP, 0)
    (g,) = scoring.groups
    assert g.calibration["method"] == "leave-one-out"
    assert (g.calibration["n_clips"], g.calibration["n_fit"]) == (6, 5)
    nearest_other = [anomaly_scores(emb[i : i + 1], np.delete(emb, i, axis=0))[0] for i in range(6)]
    assert g.threshold == pytest.approx(np.quantile(nearest_other, 0.95), abs=1e-6)


def test_one_clip_group_is_refused_by_name():
    with pytest.raises(DatasetError, match="'pump/id_00' has 1 normal training clip"):
        fit_scoring_embeddings(unit_rows(1), ["pump/id_00"], ["source"], ScoringConfig(), 0)


def test_unknown_group_names_the_known_ones():
    scoring = Scoring(unit_rows(2), [ScoringGroup("fan/id_00", 0, 2, 0.3, {})])
    with pytest.raises(DatasetError, match=r"'pump/id_00'.*fan/id_00"):
        score_embeddings(scoring, unit_rows(1), ["pump/id_00"])


def test_save_and_load_round_trip(tmp_path):
    emb = unit_rows(24)
    groups = ["a"] * 12 + ["b"] * 12
    scoring = fit_scoring_embeddings(emb, groups, ["source"] * 24, ScoringConfig(), seed=0)
    save_scoring(tmp_path, scoring)
    with np.load(tmp_path / "scoring.npz", allow_pickle=False) as f:
        assert f["prototypes"].dtype == np.float32
    back = load_scoring(tmp_path)
    np.testing.assert_array_equal(back.prototypes, scoring.prototypes)
    assert back.groups == scoring.groups
    with pytest.raises(MsnEdgeError, match="prototypes of size 8, the model's embedding has 128"):
        load_scoring(tmp_path, embedding_dim=128)
    doc = json.loads((tmp_path / "scoring.json").read_text())
    doc["groups"][1]["stop"] += 1
    (tmp_path / "scoring.json").write_text(json.dumps(doc))
    with pytest.raises(MsnEdgeError, match="group 'b' rows"):
        load_scoring(tmp_path)
    with pytest.raises(MsnEdgeError, match="scoring.npz: missing"):
        load_scoring(tmp_path / "nowhere")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = preset("tiny")
    return cfg, MSN(cfg.model)


def test_embed_clips_gives_unit_rows_independent_of_batching(tiny):
    cfg, model = tiny
    rng = np.random.default_rng(0)
    n = cfg.frontend.window_samples
    # Short clips are tiled, long ones truncated, as the front-end does.
    waves = [rng.normal(0, 0.1, size).astype(np.float32) for size in (n, n // 3, n + 999)]
    model.train()
    one = embed_clips(model, waves, cfg.frontend, batch_size=1)
    three = embed_clips(model, waves, cfg.frontend, batch_size=3)
    assert model.training  # mode given back
    assert one.shape == (3, cfg.model.embedding_dim) and one.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(one, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(one, three, atol=1e-5)  # eval mode: no batch statistics
    assert embed_clips(model, [], cfg.frontend).shape == (0, cfg.model.embedding_dim)


def test_fit_and_score_real_clips(tiny, shared_data):
    cfg, model = tiny
    train = scan(shared_data / "mimii_fan", split="train")
    scoring = fit_scoring(model, cfg, train)
    (g,) = scoring.groups
    assert g.name == "fan/id_00" and g.calibration["method"] == "leave-one-out"
    assert g.stop == min(cfg.scoring.n_clusters, len(train))
    scores = score_clips(model, cfg, scoring, train)
    np.testing.assert_allclose(scores, 0.0, atol=1e-4)  # each clip is its own prototype
    waves = [load_wave(c, cfg.frontend) for c in train[:2]]
    np.testing.assert_array_equal(
        embed_clips(model, waves, cfg.frontend), embed_clips(model, train[:2], cfg.frontend)
    )
    test = scan(shared_data / "mimii_fan", split="test")
    with pytest.raises(DatasetError, match="normal clips only"):
        fit_scoring(model, cfg, [c for c in test if c.label != "normal"])
