"""Monitor events as JSON lines: per-window scores with health, and alarm/clear events.

The monitor counts time in samples; this module is the one place where a sample
position becomes a UTC time (ISO 8601) and where field names get their units.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol, TextIO

import numpy as np

from msn_edge.runtime.alarm import AlarmChange
from msn_edge.runtime.errors import MsnEdgeError
from msn_edge.runtime.windower import Window

FULL_SCALE = 32768.0  # int16
SILENT_DBFS = -70.0  # a working microphone's noise floor is above this; a dead one is not
CLIP_FRACTION = 0.001  # more than 0.1 % of samples at full scale: the gain is too high
DIGITS_S = 3  # event times in ms resolution
DIGITS_MS = 2


class ScoredLike(Protocol):
    """What an event needs from msn_edge.runtime.detector.Scored."""

    score: float
    anomalous: bool
    threshold: float
    frontend_ms: float
    inference_ms: float


@dataclass(frozen=True)
class InputLevel:
    peak_dbfs: float  # floored at one LSB (-90.3 dBFS): digital silence included
    silent: bool
    clipped: bool


def input_level(samples: np.ndarray) -> InputLevel:
    """Whether an int16 window is silent (dead or muted input) or clipped (gain too high)."""
    mag = np.abs(samples.astype(np.int32))
    peak = int(mag.max()) if mag.size else 0
    peak_dbfs = 20.0 * math.log10(max(peak, 1) / FULL_SCALE)
    clipped = np.count_nonzero(mag >= FULL_SCALE - 1) > CLIP_FRACTION * mag.size
    return InputLevel(round(peak_dbfs, 1), peak_dbfs < SILENT_DBFS, bool(clipped))


class StreamClock:
    """Sample positions -> UTC, anchored where each unbroken stretch of audio began.

    Positions count received samples and never go back; each gap adds an anchor, and a
    position is read against the last anchor at or before it, so an alarm run that began
    before a gap still gets its true start time.
    """

    MAX_ANCHORS = 64  # older stretches are long gone from any event still to be written

    def __init__(self, sample_rate: int) -> None:
        self.sample_rate = sample_rate
        self._anchors: deque[tuple[int, float]] = deque([(0, 0.0)], maxlen=self.MAX_ANCHORS)

    def anchor(self, position: int, utc_s: float) -> None:
        """Stream position `position` was recorded at `utc_s` (seconds since the epoch)."""
        while self._anchors and self._anchors[-1][0] >= position:
            self._anchors.pop()
        self._anchors.append((position, utc_s))

    def utc_s(self, position: int) -> float:
        base, utc = self._anchors[0]
        for p, u in reversed(self._anchors):
            if p <= position:
                base, utc = p, u
                break
        return utc + (position - base) / self.sample_rate


def iso_utc(utc_s: float) -> str:
    """ISO 8601 in UTC with milliseconds, e.g. 2025-03-01T12:00:05.250Z."""
    stamp = datetime.fromtimestamp(utc_s, tz=timezone.utc).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def window_event(
    window: Window,
    scored: ScoredLike,
    *,
    clock: StreamClock,
    backend: str,
    overruns: int,
    dropped_samples: int,
    after_gap: bool,
    stream: str = "main",
    reconnects: int = 0,
) -> dict:
    """One window's line. Health fields count what happened since the previous window."""
    rate, start, end = clock.sample_rate, window.start, window.start + window.samples.size
    level = input_level(window.samples)
    return {
        "event": "window",
        "stream": stream,
        "index": window.index,
        "start": iso_utc(clock.utc_s(start)),
        "end": iso_utc(clock.utc_s(end)),
        "start_s": start / rate,  # exact: sample counts, not wall-clock readings
        "end_s": end / rate,
        "score": float(scored.score),
        "threshold": float(scored.threshold),
        "anomalous": bool(scored.anomalous),
        "verdict": "anomalous" if scored.anomalous else "normal",
        "latency_ms": round(scored.frontend_ms + scored.inference_ms, DIGITS_MS),
        "frontend_ms": round(scored.frontend_ms, DIGITS_MS),
        "inference_ms": round(scored.inference_ms, DIGITS_MS),
        "backend": backend,
        "overruns": overruns,
        "dropped_samples": dropped_samples,
        "reconnects": reconnects,
        "after_gap": after_gap,
        "peak_dbfs": level.peak_dbfs,
        "silent": level.silent,
        "clipped": level.clipped,
    }


def alarm_event(change: AlarmChange, *, clock: StreamClock, end: int, stream: str = "main") -> dict:
    """An alarm raised or ended at sample `end` (the end of the deciding window)."""
    time_s, since_s = clock.utc_s(end), clock.utc_s(change.run_start)
    return {
        "event": change.kind,
        "stream": stream,
        "index": change.index,
        "time": iso_utc(time_s),
        "since": iso_utc(since_s),
        "since_index": change.run_start_index,
        "anomalous_windows": change.run_windows,
        "duration_s": round(time_s - since_s, DIGITS_S),
    }


class EventSink:
    """Writes each event as one JSON line to a stream and, durably, to an events file.

    Each line in the file is flushed and fsynced before the next window is scored, so a
    power cut loses at most the line being written.
    """

    def __init__(self, stream: TextIO | None = None, events_file: str | Path | None = None):
        self._stream = sys.stdout if stream is None else stream
        self._file = None
        if events_file is not None:
            try:
                self._file = open(events_file, "a", encoding="utf-8")  # noqa: SIM115 - kept open
            except OSError as e:
                raise MsnEdgeError(
                    f"{events_file}: cannot open the events file ({e.strerror})"
                ) from None

    def __call__(self, event: dict) -> None:
        line = json.dumps(event) + "\n"
        self._stream.write(line)
        self._stream.flush()
        if self._file is not None:
            self._file.write(line)
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
