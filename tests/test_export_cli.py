"""`msn-edge export`: the bundle scores like the run, and a failed check writes nothing."""

import onnx
import pytest
from click.testing import CliRunner
from export_helpers import exported_bundle, make_run

from msn_edge.cli import main
from msn_edge.runtime.engines import available_backends


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return exported_bundle(tmp_path_factory)


def score_lines(model, files, group):
    args = ["score", str(model), "--group", group, *map(str, files)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return [line.split("\t") for line in result.stdout.splitlines()]


@pytest.mark.slow  # reads the shared --int8 export (export_helpers.exported_bundle)
def test_report_table_on_stdout_logs_on_stderr(exported):
    lines = exported.stdout.splitlines()
    assert lines[:2] == ["| item | value |", "|---|---|"]
    assert all(line.startswith("|") and line.endswith("|") for line in lines)  # only the table
    assert "| TensorRT 10 parser check | passed |" in lines
    assert "checking parity" in exported.output  # the log went to stderr
    assert "onnx_ir" not in exported.output  # the exporter's internals stay quiet


@pytest.mark.slow  # reads the shared --int8 export (export_helpers.exported_bundle)
def test_bundle_gives_the_verdicts_of_the_checkpoint(exported):
    group = "fan/id_01"  # not the bundle's default group: --group must reach the scorer
    files = sorted((exported.data / "fan" / "test").glob("*_id_01_*.wav"))
    assert len(files) == 6
    from_bundle = score_lines(exported.bundle, files, group)
    from_run = score_lines(exported.run, files, group)
    assert [r[0] for r in from_bundle] == [str(f) for f in files]
    for (_, s_bundle, v_bundle), (_, s_run, v_run) in zip(from_bundle, from_run, strict=True):
        assert v_bundle == v_run
        assert abs(float(s_bundle) - float(s_run)) <= 1e-5


def test_help_has_an_example():
    result = CliRunner().invoke(main, ["export", "--help"])
    assert result.exit_code == 0 and "Example:" in result.output and "--int8" in result.output


@pytest.mark.slow  # reads the shared --int8 export (export_helpers.exported_bundle)
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--precision", "fp16"], "--precision sets the TensorRT engine's; add --format engine"),
        (["--format", "engine", "--precision", "int8"], "int8 engine is built from the int8 model"),
    ],
)
def test_incompatible_options_are_one_line_errors(exported, tmp_path, args, message):
    out = tmp_path / "x.msn"
    result = CliRunner().invoke(main, ["export", str(exported.run), "-o", str(out), *args])
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_run_without_checkpoint_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(main, ["export", str(tmp_path), "-o", str(tmp_path / "x.msn")])
    assert result.exit_code == 1
    assert "no checkpoint there" in result.output and "Traceback" not in result.output


def _reuse_exported_graph(monkeypatch, exported):
    """Skip the slow ONNX export: hand the pipeline the shared bundle's graph instead."""
    graph = onnx.load_from_string(exported.member("model.onnx"))
    monkeypatch.setattr("msn_edge.export.pack.export_onnx", lambda model, metadata: graph)


@pytest.mark.slow  # reads the shared --int8 export (export_helpers.exported_bundle)
def test_parity_failure_exits_nonzero_and_writes_no_bundle(exported, tmp_path, monkeypatch):
    # Another run's weights under the shared run's graph: the graph no longer matches.
    other = make_run(tmp_path / "other", exported.data, seed=1)
    _reuse_exported_graph(monkeypatch, exported)
    out = tmp_path / "bad.msn"
    result = CliRunner().invoke(main, ["export", str(other), "-o", str(out)])
    assert result.exit_code == 1
    assert "exported model differs from the PyTorch model" in result.output
    assert "no bundle written" in result.output and "Traceback" not in result.output
    assert not out.exists() and list(tmp_path.glob("*.msn")) == []


@pytest.mark.slow  # reads the shared --int8 export (export_helpers.exported_bundle)
@pytest.mark.skipif(
    available_backends()["tensorrt"] is None, reason="TensorRT can run here: see test_tensorrt.py"
)
def test_engine_format_without_tensorrt_says_why_and_writes_nothing(
    exported, tmp_path, monkeypatch
):
    _reuse_exported_graph(monkeypatch, exported)
    out = tmp_path / "fan.msn"
    args = ["export", str(exported.run), "-o", str(out), "--format", "engine"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert available_backends()["tensorrt"].split(" (")[0] in result.output
    assert "Traceback" not in result.output and not out.exists()
