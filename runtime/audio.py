"""Reading audio files with one clear error per problem (soundfile does the decoding)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from msn_edge.runtime.errors import AudioError


def read_audio(
    path: str | Path,
    sample_rate: int = 16_000,
    *,
    downmix: bool = False,
    resample: bool = False,
) -> np.ndarray:
    """Read a clip as float32 mono in [-1, 1) at `sample_rate`.

    Another rate or channel count is an error unless the caller opts in to converting it,
    because silently resampled audio is a different signal than the model was trained on.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: no such file")
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError) as e:
        raise AudioError(f"{path}: not readable audio ({e})") from None
    if data.shape[0] == 0:
        raise AudioError(f"{path}: the file holds no samples")
    if data.shape[1] != 1:
        if not downmix:
            raise AudioError(
                f"{path}: {data.shape[1]} channels, expected mono (pass --downmix to average them)"
            )
        data = data.mean(axis=1, keepdims=True)
    wave = data[:, 0]
    if rate != sample_rate:
        if not resample:
            raise AudioError(
                f"{path}: sample rate {rate} Hz, expected {sample_rate} Hz "
                "(pass --resample to convert it)"
            )
        wave = resample_fft(wave, rate, sample_rate)
    return np.ascontiguousarray(wave, dtype=np.float32)


def resample_fft(wave: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Band-limited resampling by FFT (numpy only: scipy is not part of the edge footprint)."""
    n_out = int(round(wave.size * rate_out / rate_in))
    spectrum = np.fft.rfft(wave)
    keep = min(spectrum.size, n_out // 2 + 1)
    out = np.fft.irfft(spectrum[:keep], n=n_out) * (n_out / wave.size)
    return out.astype(np.float32)
