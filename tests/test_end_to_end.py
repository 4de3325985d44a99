"""End to end on synthetic machines: train tiny -> evaluate -> export -> monitor a stream.

One small run (the tiny preset as users train it, fans and sliders, two machines each)
is trained for real and must learn: its AUC on the synthetic faults must beat the same
network untrained by several standard errors of this test set. The same run is exported, and the
torch-free monitor must flag the faulty stretch of a recording.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner
from train_helpers import synth_set

from msn_edge.cli import main
from msn_edge.config import preset, with_recipe
from msn_edge.evaluate import evaluate
from msn_edge.metrics import auc, auc_difference, auc_standard_error
from msn_edge.synth import synth_stream
from msn_edge.training import train

pytestmark = pytest.mark.slow  # ~3 min on 2 cores: trains twice for real

KINDS = ("fan", "slider")
IDS = 2  # machines per kind: 4 groups in all
N_TRAIN = 20  # normal training clips per machine
CLIP_S = 10.0  # DCASE-length clips
N_TEST = 60  # normal and anomalous test clips per machine: SE of the mean gain ~0.034
MARGIN_SE = 3.0  # trained must beat untrained by this many standard errors


def e2e_config(**train):
    """The tiny preset at 10 s windows with the log-speed recipe, in batches of 16:
    80 clips make 5 steps an epoch, and the recipe's min_steps 120 steps: ~2 min on 2 cores."""
    cfg = with_recipe(preset("tiny"), "log-speed")  # the recipe that learns these faults
    return replace(cfg, train=replace(cfg.train, batch_size=16, **train))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    data = root / "data"
    synth_set(data, kinds=KINDS, ids=IDS, n_train=N_TRAIN, n_test=N_TEST, seconds=CLIP_S)
    result = train([data], root / "run", e2e_config(), progress=False)
    assert not result.interrupted and result.scoring_fitted
    # The reference: the same network at its seeded initial weights, same prototypes rule.
    train([data], root / "untrained", e2e_config(epochs=0), progress=False)
    return root


def _scores_by_group(results) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Group -> (labels, scores) of one evaluation, clips in a fixed order."""
    out = {}
    for group in sorted({c.group for c in results.clips}):
        mine = sorted((c for c in results.clips if c.group == group), key=lambda c: c.path)
        out[group] = (
            np.array([c.anomaly for c in mine]),
            np.array([c.score for c in mine]),
        )
    return out


def test_tiny_training_learns_the_synthetic_faults(trained):
    """Training must add to what the untrained network's features already tell, by a
    margin measured in standard errors of this very test set, not a bare threshold."""
    learned = _scores_by_group(evaluate(trained / "run", trained / "data", progress=False))
    reference = _scores_by_group(evaluate(trained / "untrained", trained / "data", progress=False))
    assert sorted(learned) == sorted(reference) and len(learned) == len(KINDS) * IDS
    gains, variances = [], []
    for group, (labels, scores) in learned.items():
        ref_labels, ref_scores = reference[group]
        assert (labels == ref_labels).all()
        gain, se = auc_difference(labels, scores, ref_scores)
        gains.append(gain)
        variances.append(se**2)
    # The groups' test clips are independent: the mean gain's SE adds in quadrature.
    gain = float(np.mean(gains))
    se = float(np.sqrt(np.sum(variances)) / len(gains))
    assert gain > MARGIN_SE * se, f"mean AUC gain {gain:.3f} is not above {MARGIN_SE} x SE {se:.3f}"
    assert (trained / "run" / "eval" / "roc.png").stat().st_size > 10_000


def test_exported_bundle_monitors_a_faulty_stretch(trained):
    bundle = trained / "fan.msn"
    r = CliRunner().invoke(main, ["export", str(trained / "run"), "-o", str(bundle)])
    assert r.exit_code == 0, r.output
    # 10 windows of normal running, 10 with a bearing fault, 10 normal again.
    w = e2e_config().frontend.window_s
    wave = synth_stream("fan", 0, 10 * w, 10 * w, 10 * w, seed=0, anomaly="bearing")
    stream = trained / "stream.wav"
    sf.write(stream, wave, 16_000, subtype="PCM_16")
    r = CliRunner().invoke(
        main,
        [
            "monitor",
            str(bundle),
            "--input",
            str(stream),
            "--group",
            "fan/id_00",
            "--alarm-after",
            "3",
            "--backend",
            "cpu",
        ],
    )
    assert r.exit_code == 0, r.output
    events = [json.loads(line) for line in r.stdout.splitlines()]
    windows = [e for e in events if e["event"] == "window"]
    assert [e["index"] for e in windows] == list(range(30))
    flagged = np.array([e["anomalous"] for e in windows])
    scores = np.array([e["score"] for e in windows])
    # Windows straddling the fade-in/out may go either way; the cores of the stretches
    # may not: the faulty core outscores the normal cores, and most of it is flagged.
    faulty, normal = scores[11:19], np.concatenate([scores[:9], scores[21:]])
    labels = np.r_[np.ones(faulty.size), np.zeros(normal.size)]
    # Against chance, by a margin of 3 standard errors of an AUC on this many windows.
    chance_se = auc_standard_error(0.5, faulty.size, normal.size)
    assert auc(labels, np.r_[faulty, normal]) > 0.5 + MARGIN_SE * chance_se, scores
    assert flagged[11:19].mean() >= 0.75, flagged
    assert flagged[:9].sum() + flagged[21:].sum() < flagged[11:19].sum(), flagged
    assert any(e["event"] == "alarm" for e in events)
