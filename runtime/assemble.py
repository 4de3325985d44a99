"""From a MonitorConfig to a Monitor: one engine per bundle and precision, one source per input.

Everything opened is registered on the caller's ExitStack, so that an error half-way
(a missing device after two engines were built) still releases what was opened.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from msn_edge.runtime.bundle import read_bundle
from msn_edge.runtime.detector import Detector, SharedEngine, check_model_fits
from msn_edge.runtime.engines import make_engine
from msn_edge.runtime.enroll import EnrollResult, enroll_first
from msn_edge.runtime.errors import MsnEdgeError
from msn_edge.runtime.monitor import Input, Monitor, Observer, pumped
from msn_edge.runtime.monitor_config import MonitorConfig, StreamSpec, open_source
from msn_edge.runtime.sources import Source
from msn_edge.runtime.stream import Stream

log = logging.getLogger(__name__)


def _engine(bundle, spec: StreamSpec):
    """The engine a stream's spec asks for (backend, precision, threads)."""
    return make_engine(
        bundle,
        spec.backend,
        precision=spec.precision,
        threads=spec.threads,
        allow_not_recommended=spec.allow_not_recommended,
    )


def open_engines(config: MonitorConfig, stack: contextlib.ExitStack) -> dict[tuple, SharedEngine]:
    """One SharedEngine per distinct (bundle, backend, precision, threads)."""
    engines: dict[tuple, SharedEngine] = {}
    for spec in config.streams:
        key = spec.engine_key
        if key in engines:
            engines[key].scorer(spec.group, spec.threshold)  # an unknown group fails here
            continue
        bundle = read_bundle(spec.bundle)
        bundle.group(spec.group)  # before a (slow) engine build
        engine = _engine(bundle, spec)
        stack.callback(engine.close)
        check_model_fits(bundle, engine)  # a window the model cannot take: one clear error
        engines[key] = SharedEngine(bundle, engine)
        log.info("engine %s %s for %s", engine.name, spec.precision, spec.bundle)
    return engines


@dataclass
class Opened:
    """Engines (by engine_key) and sources (by input name) opened before the monitor."""

    engines: dict[tuple, SharedEngine] | None = None
    sources: dict[str, Source] = field(default_factory=dict)
    positions: dict[str, int] = field(default_factory=dict)  # samples already read, by input


def enroll_first_config(
    config: MonitorConfig,
    stack: contextlib.ExitStack,
    minutes: float,
    *,
    stop_on_signals: Callable[[Callable[[], None]], contextlib.AbstractContextManager],
    out: Path | None = None,
    tick: Callable[[], None] | None = None,
) -> tuple[MonitorConfig, Opened, EnrollResult]:
    """`monitor --enroll-first`: listen to the one stream's input for `minutes`, enroll it
    as the stream's group into a new bundle beside the old one, and hand back the config
    on the new bundle with the engine and the still-open source: monitoring goes on with
    the audio that follows the enrolled minutes, on the same engine (the models are the same).

    `stop_on_signals(stop)`: a context in which SIGINT/SIGTERM call `stop` (the CLI's);
    `tick`: called while listening (the watchdog ping). The monitored windows go on
    counting the input's time from where the enrolled minutes ended.
    """
    if len(config.streams) != 1:
        raise MsnEdgeError(
            f"--enroll-first enrolls one machine; this configuration has {len(config.streams)} "
            "streams (give one --device or --input, one channel)"
        )
    (spec,) = config.streams
    if spec.group is None:
        raise MsnEdgeError("--enroll-first needs --group NAME: the machine it enrolls")
    if config.inputs[spec.input].channels != 1:
        raise MsnEdgeError("--enroll-first listens to a mono input; drop --channels")
    bundle = read_bundle(spec.bundle)
    engine = _engine(bundle, spec)
    stack.callback(engine.close)
    source = stack.enter_context(
        open_source(config.inputs[spec.input], bundle.frontend.sample_rate)
    )
    with stop_on_signals(source.stop):
        result, consumed = enroll_first(
            Detector(bundle, engine),  # the new machine is no group of the bundle yet
            source,
            minutes,
            group=spec.group,
            hop_s=spec.hop_s,
            out=out,
            tick=tick,
        )
    enrolled = replace(spec, bundle=result.path)
    opened = Opened(
        engines={enrolled.engine_key: SharedEngine(result.bundle, engine)},
        sources={spec.input: source},
        positions={spec.input: consumed},
    )
    return replace(config, streams=[enrolled]), opened, result


def open_monitor(
    config: MonitorConfig,
    sink: Callable[[dict], None],
    stack: contextlib.ExitStack,
    *,
    max_windows: int | None = None,
    max_seconds: float | None = None,
    observer: Observer | None = None,
    tick: Callable[[], None] | None = None,
    opened: Opened | None = None,
) -> Monitor:
    """Open every engine and input of `config` and wire the streams; the caller runs it.

    `opened`: engines and sources already open (`enroll_first_config`), used as they are.
    """
    opened = opened or Opened()
    engines = opened.engines or open_engines(config, stack)
    streams: dict[str, list[tuple[int, Stream]]] = {name: [] for name in config.inputs}
    for spec in config.streams:
        engine = engines[spec.engine_key]
        stream = Stream(
            spec.name,
            engine,
            engine.scorer(spec.group, spec.threshold),
            hop_s=spec.hop_s,
            alarm_after=spec.alarm_after or None,
            max_windows=max_windows,
            max_seconds=max_seconds,
            start=opened.positions.get(spec.input, 0),
        )
        streams[spec.input].append((spec.channel, stream))
        log.info(
            "stream %s: %s channel %d, window %g s, hop %g s, threshold %.6g, alarm after %s",
            spec.name,
            config.inputs[spec.input].describe(),
            spec.channel,
            engine.frontend.window_s,
            stream.windower.hop / engine.frontend.sample_rate,
            stream.scorer.threshold,
            spec.alarm_after or "never",
        )
    used = {name: s for name, s in streams.items() if s}
    inputs = []
    for name, members in used.items():
        rate = members[0][1].sample_rate
        source = opened.sources.get(name)
        if source is None:
            source = stack.enter_context(open_source(config.inputs[name], rate))
        inputs.append(Input(source, members, pumped=pumped(source, len(used))))
    return Monitor(inputs, sink, policy=config.batch, observer=observer, tick=tick)
