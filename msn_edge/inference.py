"""Embedding clips with a trained torch MSN, the way evaluation and scoring see them.

Every clip is cut with offset 0 (spec §1), so an embedding, and with it a score, is the
same on every run; the front-end is the runtime's numpy one, as on the edge.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from msn_edge.datasets import Clip, load_wave
from msn_edge.model import MSN
from msn_edge.runtime.frontend import FrontendConfig, features, fit_window


def embed_clips(
    model: MSN,
    clips_or_waves: Sequence[Clip | np.ndarray],
    frontend: FrontendConfig,
    *,
    device: str = "cpu",
    batch_size: int = 16,
    progress: bool = False,
) -> np.ndarray:
    """Unit-length embeddings (N, D) float32 of clips (read from disk) or float32 waveforms.

    The model is moved to `device` and runs in eval mode (BatchNorm running statistics,
    not batch ones); it is put back in the mode it came in.
    """
    n = len(clips_or_waves)
    out = np.empty((n, model.cfg.embedding_dim), dtype=np.float32)
    was_training = model.training
    model.to(device).eval()
    bar = tqdm(total=n, desc="embedding", unit="clip", disable=not progress, leave=False)
    try:
        with torch.inference_mode():
            for lo in range(0, n, batch_size):
                batch = clips_or_waves[lo : lo + batch_size]
                windows = np.stack([_window(item, frontend) for item in batch])
                spec, spectrum = features(windows, frontend)
                emb = model(
                    torch.from_numpy(spec).to(device), torch.from_numpy(spectrum).to(device)
                )
                out[lo : lo + len(batch)] = F.normalize(emb.float(), dim=1).cpu().numpy()
                bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    return out


def _window(item: Clip | np.ndarray, frontend: FrontendConfig) -> np.ndarray:
    wave = item if isinstance(item, np.ndarray) else load_wave(item, frontend)
    return fit_window(wave, frontend.window_samples, offset=0)
