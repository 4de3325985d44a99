"""The one audio reader: training, `score`, `evaluate` and the monitor's file source.

Every path that turns a file into samples comes through here, so a file means the same
samples everywhere: float32 mono, integer PCM scaled by its full scale (int16 / 2**15,
int24 and int32 / 2**31; FLAC alike), float PCM as stored. soundfile does the decoding.
A file whose header promises more audio than it holds (a truncated copy) is an error, not
a shorter clip. This module also owns the policy for audio that cannot be judged
(`unjudgeable`) and the health levels events report (`level`).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from msn_edge.runtime.errors import AudioError

INT16_FULL_SCALE = 32768.0
SILENT_DBFS = -70.0  # a working microphone's noise floor is above this; a dead one is not
FLOOR_DBFS = -90.3  # one int16 LSB: the lowest peak reported
CLIP_LEVEL = 32767.0 / 32768.0  # int16 full scale, as float
CLIP_FRACTION = 0.001  # more than 0.1 % of samples at full scale: the gain is too high
# Below half an int16 LSB every sample is 0 in 16-bit audio: no signal at all to judge.
DIGITAL_SILENCE = 0.5 / INT16_FULL_SCALE
MAX_RESAMPLE_S = 3600.0  # --resample converts a file in memory: an hour at most
_RIFF_PROBE = 1 << 16  # bytes of a WAV header searched for its data chunk


@dataclass(frozen=True)
class Level:
    peak_dbfs: float  # finite samples only, floored at one int16 LSB (-90.3 dBFS)
    silent: bool  # peak below SILENT_DBFS: a dead or muted input (health flag)
    clipped: bool  # more than CLIP_FRACTION of samples at or beyond full scale


def level(samples: np.ndarray) -> Level:
    """Health of a float window in [-1, 1): how loud it peaks, silent, clipped."""
    mag = np.abs(np.asarray(samples, dtype=np.float32))
    finite = mag[np.isfinite(mag)]
    peak = float(finite.max()) if finite.size else 0.0
    peak_dbfs = max(20.0 * math.log10(max(peak, 1e-12)), FLOOR_DBFS)
    clipped = np.count_nonzero(finite >= CLIP_LEVEL) > CLIP_FRACTION * max(mag.size, 1)
    return Level(round(peak_dbfs, 1), peak_dbfs < SILENT_DBFS, bool(clipped))


def unjudgeable(samples: np.ndarray) -> str | None:
    """Why a window cannot be given a verdict, or None if it can.

    Non-finite samples (NaN, inf) have no spectrum; digital silence (every sample below
    half an int16 LSB: a disconnected input or a muted stream) has nothing to judge.
    Quiet audio above that is judged and flagged `silent`; clipped audio is judged and
    flagged `clipped`.
    """
    samples = np.asarray(samples)
    finite = np.isfinite(samples)
    if not finite.all():
        return f"non-finite samples (NaN or inf): {samples.size - int(finite.sum())}"
    if samples.size == 0 or float(np.abs(samples).max()) < DIGITAL_SILENCE:
        return "digital silence (every sample is zero)"
    return None


def _no_such(path: Path) -> AudioError:
    if path.is_dir():
        return AudioError(f"{path}: is a directory, expected an audio file")
    if path.exists():
        return AudioError(
            f"{path}: not a regular file (`monitor --input` reads pipes and devices as streams)"
        )
    return AudioError(f"{path}: no such file")


def _wav_shortfall(path: Path) -> tuple[int, int] | None:
    """(declared, present) data bytes when a RIFF/WAVE header promises more than the file holds.

    libsndfile shortens such a file silently; a truncated copy must not pass for a clip.
    A data size of 0 or 0xFFFFFFFF is a streaming writer's "unknown length", not a promise.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(_RIFF_PROBE)
            size = f.seek(0, 2)
    except OSError:
        return None
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    pos = 12
    while pos + 8 <= len(head):
        chunk, n = head[pos : pos + 4], struct.unpack("<I", head[pos + 4 : pos + 8])[0]
        if chunk == b"data":
            present = size - (pos + 8)
            if n not in (0, 0xFFFFFFFF) and n > present:
                return n, present
            return None
        pos += 8 + n + (n & 1)
    return None


def _convert_hint(flag: str | None, sample_rate: int) -> str:
    if flag:
        return f"pass {flag} to convert it"
    return f"convert it, e.g. `sox IN -r {sample_rate} -c 1 OUT.wav`"


class AudioFile:
    """One audio file opened and checked; `read(n)` gives float32 mono blocks.

    Channels other than one are an error unless `downmix` (average them). The caller
    decides what another sample rate means (`rate` holds the file's).
    `flags=True` names the --downmix/--resample options in errors (only `score` has them).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        downmix: bool = False,
        flags: bool = False,
        expect_rate: int | None = None,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise _no_such(self.path)
        short = _wav_shortfall(self.path)
        if short is not None:
            raise AudioError(
                f"{self.path}: truncated: the header declares {short[0]} bytes of audio, the "
                f"file holds {short[1]} (copy it again, or repair the header, e.g. with sox)"
            )
        try:
            self._file = sf.SoundFile(str(self.path))
        except (sf.LibsndfileError, RuntimeError, ValueError, TypeError) as e:
            raise AudioError(f"{self.path}: not readable audio ({e})") from None
        self.rate = self._file.samplerate
        self.channels = self._file.channels
        self.frames = self._file.frames
        self._read = 0
        if self.channels != 1 and not downmix:
            self._file.close()
            hint = _convert_hint("--downmix" if flags else None, expect_rate or 16000)
            raise AudioError(f"{self.path}: {self.channels} channels, expected mono ({hint})")

    def read(self, n: int) -> np.ndarray:
        """Up to n frames as float32 mono; an empty array at the end of the file."""
        try:
            data = self._file.read(n, dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError, ValueError) as e:
            raise AudioError(f"{self.path}: not readable audio ({e})") from None
        self._read += data.shape[0]
        if data.shape[0] < n and self.frames > 0 and self._read < self.frames:
            raise AudioError(
                f"{self.path}: truncated: the header declares {self.frames} frames, "
                f"the file holds {self._read}"
            )
        wave = data[:, 0] if data.shape[1] == 1 else data.mean(axis=1)
        return np.ascontiguousarray(wave, dtype=np.float32)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> AudioFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_audio(
    path: str | Path,
    sample_rate: int = 16_000,
    *,
    downmix: bool = False,
    resample: bool = False,
    flags: bool = False,
) -> np.ndarray:
    """Read a whole clip as float32 mono at `sample_rate` (see the module for the scaling).

    Another rate or channel count is an error unless the caller opts in to converting it,
    because silently resampled audio is a different signal than the model was trained on.
    Non-finite samples are returned as they are: `unjudgeable` is the caller's check.
    """
    with AudioFile(path, downmix=downmix, flags=flags, expect_rate=sample_rate) as f:
        if f.rate != sample_rate and not resample:
            hint = _convert_hint("--resample" if flags else None, sample_rate)
            raise AudioError(
                f"{f.path}: sample rate {f.rate} Hz, expected {sample_rate} Hz ({hint})"
            )
        if f.rate != sample_rate and f.frames > MAX_RESAMPLE_S * f.rate:
            raise AudioError(
                f"{f.path}: {f.frames / f.rate:.0f} s is too long to resample in memory "
                f"(at most {MAX_RESAMPLE_S:.0f} s); convert it first, e.g. "
                f"`sox IN -r {sample_rate} OUT.wav`"
            )
        wave = f.read(max(f.frames, 0)) if f.frames > 0 else np.zeros(0, np.float32)
        rate = f.rate
    if wave.size == 0:
        raise AudioError(f"{Path(path)}: the file holds no samples")
    if rate != sample_rate:
        wave = resample_fft(wave, rate, sample_rate, where=str(path))
    return wave


def read_clip(path: str | Path, sample_rate: int) -> np.ndarray:
    """A training / evaluation clip: as read_audio, and non-finite or silent is an error.

    One NaN in a training clip makes every loss after it NaN; a data set is checked for
    that before training (`msn-edge datasets --check`) and every load checks it again.
    """
    wave = read_audio(path, sample_rate)
    reason = unjudgeable(wave)
    if reason is not None and not reason.startswith("digital silence"):
        raise AudioError(f"{Path(path)}: unusable clip: {reason}")
    return wave


def resample_fft(
    wave: np.ndarray, rate_in: int, rate_out: int, *, where: str = "audio"
) -> np.ndarray:
    """Band-limited resampling by FFT (numpy only: scipy is not part of the edge footprint)."""
    n_out = int(round(wave.size * rate_out / rate_in))
    if n_out < 2:
        raise AudioError(f"{where}: {wave.size} sample(s) at {rate_in} Hz is too short to resample")
    spectrum = np.fft.rfft(wave)
    keep = min(spectrum.size, n_out // 2 + 1)
    out = np.fft.irfft(spectrum[:keep], n=n_out) * (n_out / wave.size)
    return out.astype(np.float32)
