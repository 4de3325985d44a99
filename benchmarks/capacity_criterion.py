"""When a stream count is *held* in real time: the capacity benchmark's criterion, alone.

The run ends the audio at a stop time and then lets the monitor drain: every window
whose last sample arrived before the stop is *due*, and is scored unless the monitor
fell behind. A window still unscored a hop after the audio ended is late by the
latency rule anyway (it waited longer than the hop), so the drain is bounded by that.

A count is held when
  - every due window was scored (per stream and index, not totals),
  - no audio was dropped, and
  - the p99 latency (window's last sample to its event) is below the hop.

Kept apart from capacity.py (numpy only) so that its unit test needs no bundle.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Scored:
    """One window event: the stream, the window's index, its latency in seconds."""

    stream: str
    index: int
    latency_s: float


@dataclass
class Verdict:
    due: int
    scored: int  # due windows scored
    missing: dict[str, list[int]]  # stream -> due windows never scored
    latencies: np.ndarray  # of every scored window
    dropped: int
    hop_s: float
    reasons: list[str] = field(default_factory=list)

    @property
    def held(self) -> bool:
        return not self.reasons

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) if self.latencies.size else float("nan")


def judge(
    due: Mapping[str, int],
    events: Iterable[Scored],
    *,
    dropped: int,
    hop_s: float,
) -> Verdict:
    """The verdict of one row: `due[stream]` windows were due (indices 0..n-1) per stream."""
    seen: dict[str, set[int]] = {s: set() for s in due}
    latencies = []
    extra = 0
    for e in events:
        latencies.append(e.latency_s)
        if e.index < due.get(e.stream, 0):
            seen[e.stream].add(e.index)
        else:
            extra += 1  # scored, but its audio ended after the stop: impossible when drained
    missing = {
        s: [i for i in range(n) if i not in seen[s]] for s, n in due.items() if len(seen[s]) < n
    }
    lat = np.asarray(latencies, dtype=float)
    v = Verdict(
        due=sum(due.values()),
        scored=sum(len(s) for s in seen.values()),
        missing=missing,
        latencies=lat,
        dropped=dropped,
        hop_s=hop_s,
    )
    if missing:
        n = sum(len(m) for m in missing.values())
        first = sorted(missing)[0]
        v.reasons.append(f"{n} due windows never scored (e.g. {first} window {missing[first][0]})")
    if extra:
        v.reasons.append(f"{extra} events for windows that were not due")
    if dropped:
        v.reasons.append(f"{dropped} samples dropped")
    if not lat.size:
        v.reasons.append("no window scored")
    elif v.percentile(99) >= hop_s:
        v.reasons.append(f"p99 latency {v.percentile(99):.2f} s is not below the hop ({hop_s:g} s)")
    return v
