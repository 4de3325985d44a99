"""Chunks of any size in, fixed-length windows out: exact, in order, nothing lost.

The monitor reads audio in whatever chunks the source delivers (a device period, a
pipe read, a file block); the model needs windows of exactly the bundle's length, one
every `hop` samples. The windower keeps a bounded buffer of one window, carries the
remainder between chunks, and counts samples so that every window knows where it
starts in the stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from msn_edge.runtime.frontend import pcm_to_float


@dataclass(frozen=True)
class Window:
    index: int  # 0, 1, 2, ... in the order emitted, across resets
    start: int  # position of its first sample in the stream, in samples
    samples: np.ndarray  # float32 (size,) in [-1, 1), a copy the caller may keep


class Windower:
    """Bounded buffer of one window: push chunks, get every complete window.

    `hop == size` gives back-to-back windows; a shorter hop overlaps them. A hop longer
    than the window would skip audio, which the monitor never wants, so it is an error.
    """

    def __init__(self, size: int, hop: int, start: int = 0) -> None:
        """`start`: the stream position of the first sample pushed (0: the stream's start)."""
        if size <= 0:
            raise ValueError(f"window size must be positive, got {size}")
        if not 0 < hop <= size:
            raise ValueError(f"hop must be in 1..{size} samples (the window), got {hop}")
        self.size = size
        self.hop = hop
        self._buf = np.zeros(size, dtype=np.float32)
        self.position = start  # stream position: start + samples pushed (never reset)
        self.windows = 0  # windows emitted since creation (never reset)
        self._fill = 0  # valid samples at the front of _buf
        self._fresh = 0  # of those, samples not yet in any emitted window
        self._start = start  # stream position of _buf[0]

    def reset(self) -> int:
        """Start the next window at the current position (after a gap in the audio).

        Returns how many buffered samples were never part of a window and are dropped.
        """
        discarded = self._fresh
        self._fill = self._fresh = 0
        self._start = self.position
        return discarded

    @property
    def pending(self) -> int:
        """Samples received but not yet part of any window."""
        return self._fresh

    def push(self, chunk: np.ndarray) -> list[Window]:
        """Append one chunk (int16 PCM or float); return the windows it completes, oldest first.

        Integer PCM is scaled to float here, once, as runtime.audio scales files.
        """
        if chunk.ndim != 1:
            raise ValueError(f"expected a mono chunk, got shape {chunk.shape}")
        chunk = pcm_to_float(chunk)
        out = []
        used = 0
        while used < chunk.size:
            take = min(self.size - self._fill, chunk.size - used)
            self._buf[self._fill : self._fill + take] = chunk[used : used + take]
            self._fill += take
            self._fresh += take
            used += take
            if self._fill == self.size:
                out.append(Window(self.windows, self._start, self._buf.copy()))
                self.windows += 1
                keep = self.size - self.hop
                self._buf[:keep] = self._buf[self.hop :]  # numpy copes with the overlap
                self._fill = keep
                self._fresh = 0
                self._start += self.hop
        self.position += chunk.size
        return out
