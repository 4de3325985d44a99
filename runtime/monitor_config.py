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

The full reference is docs/operating.md.
"""

from __future__ import annotations

import math
import re
import stat
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from msn_edge.runtime.capture import CAPTURES, open_device
from msn_edge.runtime.errors import MsnEdgeError
from msn_edge.runtime.sources import Source, open_input

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (JetPack 6): the same parser, from PyPI
    import tomli as tomllib

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


# ---- TOML ---------------------------------------------------------------------------

_SOURCE_KEYS = {"device", "file", "channels", "realtime", "capture"}
_RENAMED = {"hop": "hop_s"}  # TOML keys in the CLI's words


def _check_keys(table: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}")


_KIND_NAMES = {str: "a string", int: "an integer", bool: "true or false"}


def _typed(value, kind, key: str, where: str):
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if not ok:
        names = _KIND_NAMES[kind] if isinstance(kind, type) else "a number"
        raise ConfigError(f"{where}: {key} must be {names}, got {value!r}")
    return value


_STREAM_TYPES = {
    "bundle": str,
    "channel": int,
    "group": str,
    "threshold": (int, float),
    "hop_s": (int, float),
    "alarm_after": int,
    "backend": str,
    "precision": str,
    "threads": int,
    "allow_not_recommended": bool,
}


def _stream_settings(table: dict, where: str, base: Path) -> dict:
    out = {}
    for key, value in table.items():
        key = _RENAMED.get(key, key)
        if key in _SOURCE_KEYS:
            continue
        if key not in _STREAM_TYPES:
            raise ConfigError(f"{where}: unknown key {key}")
        _typed(value, _STREAM_TYPES[key], key, where)
        if key == "bundle":
            value = (base / value) if not Path(value).is_absolute() else Path(value)
        elif key in ("threshold", "hop_s"):
            value = float(value)
            if not math.isfinite(value):  # TOML has nan and inf
                raise ConfigError(f"{where}: {key} must be a finite number, got {value}")
        out[key] = value
    return out


def _input_spec(name: str, table: dict, where: str, base: Path) -> InputSpec:
    _check_keys(table, _SOURCE_KEYS, where)
    device, file = table.get("device"), table.get("file")
    if (device is None) == (file is None):
        raise ConfigError(f"{where}: give exactly one of device or file")
    kinds = {"device": str, "file": str, "channels": int, "realtime": bool, "capture": str}
    for key, value in table.items():
        _typed(value, kinds[key], key, where)
    if file is not None and file != "-" and not Path(file).is_absolute():
        file = str(base / file)
    channels = table.get("channels", 1)
    if channels < 1:
        raise ConfigError(f"{where}: channels must be at least 1")
    if file is not None and channels != 1:
        raise ConfigError(f"{where}: files and stdin are mono; channels is for devices")
    capture = table.get("capture", "auto")
    if capture not in CAPTURES:
        raise ConfigError(f"{where}: capture must be one of {', '.join(CAPTURES)}")
    return InputSpec(name, device, file, channels, table.get("realtime", False), capture)


def parse_config(doc: dict, base: Path = Path(".")) -> MonitorConfig:
    """A monitor configuration from a parsed TOML document (paths relative to `base`)."""
    tables = {"defaults", "inputs", "streams", "batch", "mqtt", "metrics", "events_file"}
    _check_keys(doc, tables, "config")
    defaults = _stream_settings(doc.get("defaults", {}), "[defaults]", base)
    inputs: dict[str, InputSpec] = {}
    for name, table in doc.get("inputs", {}).items():
        inputs[name] = _input_spec(name, table, f"[inputs.{name}]", base)
    streams = []
    raw_streams = doc.get("streams", [])
    if not isinstance(raw_streams, list):
        raise ConfigError("streams must be an array of tables ([[streams]])")
    for i, table in enumerate(raw_streams):
        where = f"[[streams]] #{i + 1}"
        name = table.get("name")
        if not isinstance(name, str):
            raise ConfigError(f"{where}: every stream needs a name")
        where = f"stream {name!r}"
        own_source = {k: v for k, v in table.items() if k in _SOURCE_KEYS}
        if own_source:
            if "input" in table:
                raise ConfigError(f"{where}: give input or a device/file of its own, not both")
            if name in inputs:
                raise ConfigError(f"{where}: its own source would shadow input {name!r}")
            inputs[name] = _input_spec(name, own_source, where, base)
            input_name = name
        else:
            input_name = table.get("input")
            if not isinstance(input_name, str):
                raise ConfigError(f"{where}: give input = NAME, or device = ... / file = ...")
        settings = {
            **defaults,
            **_stream_settings(
                {k: v for k, v in table.items() if k not in ("name", "input")}, where, base
            ),
        }
        if "bundle" not in settings:
            raise ConfigError(f"{where}: no bundle (give one here or in [defaults])")
        streams.append(StreamSpec(name=name, input=input_name, **settings))
    batch_doc = doc.get("batch", {})
    _check_keys(batch_doc, {"max_batch", "max_wait_s"}, "[batch]")
    batch = BatchPolicy(
        _typed(batch_doc.get("max_batch", BatchPolicy.max_batch), int, "max_batch", "[batch]"),
        float(
            _typed(
                batch_doc.get("max_wait_s", BatchPolicy.max_wait_s),
                (int, float),
                "max_wait_s",
                "[batch]",
            )
        ),
    )
    mqtt = None
    if "mqtt" in doc:
        m = dict(doc["mqtt"])
        _check_keys(m, {f.name for f in fields(MqttSettings)}, "[mqtt]")
        if "url" not in m:
            raise ConfigError("[mqtt]: url is required")
        for key in ("password_file", "ca_file", "cert_file", "key_file", "queue_dir"):
            if key in m:
                m[key] = base / _typed(m[key], str, key, "[mqtt]")
        mqtt = MqttSettings(**m)
    metrics = doc.get("metrics", {})
    _check_keys(metrics, {"port", "addr"}, "[metrics]")
    events_file = doc.get("events_file")
    return MonitorConfig(
        inputs=inputs,
        streams=streams,
        batch=batch,
        mqtt=mqtt,
        metrics_port=metrics.get("port"),
        metrics_addr=metrics.get("addr", "0.0.0.0"),
        events_file=None if events_file is None else base / events_file,
    )


def load_config(path: str | Path) -> MonitorConfig:
    """Read a TOML monitor configuration; every mistake is one ConfigError line."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config ({e.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    try:
        return parse_config(doc, path.parent)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except (TypeError, AttributeError) as e:  # a table where a value belongs, or the reverse
        raise ConfigError(f"{path}: malformed config ({e})") from None


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
