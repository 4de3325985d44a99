"""Enrollment audio in, embeddings out: windows of a machine's normal running.

A feed draws windows lazily from files, a folder, stdin or a live device, and records
where each came from (its segment and start), so that calibration can tell windows that
share audio from windows that do not. Windows the monitor would flag as silent or
clipped are left out and counted: they are not the machine's normal sound.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from msn_edge.runtime.audio import read_audio
from msn_edge.runtime.engines import Engine
from msn_edge.runtime.errors import AudioError, MsnEdgeError
from msn_edge.runtime.events import input_level
from msn_edge.runtime.frontend import FrontendConfig, features, fit_window, pcm_to_float
from msn_edge.runtime.prototypes import unit_rows
from msn_edge.runtime.sources import Chunk, RawPcmSource, Source
from msn_edge.runtime.windower import Windower

log = logging.getLogger(__name__)

BATCH = 8  # windows per engine call: the TensorRT engines' largest batch
AUDIO_SUFFIXES = (".wav", ".flac")
PROGRESS_S = 60.0  # a log line per this much audio read


@dataclass(frozen=True)
class AudioWindow:
    samples: np.ndarray  # float32 (L,) in [-1, 1)
    segment: int  # windows of different segments (files, unbroken stretches) share no audio
    start: int  # first sample, counted within the stream or file


@dataclass
class FeedStats:
    samples: int = 0  # audio read
    files: int = 0
    tiled: int = 0  # files shorter than a window, tiled to one (as training and `score` do)
    gaps: int = 0  # breaks in a live stream (overruns, a device that came back)
    ended: bool = False  # the stream ended before the audio asked for
    stopped: bool = False  # ... because it was told to stop (SIGINT / SIGTERM)


@dataclass
class Feed:
    """Windows of a machine's normal running, drawn lazily; `stats` fills as they are."""

    description: str  # for the audit record: "file x.wav", "folder d/ (12 files)", ...
    windows: Iterator[AudioWindow]
    sample_rate: int
    stats: FeedStats = field(default_factory=FeedStats)

    @property
    def seconds(self) -> float:
        return self.stats.samples / self.sample_rate


def audio_files(folder: Path) -> list[Path]:
    """The WAV/FLAC files of a folder (not its sub-folders), sorted by name."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES)
    if not files:
        raise AudioError(f"{folder}: no .wav or .flac files in the folder")
    return files


def file_feed(
    paths: list[Path],
    frontend: FrontendConfig,
    hop: int,
    *,
    max_seconds: float | None = None,
    description: str | None = None,
) -> Feed:
    """Windows of audio files, one segment per file, in the given order.

    A file shorter than one window is tiled to one, as training tiles short clips; a
    longer one gives a window every `hop` samples.
    """
    if not paths:
        raise AudioError("no audio files to enroll")
    stats = FeedStats()
    size, rate = frontend.window_samples, frontend.sample_rate
    budget = None if max_seconds is None else int(round(max_seconds * rate))

    def windows() -> Iterator[AudioWindow]:
        for segment, path in enumerate(paths):
            if budget is not None and stats.samples >= budget:
                return
            wave = read_audio(path, rate)
            cut = budget is not None and wave.size > budget - stats.samples
            if cut:
                wave = wave[: budget - stats.samples]
            stats.samples += wave.size
            stats.files += 1
            if wave.size < size and not cut:
                stats.tiled += 1
                yield AudioWindow(fit_window(wave, size), segment, 0)
                continue
            for start in range(0, wave.size - size + 1, hop):
                yield AudioWindow(wave[start : start + size], segment, start)

    if description is None:
        description = f"file {paths[0]}" if len(paths) == 1 else f"{len(paths)} files"
    return Feed(description, windows(), rate, stats)


def source_feed(
    source: Source,
    frontend: FrontendConfig,
    hop: int,
    *,
    max_seconds: float | None = None,
    tick: Callable[[], None] | None = None,
) -> Feed:
    """Windows of a stream (stdin, a device) until it ends, is stopped, or `max_seconds`.

    A break in the stream (an overrun, a device that came back) starts a new segment, as
    in the monitor: no window straddles a gap. The audio of the last chunk beyond
    `max_seconds` goes back to the source (`Source.unread`), for whoever reads on.
    `tick` is called after every chunk and while a live device has none to give, e.g.
    while it is reopened (`monitor --enroll-first`: the watchdog ping).
    """
    stats = FeedStats()
    rate = frontend.sample_rate
    if source.sample_rate != rate:
        raise AudioError(f"{source.name}: {source.sample_rate} Hz, the bundle needs {rate} Hz")
    budget = None if max_seconds is None else int(round(max_seconds * rate))

    def windows() -> Iterator[AudioWindow]:
        windower = Windower(frontend.window_samples, hop)
        segment = 0
        while budget is None or windower.position < budget:
            chunk = source.read(idle=tick)  # a device being reopened gives no chunks
            if tick is not None:
                tick()
            if chunk is None:
                stats.ended, stats.stopped = True, source.stopped
                return
            samples = chunk.samples
            if budget is not None and len(samples) > budget - windower.position:
                samples = samples[: budget - windower.position]
                source.unread(Chunk(chunk.samples[len(samples) :]))
            if chunk.resumed:
                windower.reset()
                segment += 1
                stats.gaps += 1
            ready = windower.push(samples)
            stats.samples = windower.position
            for w in ready:
                yield AudioWindow(pcm_to_float(w.samples), segment, w.start)

    return Feed(source.name, windows(), rate, stats)


def open_feed(input_path: str, frontend: FrontendConfig, hop: int, max_seconds: float | None):
    """`--input`: a WAV/FLAC file, a folder of them, or `-` for raw s16le mono on stdin."""
    if input_path == "-":
        feed = source_feed(
            RawPcmSource(sys.stdin.buffer, frontend.sample_rate),
            frontend,
            hop,
            max_seconds=max_seconds,
        )
        feed.description = "stdin"
        return feed
    path = Path(input_path)
    if path.is_dir():
        files = audio_files(path)
        return file_feed(
            files,
            frontend,
            hop,
            max_seconds=max_seconds,
            description=f"folder {path} ({len(files)} files)",
        )
    return file_feed([path], frontend, hop, max_seconds=max_seconds)


@dataclass
class Embedded:
    emb: np.ndarray  # (N, D) unit rows, in the order the windows came
    segments: np.ndarray  # (N,) int
    starts: np.ndarray  # (N,) int
    silent: int  # windows left out
    clipped: int
    processing_s: float  # front-end + engine


def _int16(window: np.ndarray) -> np.ndarray:
    return np.clip(np.round(window * 32768.0), -32768, 32767).astype(np.int16)


def embed_feed(engine: Engine, frontend: FrontendConfig, feed: Feed, *, batch: int = BATCH):
    """Embed every window that is neither silent nor clipped (the monitor's health rules)."""
    rows, segments, starts, pending = [], [], [], []
    silent = clipped = 0
    processing = 0.0
    next_log = PROGRESS_S

    def flush() -> None:
        nonlocal processing
        if not pending:
            return
        t = time.perf_counter()
        spec, spectrum = features(np.stack([w.samples for w in pending]), frontend)
        emb = engine.embed(spec, spectrum)
        processing += time.perf_counter() - t
        if emb.shape[0] != len(pending) or not np.isfinite(emb).all():
            raise MsnEdgeError(f"the {engine.name} engine gave unusable embeddings {emb.shape}")
        rows.append(unit_rows(emb))
        segments.extend(w.segment for w in pending)
        starts.extend(w.start for w in pending)
        pending.clear()

    for w in feed.windows:
        level = input_level(_int16(w.samples))
        silent += level.silent
        clipped += level.clipped and not level.silent
        if not (level.silent or level.clipped):
            pending.append(w)
            if len(pending) == batch:
                flush()
        if feed.seconds >= next_log:
            log.info("enrolling: %.0f s of audio read, %d windows", feed.seconds, len(segments))
            next_log += PROGRESS_S
    flush()
    emb = np.concatenate(rows) if rows else np.zeros((0, 0), np.float32)
    return Embedded(emb, np.asarray(segments), np.asarray(starts), silent, clipped, processing)
