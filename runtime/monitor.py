"""The monitor: N streams -> windows -> batched engine calls -> alarm states -> events.

    inputs      each opened once (a device with all its channels, a file, stdin, a FIFO)
    streams     one per machine: a channel of an input, with its own windower, health
                counters, alarm state and clock; time is counted in samples (stream.py)
    batches     windows ready across the streams of one engine (one per distinct bundle
                and precision) go into one call (see batcher.py)
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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from msn_edge.runtime.batcher import Batcher
from msn_edge.runtime.errors import AudioError
from msn_edge.runtime.monitor_config import BatchPolicy
from msn_edge.runtime.sources import Chunk, LiveSource, RawPcmSource, Source, SourceStats
from msn_edge.runtime.stream import Stream, Summary

log = logging.getLogger(__name__)

PUMP_AHEAD = 2  # chunks a reader thread may hand over ahead of the loop, per input
WAIT_S = 0.5  # longest the loop sleeps waiting for audio (stop requests, watchdog pings)


class Observer(Protocol):
    """Hooks for metrics: each engine call and each window's time from ready to scored."""

    def batch(self, engine: str, size: int, wait_s: float) -> None: ...


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
