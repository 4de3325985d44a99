"""`msn-edge bench`: latency, throughput, memory and cold start of every backend, in one run.

The PyTorch eager baseline (`eager_engine`) lives here rather than in the runtime, which
never imports torch; torch is imported only inside it, in the baseline's own process.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from msn_edge.cli import common, main
from msn_edge.cli.common import setup_logging, user_errors
from msn_edge.runtime.errors import BackendError


class EagerEngine:
    """The training checkpoint's MSN in PyTorch eager mode, with the runtime Engine's API."""

    name = "pytorch-eager"
    precision = "fp32"

    def __init__(self, model) -> None:
        self.model = model.eval()

    def embed(self, spec, spectrum):
        import torch
        import torch.nn.functional as F

        with torch.inference_mode():
            emb = self.model(torch.from_numpy(spec), torch.from_numpy(spectrum))
            return F.normalize(emb, dim=1).numpy()


def eager_engine(bundle, case, settings, checkpoint: str) -> EagerEngine:
    """Bench factory (see runtime.bench.Case): the checkpoint that `bundle` was exported from."""
    import torch

    from msn_edge.checkpoint import load_checkpoint

    torch.set_num_threads(settings.threads)
    run = load_checkpoint(checkpoint)
    if run.config.frontend != bundle.frontend:
        raise BackendError(
            f"{checkpoint}: its front-end ({run.config.frontend.window_s:g} s windows) is "
            f"not the bundle's ({bundle.frontend.window_s:g} s): pass the run it was exported from"
        )
    return EagerEngine(run.model)


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
    from msn_edge.runtime.bench import BenchSettings, run_benchmark, select_cases

    settings = BenchSettings(iterations=iterations, warmup=warmup, batch=batch, threads=threads)
    cases = select_cases(backends)
    with _Progress() as progress:
        report = run_benchmark(
            bundle, settings, cases=cases, checkpoint=checkpoint, on_step=progress.step
        )
        profiles = _profiles(bundle, settings, cases) if profile else []
    from msn_edge.runtime.bench import format_report
    from msn_edge.runtime.profile import format_profile

    click.echo(format_report(report))
    for p in profiles:
        click.echo(format_profile(p))
    if json_path is not None:
        data = report.to_dict()
        data["profiles"] = [p.to_dict() for p in profiles]
        json_path.write_text(json.dumps(data, indent=2) + "\n")


def _profiles(bundle_path: Path, settings, cases) -> list:
    """Per-op profiles of the bundle's CPU models that the selected rows use."""
    from msn_edge.runtime.bench import synthetic_windows
    from msn_edge.runtime.bundle import read_bundle
    from msn_edge.runtime.frontend import features
    from msn_edge.runtime.profile import profile_model

    bundle = read_bundle(bundle_path)
    fe = bundle.frontend
    inputs = features(synthetic_windows(fe.window_samples, 1, settings.seed), fe)
    models = {"fp32": bundle.model_bytes("fp32")}
    if "int8" in bundle.variants:
        models["int8"] = bundle.int8_for_cpu()  # the model the ort-cpu-int8 row runs
    wanted = [c.precision for c in cases if c.backend == "cpu"]
    return [
        profile_model(
            model,
            inputs,
            threads=settings.threads,
            runs=max(1, min(settings.iterations, 10)),
            warmup=max(1, settings.warmup),
            label=f"ort-cpu-{p}",
        )
        for p, model in models.items()
        if p in wanted
    ]


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
