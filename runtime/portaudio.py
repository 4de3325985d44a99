"""Capture through PortAudio (sounddevice): the fallback where arecord is not installed.

Why arecord comes first is in capture.py's docstring; capture.py loads this module only
when PortAudio is chosen or arecord is missing.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from collections.abc import Callable
from typing import TypeVar

import numpy as np

from msn_edge.runtime.capture import format_hint, frames
from msn_edge.runtime.errors import DeviceError
from msn_edge.runtime.sources import chunk_samples

log = logging.getLogger("msn_edge.runtime.capture")  # capture's log, as before the split
T = TypeVar("T")


def load_sounddevice():
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
        sd = load_sounddevice()
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
            raise DeviceError(format_hint(device, sample_rate, channels)) from None
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
        return frames(bytes(data), self.channels)

    def close(self) -> None:
        if self._stream is None:
            return
        with contextlib.suppress(self._sd.PortAudioError):
            self._stream.abort()
            self._stream.close()
        self._stream = None
        PORTAUDIO_STREAMS.closed()
