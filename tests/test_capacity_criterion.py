"""The capacity benchmark's *held* criterion on synthetic timings (no bundle, no audio)."""

from __future__ import annotations

import pytest

from msn_edge.benchmarks.capacity_criterion import Scored, judge

HOP = 10.0


def run(due: dict[str, int], latency) -> list:
    """Events for every due window, `latency(stream, index)` seconds after its last sample."""
    return [Scored(s, i, latency(s, i)) for s, n in due.items() for i in range(n)]


def test_every_due_window_scored_in_time_is_held():
    due = {"a": 3, "b": 4, "c": 3}
    v = judge(due, run(due, lambda s, i: 1.0 + 0.1 * i), dropped=0, hop_s=HOP)
    assert v.held and v.reasons == []
    assert (v.due, v.scored, v.missing) == (10, 10, {})
    assert v.percentile(50) == pytest.approx(1.1)


def test_windows_finished_during_the_drain_count_and_are_held():
    """The last windows ended just before the stop and were scored after it, in the drain:
    their latency is what it was (2.9 s here), and the row is held. (The old criterion,
    counting scored-by-the-stop against due-by-the-stop, failed such rows.)"""
    due = {"a": 3, "b": 3}
    v = judge(due, run(due, lambda s, i: 2.9 if i == 2 else 1.0), dropped=0, hop_s=HOP)
    assert v.held
    assert v.percentile(99) == pytest.approx(2.9)


def test_a_due_window_never_scored_fails_the_row_even_when_totals_match():
    due = {"a": 3, "b": 3}
    events = run({"a": 3, "b": 2}, lambda s, i: 1.0)
    events.append(Scored("a", 1, 1.0))  # a duplicate does not stand in for b's window 2
    v = judge(due, events, dropped=0, hop_s=HOP)
    assert not v.held
    assert v.missing == {"b": [2]}
    assert v.scored == 5 and v.due == 6
    assert v.reasons == ["1 due windows never scored (e.g. b window 2)"]


def test_late_windows_fail_through_the_p99():
    """Two windows in a hundred scored after more than a hop: p99 is above it."""
    due = {f"s{k}": 10 for k in range(10)}
    late = {("s3", 9), ("s7", 9)}
    v = judge(due, run(due, lambda s, i: 12.0 if (s, i) in late else 1.5), dropped=0, hop_s=HOP)
    assert not v.held and not v.missing
    assert v.percentile(99) > HOP
    assert v.reasons[0].startswith("p99 latency")


def test_one_late_window_in_a_thousand_is_within_the_p99_rule():
    due = {f"s{k}": 100 for k in range(10)}
    v = judge(
        due, run(due, lambda s, i: 30.0 if (s, i) == ("s0", 50) else 1.0), dropped=0, hop_s=HOP
    )
    assert v.held and v.latencies.max() == 30.0


def test_dropped_audio_fails_the_row():
    due = {"a": 2}
    v = judge(due, run(due, lambda s, i: 1.0), dropped=1600, hop_s=HOP)
    assert not v.held and v.reasons == ["1600 samples dropped"]


def test_nothing_scored_is_not_held():
    v = judge({"a": 2}, [], dropped=0, hop_s=HOP)
    assert not v.held
    assert "no window scored" in v.reasons


def test_an_event_for_a_window_that_was_not_due_is_flagged():
    v = judge({"a": 1}, [Scored("a", 0, 1.0), Scored("a", 1, 1.0)], dropped=0, hop_s=HOP)
    assert not v.held and v.reasons == ["1 events for windows that were not due"]
