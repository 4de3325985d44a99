"""The monitor loop, its events and alarms, the CLI commands, and the timeline plot."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner
from stream_helpers import RATE, Recorder, counter
from toy_bundle import anomalous_signal, make_toy_bundle, normal_signal, toy_frontend

from msn_edge.cli import main
from msn_edge.runtime.alarm import AlarmState
from msn_edge.runtime.detector import Detector
from msn_edge.runtime.errors import MsnEdgeError
from msn_edge.runtime.events import EventSink, StreamClock, input_level, iso_utc
from msn_edge.runtime.monitor import run_monitor
from msn_edge.runtime.plot import plot_timeline, read_events
from msn_edge.runtime.sources import (
    Chunk,
    FileSource,
    LiveSource,
    PacedReader,
    RawPcmSource,
    Source,
)

LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ ")
CLI = [sys.executable, "-c", "from msn_edge.cli import main; main()"]


class Chunks(Source):
    """A source serving prepared chunks (with gap flags) and nothing else."""

    def __init__(self, chunks: list[Chunk]) -> None:
        super().__init__("chunks", RATE)
        self._chunks = list(chunks)

    def _read(self) -> Chunk | None:
        return self._chunks.pop(0) if self._chunks and not self._stopping else None


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return make_toy_bundle(tmp_path_factory.mktemp("bundle") / "toy.msn")


def toy_recording(path: Path, pattern: str, seed: int = 3) -> Path:
    """One 1 s toy window per letter: n = normal hum, a = anomalous whine."""
    fe, rng = toy_frontend(), np.random.default_rng(seed)
    make = {"n": normal_signal, "a": anomalous_signal}
    sf.write(path, np.concatenate([make[c](fe, rng) for c in pattern]), RATE, subtype="PCM_16")
    return path


@pytest.mark.parametrize("hop_s", [None, 0.1, 0.0625])
@pytest.mark.parametrize("kind", ["file", "stdin"])
def test_every_window_holds_exactly_its_samples(tmp_path, kind, hop_s):
    signal = counter(RATE * 3 + 777, start=-5_000)
    if kind == "file":
        sf.write(tmp_path / "ramp.wav", signal, RATE, subtype="PCM_16")
        source = FileSource(tmp_path / "ramp.wav", RATE)
    else:
        source = RawPcmSource(io.BytesIO(signal.astype("<i2").tobytes()), RATE)
    det, events = Recorder(), []
    summary = run_monitor(source, det, events.append, hop_s=hop_s)
    size = det.frontend.window_samples
    hop = size if hop_s is None else int(hop_s * RATE)
    assert len(det.windows) == summary.windows == (signal.size - size) // hop + 1
    for k, (w, ev) in enumerate(zip(det.windows, events, strict=True)):
        np.testing.assert_array_equal(w, signal[k * hop : k * hop + size])
        assert (ev["index"], ev["start_s"], ev["end_s"]) == (
            k,
            k * hop / RATE,
            (k * hop + size) / RATE,
        )
    if hop_s is None:  # every received sample is in a window or counted as discarded
        assert summary.discarded_samples == signal.size - summary.windows * size
    assert summary.audio_s == signal.size / RATE


def test_window_events_carry_the_documented_fields(toy, tmp_path):
    clip = toy_recording(tmp_path / "clip.wav", "nnaaan")
    det = Detector.open(toy)
    events = []
    summary = run_monitor(
        FileSource(clip, RATE),
        det,
        events.append,
        alarm_after=2,
        wall_clock=lambda: 1_700_000_000.0,
    )
    windows = [e for e in events if e["event"] == "window"]
    assert [e["verdict"] for e in windows] == ["normal"] * 2 + ["anomalous"] * 3 + ["normal"]
    first = windows[0]
    assert set(first) == {
        "event",
        "stream",
        "index",
        "start",
        "end",
        "start_s",
        "end_s",
        "score",
        "threshold",
        "anomalous",
        "verdict",
        "invalid_reason",
        "latency_ms",
        "frontend_ms",
        "inference_ms",
        "backend",
        "overruns",
        "dropped_samples",
        "reconnects",
        "after_gap",
        "peak_dbfs",
        "silent",
        "clipped",
    }
    # The first chunk (0.1 s) ended "now": the stream began 0.1 s earlier.
    assert first["start"] == "2023-11-14T22:13:19.900Z"
    assert first["end"] == "2023-11-14T22:13:20.900Z"
    assert first["backend"] == det.backend == "cpu"
    assert {e["stream"] for e in events} == {"main"}
    assert first["threshold"] == pytest.approx(det.threshold)
    assert first["latency_ms"] == pytest.approx(
        first["frontend_ms"] + first["inference_ms"], abs=0.02
    )
    assert all(e["score"] > e["threshold"] for e in windows[2:5])
    assert not any(
        e["overruns"] or e["dropped_samples"] or e["reconnects"] or e["after_gap"] for e in windows
    )
    alarm, clear = (e for e in events if e["event"] != "window")
    assert events.index(alarm) == 4 and alarm["index"] == 3  # after the 2nd anomalous window
    assert (alarm["since_index"], alarm["anomalous_windows"]) == (2, 2)
    assert alarm["since"] == windows[2]["start"] and alarm["time"] == windows[3]["end"]
    assert events.index(clear) == len(events) - 1 and clear["index"] == 5
    assert (clear["anomalous_windows"], clear["duration_s"]) == (3, 4.0)
    assert (summary.windows, summary.anomalous, summary.alarms) == (6, 3, 1)
    assert not summary.alarm_active


def test_alarm_still_active_at_the_end_is_reported(toy, tmp_path, caplog):
    clip = toy_recording(tmp_path / "clip.wav", "naaa")
    with caplog.at_level(logging.INFO):
        summary = run_monitor(
            FileSource(clip, RATE), Detector.open(toy), lambda e: None, alarm_after=3
        )
    assert (summary.alarms, summary.alarm_active) == (1, True)
    assert "1 alarms, alarm still active" in caplog.text


def test_bounded_runs_stop_exactly(tmp_path):
    sf.write(tmp_path / "ramp.wav", counter(RATE * 5), RATE, subtype="PCM_16")
    det = Recorder()
    summary = run_monitor(
        FileSource(tmp_path / "ramp.wav", RATE), det, lambda e: None, max_windows=7
    )
    assert summary.windows == len(det.windows) == 7
    det = Recorder()
    summary = run_monitor(
        FileSource(tmp_path / "ramp.wav", RATE), det, lambda e: None, max_seconds=1.3
    )
    assert summary.windows == 5  # 1.3 s holds five 0.25 s windows
    assert summary.audio_s == 1.3
    assert summary.discarded_samples == int(0.05 * RATE)


def test_a_gap_restarts_the_windows_and_re_anchors_the_clock():
    det, events = Recorder(), []
    size = det.frontend.window_samples  # 4000
    times = iter([100.0, 200.0])
    chunks = [Chunk(counter(6_000)), Chunk(counter(5_000, start=50_000), resumed=True)]
    summary = run_monitor(Chunks(chunks), det, events.append, wall_clock=lambda: next(times))
    assert [e["start_s"] for e in events] == [0.0, 0.375]  # second window starts at the gap
    np.testing.assert_array_equal(det.windows[1], counter(size, start=50_000))
    assert [e["after_gap"] for e in events] == [False, True]
    assert events[0]["start"] == iso_utc(100.0 - 6_000 / RATE)
    assert events[1]["start"] == iso_utc(200.0 - 5_000 / RATE)  # from the new anchor
    assert summary.discarded_samples == 2_000 + 1_000  # partial window at the gap, and the tail


def test_overruns_reach_the_events_and_the_summary(tmp_path):
    """A consumer slower than a (paced) producer: losses are counted, and add up exactly."""
    n = int(RATE * 2.5)
    path = tmp_path / "ramp.wav"
    sf.write(path, counter(n), RATE, subtype="PCM_16")
    det, events = Recorder(delay_s=0.5), []
    paced = lambda: PacedReader(FileSource(path, RATE))  # noqa: E731
    with LiveSource("ramp", RATE, paced, queue_s=0.25) as source:  # a queue of one window
        summary = run_monitor(source, det, events.append)
    reported = sum(e["overruns"] for e in events)
    assert 1 <= reported <= summary.overruns  # the last losses may follow the last window
    assert any(e["after_gap"] for e in events)
    received = round(summary.audio_s * RATE)
    assert received + summary.dropped_samples == n  # nothing vanished unaccounted
    assert received == summary.windows * det.frontend.window_samples + summary.discarded_samples
    for w in det.windows:  # no window straddles a gap: each is one stretch of the ramp
        assert np.all(np.diff(w.astype(np.int64)) % 2**16 == 1)


def test_input_health_flags():
    assert input_level(np.zeros(1000, np.int16)) == input_level(np.zeros(1, np.int16))
    silent = input_level(np.zeros(1000, np.int16))
    assert (silent.silent, silent.clipped, silent.peak_dbfs) == (True, False, -90.3)
    quiet = input_level((np.ones(1000) * 10).astype(np.int16))  # -70.3 dBFS
    assert quiet.silent
    normal = input_level(np.resize(np.array([8192, -8192, 100], np.int16), 1000))  # quarter scale
    assert (normal.silent, normal.clipped, normal.peak_dbfs) == (False, False, -12.0)
    wave = (np.sin(np.arange(10_000) / 5) * 40_000).clip(-32768, 32767).astype(np.int16)
    clipped = input_level(wave)
    assert (clipped.clipped, clipped.peak_dbfs) == (True, 0.0)


def test_stream_clock_and_iso_times():
    clock = StreamClock(RATE)
    clock.anchor(16_000, 1_700_000_000.0)
    assert clock.utc_s(24_000) == 1_700_000_000.5
    assert iso_utc(1_700_000_000.5) == "2023-11-14T22:13:20.500Z"


def test_alarm_state_needs_k_in_a_row_and_clears_once():
    alarm = AlarmState(3)
    verdicts = [1, 1, 0, 1, 1, 1, 1, 0, 0, 1]
    changes = [alarm.update(i, bool(v), float(i)) for i, v in enumerate(verdicts)]
    raised = [(i, c) for i, c in enumerate(changes) if c is not None]
    assert [(i, c.kind, c.run_start_index, c.run_windows) for i, c in raised] == [
        (5, "alarm", 3, 3),
        (7, "clear", 3, 4),
    ]
    assert alarm.alarms == 1 and not alarm.active
    with pytest.raises(ValueError):
        AlarmState(0)


def test_event_sink_writes_lines_durably(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd))
    out = io.StringIO()
    path = tmp_path / "events.jsonl"
    path.write_text('{"event": "earlier"}\n')
    sink = EventSink(out, path)
    sink({"event": "window", "index": 0})
    assert path.read_text().splitlines()[-1] == '{"event": "window", "index": 0}'  # flushed
    sink({"event": "window", "index": 1})
    sink.close()
    assert len(synced) == 2
    assert [json.loads(x)["event"] for x in path.read_text().splitlines()] == ["earlier"] + [
        "window"
    ] * 2
    assert out.getvalue().count("\n") == 2
    with pytest.raises(MsnEdgeError, match="cannot open the events file"):
        EventSink(out, tmp_path / "no" / "dir" / "events.jsonl")


def run_cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_cli_monitor_file_writes_events_and_a_summary(toy, tmp_path):
    clip = toy_recording(tmp_path / "clip.wav", "nnaaann")
    events_file = tmp_path / "events.jsonl"
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    code, out, err = run_cli(
        "monitor",
        str(toy),
        "--input",
        str(clip),
        "--alarm-after",
        "2",
        "--events-file",
        str(events_file),
    )
    assert code == 0, err
    lines = [json.loads(x) for x in out.splitlines()]
    assert [x["event"] for x in lines].count("window") == 7
    assert [x["event"] for x in lines if x["event"] != "window"] == ["alarm", "clear"]
    assert events_file.read_text() == out
    assert "stopped: 7 windows, 3 anomalous, 0 invalid, 1 alarms, 0 overruns" in err
    assert "real-time factor" in err
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--input", "missing.wav"], "missing.wav: no such file"),
        (["--input", "clip.wav", "--hop", "2"], "--hop must be more than 0 and at most the window"),
        (["--input", "clip.wav", "--threshold", "0.1", "--group", "nope"], "nope"),
    ],
)
def test_cli_monitor_user_errors_are_one_line(toy, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    toy_recording(tmp_path / "clip.wav", "n")
    code, out, err = run_cli("monitor", str(toy), *args)
    assert code == 1 and out == ""
    errors = [x for x in err.splitlines() if not LOG_LINE.match(x)]  # all but log records
    assert len(errors) == 1 and errors[0].startswith("Error: ") and message in errors[0]


def test_cli_monitor_rejects_a_bad_bundle_in_one_line(tmp_path):
    (tmp_path / "bad.msn").write_bytes(b"not a zip")
    toy_recording(tmp_path / "clip.wav", "n")
    code, _, err = run_cli(
        "monitor", str(tmp_path / "bad.msn"), "--input", str(tmp_path / "clip.wav")
    )
    assert code == 1
    assert err.startswith("Error: ") and "bad.msn" in err and len(err.strip().splitlines()) == 1


def test_cli_monitor_needs_exactly_one_source(toy):
    code, _, err = run_cli("monitor", str(toy))
    assert code == 2 and "exactly one of --device NAME or --input FILE|-" in err
    code, _, err = run_cli("monitor", str(toy), "--device", "hw:1", "--input", "-")
    assert code == 2


@pytest.mark.parametrize("command", ["monitor", "devices", "plot"])
def test_commands_have_help_with_an_example(command):
    code, out, _ = run_cli(command, "-h")
    assert code == 0 and "Example:" in out


def test_monitor_reads_raw_pcm_from_stdin(toy, tmp_path):
    fe, rng = toy_frontend(), np.random.default_rng(1)
    audio = np.concatenate([normal_signal(fe, rng) for _ in range(3)] + [anomalous_signal(fe, rng)])
    raw = (audio * 32768).clip(-32768, 32767).astype("<i2").tobytes()
    proc = subprocess.run(
        [*CLI, "monitor", str(toy), "--input", "-"], input=raw, capture_output=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr.decode()
    verdicts = [json.loads(x)["verdict"] for x in proc.stdout.decode().splitlines()]
    assert verdicts == ["normal"] * 3 + ["anomalous"]


def test_sigterm_stops_cleanly_with_the_summary(toy, tmp_path):
    toy_recording(tmp_path / "long.wav", "n" * 30)
    proc = subprocess.Popen(
        [*CLI, "monitor", str(toy), "--input", str(tmp_path / "long.wav"), "--realtime"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    first = proc.stdout.readline()  # the first window: it is running
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err.decode()
    assert json.loads(first)["index"] == 0
    assert "SIGTERM: stopping" in err.decode()
    windows = 1 + len(out.decode().splitlines())
    assert f"stopped: {windows} windows" in err.decode()
    assert windows < 30


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_draws_a_real_png(toy, tmp_path):
    import matplotlib.image

    clip = toy_recording(tmp_path / "clip.wav", "nnaaann")
    events = tmp_path / "events.jsonl"
    assert (
        run_cli(
            "monitor",
            str(toy),
            "--input",
            str(clip),
            "--events-file",
            str(events),
            "--alarm-after",
            "2",
        )[0]
        == 0
    )
    out = tmp_path / "timeline.png"
    code, stdout, err = run_cli("plot", str(events), "-o", str(out))
    assert code == 0, err
    assert stdout.strip() == str(out)
    assert png_size(out) == (1200, 450)
    pixels = matplotlib.image.imread(out)
    assert pixels.shape[:2] == (450, 1200)
    red = (pixels[..., 0] > 0.7) & (pixels[..., 1] < 0.4) & (pixels[..., 2] < 0.4)
    assert red.sum() > 20  # the anomalous windows are marked


def test_plot_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"event": "window"}\n')
    code, _, err = run_cli("plot", str(bad), "-o", str(tmp_path / "x.png"))
    assert code == 1 and "bad.jsonl:1: not a monitor event" in err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(MsnEdgeError, match="no window events"):
        plot_timeline(empty, tmp_path / "x.png")
    code, _, err = run_cli("plot", str(tmp_path / "absent.jsonl"))
    assert code == 1 and "cannot read the events file" in err


def test_event_times_parse_back(toy, tmp_path):
    clip = toy_recording(tmp_path / "clip.wav", "nn")
    events = []
    run_monitor(FileSource(clip, RATE), Detector.open(toy), events.append)
    for e in events:
        start = datetime.fromisoformat(e["start"].replace("Z", "+00:00"))
        end = datetime.fromisoformat(e["end"].replace("Z", "+00:00"))
        assert (end - start).total_seconds() == 1.0


def test_service_unit_is_valid_and_uses_real_options(tmp_path):
    unit = (Path(__file__).resolve().parents[1] / "deploy" / "msn-edge-monitor.service").read_text()
    exec_start = unit.split("ExecStart=", 1)[1].split("\n\n")[0].split("\nEnvironment")[0]
    words = exec_start.replace("\\\n", " ").split()
    assert words[1] == "monitor"
    monitor_options = {o for p in main.commands["monitor"].params for o in p.opts}
    assert {w for w in words if w.startswith("--")} <= monitor_options
    service = dict(
        line.split("=", 1) for line in unit.splitlines() if "=" in line and line[0].isalpha()
    )
    assert service["Type"] == "notify" and int(service["WatchdogSec"]) > 0  # sd_notify pings
    analyze, exe = shutil.which("systemd-analyze"), shutil.which("msn-edge")
    if not (analyze and exe):
        pytest.skip("systemd-analyze or the msn-edge entry point is not installed")
    path = tmp_path / "msn-edge-monitor.service"
    path.write_text(unit.replace("/opt/msn-edge/.venv/bin/msn-edge", exe))
    proc = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def window_event(i: int, gap: bool = False) -> dict:
    """The i-th one-second window event of a monitor's events file (anomalous from 3 on)."""
    return {
        "event": "window",
        "start": f"2025-01-01T00:00:{i:02d}.000Z",
        "end": f"2025-01-01T00:00:{i + 1:02d}.000Z",
        "score": 0.1 * i,
        "threshold": 0.25,
        "anomalous": i >= 3,
        "after_gap": gap,
    }


def test_plot_reads_alarms_and_gaps(tmp_path):
    window = window_event
    events = [window(0), window(1), window(2, gap=True), window(3), window(4)]
    events.insert(5, {"event": "alarm", "time": "2025-01-01T00:00:05.000Z"})
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    tl = read_events(path)
    assert tl.gaps == {2}
    assert tl.anomalous == [False, False, False, True, True]
    assert tl.alarms == [(datetime.fromisoformat("2025-01-01T00:00:05+00:00"), None)]  # open


def test_plot_leaves_matplotlib_backend_alone(tmp_path):
    # A library call must not switch the process's backend (an application may embed it).
    import matplotlib

    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps(window_event(i)) + "\n" for i in range(5)))
    before = matplotlib.get_backend()
    matplotlib.use("svg")  # what the embedding application chose
    try:
        out = plot_timeline(path, tmp_path / "timeline.png")
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
    assert png_size(out) == (1200, 450)
