"""`evaluate` on the real sample sets, the report files, and the `score` command."""

import csv
import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from click.testing import CliRunner

from msn_edge.checkpoint import new_state, save_checkpoint
from msn_edge.cli import main
from msn_edge.config import preset
from msn_edge.datasets import scan
from msn_edge.evaluate import evaluate
from msn_edge.model import MSN
from msn_edge.prototypes import Scoring, fit_scoring, save_scoring
from msn_edge.runtime.bundle import ScoringGroup

SCORE_LINE = re.compile(r"^(?P<path>\S+)\t(?P<score>\d\.\d{6})\t(?P<verdict>normal|ANOMALY)$")


def make_run(run_dir, seed: int = 0):
    """An untrained tiny model saved as a run: what `train` leaves behind, minus the training."""
    torch.manual_seed(seed)
    cfg = preset("tiny")
    model = MSN(cfg.model).eval()
    save_checkpoint(run_dir / "checkpoint.pt", new_state(cfg, model, ["x"]))
    return cfg, model


@pytest.fixture(scope="module")
def fan_run(tmp_path_factory, shared_data):
    """A tiny run whose prototypes were fit on the MIMII fan train clips."""
    run = tmp_path_factory.mktemp("fan_run")
    cfg, model = make_run(run)
    save_scoring(run, fit_scoring(model, cfg, scan(shared_data / "mimii_fan", split="train")))
    return run


@pytest.fixture(scope="module")
def fan_eval(fan_run, shared_data, tmp_path_factory):
    """One evaluation of fan_run on MIMII fan, shared by the tests that read its reports."""
    out = tmp_path_factory.mktemp("fan_eval")
    return evaluate(fan_run, shared_data / "mimii_fan", out_dir=out, progress=False), out


def read_csv(path):
    with path.open(newline="") as f:
        return list(csv.reader(f))


def test_evaluate_dcase2020_writes_the_dcase_files(fan_eval, shared_data):
    res, tmp_path = fan_eval
    assert res.rule == "dcase2020" and res.scoring_from == "run"
    (row,) = res.rows
    assert (row.group, row.machine_type, row.n_normal, row.n_anomaly) == (
        "fan/id_00",
        "fan",
        10,
        20,
    )
    assert 0 <= row.values["auc"] <= 1 and 0.5 * (1 - 1 / 19) <= row.values["pauc"] <= 1
    s = res.summary
    assert s.official_name == "mean"
    assert s.official == pytest.approx((row.values["auc"] + row.values["pauc"]) / 2)

    scores = read_csv(tmp_path / "anomaly_score_fan_id_00.csv")
    decisions = read_csv(tmp_path / "decision_result_fan_id_00.csv")
    test = scan(shared_data / "mimii_fan", split="test")
    assert [r[0] for r in scores] == [c.path.name for c in test]  # no header, basenames
    assert all(re.fullmatch(r"\d\.\d{6}", r[1]) for r in scores)
    threshold = res.thresholds["fan/id_00"]
    assert [int(d[1]) for d in decisions] == [int(float(r[1]) > threshold) for r in scores]

    md = (tmp_path / "results.md").read_text()
    assert (
        md.splitlines()[0]
        == "| machine type | ID | AUC (%) | pAUC (%) | normal | anomaly | notes |"
    )
    assert f"| fan | id_00 | {100 * row.values['auc']:.2f} |" in md
    assert "**Official score:" in md
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["official"] == {"name": "mean", "value": pytest.approx(s.official)}
    assert doc["groups"][0]["threshold"] == threshold

    from matplotlib.image import imread

    png = tmp_path / "roc.png"
    assert png.stat().st_size > 10_000
    img = imread(png)
    assert img.shape[:2] == (600, 700) and img[..., :3].std() > 0.05


def test_evaluate_dcase2023_uses_the_harmonic_mean(shared_data, tmp_path):
    run = tmp_path / "run"
    make_run(run)  # no prototypes in the run: they are fit on DATA's train split
    res = evaluate(run, shared_data / "dcase2023_dev", progress=False)
    assert res.rule == "dcase2023" and res.scoring_from == "data"
    types = ["ToyCar", "ToyTrain", "bearing", "fan", "gearbox", "slider", "valve"]
    assert [r.group for r in res.rows] == [f"{t}/section_00" for t in types]
    for r in res.rows:
        assert set(r.values) == {"auc_source", "auc_target", "pauc"}
        for name, v in r.values.items():
            assert (0 <= v <= 1) if not math.isnan(v) else any(n.startswith(name) for n in r.notes)
    toycar = res.rows[0]  # two source normals, no anomaly: nothing is defined
    assert toycar.notes[0] == "auc_source: no anomalous clips (source)"
    fan = res.rows[3]  # a source anomaly and a target normal
    assert math.isnan(fan.values["auc_source"]) and not math.isnan(fan.values["auc_target"])
    defined = [v for r in res.rows for v in r.values.values() if not math.isnan(v)]
    s = res.summary
    assert s.official_name == "hmean"
    assert s.official == pytest.approx(
        len(defined) / sum(1 / v for v in defined) if min(defined) else 0
    )
    assert s.notes and s.notes[0].endswith("left out")

    out = run / "eval"  # the default report folder
    assert (out / "anomaly_score_ToyCar_section_00.csv").is_file()
    assert len(read_csv(out / "decision_result_valve_section_00.csv")) == 2
    md = (out / "results.md").read_text()
    assert md.splitlines()[0].startswith(
        "| machine type | section | AUC source (%) | AUC target (%) |"
    )
    assert "| ToyCar | section_00 | n/a | n/a | n/a | 2 | 0 |" in md
    assert json.loads((out / "results.json").read_text())["groups"][0]["auc_source"] is None
    assert (out / "roc.png").stat().st_size > 10_000


def test_cli_evaluate_prints_the_table(fan_run, shared_data, tmp_path):
    # fan_run has prototypes for MIMII fan only: DCASE 2023 groups are fit on DATA/train.
    data = shared_data / "dcase2023_dev"
    r = CliRunner().invoke(
        main, ["evaluate", str(fan_run), "--data", str(data), "--out", str(tmp_path)]
    )
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("| machine type | section | AUC source (%) |")
    assert "harmonic mean" in r.stdout
    assert "fitting them on" in r.stderr and str(tmp_path) in r.stderr
    assert (tmp_path / "roc.png").is_file()


def test_cli_evaluate_errors_are_one_line(fan_run, tmp_path):
    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(main, ["evaluate", str(fan_run), "--data", str(tmp_path / "empty")])
    assert r.exit_code == 1
    assert r.stderr.startswith("Error: ") and "no test clips" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = CliRunner().invoke(main, ["evaluate", str(tmp_path / "empty"), "--data", str(tmp_path)])
    assert r.exit_code == 1 and "no checkpoint there" in r.stderr


@pytest.mark.parametrize("command", ["evaluate", "score"])
def test_help_has_an_example(command):
    r = CliRunner().invoke(main, [command, "--help"])
    assert r.exit_code == 0 and "Example:" in r.output


def test_score_with_a_run_matches_evaluate(fan_run, fan_eval, shared_data, tmp_path):
    test = scan(shared_data / "mimii_fan", split="test")
    files = [test[0].path, test[-1].path]
    bad = tmp_path / "bad.wav"
    bad.write_text("not audio")
    r = CliRunner().invoke(main, ["score", str(fan_run), str(files[0]), str(bad), str(files[1])])
    assert r.exit_code == 1
    lines = r.stdout.splitlines()
    assert len(lines) == 2
    parsed = [SCORE_LINE.match(line) for line in lines]
    assert [m["path"] for m in parsed] == [str(f) for f in files]
    assert r.stderr.startswith(f"Error: {bad}: ") and len(r.stderr.strip().splitlines()) == 1

    by_name = dict(read_csv(fan_eval[1] / "anomaly_score_fan_id_00.csv"))
    for f, m in zip(files, parsed, strict=True):
        assert float(m["score"]) == pytest.approx(float(by_name[f.name]), abs=2e-6)

    r = CliRunner().invoke(main, ["score", "--json", str(fan_run), str(files[0])])
    assert r.exit_code == 0
    doc = json.loads(r.stdout)
    assert set(doc) == {
        "path",
        "score",
        "anomalous",
        "verdict",
        "invalid_reason",
        "threshold",
        "windows",
        "worst_start_s",
        "duration_s",
        "tiled",
    }
    assert doc["anomalous"] == (doc["score"] > doc["threshold"])
    assert (doc["windows"], doc["duration_s"], doc["tiled"]) == (1, 10.0, False)
    assert doc["verdict"] == ("anomalous" if doc["anomalous"] else "normal")


def test_score_refuses_ambiguous_groups_and_wrong_options(tmp_path, shared_data):
    run = tmp_path / "run"
    make_run(run)
    protos = np.eye(2, 128, dtype=np.float32)
    groups = [ScoringGroup("fan/id_00", 0, 1, 0.5, {}), ScoringGroup("fan/id_02", 1, 2, 0.5, {})]
    save_scoring(run, Scoring(protos, groups))
    wav = next((shared_data / "mimii_fan" / "fan" / "test").iterdir())
    r = CliRunner().invoke(main, ["score", str(run), str(wav)])
    assert r.exit_code == 1 and "2 scoring groups (fan/id_00, fan/id_02)" in r.stderr
    assert "--group" in r.stderr
    r = CliRunner().invoke(main, ["score", "--group", "fan/id_02", str(run), str(wav)])
    assert r.exit_code == 0 and SCORE_LINE.match(r.stdout.strip())
    r = CliRunner().invoke(main, ["score", "--backend", "cpu", str(run), str(wav)])
    assert r.exit_code == 2 and "--backend and --precision are for a bundle" in r.stderr


def test_score_with_a_bundle_never_imports_torch(tmp_path):
    toy_bundle = pytest.importorskip(
        "toy_bundle", reason="tests/toy_bundle.py (runtime helper) missing"
    )
    bundle = toy_bundle.make_toy_bundle(tmp_path / "toy.msn", window_s=1.0)
    fe, rng = toy_bundle.toy_frontend(1.0), np.random.default_rng(5)
    normal, anomalous, missing = (
        tmp_path / "normal.wav",
        tmp_path / "whine.wav",
        tmp_path / "no.wav",
    )
    sf.write(normal, toy_bundle.normal_signal(fe, rng), fe.sample_rate, subtype="PCM_16")
    sf.write(anomalous, toy_bundle.anomalous_signal(fe, rng), fe.sample_rate, subtype="PCM_16")
    args = ["score", str(bundle), str(normal), str(missing), str(anomalous)]
    code = (
        "import sys\n"
        "from msn_edge.cli import main\n"
        f"try:\n    main({args!r})\n"
        "finally:\n"
        "    assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "torch was imported" not in r.stderr
    assert r.returncode == 1, r.stderr
    verdicts = [SCORE_LINE.match(line)["verdict"] for line in r.stdout.splitlines()]
    assert verdicts == ["normal", "ANOMALY"]
    assert r.stderr.startswith(f"Error: {missing}: ") and len(r.stderr.strip().splitlines()) == 1
