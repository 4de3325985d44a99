"""The MSN rewritten for export: the scanning loop becomes a few strided gathers per box.

Training cuts each box into N = N_f x N_t patches with unfold views and indexing, which
exports to per-element index tables (GatherND) or, written as a loop, to a slice per
patch. Here the patches of all boxes come from two gathers along whole axes, with index
vectors computed once from the box geometry (`box_starts`, as training places boxes):

1. per box height h: gather the N_f frequency runs [f_i, f_i + h) of the spectrogram
   (rows of T contiguous floats) and transpose once to (B, N_f, T, h);
2. per box: gather the N_t time runs [t_j, t_j + w) along the T axis, each a contiguous
   run of h floats, which gives (B, N_f, N_t * w, h), already the stacked patch tensor
   (B, N, w, h) in training's frequency-major patch order, with no further copy.

The patches come out transposed, (w, h) instead of (h, w), so the shared patch encoder's
kernels are transposed once here instead of transposing the data per box; every op after
the stem is symmetric in the two spatial axes (square max-pools, stats-pooling over both).

Layouts measured on the whole dcase2020 model, ONNX Runtime 1.32 CPU, 2 threads, on a
2-core AMD EPYC (Zen 4, AVX-512) VM shared with other jobs; per window, fastest wall time / median
CPU time (thread spinning off):
  unfold + index (the training code exported as is)             2922 ms / 1775 ms
  (T, F) spectrogram; per box: gather time rows, slices, concat    79 ms /   85 ms
  gathers to (B, N_t, w, N_f, h) and the stem as a Conv3d          87 ms /   95 ms
  this layout: two gathers, 2-D stem in ONNX Runtime's NCHWc       71 ms /   79 ms
  eager PyTorch (training module), for comparison                 384 ms
The Conv3d layout needs no channel reordering of the patches, but ONNX Runtime's generic
3-D convolution is ~2x slower than its blocked NCHWc 2-D kernels, and the stem is half of
all MACs. In the scan alone (profiled), slices and concats plus the reorder to NCHWc took
58 ms where this layout's gathers plus the reorder take 25 ms. A dilated-convolution
layout that reads overlapping boxes without gathering them was no faster in a
micro-benchmark: its input needs three time-shifted copies, as large as the patches for
narrow boxes.

Two more ways to avoid materialising the patch tensor twice (gather, then ONNX Runtime's
reorder to NCHWc: ~30 % of a window's time) were written exactly equivalent (max error
5e-6) and measured on the 12 stems alone, batch 8, 2 threads, idle machine, per window:
  this layout (gathers, reorder, one 256-channel conv per box)        17.1 ms
  dilated stems over shared time-shifted copies of the frequency runs,
  the clamped last column and the zero-padded first row as small convs  28.6 ms
  (each box slices its own time extent: slices and their reorders cost more than the
  gather saved, and the (31, 3) dilated kernel runs slower per MAC)
  each stem as 64 convs of 4 patches (under the NCHWc block size, so no reorder), summed  23.0 ms
  (the 63 Adds per box are not fused into the convs, and the narrow convs run slower)

Gathering straight into the blocked layout, so that ONNX Runtime needs no reorder, works
only where its block (8 channels with AVX2, 16 with AVX-512) equals N_f. With the stem's
input channels put in time-major order (block = the 8 frequency positions of one time
position), two gathers write (B, N_t, w, h, N_f), which *is* NCHWc with block 8; an
ONNX Runtime-optimised graph with each stem's ReorderInput cut out then ran the whole
model in 24-27 ms per window against 28-31 ms (batch 8, 2 threads), a ~1.2-1.3x FLOP
bound. This machine's block is 16, though, where that data is read wrongly (the stems'
outputs differed), so the timing shows the pass saved, not a working model; and a block
of 16 channels cannot come from contiguous runs: with N_f = 8 it needs two time positions,
and the clamped last start breaks any constant pairing. Gathering rows of 8 floats into
the 16-block layout took 2.0 ms per window for the largest box against 0.9 ms for this
layout's row gather, as much as the gather and reorder it would replace.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from msn_edge.model import MSN, ScanningBranch, prepare_inputs


def _transpose_convs(module: nn.Module) -> nn.Module:
    """A copy of `module` whose 2-D convolutions work on spatially transposed input."""
    module = copy.deepcopy(module)
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            m.weight = nn.Parameter(m.weight.detach().transpose(2, 3).contiguous())
            m.kernel_size = m.kernel_size[::-1]
            m.stride = m.stride[::-1]
            m.padding = m.padding[::-1]
            m.dilation = m.dilation[::-1]
        elif isinstance(m, nn.MaxPool2d | nn.AvgPool2d):
            for name in ("kernel_size", "stride", "padding", "dilation"):
                value = getattr(m, name, None)
                if isinstance(value, tuple):
                    setattr(m, name, value[::-1])
    return module


def _fold_batchnorm(module: nn.Module) -> nn.Module:
    """Fold every BatchNorm that directly follows a conv or linear layer into its weights.

    Mathematically the same network, and the folded weights stay one tensor however many
    boxes share the encoder; left to the graph optimisers (onnxruntime's quantization
    pre-processing), each of the 12 boxes would get its own folded copy.
    """
    for seq in [m for m in module.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            layer, bn = seq[i], seq[i + 1]
            if isinstance(bn, nn.BatchNorm1d | nn.BatchNorm2d):
                if isinstance(layer, nn.Conv1d | nn.Conv2d):
                    seq[i], seq[i + 1] = fuse_conv_bn_eval(layer.eval(), bn.eval()), nn.Identity()
                elif isinstance(layer, nn.Linear):
                    seq[i], seq[i + 1] = fuse_linear_bn_eval(layer.eval(), bn.eval()), nn.Identity()
    return module


def _runs(starts: list[int], length: int) -> torch.Tensor:
    """Index vector of the runs [s, s + length) for every start s, concatenated."""
    return torch.tensor([s + k for s in starts for k in range(length)], dtype=torch.long)


class ExportScan(nn.Module):
    """ScanningBranch with the same weights, as per-axis gathers plus the shared encoder."""

    def __init__(self, branch: ScanningBranch):
        super().__init__()
        self.boxes = list(branch.boxes)
        self.n_freq_positions = len(branch.starts[0][0])
        self.n_time_positions = len(branch.starts[0][1])
        # Index vectors: one per box height (frequency runs) and per box width (time runs).
        # Box starts depend only on (axis size, box side, count), so boxes share them.
        self.heights = sorted({h for h, _ in self.boxes})
        freq_starts, time_starts = {}, {}
        for (h, w), (f_starts, t_starts) in zip(self.boxes, branch.starts, strict=True):
            freq_starts[h], time_starts[w] = f_starts, t_starts
        for h, starts in freq_starts.items():
            self.register_buffer(f"freq_idx_{h}", _runs(starts, h), persistent=False)
        for w, starts in time_starts.items():
            self.register_buffer(f"time_idx_{w}", _runs(starts, w), persistent=False)
        self.encoder = _fold_batchnorm(_transpose_convs(branch.encoder))  # sees (w, h) patches
        self.head = copy.deepcopy(branch.head)

    def _freq_runs(self, spec: torch.Tensor, h: int) -> torch.Tensor:
        """(B, F, T) -> (B, N_f, T, h): the N_f frequency runs of height h, time-major."""
        x = spec.index_select(1, getattr(self, f"freq_idx_{h}"))  # (B, N_f * h, T)
        x = x.unflatten(1, (self.n_freq_positions, h))  # (B, N_f, h, T)
        return x.transpose(2, 3)  # (B, N_f, T, h)

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        runs = {h: self._freq_runs(spec, h) for h in self.heights}
        codes = []
        for h, w in self.boxes:
            x = runs[h].index_select(2, getattr(self, f"time_idx_{w}"))  # (B, N_f, N_t * w, h)
            x = x.reshape(x.shape[0], self.n_freq_positions * self.n_time_positions, w, h)
            codes.append(self.encoder(x))  # (B, N, w, h) -> (B, 2C)
        return self.head(torch.cat(codes, dim=1))  # (B, branch_dim)


class ExportableMSN(nn.Module):
    """The whole MSN for export: same weights (BatchNorm folded), gather scan, unit output."""

    def __init__(self, model: MSN):
        super().__init__()
        self.spectrogram = _fold_batchnorm(copy.deepcopy(model.spectrogram))
        self.spectrum = _fold_batchnorm(copy.deepcopy(model.spectrum))
        self.scanning = ExportScan(model.scanning)
        self.fusion = copy.deepcopy(model.fusion)  # its BatchNorm follows a concat: kept
        self.cfg = model.cfg

    @classmethod
    def from_trained(cls, model: MSN) -> ExportableMSN:
        """The export twin of a trained MSN (copied; `model` is left untouched), in eval mode."""
        return cls(model).eval()

    def forward(self, spectrogram: torch.Tensor, spectrum: torch.Tensor) -> torch.Tensor:
        # Same data flow as MSN.forward, then the unit-length embedding the runtime scores.
        spec, spectrum = prepare_inputs(spectrogram, spectrum, self.cfg)
        a = self.spectrogram(spec)
        c = self.scanning(spec)
        spec_emb = self.fusion(torch.cat([a, c], dim=1))
        b = self.spectrum(spectrum)
        return F.normalize(torch.cat([b, spec_emb], dim=1), dim=1)  # (B, D)
