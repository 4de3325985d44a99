"""Windower: every window holds exactly the right samples, whatever the chunk sizes."""

from __future__ import annotations

import numpy as np
import pytest
from stream_helpers import counter, pcm16

from msn_edge.runtime.windower import Windower


def feed(windower: Windower, signal: np.ndarray, chunk_sizes) -> list:
    out, pos = [], 0
    for size in chunk_sizes:
        out += windower.push(signal[pos : pos + size])
        pos += size
        if pos >= signal.size:
            break
    out += windower.push(signal[pos:])
    return out


@pytest.mark.parametrize("hop", [100, 37, 1])
def test_every_window_is_exact_for_random_chunks(hop):
    size = 100
    signal = counter(5_000)
    rng = np.random.default_rng(hop)
    windows = feed(Windower(size, hop), signal, rng.integers(0, 260, size=10_000))
    assert len(windows) == (signal.size - size) // hop + 1
    for k, w in enumerate(windows):
        assert w.index == k
        assert w.start == k * hop
        np.testing.assert_array_equal(pcm16(w.samples), signal[k * hop : k * hop + size])


def test_chunk_size_does_not_change_the_windows():
    signal = counter(3_000, start=31_000)  # crosses the int16 wrap
    one_go = Windower(256, 128).push(signal)
    sample_by_sample = feed(Windower(256, 128), signal, [1] * signal.size)
    assert len(one_go) == len(sample_by_sample) == 22
    for a, b in zip(one_go, sample_by_sample, strict=True):
        assert a.start == b.start
        np.testing.assert_array_equal(a.samples, b.samples)


def test_windows_are_copies_the_caller_can_keep():
    w = Windower(4, 2)
    first = w.push(counter(4))[0]
    w.push(counter(10, start=100))
    np.testing.assert_array_equal(pcm16(first.samples), [0, 1, 2, 3])


def test_counts_positions_and_pending_samples():
    w = Windower(10, 5)
    w.push(counter(23))
    assert w.position == 23
    assert w.windows == 3  # starts 0, 5, 10
    assert w.pending == 3  # samples 20..22 are in no window yet


def test_reset_starts_the_next_window_at_the_current_position():
    w = Windower(10, 10)
    signal = counter(40)
    assert len(w.push(signal[:14])) == 1
    assert w.reset() == 4  # samples 10..13 never made a window
    windows = w.push(signal[14:40])
    assert [x.start for x in windows] == [14, 24]
    np.testing.assert_array_equal(pcm16(windows[0].samples), signal[14:24])
    assert windows[0].index == 1  # indices keep counting across resets
    assert w.pending == 6


def test_reset_with_overlap_counts_only_samples_in_no_window():
    w = Windower(10, 4)
    w.push(counter(12))  # one window 0..9; samples 10, 11 are new
    assert w.reset() == 2


@pytest.mark.parametrize(("size", "hop"), [(0, 1), (10, 0), (10, 11)])
def test_rejects_bad_sizes(size, hop):
    with pytest.raises(ValueError, match="must be"):
        Windower(size, hop)


def test_rejects_multichannel_chunks():
    with pytest.raises(ValueError, match="mono"):
        Windower(10, 10).push(np.zeros((4, 2), dtype=np.int16))
