"""Ctrl-C and SIGTERM during training: stop as Ctrl-C does, or wait until a save is whole."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager


@contextmanager
def _handling(signals: tuple[int, ...], handler) -> Iterator[None]:
    """`handler` for `signals` during the block, then the previous handlers. A signal
    ignored at start (`nohup`, a background job) stays ignored; outside the main thread
    signals are left alone."""
    wanted = [s for s in signals if signal.getsignal(s) != signal.SIG_IGN]
    try:
        previous = {s: signal.signal(s, handler) for s in wanted}
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def sigterm_as_interrupt() -> AbstractContextManager[None]:
    """SIGTERM (e.g. from a scheduler) stops training the way Ctrl-C does."""
    return _handling((signal.SIGTERM,), _raise_interrupt)


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block is done, then stop as usual."""
    received = []
    with _handling((signal.SIGINT, signal.SIGTERM), lambda signum, frame: received.append(signum)):
        yield
    if received:
        raise KeyboardInterrupt
