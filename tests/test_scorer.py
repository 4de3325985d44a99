"""Scoring numbers by hand, and the Detector end to end on a real toy bundle and WAV files."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
from sklearn.metrics.pairwise import cosine_distances
from toy_bundle import ToyModel, anomalous_signal, make_toy_bundle, normal_signal

from msn_edge.runtime.bundle import read_bundle
from msn_edge.runtime.detector import Detector
from msn_edge.runtime.engines import make_engine
from msn_edge.runtime.errors import AudioError, BundleError
from msn_edge.runtime.frontend import features, fit_window
from msn_edge.runtime.scorer import Scorer, anomaly_scores


def test_anomaly_scores_by_hand():
    protos = np.array([[1, 0, 0], [0, 1, 0]], np.float32)
    emb = np.array(
        [
            [1, 0, 0],  # on a prototype: 0
            [0.6, 0.8, 0],  # nearest is (0, 1, 0) at cos 0.8: 0.2
            [3, 4, 0],  # not unit: normalised to (0.6, 0.8, 0) first: 0.2
            [0, 0, 1],  # orthogonal to both: 1
            [-1, 0, 0],  # opposite the first, orthogonal to the second: 1
            [0, 0, 0],  # no direction at all: scores as orthogonal
        ],
        np.float32,
    )
    np.testing.assert_allclose(anomaly_scores(emb, protos), [0, 0.2, 0.2, 1, 1, 1], atol=1e-6)
    np.testing.assert_allclose(anomaly_scores([[-1, 0, 0]], protos[:1]), [2.0], atol=1e-6)


def test_anomaly_scores_match_sklearn_cosine_distance():
    rng = np.random.default_rng(0)
    emb, protos = rng.standard_normal((7, 16)), rng.standard_normal((5, 16))
    want = cosine_distances(emb, protos).min(axis=1)
    np.testing.assert_allclose(anomaly_scores(emb, protos), want, atol=1e-5)


def test_anomaly_scores_reject_mismatched_shapes():
    with pytest.raises(ValueError, match=r"embeddings \(2, 3\) do not match prototypes of size 4"):
        anomaly_scores(np.ones((2, 3)), np.ones((5, 4)))
    with pytest.raises(ValueError, match="non-empty"):
        anomaly_scores(np.ones((2, 3)), np.ones((0, 3)))


def test_scorer_verdict_is_strictly_above_threshold():
    scorer = Scorer(np.array([[2.0, 0.0]]), threshold=0.2)  # prototypes normalised on the way in
    np.testing.assert_allclose(scorer.prototypes, [[1.0, 0.0]])
    np.testing.assert_allclose(scorer.score([[0.6, 0.8]]), [0.4], atol=1e-6)
    assert scorer.verdict(np.array([0.1, 0.2, 0.3])).tolist() == [False, False, True]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    path = make_toy_bundle(tmp_path_factory.mktemp("bundle") / "toy.msn", groups=("toy/a", "toy/b"))
    return path


@pytest.fixture(scope="module")
def detector(toy):
    return Detector.open(toy, backend="cpu", threads=1)


def _reference_scores(bundle, group, waves):
    model = ToyModel.random(bundle.frontend, dim=bundle.embedding_dim, seed=0)
    emb = model.embed(*features(np.stack(waves), bundle.frontend))
    return anomaly_scores(emb, bundle.prototypes[group.start : group.stop])


def test_detector_matches_reference_math(detector):
    rng = np.random.default_rng(7)
    fe = detector.frontend
    waves = [normal_signal(fe, rng), anomalous_signal(fe, rng), normal_signal(fe, rng)]
    batch = detector.score_batch(np.stack(waves))
    want = _reference_scores(detector.bundle, detector.group, waves)
    np.testing.assert_allclose([s.score for s in batch], want, rtol=1e-4, atol=1e-5)
    assert [s.anomalous for s in batch] == [False, True, False]
    single = detector.score(waves[1])
    assert single.score == pytest.approx(batch[1].score, abs=1e-6)
    assert single.threshold == detector.group.threshold == detector.threshold
    assert single.frontend_ms > 0 and single.inference_ms > 0
    assert (detector.backend, detector.group.name) == ("cpu", "toy/a")


def test_detector_score_file(detector, tmp_path):
    fe = detector.frontend
    rng = np.random.default_rng(3)
    normal, anomalous = tmp_path / "normal.wav", tmp_path / "anomalous.wav"
    sf.write(normal, normal_signal(fe, rng), fe.sample_rate, subtype="PCM_16")
    sf.write(anomalous, anomalous_signal(fe, rng), fe.sample_rate, subtype="PCM_16")
    quiet, loud = detector.score_file(normal), detector.score_file(anomalous)
    assert not quiet.anomalous and loud.anomalous
    assert loud.score > 2 * loud.threshold > 2 * quiet.score

    short = tmp_path / "short.wav"  # 0.4 s: tiled to the 1 s window from its start
    clip = anomalous_signal(fe, rng)[: int(0.4 * fe.sample_rate)]
    sf.write(short, clip, fe.sample_rate, subtype="FLOAT")
    want = _reference_scores(detector.bundle, detector.group, [fit_window(clip, fe.window_samples)])
    assert detector.score_file(short).score == pytest.approx(float(want[0]), abs=1e-5)


def test_detector_file_rate_and_channels(detector, tmp_path):
    fe = detector.frontend
    wave = normal_signal(fe, np.random.default_rng(4))
    slow = tmp_path / "slow.wav"
    sf.write(slow, wave[::2], fe.sample_rate // 2)
    with pytest.raises(AudioError, match=r"slow\.wav: sample rate 8000 Hz, expected 16000 Hz"):
        detector.score_file(slow)
    assert not detector.score_file(slow, resample=True).anomalous
    stereo = tmp_path / "stereo.wav"
    sf.write(stereo, np.stack([wave, wave], axis=1), fe.sample_rate)
    with pytest.raises(AudioError, match="2 channels, expected mono"):
        detector.score_file(stereo)
    assert detector.score_file(stereo, downmix=True).score == pytest.approx(
        detector.score(wave).score, abs=1e-4
    )


def test_detector_rejects_wrong_window(detector):
    with pytest.raises(
        AudioError, match=r"window has 8000 samples, expected 16000 \(1 s at 16000 Hz\)"
    ):
        detector.score(np.zeros(8000, np.float32))
    with pytest.raises(AudioError, match=r"expected one mono window \(L,\)"):
        detector.score(np.zeros((2, 16000), np.float32))


def test_detector_group_and_threshold_override(toy):
    bundle = read_bundle(toy)
    engine = make_engine(bundle, "cpu")
    other = Detector(bundle, engine, group="toy/b")
    wave = normal_signal(bundle.frontend, np.random.default_rng(5))
    want = _reference_scores(bundle, bundle.group("toy/b"), [wave])
    assert other.score(wave).score == pytest.approx(float(want[0]), rel=1e-4, abs=1e-5)
    assert other.threshold == bundle.group("toy/b").threshold

    lenient = Detector(bundle, engine, threshold=5.0)
    loud = lenient.score(anomalous_signal(bundle.frontend, np.random.default_rng(6)))
    assert (loud.threshold, loud.anomalous) == (5.0, False)


def test_detector_open_unknown_group(toy):
    with pytest.raises(BundleError, match=r"no scoring group 'pump' \(groups: toy/a, toy/b\)"):
        Detector.open(toy, backend="cpu", group="pump")
