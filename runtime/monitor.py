"""The monitor loop: source -> windows -> detector -> alarm state -> JSON events.

    chunk = source.read()           int16, any size; None at the end or on a stop request
    windows = windower.push(chunk)  exact windows of the bundle's length, every hop
    scored = detector.score(w)      front-end + engine + scorer
    sink(window event), and an alarm/clear event when the alarm state changes

When the source says audio was lost before a chunk (an overrun, a device that came back)
the partial window is dropped and the UTC clock re-anchored, so that no window straddles
a gap and every time stamp is true.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

from msn_edge.runtime.alarm import AlarmChange, AlarmState
from msn_edge.runtime.errors import AudioError, MsnEdgeError
from msn_edge.runtime.events import ScoredLike, StreamClock, alarm_event, window_event
from msn_edge.runtime.frontend import FrontendConfig, pcm_to_float
from msn_edge.runtime.sources import Source, SourceStats
from msn_edge.runtime.windower import Window, Windower

log = logging.getLogger(__name__)


class DetectorLike(Protocol):
    """What the loop needs from msn_edge.runtime.detector.Detector."""

    frontend: FrontendConfig
    threshold: float
    backend: str

    def score(self, window) -> ScoredLike: ...


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
    processing_s: float = 0.0  # front-end + inference, all windows
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


def _log_alarm(change: AlarmChange) -> None:
    if change.kind == "alarm":
        log.warning(
            "ALARM: %d anomalous windows in a row since window %d",
            change.run_windows,
            change.run_start_index,
        )
    else:
        log.info(
            "alarm cleared at window %d after %d anomalous windows",
            change.index,
            change.run_windows,
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


def run_monitor(
    source: Source,
    detector: DetectorLike,
    sink: Callable[[dict], None],
    *,
    hop_s: float | None = None,
    alarm_after: int | None = None,
    max_windows: int | None = None,
    max_seconds: float | None = None,
    wall_clock: Callable[[], float] = time.time,
) -> Summary:
    """Score `source` until it ends, is stopped, or a bound is reached; return the summary.

    Every window's event goes to `sink` (a callable taking a dict, e.g. an EventSink);
    with `alarm_after=K`, K anomalous windows in a row add an "alarm" event and the next
    normal window a "clear" event. The summary is also logged when the loop ends.
    """
    fe = detector.frontend
    if source.sample_rate != fe.sample_rate:
        raise AudioError(
            f"{source.name}: {source.sample_rate} Hz, the bundle needs {fe.sample_rate} Hz"
        )
    windower = Windower(fe.window_samples, hop_samples(fe, hop_s))
    alarm = AlarmState(alarm_after) if alarm_after else None
    clock = StreamClock(fe.sample_rate)
    budget = None if max_seconds is None else int(round(max_seconds * fe.sample_rate))
    summary = Summary()
    reported = SourceStats()  # source counters as of the previous window event
    after_gap = False
    started = time.monotonic()
    log.info(
        "monitoring %s: window %g s, hop %g s, threshold %.6g, backend %s",
        source.name,
        fe.window_s,
        windower.hop / fe.sample_rate,
        detector.threshold,
        detector.backend,
    )

    def emit(window: Window) -> None:
        nonlocal reported, after_gap
        scored = detector.score(pcm_to_float(window.samples))
        stats = replace(source.stats)
        sink(
            window_event(
                window,
                scored,
                clock=clock,
                backend=detector.backend,
                overruns=stats.overruns - reported.overruns,
                dropped_samples=stats.dropped_samples - reported.dropped_samples,
                after_gap=after_gap,
            )
        )
        reported, after_gap = stats, False
        summary.windows += 1
        summary.anomalous += bool(scored.anomalous)
        summary.invalid += bool(getattr(scored, "invalid", None))
        summary.processing_s += (scored.frontend_ms + scored.inference_ms) / 1000.0
        if alarm is not None and not getattr(scored, "invalid", None):  # no verdict: no vote
            change = alarm.update(window.index, scored.anomalous, clock.utc_s(window.start))
            if change is not None:
                sink(alarm_event(change, clock.utc_s(window.start + windower.size)))
                _log_alarm(change)

    try:
        while max_windows is None or summary.windows < max_windows:
            chunk = source.read()
            if chunk is None:
                break
            samples = chunk.samples
            if budget is not None:
                samples = samples[: budget - windower.position]
            if chunk.resumed or windower.position == 0:
                if chunk.resumed:
                    summary.discarded_samples += windower.reset()
                    after_gap = True
                clock.anchor(windower.position, wall_clock() - samples.size / fe.sample_rate)
            for window in windower.push(samples):
                emit(window)
                if summary.windows == max_windows:
                    break
            if budget is not None and windower.position >= budget:
                break
    finally:
        summary.discarded_samples += windower.pending
        summary.audio_s = windower.position / fe.sample_rate
        summary.wall_s = time.monotonic() - started
        summary.overruns = source.stats.overruns
        summary.dropped_samples = source.stats.dropped_samples
        summary.reconnects = source.stats.reconnects
        if alarm is not None:
            summary.alarms, summary.alarm_active = alarm.alarms, alarm.active
        if windower.pending:
            log.warning(
                "the last %.3f s (%d samples) made no complete window and were not scored",
                windower.pending / fe.sample_rate,
                windower.pending,
            )
        log.info("stopped: %s", summary.line())
    return summary
