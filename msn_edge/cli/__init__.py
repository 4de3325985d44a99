"""The `msn-edge` command line: a thin click layer over library functions.

Each area registers its commands from its own module; a command module imports torch
only inside the command body, so that the edge commands (`score BUNDLE`, `monitor`,
`devices`, `bench`) run where torch is not installed.
"""

from __future__ import annotations

import click

from msn_edge.runtime.version import __version__

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, prog_name="msn-edge")
def main() -> None:
    """msn-edge: listen to a machine, flag when it sounds wrong.

    Train an MSN anomaly detector on normal recordings, export it to one bundle file,
    and monitor a microphone on the edge box.
    """


def _register_commands() -> None:
    """Import every command module of this package; each adds its commands to `main`."""
    import pkgutil
    from importlib import import_module

    for mod in pkgutil.iter_modules(__path__):
        if mod.name != "common":
            import_module(f"{__name__}.{mod.name}")


_register_commands()
