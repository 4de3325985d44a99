"""Soak: an hour of audio through the whole monitor, faster than real time, in flat memory.

The audio is generated as it is read (raw s16le, like `--input -`): one-second blocks of
the toy machine's hum, with three anomalous seconds in every minute, so the run also
raises and clears an alarm every minute. Events go through the durable EventSink.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from toy_bundle import anomalous_signal, make_toy_bundle, normal_signal, toy_frontend

from msn_edge.runtime.detector import Detector
from msn_edge.runtime.events import EventSink
from msn_edge.runtime.monitor import run_monitor
from msn_edge.runtime.sources import RawPcmSource

HOUR_S = 3600
MINUTE_PATTERN = "n" * 57 + "aaa"  # one toy window (1 s) per letter
WARM_UP_WINDOWS = 300
MAX_GROWTH_BYTES = 10 * 2**20
TAIL_SAMPLES = 123  # a partial window at the end: counted, never scored


def rss_bytes() -> int:
    resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


class GeneratedAudio(io.RawIOBase):
    """`seconds` of the minute pattern as raw s16le, made from a few cached blocks."""

    def __init__(self, seconds: int, tail: int) -> None:
        fe, rng = toy_frontend(), np.random.default_rng(11)
        as_bytes = lambda x: (x * 32768).clip(-32768, 32767).astype("<i2").tobytes()  # noqa: E731
        self._blocks = {
            "n": [as_bytes(normal_signal(fe, rng)) for _ in range(7)],
            "a": [as_bytes(anomalous_signal(fe, rng)) for _ in range(3)],
        }
        self._seconds = seconds
        self._tail = b"\0\0" * tail
        self._second = 0
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if not self._pending:
            if self._second < self._seconds:
                kind = MINUTE_PATTERN[self._second % len(MINUTE_PATTERN)]
                blocks = self._blocks[kind]
                self._pending = blocks[self._second % len(blocks)]
                self._second += 1
            else:
                self._pending, self._tail = self._tail, b""
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


def test_an_hour_streams_in_flat_memory_with_exact_counts(tmp_path):
    if not Path("/proc/self/statm").exists():
        pytest.skip("RSS is read from /proc (Linux)")
    detector = Detector.open(make_toy_bundle(tmp_path / "toy.msn"), threads=1)
    source = RawPcmSource(io.BufferedReader(GeneratedAudio(HOUR_S, TAIL_SAMPLES)), 16_000)
    rss: list[int] = []
    with open(os.devnull, "w") as devnull:
        sink = EventSink(devnull, tmp_path / "events.jsonl")

        def record(event: dict) -> None:
            sink(event)
            if event["event"] == "window":
                rss.append(rss_bytes())

        summary = run_monitor(source, detector, record, alarm_after=3)
        sink.close()

    assert summary.windows == HOUR_S
    assert summary.audio_s == HOUR_S + TAIL_SAMPLES / 16_000
    assert summary.discarded_samples == TAIL_SAMPLES
    assert summary.anomalous == 3 * HOUR_S // 60
    assert summary.alarms == HOUR_S // 60
    assert summary.overruns == summary.dropped_samples == 0
    assert summary.wall_s < summary.audio_s / 10  # far faster than real time
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    assert len(lines) == HOUR_S + 2 * HOUR_S // 60 - 1  # windows, alarms, clears (last open)
    growth = max(rss[WARM_UP_WINDOWS:]) - rss[WARM_UP_WINDOWS]
    assert growth < MAX_GROWTH_BYTES, f"RSS grew {growth / 2**20:.1f} MiB after warm-up"
