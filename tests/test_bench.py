"""`msn-edge bench`: statistics, FLOP count, peaks, per-backend processes, report, CLI."""

from __future__ import annotations

import json
import math
import os
import pkgutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from bench_helpers import make_bench_fast
from click.testing import CliRunner
from no_torch import TORCH_NOT_IMPORTED, no_torch_env
from onnx import TensorProto, helper, numpy_helper
from toy_bundle import make_toy_bundle

from msn_edge.benchmarks.cases import ALL_CASES, BenchSettings, Case, select_cases
from msn_edge.benchmarks.measure import LatencyStats, synthetic_windows, time_call
from msn_edge.benchmarks.op_profile import (
    NO_PATH,
    format_profile,
    graph_flops,
    name_prefix,
    node_flops,
    profile_model,
)
from msn_edge.benchmarks.report import format_report
from msn_edge.benchmarks.runner import run_benchmark
from msn_edge.cli import main
from msn_edge.runtime.errors import MsnEdgeError

FAST = BenchSettings(iterations=5, warmup=1, batch=4, threads=1)


@pytest.fixture(autouse=True)
def fast_bench(monkeypatch):
    make_bench_fast(monkeypatch)


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return make_toy_bundle(tmp_path_factory.mktemp("bench") / "toy.msn", int8=True)


@pytest.fixture(scope="module")
def toy_report(toy):
    with pytest.MonkeyPatch.context() as mp:  # module scope: no monkeypatch fixture
        make_bench_fast(mp)
        return run_benchmark(toy, FAST)


def test_latency_stats_from_known_samples():
    s = LatencyStats.from_ns([1_000_000 * k for k in range(1, 101)])  # 1..100 ms
    assert s.iterations == 100
    assert s.mean_ms == pytest.approx(50.5)
    assert s.min_ms == 1.0
    assert s.p50_ms == pytest.approx(50.5)
    assert s.p90_ms == pytest.approx(90.1)
    assert s.p99_ms == pytest.approx(99.01)
    assert s.std_ms == pytest.approx(np.std(np.arange(1, 101), ddof=1))
    with pytest.raises(ValueError):
        LatencyStats.from_ns([])


def test_time_call_counts_warmup_apart():
    calls = []
    stats = time_call(lambda: calls.append(1), iterations=7, warmup=3)
    assert len(calls) == 10 and stats.iterations == 7


def test_settings_reject_nonsense():
    with pytest.raises(MsnEdgeError, match="--iterations"):
        BenchSettings(iterations=0)
    with pytest.raises(MsnEdgeError, match="--warmup"):
        BenchSettings(warmup=-1)


def test_select_cases_by_prefix_and_unknown():
    assert [c.name for c in select_cases(["ort-cpu"])] == ["ort-cpu-fp32", "ort-cpu-int8"]
    assert [c.name for c in select_cases(["tensorrt-fp16"])] == ["tensorrt-fp16"]
    assert len(select_cases()) == len(ALL_CASES)
    with pytest.raises(MsnEdgeError, match="unknown backend onnx-magic"):
        select_cases(["onnx-magic"])


def test_node_flops_from_shapes():
    # conv 3x3, 16 -> 32 channels, 10 x 20 output: 2 * 32*10*20 * 16*9
    assert node_flops("Conv", [[1, 16, 20, 40], [32, 16, 3, 3]], [[1, 32, 10, 20]]) == (
        2 * 32 * 10 * 20 * 16 * 9
    )
    # depthwise: weight (C, 1, k, k)
    assert node_flops("Conv", [[1, 8, 5, 5], [8, 1, 3, 3]], [[1, 8, 5, 5]]) == 2 * 8 * 25 * 9
    assert node_flops("MatMul", [[4, 64], [64, 10]], [[4, 10]]) == 2 * 4 * 10 * 64
    # Gemm with transB: B is (N, K)
    assert node_flops("Gemm", [[2, 64], [10, 64], [10]], [[2, 10]]) == 2 * 2 * 10 * 64
    assert node_flops("Relu", [[1, 8]], [[1, 8]]) == 0


def test_name_prefix_groups_module_calls():
    assert name_prefix("/scanning/encoder_3/net/net.0_3/Conv", 2) == "/scanning/encoder"
    assert name_prefix("/scanning/encoder/net/net.0/Conv", 3) == "/scanning/encoder/net"
    assert name_prefix("fused /scanning/head/head.0/Gemm", 2) == "/scanning/head"
    assert name_prefix("/Concat_4", 2) == "/Concat"  # a top-level node is its own row
    assert name_prefix("ReorderInput_token_12", 2) == NO_PATH
    assert name_prefix("node_conv1d_43", 2) == NO_PATH


def _conv_gemm_model() -> bytes:
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 1, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal((5, 4 * 6 * 8)).astype(np.float32), "g"),
        numpy_helper.from_array(np.array([1, -1], np.int64), "shape"),
    ]
    graph = helper.make_graph(
        [
            helper.make_node("Unsqueeze", ["spectrogram", "axes"], ["x"]),
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Reshape", ["c", "shape"], ["f"]),
            helper.make_node("Gemm", ["f", "g"], ["e0"], transB=1),
            helper.make_node("ReduceSum", ["spectrum", "axes"], ["s"]),
            helper.make_node("Mul", ["e0", "s"], ["embedding"]),
        ],
        "flops",
        [
            helper.make_tensor_value_info("spectrogram", TensorProto.FLOAT, [1, 6, 8]),
            helper.make_tensor_value_info("spectrum", TensorProto.FLOAT, [1, 3]),
        ],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [1, 5])],
        initializer=[*inits, numpy_helper.from_array(np.array([1], np.int64), "axes")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return model.SerializeToString()


def test_graph_flops_counts_conv_and_gemm_with_prepacked_weights():
    spec, spectrum = np.ones((1, 6, 8), np.float32), np.ones((1, 3), np.float32)
    conv = 2 * (4 * 6 * 8) * 9
    gemm = 2 * 5 * (4 * 6 * 8)
    assert graph_flops(_conv_gemm_model(), (spec, spectrum)) == conv + gemm


def _small_config():
    """The tiny preset cut down to 1 s windows and few patches: exports in seconds."""
    from msn_edge.config import _TINY_MODEL, Config
    from msn_edge.runtime.frontend import FrontendConfig

    fe = FrontendConfig(window_s=1.0)
    small = replace(
        _TINY_MODEL,
        box_widths=(8, 16),
        n_freq_positions=2,
        n_time_positions=3,
        spectrum_convs=((64, 16), (16, 8), (8, 2)),
    )
    return Config(preset="bench-test", frontend=fe, model=small.for_frontend(fe))


def _onnx_of(model, fe) -> bytes:
    """The model's plain torch export with the contract's I/O and a dynamic batch."""
    import io

    import torch

    class Unit(torch.nn.Module):
        def __init__(self, msn):
            super().__init__()
            self.msn = msn

        def forward(self, spec, spectrum):
            return torch.nn.functional.normalize(self.msn(spec, spectrum), dim=1)

    buf = io.BytesIO()
    batch = {0: "batch"}
    torch.onnx.export(
        Unit(model),
        (torch.rand(1, fe.n_freq, fe.n_frames), torch.rand(1, fe.spectrum_bins)),
        buf,
        input_names=["spectrogram", "spectrum"],
        output_names=["embedding"],
        dynamic_axes={"spectrogram": batch, "spectrum": batch, "embedding": batch},
        opset_version=17,
        dynamo=False,
    )
    return buf.getvalue()


@pytest.fixture(scope="module")
def small_msn():
    """A seeded small MSN, its config and its ONNX export (exported once for the module)."""
    torch = pytest.importorskip("torch")
    from msn_edge.model import MSN

    cfg = _small_config()
    torch.manual_seed(0)
    model = MSN(cfg.model).eval()
    return cfg, model, _onnx_of(model, cfg.frontend)


def test_graph_flops_matches_the_torch_mac_count(small_msn):
    from msn_edge.model import count_macs

    cfg, model, onnx_bytes = small_msn
    fe = cfg.frontend
    rng = np.random.default_rng(0)
    inputs = [rng.random((1, fe.n_freq, fe.n_frames)), rng.random((1, fe.spectrum_bins))]
    flops = graph_flops(onnx_bytes, [x.astype(np.float32) for x in inputs])
    assert flops == 2 * count_macs(model)


def test_eager_baseline_runs_the_checkpoint_of_the_bundle(small_msn, tmp_path):
    from msn_edge.checkpoint import save_checkpoint
    from msn_edge.runtime.bundle import ScoringGroup, write_bundle

    cfg, model, onnx_bytes = small_msn
    run = tmp_path / "run"
    save_checkpoint(
        run / "checkpoint.pt",
        {"config": cfg.to_dict(), "model": model.state_dict(), "epoch": 0, "classes": ["a", "b"]},
    )
    protos = np.eye(cfg.model.embedding_dim, dtype=np.float32)[:4]
    bundle = write_bundle(
        tmp_path / "small.msn",
        model_onnx=onnx_bytes,
        prototypes=protos,
        groups=[ScoringGroup("g", 0, 4, 0.5, {})],
        frontend=cfg.frontend,
        trained_on={},
    )
    r = run_benchmark(bundle, FAST, cases=select_cases(["pytorch", "ort-cpu"]), checkpoint=run)
    eager, fp32 = r.cases[0], r.cases[1]
    assert (eager.name, eager.status, eager.engine) == ("pytorch-eager", "ok", "pytorch-eager")
    assert r.reference == "pytorch-eager" and eager.speedup == 1.0
    assert fp32.status == "ok"
    assert fp32.max_abs_diff < 1e-4  # the same model in both rows
    assert fp32.speedup == pytest.approx(eager.batch1.mean_ms / fp32.batch1.mean_ms)
    assert fp32.first_score == pytest.approx(eager.first_score, abs=1e-4)
    assert r.flops_per_window > 0 and eager.gflops1 > 0


def test_profile_aggregates_by_op_and_prefix(toy):
    from msn_edge.runtime.bundle import read_bundle
    from msn_edge.runtime.frontend import features

    b = read_bundle(toy)
    inputs = features(synthetic_windows(b.frontend.window_samples, 1, 0), b.frontend)
    p = profile_model(b.model_bytes("fp32"), inputs, threads=1, runs=4, warmup=2, label="toy")
    assert p.runs == 4 and p.batch == 1
    ops = {r.key: r for r in p.by_op_type}
    assert ops["MatMul"].calls == 2 and ops["Log"].calls == 2  # per run, warm-up excluded
    assert sum(r.share for r in p.by_op_type) == pytest.approx(1.0)
    assert sum(r.ms for r in p.by_prefix) == pytest.approx(p.kernel_ms)
    assert 0 < p.kernel_ms <= p.run_ms
    text = format_profile(p)
    assert "| MatMul |" in text and "Per-op profile of toy" in text


def test_report_has_every_field_with_sane_values(toy_report):
    r = toy_report
    assert r.window_s == 1.0
    assert r.flops_per_window == 2 * 16 * (513 + 8000)  # the toy: two MatMuls to 16 dims
    assert r.peaks["cpu-fp32"].gflops > 0 and r.peaks["cpu-fp32"].threads == 1
    assert r.peaks["cpu-int8"].gflops > 0 and "MatMulInteger" in r.peaks["cpu-int8"].method
    by_name = {c.name: c for c in r.cases}
    assert set(by_name) == {c.name for c in ALL_CASES}
    for name in ("ort-cpu-fp32", "ort-cpu-int8"):
        c = by_name[name]
        assert c.status == "ok", c.reason
        for stats in (c.batch1, c.batch_n):
            assert stats.iterations == FAST.iterations
            assert 0 < stats.min_ms <= stats.p50_ms <= stats.p90_ms <= stats.p99_ms
        assert c.batch == FAST.batch
        assert c.throughput1_wps == pytest.approx(1e3 / c.batch1.mean_ms)
        assert c.throughput_n_wps == pytest.approx(FAST.batch * 1e3 / c.batch_n.mean_ms)
        assert c.rtf == pytest.approx((r.frontend.mean_ms + c.batch1.mean_ms) / 1e3 / r.window_s)
        assert c.gflops_n == pytest.approx(r.flops_per_window * c.throughput_n_wps / 1e9)
        peak = r.peaks[f"cpu-{c.precision}"].gflops
        assert c.peak_fraction_n == pytest.approx(c.gflops_n / peak)
        # a fresh process: the interpreter, numpy and onnxruntime at least, and its
        # cold start includes one inference
        assert c.peak_rss_mib > 20
        assert c.cold_start_ms > c.batch1.min_ms
        assert 0 <= c.first_score <= 2
    assert r.reference == "ort-cpu-fp32"
    assert by_name["ort-cpu-fp32"].speedup == 1.0
    assert by_name["ort-cpu-fp32"].max_abs_diff == 0.0
    assert 0 < by_name["ort-cpu-int8"].max_abs_diff < 0.1  # int8 is close, not equal
    eager = by_name["pytorch-eager"]
    assert eager.status == "skipped" and "--checkpoint" in eager.reason
    for c in r.cases:
        if c.status == "skipped":
            assert c.reason and c.batch1 is None


def test_report_json_and_markdown(toy_report):
    d = json.loads(json.dumps(toy_report.to_dict()))
    assert d["settings"]["iterations"] == FAST.iterations
    case = next(c for c in d["cases"] if c["name"] == "ort-cpu-fp32")
    assert {"mean_ms", "std_ms", "p50_ms", "p90_ms", "p99_ms"} <= set(case["batch1"])
    assert "embedding" not in case
    text = format_report(toy_report)
    assert "| ort-cpu-fp32 |" in text and "| ort-cpu-int8 |" in text
    assert "speed-up vs ort-cpu-fp32" in text
    assert "- pytorch-eager: skipped, no --checkpoint given" in text
    assert "real-time factor = (front-end + inference at batch 1) / audio duration" in text


def test_peak_memory_is_the_backend_process_own(toy):
    ballast = np.ones(400 * 2**20 // 8)  # 400 MiB resident here, in the parent
    r = run_benchmark(toy, FAST, cases=select_cases(["ort-cpu-fp32"]))
    assert ballast.sum() > 0
    rss = r.cases[0].peak_rss_mib
    assert 20 < rss < 300, f"{rss:.0f} MiB: the parent's memory leaked into the child's peak"


class _Recording:
    """A runtime engine that logs each call (and can die on the k-th), for the tests below."""

    def __init__(self, engine, label: str) -> None:
        self.engine, self.label, self.calls = engine, label, 0
        self.name = engine.name

    def embed(self, spec, spectrum):
        self.calls += 1
        if self.calls == int(os.environ.get(f"BENCH_TEST_DIE_{self.label}", 0)):
            os._exit(3)
        with open(os.environ["BENCH_TEST_LOG"], "a") as f:
            f.write(f"{self.label}\n")
        return self.engine.embed(spec, spectrum)


def recording_engine(bundle, case, settings, checkpoint):
    """Bench factory for the child processes of the tests below (tests/ on PYTHONPATH)."""
    from msn_edge.benchmarks.worker import runtime_engine

    return _Recording(runtime_engine(bundle, case, settings, checkpoint), case.name)


def _recorded_cases(monkeypatch, tmp_path) -> tuple[list[Case], Path]:
    log = tmp_path / "calls.log"
    here = str(Path(__file__).parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("BENCH_TEST_LOG", str(log))
    factory = "test_bench:recording_engine"
    cases = [Case(n, "cpu", p, "cpu", factory) for n, p in (("a", "fp32"), ("b", "int8"))]
    return cases, log


def test_backends_are_timed_interleaved(toy, monkeypatch, tmp_path):
    cases, log = _recorded_cases(monkeypatch, tmp_path)
    r = run_benchmark(toy, FAST, cases=cases)
    assert [c.status for c in r.cases] == ["ok", "ok"]
    calls = log.read_text().split()
    # Each starts alone with its first score; then rounds of one call each, a before b.
    assert calls[:2] == ["a", "b"]
    rounds = 2 * (FAST.warmup + FAST.iterations)  # batch 1, then the larger batch
    assert calls[2:] == ["a", "b"] * rounds


def test_a_backend_dying_mid_run_fails_alone(toy, monkeypatch, tmp_path):
    cases, _ = _recorded_cases(monkeypatch, tmp_path)
    monkeypatch.setenv("BENCH_TEST_DIE_b", "4")
    r = run_benchmark(toy, FAST, cases=cases)
    a, b = r.cases
    assert a.status == "ok" and a.batch_n.iterations == FAST.iterations
    assert b.status == "failed" and "exit status 3" in b.reason
    assert b.batch1 is None


def test_bundle_without_int8_skips_int8(tmp_path):
    path = make_toy_bundle(tmp_path / "fp32.msn")
    r = run_benchmark(path, FAST, cases=select_cases(["ort-cpu"]))
    int8 = next(c for c in r.cases if c.name == "ort-cpu-int8")
    assert int8.status == "skipped" and "no int8 model" in int8.reason
    assert "cpu-int8" not in r.peaks


def test_a_failing_backend_is_reported_not_raised(toy):
    broken = Case(
        "broken", "cpu", "fp32", "cpu", factory="msn_edge.benchmarks.runner:no_such_factory"
    )
    r = run_benchmark(toy, FAST, cases=[broken])
    (c,) = r.cases
    assert c.status == "failed"
    assert "no_such_factory" in c.reason
    assert r.reference is None


def test_cli_prints_table_and_writes_json(toy, tmp_path):
    out = tmp_path / "bench.json"
    args = ["bench", str(toy), "--backend", "ort-cpu-fp32", "--iterations", "3", "--warmup", "1"]
    res = CliRunner().invoke(main, [*args, "--threads", "1", "--json", str(out), "--profile"])
    assert res.exit_code == 0, res.output
    assert "| ort-cpu-fp32 |" in res.stdout
    assert "Per-op profile of ort-cpu-fp32" in res.stdout
    d = json.loads(out.read_text())
    assert [c["name"] for c in d["cases"]] == ["ort-cpu-fp32"]
    assert d["cases"][0]["batch1"]["iterations"] == 3
    assert d["profiles"][0]["label"] == "ort-cpu-fp32"


def test_cli_errors_are_one_line(tmp_path, toy):
    runner = CliRunner()
    res = runner.invoke(main, ["bench", str(tmp_path / "missing.msn")])
    assert res.exit_code == 1 and "no such bundle file" in res.output
    assert "Traceback" not in res.output
    res = runner.invoke(main, ["bench", str(toy), "--backend", "nope"])
    assert res.exit_code == 1 and "unknown backend nope" in res.output
    res = runner.invoke(main, ["bench", str(toy), "--iterations", "0"])
    assert res.exit_code == 1 and "--iterations must be at least 1" in res.output


# The regeneration scripts beside the library; they may import torch (training, export).
SCRIPTS = {"accuracy", "autoencoder", "capacity", "first_shot", "latency", "train_throughput"}


def test_bench_library_imports_without_torch(tmp_path):
    """Every library module of msn_edge.benchmarks (not the scripts) and the bench CLI
    import on a box without torch, and none of them imports it."""
    import msn_edge.benchmarks

    modules = {m.name for m in pkgutil.iter_modules(msn_edge.benchmarks.__path__)} - SCRIPTS
    assert {"cases", "eager", "peaks", "runner", "worker"} <= modules
    code = "import importlib, sys\n"
    code += "".join(f"importlib.import_module('msn_edge.benchmarks.{m}')\n" for m in modules)
    code += "import msn_edge.cli.bench\n" + TORCH_NOT_IMPORTED
    env = no_torch_env(tmp_path)
    res = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr


def test_bench_runs_where_torch_is_missing(toy, tmp_path):
    env = no_torch_env(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    code = "import sys\nfrom msn_edge.cli import main\ntry:\n    main()\nfinally:\n    "
    code += TORCH_NOT_IMPORTED
    args = ["bench", str(toy), "--backend", "pytorch-eager", "--backend", "ort-cpu-fp32"]
    args += ["--iterations", "2", "--warmup", "0", "--threads", "1", "--checkpoint", str(run_dir)]
    res = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert "- pytorch-eager: skipped, torch not installed" in res.stdout
    assert "| ort-cpu-fp32 |" in res.stdout
    assert math.isfinite(len(res.stdout))
