"""systemd's notify protocol, written by hand (a datagram to $NOTIFY_SOCKET; no dependency).

With `Type=notify` and `WatchdogSec=` in the unit, the monitor says READY=1 once its
engines and inputs are open, WATCHDOG=1 from its main loop at least twice per watchdog
period, and STOPPING=1 when it stops. A loop that hangs (a stuck engine call, a dead
lock) stops pinging, and systemd restarts the service. Outside systemd nothing is sent.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)


class Notifier:
    """Sends sd_notify messages when $NOTIFY_SOCKET is set; a no-op otherwise."""

    def __init__(self, address: str | None = None, watchdog_usec: int | None = None) -> None:
        self.address = address
        self.interval_s = None if not watchdog_usec else watchdog_usec / 1e6 / 2
        self._last_ping = 0.0
        self._sock: socket.socket | None = None
        if address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            # Never wait on systemd: a full socket queue drops a message (the next ping
            # follows within half a period), it does not stall the monitor's loop.
            self._sock.setblocking(False)
            if address.startswith("@"):  # an abstract socket
                self._target = "\0" + address[1:]
            else:
                self._target = address

    @classmethod
    def from_env(cls) -> Notifier:
        """Read $NOTIFY_SOCKET and $WATCHDOG_USEC (if $WATCHDOG_PID names this process)."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if pid and pid.isdigit() and int(pid) != os.getpid():
            usec = None  # meant for another process
        return cls(os.environ.get("NOTIFY_SOCKET"), int(usec) if usec and usec.isdigit() else None)

    def send(self, message: str) -> None:
        if self._sock is None:
            return
        try:
            self._sock.sendto(message.encode(), self._target)
        except OSError as e:  # systemd went away or is behind: nothing to tell now
            log.debug("sd_notify %s: %s", message, e)

    def ready(self, status: str = "") -> None:
        self.send("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def ping(self) -> None:
        """WATCHDOG=1, at most twice per watchdog period (call it as often as you like)."""
        if self.interval_s is None:
            return
        now = time.monotonic()
        if now - self._last_ping >= self.interval_s:
            self._last_ping = now
            self.send("WATCHDOG=1")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
