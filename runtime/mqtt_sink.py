"""Events to an MQTT broker (paho-mqtt), QoS 1, through an on-disk queue.

Topics, under a prefix (default `msn-edge/<hostname>`):

    PREFIX/STREAM/window   every window event (the JSON line stdout gets)
    PREFIX/STREAM/alarm    alarm and clear events
    PREFIX/STREAM/status   retained: the stream's latest state (score, verdict, alarm)
    PREFIX/status          retained: "online" while the monitor runs; its last will
                           "offline" is published by the broker if the monitor dies

Window and alarm events are QoS 1 and go through a bounded SQLite queue (spool.py): a
message leaves it only when the broker has acknowledged it, so a broker that is away
(or a monitor restarted meanwhile) delays events and never reorders them. At most
`INFLIGHT` messages are unacknowledged at once; paho resends those, in order, when it
reconnects. When the queue is full the oldest events are dropped, counted, logged and
reported in the monitor's status. Scoring never waits for the broker: `__call__` only
appends to the queue.

With TLS, `start()` first makes one TLS handshake with the broker, with the same SSL
context paho uses: a certificate that does not verify (wrong CA, wrong host name) or a
listener that does not speak TLS is a configuration mistake, reported at once as one
line, not retried for ever in the background. A broker that cannot be reached at that
moment is not a mistake: events are queued until it can be.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import socket
import ssl
import threading
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

from msn_edge.runtime.errors import MsnEdgeError
from msn_edge.runtime.monitor_config import MqttSettings, safe_name
from msn_edge.runtime.spool import DiskQueue

log = logging.getLogger(__name__)

INFLIGHT = 20  # unacknowledged messages at once (paho's default window)
KEEPALIVE_S = 30
RECONNECT_S = (0.5, 30.0)  # paho's reconnect back-off, first and longest
CLOSE_S = 5.0  # how long close() waits for the queue to drain and the status to go out
WAIT_S = 0.2
PROBE_S = 5.0  # the TLS check's connection and handshake timeout
PASSWORD_ENV = "MSN_EDGE_MQTT_PASSWORD"
INSTALL_HINT = "MQTT needs paho-mqtt: pip install 'msn-edge[fleet]'"


def _paho():
    try:
        import paho.mqtt.client as mqtt
    except ImportError:
        raise MsnEdgeError(INSTALL_HINT) from None
    return mqtt


def default_prefix() -> str:
    return f"msn-edge/{safe_name(socket.gethostname())}"


def default_queue_dir() -> Path:
    """systemd's StateDirectory when it set one, else ~/.local/state/msn-edge."""
    state = os.environ.get("STATE_DIRECTORY")
    base = Path(state.split(":")[0]) if state else Path.home() / ".local" / "state" / "msn-edge"
    return base / "mqtt-queue"


class Broker:
    """Where and how to connect, parsed from `mqtt[s]://[user[:password]@]host[:port]`."""

    def __init__(self, settings: MqttSettings) -> None:
        url = urlsplit(settings.url)
        if url.scheme not in ("mqtt", "mqtts", "tcp", "ssl") or not url.hostname:
            raise MsnEdgeError(
                f"--mqtt {settings.url!r}: expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT]"
            )
        self.tls = url.scheme in ("mqtts", "ssl") or settings.ca_file is not None
        try:
            port = url.port
        except ValueError:
            raise MsnEdgeError(f"--mqtt {settings.url!r}: bad port") from None
        self.host = url.hostname
        self.port = port or (8883 if self.tls else 1883)
        self.username = settings.username or (unquote(url.username) if url.username else None)
        password = unquote(url.password) if url.password else None
        if settings.password_file is not None:
            try:
                password = settings.password_file.read_text().strip()
            except OSError as e:
                raise MsnEdgeError(
                    f"{settings.password_file}: cannot read the MQTT password ({e.strerror})"
                ) from None
        self.password = password or os.environ.get(PASSWORD_ENV)
        if self.password and not self.username:
            raise MsnEdgeError("an MQTT password needs a user name (--mqtt-username)")
        for f in (settings.ca_file, settings.cert_file, settings.key_file):
            if f is not None and not Path(f).is_file():
                raise MsnEdgeError(f"{f}: no such file (MQTT TLS)")
        if (settings.cert_file is None) != (settings.key_file is None):
            raise MsnEdgeError("an MQTT client certificate needs both --mqtt-cert and --mqtt-key")
        self.settings = settings
        self.ssl_context = self._ssl_context() if self.tls else None

    def _ssl_context(self) -> ssl.SSLContext:
        """Verify the broker (host name included) against the CA file, or the system's CAs."""
        s = self.settings
        try:
            context = ssl.create_default_context(cafile=str(s.ca_file) if s.ca_file else None)
            if s.cert_file is not None:
                context.load_cert_chain(str(s.cert_file), str(s.key_file))
        except ssl.SSLError as e:
            raise MsnEdgeError(
                f"MQTT TLS: cannot load the certificates ({e.reason or e})"
            ) from None
        return context

    def check_tls(self, timeout_s: float = PROBE_S) -> bool:
        """One TLS handshake with the broker: MsnEdgeError if the broker is there and the
        handshake fails, False if it cannot be reached now (or is slow), True if verified."""
        assert self.ssl_context is not None
        try:
            raw = socket.create_connection((self.host, self.port), timeout=timeout_s)
        except OSError as e:
            log.warning(
                "MQTT: %s cannot be reached now (%s); events are queued until it can",
                self,
                e.strerror or e,
            )
            return False
        try:
            with raw, self.ssl_context.wrap_socket(raw, server_hostname=self.host) as tls:
                with contextlib.suppress(OSError):
                    tls.unwrap()  # a clean TLS close: the broker logs no error
                return True
        except ssl.SSLCertVerificationError as e:
            ca = self.settings.ca_file or "the system's CAs"
            raise MsnEdgeError(
                f"{self}: the broker's certificate does not verify against {ca} "
                f"({e.verify_message}); check --mqtt-ca"
            ) from None
        except TimeoutError:
            log.warning("MQTT: %s did not finish the TLS handshake in %g s", self, timeout_s)
            return False
        except OSError as e:  # SSLError, or the broker hung up on the handshake
            reason = getattr(e, "reason", None) or e.strerror or e
            raise MsnEdgeError(
                f"{self}: TLS handshake failed ({reason}); is it the broker's TLS port?"
            ) from None

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


class MqttSink:
    """An event sink that publishes to a broker; see the module doc for the topics."""

    def __init__(
        self, settings: MqttSettings, streams: list[str], broker: Broker | None = None
    ) -> None:
        mqtt = _paho()
        self._mqtt = mqtt
        self.broker = broker or Broker(settings)
        self.prefix = (settings.topic or default_prefix()).rstrip("/")
        if not self.prefix or any(c in self.prefix for c in "+#\0"):
            raise MsnEdgeError(f"--mqtt-topic {self.prefix!r}: no wildcards (+, #) in a prefix")
        self.client_id = settings.client_id or self.prefix.replace("/", "-")
        queue_dir = settings.queue_dir or default_queue_dir()
        queue_file = queue_dir / f"{safe_name(self.client_id)}.sqlite"
        self.queue = DiskQueue(queue_file, settings.queue_max)
        if len(self.queue):
            log.info("MQTT: %d events from an earlier run are queued for delivery", len(self.queue))
        self.delivered = 0
        self.connected = False
        self.reconnects = 0
        self._inflight: collections.deque = collections.deque()  # (queue id, MQTTMessageInfo)
        self._last_sent = 0  # highest queue id handed to paho
        self._status: dict[str, dict] = {s: {"stream": s, "state": "starting"} for s in streams}
        self._dirty: set[str] = set(streams)
        self._cond = threading.Condition()
        self._closing = False
        self._ever_connected = False
        self._reported_drops = 0

        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv311,
            clean_session=True,  # unacknowledged messages live in our queue, not a session
        )
        b = self.broker
        if b.username:
            client.username_pw_set(b.username, b.password)
        if b.ssl_context is not None:
            client.tls_set_context(b.ssl_context)
        client.will_set(self._monitor_topic, self._monitor_status("offline", "lost"), 1, True)
        client.max_inflight_messages_set(INFLIGHT)
        client.reconnect_delay_set(*RECONNECT_S)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.enable_logger(logging.getLogger(__name__ + ".paho"))
        self._client = client
        self._thread = threading.Thread(target=self._send_loop, name="mqtt sender", daemon=True)

    @classmethod
    def start(cls, settings: MqttSettings, streams: list[str]) -> MqttSink:
        _paho()
        broker = Broker(settings)
        if broker.tls:  # before the queue is opened: a wrong CA leaves nothing behind
            broker.check_tls()
        sink = cls(settings, streams, broker)
        log.info(
            "MQTT: publishing to %s under %s/ as %s (queue %s)",
            sink.broker,
            sink.prefix,
            sink.client_id,
            sink.queue.path,
        )
        sink._client.connect_async(sink.broker.host, sink.broker.port, KEEPALIVE_S)
        sink._client.loop_start()  # paho's network thread: connects and reconnects
        sink._thread.start()
        return sink

    # -- topics and payloads ----------------------------------------------------------

    @property
    def _monitor_topic(self) -> str:
        return f"{self.prefix}/status"

    def topic(self, event: dict) -> str:
        kind = "window" if event["event"] == "window" else "alarm"
        return f"{self.prefix}/{event.get('stream', 'main')}/{kind}"

    def _monitor_status(self, state: str, reason: str | None = None) -> bytes:
        doc = {
            "state": state,
            "client_id": self.client_id,
            "time": time.time(),
            "streams": sorted(self._status),
            "queued_events": len(self.queue),
            "dropped_events": self.queue.dropped,
        }
        if reason:
            doc["reason"] = reason
        return json.dumps(doc).encode()

    # -- the sink ---------------------------------------------------------------------

    def __call__(self, event: dict) -> None:
        """Queue one event (never blocks on the network); update the stream's status."""
        dropped = self.queue.put(self.topic(event), json.dumps(event).encode())
        if dropped:
            self._report_drops()
        stream = event.get("stream", "main")
        with self._cond:
            status = self._status.setdefault(stream, {"stream": stream})
            status["state"] = "running"
            if event["event"] == "window":
                status.update(
                    time=event["end"],
                    index=event["index"],
                    score=event["score"],
                    threshold=event["threshold"],
                    verdict=event["verdict"],
                )
            else:
                status["alarm"] = event["event"] == "alarm"
            status.setdefault("alarm", False)
            self._dirty.add(stream)
            self._cond.notify()

    def _report_drops(self) -> None:
        total = self.queue.dropped
        if self._reported_drops == 0 or total - self._reported_drops >= 1000:
            log.warning(
                "MQTT: the queue is full (%d events): dropped %d oldest events so far",
                self.queue.max_items,
                total,
            )
            self._reported_drops = total
        with self._cond:
            self._dirty.add("")  # the monitor status carries the count
            self._cond.notify()

    @property
    def depth(self) -> int:
        return len(self.queue)

    @property
    def dropped(self) -> int:
        return self.queue.dropped

    # -- paho callbacks (its network thread) ------------------------------------------

    def _on_connect(self, client, _userdata, _flags, reason, _properties) -> None:
        if reason.is_failure:
            log.error("MQTT: %s refused the connection: %s", self.broker, reason)
            return
        if self._ever_connected:
            self.reconnects += 1
        self._ever_connected = True
        log.info("MQTT: connected to %s; %d events queued", self.broker, len(self.queue))
        client.publish(self._monitor_topic, self._monitor_status("online"), 1, True)
        with self._cond:
            self.connected = True
            self._dirty.update(self._status)
            self._cond.notify()

    def _on_disconnect(self, _client, _userdata, _flags, reason, _properties) -> None:
        with self._cond:
            was = self.connected
            self.connected = False
            self._cond.notify()
        if was and not self._closing:
            log.warning(
                "MQTT: lost %s (%s); events wait in the queue (%d)",
                self.broker,
                reason,
                len(self.queue),
            )

    # -- the sender thread ------------------------------------------------------------

    def _send_loop(self) -> None:
        while True:
            with self._cond:
                if self._closing and not self.connected:
                    return
                if not self.connected:
                    self._cond.wait(WAIT_S)
                    continue
                dirty, self._dirty = self._dirty, set()
            try:
                self._reap()
                self._publish_status(dirty)
                more = self._fill()
            except Exception:  # never let the sender die silently
                log.exception("MQTT: sender failed; retrying")
                more = False
                time.sleep(1.0)
            if self._closing and not self._inflight and not len(self.queue):
                return
            with self._cond:  # sleep until an event, an acknowledgement or a (dis)connect
                acked = self._inflight and self._inflight[0][1].is_published()
                if not (self._dirty or acked or (more and len(self._inflight) < INFLIGHT)):
                    self._cond.wait(WAIT_S)

    def _on_publish(self, *_args) -> None:
        with self._cond:
            self._cond.notify()

    def _reap(self) -> None:
        """Acknowledged messages leave the queue, in order."""
        acked = None
        while self._inflight and self._inflight[0][1].is_published():
            acked = self._inflight.popleft()[0]
            self.delivered += 1
        if acked is not None:
            self.queue.ack(acked)

    def _publish_status(self, dirty: set[str]) -> None:
        for stream in dirty:
            if stream == "":
                payload = self._monitor_status("closing" if self._closing else "online")
                self._client.publish(self._monitor_topic, payload, 1, True)
                continue
            with self._cond:
                payload = json.dumps(self._status[stream]).encode()
            self._client.publish(f"{self.prefix}/{stream}/status", payload, 1, True)

    def _fill(self) -> bool:
        """Hand queued messages to paho up to the in-flight window; True if more may wait."""
        room = INFLIGHT - len(self._inflight)
        if room <= 0:
            return True
        rows = self.queue.peek(self._last_sent, room)
        for qid, topic, payload in rows:
            info = self._client.publish(topic, payload, 1, False)
            if info.rc == self._mqtt.MQTT_ERR_NO_CONN:
                # The connection broke under us: paho keeps the message and sends it, in
                # order, on reconnection, and marks it published on its PUBACK; but
                # is_published() raises for a message whose publish() said NO_CONN, which
                # would stop the acknowledgements (and kill this thread). It is queued, so:
                info.rc = self._mqtt.MQTT_ERR_SUCCESS
            elif info.rc != self._mqtt.MQTT_ERR_SUCCESS:
                log.warning("MQTT: publish failed (%s); retrying", info.rc)
                return False
            self._inflight.append((qid, info))
            self._last_sent = qid
        return len(rows) == room

    # -- closing ----------------------------------------------------------------------

    def close(self, timeout_s: float = CLOSE_S) -> None:
        """Deliver what the queue holds (up to `timeout_s`), publish the final status.

        Also while not connected: a short run ends before its first connection is made,
        and a broker that is away may come back; what is left stays queued on disk.
        """
        deadline = time.monotonic() + timeout_s
        with self._cond:
            for status in self._status.values():
                status["state"] = "stopped"
            self._dirty.update(self._status)
            self._cond.notify()
        while time.monotonic() < deadline and (len(self.queue) or self._inflight or self._dirty):
            time.sleep(0.05)
        self._closing = True
        if self.connected:
            info = self._client.publish(
                self._monitor_topic, self._monitor_status("offline", "stopped"), 1, True
            )
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
        with self._cond:
            self._cond.notify()
        self._client.disconnect()
        self._client.loop_stop()
        self._thread.join(timeout=2.0)
        left = len(self.queue)
        log.info(
            "MQTT: %d events delivered, %d dropped by the queue bound, %d left queued%s",
            self.delivered,
            self.queue.dropped,
            left,
            " (delivered at the next start)" if left else "",
        )
        self.queue.close()
