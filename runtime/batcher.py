"""Batching: the ready windows of the streams that share one engine, and when to score them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from msn_edge.runtime.events import ScoredLike
from msn_edge.runtime.frontend import pcm_to_float
from msn_edge.runtime.monitor_config import BatchPolicy
from msn_edge.runtime.stream import BatchScorer, Stream
from msn_edge.runtime.windower import Window


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
