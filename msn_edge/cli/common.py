"""Pieces every command shares: error translation, logging set-up, and the options that
several commands take, each defined once (one type, one help text) as a decorator."""

from __future__ import annotations

import functools
import logging
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
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


# --- Kinds of value, one click type each.


def count_option(*decls: str, minimum: int = 1, **kw) -> Callable[[F], F]:
    """An option taking a whole number N >= `minimum`."""
    return click.option(*decls, type=click.IntRange(min=minimum), metavar="N", **kw)


def seconds_option(
    *decls: str, low: float = 0, low_open: bool = True, high: float | None = None, **kw
) -> Callable[[F], F]:
    """An option taking a finite number of seconds, more than `low` (or at least `low`
    unless `low_open`) and at most `high`."""
    kind = FiniteFloat(min=low, min_open=low_open, max=high)
    return click.option(*decls, type=kind, metavar="SECONDS", **kw)


def minutes_option(*decls: str, **kw) -> Callable[[F], F]:
    """An option taking how many minutes to listen: a finite number more than 0."""
    return click.option(*decls, type=FiniteFloat(min=0, min_open=True), metavar="MINUTES", **kw)


def path_option(*decls: str, folder: bool = False, exists: bool = False, **kw) -> Callable[[F], F]:
    """An option naming a file (or, with `folder`, a folder), given to the command as a Path;
    with `exists`, one that must be there."""
    kind = click.Path(exists=exists, file_okay=not folder, dir_okay=folder, path_type=Path)
    return click.option(*decls, type=kind, **kw)


def choice_option(*decls: str, choices: Sequence[str], **kw) -> Callable[[F], F]:
    """An option taking one of `choices`; its default is shown in --help."""
    return click.option(*decls, type=click.Choice(choices), show_default=True, **kw)


# --- Options that several commands take. Each is defined here once, so its name, type and
# help are the same in every command.

verbose_option = click.option("-v", "--verbose", is_flag=True, help="Debug logs.")

backend_option = choice_option(
    "--backend",
    choices=BACKENDS,
    default="auto",
    help="Inference backend for the bundle; auto takes the best one available.",
)

precision_option = choice_option(
    "--precision",
    choices=PRECISIONS,
    default="fp32",
    help="Model precision: int8 needs a bundle with an int8 model, fp16 a TensorRT backend.",
)

capture_option = choice_option(
    "--capture",
    choices=CAPTURES,
    default="auto",
    help="How --device is read: arecord (any ALSA name) or PortAudio.",
)

hop_option = seconds_option(
    "--hop", "hop_s", help="Time between window starts [default: the window; shorter overlaps]."
)

torch_device_option = click.option(
    "--device", metavar="DEVICE", help="Torch device for a run, e.g. cuda  [default: cpu]"
)


def threads_option(default: int | None = None) -> Callable[[F], F]:
    """`--threads N`: CPU threads for inference; None leaves ONNX Runtime's default."""
    return count_option(
        "--threads",
        default=default,
        show_default=default is not None,
        help="CPU threads for inference" + ("" if default else "  [default: all cores]"),
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


def given(ctx: click.Context, *names: str) -> list[str]:
    """The options among `names` (parameter names) that the command line set."""
    default = click.core.ParameterSource.DEFAULT
    return [n for n in names if ctx.get_parameter_source(n) is not default]
