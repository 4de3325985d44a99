"""Many streams in one monitor: batched engine calls, exact windows, a device that comes back.

The engine is the toy bundle's real ONNX model; a counting wrapper records every call's
batch size. Live devices are stand-in capture readers that replay a recording at real
time and can be unplugged and plugged in again (the real-ALSA version of a vanished
device is in test_alsa.py).
"""

from __future__ import annotations

import contextlib
import json
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
from msn_edge.runtime.alarm import AlarmState
from msn_edge.runtime.assemble import open_monitor
from msn_edge.runtime.bundle import read_bundle
from msn_edge.runtime.detector import Detector, SharedEngine
from msn_edge.runtime.engines import make_engine
from msn_edge.runtime.errors import DeviceError
from msn_edge.runtime.monitor import Input, Monitor
from msn_edge.runtime.monitor_config import BatchPolicy, ConfigError
from msn_edge.runtime.monitor_toml import load_config, parse_config
from msn_edge.runtime.sources import Backoff, Chunk, LiveSource, Source
from msn_edge.runtime.stream import Stream

CHUNK = 1000  # samples per device read: a 0.25 s window is four reads


class CountingEngine:
    """The real engine, with every call's batch size recorded."""

    def __init__(self, engine) -> None:
        self.inner = engine
        self.name = engine.name
        self.sizes: list[int] = []

    def embed(self, spec, spectrum):
        assert spec.shape[0] == spectrum.shape[0]
        self.sizes.append(spec.shape[0])
        return self.inner.embed(spec, spectrum)

    def close(self) -> None:
        self.inner.close()


def recording(pattern: str, window_s: float, seed: int) -> np.ndarray:
    """int16 audio, one toy window per letter: n = normal hum, a = anomalous whine."""
    fe, rng = toy_frontend(window_s), np.random.default_rng(seed)
    make = {"n": normal_signal, "a": anomalous_signal}
    audio = np.concatenate([make[c](fe, rng) for c in pattern])
    return (audio * 32768).clip(-32768, 32767).astype(np.int16)


PATTERNS = ["nnaann", "nnnnnn", "aaaaaa", "nanana", "annnna", "nnnaaa", "aannnn", "nnannn"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return make_toy_bundle(tmp_path_factory.mktemp("bundle") / "toy.msn")


@pytest.fixture(scope="module")
def toy_quarter(tmp_path_factory) -> Path:
    return make_toy_bundle(tmp_path_factory.mktemp("bundle") / "toy.msn", window_s=0.25)


def test_eight_file_streams_share_one_engine_in_batches_of_eight(toy, tmp_path):
    waves = {}
    for k, pattern in enumerate(PATTERNS):
        waves[f"m{k}"] = recording(pattern, 1.0, seed=k)
        sf.write(tmp_path / f"m{k}.wav", waves[f"m{k}"], RATE, subtype="PCM_16")
    streams = "".join(f'[[streams]]\nname = "m{k}"\nfile = "m{k}.wav"\n' for k in range(8))
    (tmp_path / "monitor.toml").write_text(
        f'[defaults]\nbundle = "{toy}"\nalarm_after = 2\n\n'
        f"[batch]\nmax_batch = 8\nmax_wait_s = 30\n\n{streams}"
    )
    config = load_config(tmp_path / "monitor.toml")
    events: list[dict] = []
    with contextlib.ExitStack() as stack:
        monitor = open_monitor(config, events.append, stack)
        (batcher,) = monitor.batchers.values()  # one bundle: one engine
        shared = batcher.engine
        shared.engine = counting = CountingEngine(shared.engine)
        result = monitor.run()
    assert counting.sizes == [8] * 6  # 48 windows in 6 calls
    assert batcher.sizes == [8] * 6 and shared.calls == 6
    reference = Detector.open(toy)
    size = reference.frontend.window_samples
    for k, pattern in enumerate(PATTERNS):
        name = f"m{k}"
        mine = [e for e in events if e["stream"] == name and e["event"] == "window"]
        assert result.streams[name].windows == len(mine) == len(pattern)
        assert [e["index"] for e in mine] == list(range(len(pattern)))
        assert "".join(e["verdict"][0] for e in mine) == pattern
        for j, e in enumerate(mine):  # each row of a batch is that stream's own window
            alone = reference.score(waves[name][j * size : (j + 1) * size] / 32768.0)
            assert e["score"] == pytest.approx(alone.score, abs=1e-6)
        alarms = [e["event"] for e in events if e["stream"] == name and e["event"] != "window"]
        expected = AlarmState(2)
        changes = [expected.update(i, c == "a", 0) for i, c in enumerate(pattern)]
        assert alarms == [c.kind for c in changes if c is not None]


class Tape:
    """A device's recording: read at real time, and unplugged once after `unplug_at` samples."""

    def __init__(self, pcm: np.ndarray, unplug_at: int | None = None, away_s: float = 1.0):
        self.pcm = pcm
        self.pos = 0
        self.unplug_at = unplug_at
        self.away_s = away_s
        self.gone = threading.Event()
        self.unplugged_at: float | None = None
        self.back_at: float | None = None

    def plug_in(self) -> None:
        self.back_at = time.monotonic()
        self.gone.clear()


class TapeReader:
    """A CaptureReader over a Tape: paced, raises DeviceError while it is unplugged."""

    overruns = 0

    def __init__(self, tape: Tape) -> None:
        if tape.gone.is_set():
            raise DeviceError("the test device is unplugged")
        self.tape = tape
        self.next_t = time.monotonic()

    def read(self) -> np.ndarray | None:
        t = self.tape
        if t.pos >= t.pcm.size:
            return None
        if t.pos == t.unplug_at and t.unplugged_at is None:
            t.unplugged_at = time.monotonic()
            t.gone.set()
            threading.Timer(t.away_s, t.plug_in).start()
            raise DeviceError("the test device was unplugged")
        self.next_t += CHUNK / RATE
        time.sleep(max(0.0, self.next_t - time.monotonic()))
        out = t.pcm[t.pos : t.pos + CHUNK]
        t.pos += CHUNK
        return out

    def close(self) -> None:
        pass


def test_eight_live_streams_one_device_unplugged_and_back(toy_quarter):
    """One engine for 8 devices; device 3 vanishes for a second; the others go on."""
    bundle = read_bundle(toy_quarter)
    shared = SharedEngine(bundle, CountingEngine(make_engine(bundle, "cpu", threads=1)))
    n_windows = 12
    size = bundle.frontend.window_samples
    tapes = [
        Tape(recording("n" * n_windows, 0.25, seed=k), unplug_at=4 * size if k == 3 else None)
        for k in range(8)
    ]
    inputs, streams = [], []
    with contextlib.ExitStack() as stack:
        for k, tape in enumerate(tapes):
            source = stack.enter_context(
                LiveSource(
                    f"dev{k}",
                    RATE,
                    lambda tape=tape: TapeReader(tape),
                    backoff=Backoff(first_s=0.1, max_s=0.2),
                )
            )
            stream = Stream(f"dev{k}", shared, shared.scorer(), alarm_after=2)
            streams.append(stream)
            inputs.append(Input(source, [(0, stream)], pumped=True))
        events: list[dict] = []
        arrived: list[tuple[float, dict]] = []

        def sink(event: dict) -> None:
            events.append(event)
            arrived.append((time.monotonic(), event))

        policy = BatchPolicy(max_batch=8, max_wait_s=0.1)
        result = Monitor(inputs, sink, policy=policy).run()

    sizes = shared.engine.sizes
    assert sum(sizes) == 8 * n_windows and max(sizes) <= 8
    assert len(sizes) <= 8 * n_windows // 2, sizes  # batched, not one call per window
    assert 7 in sizes  # while device 3 was away, the other seven went on together
    for k in range(8):
        mine = [e for e in events if e["stream"] == f"dev{k}"]
        assert [e["index"] for e in mine] == list(range(n_windows))  # exact, in order
        assert result.streams[f"dev{k}"].windows == n_windows
        gaps = [e["index"] for e in mine if e["after_gap"]]
        assert gaps == ([4] if k == 3 else [])
        assert result.streams[f"dev{k}"].reconnects == (1 if k == 3 else 0)
    dev3 = [e for e in events if e["stream"] == "dev3"]
    assert dev3[4]["reconnects"] == 1 and sum(e["reconnects"] for e in dev3) == 1
    # The others kept scoring while device 3 was unplugged.
    t3 = tapes[3]
    during = [e for t, e in arrived if t3.unplugged_at < t < t3.back_at and e["stream"] != "dev3"]
    assert len(during) >= 7 * 2, len(during)
    assert {e["stream"] for e in during} == {f"dev{k}" for k in range(8) if k != 3}
    # Device 3's clock restarted at the gap: its window 4 starts about a second later
    # in UTC than window 3 ends, while its sample positions run on.
    from datetime import datetime

    end3 = datetime.fromisoformat(dev3[3]["end"].replace("Z", "+00:00"))
    start4 = datetime.fromisoformat(dev3[4]["start"].replace("Z", "+00:00"))
    assert 0.5 < (start4 - end3).total_seconds() < 3.0
    assert dev3[4]["start_s"] == dev3[3]["end_s"]


def test_a_gap_restarts_the_alarm_run():
    """Two anomalous windows before a gap and one after are not three in a row."""
    det, events = Recorder(threshold=0.2), []
    loud = np.full(4000, 16000, np.int16)  # mean magnitude 0.49: anomalous
    chunks = [Chunk(loud), Chunk(loud), Chunk(loud, resumed=True), Chunk(loud), Chunk(loud)]

    class Chunks(Source):
        def _read(self):
            return chunks.pop(0) if chunks else None

    stream = Stream("s", det, det.scorer, alarm_after=3)
    Monitor([Input(Chunks("chunks", RATE), [(0, stream)])], events.append).run()
    kinds = [e["event"] for e in events]
    assert kinds == ["window"] * 5 + ["alarm"]  # not at window 2: the gap broke the run
    alarm = events[-1]
    assert (alarm["index"], alarm["since_index"], alarm["anomalous_windows"]) == (4, 2, 3)


def test_channels_of_one_input_go_to_their_own_streams():
    """A 3-channel source: each stream gets exactly its channel, windows in lockstep."""
    det = Recorder()
    frames = np.stack([counter(8000, start=c * 20_000) for c in range(3)], axis=1)

    class ThreeChannels(Source):
        channels = 3

        def __init__(self) -> None:
            super().__init__("three", RATE)
            self._chunks = [frames[i : i + 1000] for i in range(0, 8000, 1000)]

        def _read(self):
            return Chunk(self._chunks.pop(0)) if self._chunks else None

    streams = [Stream(f"c{c}", det, det.scorer) for c in (2, 0)]
    events: list[dict] = []
    inp = Input(ThreeChannels(), [(2, streams[0]), (0, streams[1])])
    Monitor([inp], events.append, policy=BatchPolicy(max_batch=8, max_wait_s=10)).run()
    assert det.batches == [2, 2]  # both channels' windows in one call, twice
    by_stream = {"c2": [], "c0": []}
    for e, w in zip(events, det.windows, strict=True):
        by_stream[e["stream"]].append(w)
    for name, channel in (("c2", 2), ("c0", 0)):
        for k, w in enumerate(by_stream[name]):
            np.testing.assert_array_equal(w, counter(4000, start=channel * 20_000 + k * 4000))


def test_config_errors_are_one_clear_line(tmp_path, toy):
    def bad(text: str, message: str) -> None:
        path = tmp_path / "bad.toml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_config(path)

    bad("[[streams]\n", "not valid TOML")
    bad('[[streams]]\nname = "a"\nfile = "x.wav"\n', "no bundle")
    bad(f'[[streams]]\nname = "a b"\nfile = "x.wav"\nbundle = "{toy}"\n', "stream name 'a b'")
    bad(f'[defaults]\nbundle = "{toy}"\n[[streams]]\nname = "a"\ninput = "usb"\n', "no input named")
    bad(
        f'[defaults]\nbundle = "{toy}"\n[inputs.usb]\ndevice = "hw:1"\nchannels = 2\n'
        '[[streams]]\nname = "a"\ninput = "usb"\nchannel = 2\n',
        "channel 2 of input 'usb', which has 2",
    )
    bad(f'[defaults]\nbundle = "{toy}"\nhopp = 1\n', "unknown key hopp")
    bad(f'[defaults]\nbundle = "{toy}"\nhop = "5"\n', "hop_s must be a number")
    bad(f'[defaults]\nbundle = "{toy}"\nthreshold = nan\n', "threshold must be a finite")
    bad(f'[defaults]\nbundle = "{toy}"\nhop = inf\n', "hop_s must be a finite")
    bad('[batch]\nmax_batch = 0\n[[streams]]\nname="a"\nfile="x"\nbundle="b"\n', "max_batch")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml")


def test_a_four_channel_config_parses_to_four_streams(toy, tmp_path):
    text = f"""
[defaults]
bundle = "{toy}"
alarm_after = 3
hop = 0.5

[inputs.usb]
device = "hw:CARD=USB,DEV=0"
channels = 4

[[streams]]
name = "fan-1"
input = "usb"
channel = 0

[[streams]]
name = "fan-2"
input = "usb"
channel = 1
threshold = 0.3
alarm_after = 5

[[streams]]
name = "pump"
input = "usb"
channel = 2

[[streams]]
name = "valve"
input = "usb"
channel = 3
hop = 1.0
"""
    import tomllib

    config = parse_config(tomllib.loads(text))
    assert [s.name for s in config.streams] == ["fan-1", "fan-2", "pump", "valve"]
    assert [s.channel for s in config.streams] == [0, 1, 2, 3]
    assert config.inputs["usb"].channels == 4
    fan2 = config.streams[1]
    assert (fan2.threshold, fan2.alarm_after, fan2.hop_s) == (0.3, 5, 0.5)
    assert config.streams[3].hop_s == 1.0
    assert len({s.engine_key for s in config.streams}) == 1


def test_cli_runs_several_inputs_and_a_config(toy, tmp_path):
    for k in range(3):
        sf.write(tmp_path / f"m{k}.wav", recording("nna"[k:] + "n" * k, 1.0, k), RATE)
    result = CliRunner().invoke(
        main,
        ["monitor", str(toy), "--alarm-after", "0"]
        + [x for k in range(3) for x in ("--input", str(tmp_path / f"m{k}.wav"))],
    )
    assert result.exit_code == 0, result.stderr
    events = [json.loads(x) for x in result.stdout.splitlines()]
    assert sorted({e["stream"] for e in events}) == ["m0", "m1", "m2"]
    assert all(len([e for e in events if e["stream"] == f"m{k}"]) == 3 for k in range(3))
    assert "stopped: 3 streams, 9 windows in" in result.stderr
    (tmp_path / "m.toml").write_text(
        f'[defaults]\nbundle = "{toy}"\n[[streams]]\nname = "x"\nfile = "m0.wav"\n'
    )
    result = CliRunner().invoke(main, ["monitor", "--config", str(tmp_path / "m.toml")])
    assert result.exit_code == 0, result.stderr
    assert [json.loads(x)["stream"] for x in result.stdout.splitlines()] == ["x"] * 3
    result = CliRunner().invoke(
        main, ["monitor", "--config", str(tmp_path / "m.toml"), "--hop", "0.5"]
    )
    assert result.exit_code == 2 and "drop --hop" in result.stderr


def test_two_fifos_are_read_side_by_side(toy, tmp_path):
    """FIFOs (raw s16le mono) as inputs: each read by its own thread, neither blocks."""
    import os

    waves = {"a": recording("nna", 1.0, 5), "b": recording("aan", 1.0, 6)}
    for name in waves:
        os.mkfifo(tmp_path / name)

    def write(name: str) -> None:
        with open(tmp_path / name, "wb") as f:
            f.write(waves[name].astype("<i2").tobytes())

    writers = [threading.Thread(target=write, args=(n,)) for n in waves]
    for w in writers:
        w.start()
    result = CliRunner().invoke(
        main,
        ["monitor", str(toy), "--alarm-after", "0", "--input", str(tmp_path / "a")]
        + ["--input", str(tmp_path / "b")],
    )
    for w in writers:
        w.join(timeout=10)
    assert result.exit_code == 0, result.stderr
    events = [json.loads(x) for x in result.stdout.splitlines()]
    for name, pattern in (("a", "nna"), ("b", "aan")):
        mine = [e["verdict"][0] for e in events if e["stream"] == name]
        assert "".join(mine) == pattern


def test_a_stop_while_the_engine_is_busy_ends_the_run(tmp_path):
    """SIGTERM during a slow engine call: the readers' queue is full, yet run() returns."""
    from msn_edge.runtime.sources import FileSource, PacedReader

    sf.write(tmp_path / "ramp.wav", counter(RATE * 30), RATE, subtype="PCM_16")
    det = Recorder(delay_s=1.0)  # one window scores in a second: the queue fills meanwhile
    inputs = []
    with contextlib.ExitStack() as stack:
        for k in range(2):
            paced = lambda: PacedReader(FileSource(tmp_path / "ramp.wav", RATE))  # noqa: E731
            source = stack.enter_context(LiveSource(f"s{k}", RATE, paced))
            inputs.append(Input(source, [(0, Stream(f"s{k}", det, det.scorer))], pumped=True))
        monitor = Monitor(inputs, lambda e: None, policy=BatchPolicy(max_batch=1))
        threading.Timer(1.0, monitor.stop).start()
        done = threading.Event()
        runner = threading.Thread(target=lambda: (monitor.run(), done.set()), daemon=True)
        runner.start()
        assert done.wait(30), "the monitor did not stop"
    assert 1 <= len(det.windows) < 30


def test_invalid_windows_skip_the_engine_and_never_vote_in_any_stream(toy, tmp_path):
    """NaN and digital-silence windows in a batch: no engine row, verdict invalid, no vote."""
    size = toy_frontend(1.0).window_samples
    good = recording("aaaa", 1.0, seed=1).astype(np.float32) / 32768
    broken = good.copy()
    broken[size + 5] = np.nan  # window 1: non-finite
    broken[3 * size :] = 0.0  # window 3: digital silence
    sf.write(tmp_path / "good.wav", good, RATE, subtype="FLOAT")
    sf.write(tmp_path / "broken.wav", broken, RATE, subtype="FLOAT")
    (tmp_path / "monitor.toml").write_text(
        f'[defaults]\nbundle = "{toy}"\nalarm_after = 2\n\n'
        "[batch]\nmax_batch = 2\nmax_wait_s = 30\n\n"
        '[[streams]]\nname = "good"\nfile = "good.wav"\n'
        '[[streams]]\nname = "broken"\nfile = "broken.wav"\n'
    )
    events: list[dict] = []
    with contextlib.ExitStack() as stack:
        monitor = open_monitor(load_config(tmp_path / "monitor.toml"), events.append, stack)
        (batcher,) = monitor.batchers.values()
        shared = batcher.engine
        shared.engine = counting = CountingEngine(shared.engine)
        result = monitor.run()
    assert sum(batcher.sizes) == 8  # every window of both streams reaches the batcher
    assert sum(counting.sizes) == shared.windows == 6  # the engine never sees the 2 invalid
    mine = {name: [e for e in events if e["stream"] == name] for name in ("good", "broken")}
    windows = [e for e in mine["broken"] if e["event"] == "window"]
    assert [e["verdict"] for e in windows] == ["anomalous", "invalid", "anomalous", "invalid"]
    assert "non-finite" in windows[1]["invalid_reason"]
    assert "digital silence" in windows[3]["invalid_reason"]
    assert windows[1]["score"] is None and windows[1]["anomalous"] is None
    # a, (no vote), a: two anomalous windows in a row raise the alarm at window 2
    assert [(e["event"], e["index"]) for e in mine["broken"] if e["event"] != "window"] == [
        ("alarm", 2)
    ]
    assert [(e["event"], e["index"]) for e in mine["good"] if e["event"] != "window"] == [
        ("alarm", 1)
    ]
    summary = result.streams["broken"]
    assert (summary.windows, summary.anomalous, summary.invalid) == (4, 2, 2)
    assert result.streams["good"].invalid == 0
