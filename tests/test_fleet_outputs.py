"""Fleet outputs for real: MQTT through a Mosquitto restart, the queue bound, the last will,
user names and passwords; Prometheus scraped while the monitor runs; systemd's notify.

Each MQTT test starts its own broker (fleet_helpers.Mosquitto) on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from fleet_helpers import (
    Mosquitto,
    Subscriber,
    free_port,
    make_certificates,
    needs_mosquitto,
    retained,
)
from stream_helpers import RATE
from toy_bundle import anomalous_signal, make_toy_bundle, normal_signal, toy_frontend

from msn_edge.runtime.assemble import open_monitor
from msn_edge.runtime.monitor_config import MqttSettings, load_config

CLI = [sys.executable, "-c", "from msn_edge.cli import main; main()"]
PREFIX = "test/box"


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return make_toy_bundle(tmp_path_factory.mktemp("bundle") / "toy.msn", window_s=0.25)


def write_recording(path: Path, pattern: str, seed: int) -> Path:
    fe, rng = toy_frontend(0.25), np.random.default_rng(seed)
    make = {"n": normal_signal, "a": anomalous_signal}
    audio = np.concatenate([make[c](fe, rng) for c in pattern])
    sf.write(path, (audio * 32768).clip(-32768, 32767).astype(np.int16), RATE)
    return path


def realtime_config(tmp_path: Path, toy: Path, patterns: dict[str, str]) -> Path:
    for k, (name, pattern) in enumerate(patterns.items()):
        write_recording(tmp_path / f"{name}.wav", pattern, seed=k)
    streams = "".join(
        f'[[streams]]\nname = "{n}"\nfile = "{n}.wav"\nrealtime = true\n' for n in patterns
    )
    path = tmp_path / "monitor.toml"
    path.write_text(
        f'[defaults]\nbundle = "{toy}"\nalarm_after = 2\nthreads = 1\n'
        f"[batch]\nmax_wait_s = 0.05\n{streams}"
    )
    return path


def test_mqtt_delivers_every_event_once_in_order_through_a_broker_restart(toy, tmp_path):
    needs_mosquitto()
    from msn_edge.runtime.mqtt_sink import MqttSink

    broker = Mosquitto(tmp_path)
    broker.start()
    sub = Subscriber(broker.port, f"{PREFIX}/#")
    patterns = {"fan": "nnnnaaannnnnnnnnnnnn", "pump": "n" * 20, "valve": "aaannnnnnnnnnnnnnnnn"}
    config = load_config(realtime_config(tmp_path, toy, patterns))
    mqtt = MqttSink.start(
        MqttSettings(broker.url, topic=PREFIX, queue_dir=tmp_path / "queue"), list(patterns)
    )
    produced: list[dict] = []
    outage: dict = {}

    def restart() -> None:
        outage["queued_at_restart"] = mqtt.depth
        broker.start()

    def sink(event: dict) -> None:
        produced.append(event)
        mqtt(event)
        if len(produced) == 12:  # mid-stream: about 1 s of 5 s in
            broker.stop()
            outage["stopped"] = True
            threading.Timer(1.5, restart).start()

    try:
        with contextlib.ExitStack() as stack:
            open_monitor(config, sink, stack).run()
        mqtt.close(timeout_s=15)
        by_topic: dict[str, list[bytes]] = {}
        for e in produced:
            by_topic.setdefault(mqtt.topic(e), []).append(json.dumps(e).encode())
        assert sub.wait_for(
            lambda: all(len(sub.on(t)) >= len(p) for t, p in by_topic.items()), timeout_s=20
        ), {t: (len(sub.on(t)), len(p)) for t, p in by_topic.items()}
        time.sleep(0.5)  # anything late (a duplicate) would arrive now
    finally:
        sub.close()
        broker.stop()
    assert outage["queued_at_restart"] > 0  # events were produced while it was away
    assert mqtt.reconnects >= 1 and mqtt.dropped == 0 and mqtt.depth == 0
    for name, pattern in patterns.items():
        windows = sub.on(f"{PREFIX}/{name}/window")
        assert windows == by_topic[f"{PREFIX}/{name}/window"]  # exactly once, in order
        assert [json.loads(w)["index"] for w in windows] == list(range(len(pattern)))
    assert [json.loads(a)["event"] for a in sub.on(f"{PREFIX}/fan/alarm")] == ["alarm", "clear"]
    assert sub.on(f"{PREFIX}/pump/alarm") == []
    assert mqtt.delivered == len(produced)


def test_mqtt_queue_bound_drops_the_oldest_and_says_so(tmp_path, caplog):
    needs_mosquitto()
    from msn_edge.runtime.mqtt_sink import MqttSink

    broker = Mosquitto(tmp_path)
    broker.start()  # create the subscriber's session, then take the broker away
    Subscriber(broker.port, f"{PREFIX}/#").close()
    broker.stop()
    settings = MqttSettings(broker.url, topic=PREFIX, queue_dir=tmp_path / "q", queue_max=5)
    with caplog.at_level(logging.INFO):
        mqtt = MqttSink.start(settings, ["s"])
        events = [
            {"event": "window", "stream": "s", "index": i, "end": "2025-01-01T00:00:00.000Z"}
            | {"score": 0.1, "threshold": 0.2, "verdict": "normal"}
            for i in range(12)
        ]
        for e in events:
            mqtt(e)
        assert (mqtt.depth, mqtt.dropped) == (5, 7)
        broker.start()
        sub = Subscriber(broker.port, f"{PREFIX}/#")
        try:
            assert sub.wait_for(lambda: len(sub.on(f"{PREFIX}/s/window")) >= 5)
            mqtt.close(timeout_s=10)
            time.sleep(0.3)
            got = [json.loads(p)["index"] for p in sub.on(f"{PREFIX}/s/window")]
            assert got == [7, 8, 9, 10, 11]  # the newest five, in order, once
            status = json.loads(retained(broker.port, f"{PREFIX}/status")[f"{PREFIX}/status"])
        finally:
            sub.close()
            broker.stop()
    assert (status["state"], status["reason"], status["dropped_events"]) == (
        "offline",
        "stopped",
        7,
    )
    assert "dropped 7 oldest events" in caplog.text or "dropped 1 oldest events" in caplog.text
    assert "7 dropped by the queue bound" in caplog.text


def test_mqtt_user_and_password(tmp_path):
    needs_mosquitto()
    from msn_edge.runtime.mqtt_sink import MqttSink

    broker = Mosquitto(tmp_path, passwords={"edge": "s3cret"})
    broker.start()
    (tmp_path / "pw").write_text("s3cret\n")
    try:
        import paho.mqtt.client as mqtt_client

        sub_client = mqtt_client.Client(mqtt_client.CallbackAPIVersion.VERSION2)
        sub_client.username_pw_set("edge", "s3cret")
        got: list[bytes] = []
        sub_client.on_connect = lambda c, *a: c.subscribe(f"{PREFIX}/+/window", 1)
        sub_client.on_message = lambda _c, _u, m: got.append(bytes(m.payload))
        sub_client.connect("127.0.0.1", broker.port)
        sub_client.loop_start()
        time.sleep(0.5)
        good = MqttSink.start(
            MqttSettings(
                broker.url,
                topic=PREFIX,
                username="edge",
                password_file=tmp_path / "pw",
                queue_dir=tmp_path / "q1",
            ),
            ["s"],
        )
        good(
            {"event": "window", "stream": "s", "index": 0, "end": "x", "score": 0.0}
            | {"threshold": 0.1, "verdict": "normal"}
        )
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
        good.close()
        assert [json.loads(p)["index"] for p in got] == [0]
        bad = MqttSink.start(
            MqttSettings(
                f"mqtt://edge:wrong@127.0.0.1:{broker.port}",
                topic=PREFIX,
                queue_dir=tmp_path / "q2",
            ),
            ["s"],
        )
        bad(
            {"event": "window", "stream": "s", "index": 1, "end": "x", "score": 0.0}
            | {"threshold": 0.1, "verdict": "normal"}
        )
        time.sleep(1.0)
        assert not bad.connected and bad.depth == 1  # refused: kept, not lost
        bad.close(timeout_s=0.5)
        assert len(got) == 1
        sub_client.disconnect()
        sub_client.loop_stop()
    finally:
        broker.stop()


def test_cli_mqtt_over_tls_with_its_ca_and_a_wrong_ca_is_one_line(toy, tmp_path):
    """mqtts:// with --mqtt-ca: every event arrives through the broker's TLS listener (the
    test subscribes on its plain one); a CA that did not sign the broker's certificate
    stops the monitor before it starts, with one line and exit status 1."""
    from click.testing import CliRunner

    from msn_edge.cli import main

    needs_mosquitto()
    certs = make_certificates(tmp_path / "tls")
    broker = Mosquitto(tmp_path, tls=certs)
    broker.start()
    wav = write_recording(tmp_path / "press.wav", "nnaaann", seed=3)
    sub = Subscriber(broker.port, f"{PREFIX}/#")
    base = ["monitor", str(toy), "--input", str(wav), "--alarm-after", "2", "--threads", "1"]
    base += ["--mqtt", broker.tls_url, "--mqtt-topic", PREFIX]
    try:
        good = CliRunner().invoke(
            main, [*base, "--mqtt-ca", str(certs.ca), "--mqtt-queue", str(tmp_path / "q1")]
        )
        assert good.exit_code == 0, good.stderr
        events = [json.loads(line) for line in good.stdout.splitlines()]
        windows = [e for e in events if e["event"] == "window"]
        assert len(windows) == 7
        assert sub.wait_for(lambda: len(sub.on(f"{PREFIX}/press/window")) >= 7), (
            good.stderr + broker.log.read_text()
        )
        got = [json.loads(p) for p in sub.on(f"{PREFIX}/press/window")]
        assert got == windows  # the same events, once, in order
        alarms = [json.loads(p)["event"] for p in sub.on(f"{PREFIX}/press/alarm")]
        assert alarms == ["alarm", "clear"]
        assert "mqtts://127.0.0.1" in good.stderr and "connected" in good.stderr

        bad = CliRunner().invoke(
            main, [*base, "--mqtt-ca", str(certs.other_ca), "--mqtt-queue", str(tmp_path / "q2")]
        )
        assert bad.exit_code == 1
        assert "Traceback" not in bad.stderr and bad.stdout == ""  # nothing was scored
        line = bad.stderr.strip().splitlines()[-1]
        assert line.startswith(
            f"Error: {broker.tls_url}: the broker's certificate does not verify against "
            f"{certs.other_ca} ("
        ), line
        assert line.endswith("); check --mqtt-ca")
        time.sleep(0.3)
        assert len(sub.on(f"{PREFIX}/press/window")) == 7  # nothing more came
    finally:
        sub.close()
        broker.stop()


def test_mqtts_to_a_plain_listener_is_one_line(tmp_path):
    needs_mosquitto()
    from msn_edge.runtime.errors import MsnEdgeError
    from msn_edge.runtime.mqtt_sink import MqttSink

    certs = make_certificates(tmp_path / "tls")
    broker = Mosquitto(tmp_path)
    broker.start()
    try:
        settings = MqttSettings(
            f"mqtts://127.0.0.1:{broker.port}", ca_file=certs.ca, queue_dir=tmp_path / "q"
        )
        with pytest.raises(MsnEdgeError, match=r"TLS handshake failed \(.+\); is it the broker"):
            MqttSink.start(settings, ["s"])
    finally:
        broker.stop()
    assert not (tmp_path / "q").exists()  # refused before the queue was made


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_cli_metrics_scraped_during_a_run_and_the_last_will(toy, tmp_path):
    """The CLI with --metrics-port and --mqtt: scrape mid-run, then kill -9: the will."""
    needs_mosquitto()
    pytest.importorskip("prometheus_client")
    broker = Mosquitto(tmp_path)
    broker.start()
    write_recording(tmp_path / "long.wav", "nnaa" + "a" * 36, seed=1)
    port = free_port()
    sub = Subscriber(broker.port, f"{PREFIX}/#", client_id="will-watcher")
    proc = subprocess.Popen(
        [*CLI, "monitor", str(toy), "--input", str(tmp_path / "long.wav"), "--realtime"]
        + ["--alarm-after", "2", "--threads", "1", "--metrics-port", str(port)]
        + ["--mqtt", broker.url, "--mqtt-topic", PREFIX, "--mqtt-queue", str(tmp_path / "q")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        events = [json.loads(proc.stdout.readline()) for _ in range(6)]  # 1.5 s of audio
        metrics = scrape(port)
        windows_then = sum(e["event"] == "window" for e in events)
        name = events[0]["stream"]
        assert name == "long"
        label = (("stream", "long"),)
        assert metrics[("msn_edge_windows_total", label)] >= windows_then
        assert metrics[("msn_edge_alarm_active", label)] == 1.0  # raised at window 3
        assert metrics[("msn_edge_alarms_total", label)] == 1.0
        assert metrics[("msn_edge_anomalous", label)] == 1.0
        assert metrics[("msn_edge_threshold", label)] == pytest.approx(events[0]["threshold"])
        assert metrics[("msn_edge_batch_size_count", (("backend", "cpu"),))] >= windows_then
        assert metrics[("msn_edge_inference_seconds_count", (("backend", "cpu"),))] >= windows_then
        assert metrics[("msn_edge_mqtt_connected", ())] == 1.0
        assert metrics[("msn_edge_mqtt_dropped_events_total", ())] == 0.0
        assert metrics[("msn_edge_overruns_total", label)] == 0.0
        assert metrics[("msn_edge_dropped_samples_total", label)] == 0.0
        assert metrics[("msn_edge_reconnects_total", label)] == 0.0
        assert metrics[("msn_edge_frontend_seconds_count", (("backend", "cpu"),))] >= windows_then
        assert metrics[("msn_edge_frontend_seconds_sum", (("backend", "cpu"),))] > 0.0
        assert metrics[("msn_edge_batch_wait_seconds_count", (("backend", "cpu"),))] >= 1
        assert metrics[("msn_edge_mqtt_queue_depth", ())] >= 0.0
        assert np.isfinite(metrics[("msn_edge_score", label)])  # a window's score, not NaN
        info = [k for k in metrics if k[0] == "msn_edge_engine_info"]
        assert (
            info and dict(info[0][1])["backend"] == "cpu" and dict(info[0][1])["streams"] == "long"
        )
        assert sub.wait_for(lambda: b'"online"' in b"".join(sub.on(f"{PREFIX}/status")))
        later = scrape(port)  # counters move while it runs
        assert (
            later[("msn_edge_windows_total", label)] >= metrics[("msn_edge_windows_total", label)]
        )
        proc.kill()  # no clean disconnect: the broker publishes the last will
        proc.wait(timeout=10)
        assert sub.wait_for(lambda: any(b'"lost"' in p for p in sub.on(f"{PREFIX}/status")))
        will = json.loads(sub.on(f"{PREFIX}/status")[-1])
        assert (will["state"], will["reason"]) == ("offline", "lost")
        status = json.loads(retained(broker.port, f"{PREFIX}/long/status")[f"{PREFIX}/long/status"])
        assert status["stream"] == "long" and status["alarm"] is True
    finally:
        if proc.poll() is None:
            proc.kill()
        sub.close()
        broker.stop()


def test_systemd_notify_ready_watchdog_stopping(toy, tmp_path):
    write_recording(tmp_path / "short.wav", "n" * 8, seed=2)
    path = str(tmp_path / "notify.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    server.settimeout(120)  # a loaded CI machine starts the CLI slowly
    env = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"}
    proc = subprocess.Popen(
        [*CLI, "monitor", str(toy), "--input", str(tmp_path / "short.wav"), "--realtime"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    messages = []
    try:
        while True:
            msg = server.recv(4096).decode()
            messages.append(msg)
            if msg.startswith("STOPPING=1"):
                break
        assert proc.wait(timeout=120) == 0
    finally:
        server.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    assert messages[0].startswith("READY=1\nSTATUS=monitoring 1 stream(s)")
    pings = messages.count("WATCHDOG=1")
    assert pings >= 4, messages  # 2 s of audio, a ping at least every 0.1 s requested
    assert messages[-1] == "STOPPING=1"


@pytest.mark.parametrize(
    ("module", "option", "hint"),
    [
        ("paho.mqtt.client", ["--mqtt", "mqtt://127.0.0.1:1"], "MQTT needs paho-mqtt"),
        ("prometheus_client", ["--metrics-port", "0"], "--metrics-port needs prometheus_client"),
    ],
)
def test_missing_fleet_packages_are_one_line_with_the_install_hint(
    toy, tmp_path, monkeypatch, module, option, hint
):
    from click.testing import CliRunner

    from msn_edge.cli import main

    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    write_recording(tmp_path / "x.wav", "n", seed=0)
    result = CliRunner().invoke(
        main, ["monitor", str(toy), "--input", str(tmp_path / "x.wav")] + option
    )
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"Error: {hint}: pip install 'msn-edge[fleet]'"
    )


def test_bad_mqtt_url_is_one_line(toy, tmp_path):
    from click.testing import CliRunner

    from msn_edge.cli import main

    pytest.importorskip("paho.mqtt.client")
    write_recording(tmp_path / "x.wav", "n", seed=0)
    result = CliRunner().invoke(
        main, ["monitor", str(toy), "--input", str(tmp_path / "x.wav"), "--mqtt", "http://x"]
    )
    assert result.exit_code == 1
    assert "expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT]" in result.stderr


def test_metrics_count_an_invalid_window_without_a_score(tmp_path):
    pytest.importorskip("prometheus_client")
    from msn_edge.runtime.metrics_sink import MetricsSink

    sink = MetricsSink()
    base = {
        "event": "window",
        "stream": "m",
        "end": "2025-03-01T12:00:01.000Z",
        "threshold": 0.3,
        "overruns": 0,
        "dropped_samples": 0,
        "backend": "cpu",
        "frontend_ms": 1.0,
        "inference_ms": 2.0,
    }
    sink({**base, "score": 0.5, "anomalous": True, "verdict": "anomalous"})
    sink({**base, "score": None, "anomalous": None, "verdict": "invalid"})
    got = {
        (s.name, s.labels.get("stream")): s.value
        for family in sink.registry.collect()
        for s in family.samples
    }
    assert got[("msn_edge_windows_total", "m")] == 2
    assert got[("msn_edge_anomalous_windows_total", "m")] == 1
    assert got[("msn_edge_invalid_windows_total", "m")] == 1
    assert np.isnan(got[("msn_edge_score", "m")]) and np.isnan(got[("msn_edge_anomalous", "m")])


def test_a_publish_that_raced_a_disconnect_is_acknowledged_after_the_reconnection(tmp_path):
    """publish() answered NO_CONN (the connection broke between the check and the call):
    paho keeps the message, resends it on reconnection and marks it published on its
    PUBACK. The sender must then take it off the queue, in order, and not die on
    is_published() raising for such a message (it did, under load, in the restart test)."""
    mqtt_client = pytest.importorskip("paho.mqtt.client")
    from msn_edge.runtime.mqtt_sink import MqttSink

    sink = MqttSink(MqttSettings("mqtt://127.0.0.1:1", queue_dir=tmp_path / "q"), ["s"])
    infos = []

    class Disconnected:
        def publish(self, topic, payload, qos, retain):
            info = mqtt_client.MQTTMessageInfo(len(infos) + 1)
            info.rc = mqtt_client.MQTT_ERR_NO_CONN
            infos.append(info)
            return info

    sink._client = Disconnected()
    for i in range(3):
        sink(
            {"event": "window", "stream": "s", "index": i, "end": "x", "score": 0.0}
            | {"threshold": 0.1, "verdict": "normal"}
        )
    assert sink._fill() is False and len(infos) == 3  # all handed over, nothing more waits
    sink._reap()
    assert (sink.delivered, sink.depth) == (0, 3)  # not acknowledged yet: kept
    infos[0]._set_as_published()  # the PUBACKs after the reconnection
    infos[1]._set_as_published()
    sink._reap()
    assert (sink.delivered, sink.depth) == (2, 1)
    assert [p for _, _, p in sink.queue.peek(0, 10)] == [
        json.dumps(
            {"event": "window", "stream": "s", "index": 2, "end": "x", "score": 0.0}
            | {"threshold": 0.1, "verdict": "normal"}
        ).encode()
    ]
    sink.queue.close()
