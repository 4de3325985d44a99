"""The DCASE 2020 Task 2 autoencoder baseline, as a yardstick for MSN (not part of the product).

The challenge's baseline (Koizumi et al., DCASE 2020 Task 2): log-mel spectrogram
(128 bands, n_fft 1024, hop 512, power 2), 5 consecutive frames stacked into a
640-d vector, a dense autoencoder 640 -> 128x4 -> 8 -> 128x4 -> 640 (each hidden layer
Linear -> BatchNorm -> ReLU), MSE, Adam lr 1e-3, batch 512. One model per machine type
(all its IDs), trained on the normal training clips; a clip's anomaly score is the
mean reconstruction error over its vectors. Epochs: 50, as the issue that asked for
this yardstick measured it (the challenge's script says 100; its validation loss is
flat long before).

The mel filter bank is written here (Slaney scale and area normalisation, librosa's
defaults) rather than pulling librosa and numba into the benchmark's dependencies.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from msn_edge.datasets import Clip, load_wave
from msn_edge.runtime.frontend import FrontendConfig, spectrogram


@dataclass(frozen=True)
class AEConfig:
    n_mels: int = 128  # baseline
    frames: int = 5  # consecutive frames per vector
    hidden: int = 128
    hidden_layers: int = 4  # on each side of the bottleneck
    bottleneck: int = 8
    epochs: int = 50
    batch_size: int = 512
    lr: float = 1e-3
    seed: int = 0


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    lin = f / (200.0 / 3)
    log_part = 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / (np.log(6.4) / 27.0)
    return np.where(f >= 1000.0, log_part, lin)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    return np.where(m >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27.0) * (m - 15.0)), m * 200.0 / 3)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """Triangular filters on the Slaney mel scale, area-normalised: (n_mels, n_fft//2+1)."""
    fft_hz = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    edges = _mel_to_hz(np.linspace(0.0, _hz_to_mel(sample_rate / 2), n_mels + 2))
    lower = (fft_hz[None, :] - edges[:-2, None]) / np.diff(edges)[:-1, None]
    upper = (edges[2:, None] - fft_hz[None, :]) / np.diff(edges)[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return weights.astype(np.float32)


def clip_vectors(wave: np.ndarray, fe: FrontendConfig, cfg: AEConfig, bank: np.ndarray):
    """The baseline's 5-frame log-mel vectors of one clip: (T - frames + 1, n_mels*frames)."""
    power = spectrogram(wave, fe) ** 2  # (F, T)
    log_mel = 10.0 * np.log10(bank @ power + np.finfo(np.float32).eps)  # 20/power * log10
    t = log_mel.shape[1] - cfg.frames + 1
    return np.concatenate([log_mel[:, j : j + t] for j in range(cfg.frames)], axis=0).T


def _autoencoder(dim: int, cfg: AEConfig) -> nn.Module:
    def block(i: int, o: int) -> list[nn.Module]:
        return [nn.Linear(i, o), nn.BatchNorm1d(o), nn.ReLU()]

    layers: list[nn.Module] = []
    sizes = [dim] + [cfg.hidden] * cfg.hidden_layers + [cfg.bottleneck]
    for i, o in zip(sizes, sizes[1:], strict=False):
        layers += block(i, o)
    sizes = [cfg.bottleneck] + [cfg.hidden] * cfg.hidden_layers
    for i, o in zip(sizes, sizes[1:], strict=False):
        layers += block(i, o)
    layers.append(nn.Linear(cfg.hidden, dim))
    return nn.Sequential(*layers)


class AutoencoderBaseline:
    """Fit one autoencoder per machine type on normal training clips; score test clips."""

    def __init__(self, cfg: AEConfig | None = None, fe: FrontendConfig | None = None):
        self.cfg, self.fe = cfg or AEConfig(), fe or FrontendConfig()
        cfg, fe = self.cfg, self.fe
        self.bank = mel_filterbank(fe.sample_rate, fe.n_fft, cfg.n_mels)
        self.models: dict[str, nn.Module] = {}
        self.train_seconds = 0.0

    def _vectors(self, clip: Clip) -> np.ndarray:
        return clip_vectors(load_wave(clip, self.fe), self.fe, self.cfg, self.bank)

    def fit(self, clips: Sequence[Clip]) -> AutoencoderBaseline:
        t0 = time.perf_counter()
        by_type: dict[str, list[Clip]] = defaultdict(list)
        for c in clips:
            by_type[c.machine_type].append(c)
        for machine_type, mine in sorted(by_type.items()):
            x = torch.from_numpy(np.concatenate([self._vectors(c) for c in mine]))
            torch.manual_seed(self.cfg.seed)
            model = _autoencoder(x.shape[1], self.cfg)
            opt = torch.optim.Adam(model.parameters(), lr=self.cfg.lr)
            gen = torch.Generator().manual_seed(self.cfg.seed)
            model.train()
            for _ in range(self.cfg.epochs):
                order = torch.randperm(len(x), generator=gen)
                for i in range(0, len(x), self.cfg.batch_size):
                    batch = x[order[i : i + self.cfg.batch_size]]
                    if len(batch) < 2:  # BatchNorm cannot train on one vector
                        continue
                    loss = ((model(batch) - batch) ** 2).mean()
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            self.models[machine_type] = model.eval()
        self.train_seconds = time.perf_counter() - t0
        return self

    @torch.no_grad()
    def score(self, clips: Sequence[Clip]) -> np.ndarray:
        """Mean squared reconstruction error of each clip (higher = more anomalous)."""
        out = []
        for c in clips:
            x = torch.from_numpy(self._vectors(c))
            err = ((self.models[c.machine_type](x) - x) ** 2).mean()
            out.append(float(err))
        return np.asarray(out)
