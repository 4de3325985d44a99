"""runtime.ort_session: the one place ONNX Runtime session options are built."""

from __future__ import annotations

import onnxruntime as ort
import pytest

from msn_edge.runtime.ort_session import LOG_ERRORS_ONLY, OPT_LEVELS, session_options


def test_defaults_are_the_engines_settings():
    opts = session_options()
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert opts.intra_op_num_threads == 0  # ONNX Runtime's default: every physical core
    assert opts.inter_op_num_threads == 1
    assert opts.log_severity_level == LOG_ERRORS_ONLY == 3
    assert not opts.enable_profiling
    with pytest.raises(RuntimeError, match="does not have configuration"):
        opts.get_session_config_entry("session.disable_prepacking")  # prepacking stays on


@pytest.mark.parametrize("name", list(OPT_LEVELS))
def test_every_optimisation_level_by_name(name):
    level = session_options(opt_level=name).graph_optimization_level
    assert level == getattr(ort.GraphOptimizationLevel, OPT_LEVELS[name])


def test_threads_profiling_and_prepacking(tmp_path):
    opts = session_options(threads=3, profile_prefix=tmp_path / "p", disable_prepacking=True)
    assert opts.intra_op_num_threads == 3
    assert opts.enable_profiling and opts.profile_file_prefix == str(tmp_path / "p")
    assert opts.get_session_config_entry("session.disable_prepacking") == "1"


def test_unknown_level_names_the_choices():
    with pytest.raises(ValueError, match="unknown optimisation level 'fast'.*'extended'"):
        session_options(opt_level="fast")
