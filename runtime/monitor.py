"""The monitor: N streams -> windows -> batched engine calls -> alarm states -> events.

    inputs      each opened once (a device with all its channels, a file, stdin, a FIFO)
    streams     one per machine: a channel of an input, with its own windower, health
                counters, alarm state and clock; time is counted in samples
    batches     windows ready across the streams of one engine (one per distinct bundle
                and precision) go into one call (see `Batcher`)
    events      window events, and alarm/clear events; UTC only when an event is written

Live inputs (devices, paced files, and stdin/FIFOs when there are several inputs) are
read by a thread each into one queue; each message carries the chunk, the input's
counters (a snapshot taken under the source's lock) and the time it arrived. Files are
read by the loop itself, at its pace, so that nothing is lost and runs are repeatable.

When an input says audio was lost before a chunk (an overrun, a device that came back)
its streams drop their partial windows, restart their alarm runs and re-anchor their
clocks, so that no window straddles a gap, no alarm counts across one, and every time
stamp is true. A vanished device is retried by its source while the others go on.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from msn_edge.runtime.alarm import AlarmChange, AlarmState
from msn_edge.runtime.errors import AudioError, MsnEdgeError
from msn_edge.runtime.events import ScoredLike, StreamClock, alarm_event, window_event
from msn_edge.runtime.frontend import FrontendConfig, pcm_to_float
from msn_edge.runtime.monitor_config import BatchPolicy
from msn_edge.runtime.scorer import Scorer
from msn_edge.runtime.sources import Chunk, LiveSource, RawPcmSource, Source, SourceStats
from msn_edge.runtime.windower import Window, Windower

log = logging.getLogger(__name__)

PUMP_AHEAD = 2  # chunks a reader thread may hand over ahead of the loop, per input
WAIT_S = 0.5  # longest the loop sleeps waiting for audio (stop requests, watchdog pings)


class BatchScorer(Protocol):
    """What the monitor needs from an engine shared by streams (detector.SharedEngine)."""

    frontend: FrontendConfig
    backend: str

    def score_batch(self, windows: np.ndarray, scorers: Sequence[Scorer]) -> list[ScoredLike]: ...


class Observer(Protocol):
    """Hooks for metrics: each engine call and each window's time from ready to scored."""

    def batch(self, engine: str, size: int, wait_s: float) -> None: ...


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
    ) -> None:
        fe = engine.frontend
        self.name = name
        self.engine = engine
        self.scorer = scorer
        self.windower = Windower(fe.window_samples, hop_samples(fe, hop_s))
        self.alarm = AlarmState(alarm_after) if alarm_after else None
        self.clock = StreamClock(fe.sample_rate)
        self.max_windows = max_windows
        self.budget = None if max_seconds is None else int(round(max_seconds * fe.sample_rate))
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
        if resumed or self.windower.position == 0:
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
        s.audio_s = self.windower.position / self.sample_rate
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


@dataclass
class Pending:
    stream: Stream
    window: Window
    ready: float  # time.monotonic() when the window was complete


class Batcher:
    """Ready windows of the streams sharing one engine, and when to score them.

    A batch goes to the engine when it is full (`max_batch`), when every stream still
    running has a window in it (waiting longer only delays them), when its oldest
    window has waited `max_wait_s`, or when the input ends.
    """

    def __init__(self, engine: BatchScorer, streams: list[Stream], policy: BatchPolicy) -> None:
        self.engine = engine
        self.streams = streams
        self.policy = policy
        self.pending: list[Pending] = []
        self.calls = 0
        self.sizes: list[int] = []  # every call's batch size, in order

    def add(self, stream: Stream, windows: list[Window], now: float) -> None:
        self.pending += [Pending(stream, w, now) for w in windows]

    def deadline(self) -> float | None:
        return self.pending[0].ready + self.policy.max_wait_s if self.pending else None

    def due(self, now: float) -> bool:
        if not self.pending:
            return False
        if len(self.pending) >= self.policy.max_batch or now >= self.deadline():
            return True
        waiting = {id(p.stream) for p in self.pending}
        return all(id(s) in waiting for s in self.streams if not s.ended)

    def take(self) -> list[Pending]:
        batch = self.pending[: self.policy.max_batch]
        self.pending = self.pending[self.policy.max_batch :]
        return batch

    def score(self, batch: list[Pending]) -> list[ScoredLike]:
        windows = np.stack([pcm_to_float(p.window.samples) for p in batch])
        scored = self.engine.score_batch(windows, [p.stream.scorer for p in batch])
        self.calls += 1
        self.sizes.append(len(batch))
        return scored


@dataclass
class Input:
    """An opened source and the streams that listen to its channels."""

    source: Source
    streams: list[tuple[int, Stream]]  # (channel, stream)
    pumped: bool = False
    ended: bool = False

    @property
    def done(self) -> bool:
        return self.ended or all(s.ended or s.full for _, s in self.streams)


@dataclass
class MonitorResult:
    streams: dict[str, Summary]
    calls: dict[str, list[int]] = field(default_factory=dict)  # engine -> batch sizes
    wall_s: float = 0.0

    def line(self) -> str:
        total = sum(s.windows for s in self.streams.values())
        calls = sum(len(v) for v in self.calls.values())
        mean = total / calls if calls else 0.0
        return (
            f"{len(self.streams)} streams, {total} windows in {calls} engine calls "
            f"(mean batch {mean:.1f}), {self.wall_s:.1f} s"
        )


class Monitor:
    """Runs N streams of one or more inputs until every input ends or `stop()` is called."""

    def __init__(
        self,
        inputs: list[Input],
        sink: Callable[[dict], None],
        *,
        policy: BatchPolicy | None = None,
        observer: Observer | None = None,
        wall_clock: Callable[[], float] = time.time,
        tick: Callable[[], None] | None = None,
    ) -> None:
        self.inputs = inputs
        self.sink = sink
        self.policy = policy or BatchPolicy()
        self.observer = observer
        self.wall_clock = wall_clock
        self.tick = tick  # called at least every WAIT_S while running (the watchdog ping)
        # Small: the sources' own bounded queues hold the backlog and count what they drop.
        self._queue: queue.Queue = queue.Queue(maxsize=PUMP_AHEAD * max(1, len(inputs)))
        self._stop = threading.Event()
        self.batchers: dict[int, Batcher] = {}
        for inp in inputs:
            for _, stream in inp.streams:
                if stream.sample_rate != inp.source.sample_rate:
                    raise AudioError(
                        f"{inp.source.name}: {inp.source.sample_rate} Hz, stream "
                        f"{stream.name!r} needs {stream.sample_rate} Hz"
                    )
                key = id(stream.engine)
                if key not in self.batchers:
                    self.batchers[key] = Batcher(stream.engine, [], self.policy)
                self.batchers[key].streams.append(stream)
            if inp.source.channels <= max(ch for ch, _ in inp.streams):
                raise AudioError(
                    f"{inp.source.name}: {inp.source.channels} channel(s), a stream "
                    f"listens to channel {max(ch for ch, _ in inp.streams)}"
                )

    @property
    def streams(self) -> list[Stream]:
        return [s for inp in self.inputs for _, s in inp.streams]

    def stop(self) -> None:
        """Finish the windows in hand and stop. Only sets flags: safe in a signal handler."""
        self._stop.set()
        for inp in self.inputs:
            inp.source.stop()

    # -- reading ------------------------------------------------------------------------

    def _pump(self, inp: Input) -> None:
        """A live input's reader thread: chunks (with counters and arrival time) to the queue.

        Its last message is always the end of the input (None) or an error, so that the
        loop knows when the input is done, even when a stop comes while the queue is full.
        """
        try:
            while True:
                chunk = inp.source.read()
                item = (inp, chunk, inp.source.snapshot(), self.wall_clock())
                if not self._hand_over(item):
                    chunk = None  # stopping, and the loop is busy: drop the chunk, end here
                    self._queue.put((inp, None, inp.source.snapshot(), self.wall_clock()))
                if chunk is None:
                    return
        except BaseException as e:  # a device fault that is not retried, or a bug
            self._queue.put((inp, e, inp.source.snapshot(), self.wall_clock()))

    def _hand_over(self, item: tuple) -> bool:
        """Put `item` on the bounded queue; False if a stop came while it was full."""
        while True:
            try:
                self._queue.put(item, timeout=WAIT_S)
                return True
            except queue.Full:
                if self._stop.is_set():
                    return False

    def _take(
        self,
        inp: Input,
        chunk: Chunk | None,
        stats: SourceStats,
        arrived: Callable[[], float],
    ) -> None:
        if chunk is None:
            inp.ended = True
            for _, stream in inp.streams:
                stream.end(stats)
            return
        now = time.monotonic()
        data = chunk.samples
        for channel, stream in inp.streams:
            samples = data if data.ndim == 1 else np.ascontiguousarray(data[:, channel])
            windows = stream.feed(samples, chunk.resumed, arrived, stats)
            if windows:
                self.batchers[id(stream.engine)].add(stream, windows, now)
            if stream.full:
                stream.ended = True
        if inp.done and not inp.ended:
            inp.source.stop()  # every stream has what it wanted
            if not inp.pumped:
                inp.ended = True

    # -- scoring ------------------------------------------------------------------------

    def _flush(self, *, everything: bool = False) -> None:
        for batcher in self.batchers.values():
            while batcher.pending and (everything or batcher.due(time.monotonic())):
                batch = batcher.take()
                scored = batcher.score(batch)
                now = time.monotonic()
                if self.observer is not None:
                    self.observer.batch(batcher.engine.backend, len(batch), now - batch[0].ready)
                for p, s in zip(batch, scored, strict=True):
                    for event in p.stream.events(p.window, s):
                        self.sink(event)

    def _next_wait(self) -> float:
        deadlines = [d for b in self.batchers.values() if (d := b.deadline()) is not None]
        wait = WAIT_S if not deadlines else min(deadlines) - time.monotonic()
        return min(max(wait, 0.0), WAIT_S)

    # -- the loop -----------------------------------------------------------------------

    def run(self) -> MonitorResult:
        started = time.monotonic()
        threads = []
        for inp in self.inputs:
            if inp.pumped:
                t = threading.Thread(
                    target=self._pump, args=(inp,), name=f"read {inp.source.name}", daemon=True
                )
                t.start()
                threads.append(t)
        for b in self.batchers.values():
            log.info(
                "engine %s: %d stream(s), batches of up to %d, waiting at most %g s",
                b.engine.backend,
                len(b.streams),
                self.policy.max_batch,
                self.policy.max_wait_s,
            )
        try:
            while not all(inp.ended for inp in self.inputs):
                pulled = False
                for inp in self.inputs:
                    if inp.pumped or inp.ended:
                        continue
                    chunk = None if self._stop.is_set() else inp.source.read()
                    self._take(inp, chunk, inp.source.snapshot(), _once(self.wall_clock))
                    pulled = True
                    self._flush()
                try:
                    item = self._queue.get(timeout=0 if pulled else self._next_wait())
                except queue.Empty:
                    item = None
                while item is not None:
                    inp, payload, stats, arrived = item
                    if isinstance(payload, BaseException):
                        raise payload
                    self._take(inp, payload, stats, lambda t=arrived: t)
                    self._flush()
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        item = None
                self._flush()
                if self._stop.is_set():
                    for inp in self.inputs:
                        if not inp.pumped:
                            inp.ended = True
                if self.tick is not None:
                    self.tick()
            self._flush(everything=True)
        finally:
            self._stop.set()
            for inp in self.inputs:
                inp.source.stop()
            wall = time.monotonic() - started
            result = MonitorResult(
                {s.name: s.finish(wall) for s in self.streams},
                {b.engine.backend + f"#{i}": b.sizes for i, b in enumerate(self.batchers.values())},
                wall,
            )
            if len(result.streams) == 1:
                log.info("stopped: %s", next(iter(result.streams.values())).line())
            else:
                for name, s in result.streams.items():
                    log.info("stopped %s: %s", name, s.line())
                log.info("stopped: %s", result.line())
        return result


def run_monitor(
    source: Source,
    detector,
    sink: Callable[[dict], None],
    *,
    hop_s: float | None = None,
    alarm_after: int | None = None,
    max_windows: int | None = None,
    max_seconds: float | None = None,
    wall_clock: Callable[[], float] = time.time,
    name: str = "main",
) -> Summary:
    """One stream: score `source` until it ends, is stopped, or a bound is reached.

    `detector` is a Detector (or anything with `frontend`, `backend`, `scorer` and
    `score_batch(windows, scorers)`). Every window's event goes to `sink`; with
    `alarm_after=K`, K anomalous windows in a row add an "alarm" event and the next normal
    window a "clear" event. The summary is also logged when the loop ends.
    """
    fe = detector.frontend
    if source.sample_rate != fe.sample_rate:
        raise AudioError(
            f"{source.name}: {source.sample_rate} Hz, the bundle needs {fe.sample_rate} Hz"
        )
    stream = Stream(
        name,
        detector,
        detector.scorer,
        hop_s=hop_s,
        alarm_after=alarm_after,
        max_windows=max_windows,
        max_seconds=max_seconds,
    )
    log.info(
        "monitoring %s: window %g s, hop %g s, threshold %.6g, backend %s",
        source.name,
        fe.window_s,
        stream.windower.hop / fe.sample_rate,
        detector.scorer.threshold,
        detector.backend,
    )
    inp = Input(source, [(0, stream)], pumped=isinstance(source, LiveSource))
    policy = BatchPolicy(max_wait_s=0.0)  # one stream: nothing to wait for
    return Monitor([inp], sink, policy=policy, wall_clock=wall_clock).run().streams[name]


def _once(clock: Callable[[], float]) -> Callable[[], float]:
    """`clock()` read at most once, when first asked (one reading per chunk)."""
    reading: list[float] = []

    def read() -> float:
        if not reading:
            reading.append(clock())
        return reading[0]

    return read


def pumped(source: Source, n_inputs: int) -> bool:
    """Whether an input gets a reader thread: live ones, and pipes when there are several."""
    return isinstance(source, LiveSource) or (isinstance(source, RawPcmSource) and n_inputs > 1)
