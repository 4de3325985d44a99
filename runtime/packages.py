"""Whether an optional package is installed, asked without importing it (importing a GPU
package can take seconds, or fail loudly on a box without the GPU)."""

from __future__ import annotations

import importlib.util


def module_missing(name: str) -> bool:
    """True if `name` (a module, dotted or not) cannot be found by the import system."""
    try:
        return importlib.util.find_spec(name) is None
    except (ImportError, ValueError):  # a missing parent, or a blocked or broken package
        return True
