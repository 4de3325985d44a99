"""One machine's stream: a channel's windows, their verdicts, its alarm state and summary.

The monitor (monitor.py) feeds each stream the chunks of its channel and hands the events
a scored window makes to its sink; a stream knows nothing of inputs, threads or batching.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from msn_edge.runtime.alarm import AlarmChange, AlarmState
from msn_edge.runtime.errors import MsnEdgeError
from msn_edge.runtime.events import ScoredLike, StreamClock, alarm_event, window_event
from msn_edge.runtime.frontend import FrontendConfig
from msn_edge.runtime.scorer import Scorer
from msn_edge.runtime.sources import SourceStats
from msn_edge.runtime.windower import Window, Windower

log = logging.getLogger("msn_edge.runtime.monitor")  # the monitor's log, as before the split


class BatchScorer(Protocol):
    """What the monitor needs from an engine shared by streams (detector.SharedEngine)."""

    frontend: FrontendConfig
    backend: str

    def score_batch(self, windows: np.ndarray, scorers: Sequence[Scorer]) -> list[ScoredLike]: ...


@dataclass
class Summary:
    windows: int = 0
    anomalous: int = 0
    invalid: int = 0  # windows that could not be judged (verdict "invalid")
    alarms: int = 0
    alarm_active: bool = False  # an alarm was still raised when the monitor stopped
    overruns: int = 0
    dropped_samples: int = 0  # lost before the monitor saw them (source queue full)
    discarded_samples: int = 0  # received but in no window: partial windows at gaps and end
    reconnects: int = 0
    audio_s: float = 0.0  # audio received
    processing_s: float = 0.0  # front-end + inference, this stream's share of its batches
    wall_s: float = 0.0

    @property
    def mean_latency_ms(self) -> float:
        return 1000.0 * self.processing_s / self.windows if self.windows else 0.0

    @property
    def real_time_factor(self) -> float:
        """Processing time per second of audio: below 1 keeps up with a live input."""
        return self.processing_s / self.audio_s if self.audio_s else 0.0

    def line(self) -> str:
        alarm = ", alarm still active" if self.alarm_active else ""
        return (
            f"{self.windows} windows, {self.anomalous} anomalous, {self.invalid} invalid, "
            f"{self.alarms} alarms{alarm}, "
            f"{self.overruns} overruns ({self.dropped_samples} samples dropped), "
            f"{self.discarded_samples} samples in no window, "
            f"{self.reconnects} reconnects, mean latency {self.mean_latency_ms:.1f} ms, "
            f"real-time factor {self.real_time_factor:.4f} "
            f"({self.audio_s:.1f} s of audio in {self.wall_s:.1f} s)"
        )


def hop_samples(frontend: FrontendConfig, hop_s: float | None) -> int:
    """`--hop` in samples; the window itself when not given."""
    size = frontend.window_samples
    if hop_s is None:
        return size
    hop = int(round(hop_s * frontend.sample_rate))
    if not 0 < hop <= size:
        raise MsnEdgeError(
            f"--hop must be more than 0 and at most the window ({frontend.window_s:g} s), "
            f"got {hop_s:g}"
        )
    return hop


def _log_alarm(stream: str, change: AlarmChange) -> None:
    if change.kind == "alarm":
        log.warning(
            "%s: ALARM: %d anomalous windows in a row since window %d",
            stream,
            change.run_windows,
            change.run_start_index,
        )
    else:
        log.info(
            "%s: alarm cleared at window %d after %d anomalous windows",
            stream,
            change.index,
            change.run_windows,
        )


class Stream:
    """One machine: windows from one channel, judged by its scorer, with its own alarm."""

    def __init__(
        self,
        name: str,
        engine: BatchScorer,
        scorer: Scorer,
        *,
        hop_s: float | None = None,
        alarm_after: int | None = None,
        max_windows: int | None = None,
        max_seconds: float | None = None,
        start: int = 0,
    ) -> None:
        """`start`: samples of the input read before this stream began (`--enroll-first`);
        window times count from the input's start, `max_seconds` from the stream's."""
        fe = engine.frontend
        self.name = name
        self.engine = engine
        self.scorer = scorer
        self.start = start
        self.windower = Windower(fe.window_samples, hop_samples(fe, hop_s), start=start)
        self.alarm = AlarmState(alarm_after) if alarm_after else None
        self.clock = StreamClock(fe.sample_rate)
        self.max_windows = max_windows
        self.budget = None if max_seconds is None else start + round(max_seconds * fe.sample_rate)
        self.summary = Summary()
        self.ended = False  # its input ended, or a bound was reached
        self._reported = SourceStats()  # input counters as of the previous window event
        self._stats = SourceStats()  # input counters as of the latest chunk
        self._after_gap = False
        self._emitted = 0  # windows handed out for scoring

    @property
    def sample_rate(self) -> int:
        return self.clock.sample_rate

    @property
    def full(self) -> bool:
        """A bound was reached: no more windows are wanted."""
        if self.max_windows is not None and self._emitted >= self.max_windows:
            return True
        return self.budget is not None and self.windower.position >= self.budget

    def feed(
        self,
        samples: np.ndarray,
        resumed: bool,
        arrived_utc: Callable[[], float],
        stats: SourceStats,
    ) -> list[Window]:
        """One chunk of this stream's channel; returns the windows it completes.

        `arrived_utc()` is when the chunk's last sample was received (asked only when the
        clock needs an anchor: at the start and after a gap).
        """
        self._stats = stats
        if self.ended or self.full:
            return []
        if self.budget is not None:
            samples = samples[: self.budget - self.windower.position]
        if resumed or self.windower.position == self.start:
            if resumed:
                self.summary.discarded_samples += self.windower.reset()
                self._after_gap = True
                if self.alarm is not None:
                    self.alarm.gap()
            rate = self.clock.sample_rate
            self.clock.anchor(self.windower.position, arrived_utc() - samples.size / rate)
        windows = self.windower.push(samples)
        if self.max_windows is not None:
            windows = windows[: self.max_windows - self._emitted]
        self._emitted += len(windows)
        return windows

    def end(self, stats: SourceStats) -> None:
        """The input ended; `stats` are its final counters."""
        self._stats = stats
        self.ended = True

    def events(self, window: Window, scored: ScoredLike) -> list[dict]:
        """The window's event and, when the alarm state changes, an alarm/clear event."""
        stats = self._stats
        out = [
            window_event(
                window,
                scored,
                clock=self.clock,
                backend=self.engine.backend,
                overruns=stats.overruns - self._reported.overruns,
                dropped_samples=stats.dropped_samples - self._reported.dropped_samples,
                reconnects=stats.reconnects - self._reported.reconnects,
                after_gap=self._after_gap,
                stream=self.name,
            )
        ]
        self._reported, self._after_gap = stats, False
        s = self.summary
        s.windows += 1
        invalid = bool(getattr(scored, "invalid", None))
        s.anomalous += bool(scored.anomalous) and not invalid
        s.invalid += invalid
        s.processing_s += (scored.frontend_ms + scored.inference_ms) / 1000.0
        if self.alarm is not None and not invalid:  # no verdict: no vote, either way
            change = self.alarm.update(window.index, scored.anomalous, window.start)
            if change is not None:
                end = window.start + self.windower.size
                out.append(alarm_event(change, clock=self.clock, end=end, stream=self.name))
                _log_alarm(self.name, change)
        return out

    def finish(self, wall_s: float) -> Summary:
        s = self.summary
        if self.windower.pending:
            log.warning(
                "%s: the last %.3f s (%d samples) made no complete window and were not scored",
                self.name,
                self.windower.pending / self.sample_rate,
                self.windower.pending,
            )
        s.discarded_samples += self.windower.pending
        self.windower.reset()
        s.audio_s = (self.windower.position - self.start) / self.sample_rate
        s.wall_s = wall_s
        stats = self._stats
        s.overruns, s.dropped_samples, s.reconnects = (
            stats.overruns,
            stats.dropped_samples,
            stats.reconnects,
        )
        if self.alarm is not None:
            s.alarms, s.alarm_active = self.alarm.alarms, self.alarm.active
        return s
