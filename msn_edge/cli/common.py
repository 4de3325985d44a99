"""Pieces every command shares: error translation and shared options."""

from __future__ import annotations

import functools
import logging
import math
import sys
from collections.abc import Callable
from typing import TypeVar

import click

from msn_edge.runtime.errors import MsnEdgeError

F = TypeVar("F", bound=Callable)


def user_errors(fn: F) -> F:
    """Turn the library's typed errors into one line on stderr and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MsnEdgeError as e:
            raise click.ClickException(str(e)) from None

    return wrapper  # type: ignore[return-value]


class FiniteFloat(click.FloatRange):
    """A float option in a range that also refuses nan and inf (FloatRange lets them pass)."""

    name = "finite float"

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


def echo_stdout(text: str) -> None:
    """A result line on stdout; a closed or full stdout is one clear error, not a traceback."""
    try:
        click.echo(text)
    except (OSError, ValueError) as e:
        from msn_edge.runtime.events import silence_stdout

        silence_stdout()
        why = getattr(e, "strerror", None) or str(e)
        raise MsnEdgeError(f"cannot write results to stdout ({why})") from None


# Libraries that log their internals at INFO (the ONNX exporter logs one line per
# deduplicated initializer, hundreds per export): their warnings only, unless --verbose.
CHATTY_LIBRARIES = ("onnx_ir", "onnxscript", "torch.onnx")


def setup_logging(verbose: bool = False) -> None:
    """Logs go to stderr; stdout is for results and events."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    for name in CHATTY_LIBRARIES:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.WARNING)
