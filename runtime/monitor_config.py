"""What a monitor listens to: inputs, streams, batching and outputs, from TOML or the CLI.

An *input* is one thing to open: a capture device (all its channels at once), a WAV/FLAC
file, or raw PCM on stdin or a FIFO. A *stream* is one machine: one channel of one
input, scored with one bundle and scoring group, with its own hop, alarm rule and
threshold. Several streams of one bundle share one engine and are scored in batches.

    [defaults]                  # any stream setting, for every stream
    bundle = "fan.msn"
    alarm_after = 3

    [inputs.usb]                # a 4-channel interface, captured once
    device = "hw:CARD=USB,DEV=0"
    channels = 4

    [[streams]]
    name = "fan-1"
    input = "usb"
    channel = 0
    group = "fan/id_00"

    [[streams]]
    name = "pump"
    file = "pump.wav"           # or device = "plughw:2,0", or file = "-" (stdin)
    bundle = "pump.msn"
    threshold = 0.31

    [batch]
    max_batch = 32
    max_wait_s = 0.5

The TOML file is read by monitor_toml.py; the full reference is docs/operating.md.
"""

from __future__ import annotations

import re
import stat
from dataclasses import dataclass, field, replace
from pathlib import Path

from msn_edge.runtime.capture import open_device
from msn_edge.runtime.errors import MsnEdgeError
from msn_edge.runtime.sources import Source, open_input

NAME = re.compile(r"^[A-Za-z0-9_.-]+$")  # safe in MQTT topics and Prometheus labels


class ConfigError(MsnEdgeError):
    """A monitor configuration that cannot be used."""


@dataclass(frozen=True)
class InputSpec:
    """One thing to open. Exactly one of `device` and `file` ("-" is stdin)."""

    name: str
    device: str | None = None
    file: str | None = None
    channels: int = 1  # a device's channels, captured together
    realtime: bool = False  # pace a file like a live microphone
    capture: str = "auto"  # arecord | portaudio | auto (devices only)

    @property
    def live(self) -> bool:
        return self.device is not None or self.realtime

    def describe(self) -> str:
        return f"device {self.device}" if self.device else f"file {self.file}"


@dataclass(frozen=True)
class StreamSpec:
    """One machine: a channel of an input, judged by one bundle's scoring group."""

    name: str
    input: str  # an InputSpec name
    bundle: Path
    channel: int = 0
    group: str | None = None
    threshold: float | None = None  # None: the bundle's calibrated threshold
    hop_s: float | None = None  # None: back-to-back windows
    alarm_after: int = 3  # 0: no alarms
    backend: str = "auto"
    precision: str = "fp32"
    threads: int | None = None
    allow_not_recommended: bool = False  # an int8 model the export marked not recommended

    @property
    def engine_key(self) -> tuple:
        """Streams with equal keys share one engine (and its batches)."""
        return (str(Path(self.bundle).resolve()), self.backend, self.precision, self.threads)


@dataclass(frozen=True)
class BatchPolicy:
    """When the windows ready across streams of one engine go into a call."""

    max_batch: int = 32  # windows per engine call: bigger batches reach the FLOP bound
    max_wait_s: float = 0.5  # latency budget: no ready window waits longer for others

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ConfigError(f"batch max_batch must be at least 1, got {self.max_batch}")
        if not 0 <= self.max_wait_s < 3600:
            raise ConfigError(f"batch max_wait_s must be in [0, 3600), got {self.max_wait_s}")


@dataclass(frozen=True)
class MqttSettings:
    """`--mqtt URL` and its options; see msn_edge.runtime.mqtt_sink for the topics."""

    url: str
    topic: str | None = None  # prefix; default msn-edge/<hostname>
    client_id: str | None = None
    username: str | None = None
    password_file: Path | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    queue_dir: Path | None = None
    queue_max: int = 100_000  # events held while the broker is away; older ones are dropped


@dataclass(frozen=True)
class MonitorConfig:
    inputs: dict[str, InputSpec]
    streams: list[StreamSpec]
    batch: BatchPolicy = field(default_factory=BatchPolicy)
    mqtt: MqttSettings | None = None
    metrics_port: int | None = None
    metrics_addr: str = "0.0.0.0"
    events_file: Path | None = None

    def __post_init__(self) -> None:
        if not self.streams:
            raise ConfigError("no streams to monitor")
        seen: set[str] = set()
        used: set[tuple[str, int]] = set()
        stdin = [i.name for i in self.inputs.values() if i.file == "-"]
        if len(stdin) > 1:
            raise ConfigError(f"only one input can read stdin, got {', '.join(stdin)}")
        for s in self.streams:
            if not NAME.match(s.name):
                raise ConfigError(
                    f"stream name {s.name!r}: use letters, digits, '_', '.' and '-' only"
                )
            if s.name in seen:
                raise ConfigError(f"two streams are named {s.name!r}")
            seen.add(s.name)
            if s.input not in self.inputs:
                raise ConfigError(f"stream {s.name!r}: no input named {s.input!r}")
            inp = self.inputs[s.input]
            if not 0 <= s.channel < inp.channels:
                raise ConfigError(
                    f"stream {s.name!r}: channel {s.channel} of input {s.input!r}, "
                    f"which has {inp.channels} channel(s) (channels count from 0)"
                )
            if (s.input, s.channel) in used:
                raise ConfigError(
                    f"stream {s.name!r}: channel {s.channel} of {s.input!r} has two streams"
                )
            used.add((s.input, s.channel))
            if s.alarm_after < 0:
                raise ConfigError(f"stream {s.name!r}: alarm_after must be 0 or more")


def open_source(spec: InputSpec, sample_rate: int) -> Source:
    """The one function that opens any input: a device, a file, a FIFO or stdin."""
    if spec.device is not None:
        return open_device(spec.device, sample_rate, capture=spec.capture, channels=spec.channels)
    assert spec.file is not None
    path = Path(spec.file)
    if spec.file != "-" and path.exists() and stat.S_ISFIFO(path.stat().st_mode):
        if spec.realtime:
            raise ConfigError(f"{path}: a FIFO is paced by its writer; drop realtime")
        from msn_edge.runtime.sources import RawPcmSource

        return RawPcmSource(open(path, "rb"), sample_rate, name=str(path))  # noqa: SIM115
    return open_input(spec.file, sample_rate, realtime=spec.realtime)


def safe_name(text: str) -> str:
    """A stream name from a device or file name: unsafe characters become '_'."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "stream"


def simple_config(
    bundle: Path,
    *,
    devices: tuple[str, ...] = (),
    inputs: tuple[str, ...] = (),
    channels: int = 1,
    realtime: bool = False,
    capture: str = "auto",
    name: str | None = None,
    **settings,
) -> MonitorConfig:
    """The command line's forms: one stream per --input, per --device (or per channel)."""
    specs: dict[str, InputSpec] = {}
    streams: list[StreamSpec] = []
    sources = [("device", d) for d in devices] + [("file", f) for f in inputs]
    for kind, where in sources:
        base = "stdin" if where == "-" else safe_name(Path(where).stem if kind == "file" else where)
        n = channels if kind == "device" else 1
        spec = InputSpec(
            base,
            device=where if kind == "device" else None,
            file=where if kind == "file" else None,
            channels=n,
            realtime=realtime and kind == "file",
            capture=capture,
        )
        if base in specs:
            raise ConfigError(
                f"two inputs would both be named {base!r}; name them in a --config file"
            )
        specs[base] = spec
        for ch in range(n):
            stream_name = base if n == 1 else f"{base}.ch{ch}"
            streams.append(StreamSpec(stream_name, base, Path(bundle), channel=ch, **settings))
    if name is not None:
        if len(streams) != 1:
            raise ConfigError("--name names a single stream; use a --config file for several")
        streams = [replace(streams[0], name=name)]
    return MonitorConfig(inputs=specs, streams=streams)


def with_outputs(
    config: MonitorConfig,
    *,
    events_file: Path | None = None,
    max_batch: int | None = None,
    max_wait_s: float | None = None,
    metrics_port: int | None = None,
    metrics_addr: str | None = None,
    mqtt_url: str | None = None,
    mqtt_topic: str | None = None,
    mqtt_client_id: str | None = None,
    mqtt_username: str | None = None,
    mqtt_password_file: Path | None = None,
    mqtt_ca: Path | None = None,
    mqtt_cert: Path | None = None,
    mqtt_key: Path | None = None,
    mqtt_queue: Path | None = None,
    mqtt_queue_max: int | None = None,
) -> MonitorConfig:
    """`config` with the command line's output and batching options laid over it."""
    batch = BatchPolicy(
        config.batch.max_batch if max_batch is None else max_batch,
        config.batch.max_wait_s if max_wait_s is None else max_wait_s,
    )
    mqtt = config.mqtt
    overrides = {
        "topic": mqtt_topic,
        "client_id": mqtt_client_id,
        "username": mqtt_username,
        "password_file": mqtt_password_file,
        "ca_file": mqtt_ca,
        "cert_file": mqtt_cert,
        "key_file": mqtt_key,
        "queue_dir": mqtt_queue,
        "queue_max": mqtt_queue_max,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if mqtt_url is not None:
        mqtt = (
            replace(mqtt, url=mqtt_url, **overrides)
            if mqtt
            else MqttSettings(mqtt_url, **overrides)
        )
    elif overrides:
        if mqtt is None:
            raise ConfigError("--mqtt-* options need --mqtt URL (or [mqtt] in the config)")
        mqtt = replace(mqtt, **overrides)
    return replace(
        config,
        batch=batch,
        mqtt=mqtt,
        events_file=config.events_file if events_file is None else events_file,
        metrics_port=config.metrics_port if metrics_port is None else metrics_port,
        metrics_addr=config.metrics_addr if metrics_addr is None else metrics_addr,
    )
