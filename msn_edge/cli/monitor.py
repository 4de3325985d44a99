"""`msn-edge monitor`, `devices` and `plot`: the edge box's commands (no torch)."""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Iterator
from pathlib import Path

import click

from msn_edge.cli import main
from msn_edge.cli.common import setup_logging, user_errors
from msn_edge.runtime.capture import CAPTURES, list_input_devices, open_device
from msn_edge.runtime.detector import Detector
from msn_edge.runtime.engines import BACKENDS, PRECISIONS
from msn_edge.runtime.enroll import enroll_first
from msn_edge.runtime.errors import MsnEdgeError
from msn_edge.runtime.events import EventSink
from msn_edge.runtime.monitor import run_monitor
from msn_edge.runtime.plot import plot_timeline
from msn_edge.runtime.sources import Source, open_input

log = logging.getLogger("msn_edge.monitor")


@contextlib.contextmanager
def _stop_on_signals(source: Source) -> Iterator[None]:
    """First SIGINT/SIGTERM: finish the current window and stop; a second one: at once.

    The previous handlers come back afterwards (the command may run inside a test).
    """
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum: int, _frame) -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)
        log.info("%s: stopping", signal.Signals(signum).name)
        source.stop()

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@main.command()
@click.argument("bundle", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "-d",
    "--device",
    metavar="NAME",
    help="ALSA input: hw:1, plughw:1,0, default, or a PCM from an asoundrc.",
)
@click.option(
    "-i",
    "--input",
    "input_path",
    metavar="FILE|-",
    help="WAV/FLAC file, or - for raw s16le mono on stdin.",
)
@click.option("--realtime", is_flag=True, help="Pace --input FILE like a live microphone.")
@click.option(
    "--hop",
    "hop_s",
    type=float,
    metavar="SECONDS",
    help="Time between window starts [default: the window; shorter overlaps].",
)
@click.option(
    "--alarm-after",
    type=click.IntRange(min=0),
    default=3,
    show_default=True,
    metavar="K",
    help="Alarm after K anomalous windows in a row (0: no alarms).",
)
@click.option(
    "--events-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also append every event here, flushed and fsynced per line.",
)
@click.option(
    "--max-windows", type=click.IntRange(min=1), metavar="N", help="Stop after N windows."
)
@click.option(
    "--duration",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="Stop after this much audio.",
)
@click.option(
    "--backend",
    type=click.Choice(BACKENDS),
    default="auto",
    show_default=True,
    help="Inference backend; auto takes the best one available.",
)
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default="fp32",
    show_default=True,
    help="Model precision: int8 needs a bundle with an int8 model, fp16 a TensorRT backend.",
)
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads for inference.")
@click.option("--threshold", type=float, help="Override the bundle's decision threshold.")
@click.option("--group", help="Scoring group (machine type/ID) when the bundle has several.")
@click.option(
    "--capture",
    type=click.Choice(CAPTURES),
    default="auto",
    show_default=True,
    help="How --device is read: arecord (any ALSA name) or PortAudio.",
)
@click.option(
    "--enroll-first",
    "enroll_minutes",
    type=click.FloatRange(min=0, min_open=True),
    metavar="MINUTES",
    help="First listen this long to normal running and enroll it as --group into a new "
    "bundle beside BUNDLE (see `msn-edge enroll`), then monitor with that.",
)
@click.option("-v", "--verbose", is_flag=True, help="Debug logs.")
@user_errors
def monitor(
    bundle: Path,
    device: str | None,
    input_path: str | None,
    realtime: bool,
    hop_s: float | None,
    alarm_after: int,
    events_file: Path | None,
    max_windows: int | None,
    duration: float | None,
    backend: str,
    precision: str,
    threads: int | None,
    threshold: float | None,
    group: str | None,
    capture: str,
    enroll_minutes: float | None,
    verbose: bool,
) -> None:
    """Score audio window by window: one JSON event per line on stdout.

    Each window of the bundle's length gets a score, a verdict, its latency and input
    health; K anomalous windows in a row raise an alarm event, the next normal window
    clears it. Logs and a start/stop summary go to stderr. SIGINT or SIGTERM stop after
    the current window.

    Example:

    \b
      msn-edge monitor fan.msn --device plughw:1,0 --events-file events.jsonl
      arecord -t raw -f S16_LE -r 16000 -c 1 | msn-edge monitor fan.msn --input -
      msn-edge monitor fan.msn --input recording.wav --hop 5
      msn-edge monitor fan.msn --device plughw:1,0 --group fan/id_07 --enroll-first 5
    """
    setup_logging(verbose)
    if (device is None) == (input_path is None):
        raise click.UsageError("give exactly one of --device NAME or --input FILE|-")
    if realtime and device is not None:
        raise click.UsageError("--realtime paces --input FILE; a device is live already")
    if enroll_minutes is not None and group is None:
        raise click.UsageError("--enroll-first needs --group NAME: the machine it enrolls")
    with contextlib.ExitStack() as stack:
        detector = Detector.open(
            bundle,
            backend=backend,
            precision=precision,
            threads=threads,
            group=None if enroll_minutes else group,  # a new machine is no group yet
            threshold=threshold,
        )
        stack.callback(detector.close)
        rate = detector.frontend.sample_rate
        if device is not None:
            source = open_device(device, rate, capture=capture)
        else:
            source = open_input(input_path, rate, realtime=realtime)
        stack.enter_context(source)
        sink = stack.enter_context(contextlib.closing(EventSink(events_file=events_file)))
        stack.enter_context(_stop_on_signals(source))
        if enroll_minutes is not None:
            detector, _ = enroll_first(
                detector, source, enroll_minutes, group=group, hop_s=hop_s, threshold=threshold
            )
        run_monitor(
            source,
            detector,
            sink,
            hop_s=hop_s,
            alarm_after=alarm_after or None,
            max_windows=max_windows,
            max_seconds=duration,
        )


@main.command()
@user_errors
def devices() -> None:
    """List the audio inputs `monitor --device` can capture from.

    Hardware devices come as hw:CARD,DEV (native rates only) and plughw:CARD,DEV (ALSA
    converts to 16 kHz mono); named PCMs (default, dsnoop, asoundrc entries) follow.

    Example:

    \b
      msn-edge devices
    """
    found = list_input_devices()
    if not found:
        raise MsnEdgeError("no audio inputs found (is the microphone plugged in?)")
    width = max(len(d.name) for d in found)
    for d in found:
        click.echo(f"{d.name:<{width}}  {d.description}".rstrip())


@main.command()
@click.argument("events", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("timeline.png"),
    show_default=True,
    help="PNG to write.",
)
@click.option("--title", help="Plot title [default: file name and counts].")
@user_errors
def plot(events: Path, output: Path, title: str | None) -> None:
    """Draw a monitor events file: scores, threshold, anomalous windows and alarms.

    Example:

    \b
      msn-edge plot events.jsonl -o timeline.png
    """
    click.echo(str(plot_timeline(events, output, title=title)))
