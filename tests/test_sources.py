"""Sources: exact samples from files and stdin, pacing, reconnects, overrun accounting.

Real ALSA capture is in test_alsa.py; here a stand-in `arecord` script prints arecord's
real messages (rate warning, overruns, a vanished device) that a file PCM cannot produce.
"""

from __future__ import annotations

import io
import logging
import os
import stat
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import soundfile as sf
from stream_helpers import RATE, counter, pcm16

from msn_edge.runtime import portaudio
from msn_edge.runtime.capture import (
    ArecordReader,
    arecord_error,
    parse_arecord_big_l,
    parse_arecord_l,
    plug_alternative,
)
from msn_edge.runtime.errors import AudioError, DeviceError
from msn_edge.runtime.portaudio import portaudio_input
from msn_edge.runtime.sources import Backoff, FileSource, LiveSource, RawPcmSource, open_input

FAST = Backoff(first_s=0.01, max_s=0.02)


def drain(source) -> tuple[np.ndarray, list]:
    chunks = []
    while (chunk := source.read()) is not None:
        chunks.append(chunk)
    return pcm16(np.concatenate([c.samples for c in chunks])), chunks


@pytest.mark.parametrize("fmt", ["WAV", "FLAC"])
def test_file_source_gives_the_exact_samples(tmp_path, fmt):
    signal = counter(40_123, start=-20_000)
    path = tmp_path / f"ramp.{fmt.lower()}"
    sf.write(path, signal, RATE, subtype="PCM_16", format=fmt)
    with FileSource(path, RATE) as source:
        got, chunks = drain(source)
    np.testing.assert_array_equal(got, signal)
    assert all(c.samples.dtype == np.float32 and not c.resumed for c in chunks)  # audio.py


def test_file_source_errors_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(AudioError, match="nope.wav: no such file"):
        FileSource(tmp_path / "nope.wav", RATE)
    (tmp_path / "text.wav").write_text("not audio")
    with pytest.raises(AudioError, match="text.wav: not readable audio"):
        FileSource(tmp_path / "text.wav", RATE)
    sf.write(tmp_path / "48k.wav", np.zeros(4800, np.int16), 48_000)
    with pytest.raises(AudioError, match=r"48000 Hz, 1 channel\(s\); the bundle needs 16000 Hz"):
        FileSource(tmp_path / "48k.wav", RATE)
    sf.write(tmp_path / "stereo.wav", np.zeros((1600, 2), np.int16), RATE)
    with pytest.raises(AudioError, match="2 channel"):
        FileSource(tmp_path / "stereo.wav", RATE)


class Trickle(io.RawIOBase):
    """A pipe that hands out at most a few bytes per read, odd counts included."""

    def __init__(self, data: bytes, seed: int = 0) -> None:
        self._data = data
        self._pos = 0
        self._rng = np.random.default_rng(seed)

    def read(self, n: int = -1) -> bytes:
        n = min(n, int(self._rng.integers(1, 8)))
        out = self._data[self._pos : self._pos + n]
        self._pos += len(out)
        return out


def test_raw_pcm_source_reassembles_samples_split_across_reads():
    signal = counter(5_001)
    source = RawPcmSource(Trickle(signal.astype("<i2").tobytes()), RATE)
    got, _ = drain(source)
    np.testing.assert_array_equal(got, signal)


def test_raw_pcm_source_reads_big_chunks_from_a_buffered_stream():
    signal = counter(33_333, start=1234)
    got, chunks = drain(RawPcmSource(io.BytesIO(signal.astype("<i2").tobytes()), RATE))
    np.testing.assert_array_equal(got, signal)
    assert max(c.samples.size for c in chunks) == RATE // 10


def test_raw_pcm_source_warns_about_a_trailing_half_sample(caplog):
    data = counter(10).astype("<i2").tobytes() + b"\x01"
    with caplog.at_level(logging.WARNING):
        got, _ = drain(RawPcmSource(io.BytesIO(data), RATE))
    np.testing.assert_array_equal(got, counter(10))
    assert "ended with 1 byte(s) of an incomplete sample" in caplog.text


def test_stop_ends_a_file_source_at_the_next_read(tmp_path):
    sf.write(tmp_path / "a.wav", counter(RATE), RATE, subtype="PCM_16")
    source = FileSource(tmp_path / "a.wav", RATE)
    assert source.read() is not None
    source.stop()
    assert source.read() is None


def test_realtime_file_is_paced_like_a_microphone(tmp_path):
    signal = counter(RATE // 2)
    sf.write(tmp_path / "half.wav", signal, RATE, subtype="PCM_16")
    t0 = time.monotonic()
    with open_input(str(tmp_path / "half.wav"), RATE, realtime=True) as source:
        got, _ = drain(source)
        elapsed = time.monotonic() - t0
    np.testing.assert_array_equal(got, signal)
    assert 0.45 <= elapsed < 3.0


def test_realtime_needs_a_file_not_stdin():
    with pytest.raises(AudioError, match="stdin is already paced"):
        open_input("-", RATE, realtime=True)


class FakeReader:
    """A capture that serves a shared counter signal and can fail on cue."""

    def __init__(self, feed: dict, fail_after: int | None = None) -> None:
        self.feed = feed
        self.fail_after = fail_after
        self.overruns = 0
        self.reads = 0
        self.closed = False

    def read(self):
        if self.fail_after is not None and self.reads == self.fail_after:
            raise DeviceError("fake device unplugged")
        if self.feed["pos"] >= self.feed["end"]:
            return None
        self.reads += 1
        pos = self.feed["pos"]
        self.feed["pos"] += self.feed["chunk"]
        return counter(self.feed["chunk"], start=pos)

    def close(self):
        self.closed = True


def test_vanished_device_is_reopened_with_backoff_and_logged(caplog):
    feed = {"pos": 0, "end": 8_000, "chunk": 100}
    attempts = []

    def opener():
        attempts.append(True)
        if len(attempts) == 1:
            return FakeReader(feed, fail_after=20)  # works, then vanishes after 20 chunks
        if len(attempts) <= 4:
            raise DeviceError("no such device")  # still gone for three tries
        return FakeReader(feed)

    with caplog.at_level(logging.INFO), LiveSource("fake", RATE, opener, backoff=FAST) as src:
        got, chunks = drain(src)
    np.testing.assert_array_equal(got, counter(8_000))  # the fake device resumes the ramp
    assert src.stats.reconnects == 1
    assert [c.resumed for c in chunks].index(True) == 20
    assert sum(c.resumed for c in chunks) == 1
    assert "capture failed (fake device unplugged); reopening" in caplog.text
    assert caplog.text.count("still unavailable") == 3
    assert "still unavailable (try 3: no such device)" in caplog.text
    assert "capture resumed (try 4)" in caplog.text


def test_backoff_doubles_up_to_its_cap():
    delays = Backoff(first_s=0.5, max_s=4.0).delays()
    assert [next(delays) for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_first_open_failure_is_an_immediate_error():
    def opener():
        raise DeviceError("ALSA device 'hw:9' not found")

    with pytest.raises(DeviceError, match="hw:9"):
        LiveSource("hw:9", RATE, opener)


def test_slow_consumer_overruns_are_counted_not_hidden(caplog):
    chunk, queued, dropped, after = 160, 10, 20, 10
    feed = {"pos": 0, "end": (queued + dropped + after) * chunk, "chunk": chunk}
    drained = threading.Event()

    class Gated(FakeReader):
        def read(self):  # races ahead, then waits until the consumer has caught up
            if self.reads == queued + dropped:
                drained.wait(5)
            return super().read()

    with caplog.at_level(logging.WARNING):
        source = LiveSource("fast", RATE, lambda: Gated(feed), queue_s=queued * chunk / RATE)
        while feed["pos"] < (queued + dropped) * chunk:
            time.sleep(0.01)
        first = [source.read() for _ in range(queued)]
        drained.set()
        _, rest = drain(source)
        source.close()
    chunks = first + rest
    got = np.concatenate([c.samples for c in chunks])
    assert source.stats.overruns == 1  # one episode of dropping
    assert source.stats.dropped_samples == dropped * chunk == feed["end"] - got.size
    expected = np.concatenate([counter(queued * chunk), counter(after * chunk, start=30 * chunk)])
    np.testing.assert_array_equal(got, expected)  # what arrived is exact and in order
    assert [i for i, c in enumerate(chunks) if c.resumed] == [queued]  # flagged after the gap
    assert "scored slower than real time; dropping audio" in caplog.text


def test_device_overruns_mark_the_next_chunk():
    feed = {"pos": 0, "end": 1_000, "chunk": 100}

    class Xrun(FakeReader):
        def read(self):
            if self.reads == 3:
                self.overruns += 1
            return super().read()

    with LiveSource("x", RATE, lambda: Xrun(feed)) as source:
        _, chunks = drain(source)
    assert source.stats.overruns == 1
    assert [i for i, c in enumerate(chunks) if c.resumed] == [3]


def test_a_reader_bug_surfaces_in_read():
    class Broken:
        overruns = 0

        def read(self):
            raise RuntimeError("bug in the reader")

        def close(self):
            pass

    with LiveSource("b", RATE, Broken) as source, pytest.raises(RuntimeError, match="bug"):
        source.read()


def test_stop_returns_from_a_waiting_read():
    class Silent:
        overruns = 0

        def read(self):
            time.sleep(0.05)
            return np.zeros(0, np.int16)

        def close(self):
            pass

    with LiveSource("quiet", RATE, Silent) as source:
        threading.Timer(0.3, source.stop).start()
        t0 = time.monotonic()
        while source.read() is not None:
            pass
        assert time.monotonic() - t0 < 1.5


FAKE_ARECORD = """\
#!{python}
import os, sys, time
import numpy as np
mode = os.environ["FAKE_ARECORD_MODE"]
name = sys.argv[sys.argv.index("-D") + 1]
out = sys.stdout.buffer
def data(start, n):
    out.write(((np.arange(start, start + n) + 2**15) % 2**16 - 2**15).astype("<i2").tobytes())
    out.flush()
if mode == "unknown":
    sys.stderr.write(f"ALSA lib pcm.c:2666:(snd_pcm_open_noupdate) Unknown PCM {{name}}\\n")
    sys.stderr.write("arecord: main:831: audio open error: No such file or directory\\n")
    sys.exit(1)
sys.stderr.write("Recording raw data 'stdin' : Signed 16 bit Little Endian, Rate 16000 Hz, Mono\\n")
sys.stderr.flush()
if mode == "rate":
    sys.stderr.write("Warning: rate is not accurate (requested = 16000Hz, got = 48000Hz)\\n")
    sys.stderr.write("         please, try the plug plugin \\n")
    sys.stderr.flush()
    data(0, 48000)
    time.sleep(30)
elif mode == "vanish":
    data(0, 3200)
    sys.stderr.write("overrun!!! (at least 12.345 ms long)\\n")
    sys.stderr.flush()
    data(3200, 3200)
    sys.stderr.write("overrun!!! (at least 1.001 ms long)\\n")
    sys.stderr.flush()
    data(6400, 1601)
    sys.stderr.write("arecord: pcm_read:2221: read error: No such device\\n")
    sys.exit(1)
"""


@pytest.fixture
def fake_arecord(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "arecord"
    script.write_text(FAKE_ARECORD.format(python=sys.executable))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    def use(mode: str) -> None:
        monkeypatch.setenv("FAKE_ARECORD_MODE", mode)

    return use


def test_arecord_rate_warning_names_the_plughw_alternative(fake_arecord):
    fake_arecord("rate")
    t0 = time.monotonic()
    with pytest.raises(DeviceError) as err:
        ArecordReader("hw:1,0", RATE)
    assert str(err.value) == (
        "ALSA device 'hw:1,0' cannot give 16000 Hz mono 16-bit audio; "
        "use --device plughw:1,0 so ALSA converts it"
    )
    assert time.monotonic() - t0 < 5  # the stuck child was terminated, not waited for


def test_arecord_unknown_device(fake_arecord):
    fake_arecord("unknown")
    with pytest.raises(DeviceError, match="'mic' not found; `msn-edge devices` lists"):
        ArecordReader("mic", RATE)


def test_arecord_overruns_counted_and_exit_reported_after_the_last_samples(fake_arecord):
    fake_arecord("vanish")
    reader = ArecordReader("hw:2", RATE)
    chunks = []
    with pytest.raises(DeviceError, match=r"'hw:2': arecord stopped \(.*No such device\)"):
        while True:
            chunks.append(reader.read())
    np.testing.assert_array_equal(np.concatenate(chunks), counter(8001))  # none held back
    deadline = time.monotonic() + 5
    while reader.overruns < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert reader.overruns == 2


@pytest.mark.parametrize(
    ("name", "alt"),
    [
        ("hw:1", "plughw:1"),
        ("hw:CARD=USB,DEV=0", "plughw:CARD=USB,DEV=0"),
        ("dsnoop:1", "plug:dsnoop:1"),
        ("plughw:1,0", "plughw:1,0"),
    ],
)
def test_plug_alternative(name, alt):
    assert plug_alternative(name) == alt


def test_arecord_error_messages():
    fmt = arecord_error("hw:1", RATE, ["arecord: set_params:1343: Channels count non available"])
    assert "use --device plughw:1 so ALSA converts it" in str(fmt)
    busy = arecord_error(
        "hw:1", RATE, ["arecord: main:831: audio open error: Device or resource busy"]
    )
    assert "busy" in str(busy)
    other = arecord_error("x", RATE, ["something odd", ""])
    assert str(other) == "ALSA device 'x': arecord stopped (something odd)"
    killed = arecord_error("x", RATE, ["Recording raw data 'stdin' : Signed 16 bit"], -9)
    assert str(killed) == "ALSA device 'x': arecord stopped (killed by SIGKILL)"
    assert "(exit status 1)" in str(arecord_error("x", RATE, [], 1))


def test_parse_arecord_listings():
    cards = textwrap.dedent("""\
        **** List of CAPTURE Hardware Devices ****
        card 1: Device [USB Audio Device], device 0: USB Audio [USB Audio]
          Subdevices: 1/1
          Subdevice #0: subdevice #0
        """)
    assert [(d.name, d.description) for d in parse_arecord_l(cards)] == [
        ("hw:1,0", "USB Audio Device, USB Audio (hardware: native rates only)"),
        ("plughw:1,0", "USB Audio Device, USB Audio (ALSA converts to any rate)"),
    ]
    pcms = textwrap.dedent("""\
        null
            Discard all samples
        msntest
        sysdefault:CARD=Device
            USB Audio Device, USB Audio
            Default Audio Device
        """)
    assert [(d.name, d.description) for d in parse_arecord_big_l(pcms)] == [
        ("null", "Discard all samples"),
        ("msntest", ""),
        ("sysdefault:CARD=Device", "USB Audio Device, USB Audio"),
    ]


class FakeSoundDevice:
    @staticmethod
    def query_devices():
        return [
            {"name": "HDA Intel PCH: ALC892 Analog (hw:0,0)", "max_input_channels": 2},
            {"name": "HDA Intel PCH: HDMI 0 (hw:0,3)", "max_input_channels": 0},
            {"name": "USB Audio Device: - (hw:1,0)", "max_input_channels": 1},
            {"name": "default", "max_input_channels": 32},
        ]


@pytest.mark.parametrize(("name", "index"), [("hw:1", 2), ("hw:0,0", 0), ("default", 3)])
def test_portaudio_names_map_like_alsa(name, index):
    assert portaudio_input(FakeSoundDevice, name) == index


def test_portaudio_unknown_name_lists_what_there_is():
    with pytest.raises(DeviceError, match=r"no input named 'hw:0,3' \(it lists: .*'default'\)"):
        portaudio_input(FakeSoundDevice, "hw:0,3")


class FakePortAudio(FakeSoundDevice):
    """sounddevice as PortAudioReader uses it, with PortAudio's rule that the final
    Pa_Terminate closes every stream the process has open."""

    class PortAudioError(Exception):
        pass

    def __init__(self, can_restart: bool = True) -> None:
        self.restarts = 0
        self.streams: list = []
        if not can_restart:  # a sounddevice release without the private pair
            self._terminate = self._initialize = None

    def _terminate(self) -> None:
        for stream in self.streams:
            stream.closed = True

    def _initialize(self) -> None:
        self.restarts += 1

    def check_input_settings(self, device, **settings) -> None:
        pass

    def RawInputStream(self, **settings):  # noqa: N802 - sounddevice's name
        sd = self

        class Stream:
            closed = False

            def start(self) -> None:
                pass

            def read(self, frames: int):
                if self.closed:
                    raise sd.PortAudioError("Stream is closed")
                return np.arange(frames, dtype="<i2").tobytes(), False

            def abort(self) -> None:
                pass

            def close(self) -> None:
                self.closed = True

        self.streams.append(Stream())
        return self.streams[-1]


def test_portaudio_rescans_devices_only_while_no_stream_is_open(monkeypatch):
    sd = FakePortAudio()
    monkeypatch.setattr(portaudio, "load_sounddevice", lambda: sd)
    first = portaudio.PortAudioReader("hw:1", 16_000)
    assert sd.restarts == 1  # a device plugged in since the import is found
    second = portaudio.PortAudioReader("hw:0,0", 16_000)
    assert sd.restarts == 1  # restarting PortAudio now would close the first stream
    np.testing.assert_array_equal(first.read()[:3], [0, 1, 2])
    np.testing.assert_array_equal(second.read()[:3], [0, 1, 2])
    first.close()
    second.close()
    second.close()  # closing twice counts once
    third = portaudio.PortAudioReader("default", 16_000)
    assert sd.restarts == 2 and third.read().size > 0
    third.close()
    assert portaudio.PORTAUDIO_STREAMS.count == 0


def test_portaudio_without_the_restart_functions_still_opens(monkeypatch):
    sd = FakePortAudio(can_restart=False)
    monkeypatch.setattr(portaudio, "load_sounddevice", lambda: sd)
    reader = portaudio.PortAudioReader("hw:1", 16_000)
    assert sd.restarts == 0 and reader.read().size > 0
    reader.close()
    assert portaudio.PORTAUDIO_STREAMS.count == 0


def test_a_read_waiting_for_a_vanished_device_calls_its_idle_hook():
    """`monitor --enroll-first` pings the watchdog through this hook: a device that is
    being reopened must not look like a hung monitor."""
    feed = {"pos": 0, "end": 1_000, "chunk": 100}
    back = threading.Event()
    attempts = []

    def opener():
        attempts.append(True)
        if len(attempts) == 1:
            return FakeReader(feed, fail_after=1)  # one chunk, then unplugged
        if not back.is_set():
            raise DeviceError("no such device")
        return FakeReader(feed)

    idles = []

    def idle():
        idles.append(time.monotonic())
        if len(idles) == 3:
            back.set()  # plugged in again after three idle polls

    unplugged_too_long = threading.Timer(5.0, back.set)  # without idle calls: fail, not hang
    unplugged_too_long.start()
    with LiveSource("fake", RATE, opener, backoff=FAST) as src:
        first = src.read(idle=idle)
        resumed = src.read(idle=idle)
    unplugged_too_long.cancel()
    assert len(first.samples) == 100 and not first.resumed
    assert resumed.resumed and src.stats.reconnects == 1
    assert len(idles) >= 3  # called while nothing came, not only once
    np.testing.assert_array_equal(resumed.samples, counter(100, start=100))
