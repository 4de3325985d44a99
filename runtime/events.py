"""Monitor events as JSON lines: per-window scores with health, and alarm/clear events.

The monitor counts time in samples; this module is the one place where a sample
position becomes a UTC time (ISO 8601) and where field names get their units.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
from collections import deque
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol, TextIO

import numpy as np

from msn_edge.runtime.alarm import AlarmChange
from msn_edge.runtime.audio import Level, level
from msn_edge.runtime.errors import MsnEdgeError
from msn_edge.runtime.frontend import pcm_to_float
from msn_edge.runtime.windower import Window

log = logging.getLogger(__name__)

DIGITS_S = 3  # event times in ms resolution
DIGITS_MS = 2


class ScoredLike(Protocol):
    """What an event needs from msn_edge.runtime.detector.Scored."""

    score: float
    anomalous: bool
    threshold: float
    frontend_ms: float
    inference_ms: float
    invalid: str | None  # why no verdict could be given (runtime.audio.unjudgeable)


InputLevel = Level  # the health levels, defined with the audio policy in runtime.audio


def input_level(samples: np.ndarray) -> Level:
    """Whether a window is silent (dead or muted input) or clipped (gain too high).

    Integer PCM is scaled first, so int16 and float windows read the same.
    """
    return level(pcm_to_float(np.asarray(samples)))


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


def verdict_of(scored: ScoredLike) -> str:
    """ "invalid" (no verdict possible), "anomalous" or "normal"."""
    if getattr(scored, "invalid", None):
        return "invalid"
    return "anomalous" if scored.anomalous else "normal"


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
    invalid = getattr(scored, "invalid", None)
    return {
        "event": "window",
        "stream": stream,
        "index": window.index,
        "start": iso_utc(clock.utc_s(start)),
        "end": iso_utc(clock.utc_s(end)),
        "start_s": start / rate,  # exact: sample counts, not wall-clock readings
        "end_s": end / rate,
        # A window that could not be judged has no score and no verdict but "invalid".
        "score": None if invalid else float(scored.score),
        "threshold": float(scored.threshold),
        "anomalous": None if invalid else bool(scored.anomalous),
        "verdict": verdict_of(scored),
        "invalid_reason": invalid,
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


def _finite(value: object) -> object:
    """JSON has no NaN or inf: a non-finite number becomes null, never invalid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def json_line(event: dict) -> str:
    return json.dumps(_finite(event), allow_nan=False) + "\n"


def silence_stdout() -> None:
    """Point fd 1 at /dev/null after stdout failed, so that Python's exit flush is quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


class EventSink:
    """Writes each event as one JSON line to a stream and, durably, to an events file.

    Each line in the file is flushed and fsynced before the next window is scored, so a
    power cut loses at most the line being written. The file is written first, and it
    keeps going when the stream goes away: a closed stdout, a broken pipe (`| head -1`)
    or a full disk under stdout is logged once and counted in `stream_failures`, and the
    monitor carries on into the file. Without an events file nothing would keep the
    events, so the same failure is an error (MsnEdgeError); so is any failure to write
    the events file itself (e.g. ENOSPC), never a silent loss.
    """

    def __init__(self, stream: TextIO | None = None, events_file: str | Path | None = None):
        self._stream = sys.stdout if stream is None else stream
        self._events_file = events_file
        self.stream_failures = 0  # events the stream did not take (after it failed)
        self._file = None
        if events_file is not None:
            try:
                self._file = open(events_file, "a", encoding="utf-8")  # noqa: SIM115 - kept open
            except OSError as e:
                raise MsnEdgeError(
                    f"{events_file}: cannot open the events file ({e.strerror})"
                ) from None

    def __call__(self, event: dict) -> None:
        line = json_line(event)
        if self._file is not None:
            try:
                self._file.write(line)
                self._file.flush()
                os.fsync(self._file.fileno())
            except OSError as e:
                raise MsnEdgeError(
                    f"{self._events_file}: cannot write the events file ({e.strerror}); "
                    "stopped so that no event is lost unnoticed"
                ) from None
        if self._stream is None:
            self.stream_failures += 1
            return
        try:
            self._stream.write(line)
            self._stream.flush()
        except (OSError, ValueError) as e:  # ValueError: the stream was closed
            why = getattr(e, "strerror", None) or str(e)
            if self._stream is sys.stdout:
                silence_stdout()
            self._stream = None
            self.stream_failures += 1
            if self._file is None:
                raise MsnEdgeError(
                    f"cannot write events to stdout ({why}); stopped "
                    "(use --events-file to keep events when stdout may go away)"
                ) from None
            log.warning("stdout failed (%s): events continue in %s only", why, self._events_file)

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
        if self.stream_failures:
            log.warning("%d events were not written to stdout", self.stream_failures)
