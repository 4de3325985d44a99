"""Live capture from ALSA devices by name, and the list of names `--device` takes.

Capture runs `arecord` (alsa-utils) as a child process rather than PortAudio:
- arecord opens every name alsa-lib accepts (`hw:1`, `plughw:1,0`, `dsnoop:...`,
  `hw:CARD=USB,DEV=0`, any PCM from an asoundrc), exactly as `arecord -D NAME` does when
  a person checks the microphone. PortAudio only offers the `hw:X,Y` cards and top-level
  config PCMs it enumerated at start-up (never `plughw:`), so names would need guessing.
- An unplugged USB device can hang PortAudio's ALSA error handling (PortAudio issue
  #1037, fixed in 2025, after the 19.6 that Debian 12 and JetPack 6 ship), and
  PortAudio sees a re-plugged device only after re-initialising. arecord just exits;
  the monitor kills or restarts a child process whatever state it is in.
- arecord reports each overrun itself ("overrun!!! (at least N ms long)") and recovers.
PortAudio (sounddevice) remains for systems without arecord, and can be chosen with
`capture="portaudio"`.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import signal
import subprocess
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from msn_edge.runtime.errors import DeviceError
from msn_edge.runtime.sources import (
    DEFAULT_BACKOFF,
    QUEUE_S,
    Backoff,
    LiveSource,
    chunk_samples,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

PIPE_BYTES = 1 << 20  # arecord's stdout pipe: 32 s of 16 kHz int16 instead of Linux's 2 s
ARECORD_STOP_S = 2.0  # grace time for arecord to exit on SIGTERM before SIGKILL
CAPTURES = ("auto", "arecord", "portaudio")


def plug_alternative(name: str) -> str:
    """The ALSA name that converts rate, channels and format in software for `name`."""
    if name.startswith("hw:"):
        return "plug" + name
    return name if name.startswith(("plughw:", "plug:")) else f"plug:{name}"


def _format_hint(name: str, sample_rate: int, channels: int = 1) -> str:
    layout = "mono" if channels == 1 else f"{channels}-channel"
    return (
        f"ALSA device {name!r} cannot give {sample_rate} Hz {layout} 16-bit audio; "
        f"use --device {plug_alternative(name)} so ALSA converts it"
    )


_XRUN = re.compile(r"^overrun!!!")
_RATE_WARNING = re.compile(r"rate is not accurate")
_FORMAT_ERRORS = ("Channels count non available", "Sample format non available")


def arecord_error(
    name: str,
    sample_rate: int,
    stderr_lines: list[str],
    returncode: int | None = None,
    channels: int = 1,
) -> DeviceError:
    """One clear DeviceError from what arecord printed (and how it ended)."""
    text = "\n".join(stderr_lines)
    if _RATE_WARNING.search(text) or any(f in text for f in _FORMAT_ERRORS):
        return DeviceError(_format_hint(name, sample_rate, channels))
    if "Unknown PCM" in text or "No such file or directory" in text:
        return DeviceError(f"ALSA device {name!r} not found; `msn-edge devices` lists the inputs")
    if "Device or resource busy" in text:
        return DeviceError(f"ALSA device {name!r} is busy (another program is recording)")
    said = [
        s.strip()
        for s in stderr_lines
        if s.strip() and not s.startswith("Recording ") and not _XRUN.search(s)
    ]
    if said:
        detail = said[-1]
    elif returncode is not None and returncode < 0:
        detail = f"killed by {signal.Signals(-returncode).name}"
    else:
        detail = f"exit status {returncode}"
    return DeviceError(f"ALSA device {name!r}: arecord stopped ({detail})")


def _frames(data: bytes, channels: int) -> np.ndarray:
    """Interleaved s16le -> (n,) for mono, (n, channels) otherwise; a partial frame is cut."""
    frame = 2 * channels
    pcm = np.frombuffer(data[: len(data) - len(data) % frame], dtype="<i2").astype(np.int16)
    return pcm if channels == 1 else pcm.reshape(-1, channels)


class ArecordReader:
    """Raw s16le from one `arecord` child process; an exit means the device failed.

    With `channels` > 1 (a multi-channel interface, one machine per input) chunks are
    (n, channels) frames; the monitor gives each channel to its own stream.
    """

    def __init__(self, device: str, sample_rate: int, channels: int = 1) -> None:
        self.device = device
        self.sample_rate = sample_rate
        self.channels = channels
        self.overruns = 0
        self._nbytes = 2 * channels * chunk_samples(sample_rate)
        self._lines: deque[str] = deque(maxlen=20)  # arecord's last messages, for errors
        self._ended = False
        self._stderr_thread: threading.Thread | None = None
        # No -q: quiet mode would hide arecord's "rate is not accurate" warning.
        cmd = ["arecord", "-D", device, "-t", "raw", "-f", "S16_LE"]
        cmd += ["-r", str(sample_rate), "-c", str(channels)]
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "LC_ALL": "C"},  # messages are parsed: keep them English
            start_new_session=True,  # a Ctrl-C for the monitor must not kill its capture
        )
        with contextlib.suppress(OSError):  # a bigger pipe rides out a slow scheduler
            fcntl.fcntl(self._proc.stdout.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        # The rate warning is printed before the first sample, so once data arrives the
        # warning, if any, is already waiting in the stderr pipe.
        self._first = self._read_bytes()
        self._drain_stderr_nonblocking()
        if not self._first or any(_RATE_WARNING.search(s) for s in self._lines):
            self.close()
            raise arecord_error(
                device, sample_rate, list(self._lines), self._proc.returncode, channels
            )
        self._stderr_thread = threading.Thread(target=self._watch_stderr, daemon=True)
        self._stderr_thread.start()

    def read(self) -> np.ndarray | None:
        if self._first:
            data, self._first = self._first, b""
        else:
            data = self._read_bytes()
        if not data:
            self.close()
            raise arecord_error(
                self.device,
                self.sample_rate,
                list(self._lines),
                self._proc.returncode,
                self.channels,
            )
        return _frames(data, self.channels)

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(ARECORD_STOP_S)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc.stdout.close()
        if self._stderr_thread is not None:  # its last lines explain the exit
            self._stderr_thread.join(timeout=1.0)
        if self._stderr_thread is None or not self._stderr_thread.is_alive():
            self._proc.stderr.close()

    def _read_bytes(self) -> bytes:
        if self._ended:
            return b""
        try:
            data = self._proc.stdout.read(self._nbytes)
        except (OSError, ValueError):  # closed under us by close()
            data = b""
        if len(data) < self._nbytes:
            self._ended = True  # a short read is arecord's last: hand it out, then fail
        return data

    def _drain_stderr_nonblocking(self) -> None:
        fd = self._proc.stderr.fileno()
        os.set_blocking(fd, False)
        try:
            text = b""
            with contextlib.suppress(BlockingIOError):
                while chunk := os.read(fd, 4096):
                    text += chunk
        finally:
            os.set_blocking(fd, True)
        self._take_lines(text.decode(errors="replace"))
        if self._proc.poll() is not None:  # it exited: the rest of its message is there
            self._take_lines(self._proc.stderr.read().decode(errors="replace"))

    def _watch_stderr(self) -> None:
        for raw in self._proc.stderr:
            self._take_lines(raw.decode(errors="replace"))

    def _take_lines(self, text: str) -> None:
        for line in text.splitlines():
            if _XRUN.search(line):
                self.overruns += 1
                log.warning("%s: %s", self.device, line.strip())
            elif line.strip() and not line.startswith("Recording "):
                log.debug("arecord %s: %s", self.device, line.strip())
            self._lines.append(line)


def _sounddevice():
    try:
        import sounddevice
    except OSError as e:  # the package is there but libportaudio2 is not
        raise DeviceError(
            f"PortAudio is not available ({e}); run scripts/install-system-deps.sh"
        ) from None
    return sounddevice


_HW_NAME = re.compile(r"^hw:(\d+)(?:,(\d+))?$")


class _PortAudioStreams:
    """The PortAudio streams this process has open, and the device re-scan that needs none.

    PortAudio lists devices (and reads the ALSA configuration) only when it initialises, so
    a device plugged in since the import is not found. sounddevice has no public call to
    list them afresh: its maintainer's advice (python-sounddevice issues #47, #125, #516)
    is to restart PortAudio with its private `_terminate()` / `_initialize()`, which wrap
    `Pa_Terminate` / `Pa_Initialize`. The final `Pa_Terminate` closes every open stream
    of the process, so the restart is done only while this process has none open; should
    a sounddevice release drop the two functions, the list is the one PortAudio has.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0  # streams open now

    def open(self, sd, start: Callable[[], T]) -> T:
        """`start()` (which opens and starts a stream), after a re-scan if none is open."""
        with self._lock:  # no other thread opens one between the re-scan and this one
            if self.count:
                log.debug("PortAudio devices not re-scanned: %d stream(s) open", self.count)
            elif callable(getattr(sd, "_terminate", None)) and callable(
                getattr(sd, "_initialize", None)
            ):
                sd._terminate()
                sd._initialize()
            else:
                log.debug("this sounddevice cannot restart PortAudio: devices not re-scanned")
            stream = start()
            self.count += 1
        return stream

    def closed(self) -> None:
        with self._lock:
            self.count -= 1


PORTAUDIO_STREAMS = _PortAudioStreams()


def portaudio_input(sd, name: str) -> int:
    """PortAudio's index for an input named like ALSA does (`default`, `hw:1,0`, a PCM)."""
    devices = [(i, d) for i, d in enumerate(sd.query_devices()) if d["max_input_channels"] > 0]
    for i, d in devices:
        if d["name"] == name:
            return i
    hw = _HW_NAME.match(name)
    if hw:  # PortAudio names cards "USB Audio Device: USB Audio (hw:1,0)"
        tag = f"(hw:{hw.group(1)},{hw.group(2) or 0})"
        for i, d in devices:
            if d["name"].endswith(tag):
                return i
    listed = ", ".join(repr(d["name"]) for _, d in devices) or "none"
    raise DeviceError(
        f"PortAudio has no input named {name!r} (it lists: {listed}); "
        "install alsa-utils so that any ALSA name opens through arecord"
    )


class PortAudioReader:
    """Capture through PortAudio (sounddevice) where arecord is not installed."""

    def __init__(self, device: str, sample_rate: int, channels: int = 1) -> None:
        sd = _sounddevice()
        self._sd = sd
        self.device = device
        self.channels = channels
        self.overruns = 0
        self._chunk = chunk_samples(sample_rate)
        self._stream = None
        self._stream = PORTAUDIO_STREAMS.open(sd, lambda: self._start(sample_rate))

    def _start(self, sample_rate: int):
        sd, device, channels = self._sd, self.device, self.channels
        index = portaudio_input(sd, device)
        try:
            sd.check_input_settings(index, channels=channels, dtype="int16", samplerate=sample_rate)
        except sd.PortAudioError:
            raise DeviceError(_format_hint(device, sample_rate, channels)) from None
        try:
            stream = sd.RawInputStream(
                device=index,
                samplerate=sample_rate,
                channels=channels,
                dtype="int16",
                blocksize=self._chunk,
                latency="high",
            )
        except sd.PortAudioError as e:
            raise DeviceError(f"ALSA device {device!r} cannot be opened ({e})") from None
        try:
            stream.start()
        except sd.PortAudioError as e:
            with contextlib.suppress(sd.PortAudioError):
                stream.close()
            raise DeviceError(f"ALSA device {device!r} cannot be opened ({e})") from None
        return stream

    def read(self) -> np.ndarray | None:
        try:
            data, overflowed = self._stream.read(self._chunk)
        except self._sd.PortAudioError as e:
            raise DeviceError(f"ALSA device {self.device!r} failed ({e})") from None
        self.overruns += bool(overflowed)
        return _frames(bytes(data), self.channels)

    def close(self) -> None:
        if self._stream is None:
            return
        with contextlib.suppress(self._sd.PortAudioError):
            self._stream.abort()
            self._stream.close()
        self._stream = None
        PORTAUDIO_STREAMS.closed()


def open_device(
    name: str,
    sample_rate: int,
    *,
    capture: str = "auto",
    channels: int = 1,
    queue_s: float = QUEUE_S,
    backoff: Backoff = DEFAULT_BACKOFF,
) -> LiveSource:
    """A live ALSA input by name, captured by arecord (or PortAudio, see the module doc).

    `channels` > 1 captures a multi-channel interface once, in (n, channels) frames.
    """
    if channels < 1:
        raise DeviceError(f"{name}: channels must be at least 1, got {channels}")
    if capture not in CAPTURES:
        raise DeviceError(f"capture must be one of {', '.join(CAPTURES)}, got {capture!r}")
    if capture == "auto":
        capture = "arecord" if shutil.which("arecord") else "portaudio"
        if capture == "portaudio":
            log.info("arecord not found: capturing through PortAudio")
    if capture == "arecord" and not shutil.which("arecord"):
        raise DeviceError("arecord not found; run scripts/install-system-deps.sh")
    reader = ArecordReader if capture == "arecord" else PortAudioReader
    return LiveSource(
        name,
        sample_rate,
        lambda: reader(name, sample_rate, channels),
        queue_s=queue_s,
        backoff=backoff,
    )


@dataclass(frozen=True)
class InputDevice:
    name: str  # what --device takes
    description: str


_CARD_LINE = re.compile(r"^card (\d+): (\S+) \[(.*?)\], device (\d+): .*?\[(.*?)\]")


def parse_arecord_l(text: str) -> list[InputDevice]:
    """Hardware capture devices from `arecord -l`, each as hw: and plughw: names."""
    out = []
    for line in text.splitlines():
        m = _CARD_LINE.match(line)
        if m:
            card, _, card_name, dev, dev_name = m.groups()
            what = f"{card_name}, {dev_name}"
            out.append(InputDevice(f"hw:{card},{dev}", f"{what} (hardware: native rates only)"))
            out.append(InputDevice(f"plughw:{card},{dev}", f"{what} (ALSA converts to any rate)"))
    return out


def parse_arecord_big_l(text: str) -> list[InputDevice]:
    """PCM names from `arecord -L`: a name at column 0, its description indented below."""
    out: list[InputDevice] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        if not line[0].isspace():
            out.append(InputDevice(line.strip(), ""))
        elif out and not out[-1].description:
            out[-1] = InputDevice(out[-1].name, line.strip())
    return out


def list_input_devices() -> list[InputDevice]:
    """Every name `--device` can take here: ALSA's list, or PortAudio's without arecord."""
    if shutil.which("arecord"):
        env = {**os.environ, "LC_ALL": "C"}
        cards = subprocess.run(["arecord", "-l"], capture_output=True, text=True, env=env)
        pcms = subprocess.run(["arecord", "-L"], capture_output=True, text=True, env=env)
        return parse_arecord_l(cards.stdout) + parse_arecord_big_l(pcms.stdout)
    sd = _sounddevice()
    return [
        InputDevice(d["name"], f"PortAudio, {d['max_input_channels']} input channel(s)")
        for d in sd.query_devices()
        if d["max_input_channels"] > 0
    ]
