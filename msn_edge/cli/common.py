"""Pieces every command shares: error translation, logging set-up, and the options that
several commands take, each defined once (one type, one help text) as a decorator."""

from __future__ import annotations

import functools
import logging
import math
import sys
from collections.abc import Callable
from typing import TypeVar

import click

from msn_edge.runtime.capture import CAPTURES
from msn_edge.runtime.engines import BACKENDS, PRECISIONS
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


# --- Options shared by several commands. A command that takes one of these uses the
# decorator, so its name, type and help are the same everywhere.

verbose_option = click.option("-v", "--verbose", is_flag=True, help="Debug logs.")


def threads_option(default: int | None = None) -> Callable[[F], F]:
    """`--threads N`: CPU threads for inference; None leaves ONNX Runtime's default."""
    return click.option(
        "--threads",
        type=click.IntRange(min=1),
        default=default,
        show_default=default is not None,
        metavar="N",
        help="CPU threads for inference" + ("" if default else "  [default: all cores]"),
    )


backend_option = click.option(
    "--backend",
    type=click.Choice(BACKENDS),
    default="auto",
    show_default=True,
    help="Inference backend for the bundle; auto takes the best one available.",
)

precision_option = click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default="fp32",
    show_default=True,
    help="Model precision: int8 needs a bundle with an int8 model, fp16 a TensorRT backend.",
)


def group_option(required: bool = False) -> Callable[[F], F]:
    """`--group NAME`: a scoring group of the model (a machine type and ID)."""
    return click.option(
        "--group",
        required=required,
        metavar="NAME",
        help="Scoring group (machine type/ID), e.g. fan/id_00: the one to use, when the "
        "model has several, or the one to enroll.",
    )


def given(ctx: click.Context, *names: str) -> list[str]:
    """The options among `names` (parameter names) that the command line set."""
    default = click.core.ParameterSource.DEFAULT
    return [n for n in names if ctx.get_parameter_source(n) is not default]


def alsa_device_option(multiple: bool = False) -> Callable[[F], F]:
    """`-d/--device NAME`: an ALSA capture device (repeatable where a command takes several)."""
    return click.option(
        "-d",
        "--device",
        "devices" if multiple else "device",
        metavar="NAME",
        multiple=multiple,
        help="ALSA input: hw:1, plughw:1,0, default, or a PCM from an asoundrc"
        + (". Repeatable." if multiple else "."),
    )


hop_option = click.option(
    "--hop",
    "hop_s",
    type=FiniteFloat(min=0, min_open=True),
    metavar="SECONDS",
    help="Time between window starts [default: the window; shorter overlaps].",
)

capture_option = click.option(
    "--capture",
    type=click.Choice(CAPTURES),
    default="auto",
    show_default=True,
    help="How --device is read: arecord (any ALSA name) or PortAudio.",
)

torch_device_option = click.option(
    "--device",
    default=None,
    metavar="DEVICE",
    help="Torch device for a run, e.g. cuda  [default: cpu]",
)
