"""Where and how the MQTT sink connects: the broker URL, credentials, and a TLS check.

Kept apart from the sink (mqtt_sink.py) because it is settled before anything is
published: a mistake in the URL, a credential file or a certificate is one line at
start-up, never a retry loop in the background.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
from pathlib import Path
from urllib.parse import unquote, urlsplit

from msn_edge.runtime.errors import MsnEdgeError
from msn_edge.runtime.monitor_config import MqttSettings

log = logging.getLogger("msn_edge.runtime.mqtt_sink")  # the sink's log, as before the split

PROBE_S = 5.0  # the TLS check's connection and handshake timeout
PASSWORD_ENV = "MSN_EDGE_MQTT_PASSWORD"


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
