"""`msn-edge enroll`: a thin layer over msn_edge.runtime.enroll (no torch)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from msn_edge.cli import common, main
from msn_edge.cli.common import setup_logging, user_errors
from msn_edge.runtime.enroll import enroll_from
from msn_edge.runtime.enroll_fit import EnrollOptions
from msn_edge.runtime.history import record_line


@main.command("enroll")
@click.argument("bundle", type=click.Path(dir_okay=False, path_type=Path))
@common.group_option(required=True)
@common.path_option("-o", "--output", required=True, help="The new bundle (never the input one).")
@common.alsa_device_option()
@click.option("-i", "--input", "input_path", metavar="FILE|DIR|-", help="Recording(s) or stdin.")
@common.minutes_option(
    "--minutes",
    help="Listen this long (needed with --device; with --input, read at most this much).",
)
@click.option("--update", is_flag=True, help="Add to the group's normal instead of replacing it.")
@common.hop_option
@click.option(
    "--quantile",
    type=float,
    help="Threshold = this quantile of held-out normal scores [default: 0.95].",
)
@click.option(
    "--false-alarms-per-day",
    type=float,
    metavar="N",
    help="Threshold for N anomalous windows a day on normal running, at --hop.",
)
@common.backend_option
@common.precision_option
@common.threads_option()
@common.capture_option
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the audit record as JSON.")
@common.verbose_option
@user_errors
def enroll_command(
    bundle: Path,
    group: str,
    output: Path,
    device: str | None,
    input_path: str | None,
    minutes: float | None,
    update: bool,
    hop_s: float | None,
    quantile: float | None,
    false_alarms_per_day: float | None,
    backend: str,
    precision: str,
    threads: int | None,
    capture: str,
    force: bool,
    as_json: bool,
    verbose: bool,
) -> None:
    """Enroll a machine from its normal running: new prototypes and threshold, no training.

    The bundle's own model embeds the audio; the group's prototypes are fit as training
    fits them and its threshold is calibrated on windows held out from the fit. A new
    group is added, an existing one replaced, or with --update extended (its old and new
    normal both count). The model is carried over byte for byte, an audit record is
    appended (`msn-edge info NEW.msn` shows the history), and the enrolled group becomes
    the new bundle's default.

    Example:

    \b
      msn-edge enroll fan.msn --group fan/id_07 --device plughw:1,0 --minutes 5 -o fan7.msn
      msn-edge enroll fan.msn --group fan/id_07 --input normal/ -o fan7.msn
      arecord -t raw -f S16_LE -r 16000 -c 1 -d 300 | \\
        msn-edge enroll fan.msn --group fan/id_07 --input - -o fan7.msn
      msn-edge enroll fan7.msn --group fan/id_07 --update --input after-service.wav \\
        --false-alarms-per-day 1 -o fan7b.msn
    """
    setup_logging(verbose)
    if (device is None) == (input_path is None):
        raise click.UsageError("give exactly one of --device NAME or --input FILE|DIR|-")
    if device is not None and minutes is None:
        raise click.UsageError("--device needs --minutes: how long to listen")
    options = EnrollOptions(
        group=group,
        update=update,
        hop_s=hop_s,
        max_seconds=None if minutes is None else 60.0 * minutes,
        quantile=quantile,
        false_alarms_per_day=false_alarms_per_day,
    )
    result = enroll_from(
        bundle,
        output,
        options,
        device=device,
        input_path=input_path,
        backend=backend,
        precision=precision,  # fp32 unless asked: the monitor's default
        threads=threads,
        capture=capture,
        force=force,
    )
    if as_json:
        click.echo(json.dumps(result.record, indent=2))
    else:
        click.echo(f"wrote {result.path}")
        click.echo(record_line(result.record))
