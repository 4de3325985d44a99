"""A real Mosquitto broker for tests, on 127.0.0.1 and a free port, and a recording subscriber.

The broker keeps sessions on disk (`persistence true`), so a subscriber's session and
the messages queued for it survive a broker restart, as with a plant's broker. With
`tls=`, it also listens for TLS on a second port (`tls_port`, `tls_url`), with a server
certificate made by `make_certificates` (the openssl CLI).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

MOSQUITTO = shutil.which("mosquitto") or next(
    (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)),
    None,
)


@dataclass(frozen=True)
class Certificates:
    ca: Path  # the CA that signed the server's certificate
    server_cert: Path  # for 127.0.0.1 (IP subjectAltName) and localhost
    server_key: Path
    other_ca: Path  # a CA that signed nothing here


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_certificates(root: Path) -> Certificates:
    """A test CA, a server certificate it signs for 127.0.0.1, and an unrelated CA."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is not installed: run scripts/install-system-deps.sh")
    root.mkdir(parents=True, exist_ok=True)
    for name in ("ca", "other-ca"):
        _openssl(
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "2", "-subj", f"/CN=msn-edge test {name}",
            "-keyout", str(root / f"{name}.key"), "-out", str(root / f"{name}.crt"),
        )  # fmt: skip
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-subj", "/CN=127.0.0.1",
        "-keyout", str(root / "server.key"), "-out", str(root / "server.csr"),
    )  # fmt: skip
    (root / "san.ext").write_text("subjectAltName = IP:127.0.0.1, DNS:localhost\n")
    _openssl(
        "x509", "-req", "-in", str(root / "server.csr"), "-days", "2",
        "-CA", str(root / "ca.crt"), "-CAkey", str(root / "ca.key"), "-CAcreateserial",
        "-extfile", str(root / "san.ext"), "-out", str(root / "server.crt"),
    )  # fmt: skip
    return Certificates(
        root / "ca.crt", root / "server.crt", root / "server.key", root / "other-ca.crt"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def needs_mosquitto() -> str:
    if MOSQUITTO is None:
        pytest.skip("mosquitto is not installed: run scripts/install-system-deps.sh")
    pytest.importorskip("paho.mqtt.client", reason="paho-mqtt missing: pip install .[fleet]")
    return MOSQUITTO


class Mosquitto:
    """One broker process; `stop()` and `start()` again keep its port and its sessions."""

    def __init__(
        self,
        root: Path,
        *,
        passwords: dict[str, str] | None = None,
        tls: Certificates | None = None,
    ) -> None:
        self.binary = needs_mosquitto()
        self.root = root
        self.port = free_port()
        self.tls_port = free_port() if tls else None
        self.log = root / "mosquitto.log"
        lines = [
            f"listener {self.port} 127.0.0.1",
            "persistence true",
            f"persistence_location {root}/",
            "max_queued_messages 100000",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
        ]
        if tls:
            lines += [
                f"listener {self.tls_port} 127.0.0.1",
                f"cafile {tls.ca}",
                f"certfile {tls.server_cert}",
                f"keyfile {tls.server_key}",
            ]
        if os.geteuid() == 0:
            lines.append("user root")  # else it drops to `mosquitto`, who cannot write here
        if passwords:
            pwfile = root / "passwd"
            pwfile.write_text("")
            for user, password in passwords.items():
                subprocess.run(
                    [shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd", "-b"]
                    + [str(pwfile), user, password],
                    check=True,
                    capture_output=True,
                )
            lines += ["allow_anonymous false", f"password_file {pwfile}"]
        else:
            lines.append("allow_anonymous true")
        self.conf = root / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def tls_url(self) -> str:
        return f"mqtts://127.0.0.1:{self.tls_port}"

    def start(self, timeout_s: float = 10.0) -> None:
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                [self.binary, "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2),
            ):
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.log.read_text()}")
            time.sleep(0.05)
        raise RuntimeError("mosquitto did not start listening")

    def stop(self) -> None:
        """A clean shutdown (SIGTERM): mosquitto saves its sessions, clients see EOF."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None


class Subscriber:
    """A persistent-session QoS 1 subscriber that records every message it gets.

    A broker redelivers a message it is unsure we received with the DUP flag set; only
    such a redelivery of a message already recorded is skipped. A duplicate the monitor
    sent (the flag is never passed on from a publisher) would be recorded.
    """

    def __init__(self, port: int, topic: str, client_id: str = "test-subscriber") -> None:
        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, bytes, bool]] = []  # (topic, payload, retained)
        self.redelivered = 0
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.topic = topic
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False
        )
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise RuntimeError("subscription not acknowledged")

    def _on_connect(self, client, _u, _flags, reason, _p) -> None:
        if not reason.is_failure:
            client.subscribe(self.topic, qos=1)

    def _on_message(self, _c, _u, msg) -> None:
        with self._lock:
            item = (msg.topic, bytes(msg.payload), bool(msg.retain))
            if msg.dup and item in self.messages:
                self.redelivered += 1
                return
            self.messages.append(item)

    def on(self, topic: str) -> list[bytes]:
        with self._lock:
            return [p for t, p, _ in self.messages if t == topic]

    def wait_for(self, predicate, timeout_s: float = 15.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.05)
        return predicate()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def retained(port: int, topic: str, timeout_s: float = 3.0) -> dict[str, bytes]:
    """The retained messages on `topic` (a filter), from a fresh clean-session client."""
    import paho.mqtt.client as mqtt

    got: dict[str, bytes] = {}
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, clean_session=True)
    client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
    client.on_message = lambda _c, _u, m: got.__setitem__(m.topic, bytes(m.payload))
    client.connect("127.0.0.1", port)
    client.loop_start()
    time.sleep(timeout_s)
    client.disconnect()
    client.loop_stop()
    return got
