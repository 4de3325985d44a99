"""End to end on synthetic machines: train tiny -> evaluate -> export -> monitor a stream.

One small run (tiny preset on 2.5 s windows, three machine kinds, two machines each) is
trained for real and must learn: its AUC on the synthetic faults must beat the same
network untrained by several standard errors. The same run is exported, and the
torch-free monitor must flag the faulty stretch of a recording.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner
from train_helpers import CLIP_S, small_config

from msn_edge.cli import main
from msn_edge.evaluate import evaluate
from msn_edge.metrics import auc_standard_error
from msn_edge.synth import synth_stream, synthesize
from msn_edge.training import train

EPOCHS = 8
IDS = 2  # machines per kind: 6 groups in all
N_TEST = 24  # normal and anomalous test clips per machine
MARGIN_SE = 3.0  # trained must beat untrained by this many standard errors


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    data = root / "data"
    synthesize(
        data,
        seed=0,
        ids_per_kind=IDS,
        n_train=16,
        n_test_normal=N_TEST,
        n_test_anomaly=N_TEST,
        seconds=CLIP_S,
    )
    result = train([data], root / "run", small_config(epochs=EPOCHS), progress=False)
    assert not result.interrupted and result.scoring_fitted
    # The reference: the same network at its seeded initial weights, same prototypes rule.
    train([data], root / "untrained", small_config(epochs=0), progress=False)
    return root


def _mean_auc_and_se(results) -> tuple[float, float]:
    """Mean AUC over the groups, and its standard error (groups scored independently)."""
    aucs, variances = [], []
    for row in results.rows:
        a = row.values["auc"]
        aucs.append(a)
        variances.append(auc_standard_error(a, row.n_anomaly, row.n_normal) ** 2)
    return float(np.mean(aucs)), float(np.sqrt(np.sum(variances)) / len(aucs))


def test_tiny_training_learns_the_synthetic_faults(trained):
    """Training must add to what the untrained network's features already tell, by a
    margin measured in standard errors of this very test set, not a bare threshold."""
    learned = evaluate(trained / "run", trained / "data", progress=False)
    reference = evaluate(trained / "untrained", trained / "data", progress=False)
    assert len(learned.rows) == 3 * IDS
    auc_trained, se_trained = _mean_auc_and_se(learned)
    auc_untrained, se_untrained = _mean_auc_and_se(reference)
    # Both are scored on the same clips, so their errors correlate and this standard
    # error of the difference (as if independent) is an upper bound: a strict test.
    se = float(np.hypot(se_trained, se_untrained))
    gain = auc_trained - auc_untrained
    assert gain > MARGIN_SE * se, (
        f"trained AUC {auc_trained:.3f} vs untrained {auc_untrained:.3f}: gain {gain:.3f} "
        f"is not above {MARGIN_SE} x SE {se:.3f}\n{learned.to_markdown()}"
    )
    assert (trained / "run" / "eval" / "roc.png").stat().st_size > 10_000


def test_exported_bundle_monitors_a_faulty_stretch(trained):
    bundle = trained / "fan.msn"
    r = CliRunner().invoke(main, ["export", str(trained / "run"), "-o", str(bundle)])
    assert r.exit_code == 0, r.output
    # 10 windows of normal running, 10 with a bearing fault, 10 normal again.
    w = small_config().frontend.window_s
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
    # Windows straddling the fade-in/out may go either way; the core of each stretch may not.
    assert flagged[11:19].mean() >= 0.75, flagged
    assert flagged[:9].mean() <= 0.25 and flagged[21:].mean() <= 0.25, flagged
    assert any(e["event"] == "alarm" for e in events)
