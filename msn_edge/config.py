"""All settings of a run in dataclasses, with the presets `dcase2020`, `dcase2023`, `tiny`.

A checkpoint stores `Config.to_dict()`; loading rebuilds exactly this object, so nothing
about a trained model is re-derived from defaults that may have changed since.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from msn_edge.runtime.frontend import FrontendConfig
from msn_edge.runtime.prototypes import CALIBRATION_FRACTION, N_CLUSTERS, THRESHOLD_QUANTILE

INPUT_SCALES = ("linear", "log", "log-spectrogram")
LOSSES = ("sub-cluster-adacos", "adaproj")  # classification heads, msn_edge.loss


@dataclass(frozen=True)
class ModelConfig:
    # Inputs, fixed by the front-end (see ModelConfig.for_frontend).
    n_freq: int = 513  # STFT bins for n_fft 1024
    n_frames: int = 313  # 10 s at hop 512, centred
    spectrum_bins: int = 80_000  # 0-4 kHz of a 2L-point FFT of a 10 s window
    # a. Spectrogram branch (paper Table 1).
    spec_stem_channels: int = 16  # conv 7x7 s2, and the first stage's width
    spec_stage_channels: tuple[int, ...] = (32, 64, 128, 256)  # one stride-2 stage each
    se_reduction: int = 1  # reference: gates keep their full width
    # b. Spectrum branch (paper Table 2): (kernel, stride) of each Conv1d.
    spectrum_convs: tuple[tuple[int, int], ...] = ((256, 64), (64, 32), (32, 4))
    spectrum_channels: int = 128
    spectrum_mlp_layers: int = 4  # Linear -> BN -> ReLU blocks after flatten
    spectrum_dim: int = 128
    # c. Multi-scale scanning branch (paper §2.4).
    box_heights: tuple[int, ...] = (32, 64, 128, 256)  # frequency bins (reference adds 500)
    box_widths: tuple[int, ...] = (16, 32, 64)  # frames
    n_freq_positions: int = 8  # N_f: the paper's "F_step 8"
    n_time_positions: int = 32  # N_t: the paper's "T_step 32"
    scan_stem_channels: int = 32  # conv 3x3 s2 over the N stacked patches
    scan_block_channels: tuple[int, ...] = (64, 128, 128, 128)  # reference (paper: 32, 64)
    scan_block_strides: tuple[int, ...] = (2, 2, 2, 1)
    scan_hidden: int = 1024  # K x 256 -> hidden -> branch_dim
    # d. Fusion.
    branch_dim: int = 256  # spectrogram and scanning branch outputs
    fusion_hidden: int = 1024
    spectrogram_embed_dim: int = 128  # + spectrum_dim = the 256-d embedding
    # Inputs (msn_edge.model.prepare_inputs): "linear" magnitudes (paper), "log" for both
    # branches, or "log-spectrogram" (log spectrogram, linear utterance spectrum); the
    # spectrogram's per-frequency mean over time removed (reference) or kept.
    input_scale: str = "linear"
    center_spectrogram: bool = True

    @property
    def n_boxes(self) -> int:
        return len(self.box_heights) * len(self.box_widths)

    @property
    def n_patches(self) -> int:
        return self.n_freq_positions * self.n_time_positions

    @property
    def embedding_dim(self) -> int:
        return self.spectrum_dim + self.spectrogram_embed_dim

    def for_frontend(self, frontend: FrontendConfig) -> ModelConfig:
        """The same network sized for the front-end's input shapes."""
        return replace(
            self,
            n_freq=frontend.n_freq,
            n_frames=frontend.n_frames,
            spectrum_bins=frontend.spectrum_bins,
        )


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 100  # paper
    batch_size: int = 64  # paper
    lr: float = 1e-3  # paper, Adam
    # Classification head (msn_edge.loss): the paper's Sub-cluster AdaCos, or AdaProj's
    # class subspaces; `sub_clusters` is then each subspace's dimension.
    loss: str = "sub-cluster-adacos"
    sub_clusters: int = 16  # Sub-cluster AdaCos weight vectors per class
    mixup_alpha: float = 0.2  # lambda ~ Beta(alpha, alpha)
    mixup_prob: float = 0.5  # share of clips mixed with a random partner; the rest smoothed
    label_smoothing_max: float = 0.5  # smoothing factor ~ Uniform(0, max) for unmixed clips
    random_offset: bool = True  # random start inside the tiled clip (spec §1)
    seed: int = 0
    num_workers: int = 0  # DataLoader workers computing the numpy front-end
    amp: bool = True  # mixed precision, on CUDA only
    min_classes: int = 2  # fewer real classes -> auxiliary classes are added (issue 7)
    feature_exchange: bool = False  # FeatEx self-supervised classes (msn_edge.training)
    # Self-supervised: every class also played at these speeds, each a class of its own
    # (msn_edge.auxiliary.speed_classes); () = the paper's classes only.
    speed_classes: tuple[float, ...] = ()
    min_steps: int = 0  # optimizer steps at least, whatever the data size: epochs grow


@dataclass(frozen=True)
class ScoringConfig:
    # Defaults shared with `msn-edge enroll` (runtime/prototypes.py has their reasons).
    n_clusters: int = N_CLUSTERS  # k-means prototypes per group on source-domain embeddings
    calibration_fraction: float = CALIBRATION_FRACTION  # train clips held out for calibration
    threshold_quantile: float = THRESHOLD_QUANTILE  # of held-out normal scores


@dataclass(frozen=True)
class Config:
    preset: str = "dcase2020"
    frontend: FrontendConfig = field(default_factory=FrontendConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)

    def __post_init__(self) -> None:
        fe, m = self.frontend, self.model
        if (m.n_freq, m.n_frames, m.spectrum_bins) != (
            fe.n_freq,
            fe.n_frames,
            fe.spectrum_bins,
        ):
            raise ValueError("model input sizes do not match the front-end; use for_frontend()")
        if max(m.box_heights) > m.n_freq or max(m.box_widths) > m.n_frames:
            raise ValueError("a scanning box is larger than the spectrogram")
        if m.input_scale not in INPUT_SCALES:
            raise ValueError(f"input_scale must be one of {INPUT_SCALES}, not {m.input_scale!r}")
        if self.train.loss not in LOSSES:
            raise ValueError(f"train.loss must be one of {LOSSES}, not {self.train.loss!r}")
        if any(not 0.5 <= f <= 2.0 or f == 1.0 for f in self.train.speed_classes):
            raise ValueError("speed classes must lie in [0.5, 2] and differ from 1")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        return cls(
            preset=d["preset"],
            frontend=FrontendConfig.from_dict(d["frontend"]),
            model=_build(ModelConfig, d["model"]),
            train=_build(TrainConfig, d["train"]),
            scoring=_build(ScoringConfig, d["scoring"]),
        )


def _build(cls, d: dict):
    """Dataclass from a dict, turning JSON lists back into the tuples the fields declare."""
    known = {f.name for f in fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")

    def tup(v):
        return tuple(tup(x) for x in v) if isinstance(v, list | tuple) else v

    return cls(**{k: tup(v) for k, v in d.items()})


# How a model is trained, apart from its size. The dataclass defaults are the paper's
# recipe; the presets train with DEFAULT_RECIPE. Measured in benchmarks/
# results-accuracy.md (three seeds) and results-ablation.md:
#   paper          synth 60.9, synth-shift 58.4, MIMII fan 96.8; int8 loses 5-11 points
#   log-speed      68.5 / 63.8 / 48.7: the log utterance spectrum fails on the real fan
#   logspec-speed  64.3 / 61.9 / 100.0; int8 within 0.5-2 points: ahead of the paper's
#                  recipe on every set, hence the default
# Which suits a machine is a measurement: `python benchmarks/accuracy.py --data DATA`.
# Each class also at ±3 % and ±6 % speed: telling a machine from its slightly detuned self
# keeps the embedding from collapsing within a class. No mixup: blends of two machines
# teach little once speed classes set a finer task. At least 120 optimizer steps: 10 clips
# of one machine in batches of 32 would otherwise make one step an epoch (MIMII fan: 20
# steps, AUC 80 against 98).
_SPEED_TRAINING = {"speed_classes": (0.94, 0.97, 1.03, 1.06), "mixup_prob": 0.0, "min_steps": 120}
RECIPES: dict[str, dict[str, dict]] = {
    "paper": {
        "model": {"input_scale": "linear", "center_spectrogram": True},
        "train": {
            "loss": "sub-cluster-adacos",
            "speed_classes": (),
            "mixup_prob": 0.5,
            "feature_exchange": False,
            "min_steps": 0,
        },
    },
    # Log magnitudes with the level of each band kept: a fault that adds a steady band of
    # energy is visible; the paper's centred linear input removes it.
    "log-speed": {
        "model": {"input_scale": "log", "center_spectrogram": False},
        "train": _SPEED_TRAINING,
    },
    # As log-speed, but the utterance spectrum stays linear: with a log spectrum the
    # spectrum branch learns the noise floor's fine structure (MIMII fan AUC ~0.5; log
    # spectrogram alone 1.0, log spectrum alone 0.49: results-ablation.md).
    "logspec-speed": {
        "model": {"input_scale": "log-spectrogram", "center_spectrogram": False},
        "train": _SPEED_TRAINING,
    },
    # As logspec-speed, with AdaProj's class subspaces instead of Sub-cluster AdaCos'
    # points (msn_edge.loss): clips may spread inside their class, so the embedding keeps
    # the detail that faults change. Twice the steps: a subspace takes longer to settle.
    "logspec-adaproj": {
        "model": {"input_scale": "log-spectrogram", "center_spectrogram": False},
        "train": {**_SPEED_TRAINING, "loss": "adaproj", "min_steps": 240},
    },
}
DEFAULT_RECIPE = "logspec-speed"


def with_recipe(config: Config, name: str) -> Config:
    """`config` trained the way recipe `name` says (sizes and other settings kept)."""
    try:
        recipe = RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}") from None
    base = RECIPES["paper"]  # every field a recipe may set, at the paper's value first
    return replace(
        config,
        model=replace(config.model, **{**base["model"], **recipe["model"]}),
        train=replace(config.train, **{**base["train"], **recipe["train"]}),
    )


def _make(name: str, frontend: FrontendConfig, model: ModelConfig, **train) -> Config:
    config = Config(
        preset=name,
        frontend=frontend,
        model=model.for_frontend(frontend),
        train=TrainConfig(**train),
    )
    return with_recipe(config, DEFAULT_RECIPE)


_TINY_MODEL = ModelConfig(
    spec_stem_channels=8,
    spec_stage_channels=(16, 32, 32, 64),
    se_reduction=4,
    spectrum_channels=32,
    spectrum_mlp_layers=2,
    spectrum_dim=64,
    box_heights=(32, 128),
    box_widths=(16, 64),
    n_freq_positions=4,
    n_time_positions=8,
    scan_stem_channels=16,
    scan_block_channels=(32, 32, 32, 32),
    scan_hidden=128,
    branch_dim=64,
    fusion_hidden=128,
    spectrogram_embed_dim=64,
)

PRESETS = {
    "dcase2020": lambda: _make("dcase2020", FrontendConfig(window_s=10.0), ModelConfig()),
    "dcase2023": lambda: _make("dcase2023", FrontendConfig(window_s=18.0), ModelConfig()),
    # Same code, small widths and 4 boxes of 32 patches: trains on 2 CPU cores in minutes.
    "tiny": lambda: _make(
        "tiny", FrontendConfig(window_s=10.0), _TINY_MODEL, epochs=20, batch_size=32
    ),
}


def preset(name: str) -> Config:
    """The named preset's full config."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def training_config(
    preset_name: str | None = None,
    *,
    resume_from: Path | None = None,
    recipe: str | None = None,
    **train_overrides,
) -> Config:
    """What `msn-edge train` runs with: the preset (dcase2020 if none is named), or when
    resuming without a preset the run's own config (its checkpoint's); then `recipe` and
    each train setting of `train_overrides` that is not None (epochs, batch_size, ...)."""
    if resume_from is not None and preset_name is None:
        from msn_edge.checkpoint import read_checkpoint  # torch: only to resume

        config = Config.from_dict(read_checkpoint(resume_from)["config"])
    else:
        config = preset(preset_name or "dcase2020")
    if recipe:
        config = with_recipe(config, recipe)
    given = {k: v for k, v in train_overrides.items() if v is not None}
    return replace(config, train=replace(config.train, **given))
