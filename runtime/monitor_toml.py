"""The monitor's TOML configuration file -> MonitorConfig, every mistake one ConfigError line.

The file's shape is in monitor_config.py's docstring; the full reference is
docs/operating.md.
"""

from __future__ import annotations

import math
import sys
from dataclasses import fields
from pathlib import Path

from msn_edge.runtime.capture import CAPTURES
from msn_edge.runtime.monitor_config import (
    BatchPolicy,
    ConfigError,
    InputSpec,
    MonitorConfig,
    MqttSettings,
    StreamSpec,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (JetPack 6): the same parser, from PyPI
    import tomli as tomllib


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
