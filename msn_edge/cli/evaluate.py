"""`msn-edge evaluate` (DCASE metrics of a run on a data set) and `msn-edge score` (files)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import click

from msn_edge.cli import common, main
from msn_edge.cli.common import echo_stdout, given, setup_logging, user_errors
from msn_edge.runtime.bundle import looks_like_bundle
from msn_edge.runtime.errors import MsnEdgeError

VERDICT_WORDS = {"normal": "normal", "anomalous": "ANOMALY", "invalid": "INVALID"}


@main.command("evaluate")
@click.argument("run", type=click.Path(exists=True, path_type=Path))
@common.path_option(
    "--data",
    folder=True,
    exists=True,
    required=True,
    help="Data set root in DCASE layout: <type>/train and <type>/test.",
)
@common.path_option("--out", folder=True, help="Folder for the reports  [default: RUN/eval]")
@common.torch_device_option
@click.option(
    "--refit-scoring",
    is_flag=True,
    help="Fit prototypes and thresholds on DATA's train split instead of using the run's.",
)
@common.verbose_option
@user_errors
def evaluate_command(
    run: Path, data: Path, out: Path | None, device: str | None, refit_scoring: bool, verbose: bool
) -> None:
    """Score DATA's test clips with RUN and report AUC / pAUC by the DCASE rules.

    RUN is a training run folder (or a checkpoint in it). DCASE 2020 data gets AUC and
    pAUC per machine ID and their mean; DCASE 2023 data gets AUC source / target and
    pAUC per section and their harmonic mean. The table goes to stdout; the
    anomaly_score_*.csv / decision_result_*.csv files, results.md / results.json and
    roc.png go to --out.

    Example:

    \b
        msn-edge evaluate runs/fan --data data/dcase2020 --out runs/fan/eval
    """
    setup_logging(verbose)
    from msn_edge.evaluate import EVAL_DIR, evaluate, run_dir_of

    out_dir = out or run_dir_of(run) / EVAL_DIR
    results = evaluate(
        run, data, out_dir=out_dir, device=device or "cpu", refit_scoring=refit_scoring
    )
    click.echo(results.to_markdown(), nl=False)
    click.echo(f"wrote scores, decisions, results.md/json and roc.png to {out_dir}", err=True)


@main.command("score")
@click.argument("model", type=click.Path(exists=True, path_type=Path))
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line instead of TSV.")
@common.group_option()
@common.backend_option
@common.precision_option
@common.torch_device_option
@click.option("--downmix", is_flag=True, help="Average multi-channel files to mono.")
@click.option("--resample", is_flag=True, help="Resample files to the model's sample rate.")
@click.pass_context
@user_errors
def score_command(
    ctx: click.Context,
    model: Path,
    files: tuple[Path, ...],
    as_json: bool,
    group: str | None,
    backend: str,
    precision: str,
    device: str | None,
    downmix: bool,
    resample: bool,
) -> None:
    """Print an anomaly score and verdict for each audio FILE.

    MODEL is a bundle (.msn, scored with the torch-free runtime) or a training run
    folder / checkpoint (scored with torch). One line per file:
    path<TAB>score<TAB>normal|ANOMALY|INVALID, or a JSON object with --json. A file
    longer than the model's window is judged window by window (the last one aligned to
    the file's end) and gets its worst window's score. Audio that cannot be judged
    (NaN/inf samples, digital silence) is INVALID with the reason on stderr, never
    normal. A file that cannot be scored gets a one-line error on stderr, the others are
    still scored, and the exit status is 1 (also after an INVALID file).

    Example:

    \b
        msn-edge score fan.msn recordings/*.wav
        msn-edge score runs/fan --json clip.wav
    """
    if looks_like_bundle(model):
        if device is not None:
            raise click.UsageError("--device is for a run; a bundle takes --backend")
        from msn_edge.runtime.detector import Detector

        scorer = Detector.open(model, backend=backend, precision=precision, group=group)
    else:
        if given(ctx, "backend", "precision"):
            raise click.UsageError(
                "--backend and --precision are for a bundle; a run takes --device"
            )
        from msn_edge.evaluate import RunScorer

        scorer = RunScorer.open(model, group=group, device=device or "cpu")
    failed = 0
    for path in files:
        try:
            r = scorer.score_file(path, downmix=downmix, resample=resample)
        except (MsnEdgeError, ValueError, RuntimeError, OSError, MemoryError) as e:
            # One bad file never stops the batch: it is named, the rest are scored.
            text = str(e) if isinstance(e, MsnEdgeError) else f"cannot score it ({e!r:.200})"
            msg = text if str(path) in text else f"{path}: {text}"
            click.echo(f"Error: {msg}", err=True)
            failed += 1
            continue
        if r.invalid:
            click.echo(f"Warning: {path}: {r.invalid}", err=True)
            failed += r.verdict == "invalid"
        if r.windows > 1 or r.tiled:
            how = (
                f"{r.duration_s:g} s, shorter than a window: tiled to length"
                if r.tiled
                else f"{r.windows} windows over {r.duration_s:g} s, worst at {r.worst_start_s:g} s"
            )
            click.echo(f"{path}: {how}", err=True)
        if as_json:
            echo_stdout(json.dumps(r.to_dict(str(path)), allow_nan=False))
        else:
            shown = f"{r.score:.6f}" if math.isfinite(r.score) else "-"
            echo_stdout(f"{path}\t{shown}\t{VERDICT_WORDS[r.verdict]}")
    if failed:
        ctx.exit(1)
