"""Audio sources for the monitor: a file, raw PCM on stdin, or a live capture.

Every source hands out mono chunks at the bundle's sample rate (int16 from a device or
s16le stream, float32 from a file or a wider stream) and counts what it loses. Files
and stdin are read when the monitor asks (at its pace, so nothing can be lost). A live
capture (a device, see capture.py, or a paced file) runs in its own thread into a bounded
queue, so a slow window never stalls the device; when the queue is full
the newest audio is dropped and counted, never hidden, and the next chunk says that the
stream was broken before it.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO, Protocol

import numpy as np

from msn_edge.runtime.audio import AudioFile
from msn_edge.runtime.errors import AudioError, DeviceError
from msn_edge.runtime.pcm_stream import S16LE, read_exact, read_wav_header

log = logging.getLogger(__name__)

CHUNK_S = 0.1  # read size: small enough for a prompt stop, large enough to be cheap
QUEUE_S = 30.0  # live audio held while a window is scored; more is dropped and counted
POLL_S = 0.2  # how often a waiting read() looks for a stop request
CLOSE_S = 3.0  # how long close() waits for a capture thread stuck in a blocking read


@dataclass(frozen=True)
class Chunk:
    samples: np.ndarray  # int16 (n,) from a device or raw PCM, float32 from a file
    resumed: bool = False  # audio was lost just before this chunk: windows restart here


@dataclass
class SourceStats:
    overruns: int = 0  # episodes of lost audio: device overruns and full-queue drops
    dropped_samples: int = 0  # samples known to be lost (a device overrun's size is not)
    reconnects: int = 0  # times a vanished device was opened again


class Source:
    """A stream of mono chunks; `read()` returns None at its end or after `stop()`.

    Subclasses implement `_read()`; `read()` first hands back a chunk given to `unread()`.
    """

    channels = 1  # a multi-channel source gives chunks of (n, channels) frames

    def __init__(self, name: str, sample_rate: int) -> None:
        self.name = name
        self.sample_rate = sample_rate
        self.stats = SourceStats()
        self._stats_lock = threading.Lock()  # a capture thread updates stats
        self._stopping = False
        self._unread: Chunk | None = None
        self._idle: Callable[[], None] | None = None  # read()'s hook while nothing comes

    def snapshot(self) -> SourceStats:
        """A consistent copy of the counters, safe to take from any thread."""
        with self._stats_lock:
            return replace(self.stats)

    def read(self, idle: Callable[[], None] | None = None) -> Chunk | None:
        """The next chunk. `idle` is called while a live device has none to give (it is
        being reopened, say), so that a caller waiting here can still ping a watchdog."""
        if self._unread is not None and not self._stopping:
            chunk, self._unread = self._unread, None
            return chunk
        self._idle = idle
        return self._read()

    def _read(self) -> Chunk | None:
        raise NotImplementedError

    def unread(self, chunk: Chunk) -> None:
        """Give back the unused end of the last chunk: the next `read()` returns it.

        `monitor --enroll-first` enrolls an exact number of seconds; the rest of the chunk
        that ends them is the first audio monitored, not lost between the two.
        """
        if self._unread is not None:
            raise RuntimeError(f"{self.name}: one chunk at most can be given back")
        self._unread = chunk

    def stop(self) -> None:
        """Make `read()` return None soon. Only sets a flag: safe in a signal handler."""
        self._stopping = True

    @property
    def stopped(self) -> bool:
        """Whether `stop()` was called (a None from `read()` then is not the stream's end)."""
        return self._stopping

    def close(self) -> None:
        """Release the file, pipe or device."""

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def chunk_samples(sample_rate: int) -> int:
    return max(1, int(round(CHUNK_S * sample_rate)))


class FileSource(Source):
    """A WAV/FLAC file, read block by block (a day-long recording never sits in memory).

    Read by runtime.audio, the reader training and `score` use, so float, 24-bit and
    32-bit files give the same samples here as there (float32 chunks).
    """

    def __init__(self, path: str | Path, sample_rate: int) -> None:
        path = Path(path)
        super().__init__(str(path), sample_rate)
        self._file = AudioFile(path, expect_rate=sample_rate)
        if self._file.rate != sample_rate:
            got = f"{self._file.rate} Hz, {self._file.channels} channel(s)"
            self._file.close()
            raise AudioError(
                f"{path}: {got}; the bundle needs {sample_rate} Hz mono "
                f"(convert it, e.g. `sox IN -r {sample_rate} -c 1 OUT.wav`)"
            )
        self._chunk = chunk_samples(sample_rate)

    def _read(self) -> Chunk | None:
        if self._stopping:
            return None
        data = self._file.read(self._chunk)
        return Chunk(data) if data.size else None

    def close(self) -> None:
        self._file.close()


class RawPcmSource(Source):
    """Mono PCM from a byte stream: raw s16le (e.g. `arecord -t raw -f S16_LE -r 16000 -c 1 |`),
    or a WAV stream, recognised by its RIFF header (e.g. `sox in.flac -t wav - |`).

    A WAV header is parsed, never read as samples; its rate must be the bundle's.
    """

    def __init__(
        self, stream: BinaryIO, sample_rate: int, name: str = "stdin", *, owns: bool = False
    ) -> None:
        super().__init__(name, sample_rate)
        self._stream = stream
        self._owns = owns
        self._format = S16LE
        self._left: int | None = None  # data bytes still to come (None: to the end)
        self._carry = read_exact(stream, 12)  # bytes that wait for the rest of a frame
        if self._carry[:4] == b"RIFF" and self._carry[8:12] == b"WAVE":
            self._format, rate, self._left = read_wav_header(stream, name, self._carry)
            self._carry = b""
            if rate != sample_rate:
                raise AudioError(
                    f"{name}: WAV stream at {rate} Hz; the bundle needs {sample_rate} Hz "
                    f"(convert it, e.g. `sox IN -r {sample_rate} -c 1 -t wav -`)"
                )
        self._nbytes = self._format.width * chunk_samples(sample_rate)

    def _read(self) -> Chunk | None:
        width = self._format.width
        while not self._stopping:
            want = max(self._nbytes - len(self._carry), width)  # chunks stay CHUNK_S long
            if self._left is not None:
                want = min(want, self._left)
            data = self._stream.read(want) if want else b""
            if not data:  # end of stream (a pipe may also return short reads before it)
                if self._carry:
                    log.warning(
                        "%s: ended with %d byte(s) of an incomplete sample; ignored",
                        self.name,
                        len(self._carry),
                    )
                    self._carry = b""
                return None
            if self._left is not None:
                self._left -= len(data)
            data = self._carry + data
            whole = len(data) - len(data) % width
            self._carry = data[whole:]
            if whole:
                return Chunk(self._format.decode(data[:whole]))
        return None

    def close(self) -> None:
        if self._owns:
            self._stream.close()


class CaptureReader(Protocol):
    """One open capture (a device, or a paced file): `LiveSource` reopens it on failure."""

    overruns: int  # device overruns seen since it was opened

    def read(self) -> np.ndarray | None:
        """Block for the next int16 chunk; None only at the end of a finite stream.

        Raises DeviceError when the device fails or vanishes.
        """

    def close(self) -> None: ...


@dataclass(frozen=True)
class Backoff:
    first_s: float = 0.5  # a USB device re-enumerates within a second or two
    max_s: float = 30.0  # at most one retry log line per half minute while it is gone
    factor: float = 2.0

    def delays(self) -> Iterator[float]:
        delay = self.first_s
        while True:
            yield delay
            delay = min(delay * self.factor, self.max_s)


DEFAULT_BACKOFF = Backoff()
_END = object()  # queue sentinel: the capture ended


class LiveSource(Source):
    """Runs a CaptureReader in a thread; a vanished device is reopened with backoff.

    The first open happens here, in the caller's thread, so that a wrong name or format
    is an immediate error; only a device that worked and then failed is retried.
    """

    def __init__(
        self,
        name: str,
        sample_rate: int,
        open_reader: Callable[[], CaptureReader],
        *,
        queue_s: float = QUEUE_S,
        backoff: Backoff = DEFAULT_BACKOFF,
    ) -> None:
        super().__init__(name, sample_rate)
        self._open_reader = open_reader
        self._backoff = backoff
        self._reader = open_reader()
        self.channels = getattr(self._reader, "channels", 1)
        self._queue: queue.Queue = queue.Queue()  # bounded by samples, below
        self._capacity = max(1, math.ceil(queue_s * sample_rate))
        self._queued = 0  # samples in the queue
        self._queued_lock = threading.Lock()
        self._xruns_seen = 0  # the current reader's overruns already counted
        self._resume_next = False
        self._dropping = False  # inside one episode of full-queue drops
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._capture, name=f"capture {name}", daemon=True)
        self._thread.start()

    def _read(self) -> Chunk | None:
        while not self._stopping:
            try:
                item = self._queue.get(timeout=POLL_S)
            except queue.Empty:
                if self._idle is not None:
                    self._idle()
                continue
            if item is _END:
                return None
            if isinstance(item, BaseException):
                raise item
            with self._queued_lock:
                self._queued -= len(item.samples)
            return item
        return None

    def close(self) -> None:
        self._closing.set()
        self._thread.join(timeout=2 * POLL_S + CHUNK_S)
        if self._thread.is_alive():  # stuck in a blocking read: closing the reader ends it
            self._reader.close()
            self._thread.join(timeout=CLOSE_S)

    def _capture(self) -> None:
        final: object = _END
        try:
            while not self._closing.is_set():
                try:
                    samples = self._reader.read()
                except DeviceError as e:
                    if self._closing.is_set():
                        break
                    log.warning("%s: capture failed (%s); reopening", self.name, e)
                    self._reader.close()
                    if not self._reopen():
                        break
                    continue
                if samples is None:
                    break
                self._offer(samples)
        except BaseException as e:  # a bug, not a device fault: surface it in read()
            final = e
        finally:
            self._reader.close()
        self._queue.put(final)

    def _offer(self, samples: np.ndarray) -> None:
        frames = len(samples)  # samples per channel
        xruns = self._reader.overruns - self._xruns_seen
        if xruns:
            self._xruns_seen += xruns
            with self._stats_lock:
                self.stats.overruns += xruns
            self._resume_next = True
        with self._queued_lock:
            full = self._queued + frames > self._capacity
            if not full:
                self._queued += frames
        if full:
            if not self._dropping:
                with self._stats_lock:
                    self.stats.overruns += 1
                log.warning(
                    "%s: windows are scored slower than real time; dropping audio", self.name
                )
            self._dropping = True
            with self._stats_lock:
                self.stats.dropped_samples += frames
            self._resume_next = True
            return
        self._queue.put(Chunk(samples, resumed=self._resume_next))
        self._dropping = False
        self._resume_next = False

    def _reopen(self) -> bool:
        """Open the device again, waiting longer after each failure; False on close()."""
        delays = self._backoff.delays()
        tries = 0
        while not self._closing.wait(next(delays)):
            tries += 1
            try:
                self._reader = self._open_reader()
            except DeviceError as e:
                log.warning("%s: still unavailable (try %d: %s)", self.name, tries, e)
                continue
            log.info("%s: capture resumed (try %d)", self.name, tries)
            with self._stats_lock:
                self.stats.reconnects += 1
            self._xruns_seen = 0
            self._resume_next = True
            return True
        return False


class PacedReader:
    """Replays a file at real time, like a live microphone (`--realtime`)."""

    overruns = 0

    def __init__(self, source: FileSource) -> None:
        self._source = source
        self._t0: float | None = None
        self._sent = 0

    def read(self) -> np.ndarray | None:
        chunk = self._source.read()
        if chunk is None:
            return None
        if self._t0 is None:
            self._t0 = time.monotonic()
        self._sent += chunk.samples.size
        # A microphone delivers a chunk once its last sample has been recorded.
        delay = self._t0 + self._sent / self._source.sample_rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        return chunk.samples

    def close(self) -> None:
        self._source.close()


def open_input(path: str, sample_rate: int, *, realtime: bool = False) -> Source:
    """`--input`: a WAV/FLAC file; `-` for stdin; a FIFO or character device (/dev/zero)
    is read as a stream like stdin (raw s16le mono, or a WAV stream)."""
    if path == "-":
        if realtime:
            raise AudioError("--realtime paces files; stdin is already paced by its writer")
        return RawPcmSource(sys.stdin.buffer, sample_rate)
    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = 0
    if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode):
        if realtime:
            raise AudioError(f"--realtime paces files; {path} is a stream, paced by its writer")
        try:
            stream = open(path, "rb")  # noqa: SIM115 - the source owns and closes it
        except OSError as e:
            raise AudioError(f"{path}: cannot open ({e.strerror})") from None
        try:
            return RawPcmSource(stream, sample_rate, name=path, owns=True)
        except BaseException:
            stream.close()
            raise
    if realtime:
        return LiveSource(path, sample_rate, lambda: PacedReader(FileSource(path, sample_rate)))
    return FileSource(path, sample_rate)
