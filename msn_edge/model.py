"""The Multi-scale Scanning Network (Zhang, Liu, Li), as in msn-spec §2, in one file.

Reads like the paper: the blocks (modified SE, residual block), then the three branches
(spectrogram, utterance spectrum, multi-scale scanning), then `MSN`, which fuses them
into the 256-d embedding. Every width and count comes from `ModelConfig`.
"""

from __future__ import annotations

import torch
from torch import nn

from msn_edge.config import ModelConfig

# Added before the log of a magnitude: below the quantisation floor of 16-bit audio
# (~3e-4 for a Hann window of 1024), so only digital silence reaches it.
LOG_FLOOR = 1e-5


def box_starts(size: int, box: int, n_positions: int) -> list[int]:
    """Start offsets of one box side along an axis of `size` (spec §2c).

    step = max(1, floor((size - box) / (n - 1))), and the last start is clamped to
    size - box so that the boxes always reach the edge. Training and the export rewrite
    both place boxes with this one function.
    """
    if not 0 < box <= size:
        raise ValueError(f"box of {box} does not fit an axis of {size}")
    if n_positions == 1:
        return [size - box]
    step = max(1, (size - box) // (n_positions - 1))
    starts = [min(i * step, size - box) for i in range(n_positions)]
    starts[-1] = size - box
    return starts


class AxisGate(nn.Module):
    """Sigmoid gate along one axis of (B, C, F, T): mean over the others, two 1x1 convs."""

    def __init__(self, axis: int, size: int, reduction: int):
        super().__init__()
        self.axis = axis
        hidden = max(1, size // reduction)
        self.fc = nn.Sequential(
            nn.Conv1d(size, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv1d(hidden, size, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        others = [d for d in (1, 2, 3) if d != self.axis]
        s = x.mean(dim=others).unsqueeze(-1)  # (B, size, 1)
        s = self.fc(s).squeeze(-1)  # (B, size)
        shape = [x.shape[0], 1, 1, 1]
        shape[self.axis] = x.shape[self.axis]
        return s.view(shape)


class ModifiedSE(nn.Module):
    """y = x + x*s_freq + x*s_time + x*s_chan (paper Table 1's modified SE)."""

    def __init__(self, channels: int, n_freq: int, n_frames: int, reduction: int):
        super().__init__()
        self.chan = AxisGate(1, channels, reduction)
        self.freq = AxisGate(2, n_freq, reduction)
        self.time = AxisGate(3, n_frames, reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (1 + self.freq(x) + self.time(x) + self.chan(x))


class ResBlock(nn.Module):
    """conv3x3 -> BN -> ReLU -> conv3x3, plus shortcut; no activation after the sum.

    A strided block's shortcut is max-pool then 1x1 conv (reference), so the skip path
    keeps the strongest response instead of sampling every other bin.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False),
            nn.BatchNorm2d(c_out),
        )
        shortcut: list[nn.Module] = []
        if stride > 1:
            shortcut.append(nn.MaxPool2d(stride, stride, ceil_mode=True))
        if c_in != c_out:
            shortcut.append(nn.Conv2d(c_in, c_out, 1, bias=False))
        self.shortcut = nn.Sequential(*shortcut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


def _conv_out(n: int, kernel: int, stride: int, pad: int) -> int:
    return (n + 2 * pad - kernel) // stride + 1


def _ceil_half(n: int) -> int:
    return _conv_out(n, 3, 2, 1)


class SpectrogramBranch(nn.Module):
    """Modified ResNet with frequency/time/channel SE over the mean-removed spectrogram."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        f, t = cfg.n_freq, cfg.n_frames
        c = cfg.spec_stem_channels
        r = cfg.se_reduction
        layers: list[nn.Module] = [ModifiedSE(1, f, t, r)]
        f, t = _conv_out(f, 7, 2, 3), _conv_out(t, 7, 2, 3)
        layers += [nn.Conv2d(1, c, 7, 2, 3, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
        f, t = _ceil_half(f), _ceil_half(t)
        layers += [nn.MaxPool2d(3, 2, 1), ModifiedSE(c, f, t, r)]
        layers += [ResBlock(c, c), ModifiedSE(c, f, t, r), ResBlock(c, c)]
        for c_out in cfg.spec_stage_channels:
            f, t = _ceil_half(f), _ceil_half(t)
            layers += [ResBlock(c, c_out, 2), ModifiedSE(c_out, f, t, r), ResBlock(c_out, c_out)]
            c = c_out
        self.net = nn.Sequential(*layers)
        self.out_dim = c

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        x = self.net(spec.unsqueeze(1))  # (B, C, F', T')
        return x.amax(dim=(2, 3))  # (B, C): global max-pool


class SpectrumBranch(nn.Module):
    """Conv1d stack over the utterance spectrum, then an MLP (paper Table 2)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        convs: list[nn.Module] = []
        c_in, n = 1, cfg.spectrum_bins
        for kernel, stride in cfg.spectrum_convs:
            convs += [nn.Conv1d(c_in, cfg.spectrum_channels, kernel, stride), nn.ReLU(inplace=True)]
            c_in, n = cfg.spectrum_channels, _conv_out(n, kernel, stride, 0)
        self.convs = nn.Sequential(*convs)
        mlp: list[nn.Module] = []
        d_in, d = c_in * n, cfg.spectrum_dim
        for _ in range(cfg.spectrum_mlp_layers):
            mlp += [nn.Linear(d_in, d), nn.BatchNorm1d(d), nn.ReLU(inplace=True)]
            d_in = d
        mlp.append(nn.Linear(d_in, d))
        self.mlp = nn.Sequential(*mlp)

    def forward(self, spectrum: torch.Tensor) -> torch.Tensor:
        x = self.convs(spectrum.unsqueeze(1))  # (B, C, n)
        return self.mlp(x.flatten(1))  # (B, spectrum_dim)


class PatchEncoder(nn.Module):
    """The small CNN shared by every box: the N patches of a box are its input channels."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c = cfg.scan_stem_channels
        layers: list[nn.Module] = [
            nn.Conv2d(cfg.n_patches, c, 3, 2, 1, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(inplace=True),
        ]
        for c_out, stride in zip(cfg.scan_block_channels, cfg.scan_block_strides, strict=True):
            layers.append(ResBlock(c, c_out, stride))
            c = c_out
        self.net = nn.Sequential(*layers)
        self.out_dim = 2 * c

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        x = self.net(patches)  # (B, C, h', w'), spatial size depends on the box
        # Stats-pooling: mean || std over space absorbs the box's size.
        mean = x.mean(dim=(2, 3))
        std = (x.var(dim=(2, 3), unbiased=False) + 1e-5).sqrt()
        return torch.cat([mean, std], dim=1)  # (B, 2C)


class ScanningBranch(nn.Module):
    """Multi-scale scanning: K boxes, each cut into N patches, one shared encoder."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.boxes = [(h, w) for h in cfg.box_heights for w in cfg.box_widths]
        self.starts = [
            (
                box_starts(cfg.n_freq, h, cfg.n_freq_positions),
                box_starts(cfg.n_frames, w, cfg.n_time_positions),
            )
            for h, w in self.boxes
        ]
        self.encoder = PatchEncoder(cfg)
        self.head = nn.Sequential(
            nn.Linear(cfg.n_boxes * self.encoder.out_dim, cfg.scan_hidden),
            nn.ReLU(inplace=True),
            nn.Linear(cfg.scan_hidden, cfg.branch_dim),
        )

    def patches(self, spec: torch.Tensor, k: int) -> torch.Tensor:
        """The N patches of box k, stacked as channels, frequency-major: (B, N, h, w).

        The plain way (unfold views, then index); export/ rewrites this as strided gathers.
        """
        (h, w), (f_starts, t_starts) = self.boxes[k], self.starts[k]
        f_idx = torch.tensor(f_starts, device=spec.device)
        t_idx = torch.tensor(t_starts, device=spec.device)
        x = spec.unfold(1, h, 1)[:, f_idx]  # (B, N_f, T, h)
        x = x.unfold(2, w, 1)[:, :, t_idx]  # (B, N_f, N_t, h, w)
        return x.flatten(1, 2)

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        codes = [self.encoder(self.patches(spec, k)) for k in range(len(self.boxes))]
        return self.head(torch.cat(codes, dim=1))  # (B, branch_dim)


def prepare_inputs(
    spec: torch.Tensor, spectrum: torch.Tensor, cfg: ModelConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """The branches' inputs from the front-end's magnitudes (in the graph, so exported).

    `input_scale` "log" compresses both magnitudes (a fault 30 dB below a shaft tone is
    then a visible number, not a rounding error next to it); "linear" is the paper's;
    "log-spectrogram" compresses the spectrogram only. The utterance spectrum stays linear
    there: its 80 000 log bins are mostly noise floor, whose fine structure the spectrum
    branch learns instead of the machine (MIMII fan: AUC 0.50 with a log spectrum, 1.00
    with a log spectrogram alone; benchmarks/results-ablation.md).
    The spectrogram then loses its per-frequency mean over time (reference), if asked.
    """
    if cfg.input_scale in ("log", "log-spectrogram"):
        spec = torch.log(spec + LOG_FLOOR)
    if cfg.input_scale == "log":
        spectrum = torch.log(spectrum + LOG_FLOOR)
    if cfg.center_spectrogram:
        spec = spec - spec.mean(dim=2, keepdim=True)
    return spec, spectrum


class MSN(nn.Module):
    """Spectrogram + scanning branches fused, joined with the spectrum branch: (B, 256)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.spectrogram = SpectrogramBranch(cfg)
        self.spectrum = SpectrumBranch(cfg)
        self.scanning = ScanningBranch(cfg)
        fused = self.spectrogram.out_dim + cfg.branch_dim
        self.fusion = nn.Sequential(
            nn.BatchNorm1d(fused),
            nn.Linear(fused, cfg.fusion_hidden),
            nn.Linear(cfg.fusion_hidden, cfg.spectrogram_embed_dim),
        )

    def forward(self, spec: torch.Tensor, spectrum: torch.Tensor) -> torch.Tensor:
        # spec: (B, F, T) magnitude; spectrum: (B, S) utterance spectrum magnitude.
        spec, spectrum = prepare_inputs(spec, spectrum, self.cfg)  # scaled, spec centred
        a = self.spectrogram(spec)  # (B, C_last): 256 in the full model
        c = self.scanning(spec)  # (B, branch_dim)
        spec_emb = self.fusion(torch.cat([a, c], dim=1))  # (B, spectrogram_embed_dim)
        b = self.spectrum(spectrum)  # (B, spectrum_dim)
        return torch.cat([b, spec_emb], dim=1)  # (B, embedding_dim), not yet normalised


def count_macs(model: MSN, *, per_branch: bool = False) -> int | dict[str, int]:
    """Multiply-accumulates of one window, from forward hooks on conv and linear layers
    (conv: taps x outputs, linear: inputs x outputs). With `per_branch`, a dict: each
    top-level part of the model (spectrogram, spectrum, scan, ...) -> its MACs."""
    cfg = model.cfg
    totals = {name: 0 for name, _ in model.named_children()}
    handles = []
    for name, part in model.named_children():

        def hook(module: nn.Module, _inp, out: torch.Tensor, name: str = name) -> None:
            if isinstance(module, nn.Conv2d | nn.Conv1d):
                k = module.weight[0].numel()  # c_in/groups * kernel area
                totals[name] += k * out.numel()
            elif isinstance(module, nn.Linear):
                totals[name] += module.in_features * out.numel()

        handles += [m.register_forward_hook(hook) for m in part.modules()]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, cfg.n_freq, cfg.n_frames), torch.zeros(1, cfg.spectrum_bins))
    model.train(was_training)
    for h in handles:
        h.remove()
    return totals if per_branch else sum(totals.values())
