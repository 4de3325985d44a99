"""`msn-edge enroll`: prototypes, held-out thresholds, the audit trail and the guards.

The toy bundle (tests/toy_bundle.py) has a real ONNX model with 1 s windows, so each
enrollment takes well under a second. Expected prototypes and thresholds are recomputed
here from the engine's embeddings of the same windows, with the runtime's k-means.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import subprocess
import sys
import threading
import zipfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner
from no_torch import no_torch_env
from toy_bundle import anomalous_signal, make_toy_bundle, toy_frontend

from msn_edge.cli import main
from msn_edge.runtime.bundle import read_bundle, write_bundle
from msn_edge.runtime.detector import Detector
from msn_edge.runtime.engines import make_engine
from msn_edge.runtime.enroll import enroll
from msn_edge.runtime.enroll_feed import source_feed
from msn_edge.runtime.enroll_fit import EnrollOptions, exponential_tail, threshold_from
from msn_edge.runtime.errors import MsnEdgeError
from msn_edge.runtime.frontend import features
from msn_edge.runtime.history import RECORD_FIELDS
from msn_edge.runtime.prototypes import group_prototypes, kmeans, unit_rows
from msn_edge.runtime.scorer import anomaly_scores
from msn_edge.runtime.sources import Chunk, Source

RATE = 16_000
FE = toy_frontend()  # 1 s windows


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return make_toy_bundle(tmp_path_factory.mktemp("bundle") / "toy.msn")


def hum(rng: np.random.Generator, f0: float = 120.0) -> np.ndarray:
    """One 1 s window of a machine humming at f0 (the toy bundle's machine hums at 120 Hz)."""
    t = np.arange(FE.window_samples) / RATE
    wave = sum(np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 6.3)) / k for k in range(1, 6))
    return (0.2 * rng.uniform(0.5, 1.5) * wave + 0.0005 * rng.standard_normal(t.size)).astype(
        np.float32
    )


def windows_of(n: int, seed: int, f0: float = 120.0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [hum(rng, f0) for _ in range(n)]


def pcm(windows: list[np.ndarray]) -> np.ndarray:
    return np.round(np.concatenate(windows) * 32768).clip(-32768, 32767).astype(np.int16)


def write_wav(path: Path, windows: list[np.ndarray]) -> Path:
    """16-bit PCM, written from int16 so that the file holds exactly `pcm(windows)`."""
    sf.write(path, pcm(windows), RATE, subtype="PCM_16")
    return path


def as_read(windows: list[np.ndarray]) -> list[np.ndarray]:
    """The windows as a 16-bit file or stream gives them back."""
    return [w.astype(np.float32) / 32768 for w in np.split(pcm(windows), len(windows))]


def embed(bundle: Path, windows: list[np.ndarray]) -> np.ndarray:
    b = read_bundle(bundle)
    spec, spectrum = features(np.stack(windows), b.frontend)
    return unit_rows(make_engine(b, "cpu").embed(spec, spectrum))


def run(*args: str, input: bytes | None = None) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, [str(a) for a in args], input=input)
    return r.exit_code, r.stdout, r.stderr


def member(path: Path, name: str) -> bytes:
    with zipfile.ZipFile(path) as zf:
        return zf.read(name)


def manifest(path: Path) -> dict:
    return json.loads(member(path, "manifest.json"))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------
# The numpy k-means that training and enrollment share.


def test_kmeans_matches_scikit_learn():
    sklearn = pytest.importorskip("sklearn.cluster")
    ratios = []
    for seed in range(6):  # k-means finds local optima: compare over several data sets
        rng = np.random.default_rng(seed)
        centres = rng.normal(size=(20, 32))
        x = unit_rows(np.repeat(centres, 10, axis=0) + 0.5 * rng.normal(size=(200, 32)))
        ours = kmeans(x, 16, seed=0)
        assert ours.shape == (16, 32) and ours.dtype == np.float32
        inertia = float(((x[:, None] - ours[None]) ** 2).sum(-1).min(1).sum())
        ratios.append(inertia / sklearn.KMeans(16, n_init=10, random_state=0).fit(x).inertia_)
    assert np.mean(ratios) <= 1.01 and max(ratios) <= 1.05, ratios  # measured: 1.00, 1.023
    np.testing.assert_array_equal(ours, kmeans(x, 16, seed=0))  # seeded: reproducible
    rng = np.random.default_rng(0)
    # Three tight clusters are found exactly: each centre is its cluster's mean.
    blobs = np.concatenate([c + 0.01 * rng.normal(size=(10, 2)) for c in ([0, 0], [5, 5], [0, 9])])
    found = kmeans(blobs, 3, seed=1)
    expected = blobs.reshape(3, 10, 2).mean(axis=1)
    np.testing.assert_allclose(
        found[np.lexsort(found.T)], expected[np.lexsort(expected.T)], atol=1e-5
    )
    with pytest.raises(ValueError, match="1 <= k <= N"):
        kmeans(blobs, 31)


# ---------------------------------------------------------------------------------------
# Enrolling a new machine from a file, a folder, stdin.


def test_enroll_a_file_fits_prototypes_and_a_held_out_threshold(toy, tmp_path):
    clean = windows_of(60, seed=1)
    rec = write_wav(tmp_path / "machine2.wav", clean)
    parent_bytes = toy.read_bytes()
    out = tmp_path / "two.msn"
    code, stdout, err = run("enroll", toy, "--group", "machine2", "--input", rec, "-o", out)
    assert code == 0, err
    assert toy.read_bytes() == parent_bytes  # the input bundle is untouched
    assert stdout.startswith(f"wrote {out}\n")

    emb = embed(toy, as_read(clean))
    # 20 % held out: the last 12 windows; prototypes for calibration from the first 48.
    held = anomaly_scores(emb[48:], group_prototypes(emb[:48], [None] * 48, 16, 0))
    child, parent = read_bundle(out), read_bundle(toy)
    g = child.group()  # the enrolled group is the new default
    assert g.name == "machine2" and g.stop - g.start == 16
    assert g.threshold == pytest.approx(float(np.quantile(held, 0.95)), rel=1e-5)
    np.testing.assert_allclose(
        child.prototypes[g.start : g.stop], group_prototypes(emb, [None] * 60, 16, 0), atol=1e-5
    )
    # The trained group is carried over as it was.
    old, kept = parent.group("toy"), child.group("toy")
    assert (kept.threshold, kept.calibration) == (old.threshold, old.calibration)
    np.testing.assert_array_equal(
        child.prototypes[kept.start : kept.stop], parent.prototypes[old.start : old.stop]
    )
    # The model members are byte-identical.
    assert member(out, "model.onnx") == member(toy, "model.onnx")

    (record,) = manifest(out)["enrollments"]
    assert set(RECORD_FIELDS) <= set(record)
    when = datetime.fromisoformat(record["utc"].replace("Z", "+00:00"))
    assert abs(datetime.now(timezone.utc) - when) < timedelta(minutes=5)
    assert record["group"] == "machine2" and record["mode"] == "new"
    assert record["source"] == f"file {rec}"
    assert record["seconds"] == 60.0
    assert record["windows"] == {
        "used": 60,
        "held_out": 12,
        "fit": 48,
        "silent": 0,
        "clipped": 0,
        "window_s": 1.0,
        "hop_s": 1.0,
    }
    assert (record["prototypes_before"], record["prototypes_after"]) == (0, 16)
    assert record["threshold_before"] is None
    assert record["threshold_after"] == g.threshold
    assert record["calibration"]["method"] == "holdout"
    assert record["calibration"]["quantile"] == 0.95
    assert record["threshold_how"] == "quantile 0.95 of 12 holdout scores"
    assert record["parent"] == "toy.msn"
    assert record["parent_sha256"] == hashlib.sha256(parent_bytes).hexdigest()
    assert record["models_sha256"] == {
        "model.onnx": hashlib.sha256(member(toy, "model.onnx")).hexdigest()
    }
    assert record["warnings"] == []

    # The new machine is monitored: its normal hum passes, the whine does not.
    det = Detector.open(out, backend="cpu")
    rng = np.random.default_rng(9)
    normal = [det.score(w).anomalous for w in windows_of(20, seed=7)]
    assert sum(normal) <= 3
    assert all(det.score(anomalous_signal(FE, rng)).anomalous for _ in range(5))


def test_enroll_a_folder_uses_every_clip_with_leave_one_out(toy, tmp_path):
    folder = tmp_path / "clips"
    folder.mkdir()
    clips = windows_of(12, seed=2)
    for i, w in enumerate(clips):
        write_wav(folder / f"normal_{i:02d}.wav", [w])
    short = pcm([windows_of(1, seed=3)[0][:6000]])  # 0.375 s: tiled, as training tiles clips
    sf.write(folder / "normal_99.flac", short, RATE, subtype="PCM_16")
    (folder / "notes.txt").write_text("not audio")
    out = tmp_path / "folder.msn"
    code, stdout, err = run("enroll", toy, "--group", "m", "--input", folder, "-o", out, "--json")
    assert code == 0, err
    record = json.loads(stdout)
    assert record["source"] == f"folder {folder} (13 files)"
    assert record["windows"]["used"] == 13
    assert record["warnings"] == ["1 files shorter than a window were tiled to one"]

    tiled = np.tile(short, 3)[: FE.window_samples].astype(np.float32) / 32768
    emb = embed(toy, [*as_read(clips), tiled])
    # 13 x 20 % = 2 held-out windows are too few: each clip is scored against the others.
    loo = [
        anomaly_scores(emb[i : i + 1], group_prototypes(np.delete(emb, i, 0), [None] * 12))[0]
        for i in range(13)
    ]
    g = read_bundle(out).group("m")
    assert record["calibration"]["method"] == "leave-one-out"
    assert g.threshold == pytest.approx(float(np.quantile(loo, 0.95)), rel=1e-5)
    assert g.stop - g.start == 13  # 13 clips, fewer than 16 clusters: one prototype each


def test_enroll_from_stdin(toy, tmp_path):
    clean = windows_of(8, seed=4)
    raw = pcm(clean).astype("<i2").tobytes()
    out = tmp_path / "stdin.msn"
    code, stdout, err = run(
        "enroll", toy, "--group", "m", "--input", "-", "-o", out, "--json", input=raw
    )
    assert code == 0, err
    record = json.loads(stdout)
    assert record["source"] == "stdin"
    assert record["seconds"] == 8.0 and record["windows"]["used"] == 8
    # The same audio from a file enrolls the same prototypes and threshold.
    rec = write_wav(tmp_path / "same.wav", clean)
    assert run("enroll", toy, "--group", "m", "--input", rec, "-o", tmp_path / "f.msn")[0] == 0
    a, b = read_bundle(out), read_bundle(tmp_path / "f.msn")
    np.testing.assert_array_equal(a.prototypes, b.prototypes)
    assert a.group("m").threshold == b.group("m").threshold


def test_hop_overlap_never_calibrates_on_shared_audio(toy, tmp_path):
    clean = windows_of(30, seed=5)
    rec = write_wav(tmp_path / "m.wav", clean)
    out = tmp_path / "hop.msn"
    code, stdout, err = run(
        "enroll", toy, "--group", "m", "--input", rec, "--hop", "0.5", "-o", out, "--json"
    )
    assert code == 0, err
    record = json.loads(stdout)
    # 59 windows at a 0.5 s hop; the last 11 are held out, and the window just before
    # them shares half its audio with the first held-out one: it is left out of the fit.
    counts = {k: record["windows"][k] for k in ("used", "held_out", "fit", "hop_s")}
    assert counts == {"used": 59, "held_out": 11, "fit": 47, "hop_s": 0.5}
    wave = pcm(clean).astype(np.float32) / 32768
    windows = [wave[s : s + RATE] for s in range(0, wave.size - RATE + 1, RATE // 2)]
    emb = embed(toy, windows)
    held = anomaly_scores(emb[48:], group_prototypes(emb[:47], [None] * 47))
    assert record["threshold_after"] == pytest.approx(float(np.quantile(held, 0.95)), rel=1e-5)


# ---------------------------------------------------------------------------------------
# --update: the old normal and the new one both count.


def test_update_adds_target_prototypes_and_keeps_the_old_normal(toy, tmp_path):
    first = tmp_path / "first.msn"
    rec = write_wav(tmp_path / "before.wav", windows_of(20, seed=6))
    assert run("enroll", toy, "--group", "m", "--input", rec, "-o", first)[0] == 0
    # After maintenance the machine hums at 150 Hz instead of 120 Hz.
    after = windows_of(50, seed=8, f0=150.0)
    rec2 = write_wav(tmp_path / "after.wav", after)
    det = Detector.open(first, backend="cpu")
    drifted = windows_of(10, seed=10, f0=150.0)
    assert sum(det.score(w).anomalous for w in drifted) >= 8  # the new normal looks anomalous

    out = tmp_path / "updated.msn"
    code, stdout, err = run(
        "enroll", first, "--group", "m", "--update", "--input", rec2, "-o", out, "--json"
    )
    assert code == 0, err
    record = json.loads(stdout)
    parent, child = read_bundle(first), read_bundle(out)
    old, new = parent.group("m"), child.group("m")
    n_old = old.stop - old.start
    assert record["mode"] == "update"
    assert (record["prototypes_before"], record["prototypes_after"]) == (n_old, n_old + 50)
    rows = child.prototypes[new.start : new.stop]
    np.testing.assert_array_equal(rows[:n_old], parent.prototypes[old.start : old.stop])
    emb = embed(toy, as_read(after))
    np.testing.assert_allclose(rows[n_old:], emb, atol=1e-5)  # each window its own prototype
    held = anomaly_scores(emb[40:], np.concatenate([rows[:n_old], emb[:40]]))
    calibrated = float(np.quantile(held, 0.95))
    assert record["calibration"]["calibrated_threshold"] == pytest.approx(calibrated, rel=1e-5)
    assert record["threshold_before"] == old.threshold
    assert new.threshold == pytest.approx(max(calibrated, old.threshold), rel=1e-6)
    assert len(manifest(out)["enrollments"]) == 2  # the parent's record is carried over
    assert manifest(out)["enrollments"][0] == manifest(first)["enrollments"][0]
    assert record["parent_sha256"] == sha256(first)
    assert member(out, "model.onnx") == member(toy, "model.onnx")

    det = Detector.open(out, backend="cpu")
    assert sum(det.score(w).anomalous for w in drifted) <= 2  # the new normal passes
    assert sum(det.score(w).anomalous for w in windows_of(10, seed=11)) <= 2  # the old too
    rng = np.random.default_rng(12)
    assert all(det.score(anomalous_signal(FE, rng)).anomalous for _ in range(5))


def test_update_needs_an_existing_group(toy, tmp_path):
    rec = write_wav(tmp_path / "m.wav", windows_of(10, seed=1))
    code, out, err = run(
        "enroll", toy, "--group", "nope", "--update", "--input", rec, "-o", tmp_path / "x.msn"
    )
    assert code == 1 and out == ""
    assert err.splitlines()[-1].startswith("Error: --update adds to an existing group;")
    assert not (tmp_path / "x.msn").exists()


# ---------------------------------------------------------------------------------------
# Thresholds by false alarms per day.


def test_options_refuse_a_non_finite_hop_from_a_library_caller():
    with pytest.raises(MsnEdgeError, match="--hop must be a number of seconds, got nan"):
        EnrollOptions(group="m", hop_s=float("nan")).hop(toy_frontend())


def test_false_alarm_rate_sets_the_quantile_for_the_hop():
    rng = np.random.default_rng(0)
    scores = rng.exponential(0.01, size=20_000).astype(np.float32)
    opts = EnrollOptions(group="m", false_alarms_per_day=86.4)  # 1 % of 10 s windows
    t, info = threshold_from(scores, opts, hop_s=10.0)
    assert info["windows_per_day"] == 8640 and info["quantile"] == pytest.approx(0.99)
    assert not info["extrapolated"]
    assert t == pytest.approx(float(np.quantile(scores, 0.99)))
    # 1 a day at 10 s is the 0.99988 quantile: 200 scores cannot measure it, so the tail
    # is extrapolated; for exponential scores it lands near the true value 0.01 ln(8640).
    t, info = threshold_from(scores[:200], EnrollOptions("m", false_alarms_per_day=1), 10.0)
    assert info["extrapolated"] and t >= scores[:200].max()
    assert t == pytest.approx(0.01 * np.log(8640), rel=0.25)
    assert exponential_tail(np.full(5, 0.1, np.float32), 1e-4) == pytest.approx(0.1)


def test_cli_false_alarms_per_day(toy, tmp_path):
    rec = write_wav(tmp_path / "m.wav", windows_of(30, seed=1))
    out = tmp_path / "fa.msn"
    code, stdout, err = run(
        "enroll", toy, "--group", "m", "--input", rec, "--false-alarms-per-day", "1",
        "--hop", "0.5", "-o", out, "--json",
    )  # fmt: skip
    assert code == 0, err
    cal = json.loads(stdout)["calibration"]
    assert cal["false_alarms_per_day"] == 1 and cal["windows_per_day"] == 172_800
    assert cal["quantile"] == pytest.approx(1 - 1 / 172_800)
    assert cal["extrapolated"] and cal["tail_fit"] == "exponential over the median"
    assert read_bundle(out).group("m").threshold >= cal["score_max"]


# ---------------------------------------------------------------------------------------
# Guards.


def one_error(code: int, err: str) -> str:
    assert code == 1 and "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("audio", "message"),
    [
        (lambda: windows_of(4, seed=1), "too little audio to enroll: 4 s gave 4 usable windows"),
        (lambda: [np.zeros(RATE, np.float32)] * 10, "10 silent and 0 clipped of 10 windows"),
        (lambda: [np.clip(10 * w, -1, 1) for w in windows_of(10, 1)], "0 silent and 10 clipped"),
    ],
)
def test_unusable_audio_is_one_clear_error(toy, tmp_path, audio, message):
    rec = write_wav(tmp_path / "bad.wav", audio())
    out = tmp_path / "x.msn"
    code, _, err = run("enroll", toy, "--group", "m", "--input", rec, "-o", out)
    assert message in one_error(code, err)
    assert not out.exists()


def test_silent_stretches_are_left_out_with_a_warning(toy, tmp_path):
    audio = windows_of(10, seed=1) + [np.zeros(RATE, np.float32)] * 2
    rec = write_wav(tmp_path / "gappy.wav", audio)
    code, stdout, err = run("enroll", toy, "--group", "m", "--input", rec, "-o",
                            tmp_path / "x.msn", "--json")  # fmt: skip
    assert code == 0, err
    record = json.loads(stdout)
    assert record["windows"]["used"] == 10 and record["windows"]["silent"] == 2
    assert record["warnings"] == ["2 silent and 0 clipped of 12 windows were left out"]
    assert "WARNING" in err and "were left out" in err


def test_off_distribution_audio_gives_a_warning(toy, tmp_path):
    rng = np.random.default_rng(0)
    t = np.arange(RATE) / RATE
    # A "machine" that is a different random tone in every window: nothing like the hum
    # the model knows, and no two windows alike.
    tones = [0.3 * np.sin(2 * np.pi * rng.uniform(200, 7000) * t) for _ in range(20)]
    rec = write_wav(tmp_path / "odd.wav", [x.astype(np.float32) for x in tones])
    code, stdout, err = run("enroll", toy, "--group", "m", "--input", rec, "-o",
                            tmp_path / "x.msn", "--json")  # fmt: skip
    assert code == 0, err  # a warning, not an error: the technician decides
    record = json.loads(stdout)
    assert record["checks"]["ratio"] > 2
    (warning,) = record["warnings"]
    assert "the model may not suit this machine" in warning and warning in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-o", "{toy}"], "is the input bundle; enrolling never overwrites it"),
        (["-o", "{dir}/exists.msn"], "exists.msn: already exists (pass --force to replace it)"),
        (["-o", "{dir}/nope/x.msn"], "no such folder for the new bundle"),
        (["-o", "{dir}/x.msn", "--quantile", "0.9", "--false-alarms-per-day", "1"], "not both"),
        (["-o", "{dir}/x.msn", "--quantile", "1.5"], "--quantile must be between 0 and 1"),
        (["-o", "{dir}/x.msn", "--false-alarms-per-day", "0"], "must be more than 0"),
        (["-o", "{dir}/x.msn", "--false-alarms-per-day", "1e9"], "is every window or more"),
        (["-o", "{dir}/x.msn", "--hop", "3"], "--hop must be more than 0 and at most"),
    ],
)
def test_cli_user_errors_are_one_line(toy, tmp_path, args, message):
    rec = write_wav(tmp_path / "m.wav", windows_of(10, seed=1))
    (tmp_path / "exists.msn").write_bytes(b"keep me")
    before = toy.read_bytes()
    args = [a.format(toy=toy, dir=tmp_path) for a in args]
    code, out, err = run("enroll", toy, "--group", "m", "--input", rec, *args)
    assert message in one_error(code, err) and out == ""
    assert toy.read_bytes() == before and (tmp_path / "exists.msn").read_bytes() == b"keep me"


@pytest.mark.parametrize("value", ["nan", "inf", "0"])
def test_cli_hop_is_the_monitors_option(toy, tmp_path, value):
    # One --hop for enroll and monitor: a positive, finite number of seconds, checked by click.
    rec = write_wav(tmp_path / "m.wav", windows_of(10, seed=1))
    out = tmp_path / "x.msn"
    code, _, err = run("enroll", toy, "--group", "m", "--input", rec, "--hop", value, "-o", out)
    assert code == 2 and "Invalid value for '--hop'" in err and "Traceback" not in err
    assert not out.exists()


def test_cli_needs_one_source_and_minutes_for_a_device(toy, tmp_path):
    code, _, err = run("enroll", toy, "--group", "m", "-o", tmp_path / "x.msn")
    assert code == 2 and "exactly one of --device NAME or --input FILE|DIR|-" in err
    code, _, err = run("enroll", toy, "--group", "m", "--device", "hw:9", "-o", tmp_path / "x")
    assert code == 2 and "--device needs --minutes" in err


def test_enroll_has_help_with_an_example():
    code, out, _ = run("enroll", "-h")
    assert code == 0 and "Example:" in out


# ---------------------------------------------------------------------------------------
# The history, the monitor's --enroll-first, and the torch-free edge.


def test_info_shows_the_enrollment_history(toy, tmp_path):
    rec = write_wav(tmp_path / "m.wav", windows_of(10, seed=1))
    out = tmp_path / "m.msn"
    assert run("enroll", toy, "--group", "fan/id_07", "--input", rec, "-o", out)[0] == 0
    code, stdout, err = run("info", out)
    assert code == 0, err
    lines = stdout.splitlines()
    assert "groups (2; default fan/id_07):" in lines
    assert any(x.split()[:3] == ["fan/id_07", "10", "prototypes"] for x in lines)
    assert "enrollment history (1):" in lines
    (entry,) = [x for x in lines if " new " in x]
    assert f"fan/id_07: file {rec}, 10 s, 10 windows" in entry
    assert "prototypes 0 -> 10" in entry and f"sha256 {sha256(toy)[:12]}" in entry
    code, stdout, _ = run("info", toy)
    assert code == 0 and "enrollment history (none):" in stdout
    code, _, err = run("info", toy, "--preset", "tiny")
    assert code == 2 and "not both" in err


def test_monitor_enroll_first_listens_enrolls_then_monitors(toy, tmp_path):
    rng = np.random.default_rng(4)
    audio = windows_of(30, seed=13, f0=90.0) + [anomalous_signal(FE, rng) for _ in range(3)]
    rec = write_wav(tmp_path / "new-machine.wav", audio + windows_of(2, seed=14, f0=90.0))
    bundle = tmp_path / "fan.msn"
    bundle.write_bytes(toy.read_bytes())
    code, stdout, err = run(
        "monitor", bundle, "--input", rec, "--group", "fan/id_09", "--enroll-first", "0.5",
        "--alarm-after", "2",
    )  # fmt: skip
    assert code == 0, err
    (new,) = tmp_path.glob("fan.fan-id_09.*.msn")  # beside the old one
    assert bundle.read_bytes() == toy.read_bytes()
    g = read_bundle(new).group()
    assert g.name == "fan/id_09"
    events = [json.loads(x) for x in stdout.splitlines()]
    windows = [e for e in events if e["event"] == "window"]
    assert len(windows) == 5  # 30 s enrolled, the 5 s after them monitored
    assert all(e["threshold"] == g.threshold for e in windows)
    assert [e["anomalous"] for e in windows] == [True, True, True, False, False]
    assert [e["event"] for e in events if e["event"] != "window"] == ["alarm", "clear"]
    (record,) = manifest(new)["enrollments"]
    assert record["source"] == str(rec) and record["seconds"] == 30.0


def test_source_feed_gives_back_the_audio_past_its_seconds_and_ticks_per_chunk():
    """The chunk that ends the enrolled seconds is split: its rest is read next, by
    whoever reads on (the monitor after --enroll-first), so no audio falls between."""
    audio = pcm(windows_of(4, seed=1))
    source = Chunks([Chunk(c) for c in np.split(audio, 8)])  # 0.5 s chunks
    ticks = []
    feed = source_feed(source, FE, RATE, max_seconds=2.2, tick=lambda: ticks.append(1))
    assert [w.start for w in feed.windows] == [0, RATE]
    assert feed.stats.samples == 35_200 and not feed.stats.ended
    assert len(ticks) == 5  # one per chunk read
    rest = source.read()
    np.testing.assert_array_equal(rest.samples, audio[35_200:40_000])
    assert not rest.resumed
    np.testing.assert_array_equal(source.read().samples, audio[40_000:48_000])


def test_monitor_enroll_first_monitors_from_where_enrolling_ended(toy, tmp_path):
    """30.15 s enrolled (not a whole number of 0.1 s chunks): the first monitored window
    starts at 30.15 s of the input, and its times count from the input's start."""
    rec = write_wav(tmp_path / "m.wav", windows_of(35, seed=13, f0=90.0))
    bundle = tmp_path / "fan.msn"
    bundle.write_bytes(toy.read_bytes())
    code, stdout, err = run(
        "monitor", bundle, "--input", rec, "--group", "m", "--enroll-first", "0.5025"
    )  # fmt: skip
    assert code == 0, err
    events = [json.loads(x) for x in stdout.splitlines()]
    windows = [e for e in events if e["event"] == "window"]
    assert [round(e["start_s"], 4) for e in windows] == [30.15, 31.15, 32.15, 33.15]
    assert [e["index"] for e in windows] == [0, 1, 2, 3]


def test_monitor_enroll_first_pings_the_watchdog_while_it_listens(toy, tmp_path):
    """Enrolling takes minutes; under systemd's WatchdogSec the monitor must not look hung."""
    rec = write_wav(tmp_path / "m.wav", windows_of(32, seed=13, f0=90.0))
    bundle = tmp_path / "fan.msn"
    bundle.write_bytes(toy.read_bytes())
    path = str(tmp_path / "notify.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    server.settimeout(0.5)
    messages: list[str] = []
    done = threading.Event()

    def drain() -> None:  # as systemd does, while the monitor runs
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                messages.append(server.recv(4096).decode())

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        r = CliRunner(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2"}).invoke(
            main, ["monitor", str(bundle), "--input", str(rec), "--group", "m",
                   "--enroll-first", "0.5"],
        )  # fmt: skip
        assert r.exit_code == 0, r.stderr
    finally:
        done.set()
        reader.join()
        server.close()
    assert messages[0] == "READY=1\nSTATUS=enrolling m for 0.5 min"
    monitoring = messages.index("READY=1\nSTATUS=monitoring 1 stream(s)")
    # A ping may go every 1 us here, so one is sent per 0.1 s chunk of the 30 s enrolled
    # (test_source_feed_gives_back... counts the ticks); the sender drops what does not
    # fit this reader's socket queue (at least 10 datagrams) instead of waiting, so only
    # a few are sure to arrive. Without pings while listening there would be none.
    assert messages[1:monitoring].count("WATCHDOG=1") >= 5
    assert set(messages[1:monitoring]) == {"WATCHDOG=1"}


def test_monitor_enroll_first_fails_cleanly(toy, tmp_path):
    rec = write_wav(tmp_path / "short.wav", windows_of(20, seed=1))
    code, out, err = run("monitor", toy, "--input", rec, "--group", "g", "--enroll-first", "1")
    assert "the audio ended after 20 s, before the 60 s asked for" in one_error(code, err)
    assert out == "" and list(toy.parent.glob("toy.g.*")) == []
    code, _, err = run("monitor", toy, "--input", rec, "--enroll-first", "1")
    assert code == 2 and "--enroll-first needs --group NAME" in err
    rec2 = write_wav(tmp_path / "other.wav", windows_of(20, seed=2))
    code, out, err = run(
        "monitor", toy, "--input", rec, "--input", rec2, "--group", "g", "--enroll-first", "1"
    )  # fmt: skip
    assert "--enroll-first enrolls one machine; this configuration has 2 streams" in one_error(
        code, err
    )
    assert out == "" and list(toy.parent.glob("toy.g.*")) == []
    code, _, err = run("monitor", "--config", rec, "--group", "g", "--enroll-first", "1")
    assert code == 2 and "--enroll-first enrolls one --device or --input" in err


def test_enroll_runs_without_torch(toy, tmp_path):
    env = no_torch_env(tmp_path)
    rec = write_wav(tmp_path / "m.wav", windows_of(10, seed=1))
    out = tmp_path / "edge.msn"
    code = (
        "import sys; from msn_edge.cli import main\n"
        "try:\n    main()\nfinally:\n    assert 'torch' not in sys.modules"
    )
    for args in (
        ["enroll", str(toy), "--group", "m", "--input", str(rec), "-o", str(out)],
        ["info", str(out)],
    ):
        res = subprocess.run(
            [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
    assert "enrollment history (1):" in res.stdout
    assert read_bundle(out).group().name == "m"


class Chunks(Source):
    """Prepared chunks (with gap flags); stops itself after `stop_after` reads if given."""

    def __init__(self, chunks: list[Chunk], stop_after: int | None = None) -> None:
        super().__init__("chunks", RATE)
        self._chunks, self._reads, self._stop_after = list(chunks), 0, stop_after

    def _read(self) -> Chunk | None:
        self._reads += 1
        if self._reads == self._stop_after:
            self.stop()  # as the SIGINT handler does
        return self._chunks.pop(0) if self._chunks and not self.stopped else None


def test_stream_windows_never_straddle_a_gap():
    audio = pcm(windows_of(5, seed=1))
    # 2.5 s, then audio was lost (an overrun, a device that came back), then 2.5 s more.
    chunks = [Chunk(audio[:40_000]), Chunk(audio[40_000:], resumed=True)]
    feed = source_feed(Chunks(chunks), FE, RATE // 2)
    got = list(feed.windows)
    assert [(w.segment, w.start) for w in got] == [
        (0, 0), (0, 8_000), (0, 16_000), (0, 24_000),
        (1, 40_000), (1, 48_000), (1, 56_000), (1, 64_000),
    ]  # fmt: skip
    np.testing.assert_array_equal(got[4].samples * 32768, audio[40_000:56_000])
    assert feed.stats.gaps == 1 and feed.stats.ended and not feed.stats.stopped
    assert feed.seconds == 5.0


def test_a_stopped_stream_enrolls_nothing(toy, tmp_path):
    audio = pcm(windows_of(20, seed=1))
    chunks = [Chunk(c) for c in np.split(audio, 20)]
    bundle = read_bundle(toy)
    feed = source_feed(Chunks(chunks, stop_after=12), FE, RATE)
    out = tmp_path / "x.msn"
    with pytest.raises(MsnEdgeError, match="stopped after 11 s of audio; nothing enrolled"):
        enroll(bundle, make_engine(bundle, "cpu"), feed, out, EnrollOptions("m"))
    assert not out.exists()


def test_a_malformed_history_is_one_clear_error(toy, tmp_path):
    parent = read_bundle(toy)
    bad = tmp_path / "bad.msn"
    write_bundle(
        bad,
        model_onnx=parent.model_bytes("fp32"),
        prototypes=parent.prototypes,
        groups=parent.groups,
        frontend=parent.frontend,
        trained_on={},
        enrollments=[{"utc": "2026-01-01T00:00:00Z", "group": "toy"}],
    )
    code, out, err = run("info", bad)
    assert "enrollment record 1 lacks msn_edge_version, mode, source" in one_error(code, err)
    rec = write_wav(tmp_path / "m.wav", windows_of(10, seed=1))
    code, out, err = run("enroll", bad, "--group", "m", "--input", rec, "-o", tmp_path / "x.msn")
    assert "enrollment record 1 lacks" in one_error(code, err)
