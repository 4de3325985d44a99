"""`msn-edge enroll`: a thin layer over msn_edge.runtime.enroll (no torch)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import click

from msn_edge.cli import main
from msn_edge.cli.common import (
    alsa_device_option,
    backend_option,
    capture_option,
    group_option,
    hop_option,
    precision_option,
    setup_logging,
    threads_option,
    user_errors,
    verbose_option,
)
from msn_edge.runtime.bundle import read_bundle
from msn_edge.runtime.capture import open_device
from msn_edge.runtime.engines import make_engine
from msn_edge.runtime.enroll import check_output, enroll
from msn_edge.runtime.enroll_feed import open_feed, source_feed
from msn_edge.runtime.enroll_fit import EnrollOptions
from msn_edge.runtime.history import record_line


@main.command("enroll")
@click.argument("bundle", type=click.Path(dir_okay=False, path_type=Path))
@group_option(required=True)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The new bundle (never the input one).",
)
@alsa_device_option()
@click.option("-i", "--input", "input_path", metavar="FILE|DIR|-", help="Recording(s) or stdin.")
@click.option(
    "--minutes",
    type=click.FloatRange(min=0, min_open=True),
    help="Listen this long (needed with --device; with --input, read at most this much).",
)
@click.option("--update", is_flag=True, help="Add to the group's normal instead of replacing it.")
@hop_option
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
@backend_option
@precision_option
@threads_option()
@capture_option
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the audit record as JSON.")
@verbose_option
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
    parent = read_bundle(bundle)
    options = EnrollOptions(
        group=group,
        update=update,
        hop_s=hop_s,
        max_seconds=None if minutes is None else 60.0 * minutes,
        quantile=quantile,
        false_alarms_per_day=false_alarms_per_day,
    )
    hop = options.hop(parent.frontend)
    check_output(parent.path, output, force=force)  # before minutes of listening
    engine = make_engine(parent, backend, precision=precision, threads=threads)  # fp32 default
    with contextlib.ExitStack() as stack:
        stack.callback(engine.close)
        if device is not None:
            source = stack.enter_context(
                open_device(device, parent.frontend.sample_rate, capture=capture)
            )
            feed = source_feed(source, parent.frontend, hop, max_seconds=options.max_seconds)
        else:
            feed = open_feed(input_path, parent.frontend, hop, options.max_seconds)
        result = enroll(parent, engine, feed, output, options, force=force)
    if as_json:
        click.echo(json.dumps(result.record, indent=2))
    else:
        click.echo(f"wrote {result.path}")
        click.echo(record_line(result.record))
