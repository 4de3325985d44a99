"""`msn-edge export`: a training run -> one bundle file (a thin layer over export.pack)."""

from __future__ import annotations

from pathlib import Path

import click

from msn_edge.cli import common, main
from msn_edge.cli.common import setup_logging, user_errors
from msn_edge.export import FORMATS
from msn_edge.runtime.engines import PRECISIONS


@main.command("export")
@click.argument("run", type=click.Path(exists=True, path_type=Path))
@common.path_option(
    "-o", "--output", "out", required=True, help="Bundle file to write, e.g. fan.msn."
)
@click.option(
    "--int8",
    is_flag=True,
    help="Also static int8 (Q/DQ) models, one for ONNX Runtime CPU and one for TensorRT, "
    "calibrated on the run's normal training clips.",
)
@common.choice_option(
    "--format",
    "fmt",
    choices=FORMATS,
    default="onnx",
    help="engine: also build and cache a TensorRT engine (run this on the target device).",
)
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default=None,
    help="TensorRT engine precision (with --format engine)  [default: fp32]",
)
@click.option(
    "--eval-data",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Data set whose test clips give AUC/pAUC of the fp32 (and int8) model.",
)
@common.threads_option()
@common.verbose_option
@user_errors
def export_command(run, out, int8, fmt, precision, eval_data, threads, verbose) -> None:
    """Export the trained model of RUN (a run folder or checkpoint) to a bundle file.

    The bundle holds the ONNX model (the scan rewritten as a few gathers per box, batch
    dimension dynamic), optionally its int8 twin, the run's prototypes and thresholds
    and the front-end settings. Every export checks ONNX Runtime against PyTorch and
    writes nothing if they differ. The export report is printed as a table (and kept
    in the bundle).

    Example:

    \b
        msn-edge export runs/fan -o fan.msn
        msn-edge export runs/fan -o fan.msn --int8 --eval-data data/fan
        msn-edge export runs/fan -o fan.msn --format engine --precision fp16
    """
    setup_logging(verbose)
    from msn_edge.export.pack import ExportOptions, export_bundle

    options = ExportOptions(
        int8=int8, format=fmt, precision=precision, eval_data=eval_data, threads=threads
    )
    report = export_bundle(run, out, options)
    click.echo(report.to_markdown(), nl=False)
