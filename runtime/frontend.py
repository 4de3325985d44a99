"""The one MSN front-end (numpy): waveform window -> (spectrogram, utterance spectrum).

Training, export parity checks and the edge runtime all call these functions, so the
features a model was trained on are exactly the features it sees in the field.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

from msn_edge.runtime.errors import AudioError


@dataclass(frozen=True)
class FrontendConfig:
    sample_rate: int = 16_000  # DCASE recordings are 16 kHz mono
    window_s: float = 10.0  # DCASE 2020 clips; 18.0 for DCASE 2023
    n_fft: int = 1024  # spec §1: STFT size = Hann window length
    hop: int = 512  # spec §1: 50 % overlap -> T = 313 frames for 10 s
    spectrum_fft_factor: int = 2  # reference: FFT of length 2L (zero-padded), half-bin spacing
    spectrum_max_hz: float = 4000.0  # reference: keep 0-4 kHz -> L/2 bins

    @property
    def window_samples(self) -> int:
        return int(round(self.window_s * self.sample_rate))

    @property
    def n_freq(self) -> int:
        return self.n_fft // 2 + 1

    @property
    def n_frames(self) -> int:
        return 1 + self.window_samples // self.hop  # centred STFT

    @property
    def spectrum_fft_len(self) -> int:
        return self.spectrum_fft_factor * self.window_samples

    @property
    def spectrum_bins(self) -> int:
        bins = int(round(self.spectrum_max_hz * self.spectrum_fft_len / self.sample_rate))
        return min(bins, self.spectrum_fft_len // 2 + 1)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> FrontendConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown front-end config fields: {sorted(unknown)}")
        return cls(**d)


def pcm_to_float(x: np.ndarray) -> np.ndarray:
    """Scale integer PCM to [-1, 1) float32; float input passes through as float32."""
    if x.dtype == np.int16:
        return x.astype(np.float32) / 32768.0
    if x.dtype == np.int32:
        # float32 rounds (2**31 - 1) / 2**31 up to 1.0; keep the range half-open.
        scaled = (x.astype(np.float64) / 2147483648.0).astype(np.float32)
        return np.minimum(scaled, np.nextafter(np.float32(1), np.float32(0)))
    if x.dtype == np.uint8:
        return (x.astype(np.float32) - 128.0) / 128.0
    if np.issubdtype(x.dtype, np.floating):
        return x.astype(np.float32, copy=False)
    raise AudioError(f"unsupported sample type {x.dtype}")


def fit_window(wave: np.ndarray, n_samples: int, offset: int = 0) -> np.ndarray:
    """Tile a short clip (repeat it) to length, truncate a long one; start at `offset`.

    Evaluation and the runtime use offset 0 so that results are deterministic; training
    may pass a random offset into the tiled clip (spec §1).
    """
    if wave.ndim != 1 or wave.size == 0:
        raise AudioError(f"expected a non-empty mono waveform, got shape {wave.shape}")
    offset %= wave.size
    if offset == 0 and wave.size >= n_samples:
        return wave[:n_samples]
    reps = -(-(offset + n_samples) // wave.size)
    return np.tile(wave, reps)[offset : offset + n_samples]


def _hann(n: int) -> np.ndarray:
    # Periodic Hann, as torch.hann_window(n) uses by default.
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)).astype(np.float32)


def spectrogram(window: np.ndarray, cfg: FrontendConfig) -> np.ndarray:
    """STFT magnitude (power 1), centred with reflect padding: (..., L) -> (..., F, T)."""
    window = np.asarray(window, dtype=np.float32)
    pad = cfg.n_fft // 2
    padded = np.pad(window, [(0, 0)] * (window.ndim - 1) + [(pad, pad)], mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, cfg.n_fft, axis=-1)[
        ..., :: cfg.hop, :
    ]  # (..., T, n_fft), a view: no copy until the window is applied
    mag = np.abs(np.fft.rfft(frames * _hann(cfg.n_fft), axis=-1))
    return np.swapaxes(mag, -1, -2).astype(np.float32)


def utterance_spectrum(window: np.ndarray, cfg: FrontendConfig) -> np.ndarray:
    """Magnitude of the whole window's FFT, zero-padded, low band only: (..., L) -> (..., S)."""
    window = np.asarray(window, dtype=np.float32)
    mag = np.abs(np.fft.rfft(window, n=cfg.spectrum_fft_len, axis=-1)[..., : cfg.spectrum_bins])
    return mag.astype(np.float32)


def check_length(window: np.ndarray, cfg: FrontendConfig) -> None:
    """A window (L,) or batch (B, L) has exactly the front-end's L samples."""
    if window.shape[-1] != cfg.window_samples:
        raise AudioError(
            f"window has {window.shape[-1]} samples, expected {cfg.window_samples} "
            f"({cfg.window_s:g} s at {cfg.sample_rate} Hz)"
        )


def features(window: np.ndarray, cfg: FrontendConfig) -> tuple[np.ndarray, np.ndarray]:
    """Both model inputs for one window (L,) or a batch (B, L) of exactly L samples."""
    check_length(window, cfg)
    return spectrogram(window, cfg), utterance_spectrum(window, cfg)
