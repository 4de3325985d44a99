"""Training: mixup targets, auxiliary classes, checkpoints, resume, determinism, CLI, Ctrl-C."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from train_helpers import small_config, synth_set

from msn_edge.auxiliary import TRANSFORMS, build_classes, transform_clip
from msn_edge.checkpoint import (
    CheckpointError,
    load_checkpoint,
    new_state,
    read_checkpoint,
    save_checkpoint,
)
from msn_edge.cli import main
from msn_edge.config import preset, training_config, with_recipe
from msn_edge.datasets import scan
from msn_edge.interrupts import signals_deferred, sigterm_as_interrupt
from msn_edge.model import MSN, count_macs
from msn_edge.prototypes import load_scoring
from msn_edge.runtime.errors import DatasetError
from msn_edge.train_data import MixupSet
from msn_edge.training import train

SR = 16_000


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Two machine types x two IDs: four classes, 6 train clips each."""
    return synth_set(tmp_path_factory.mktemp("data"), kinds=("fan", "valve"), ids=2)


@pytest.fixture(scope="module")
def one_class(tmp_path_factory) -> Path:
    return synth_set(tmp_path_factory.mktemp("one"), kinds=("fan",), ids=1, n_train=4)


@pytest.fixture(scope="module")
def run3(data, tmp_path_factory):
    """Three epochs straight; other tests compare against it."""
    run = tmp_path_factory.mktemp("run3")
    return train([data], run, small_config(epochs=3), progress=False)


def _weights(run_or_result) -> dict:
    if isinstance(run_or_result, Path):
        return load_checkpoint(run_or_result).model.state_dict()
    return run_or_result.model.state_dict()


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# Mixup and label smoothing -------------------------------------------------------------


def _constant_set(mixup_prob: float) -> tuple[MixupSet, np.ndarray]:
    """Class c's clip is the constant v_c: a mixed window is the constant sum_c y_c v_c."""
    cfg = small_config(mixup_prob=mixup_prob, random_offset=False, speed_classes=())
    values = np.array([0.1, 0.2, 0.4])
    waves = [np.full(SR, v, dtype=np.float32) for v in values for _ in range(4)]
    labels = [c for c in range(3) for _ in range(4)]
    return MixupSet(waves, labels, 3, cfg.frontend, cfg.train), values


def _window_level(spec: torch.Tensor, n_fft: int) -> float:
    """The constant a window was made of: its DC bin mid-window is v * sum(hann) = v * n_fft/2."""
    return spec[0, spec.shape[1] // 2].item() / (n_fft / 2)


def test_mixup_mixes_waveforms_and_targets_alike():
    ds, values = _constant_set(mixup_prob=1.0)
    n_fft = ds.frontend.n_fft
    lambdas = []
    for epoch in range(10):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            spec, spectrum, target = ds[i]
            assert spec.shape == (ds.frontend.n_freq, ds.frontend.n_frames)
            assert spectrum.shape == (ds.frontend.spectrum_bins,)
            assert target.sum().item() == pytest.approx(1.0, abs=1e-6)
            assert (target > 0).sum() <= 2
            # The target weights are the waveform weights.
            level = float(target.numpy() @ values)
            assert _window_level(spec, n_fft) == pytest.approx(level, rel=1e-3)
            if (target > 0).sum() == 2:  # partner of another class
                lambdas.append(target[ds.labels[i]].item())
    # lambda ~ Beta(0.2, 0.2) is U-shaped: P(0.1 < lambda < 0.9) = 0.33.
    lam = np.array(lambdas)
    middle = np.mean((lam > 0.1) & (lam < 0.9))
    assert 0.15 < middle < 0.5


def test_speed_classes_label_the_speed_each_clip_is_played_at():
    """Class c is a tone at f_c; played at speed k it must peak at f_c·k, and be labelled
    as class c at that speed (class-major after the real classes)."""
    speeds = (0.94, 0.97, 1.03, 1.06)
    cfg = small_config(mixup_prob=0.0, label_smoothing_max=0.0, speed_classes=speeds)
    tones = (500.0, 1500.0)
    t = np.arange(4 * SR) / SR
    waves = [np.sin(2 * np.pi * f * t).astype(np.float32) for f in tones for _ in range(3)]
    labels = [c for c in range(len(tones)) for _ in range(3)]
    n_classes = len(tones) * (1 + len(speeds))
    ds = MixupSet(waves, labels, n_classes, cfg.frontend, cfg.train)
    seen = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            _, spectrum, target = ds[i]
            label = int(target.argmax())
            assert target[label].item() == pytest.approx(1.0)
            if label < len(tones):
                cls, speed = label, 1.0
            else:
                cls, k = divmod(label - len(tones), len(speeds))
                speed = speeds[k]
            assert cls == labels[i]
            hz_per_bin = SR / cfg.frontend.spectrum_fft_len
            peak_hz = int(spectrum.argmax()) * hz_per_bin
            assert peak_hz == pytest.approx(tones[cls] * speed, abs=2 * hz_per_bin)
            seen.add(label)
    assert len(seen) > n_classes // 2  # the speeds are drawn, not fixed per clip


def test_unmixed_clips_are_label_smoothed():
    ds, values = _constant_set(mixup_prob=0.0)
    eps = []
    for i in range(len(ds)):
        spec, _, target = ds[i]
        y = ds.labels[i]
        others = np.delete(target.numpy(), y)
        assert np.allclose(others, others[0])  # eps / C on every other class
        e = others[0] * 3
        assert target[y].item() == pytest.approx(1 - e + e / 3, abs=1e-6)
        assert _window_level(spec, ds.frontend.n_fft) == pytest.approx(values[y], rel=1e-3)
        eps.append(e)
    assert min(eps) >= 0 and max(eps) <= 0.5 and np.std(eps) > 0.05  # eps ~ U(0, 0.5)


def test_items_depend_on_seed_epoch_and_index_only():
    ds, _ = _constant_set(mixup_prob=0.5)
    first = [ds[i][2] for i in range(len(ds))]
    assert torch.equal(ds[3][2], first[3])  # the same (seed, epoch, index): the same item
    ds.set_epoch(1)
    assert not all(torch.equal(ds[i][2], first[i]) for i in range(len(ds)))


# Auxiliary classes ---------------------------------------------------------------------


def test_transforms_keep_level_and_change_the_sound():
    t = np.arange(SR) / SR
    wave = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    for name in TRANSFORMS:
        out = transform_clip(name, wave, SR)
        assert out.dtype == np.float32
        assert np.sqrt(np.mean(out**2)) == pytest.approx(np.sqrt(np.mean(wave**2)), rel=1e-3)
    # Speed 1.06: the tone moves to 466 Hz and the clip gets 6 % shorter.
    fast = transform_clip("speed_1.06", wave, SR)
    assert len(fast) == pytest.approx(SR / 1.06, abs=2)
    peak_hz = np.argmax(np.abs(np.fft.rfft(fast))) * SR / len(fast)
    assert peak_hz == pytest.approx(440 * 1.06, abs=1.5)


def test_one_class_gets_speed_classes(one_class):
    """The log-speed recipe: the machine at four speeds, drawn on the fly (no extra clips)."""
    cfg = with_recipe(small_config(), "log-speed")
    clips = [c for c in scan(one_class, split="train") if c.label == "normal"]
    waves = [np.zeros(SR, dtype=np.float32) + 0.01 for _ in clips]
    plan = build_classes(clips, waves, cfg, aux="transforms")
    speeds = cfg.train.speed_classes
    assert plan.classes == ["fan/id_00"] + [f"fan/id_00@speed_{f:.2f}" for f in speeds]
    assert plan.extra_waves == [] and plan.auxiliary["mode"] == "speed_classes"
    assert build_classes(clips, waves, cfg, aux="none").classes == plan.classes
    with pytest.raises(DatasetError, match="--aux both adds synthetic machines"):
        build_classes(clips, waves, cfg, aux="both")


def test_one_class_gets_auxiliary_classes(one_class):
    cfg = with_recipe(small_config(), "paper")
    clips = [c for c in scan(one_class, split="train") if c.label == "normal"]
    waves = [np.zeros(SR, dtype=np.float32) + 0.01 for _ in clips]
    plan = build_classes(clips, waves, cfg, aux="transforms")
    assert plan.classes[0] == "fan/id_00" and len(plan.classes) == 1 + len(TRANSFORMS)
    assert plan.labels == [0] * len(clips)
    assert len(plan.extra_waves) == len(TRANSFORMS) * len(clips)
    assert sorted(set(plan.extra_labels)) == list(range(1, len(plan.classes)))
    assert plan.auxiliary["mode"] == "transforms" and plan.auxiliary["real_classes"] == [
        "fan/id_00"
    ]
    both = build_classes(clips, waves, cfg, aux="both")
    synth = [c for c in both.classes if c.startswith("aux/synth/")]
    assert len(synth) >= 3 and len(both.classes) == len(plan.classes) + len(synth)
    # Synthetic clips are window-long, as many per machine as the real class has.
    for wave, label in zip(both.extra_waves, both.extra_labels, strict=True):
        if both.classes[label].startswith("aux/synth/"):
            assert wave.shape == (cfg.frontend.window_samples,)
    with pytest.raises(DatasetError, match="found 1 class .*at least 2"):
        build_classes(clips, waves, cfg, aux="none")


def test_two_classes_get_none(data):
    clips = scan(data, split="train")
    cfg = with_recipe(small_config(), "paper")
    plan = build_classes(clips, [np.zeros(10)] * len(clips), cfg, aux="both")
    assert plan.auxiliary is None and plan.extra_waves == []
    assert plan.classes == ["fan/id_00", "fan/id_01", "valve/id_00", "valve/id_01"]


# Training, checkpoints, resume ---------------------------------------------------------


def test_training_learns_and_writes_the_run(run3, data):
    run = run3.run_dir
    assert not run3.interrupted and run3.epoch == 3 and run3.scoring_fitted
    assert run3.losses[-1] < run3.losses[0]  # it learns (how well: test_end_to_end)
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]
    assert [r["loss"] for r in log] == pytest.approx(run3.losses)
    assert all(r["scale"] > 0 and r["clips_per_s"] > 0 for r in log)
    assert sorted(p.name for p in (run / "epochs").iterdir()) == [
        "epoch_001.pt",
        "epoch_002.pt",
        "epoch_003.pt",
    ]
    scoring = load_scoring(run)  # fit on the real clips by msn_edge.prototypes
    assert sorted(g.name for g in scoring.groups) == run3.classes


def test_checkpoint_round_trip_with_weights_only(run3):
    state = torch.load(run3.run_dir / "checkpoint.pt", weights_only=True)
    assert state["format"] == 1 and state["epoch"] == 3
    assert state["classes"] == run3.classes and state["auxiliary"] is None
    assert state["data"]["n_clips"] == 24 and len(state["data"]["groups"]) == 4
    assert {"optimizer", "head", "rng", "msn_edge_version"} <= state.keys()
    assert state["config"] == small_config(epochs=3).to_dict()
    loaded = load_checkpoint(run3.run_dir)
    assert not loaded.model.training and loaded.config == small_config(epochs=3)
    assert _same(loaded.model.state_dict(), _weights(run3))
    # Per-epoch files: weights without the optimizer, loadable the same way.
    epoch1 = torch.load(run3.run_dir / "epochs" / "epoch_001.pt", weights_only=True)
    assert epoch1["epoch"] == 1 and "optimizer" not in epoch1
    assert load_checkpoint(run3.run_dir / "epochs" / "epoch_003.pt").classes == run3.classes


def test_bad_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint there"):
        read_checkpoint(tmp_path)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable msn-edge checkpoint"):
        read_checkpoint(junk)
    cfg = small_config()
    path = save_checkpoint(tmp_path / "x.pt", new_state(cfg, MSN(cfg.model), ["a"]))
    assert load_checkpoint(path).classes == ["a"]
    torch.save({**torch.load(path, weights_only=True), "format": 99}, path)
    with pytest.raises(CheckpointError, match="format 99"):
        read_checkpoint(path)


def test_same_seed_same_weights(data, run3, tmp_path):
    a = train([data], tmp_path / "a", small_config(), progress=False, fit_scoring=False)
    b = train([data], tmp_path / "b", small_config(), progress=False, fit_scoring=False)
    c = train([data], tmp_path / "c", small_config(seed=1), progress=False, fit_scoring=False)
    assert _same(_weights(a), _weights(b))
    assert not _same(_weights(a), _weights(c))
    # The same run's first epoch, saved along the way.
    assert _same(_weights(a), _weights(run3.run_dir / "epochs" / "epoch_001.pt"))


def test_resume_continues_exactly(data, run3, tmp_path):
    run = tmp_path / "run"
    first = train([data], run, small_config(epochs=2), progress=False, fit_scoring=False)
    assert first.epoch == 2
    with pytest.raises(CheckpointError, match="exists; pass --resume"):
        train([data], run, small_config(epochs=3), progress=False)
    with pytest.raises(CheckpointError, match=r"config differs \(train.lr\)"):
        train([data], run, small_config(epochs=3, lr=1e-4), resume=True, progress=False)
    rest = train([data], run, small_config(epochs=3), resume=True, progress=False)
    assert rest.epoch == 3 and len(rest.losses) == 1
    assert rest.losses[0] == pytest.approx(run3.losses[2])
    assert _same(_weights(rest), _weights(run3))  # as if never interrupted
    log = (run / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in log] == [1, 2, 3]


def test_resume_refuses_other_classes(data, one_class, tmp_path):
    run = tmp_path / "run"
    train([data], run, small_config(), progress=False, fit_scoring=False)
    with pytest.raises(CheckpointError, match="cannot resume, the data has classes"):
        train(
            [one_class], run, small_config(epochs=2), resume=True, aux="transforms", progress=False
        )


def test_sigterm_stops_like_ctrl_c():
    with pytest.raises(KeyboardInterrupt), sigterm_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.fixture
def ctrl_c_raises():
    """SIGINT as an interactive Python has it, even where the suite runs in the background
    (`cmd &` starts with SIGINT ignored, and Python keeps it so)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def _ctrl_c_as_in_a_terminal() -> None:
    """preexec_fn for a child that a terminal's Ctrl-C would reach (see ctrl_c_raises)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_a_save_is_not_cut_short_by_ctrl_c(ctrl_c_raises):
    done = []
    with pytest.raises(KeyboardInterrupt), signals_deferred():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
        done.append(True)  # the block ran to its end first
    assert done == [True]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_ignored_ctrl_c_stays_ignored_during_a_save():
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as under nohup
    try:
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN  # and no KeyboardInterrupt
    finally:
        signal.signal(signal.SIGINT, before)


# CLI -----------------------------------------------------------------------------------


def test_cli_one_class_adds_auxiliary_classes(one_class, tmp_path):
    run = tmp_path / "run"
    args = ["train", str(one_class), "-o", str(run), "--preset", "tiny", "--epochs", "1"]
    paper = ["--recipe", "paper", "--aux", "transforms", "--no-progress"]
    result = CliRunner().invoke(main, [*args, *paper])
    assert result.exit_code == 0, result.output
    n_aux = len(TRANSFORMS)
    assert f"found 1 class (fan/id_00); adding {n_aux} auxiliary classes" in result.stderr
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    aux = state["auxiliary"]
    assert aux["mode"] == "transforms" and len(aux["classes"]) == len(TRANSFORMS)
    assert state["classes"][0] == "fan/id_00" and len(state["classes"]) == 1 + len(TRANSFORMS)
    assert state["data"]["n_clips"] == 4  # auxiliary clips are not data
    # Prototypes only for the real machine.
    assert [g.name for g in load_scoring(run).groups] == ["fan/id_00"]
    # Resuming under another preset is refused, in one line.
    again = CliRunner().invoke(main, ["train", str(one_class), "-o", str(run), "--resume"])
    assert again.exit_code == 0, again.output  # the run's own config: nothing left to do
    other = CliRunner().invoke(main, [*args[:-4], "--preset", "dcase2020", "--resume"])
    assert other.exit_code == 1
    assert "cannot resume, the config differs (preset, model." in other.stderr


def test_cli_refuses_one_class_without_aux(one_class, tmp_path):
    args = ["train", str(one_class), "-o", str(tmp_path / "r"), "--preset", "tiny", "--aux", "none"]
    args += ["--recipe", "paper"]  # log-speed's speed classes need no auxiliary classes
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert "Error: found 1 class (fan/id_00)" in result.stderr
    assert "Traceback" not in result.output and not (tmp_path / "r" / "checkpoint.pt").exists()


@pytest.mark.slow  # trains in two processes: 10 s idle, 15 s and more on a busy machine
def test_cli_ctrl_c_keeps_the_last_checkpoint_and_resumes(data, tmp_path):
    run = tmp_path / "run"
    cli = [sys.executable, "-c", "from msn_edge.cli import main; main()"]
    base = ["train", str(data), "-o", str(run), "--preset", "tiny", "--recipe", "paper"]
    base += ["--no-progress"]  # the paper's recipe: epochs count exactly (no min_steps)
    proc = subprocess.Popen(
        [*cli, *base, "--epochs", "1000", "--batch-size", "24"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_ctrl_c_as_in_a_terminal,
    )
    try:
        deadline = time.monotonic() + 120
        while not (run / "epochs" / "epoch_001.pt").exists() and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:  # a failed test leaves no 1000-epoch training behind
        proc.kill()
        proc.wait()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("Interrupted; last complete checkpoint:")
    assert "Traceback" not in err
    epoch = torch.load(run / "checkpoint.pt", weights_only=True)["epoch"]
    assert epoch >= 1 and not list(run.rglob("*.tmp"))
    # --resume goes on from there with the run's config (one more epoch), fits the prototypes.
    more = ["train", str(data), "-o", str(run), "--resume", "--epochs", str(epoch + 1)]
    done = subprocess.run([*cli, *more], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"resuming {run / 'checkpoint.pt'} after epoch {epoch}" in done.stderr
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == epoch + 1
    assert (run / "scoring.npz").is_file()


def test_cli_info_matches_the_spec():
    result = CliRunner().invoke(main, ["info", "--preset", "dcase2020"])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split()[1:] for line in result.output.splitlines()[1:]}
    params, macs = (int(x.replace(",", "")) for x in rows["total"])
    assert 10e6 < params < 13e6  # spec: "about 12 M"; this architecture has 10.53 M
    assert macs == pytest.approx(2.07e9, rel=0.01)
    assert macs == count_macs(MSN(preset("dcase2020").model))
    branches = ("spectrogram", "spectrum", "scanning", "fusion")
    assert sum(int(rows[b][1].replace(",", "")) for b in branches) == macs
    assert sum(int(rows[b][0].replace(",", "")) for b in branches) == params


def test_min_steps_grow_the_epochs_but_zero_epochs_stay_untrained(data, tmp_path):
    """24 clips in batches of 8 make 3 steps an epoch: min_steps 7 needs 3 epochs; 0 epochs
    is the initial network (the learning test's reference), whatever min_steps says."""
    grown = train(
        [data],
        tmp_path / "a",
        small_config(epochs=1, min_steps=7),
        progress=False,
        fit_scoring=False,
    )
    assert grown.epoch == 3 and len(grown.losses) == 3
    untrained = train([data], tmp_path / "b", small_config(epochs=0, min_steps=7), progress=False)
    assert untrained.epoch == 0 and untrained.losses == [] and untrained.scoring_fitted
    state = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 0


def test_training_config_takes_the_preset_or_the_resumed_run(tmp_path):
    cfg = with_recipe(small_config(epochs=3), "log-speed")
    save_checkpoint(tmp_path / "checkpoint.pt", new_state(cfg, MSN(cfg.model), ["a", "b"]))
    # --resume without --preset: the run's own config, with the given settings over it.
    resumed = training_config(resume_from=tmp_path, epochs=5, seed=None)
    assert resumed.model == cfg.model and resumed.frontend == cfg.frontend
    assert resumed.train.epochs == 5 and resumed.train.seed == cfg.train.seed
    # A named preset wins over the run's; no preset and no run: dcase2020.
    assert training_config("tiny", resume_from=tmp_path) == preset("tiny")
    fresh = training_config(recipe="log-speed", batch_size=16)
    assert fresh.preset == "dcase2020" and fresh.train.batch_size == 16
    assert fresh.model == with_recipe(preset("dcase2020"), "log-speed").model


def test_adaproj_trains_records_its_loss_and_resumes_exactly(data, tmp_path):
    """The logspec-adaproj recipe's head (class subspaces): checkpointed with the run's
    config, resumed bit for bit, and never silently swapped for the paper's head."""
    cfg = small_config(epochs=2, loss="adaproj", sub_clusters=4)
    whole = train([data], tmp_path / "whole", cfg, progress=False, fit_scoring=False)
    assert whole.losses[-1] < whole.losses[0]
    state = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    assert state["config"]["train"]["loss"] == "adaproj"
    assert state["head"]["weight"].shape[0] == len(whole.classes) * 4
    run = tmp_path / "run"
    train([data], run, replace(cfg, train=replace(cfg.train, epochs=1)), progress=False)
    with pytest.raises(CheckpointError, match=r"config differs \(train.loss\)"):
        train([data], run, small_config(epochs=2, sub_clusters=4), resume=True, progress=False)
    rest = train([data], run, cfg, resume=True, progress=False, fit_scoring=False)
    assert rest.losses[0] == pytest.approx(whole.losses[1])
    assert _same(_weights(rest), _weights(whole))
