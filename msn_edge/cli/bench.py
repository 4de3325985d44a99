"""`msn-edge bench`: latency, throughput, memory and cold start of every backend, in one run.

A click layer over msn_edge.benchmarks (the benchmarks/ folder), imported when the
command runs; the PyTorch eager baseline lives there, imported only in its own process.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from msn_edge.cli import common, main
from msn_edge.cli.common import setup_logging, user_errors


@main.command("bench")
@click.argument("bundle", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--backend",
    "backends",
    multiple=True,
    metavar="NAME",
    help="Only these rows, by name or prefix (repeatable): pytorch-eager, ort-cpu-fp32, "
    "ort-cpu-int8, ort-cuda, ort-tensorrt, tensorrt, ...  [default: all]",
)
@click.option(
    "--batch", default=8, show_default=True, help="The larger batch (batch 1 always runs)."
)
@click.option("--iterations", default=20, show_default=True, help="Timed calls per batch size.")
@click.option("--warmup", default=3, show_default=True, help="Untimed calls before timing.")
@common.threads_option(default=os.cpu_count() or 1)
@click.option(
    "--checkpoint",
    type=click.Path(exists=True, path_type=Path),
    help="Training run the bundle was exported from: adds the PyTorch eager baseline.",
)
@common.path_option("--json", "json_path", help="Also write the full report as JSON here.")
@click.option(
    "--profile",
    is_flag=True,
    help="Also print ONNX Runtime's per-op profile of the CPU model(s): by op type and by "
    "node-name prefix.",
)
@common.verbose_option
@user_errors
def bench_command(
    bundle: Path,
    backends: tuple[str, ...],
    batch: int,
    iterations: int,
    warmup: int,
    threads: int,
    checkpoint: Path | None,
    json_path: Path | None,
    profile: bool,
    verbose: bool,
) -> None:
    """Benchmark BUNDLE on every backend this machine has, in one run.

    Per backend, each in its own process: inference latency (mean, std, p50/p90/p99) at
    batch 1, throughput at batch 1 and --batch, achieved GFLOP/s as a share of a GEMM peak
    of the same precision measured in the same run, real-time factor, peak memory and
    cold start (process start to first score). The backends are timed interleaved, one
    call each per round, so the ratios between them are fair on a busy machine; all of
    them stay loaded meanwhile (pick fewer with --backend on a small board). Backends
    that cannot run here are listed with the reason. The table (markdown) goes to stdout.

    Example:

    \b
        msn-edge bench fan.msn --checkpoint runs/fan --json bench.json
        msn-edge bench fan.msn --backend ort-cpu --threads 4 --profile
    """
    setup_logging(verbose)
    from msn_edge.benchmarks.cases import BenchSettings
    from msn_edge.benchmarks.runner import bench_bundle

    settings = BenchSettings(iterations=iterations, warmup=warmup, batch=batch, threads=threads)
    with _Progress() as progress:
        run = bench_bundle(
            bundle,
            settings,
            backends=backends,
            checkpoint=checkpoint,
            profile=profile,
            on_step=progress.step,
        )
    click.echo(run.markdown(), nl=False)
    if json_path is not None:
        json_path.write_text(json.dumps(run.to_dict(), indent=2) + "\n")


class _Progress:
    """A progress bar on stderr over the benchmark's steps, started by the first step."""

    def __init__(self) -> None:
        self._bar = None

    def step(self, name: str, done: int, total: int) -> None:
        if self._bar is None:
            self._bar = click.progressbar(length=total, label="bench", file=sys.stderr).__enter__()
        self._bar.label = f"bench: {name}"
        self._bar.update(done - self._bar.pos)

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
