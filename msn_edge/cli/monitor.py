"""`msn-edge monitor`, `devices` and `plot`: the edge box's commands (no torch)."""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import click

from msn_edge.cli import common, main
from msn_edge.cli.common import FiniteFloat, given, setup_logging, user_errors
from msn_edge.runtime.assemble import enroll_first_config, open_monitor
from msn_edge.runtime.capture import list_input_devices
from msn_edge.runtime.errors import MsnEdgeError
from msn_edge.runtime.events import EventSink
from msn_edge.runtime.monitor_config import (
    BatchPolicy,
    MonitorConfig,
    simple_config,
    with_outputs,
)
from msn_edge.runtime.monitor_toml import load_config
from msn_edge.runtime.plot import plot_timeline
from msn_edge.runtime.sdnotify import Notifier

log = logging.getLogger("msn_edge.monitor")


@contextlib.contextmanager
def _stop_on_signals(stop: Callable[[], None]) -> Iterator[None]:
    """First SIGINT/SIGTERM: finish the windows in hand and stop; a second one: at once.

    The previous handlers come back afterwards (the command may run inside a test).
    """
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum: int, _frame) -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)
        log.info("%s: stopping", signal.Signals(signum).name)
        stop()

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class Fanout:
    """Hands every event to every sink, in order: the metrics (in memory, cannot fail) first,
    so that an event already printed is already counted; then stdout/file, the durable
    record; then MQTT."""

    def __init__(self, sinks: list[Callable[[dict], None]]) -> None:
        self.sinks = sinks

    def __call__(self, event: dict) -> None:
        for sink in self.sinks:
            sink(event)


STREAM_OPTIONS = (
    "hop_s",
    "alarm_after",
    "backend",
    "precision",
    "threads",
    "threshold",
    "group",
    "allow_not_recommended",
)


def _config(
    ctx: click.Context, bundle: Path | None, config_path: Path | None, **kw
) -> MonitorConfig:
    """The monitor's configuration from --config, or from the command line's simple forms."""
    devices, inputs = kw.pop("devices"), kw.pop("inputs")
    if config_path is not None:
        if devices or inputs:
            raise click.UsageError("--config describes the inputs; drop --device/--input")
        named = ["--" + o.replace("_s", "").replace("_", "-") for o in given(ctx, *STREAM_OPTIONS)]
        if named:
            raise click.UsageError(
                f"with --config, stream settings come from the file; drop {', '.join(named)}"
            )
        config = load_config(config_path)
        if bundle is not None:
            raise click.UsageError("with --config, bundles are named in the file")
        return config
    if not devices and not inputs or devices and inputs:
        raise click.UsageError(
            "give exactly one of --device NAME or --input FILE|- (repeat it for several "
            "streams), or a --config FILE"
        )
    if bundle is None:
        raise click.UsageError("missing argument BUNDLE")
    if kw["realtime"] and devices:
        raise click.UsageError("--realtime paces --input FILE; a device is live already")
    if kw["channels"] != 1 and not devices:
        raise click.UsageError("--channels is for a multi-channel --device")
    settings = {o: kw[o] for o in STREAM_OPTIONS}
    return simple_config(
        bundle,
        devices=devices,
        inputs=inputs,
        channels=kw["channels"],
        realtime=kw["realtime"],
        capture=kw["capture"],
        name=kw["name"],
        **settings,
    )


@main.command()
@click.argument("bundle", type=click.Path(dir_okay=False, path_type=Path), required=False)
@common.alsa_device_option(multiple=True)
@click.option(
    "-i",
    "--input",
    "inputs",
    metavar="FILE|-",
    multiple=True,
    help="WAV/FLAC file, a FIFO, or - for raw s16le mono on stdin. Repeatable.",
)
@common.path_option(
    "-c",
    "--config",
    "config_path",
    help="TOML file: inputs, streams, batching and outputs (docs/operating.md).",
)
@common.count_option(
    "--channels",
    default=1,
    show_default=True,
    help="Capture N channels of each --device, one stream per channel.",
)
@click.option("--name", help="The stream's name in events [default: from the device or file].")
@click.option("--realtime", is_flag=True, help="Pace --input FILE like a live microphone.")
@common.hop_option
@click.option(
    "--alarm-after",
    type=click.IntRange(min=0),
    default=3,
    show_default=True,
    metavar="K",
    help="Alarm after K anomalous windows in a row (0: no alarms).",
)
@common.path_option(
    "--events-file", help="Also append every event here, flushed and fsynced per line."
)
@common.count_option("--max-windows", help="Stop after N windows (per stream).")
@common.seconds_option("--duration", help="Stop after this much audio (per stream).")
@common.backend_option
@common.precision_option
@click.option(
    "--allow-not-recommended",
    is_flag=True,
    help="Run an int8 model even though the export marked it not recommended (it lost "
    "more than 1 AUC point against fp32).",
)
@common.threads_option()
@click.option(
    "--threshold",
    type=FiniteFloat(min=0, max=2),
    help="Override the bundle's decision threshold (a cosine distance, 0 to 2).",
)
@common.group_option()
@common.capture_option
@common.count_option(
    "--max-batch",
    help=f"Windows per engine call across streams [default: {BatchPolicy.max_batch}].",
)
@common.seconds_option(
    "--max-wait",
    low_open=False,
    help="Latency budget: longest a ready window waits for others to batch with "
    f"[default: {BatchPolicy.max_wait_s}].",
)
@click.option(
    "--mqtt", "mqtt_url", metavar="URL", help="Publish to a broker: mqtt[s]://[user@]host[:port]."
)
@click.option("--mqtt-topic", metavar="PREFIX", help="Topic prefix [default: msn-edge/HOSTNAME].")
@click.option("--mqtt-client-id", metavar="ID", help="MQTT client id [default: from the prefix].")
@click.option("--mqtt-username", metavar="USER", help="Broker user name (or in the URL).")
@common.path_option(
    "--mqtt-password-file",
    help="File holding the broker password ($MSN_EDGE_MQTT_PASSWORD also works).",
)
@common.path_option("--mqtt-ca", help="CA file for TLS.")
@common.path_option("--mqtt-cert", help="Client certificate (TLS).")
@common.path_option("--mqtt-key", help="Client key (TLS).")
@common.path_option(
    "--mqtt-queue", folder=True, help="Folder of the on-disk queue kept while the broker is away."
)
@common.count_option(
    "--mqtt-queue-max",
    help="Events the queue holds; beyond it the oldest are dropped and counted [100000].",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(min=0, max=65535),
    metavar="PORT",
    help="Serve Prometheus metrics on this port (0: any free port, logged).",
)
@click.option(
    "--metrics-addr",
    metavar="ADDR",
    help="Address the metrics endpoint listens on [default: 0.0.0.0].",
)
@common.minutes_option(
    "--enroll-first",
    "enroll_minutes",
    help="First listen this long to normal running and enroll it as --group into a new "
    "bundle beside BUNDLE (see `msn-edge enroll`), then monitor with that.",
)
@common.verbose_option
@click.pass_context
@user_errors
def monitor(
    ctx: click.Context,
    bundle: Path | None,
    config_path: Path | None,
    events_file: Path | None,
    max_windows: int | None,
    duration: float | None,
    max_batch: int | None,
    max_wait: float | None,
    metrics_port: int | None,
    metrics_addr: str | None,
    enroll_minutes: float | None,
    verbose: bool,
    **kw,
) -> None:
    """Score audio window by window: one JSON event per line on stdout.

    Each window of the bundle's length gets a score, a verdict, its latency and input
    health; K anomalous windows in a row raise an alarm event, the next normal window
    clears it. One process monitors many streams (channels of a multi-channel device,
    several devices, files or FIFOs); streams of one bundle are scored in batches by one
    engine. Events can also go to an MQTT broker, and metrics to Prometheus. Logs and a
    start/stop summary go to stderr. SIGINT or SIGTERM stop after the windows in hand.

    Example:

    \b
      msn-edge monitor fan.msn --device plughw:1,0 --events-file events.jsonl
      arecord -t raw -f S16_LE -r 16000 -c 1 | msn-edge monitor fan.msn --input -
      msn-edge monitor fan.msn --input recording.wav --hop 5
      msn-edge monitor fan.msn --device hw:2,0 --channels 4 --mqtt mqtt://broker
      msn-edge monitor --config /etc/msn-edge/monitor.toml --metrics-port 9108
      msn-edge monitor fan.msn --device plughw:1,0 --group fan/id_07 --enroll-first 5
    """
    setup_logging(verbose)
    if enroll_minutes is not None and kw["group"] is None:
        raise click.UsageError("--enroll-first needs --group NAME: the machine it enrolls")
    if enroll_minutes is not None and config_path is not None:
        raise click.UsageError("--enroll-first enrolls one --device or --input; not with --config")
    mqtt_kw = {k: kw.pop(k) for k in list(kw) if k.startswith("mqtt")}
    config = _config(ctx, bundle, config_path, **kw)
    config = with_outputs(
        config,
        events_file=events_file,
        max_batch=max_batch,
        max_wait_s=max_wait,
        metrics_port=metrics_port,
        metrics_addr=metrics_addr,
        **mqtt_kw,
    )
    notifier = Notifier.from_env()
    with contextlib.ExitStack() as stack:
        stack.callback(notifier.close)
        opened = None
        if enroll_minutes is not None:  # before any sink: a failed enrollment publishes nothing
            notifier.ready(f"enrolling {kw['group']} for {enroll_minutes:g} min")
            config, opened, _ = enroll_first_config(
                config,
                stack,
                enroll_minutes,
                stop_on_signals=_stop_on_signals,
                tick=notifier.ping,
            )
        sinks: list[Callable[[dict], None]] = [
            stack.enter_context(contextlib.closing(EventSink(events_file=config.events_file)))
        ]
        observer = None
        metrics = None
        if config.metrics_port is not None:
            from msn_edge.runtime.metrics_sink import MetricsSink

            metrics = MetricsSink.start(config.metrics_port, config.metrics_addr)
            stack.callback(metrics.close)
            observer = metrics
        if config.mqtt is not None:
            from msn_edge.runtime.mqtt_sink import MqttSink

            mqtt = MqttSink.start(config.mqtt, [s.name for s in config.streams])
            stack.callback(mqtt.close)
            sinks.append(mqtt)
            if metrics is not None:
                metrics.watch_mqtt(mqtt)
        if metrics is not None:
            sinks.insert(0, metrics)
        mon = open_monitor(
            config,
            Fanout(sinks),
            stack,
            max_windows=max_windows,
            max_seconds=duration,
            observer=observer,
            tick=notifier.ping,
            opened=opened,
        )
        if metrics is not None:
            metrics.describe(mon)
        stack.enter_context(_stop_on_signals(mon.stop))
        notifier.ready(f"monitoring {len(config.streams)} stream(s)")
        try:
            mon.run()
        finally:
            notifier.stopping()


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
@common.path_option(
    "-o", "--output", default=Path("timeline.png"), show_default=True, help="PNG to write."
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
