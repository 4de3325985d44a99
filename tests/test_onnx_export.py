"""The exported ONNX graph: contract I/O, dynamic batch, size, node count, parity."""

import io
import zipfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from export_helpers import exported_bundle, random_model

from msn_edge.checkpoint import load_checkpoint
from msn_edge.config import preset
from msn_edge.export.onnx_export import BATCH_DIM, OPSET, export_onnx, graph_stats
from msn_edge.export.parity import ParityError, check_parity, synthetic_windows
from msn_edge.prototypes import load_scoring
from msn_edge.runtime.frontend import features

# Every test here reads the shared --int8 export (export_helpers.exported_bundle) or makes
# the one full-size export of the suite.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return exported_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def proto(exported):
    return onnx.load_from_string(exported.member("model.onnx"))


@pytest.fixture(scope="module")
def run(exported):
    return load_checkpoint(exported.run)


def test_contract_inputs_outputs_and_metadata(proto, run):
    onnx.checker.check_model(proto, full_check=True)
    dims = {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in [*proto.graph.input, *proto.graph.output]
    }
    m = run.config.model
    assert dims == {
        "spectrogram": [BATCH_DIM, m.n_freq, m.n_frames],
        "spectrum": [BATCH_DIM, m.spectrum_bins],
        "embedding": [BATCH_DIM, m.embedding_dim],
    }
    assert [o.version for o in proto.opset_import if o.domain == ""] == [OPSET]
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["preset"] == "tiny" and props["opset"] == str(OPSET)
    assert props["window_s"] == "2.5" and props["msn_edge_version"]


def test_graph_has_no_per_patch_nodes_and_weights_stored_once(proto, run):
    stats = graph_stats(proto, run.model)
    m = run.config.model
    # Scan: one Gather per box height and one per box, nothing per patch: a per-patch
    # export slices (Slice/Split) or indexes element-wise (GatherND) once per patch.
    assert stats.ops["Gather"] == len(m.box_heights) + m.n_boxes
    assert not {"Slice", "Split", "GatherND", "Pad", "Tile"} & set(stats.ops)
    # File ~ parameter bytes: weights once, no index tables, no node provenance.
    assert 0.95 < stats.size_ratio < 1.1
    assert all(not n.metadata_props for n in proto.graph.node)


def test_dynamic_batch_matches_pytorch_training_module(exported, run):
    session = ort.InferenceSession(
        exported.member("model.onnx"), providers=["CPUExecutionProvider"]
    )
    windows = synthetic_windows(run.config.frontend)[:3]
    spec, spectrum = features(np.stack(windows), run.config.frontend)
    with torch.no_grad():
        want = F.normalize(run.model(torch.from_numpy(spec), torch.from_numpy(spectrum)), dim=1)
    for n in (1, 3):
        (got,) = session.run(None, {"spectrogram": spec[:n], "spectrum": spectrum[:n]})
        assert got.shape == (n, run.config.model.embedding_dim)
        np.testing.assert_allclose(got, want[:n].numpy(), atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_parity_report_is_in_the_bundle_and_printed(exported):
    report = exported.manifest()["metadata"]["export"]
    parity = report["parity"]
    assert parity["passed"] and parity["n_real"] == 8 and parity["n_synthetic"] == 5
    assert parity["max_abs_embedding"] <= 1e-4 and parity["max_abs_score"] <= 1e-5
    assert report["graph"]["nodes"] > 0 and report["tensorrt_problems"] == []
    assert "parity fp32: ONNX Runtime vs PyTorch" in exported.stdout
    assert f"{parity['max_abs_embedding']:.2e}" in exported.stdout


def test_parity_check_refuses_a_different_model(exported, run):
    # The bundle's graph against another set of weights: the export must be refused.
    scoring = load_scoring(exported.run)
    other = random_model(run.config, seed=99)
    with pytest.raises(ParityError, match="differs from the PyTorch model.*no bundle written"):
        check_parity(other, exported.member("model.onnx"), run.config.frontend, scoring.prototypes)


def test_bundle_members_are_the_exported_models(exported):
    with zipfile.ZipFile(exported.bundle) as z:
        names = set(z.namelist())
        prototypes = np.load(io.BytesIO(z.read("prototypes.npy")), allow_pickle=False)
    assert names == {
        "manifest.json",
        "model.onnx",
        "model.int8.onnx",
        "model.int8-cpu.onnx",
        "prototypes.npy",
    }
    manifest = exported.manifest()
    assert manifest["trained_on"]["n_clips"] == 12 and manifest["trained_on"]["classes"] == 2
    assert manifest["metadata"]["preset"] == "tiny"
    assert manifest["embedding_dim"] == prototypes.shape[1]
    assert {g["name"] for g in manifest["groups"]} == {"fan/id_00", "fan/id_01"}


def test_dcase2020_export_graph_and_parity():
    # ~20 s on 2 cores: the one full-size export of the suite.
    config = preset("dcase2020")
    model = random_model(config, seed=7)
    proto = export_onnx(model, {"preset": "dcase2020"})
    stats = graph_stats(proto, model)
    m = config.model
    assert stats.ops["Gather"] == len(m.box_heights) + m.n_boxes == 16
    assert stats.nodes < 1000  # 12 boxes x 256 patches = 3072 patches
    assert 0.99 < stats.size_ratio < 1.05  # ~42 MB for 10.5 M parameters
    prototypes = np.eye(m.embedding_dim, dtype=np.float32)[:4]
    report = check_parity(model, proto.SerializeToString(), config.frontend, prototypes)
    assert report.max_abs_embedding <= 1e-4 and report.max_abs_score <= 1e-5
