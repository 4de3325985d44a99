"""Small configs and data sets that keep the training tests fast on 2 CPU cores."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from msn_edge.config import Config, preset, with_recipe
from msn_edge.runtime.frontend import FrontendConfig
from msn_edge.synth import synthesize

WINDOW_S = 2.5  # 79 frames: room for the tiny preset's widest box (64 frames)
CLIP_S = 2.0  # shorter than the window: clips are tiled, as real short clips are
# The spectrum branch's strides are sized for 80 000 bins; 2.5 s gives 20 000.
SPECTRUM_CONVS = ((64, 16), (32, 8), (16, 2))


def small_config(**train) -> Config:
    """The tiny preset on 2.5 s windows with the paper's recipe (epochs count exactly:
    no minimum of steps, no speed classes), with train overrides (epochs, ...)."""
    tiny = with_recipe(preset("tiny"), "paper")
    fe = FrontendConfig(window_s=WINDOW_S)
    model = replace(tiny.model, spectrum_convs=SPECTRUM_CONVS).for_frontend(fe)
    defaults = {"epochs": 1, "batch_size": 8}
    return replace(
        tiny, frontend=fe, model=model, train=replace(tiny.train, **{**defaults, **train})
    )


def synth_set(
    out: Path,
    *,
    kinds=("fan",),
    ids: int = 2,
    n_train: int = 6,
    n_test: int = 4,
    seconds: float = CLIP_S,
) -> Path:
    """A DCASE 2020 layout data set of synthetic clips (short unless `seconds` says)."""
    synthesize(
        out,
        seed=0,
        kinds=kinds,
        ids_per_kind=ids,
        n_train=n_train,
        n_test_normal=n_test,
        n_test_anomaly=n_test,
        seconds=seconds,
    )
    return out
