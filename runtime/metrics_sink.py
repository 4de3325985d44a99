"""A Prometheus endpoint (prometheus_client) fed by the monitor's events and engine calls.

msn_edge_windows_total{stream}             windows scored
msn_edge_anomalous_windows_total{stream}   of those, anomalous
msn_edge_invalid_windows_total{stream}     of those, unjudgeable (NaN/inf, digital silence)
msn_edge_score{stream}                     the latest window's score (NaN: invalid)
msn_edge_threshold{stream}                 the threshold it was judged by
msn_edge_anomalous{stream}                 the latest verdict (1 anomalous, 0 normal, NaN invalid)
msn_edge_alarm_active{stream}              1 while an alarm is raised
msn_edge_alarms_total{stream}              alarms raised
msn_edge_last_window_timestamp_seconds{stream}  end of the latest window (UTC): alert on stalls
msn_edge_overruns_total{stream}            input overruns (device, or a full queue)
msn_edge_dropped_samples_total{stream}     samples lost before the monitor saw them
msn_edge_reconnects_total{stream}          times a vanished device came back
msn_edge_frontend_seconds{backend}         front-end time per window (histogram)
msn_edge_inference_seconds{backend}        inference time per window (histogram)
msn_edge_batch_wait_seconds{backend}       how long a batch's oldest window waited
msn_edge_batch_size{backend}               windows per engine call (histogram)
msn_edge_engine_info{backend,precision,...} one series per engine
msn_edge_mqtt_queue_depth                  events waiting for the broker
msn_edge_mqtt_dropped_events_total         events the queue bound dropped
msn_edge_mqtt_delivered_events_total       events the broker acknowledged
msn_edge_mqtt_connected                    1 while connected to the broker
"""

from __future__ import annotations

import logging
import math
from datetime import datetime

from msn_edge.runtime.errors import MsnEdgeError

log = logging.getLogger(__name__)

INSTALL_HINT = "--metrics-port needs prometheus_client: pip install 'msn-edge[fleet]'"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def _prometheus():
    try:
        import prometheus_client
    except ImportError:
        raise MsnEdgeError(INSTALL_HINT) from None
    return prometheus_client


class _MqttCollector:
    """Reads the MQTT sink's counters at scrape time."""

    def __init__(self, mqtt) -> None:
        self.mqtt = mqtt

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        m = self.mqtt
        yield GaugeMetricFamily(
            "msn_edge_mqtt_queue_depth", "Events waiting for the broker", value=m.depth
        )
        yield CounterMetricFamily(
            "msn_edge_mqtt_dropped_events", "Events the queue bound dropped", value=m.dropped
        )
        yield CounterMetricFamily(
            "msn_edge_mqtt_delivered_events",
            "Events the broker acknowledged",
            value=m.delivered,
        )
        yield GaugeMetricFamily(
            "msn_edge_mqtt_connected", "1 while connected to the broker", value=int(m.connected)
        )


class MetricsSink:
    """An event sink and batch observer that keeps Prometheus metrics, served over HTTP."""

    def __init__(self) -> None:
        pc = _prometheus()
        self.registry = r = pc.CollectorRegistry()
        by_stream = ["stream"]
        self.windows = pc.Counter("msn_edge_windows", "Windows scored", by_stream, registry=r)
        self.anomalous_windows = pc.Counter(
            "msn_edge_anomalous_windows", "Windows judged anomalous", by_stream, registry=r
        )
        self.invalid_windows = pc.Counter(
            "msn_edge_invalid_windows",
            "Windows that could not be judged (verdict invalid)",
            by_stream,
            registry=r,
        )
        self.score = pc.Gauge("msn_edge_score", "Latest window's score", by_stream, registry=r)
        self.threshold = pc.Gauge(
            "msn_edge_threshold", "Threshold of the latest window", by_stream, registry=r
        )
        self.anomalous = pc.Gauge(
            "msn_edge_anomalous", "Latest verdict: 1 anomalous, 0 normal", by_stream, registry=r
        )
        self.alarm_active = pc.Gauge(
            "msn_edge_alarm_active", "1 while an alarm is raised", by_stream, registry=r
        )
        self.alarms = pc.Counter("msn_edge_alarms", "Alarms raised", by_stream, registry=r)
        self.last_window = pc.Gauge(
            "msn_edge_last_window_timestamp_seconds",
            "End of the latest window scored (UTC, seconds since the epoch)",
            by_stream,
            registry=r,
        )
        self.overruns = pc.Counter(
            "msn_edge_overruns", "Input overruns (device, or a full queue)", by_stream, registry=r
        )
        self.dropped_samples = pc.Counter(
            "msn_edge_dropped_samples", "Samples lost before scoring", by_stream, registry=r
        )
        self.reconnects = pc.Counter(
            "msn_edge_reconnects", "Times a vanished device came back", by_stream, registry=r
        )
        by_backend = ["backend"]
        self.frontend_s = pc.Histogram(
            "msn_edge_frontend_seconds",
            "Front-end time per window",
            by_backend,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_s = pc.Histogram(
            "msn_edge_inference_seconds",
            "Inference time per window (its share of the batch)",
            by_backend,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_wait_s = pc.Histogram(
            "msn_edge_batch_wait_seconds",
            "Time from a batch's oldest window being ready to its events",
            by_backend,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = pc.Histogram(
            "msn_edge_batch_size",
            "Windows per engine call",
            by_backend,
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.engine_info = pc.Gauge(
            "msn_edge_engine_info",
            "One series per engine: its backend, precision, window and streams",
            ["backend", "precision", "window_s", "streams"],
            registry=r,
        )
        self._server = None
        self.port: int | None = None

    @classmethod
    def start(cls, port: int, addr: str = "0.0.0.0") -> MetricsSink:
        """Serve /metrics on `addr:port` (port 0: a free one, in `.port`)."""
        sink = cls()
        pc = _prometheus()
        try:
            server, _thread = pc.start_http_server(port, addr=addr, registry=sink.registry)
        except OSError as e:
            raise MsnEdgeError(f"--metrics-port {port}: cannot listen ({e.strerror})") from None
        sink._server = server
        sink.port = server.server_port
        log.info("metrics: http://%s:%d/metrics", addr, sink.port)
        return sink

    def watch_mqtt(self, mqtt) -> None:
        self.registry.register(_MqttCollector(mqtt))

    def describe(self, monitor) -> None:
        """The engines of a Monitor, as msn_edge_engine_info series."""
        for b in monitor.batchers.values():
            precision = getattr(getattr(b.engine, "engine", None), "precision", "unknown")
            self.engine_info.labels(
                b.engine.backend,
                precision,
                f"{b.engine.frontend.window_s:g}",
                ",".join(s.name for s in b.streams),
            ).set(1)

    def __call__(self, event: dict) -> None:
        stream = event.get("stream", "main")
        if event["event"] == "window":
            self.windows.labels(stream).inc()
            if event["verdict"] == "invalid":  # no score, no verdict: NaN, not a number
                self.invalid_windows.labels(stream).inc()
                self.score.labels(stream).set(math.nan)
                self.anomalous.labels(stream).set(math.nan)
            else:
                if event["anomalous"]:
                    self.anomalous_windows.labels(stream).inc()
                self.score.labels(stream).set(event["score"])
                self.anomalous.labels(stream).set(int(event["anomalous"]))
            self.threshold.labels(stream).set(event["threshold"])
            self.alarm_active.labels(stream)  # the series exists from the first window
            end = datetime.fromisoformat(event["end"].replace("Z", "+00:00")).timestamp()
            self.last_window.labels(stream).set(end)
            self.overruns.labels(stream).inc(event["overruns"])
            self.dropped_samples.labels(stream).inc(event["dropped_samples"])
            self.reconnects.labels(stream).inc(event.get("reconnects", 0))
            backend = event["backend"]
            self.frontend_s.labels(backend).observe(event["frontend_ms"] / 1000.0)
            self.inference_s.labels(backend).observe(event["inference_ms"] / 1000.0)
        elif event["event"] == "alarm":
            self.alarms.labels(stream).inc()
            self.alarm_active.labels(stream).set(1)
        elif event["event"] == "clear":
            self.alarm_active.labels(stream).set(0)

    def batch(self, engine: str, size: int, wait_s: float) -> None:
        self.batch_size.labels(engine).observe(size)
        self.batch_wait_s.labels(engine).observe(wait_s)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
