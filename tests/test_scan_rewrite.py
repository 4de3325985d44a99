"""The export rewrite of the scanning branch computes what training computes."""

import torch
import torch.nn.functional as F
from export_helpers import random_model

from msn_edge.config import ModelConfig, preset
from msn_edge.export.scan import ExportableMSN, ExportScan
from msn_edge.model import ScanningBranch

TOL = 1e-6


def test_rewrite_matches_training_module_tiny():
    config = preset("tiny")
    model = random_model(config, seed=1)
    twin = ExportableMSN.from_trained(model)
    torch.manual_seed(2)
    spec = torch.rand(2, config.model.n_freq, config.model.n_frames) * 3
    spectrum = torch.rand(2, config.model.spectrum_bins)
    with torch.no_grad():
        scan_diff = (twin.scanning(spec) - model.scanning(spec)).abs().max().item()
        want = F.normalize(model(spec, spectrum), dim=1)
        got = twin(spec, spectrum)
    assert scan_diff <= TOL
    assert (got - want).abs().max().item() <= TOL
    torch.testing.assert_close(got.norm(dim=1), torch.ones(2))


def test_rewrite_matches_training_scan_dcase2020():
    # 12 boxes x 256 patches; the other branches are copied as they are (tiny test above
    # checks the whole embedding, test_onnx_export the whole dcase2020 graph).
    config = preset("dcase2020").model
    torch.manual_seed(6)
    branch = ScanningBranch(config).eval()
    spec = torch.rand(1, config.n_freq, config.n_frames) * 3
    with torch.no_grad():
        diff = (ExportScan(branch)(spec) - branch(spec)).abs().max().item()
    assert diff <= TOL


def test_rewrite_handles_odd_boxes_and_clamped_starts():
    # Odd box sides, a box as wide as the axis (every start 0) and steps of 1 with
    # clamping (box_starts(30, 28, 4) = [0, 1, 2, 2]): the general cases of box_starts.
    cfg = ModelConfig(
        n_freq=41,
        n_frames=30,
        box_heights=(7, 40),
        box_widths=(5, 28, 30),
        n_freq_positions=3,
        n_time_positions=4,
        scan_stem_channels=8,
        scan_block_channels=(8, 8),
        scan_block_strides=(2, 1),
        scan_hidden=16,
        branch_dim=8,
    )
    torch.manual_seed(3)
    branch = ScanningBranch(cfg).eval()
    rewrite = ExportScan(branch).eval()
    spec = torch.randn(3, 41, 30)
    with torch.no_grad():
        diff = (rewrite(spec) - branch(spec)).abs().max().item()
    assert diff <= TOL


def test_rewrite_leaves_the_trained_model_untouched():
    model = random_model(preset("tiny"), seed=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    twin = ExportableMSN.from_trained(model)
    assert not twin.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # The rewrite's stem kernel is the trained one, transposed (it sees (w, h) patches),
    # with the following BatchNorm folded in.
    conv, bn = model.scanning.encoder.net[0], model.scanning.encoder.net[1]
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    folded = conv.weight.transpose(2, 3) * scale[:, None, None, None]
    torch.testing.assert_close(twin.scanning.encoder.net[0].weight, folded)
    assert isinstance(twin.scanning.encoder.net[1], torch.nn.Identity)


def test_index_vectors_are_small():
    # One run of h (w) indices per position and box side: no per-element index table.
    config = preset("dcase2020").model
    scan = ExportScan(ScanningBranch(config))
    sizes = {n: b.numel() for n, b in scan.named_buffers() if n.startswith(("freq", "time"))}
    assert sizes["freq_idx_256"] == config.n_freq_positions * 256
    assert sizes["time_idx_64"] == config.n_time_positions * 64
    assert sum(sizes.values()) == config.n_freq_positions * sum(
        config.box_heights
    ) + config.n_time_positions * sum(config.box_widths)
