"""A bundle, an engine and a scorer put together: a window of audio in, a verdict out.

This is what `msn-edge score` and the streaming monitor call; it owns no streaming state.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from msn_edge.runtime.audio import read_audio
from msn_edge.runtime.bundle import Bundle, read_bundle
from msn_edge.runtime.engines import Engine, make_engine
from msn_edge.runtime.errors import AudioError, BackendError
from msn_edge.runtime.frontend import features, fit_window
from msn_edge.runtime.scorer import Scorer


@dataclass(frozen=True)
class Scored:
    score: float  # min cosine distance to the group's prototypes, 0..2
    anomalous: bool  # score > threshold
    threshold: float
    frontend_ms: float  # per window (a batch's time divided by its size)
    inference_ms: float  # per window, engine only


class SharedEngine:
    """One engine for every stream of a bundle: a batch of windows in, one engine call.

    Streams of the same bundle may score against different groups and thresholds; each
    row of a batch is judged by its own stream's `Scorer`, which alone holds the threshold.
    """

    def __init__(self, bundle: Bundle, engine: Engine) -> None:
        self.bundle = bundle
        self.engine = engine
        self.frontend = bundle.frontend
        self.calls = 0  # engine calls so far
        self.windows = 0  # windows scored so far (sum of the batch sizes)

    @property
    def backend(self) -> str:
        return self.engine.name

    def scorer(self, group: str | None = None, threshold: float | None = None) -> Scorer:
        """The scorer of one scoring group, with the bundle's threshold unless overridden."""
        g = self.bundle.group(group)
        return Scorer(
            self.bundle.prototypes[g.start : g.stop],
            g.threshold if threshold is None else float(threshold),
        )

    def score_batch(self, windows: np.ndarray, scorers: Sequence[Scorer]) -> list[Scored]:
        """Windows (B, L) of float audio, one scorer per row; timings are the batch's / B."""
        windows = np.asarray(windows, dtype=np.float32)
        if windows.ndim != 2 or windows.shape[0] == 0:
            raise AudioError(f"expected a batch of windows (B, L), got shape {windows.shape}")
        n = windows.shape[0]
        if len(scorers) != n:
            raise ValueError(f"{n} windows but {len(scorers)} scorers")
        t0 = time.perf_counter()
        spec, spectrum = features(windows, self.frontend)
        t1 = time.perf_counter()
        emb = self.engine.embed(spec, spectrum)
        t2 = time.perf_counter()
        self.calls += 1
        self.windows += n
        if emb.shape != (n, self.bundle.embedding_dim):
            raise BackendError(
                f"the model gives embeddings {emb.shape}; the bundle's prototypes expect "
                f"({n}, {self.bundle.embedding_dim})"
            )
        frontend_ms, inference_ms = 1e3 * (t1 - t0) / n, 1e3 * (t2 - t1) / n
        out: list[Scored | None] = [None] * n
        for scorer in {id(s): s for s in scorers}.values():  # rows of one group at once
            rows = [i for i, s in enumerate(scorers) if s is scorer]
            scores = scorer.score(emb[rows])
            flags = scorer.verdict(scores)
            for i, score, flag in zip(rows, scores, flags, strict=True):
                out[i] = Scored(
                    float(score), bool(flag), scorer.threshold, frontend_ms, inference_ms
                )
        return out  # type: ignore[return-value]


class Detector:
    """Scores windows of exactly `frontend.window_samples` samples for one scoring group."""

    def __init__(
        self,
        bundle: Bundle,
        engine: Engine,
        *,
        group: str | None = None,
        threshold: float | None = None,
    ) -> None:
        self.bundle = bundle
        self.engine = engine
        self.frontend = bundle.frontend
        self.group = bundle.group(group)
        self.shared = SharedEngine(bundle, engine)
        self.scorer = self.shared.scorer(group, threshold)

    @property
    def threshold(self) -> float:
        """The scorer's threshold (the one place it is held)."""
        return self.scorer.threshold

    @property
    def backend(self) -> str:
        return self.engine.name

    def close(self) -> None:
        """Release the engine's device resources (a no-op on the CPU)."""
        self.engine.close()

    @classmethod
    def open(
        cls,
        bundle_path: str | Path,
        *,
        backend: str = "auto",
        precision: str = "fp32",
        threads: int | None = None,
        group: str | None = None,
        threshold: float | None = None,
        cache_dir: Path | None = None,
    ) -> Detector:
        """Read and verify a bundle, start an engine for it; errors are one clear line.

        `cache_dir` is where TensorRT engines are cached (default: beside the bundle).
        """
        bundle = read_bundle(bundle_path)
        bundle.group(group)  # an unknown group fails before a (slow) engine build
        engine = make_engine(
            bundle, backend, precision=precision, threads=threads, cache_dir=cache_dir
        )
        return cls(bundle, engine, group=group, threshold=threshold)

    def score(self, window: np.ndarray) -> Scored:
        """One window (L,) of float audio in [-1, 1)."""
        window = np.asarray(window)
        if window.ndim != 1:
            raise AudioError(f"expected one mono window (L,), got shape {window.shape}")
        return self.score_batch(window[None])[0]

    def score_batch(
        self, windows: np.ndarray, scorers: Sequence[Scorer] | None = None
    ) -> list[Scored]:
        """Windows (B, L); timings are the batch's divided by B.

        `scorers` (one per row) judges rows by other groups of the same bundle; by default
        every row is judged by this detector's group.
        """
        n = np.shape(windows)[0] if np.ndim(windows) == 2 else 0
        return self.shared.score_batch(windows, scorers or [self.scorer] * max(n, 1))

    def score_file(
        self, path: str | Path, *, downmix: bool = False, resample: bool = False
    ) -> Scored:
        """A whole clip: tiled or truncated to one window from its start (offset 0)."""
        wave = read_audio(path, self.frontend.sample_rate, downmix=downmix, resample=resample)
        return self.score(fit_window(wave, self.frontend.window_samples, offset=0))
