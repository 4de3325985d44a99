"""A bundle, an engine and a scorer put together: a window of audio in, a verdict out.

This is what `msn-edge score` and the streaming monitor call; it owns no streaming state.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from msn_edge.runtime.audio import unjudgeable
from msn_edge.runtime.bundle import Bundle, read_bundle
from msn_edge.runtime.engines import Engine, make_engine
from msn_edge.runtime.errors import AudioError, BackendError, BundleError
from msn_edge.runtime.filescore import FileResult, score_file
from msn_edge.runtime.frontend import check_length, features
from msn_edge.runtime.scorer import Scorer


@dataclass(frozen=True)
class Scored:
    score: float  # min cosine distance to the group's prototypes, 0..2
    anomalous: bool  # score > threshold
    threshold: float
    frontend_ms: float  # per window (a batch's time divided by its size)
    inference_ms: float  # per window, engine only
    invalid: str | None = None  # why no verdict: score NaN, anomalous False (audio.unjudgeable)

    @property
    def verdict(self) -> str:
        if self.invalid:
            return "invalid"
        return "anomalous" if self.anomalous else "normal"


def check_model_fits(bundle: Bundle, engine: Engine) -> None:
    """The front-end's feature shapes match the model's fixed input sizes (where it
    declares them), so a wrong window length is one clear error at start, not ONNX
    Runtime's message at the first window."""
    shapes = getattr(engine, "input_shapes", None)
    if shapes is None:
        return
    fe = bundle.frontend
    want = ([fe.n_freq, fe.n_frames], [fe.spectrum_bins])
    for name, declared, expected in zip(("spectrogram", "spectrum"), shapes, want, strict=True):
        for got, need in zip(declared[1:], expected, strict=False):
            if isinstance(got, int) and got != need:
                raise BundleError(
                    f"{bundle.path}: the model takes a {name} of shape {declared[1:]}, the "
                    f"manifest's front-end (window {fe.window_s:g} s) gives {expected}; "
                    "the bundle is inconsistent: re-export it"
                )


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
        self.windows = 0  # windows run through the engine (invalid ones never are)

    @property
    def backend(self) -> str:
        return self.engine.name

    def scorer(self, group: str | None = None, threshold: float | None = None) -> Scorer:
        """The scorer of one scoring group, with the bundle's threshold unless overridden."""
        g = self.bundle.group(group)
        value = g.threshold if threshold is None else float(threshold)
        if not math.isfinite(value):
            raise BundleError(f"threshold must be a finite number, got {value}")
        return Scorer(self.bundle.prototypes[g.start : g.stop], value)

    def score_batch(self, windows: np.ndarray, scorers: Sequence[Scorer]) -> list[Scored]:
        """Windows (B, L) of float audio, one scorer per row; timings are the batch's / B.

        A row that cannot be judged (runtime.audio.unjudgeable: NaN/inf, digital silence)
        never reaches the engine: its Scored has `invalid` set, a NaN score and no verdict.
        A batch of only such rows makes no engine call.
        """
        windows = np.asarray(windows, dtype=np.float32)
        if windows.ndim != 2 or windows.shape[0] == 0:
            raise AudioError(f"expected a batch of windows (B, L), got shape {windows.shape}")
        n = windows.shape[0]
        if len(scorers) != n:
            raise ValueError(f"{n} windows but {len(scorers)} scorers")
        check_length(windows, self.frontend)  # a wrong length is an error, even if silent
        reasons = [unjudgeable(w) for w in windows]
        valid = [i for i, why in enumerate(reasons) if not why]
        t0 = time.perf_counter()
        emb = None
        if valid:
            rows = windows if len(valid) == n else windows[valid]
            spec, spectrum = features(rows, self.frontend)
            t1 = time.perf_counter()
            emb = self.engine.embed(spec, spectrum)
            t2 = time.perf_counter()
            self.calls += 1
            self.windows += len(valid)
            if emb.shape != (len(valid), self.bundle.embedding_dim):
                raise BackendError(
                    f"the model gives embeddings {emb.shape}; the bundle's prototypes expect "
                    f"({len(valid)}, {self.bundle.embedding_dim})"
                )
        else:
            t1 = t2 = t0
        frontend_ms, inference_ms = 1e3 * (t1 - t0) / n, 1e3 * (t2 - t1) / n
        out: list[Scored | None] = [
            Scored(math.nan, False, scorers[i].threshold, frontend_ms, inference_ms, why)
            if why
            else None
            for i, why in enumerate(reasons)
        ]
        if emb is not None:
            at = {row: k for k, row in enumerate(valid)}  # batch row -> embedding row
            for scorer in {id(scorers[i]): scorers[i] for i in valid}.values():
                rows = [i for i in valid if scorers[i] is scorer]  # one group at once
                scores = scorer.score(emb[[at[i] for i in rows]])
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
        try:
            check_model_fits(bundle, engine)
            return cls(bundle, engine, group=group, threshold=threshold)
        except BaseException:
            engine.close()
            raise

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
        every row is judged by this detector's group. A window that cannot be judged
        (non-finite, digital silence) is not run through the model: its Scored has
        `invalid` set and a NaN score, never a verdict.
        """
        n = np.shape(windows)[0] if np.ndim(windows) == 2 else 0
        return self.shared.score_batch(windows, scorers or [self.scorer] * max(n, 1))

    def score_file(
        self, path: str | Path, *, downmix: bool = False, resample: bool = False
    ) -> FileResult:
        """A whole file, every window of it (see runtime.filescore)."""
        return score_file(
            path,
            self.frontend,
            self.threshold,
            lambda batch: [s.score for s in self.score_batch(batch)],
            downmix=downmix,
            resample=resample,
        )
