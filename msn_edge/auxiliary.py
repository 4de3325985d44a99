"""Classes to train on, and auxiliary classes when a data set has too few (issue 7).

MSN learns its embedding by telling classes apart; with one class the Sub-cluster AdaCos
loss is identically zero (msn_edge.loss) and the network learns nothing. Yet one machine
is the common case. So when fewer than `TrainConfig.min_classes` classes are found we add
- synthetic machines (msn_edge.synth), SYNTH_IDS of each kind: other machines to tell
  apart;
- pseudo-classes made from the machine's own clips played slightly slower or faster
  (±3 %, ±6 %: resampling shifts pitch and tempo together, as a change of running speed
  does). Telling the machine from its slightly detuned copies makes the embedding
  sensitive to fine frequency structure, which is what most faults change. Each copy is
  scaled back to its source's RMS, so that loudness never identifies a class.
  Chosen by measurement (MIMII fan ID 00, tiny preset, 20 epochs, AUC over 3 seeds):
  these four 0.98; ±3 % with a gentle spectral tilt and EQ 0.91; ±10 % with a strong
  tilt and a +10 dB band 0.76. Coarse changes are learnt, and then nothing more is.
Auxiliary clips train the network only; prototypes are fit on the real clips alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from scipy.signal import resample_poly

from msn_edge.config import Config
from msn_edge.datasets import Clip
from msn_edge.runtime.errors import DatasetError

log = logging.getLogger(__name__)

AUX_MODES = ("transforms", "both", "synth", "none")
AUX_PREFIX = "aux"  # class names aux/transform/<name>, aux/synth/<kind>/id_XX
MAX_RATIO_DENOMINATOR = 100  # resampling ratios as small fractions (polyphase filter size)
SYNTH_IDS = 2  # synthetic machines per kind
# Not a seed `synthesize` defaults to: an auxiliary machine is never the user's own
# synthetic machine (which would make two classes of one).
SYNTH_MACHINE_SEED = 7919


def play_at_speed(wave: np.ndarray, factor: float) -> np.ndarray:
    """`wave` played `factor` times as fast (resampling shifts pitch and tempo together),
    at the RMS of `wave` so that loudness never tells a speed class (float32)."""
    ratio = Fraction(factor).limit_denominator(MAX_RATIO_DENOMINATOR)
    out = resample_poly(wave.astype(np.float64), ratio.denominator, ratio.numerator)
    rms_in, rms_out = np.sqrt(np.mean(np.square(wave, dtype=np.float64))), np.sqrt(np.mean(out**2))
    if rms_out > 0:
        out *= rms_in / rms_out
    return out.astype(np.float32)


def _speed(factor: float) -> Callable[[np.ndarray, int], np.ndarray]:
    return lambda x, sr: play_at_speed(x, factor)


def speed_class_names(real: Sequence[str], speeds: Sequence[float]) -> list[str]:
    """Names of the self-supervised speed classes, class-major: label
    len(real) + i·len(speeds) + k is class i played at speeds[k]."""
    return [f"{name}@speed_{f:.2f}" for name in real for f in speeds]


# name -> f(wave, sample_rate); each is one pseudo-class.
TRANSFORMS: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {
    f"speed_{f:.2f}": _speed(f) for f in (0.94, 0.97, 1.03, 1.06)
}


@dataclass
class ClassPlan:
    """What training classifies: class names in label order, and the items to train on."""

    classes: list[str]
    labels: list[int]  # label of each real clip, in the order given
    auxiliary: dict | None  # recorded in the checkpoint; None when nothing was added
    extra_waves: list[np.ndarray]  # auxiliary training clips (never used for prototypes)
    extra_labels: list[int]


def transform_clip(name: str, wave: np.ndarray, sample_rate: int) -> np.ndarray:
    """One pseudo-class transform of a clip, scaled back to the clip's RMS (float32)."""
    out = np.asarray(TRANSFORMS[name](wave.astype(np.float64), sample_rate))
    rms_in, rms_out = np.sqrt(np.mean(wave**2)), np.sqrt(np.mean(out**2))
    if rms_out > 0:
        out *= rms_in / rms_out
    return out.astype(np.float32)


def _synth_items(
    n_per_class: int, config: Config, rng: np.random.Generator
) -> tuple[list[str], list[list[np.ndarray]]]:
    """SYNTH_IDS machines of every synthetic kind, n_per_class window-long clips each."""
    from msn_edge.synth import KINDS, machine_clip

    fe = config.frontend
    names, waves = [], []
    for kind in KINDS:
        for mid in range(SYNTH_IDS):
            names.append(f"{AUX_PREFIX}/synth/{kind}/id_{mid:02d}")
            waves.append(
                [
                    machine_clip(
                        kind,
                        mid,
                        rng,
                        seconds=fe.window_s,
                        sample_rate=fe.sample_rate,
                        machine_seed=SYNTH_MACHINE_SEED,
                    )
                    for _ in range(n_per_class)
                ]
            )
    return names, waves


def build_classes(
    clips: Sequence[Clip], waves: Sequence[np.ndarray], config: Config, *, aux: str = "transforms"
) -> ClassPlan:
    """Classes from `Clip.class_name`; auxiliary ones added when fewer than min_classes.

    `waves` are the clips' decoded waveforms (the transforms start from them). `aux`
    says what may be added: "transforms", "both", "synth" or "none" (then too few
    classes is an error). Transforms alone are the default: adding synthetic machines
    did not help on MIMII fan (see the module docstring's measurement).
    """
    if aux not in AUX_MODES:
        raise ValueError(f"aux must be one of {AUX_MODES}, got {aux!r}")
    if not clips:
        raise DatasetError("no normal training clips to train on")
    real = sorted({c.class_name for c in clips})
    index = {name: i for i, name in enumerate(real)}
    labels = [index[c.class_name] for c in clips]
    need = config.train.min_classes
    speeds = config.train.speed_classes
    if speeds:
        # Every class at every speed: enough classes whatever the data; the training set
        # draws the speeds on the fly (msn_edge.train_data.MixupSet).
        if aux in ("synth", "both"):
            raise DatasetError(
                f"--aux {aux} adds synthetic machines to the paper's recipe; this config "
                "trains with speed classes (train.speed_classes), which need none: use "
                "--aux transforms, or --recipe paper"
            )
        info = {"mode": "speed_classes", "speeds": list(speeds), "real_classes": real}
        return ClassPlan(real + speed_class_names(real, speeds), labels, info, [], [])
    if len(real) >= need:
        return ClassPlan(real, labels, None, [], [])
    found = f"{len(real)} class{'es' if len(real) != 1 else ''} ({', '.join(real)})"
    if aux == "none":
        raise DatasetError(
            f"found {found} in the training data, at least {need} are needed for the "
            "classification loss to learn anything; add data roots of other machines, "
            "or allow auxiliary classes (--aux transforms|both|synth)"
        )
    rng = np.random.default_rng(config.train.seed)
    sr = config.frontend.sample_rate
    names: list[str] = []
    groups: list[list[np.ndarray]] = []
    sources: dict[str, str] = {}
    if aux in ("both", "transforms"):
        for t in TRANSFORMS:
            names.append(f"{AUX_PREFIX}/transform/{t}")
            groups.append([transform_clip(t, w, sr) for w in waves])
            sources[names[-1]] = "transform"
    if aux in ("both", "synth"):
        # As many clips per synthetic machine as the real data has per class: the
        # classes stay balanced.
        s_names, s_waves = _synth_items(max(1, len(clips) // len(real)), config, rng)
        names += s_names
        groups += s_waves
        sources.update(dict.fromkeys(s_names, "synth"))
    classes = real + names
    extra_waves = [w for g in groups for w in g]
    extra_labels = [len(real) + i for i, g in enumerate(groups) for _ in g]
    info = {
        "mode": aux,
        "reason": f"found {found}, at least {need} needed",
        "real_classes": real,
        "classes": {
            n: {"source": sources[n], "n_clips": len(g)} for n, g in zip(names, groups, strict=True)
        },
    }
    log.warning(
        "found %s; adding %d auxiliary classes (%s) for training only, never for prototypes",
        found,
        len(names),
        aux,
    )
    return ClassPlan(classes, labels, info, extra_waves, extra_labels)
