"""`msn-edge bench` on a real `tiny` bundle (issue 5): the report's correctness, not speed.

One run folder of the `tiny` preset (10 s windows, random weights, a synthetic DCASE 2020
set of 10 s clips) is exported and benchmarked once for the module, through the CLI as a
user runs it:

    msn-edge export RUN -o tiny.msn --int8
    msn-edge bench tiny.msn --checkpoint RUN --iterations 3 --warmup 1 --batch 2 \\
        --threads 1 --json bench.json

The tests check the report's figures against each other and against the model, never
against hard-coded timings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from bench_helpers import SMALL_GEMM, make_bench_fast
from click.testing import CliRunner
from export_helpers import make_run

from msn_edge.benchmarks.cases import ALL_CASES, RUNTIME_CASES
from msn_edge.cli import main
from msn_edge.config import preset
from msn_edge.synth import synthesize

pytestmark = pytest.mark.slow  # the module's fixture trains, exports and benchmarks

ITERATIONS, WARMUP, BATCH, THREADS = 3, 1, 2, 1
CPU_ROWS = ("pytorch-eager", "ort-cpu-fp32", "ort-cpu-int8")


@dataclass(frozen=True)
class TinyBench:
    run: Path
    bundle: Path
    stdout: str  # the bench's markdown report
    report: dict  # the --json report


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory) -> TinyBench:
    base = tmp_path_factory.mktemp("bench_tiny")
    data = base / "data"
    synthesize(
        data,
        seed=0,
        kinds=("fan",),
        ids_per_kind=1,
        n_train=4,
        n_test_normal=2,
        n_test_anomaly=2,
        seconds=10.0,
    )
    run = make_run(base / "run", data, seed=0, config=preset("tiny"))
    bundle, out = base / "tiny.msn", base / "bench.json"
    runner = CliRunner()
    res = runner.invoke(main, ["export", str(run), "-o", str(bundle), "--int8"])
    assert res.exit_code == 0, res.output
    args = ["bench", str(bundle), "--checkpoint", str(run), "--json", str(out)]
    args += ["--iterations", str(ITERATIONS), "--warmup", str(WARMUP)]
    args += ["--batch", str(BATCH), "--threads", str(THREADS)]
    with pytest.MonkeyPatch.context() as mp:  # module scope: test_bench's small GEMM peak
        make_bench_fast(mp)
        res = runner.invoke(main, args)
    assert res.exit_code == 0, res.output
    return TinyBench(run, bundle, res.stdout, json.loads(out.read_text()))


def _cases(report: dict) -> dict[str, dict]:
    return {c["name"]: c for c in report["cases"]}


def test_tiny_report_describes_the_bundle_and_the_settings(tiny_bench):
    r = tiny_bench.report
    assert r["bundle"]["preset"] == "tiny"
    assert r["bundle"]["path"] == str(tiny_bench.bundle)
    assert {"fp32", "int8"} <= set(r["bundle"]["models"])
    assert r["window_s"] == 10.0 == preset("tiny").frontend.window_s
    assert r["settings"] == {
        "iterations": ITERATIONS,
        "warmup": WARMUP,
        "batch": BATCH,
        "threads": THREADS,
        "seed": 0,
    }
    assert r["frontend"]["iterations"] == ITERATIONS
    assert r["reference"] == "pytorch-eager"
    assert r["profiles"] == []  # no --profile
    for key in ("cpu-fp32", "cpu-int8"):  # the GEMM peak of each CPU row's precision
        peak = r["peaks"][key]
        assert peak["gflops"] > 0 and peak["threads"] == THREADS
        assert peak["size"] == SMALL_GEMM["cpu"]


def test_tiny_flops_per_window_are_twice_the_torch_mac_count(tiny_bench):
    from msn_edge.checkpoint import load_checkpoint
    from msn_edge.model import count_macs

    run = load_checkpoint(tiny_bench.run)
    assert run.config.preset == "tiny" and run.config.frontend.window_s == 10.0
    macs = count_macs(run.model)
    assert tiny_bench.report["flops_per_window"] == pytest.approx(2 * macs, rel=1e-3)


def test_tiny_cpu_rows_are_measured_and_gpu_rows_skipped_with_a_reason(tiny_bench):
    from msn_edge.runtime.engines import available_backends

    cases = _cases(tiny_bench.report)
    assert list(cases) == [c.name for c in ALL_CASES]
    for name in CPU_ROWS:
        c = cases[name]
        assert c["status"] == "ok", c["reason"]
        assert c["engine"] and c["threads"] == THREADS and c["batch"] == BATCH
    reasons = available_backends()
    for case in RUNTIME_CASES:
        if case.device != "gpu":
            continue
        c = cases[case.name]
        if reasons[case.backend] is None:  # a GPU machine: the row runs
            assert c["status"] == "ok", c["reason"]
        else:
            assert c["status"] == "skipped" and c["reason"] == reasons[case.backend]
            assert c["batch1"] is None and c["rtf"] is None


def test_tiny_fp32_embedding_matches_eager_and_int8_is_close(tiny_bench):
    cases = _cases(tiny_bench.report)
    eager, fp32, int8 = (cases[n] for n in CPU_ROWS)
    assert eager["speedup"] == 1.0 and eager["max_abs_diff"] == 0.0
    assert fp32["max_abs_diff"] < 1e-4
    assert fp32["first_score"] == pytest.approx(eager["first_score"], abs=1e-4)
    assert 0 < int8["max_abs_diff"] < 0.5  # quantized: close, not equal (unit embeddings)
    for c in (fp32, int8):
        assert c["speedup"] == pytest.approx(eager["batch1"]["mean_ms"] / c["batch1"]["mean_ms"])


def test_tiny_latency_throughput_and_rtf_are_consistent(tiny_bench):
    r = tiny_bench.report
    flops, window_s, frontend_ms = r["flops_per_window"], r["window_s"], r["frontend"]["mean_ms"]
    for name in CPU_ROWS:
        c = _cases(r)[name]
        for stats in (c["batch1"], c["batch_n"]):
            assert stats["iterations"] == ITERATIONS
            assert 0 < stats["min_ms"] <= stats["p50_ms"] <= stats["p90_ms"] <= stats["p99_ms"]
            assert stats["min_ms"] <= stats["mean_ms"] and stats["std_ms"] >= 0
        b1, bn = c["batch1"]["mean_ms"], c["batch_n"]["mean_ms"]
        assert c["throughput1_wps"] == pytest.approx(1e3 / b1)
        assert c["throughput_n_wps"] == pytest.approx(BATCH * 1e3 / bn)
        assert 0 < c["rtf"] < 1
        assert c["rtf"] == pytest.approx((frontend_ms + b1) / 1e3 / window_s)
        assert c["gflops1"] == pytest.approx(flops * c["throughput1_wps"] / 1e9)
        assert c["gflops_n"] == pytest.approx(flops * c["throughput_n_wps"] / 1e9)
        peak = r["peaks"][f"cpu-{c['precision']}"]["gflops"]
        assert c["peak_fraction_n"] == pytest.approx(c["gflops_n"] / peak)
        assert c["cold_start_ms"] > c["batch1"]["min_ms"] and c["peak_rss_mib"] > 20
        assert 0 <= c["first_score"] <= 2


def test_tiny_markdown_table_shows_the_json_figures(tiny_bench):
    r, text = tiny_bench.report, tiny_bench.stdout
    gflop = r["flops_per_window"] / 1e9
    assert f"Bundle `tiny.msn` (tiny), 10 s windows, {gflop:.4g} GFLOP per window" in text
    assert "speed-up vs pytorch-eager" in text
    rows = {
        cells[0]: cells
        for line in text.splitlines()
        if line.startswith("| ") and (cells := [x.strip() for x in line.strip("|").split("|")])
    }
    for name in CPU_ROWS:
        c = _cases(r)[name]
        cells = rows[name]  # backend, latency, p50, p90, p99, windows/s @1, @batch, ...
        assert cells[5] == f"{c['throughput1_wps']:.1f}"
        assert cells[6] == f"{c['throughput_n_wps']:.1f}"
        assert cells[9] == f"{c['rtf']:.4f}"
    for c in r["cases"]:
        if c["status"] != "ok":
            assert f"- {c['name']}: {c['status']}, {c['reason']}" in text
            assert f"| {c['name']} |" not in text
