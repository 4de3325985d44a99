"""Synthetic machines: the physics each kind and fault claims, levels, determinism, layout."""

import json

import numpy as np
import pytest
import soundfile as sf

from msn_edge import synth
from msn_edge.datasets import scan
from msn_edge.runtime.errors import DatasetError

SR = synth.SAMPLE_RATE
SECONDS = 4.0  # long enough for the slowest rhythms (valve period, slider stroke) to repeat


def clip(kind, anomaly=None, mid=0, seed=0, seconds=SECONDS):
    rng = np.random.default_rng(seed)
    return synth.machine_clip(kind, mid, rng, seconds=seconds, anomaly=anomaly).astype(np.float64)


def fault(kind, anomaly, mid=0, seed=0, seconds=SECONDS):
    """(normal clip, fault component): the same rng gives the same normal sound."""
    normal = clip(kind, None, mid, seed, seconds)
    return normal, clip(kind, anomaly, mid, seed, seconds) - normal


def spectrum(x):
    return np.fft.rfftfreq(x.size, 1 / SR), np.abs(np.fft.rfft(x))


def frame_rms(x, seconds):
    h = int(seconds * SR)
    return np.sqrt(np.mean(x[: x.size // h * h].reshape(-1, h) ** 2, axis=1))


def autocorr_peak(env, frame_s, lo_s, hi_s):
    """The lag (s) in [lo_s, hi_s] where the envelope best matches itself."""
    env = env - env.mean()
    ac = np.correlate(env, env, "full")[env.size - 1 :]
    lags = np.arange(ac.size) * frame_s
    sel = (lags >= lo_s) & (lags <= hi_s)
    return lags[sel][np.argmax(ac[sel])]


def energy_db(x, ref):
    return 10 * np.log10(np.sum(x**2) / np.sum(ref**2))


ALL_FAULTS = [(k, a) for k in synth.KINDS for a in synth.ANOMALIES[k]]


# --- every clip ------------------------------------------------------------------------


@pytest.mark.parametrize("kind, anomaly", [(k, None) for k in synth.KINDS] + ALL_FAULTS)
def test_clip_is_float32_in_range_at_a_realistic_level(kind, anomaly):
    x = synth.machine_clip(kind, 1, np.random.default_rng(3), seconds=2.0, anomaly=anomaly)
    assert x.dtype == np.float32 and x.shape == (2 * SR,)
    assert np.abs(x).max() < 1.0
    rms_dbfs = 20 * np.log10(np.sqrt(np.mean(x.astype(np.float64) ** 2)))
    assert -45 < rms_dbfs < -15


@pytest.mark.parametrize("kind", synth.KINDS)
def test_clips_are_seeded_and_vary(kind):
    a, b = clip(kind, seed=5), clip(kind, seed=5)
    assert np.array_equal(a, b)
    c = clip(kind, seed=6)
    assert abs(np.corrcoef(a, c)[0, 1]) < 0.5  # new phases, noise, timing: not a copy


def test_machines_are_fixed_by_seed_and_id():
    for kind in synth.KINDS:
        assert synth.machine(kind, 0, seed=0) == synth.machine(kind, 0, seed=0)
        assert synth.machine(kind, 0, seed=0) != synth.machine(kind, 1, seed=0)
        assert synth.machine(kind, 0, seed=0) != synth.machine(kind, 0, seed=1)
    with pytest.raises(ValueError, match="unknown machine kind 'drill'"):
        synth.machine("drill", 0)
    with pytest.raises(ValueError, match="unknown fan anomaly 'missing'"):
        synth.machine_clip("fan", 0, np.random.default_rng(0), anomaly="missing")


@pytest.mark.parametrize("kind", synth.KINDS)
def test_ids_are_distinct_machines(kind):
    """Clips of one ID resemble each other more than another ID's: the classes are learnable."""
    edges = np.geomspace(50, 7500, 33)

    def bands(x):
        f, mag = spectrum(x)
        return np.log(
            [np.sum(mag[(f >= a) & (f < b)] ** 2) for a, b in zip(edges, edges[1:], strict=False)]
        )

    ids = {mid: [bands(clip(kind, mid=mid, seed=s)) for s in range(3)] for mid in (0, 1)}
    dist = lambda u, v: np.sqrt(np.mean((u - v) ** 2))  # noqa: E731
    within = [dist(u, v) for m in ids for i, u in enumerate(ids[m]) for v in ids[m][i + 1 :]]
    between = [dist(u, v) for u in ids[0] for v in ids[1]]
    assert max(within) < min(between)


# --- normal physics --------------------------------------------------------------------


@pytest.mark.parametrize("mid", [0, 1, 2])
def test_fan_has_a_blade_pass_peak_at_its_shaft_harmonic(mid):
    m = synth.machine("fan", mid)
    bpf = m.blades * m.shaft_hz  # a shaft harmonic: one pressure pulse per blade
    f, mag = spectrum(clip("fan", mid=mid, seed=mid))
    band = (f > 0.7 * bpf) & (f < 1.3 * bpf)
    peak = f[band][np.argmax(mag[band])]
    assert peak == pytest.approx(bpf, rel=0.01)  # per-clip speed spread is 0.3 %
    assert mag[band].max() > 3 * np.median(mag[band])


@pytest.mark.parametrize("mid", [0, 1, 2])
def test_valve_impacts_repeat_at_the_valve_period(mid):
    m = synth.machine("valve", mid)
    env = frame_rms(clip("valve", mid=mid, seed=mid, seconds=6.0), 0.005)
    lag = autocorr_peak(env, 0.005, 0.15, 1.5 * m.period_s)
    assert lag == pytest.approx(m.period_s, rel=0.02)


@pytest.mark.parametrize("mid", [0, 1, 2])
def test_slider_level_follows_the_stroke(mid):
    """Sliding noise is loudest at full speed: twice per back-and-forth stroke."""
    m = synth.machine("slider", mid)
    env = frame_rms(clip("slider", mid=mid, seed=mid, seconds=6.0), 0.02)
    lag = autocorr_peak(env, 0.02, 0.25 * m.stroke_s, 0.75 * m.stroke_s)
    assert lag == pytest.approx(m.stroke_s / 2, rel=0.04)  # stroke varies 1 % per clip


# --- fault physics ---------------------------------------------------------------------


@pytest.mark.parametrize("mid", [0, 1])
def test_bearing_fault_rings_a_resonance_at_the_defect_frequency(mid):
    m = synth.machine("fan", mid)
    _, d = fault("fan", "bearing", mid=mid, seed=mid)
    f, mag = spectrum(d)
    assert np.sum(mag[f > 2000] ** 2) > 0.9 * np.sum(mag**2)  # excites the housing, not the air
    f, env = spectrum(np.abs(d) - np.abs(d).mean())  # envelope spectrum, as in diagnostics
    sel = (f > 1.5 * m.shaft_hz) & (f < 6 * m.shaft_hz)
    bpfo = m.bearing_ratio * m.shaft_hz
    assert f[sel][np.argmax(env[sel])] == pytest.approx(bpfo, rel=0.01)


@pytest.mark.parametrize("mid", [0, 1])
def test_imbalance_raises_1x_and_adds_blade_pass_sidebands(mid):
    m = synth.machine("fan", mid)
    normal, d = fault("fan", "imbalance", mid=mid, seed=mid)
    f, n_mag = spectrum(normal)
    _, a_mag = spectrum(normal + d)
    _, d_mag = spectrum(d)
    near = lambda hz: np.abs(f - hz) < 0.01 * hz  # noqa: E731
    assert a_mag[near(m.shaft_hz)].max() > 1.5 * n_mag[near(m.shaft_hz)].max()
    bpf = m.blades * m.shaft_hz
    around = (f > bpf - 0.5 * m.shaft_hz) & (f < bpf + 2 * m.shaft_hz)
    assert d_mag[near(bpf + m.shaft_hz)].max() > 5 * np.median(d_mag[around])


@pytest.mark.parametrize("kind", ["fan", "slider"])
def test_rubbing_is_intermittent_high_frequency_friction(kind):
    m = synth.machine(kind, 0)
    _, d = fault(kind, "rubbing", seconds=6.0)
    f, mag = spectrum(d)
    assert np.sum(mag[np.abs(f - m.rub_hz) < 1000] ** 2) > 0.95 * np.sum(mag**2)
    env = frame_rms(d, 0.01)
    active = np.mean(env > 0.05 * env.max())
    assert 0.03 < active < 0.8  # bursts, not a steady hiss


@pytest.mark.parametrize("seed", [0, 1])
def test_valve_faults_change_timing_not_loudness(seed):
    normal, missing = fault("valve", "missing", seed=seed)
    assert energy_db(normal + missing, normal) < -0.03
    _, extra = fault("valve", "extra", seed=seed)
    assert energy_db(normal + extra, normal) > 0.03
    _, shifted = fault("valve", "shifted", seed=seed)
    assert abs(energy_db(normal + shifted, normal)) < 0.05  # the same impacts, moved
    assert energy_db(shifted, normal) > -15


def test_rail_damage_strikes_twice_per_stroke():
    m = synth.machine("slider", 2)
    _, d = fault("slider", "rail_damage", mid=2, seconds=6.0)
    loud = frame_rms(d, 0.005) > 0.2 * frame_rms(d, 0.005).max()
    onsets = np.flatnonzero(loud[1:] & ~loud[:-1]).size + loud[0]
    assert abs(onsets - 2 * 6.0 / m.stroke_s) <= 2


@pytest.mark.parametrize("kind, anomaly", ALL_FAULTS)
def test_fault_level_is_realistic(kind, anomaly):
    """Measurable, never dominating: the stated level relative to the clip."""
    for seed in (0, 1):
        normal, d = fault(kind, anomaly, mid=seed, seed=seed)
        level = energy_db(d, normal)
        lo, hi = synth.ANOMALY_DB.get((kind, anomaly), (-25.0, -5.0))
        assert lo - 0.1 < level < hi + 0.1


# --- streams ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", synth.KINDS)
def test_stream_fault_stays_in_its_stretch_and_fades_in(kind):
    first, second = synth.ANOMALIES[kind][:2]
    a = synth.synth_stream(kind, 1, 3.0, 3.0, 2.0, seed=4, anomaly=first)
    b = synth.synth_stream(kind, 1, 3.0, 3.0, 2.0, seed=4, anomaly=second)
    assert a.dtype == np.float32 and a.shape == (8 * SR,)
    start, stop = 3 * SR, 6 * SR
    # The machine runs on unchanged: outside the stretch both streams are the same sound.
    assert np.array_equal(a[:start], b[:start]) and np.array_equal(a[stop:], b[stop:])
    d = a.astype(np.float64) - b
    assert np.any(d[start:stop] != 0)
    if kind != "valve":  # added faults fade in over STREAM_RAMP_S: no click at the join
        middle = np.sqrt(np.mean(d[start + SR : stop - SR] ** 2))
        assert np.sqrt(np.mean(d[start : start + SR // 50] ** 2)) < 0.1 * middle


def test_stream_rejects_an_empty_stretch():
    with pytest.raises(ValueError, match="faulty one > 0 s"):
        synth.synth_stream("fan", 0, 1.0, 0.0, 1.0)


# --- data sets -------------------------------------------------------------------------

SMALL = dict(ids_per_kind=2, n_train=2, n_test_normal=1, n_test_anomaly=3, seconds=1.0)


def test_synthesize_writes_a_dcase2020_data_set(tmp_path):
    summary = synth.synthesize(tmp_path / "set", seed=1, **SMALL)
    assert summary["clips"] == 3 * 2 * 6
    assert summary["kinds"]["fan"] == {
        "ids": 2,
        "train normal": 4,
        "test normal": 2,
        "test anomaly": 6,
        "faults": {"bearing": 2, "imbalance": 2, "rubbing": 2},
    }
    clips = scan(tmp_path / "set")
    assert {c.layout for c in clips} == {"dcase2020"}
    assert {c.group for c in clips} == {f"{k}/id_0{i}" for k in synth.KINDS for i in (0, 1)}
    assert sum(c.split == "train" for c in clips) == 12
    anomalous = {
        c.path.relative_to(tmp_path / "set").as_posix() for c in clips if c.label == "anomaly"
    }
    manifest = json.loads((tmp_path / "set" / synth.MANIFEST).read_text())
    assert set(manifest["anomalies"]) == anomalous
    assert manifest["machines"]["valve/id_01"] == json.loads(
        json.dumps(synth.machine("valve", 1, seed=1).__dict__)
    )
    info = sf.info(str(clips[0].path))
    assert (info.samplerate, info.channels, info.frames, info.subtype) == (SR, 1, SR, "PCM_16")


def test_synthesize_same_seed_same_bytes(tmp_path):
    small = {**SMALL, "kinds": ("valve",), "n_train": 1}
    synth.synthesize(tmp_path / "a", seed=3, **small)
    synth.synthesize(tmp_path / "b", seed=3, **small)
    synth.synthesize(tmp_path / "c", seed=4, **small)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.*"))
    assert len(files) == 2 * 5 + 1
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    wavs = [rel for rel in files if rel.suffix == ".wav"]
    assert all((tmp_path / "a" / r).read_bytes() != (tmp_path / "c" / r).read_bytes() for r in wavs)


def test_synthesize_refuses_a_folder_in_use(tmp_path):
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(DatasetError, match="not an empty folder"):
        synth.synthesize(tmp_path, **SMALL)
    with pytest.raises(ValueError, match="unknown machine kind"):
        synth.synthesize(tmp_path / "new", kinds=("fan", "drill"), **SMALL)
    assert not (tmp_path / "new").exists()


# --- CLI -------------------------------------------------------------------------------


def test_cli_synth_writes_and_summarises(tmp_path):
    from click.testing import CliRunner

    from msn_edge.cli import main

    out = tmp_path / "demo"
    args = ["synth", str(out), "--kind", "valve", "--kind", "fan", "--ids", "1", "--train", "2"]
    result = CliRunner().invoke(main, [*args, "--test", "1", "--seconds", "1", "--seed", "2"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        f"wrote 8 clips (0.1 min of audio) to {out}",
        "valve: 1 IDs, train 2 normal, test 1 normal + 1 anomalous (missing 1)",
        "fan: 1 IDs, train 2 normal, test 1 normal + 1 anomalous (bearing 1)",
    ]
    assert "synth" in result.stderr  # the progress bar
    assert {c.group for c in scan(out)} == {"valve/id_00", "fan/id_00"}

    again = CliRunner().invoke(main, args)
    assert again.exit_code == 1
    assert (
        again.stderr
        == f"Error: {out}: already exists and is not an empty folder; choose a new one\n"
    )


def test_cli_synth_rejects_unknown_kind_and_has_help():
    from click.testing import CliRunner

    from msn_edge.cli import main

    result = CliRunner().invoke(main, ["synth", "x", "--kind", "drill"])
    assert result.exit_code == 2 and "'drill' is not one of" in result.stderr
    assert "Example:" in CliRunner().invoke(main, ["synth", "--help"]).stdout
