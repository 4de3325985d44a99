"""Helpers shared by the streaming tests: a counter signal and a recording stand-in detector."""

from __future__ import annotations

import time

import numpy as np

from msn_edge.runtime.detector import Scored
from msn_edge.runtime.frontend import FrontendConfig
from msn_edge.runtime.scorer import Scorer

RATE = 16_000


def counter(n: int, start: int = 0) -> np.ndarray:
    """A ramp that wraps like int16: sample k holds (start + k) mod 2**16, signed."""
    return ((np.arange(start, start + n) + 2**15) % 2**16 - 2**15).astype(np.int16)


def pcm16(x: np.ndarray) -> np.ndarray:
    """Samples as int16 again: windows and file chunks are float32 scaled by 1/32768."""
    x = np.asarray(x)
    if x.dtype == np.int16:
        return x
    return np.round(x.astype(np.float64) * 32768.0).astype(np.int16)


class Recorder:
    """Stand-in engine that keeps every window it is given, as int16 again.

    Its score is the window's mean magnitude, so verdicts follow the signal's level; the
    verdict is the stream's scorer's (which holds the threshold). It also records every
    call's batch size.
    """

    def __init__(self, window_s: float = 0.25, threshold: float = 0.5, delay_s: float = 0.0):
        self.frontend = FrontendConfig(window_s=window_s)
        self.scorer = Scorer(np.eye(1, dtype=np.float32), threshold)
        self.backend = "recorder"
        self.windows: list[np.ndarray] = []
        self.batches: list[int] = []
        self.delay_s = delay_s  # a slow model, to make the consumer fall behind

    def score_batch(self, windows: np.ndarray, scorers) -> list[Scored]:
        assert windows.dtype == np.float32
        assert windows.shape == (len(scorers), self.frontend.window_samples)
        self.batches.append(len(windows))
        out = []
        for window, scorer in zip(windows, scorers, strict=True):
            self.windows.append(np.round(window * 32768.0).astype(np.int16))
            if self.delay_s:
                time.sleep(self.delay_s)
            score = float(np.abs(window).mean())
            out.append(Scored(score, bool(scorer.verdict(score)), scorer.threshold, 0.5, 1.5))
        return out
