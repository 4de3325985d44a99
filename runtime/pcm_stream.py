"""PCM on a byte stream (stdin, a FIFO): how its samples are laid out, and its WAV header.

A stream cannot seek, so its header is parsed as it arrives, chunk by chunk, with a cap
on what may come before the data; soundfile (audio.py) reads files instead.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from msn_edge.runtime.errors import AudioError


@dataclass(frozen=True)
class PcmFormat:
    """How frames on a byte stream are laid out (mono)."""

    width: int  # bytes per sample
    kind: str  # "int" or "float"

    def decode(self, data: bytes) -> np.ndarray:
        """int16 stays int16 (scaled later, like a device's); wider PCM becomes float32."""
        if self.kind == "float":
            return np.frombuffer(data, dtype="<f4").astype(np.float32)
        if self.width == 2:
            return np.frombuffer(data, dtype="<i2").astype(np.int16)
        if self.width == 3:  # 24-bit: place the three bytes high in an int32
            b = np.frombuffer(data, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
            ints = (b[:, 0] << 8) | (b[:, 1] << 16) | (b[:, 2] << 24)
            return (ints.astype(np.float64) / 2147483648.0).astype(np.float32)
        ints = np.frombuffer(data, dtype="<i4")
        return (ints.astype(np.float64) / 2147483648.0).astype(np.float32)


S16LE = PcmFormat(2, "int")
_WAV_FORMATS = {(1, 2): S16LE, (1, 3): PcmFormat(3, "int"), (1, 4): PcmFormat(4, "int")}
_WAV_FORMATS[(3, 4)] = PcmFormat(4, "float")
_MAX_HEADER = 1 << 20  # bytes of WAV chunks before `data` that a stream may carry


def read_exact(stream: BinaryIO, n: int) -> bytes:
    out = b""
    while len(out) < n:
        data = stream.read(n - len(out))
        if not data:
            break
        out += data
    return out


def read_wav_header(stream: BinaryIO, name: str, head: bytes) -> tuple[PcmFormat, int, int | None]:
    """Parse a WAV header from a stream whose first 12 bytes (`head`) said RIFF/WAVE.

    Returns the sample format, the rate and the data size in bytes (None: unknown, as
    streaming writers such as `sox ... -t wav -` leave it). Reads up to the data chunk.
    """
    fmt = None
    skipped = 0
    while True:
        hdr = read_exact(stream, 8)
        if len(hdr) < 8:
            raise AudioError(f"{name}: the WAV stream ends inside its header")
        chunk, size = hdr[:4], struct.unpack("<I", hdr[4:])[0]
        if chunk == b"data":
            break
        if size > _MAX_HEADER - skipped:
            raise AudioError(f"{name}: WAV header chunk '{chunk!r}' of {size} bytes is too large")
        body = read_exact(stream, size + (size & 1))
        skipped += len(body)
        if chunk == b"fmt ":
            if len(body) < 16:
                raise AudioError(f"{name}: WAV 'fmt ' chunk is too short")
            tag, channels, rate = struct.unpack("<HHI", body[:8])
            bits = struct.unpack("<H", body[14:16])[0]
            if tag == 0xFFFE and len(body) >= 26:  # WAVE_FORMAT_EXTENSIBLE: the real tag
                tag = struct.unpack("<H", body[24:26])[0]
            fmt = (tag, channels, rate, bits)
    if fmt is None:
        raise AudioError(f"{name}: WAV stream has no 'fmt ' chunk before its data")
    tag, channels, rate, bits = fmt
    pcm = _WAV_FORMATS.get((tag, bits // 8)) if bits % 8 == 0 else None
    if pcm is None or channels != 1:
        raise AudioError(
            f"{name}: WAV stream of format {tag}, {bits}-bit, {channels} channel(s); "
            "a stream must be mono 16/24/32-bit PCM or 32-bit float"
        )
    return pcm, rate, None if size in (0, 0xFFFFFFFF) else size
