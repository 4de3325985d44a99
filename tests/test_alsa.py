"""Capture from real ALSA PCMs: a `file` PCM replays a known recording as a microphone.

The asoundrc (in a temporary HOME) defines `msnfile`, a `file` PCM over `null` whose
`infile` is a raw s16le recording, and `msntest`, a `plug` over it pinned to
S16_LE/16000/1, the way a real microphone is reached through `plughw:`. That PCM is not
paced (it delivers as fast as it is read) and repeats its last period at the end of the
file, so every test reads a bounded number of windows that lie inside the recording.

Needs libasound2, alsa-utils (arecord) and libportaudio2: scripts/install-system-deps.sh.
"""

from __future__ import annotations

import ctypes.util
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner
from stream_helpers import RATE, Recorder, counter
from toy_bundle import anomalous_signal, make_toy_bundle, normal_signal, toy_frontend

from msn_edge.cli import main
from msn_edge.runtime.bundle import read_bundle
from msn_edge.runtime.capture import list_input_devices, open_device
from msn_edge.runtime.detector import Detector
from msn_edge.runtime.monitor import Input, Monitor, run_monitor
from msn_edge.runtime.monitor_config import BatchPolicy
from msn_edge.runtime.sources import Backoff
from msn_edge.runtime.stream import Stream

CLI = [sys.executable, "-c", "from msn_edge.cli import main; main()"]
RECORDING_SAMPLES = 60_000  # < 2**16: every sample value of the counter occurs once


def monitor_cli(*args: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    """`msn-edge monitor ARGS` in a child process (with a fake ALSA configuration in env)."""
    return subprocess.run(
        [*CLI, "monitor", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def events_of(proc: subprocess.CompletedProcess) -> list[dict]:
    return [json.loads(line) for line in proc.stdout.splitlines()]


ASOUNDRC = """\
pcm.msnfile {{
    type file
    slave.pcm "null"
    file "/dev/null"
    infile "{infile}"
    format "raw"
}}
pcm.msntest {{
    type plug
    slave {{
        pcm "msnfile"
        format S16_LE
        rate 16000
        channels 1
    }}
}}
"""

if not ctypes.util.find_library("asound"):
    pytest.skip(
        "libasound2 (ALSA) is missing: run scripts/install-system-deps.sh", allow_module_level=True
    )


def needs_arecord() -> None:
    if not shutil.which("arecord"):
        pytest.skip("arecord (alsa-utils) is missing: run scripts/install-system-deps.sh")


def needs_portaudio() -> None:
    try:
        import sounddevice  # noqa: F401
    except OSError:
        pytest.skip("libportaudio2 is missing: run scripts/install-system-deps.sh")


class AlsaHome:
    """A temporary HOME whose .asoundrc defines the test PCMs over a given recording."""

    def __init__(self, root: Path, recording: np.ndarray) -> None:
        self.root = root
        self.infile = root / "recording.raw"
        recording.astype("<i2").tofile(self.infile)
        self.asoundrc = root / ".asoundrc"
        self.config = ASOUNDRC.format(infile=self.infile)
        self.asoundrc.write_text(self.config)
        self.env = {**os.environ, "HOME": str(root)}


@pytest.fixture
def alsa_home(tmp_path, monkeypatch) -> AlsaHome:
    home = AlsaHome(tmp_path, counter(RECORDING_SAMPLES))
    monkeypatch.setenv("HOME", str(tmp_path))
    return home


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return make_toy_bundle(tmp_path_factory.mktemp("bundle") / "toy.msn")


@pytest.mark.parametrize("hop_s", [None, 0.1])
def test_arecord_capture_gives_every_sample_exactly(alsa_home, hop_s):
    needs_arecord()
    det = Recorder()
    with open_device("msntest", RATE, capture="arecord") as source:
        summary = run_monitor(source, det, lambda e: None, hop_s=hop_s, max_windows=12)
    size = det.frontend.window_samples
    hop = size if hop_s is None else int(hop_s * RATE)
    assert summary.windows == 12
    for k, w in enumerate(det.windows):
        np.testing.assert_array_equal(w, counter(size, start=k * hop))


def test_portaudio_capture_gives_every_sample_exactly(alsa_home):
    needs_portaudio()
    det = Recorder()
    with open_device("msntest", RATE, capture="portaudio") as source:
        summary = run_monitor(source, det, lambda e: None, max_windows=12)
    assert summary.windows == 12
    for k, w in enumerate(det.windows):
        np.testing.assert_array_equal(w, counter(4_000, start=k * 4_000))


def test_devices_lists_the_asoundrc_pcm(alsa_home):
    needs_arecord()
    names = [d.name for d in list_input_devices()]
    assert "msntest" in names and "msnfile" in names
    result = CliRunner().invoke(main, ["devices"])
    assert result.exit_code == 0
    assert "msntest" in result.stdout.split()


def test_unknown_device_is_one_clear_error(alsa_home, toy):
    needs_arecord()
    proc = monitor_cli(str(toy), "--device", "nosuchpcm", env=alsa_home.env, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1] == (
        "Error: ALSA device 'nosuchpcm' not found; `msn-edge devices` lists the inputs"
    )


def test_cli_monitor_on_a_real_alsa_device(tmp_path, monkeypatch, toy):
    """`msn-edge monitor --device` for real: the verdicts and scores of the recording."""
    needs_arecord()
    fe, rng = toy_frontend(), np.random.default_rng(7)
    pattern = "nnaaan"
    make = {"n": normal_signal, "a": anomalous_signal}
    audio = np.concatenate([make[c](fe, rng) for c in pattern])
    pcm = (audio * 32768).clip(-32768, 32767).astype(np.int16)
    home = AlsaHome(tmp_path, pcm)
    events_file = tmp_path / "events.jsonl"
    proc = monitor_cli(
        str(toy),
        *("--device", "msntest", "--max-windows", str(len(pattern)), "--alarm-after", "2"),
        *("--threads", "1", "--events-file", str(events_file)),
        env=home.env,
    )
    assert proc.returncode == 0, proc.stderr
    events = events_of(proc)
    windows = [e for e in events if e["event"] == "window"]
    assert "".join(e["verdict"][0] for e in windows) == pattern
    assert [e["event"] for e in events if e["event"] != "window"] == ["alarm", "clear"]
    assert events_file.read_text() == proc.stdout
    # The same windows scored in this process give the same scores: the device delivered
    # exactly the recording, window by window.
    det = Detector.open(toy, threads=1)
    size = fe.window_samples
    for k, e in enumerate(windows):
        expected = det.score(pcm[k * size : (k + 1) * size].astype(np.float32) / 32768.0)
        assert e["score"] == expected.score, (e["score"], expected.score)
    assert f"stopped: {len(pattern)} windows, 3 anomalous, 0 invalid, 1 alarms" in proc.stderr


def test_unpaced_device_overruns_are_counted_in_events(alsa_home, toy):
    """The file PCM outruns any consumer: lost audio shows up in events and the summary."""
    needs_arecord()
    counter(RATE * 70).astype("<i2").tofile(alsa_home.infile)
    proc = monitor_cli(str(toy), "--device", "msntest", "--max-windows", "60", env=alsa_home.env)
    assert proc.returncode == 0, proc.stderr
    windows = [e for e in events_of(proc) if e["event"] == "window"]
    assert len(windows) == 60
    lost = [e for e in windows if e["overruns"]]
    assert lost, "60 windows of an unpaced device must overrun the 30 s queue"
    # Dropped by the monitor (counted to the sample), or overruns arecord reported.
    assert "dropping audio" in proc.stderr or "overrun!!!" in proc.stderr
    summary = next(x for x in proc.stderr.splitlines() if "stopped:" in x)
    total = int(summary.split(" overruns")[0].rsplit(" ", 1)[1])
    dropped = int(summary.split(" samples dropped")[0].rsplit("(", 1)[1])
    assert 1 <= sum(e["overruns"] for e in windows) <= total
    assert sum(e["dropped_samples"] for e in windows) <= dropped


def _arecord_children() -> list[int]:
    """Process ids of the arecord processes this test process started."""
    me, found = os.getpid(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        if ppid == me and comm == "arecord":
            found.append(int(entry.name))
    return found


def test_vanished_device_is_retried_and_capture_resumes(alsa_home, caplog):
    """The PCM disappears (its arecord dies, the name is gone), then comes back."""
    needs_arecord()
    det = Recorder()
    restored = threading.Event()
    state = {"killed": False, "after": 0}

    def restore_after_a_failed_try() -> None:
        deadline = time.monotonic() + 10
        while "still unavailable" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.02)
        alsa_home.asoundrc.write_text(alsa_home.config)  # plugged in again
        restored.set()

    def sink(event: dict) -> None:
        if event["index"] == 1 and not state["killed"]:
            alsa_home.asoundrc.write_text("# the microphone is unplugged\n")
            for pid in _arecord_children():
                os.kill(pid, signal.SIGKILL)
            state["killed"] = True
            threading.Thread(target=restore_after_a_failed_try).start()
        if source.stats.reconnects:
            state["after"] += 1
            if state["after"] == 6:
                source.stop()

    with caplog.at_level(logging.INFO):
        source = open_device(
            "msntest", RATE, capture="arecord", queue_s=1.0, backoff=Backoff(first_s=0.1, max_s=0.2)
        )
        with source:
            summary = run_monitor(source, det, sink)
    assert restored.is_set() and summary.reconnects == 1
    assert (
        "msntest: capture failed (ALSA device 'msntest': arecord stopped (killed by SIGKILL)); "
        "reopening" in caplog.text
    )
    assert "msntest: still unavailable (try 1: ALSA device 'msntest' not found" in caplog.text
    assert "msntest: capture resumed (try" in caplog.text
    size = det.frontend.window_samples
    for k in range(4):  # the queue (1 s) held the first four windows before the unplug
        np.testing.assert_array_equal(det.windows[k], counter(size, start=k * size))
    # After the reconnect the device plays the recording from its start again.
    restarts = [k for k, w in enumerate(det.windows) if k >= 4 and np.array_equal(w, counter(size))]
    assert restarts, "no window restarted at the beginning of the recording"


def test_install_script_is_idempotent_and_quiet_when_done():
    """The script CI runs first: a second run finds everything and changes nothing."""
    if os.geteuid() != 0:
        pytest.skip("installing system packages needs root")
    script = Path(__file__).resolve().parents[1] / "scripts" / "install-system-deps.sh"
    first = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    again = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60)
    assert (again.returncode, again.stdout, again.stderr) == (0, "", "")


def test_wav_written_by_arecord_round_trips(alsa_home, tmp_path):
    """arecord itself reads the PCM as the recording (a check of the test set-up)."""
    needs_arecord()
    out = tmp_path / "check.wav"
    subprocess.run(
        [
            "arecord",
            "-q",
            "-D",
            "msntest",
            "-f",
            "S16_LE",
            "-r",
            "16000",
            "-c",
            "1",
            "-s",
            "16000",
            str(out),
        ],
        check=True,
        env=alsa_home.env,
        timeout=30,
    )
    data, rate = sf.read(out, dtype="int16")
    assert rate == RATE
    np.testing.assert_array_equal(data, counter(16_000))


ASOUNDRC_4CH = """\
pcm.msnfile4 {{
    type file
    slave.pcm "null"
    file "/dev/null"
    infile "{infile}"
    format "raw"
}}
pcm.msn4 {{
    type plug
    slave {{
        pcm "msnfile4"
        format S16_LE
        rate 16000
        channels 4
    }}
}}
"""


def test_four_channel_device_gives_each_stream_its_channel(tmp_path, monkeypatch, toy):
    """One arecord -c 4 capture, four streams: each gets exactly its own channel."""
    needs_arecord()
    frames = np.stack([counter(RECORDING_SAMPLES // 4, start=c * 15_000) for c in range(4)], 1)
    infile = tmp_path / "four.raw"
    frames.astype("<i2").tofile(infile)
    (tmp_path / ".asoundrc").write_text(ASOUNDRC_4CH.format(infile=infile))
    monkeypatch.setenv("HOME", str(tmp_path))
    det = Recorder()
    streams = [Stream(f"ch{c}", det, det.scorer, max_windows=3) for c in range(4)]
    events: list[dict] = []
    with open_device("msn4", RATE, capture="arecord", channels=4) as source:
        assert source.channels == 4
        inp = Input(source, list(enumerate(streams)), pumped=True)
        Monitor([inp], events.append, policy=BatchPolicy(max_batch=8, max_wait_s=5)).run()
    assert det.batches == [4, 4, 4]  # the channels' windows are ready together: one call each
    got = {f"ch{c}": [] for c in range(4)}
    for e, w in zip(events, det.windows, strict=True):
        got[e["stream"]].append(w)
    for c in range(4):
        assert len(got[f"ch{c}"]) == 3
        for k, w in enumerate(got[f"ch{c}"]):
            np.testing.assert_array_equal(w, counter(4000, start=c * 15_000 + k * 4000))


def test_cli_channels_option_names_one_stream_per_channel(tmp_path, toy):
    needs_arecord()
    fe, rng = toy_frontend(), np.random.default_rng(3)
    waves = [normal_signal(fe, rng), anomalous_signal(fe, rng)]  # channel 0 hums, 1 whines
    frames = np.stack([np.tile(w, 3) for w in waves], 1)
    infile = tmp_path / "two.raw"
    (frames * 32768).clip(-32768, 32767).astype("<i2").tofile(infile)
    (tmp_path / ".asoundrc").write_text(
        ASOUNDRC_4CH.replace("channels 4", "channels 2").format(infile=infile)
    )
    proc = monitor_cli(
        str(toy),
        *("--device", "msn4", "--channels", "2", "--max-windows", "2"),
        *("--alarm-after", "0", "--threads", "1"),
        env={**os.environ, "HOME": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stderr
    events = events_of(proc)
    verdicts = {(e["stream"], e["verdict"]) for e in events}
    assert verdicts == {("msn4.ch0", "normal"), ("msn4.ch1", "anomalous")}
    assert len(events) == 4


def test_enroll_from_a_real_alsa_device(tmp_path, monkeypatch, toy):
    """`msn-edge enroll --device`: the PCM's first 9 s enroll exactly as the same WAV does."""
    needs_arecord()
    fe, rng = toy_frontend(), np.random.default_rng(11)
    audio = np.concatenate([normal_signal(fe, rng) for _ in range(12)])
    pcm = (audio * 32768).clip(-32768, 32767).astype(np.int16)
    AlsaHome(tmp_path, pcm)
    monkeypatch.setenv("HOME", str(tmp_path))
    runner, alsa, wav = CliRunner(), tmp_path / "alsa.msn", tmp_path / "wav.msn"
    args = ["enroll", str(toy), "--group", "m", "--threads", "1", "--json"]
    res = runner.invoke(main, [*args, "--device", "msntest", "--minutes", "0.15", "-o", str(alsa)])
    assert res.exit_code == 0, res.output
    record = json.loads(res.stdout)
    assert record["source"] == "msntest" and record["seconds"] == 9.0
    assert record["windows"]["used"] == 9 and record["gaps"] == 0
    sf.write(tmp_path / "same.wav", pcm[: 9 * fe.window_samples], RATE, subtype="PCM_16")
    res = runner.invoke(main, [*args, "--input", str(tmp_path / "same.wav"), "-o", str(wav)])
    assert res.exit_code == 0, res.output
    a, b = read_bundle(alsa), read_bundle(wav)
    np.testing.assert_array_equal(a.prototypes, b.prototypes)
    assert a.group("m").threshold == b.group("m").threshold
