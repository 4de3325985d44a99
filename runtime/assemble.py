"""From a MonitorConfig to a Monitor: one engine per bundle and precision, one source per input.

Everything opened is registered on the caller's ExitStack, so that an error half-way
(a missing device after two engines were built) still releases what was opened.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

from msn_edge.runtime.bundle import read_bundle
from msn_edge.runtime.detector import SharedEngine, check_model_fits
from msn_edge.runtime.engines import make_engine
from msn_edge.runtime.monitor import Input, Monitor, Observer, Stream, pumped
from msn_edge.runtime.monitor_config import MonitorConfig, open_source

log = logging.getLogger(__name__)


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
        engine = make_engine(bundle, spec.backend, precision=spec.precision, threads=spec.threads)
        stack.callback(engine.close)
        check_model_fits(bundle, engine)  # a window the model cannot take: one clear error
        engines[key] = SharedEngine(bundle, engine)
        log.info("engine %s %s for %s", engine.name, spec.precision, spec.bundle)
    return engines


def open_monitor(
    config: MonitorConfig,
    sink: Callable[[dict], None],
    stack: contextlib.ExitStack,
    *,
    max_windows: int | None = None,
    max_seconds: float | None = None,
    observer: Observer | None = None,
    tick: Callable[[], None] | None = None,
) -> Monitor:
    """Open every engine and input of `config` and wire the streams; the caller runs it."""
    engines = open_engines(config, stack)
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
        source = stack.enter_context(open_source(config.inputs[name], rate))
        inputs.append(Input(source, members, pumped=pumped(source, len(used))))
    return Monitor(inputs, sink, policy=config.batch, observer=observer, tick=tick)
