"""Scoring a whole file (`msn-edge score`): every sample judged, one verdict per file.

A file up to one window long is one window (a shorter one tiled to length, as training
and evaluation do: spec §1). A longer file is cut into back-to-back windows from its
start; when its length is not a multiple of the window, the last window is aligned to
the file's end (it overlaps the one before), so that no audio is left unjudged. Long
files are read block by block; memory stays one batch of windows.

The file's verdict: "anomalous" when any window is; else "invalid" when any window
could not be judged (runtime.audio.unjudgeable); else "normal". Its score is the worst
(highest) score of the windows that were judged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from msn_edge.runtime.audio import AudioFile, read_audio, unjudgeable
from msn_edge.runtime.frontend import FrontendConfig, fit_window

BATCH = 8  # windows scored together


@dataclass(frozen=True)
class FileWindow:
    start: int  # first sample, in the file
    samples: np.ndarray  # float32 (L,)


@dataclass(frozen=True)
class FileResult:
    score: float  # worst judged window; NaN when no window could be judged
    anomalous: bool
    threshold: float
    invalid: str | None  # why (part of) the file could not be judged; None if all was
    windows: int
    worst_start_s: float  # start of the worst window
    duration_s: float
    tiled: bool  # shorter than one window: repeated to length

    @property
    def verdict(self) -> str:
        if self.anomalous:
            return "anomalous"
        return "invalid" if self.invalid else "normal"

    def to_dict(self, path: str) -> dict:
        """JSON-ready (no NaN: an unjudged score is null)."""
        return {
            "path": path,
            "score": self.score if math.isfinite(self.score) else None,
            "anomalous": self.anomalous,
            "verdict": self.verdict,
            "invalid_reason": self.invalid,
            "threshold": self.threshold,
            "windows": self.windows,
            "worst_start_s": self.worst_start_s,
            "duration_s": self.duration_s,
            "tiled": self.tiled,
        }


def file_windows(
    path: str | Path,
    sample_rate: int,
    window: int,
    *,
    downmix: bool = False,
    resample: bool = False,
    flags: bool = False,
) -> tuple[int, Iterator[FileWindow]]:
    """(frames at `sample_rate`, the file's windows as described in the module docstring)."""
    f = AudioFile(path, downmix=downmix, flags=flags, expect_rate=sample_rate)
    if f.rate != sample_rate or f.frames <= window:
        f.close()  # short or resampled: in memory (read_audio checks the rate and size)
        wave = read_audio(path, sample_rate, downmix=downmix, resample=resample, flags=flags)
        return wave.size, _from_memory(wave, window)
    return f.frames, _streamed(f, window)


def _from_memory(wave: np.ndarray, n: int) -> Iterator[FileWindow]:
    if wave.size <= n:
        yield FileWindow(0, fit_window(wave, n))
        return
    starts = list(range(0, wave.size - n + 1, n))
    if starts[-1] + n < wave.size:
        starts.append(wave.size - n)
    for s in starts:
        yield FileWindow(s, wave[s : s + n])


def _streamed(f: AudioFile, n: int) -> Iterator[FileWindow]:
    with f:
        position, previous = 0, None
        while True:
            block = f.read(n)
            if block.size == n:
                yield FileWindow(position, block)
                position, previous = position + n, block
                continue
            if block.size and previous is not None:  # end-aligned last window
                tail = np.concatenate([previous[block.size :], block])
                yield FileWindow(position + block.size - n, tail)
            return


ScoreBatch = Callable[[np.ndarray], list[float]]


def judge_file(
    windows: Iterator[FileWindow],
    frames: int,
    sample_rate: int,
    window: int,
    threshold: float,
    score_batch: ScoreBatch,
) -> FileResult:
    """Score every window (unjudgeable ones are not scored) and combine them."""
    worst, worst_start, count, invalid = -math.inf, 0, 0, []

    def flush(batch: list[FileWindow]) -> None:
        nonlocal worst, worst_start
        if not batch:
            return
        scores = score_batch(np.stack([w.samples for w in batch]))
        for w, s in zip(batch, scores, strict=True):
            if s > worst:
                worst, worst_start = s, w.start

    batch: list[FileWindow] = []
    for w in windows:
        count += 1
        reason = unjudgeable(w.samples)
        if reason is not None:
            invalid.append((w.start, reason))
            continue
        batch.append(w)
        if len(batch) == BATCH:
            flush(batch)
            batch = []
    flush(batch)
    why = None
    if invalid:
        start, reason = invalid[0]
        more = f" (and {len(invalid) - 1} more windows)" if len(invalid) > 1 else ""
        why = f"window at {start / sample_rate:g} s: {reason}{more}"
        if len(invalid) == count:
            why = reason if count == 1 else f"no window could be judged: {reason}"
    judged = worst > -math.inf
    return FileResult(
        score=float(worst) if judged else math.nan,
        anomalous=judged and worst > threshold,
        threshold=float(threshold),
        invalid=why,
        windows=count,
        worst_start_s=worst_start / sample_rate,
        duration_s=frames / sample_rate,
        tiled=frames < window,
    )


def score_file(
    path: str | Path,
    frontend: FrontendConfig,
    threshold: float,
    score_batch: ScoreBatch,
    *,
    downmix: bool = False,
    resample: bool = False,
) -> FileResult:
    """A whole file judged window by window: what `score` does with a bundle or a run."""
    frames, windows = file_windows(
        path,
        frontend.sample_rate,
        frontend.window_samples,
        downmix=downmix,
        resample=resample,
        flags=True,
    )
    return judge_file(
        windows, frames, frontend.sample_rate, frontend.window_samples, threshold, score_batch
    )
