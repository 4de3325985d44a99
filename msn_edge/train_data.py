"""Training data: the normal clips of the data roots, decoded once, served mixed or smoothed.

Every random choice of a clip (offset, speed, mixup partner and λ, smoothing factor) is
drawn from a generator seeded by (seed, epoch, clip index), so a run is the same with any
number of DataLoader workers (training.py runs the loop).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from msn_edge.auxiliary import play_at_speed
from msn_edge.config import TrainConfig
from msn_edge.datasets import Clip, load_wave, scan
from msn_edge.runtime.errors import DatasetError
from msn_edge.runtime.frontend import FrontendConfig, features, fit_window


def training_clips(roots: Sequence[Path]) -> list[Clip]:
    """The split=="train", label=="normal" clips of every root (what MSN learns from)."""
    clips = []
    for root in roots:
        found = [c for c in scan(Path(root), split="train") if c.label == "normal"]
        if not found:
            raise DatasetError(f"{root}: no normal training clips found")
        clips += found
    return clips


def load_waves(clips: Sequence[Clip], frontend: FrontendConfig, progress: bool) -> list:
    """Every clip decoded once and kept in memory (a 10 s clip is 640 KB)."""
    bar = tqdm(clips, desc="reading audio", unit="clip", disable=not progress, leave=False)
    return [load_wave(c, frontend) for c in bar]


class MixupSet(Dataset):
    """Waveforms in memory -> (spectrogram, spectrum, soft target), mixed or smoothed.

    A share `mixup_prob` of clips is mixed at the waveform level with a random partner
    (any class): λ·a + (1−λ)·b, λ ~ Beta(α, α), target λ·y_a + (1−λ)·y_b. The rest get
    label smoothing (1−ε)·y + ε/C with ε ~ U(0, label_smoothing_max). The numpy
    front-end runs here, in the DataLoader workers.
    """

    def __init__(
        self,
        waves: Sequence[np.ndarray],
        labels: Sequence[int],
        n_classes: int,
        frontend: FrontendConfig,
        train: TrainConfig,
    ):
        self.waves = list(waves)
        self.labels = np.asarray(labels)
        self.n_classes = n_classes
        self.frontend = frontend
        self.train = train
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.waves)

    def _window(self, i: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        """A window of clip i, and its label: with `speed_classes`, the clip is played
        at a speed drawn uniformly from (1, *speeds), each speed a class of its own."""
        wave, label = self.waves[i], int(self.labels[i])
        speeds = self.train.speed_classes
        k = int(rng.integers(len(speeds) + 1)) if speeds else 0
        if k:
            wave = play_at_speed(wave, speeds[k - 1])
            n_real = self.n_classes // (len(speeds) + 1)
            label = n_real + label * len(speeds) + k - 1
        offset = int(rng.integers(wave.size)) if self.train.random_offset else 0
        return fit_window(wave, self.frontend.window_samples, offset), label

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng((self.train.seed, self.epoch, i))
        target = np.zeros(self.n_classes, dtype=np.float32)
        window, label = self._window(i, rng)
        if rng.random() < self.train.mixup_prob:
            j = int(rng.integers(len(self)))
            lam = rng.beta(self.train.mixup_alpha, self.train.mixup_alpha)
            partner, label_j = self._window(j, rng)
            window = lam * window + (1 - lam) * partner
            target[label] += lam
            target[label_j] += 1 - lam
        else:
            eps = rng.uniform(0, self.train.label_smoothing_max)
            target += eps / self.n_classes
            target[label] += 1 - eps
        spec, spectrum = features(window.astype(np.float32), self.frontend)
        return torch.from_numpy(spec), torch.from_numpy(spectrum), torch.from_numpy(target)
