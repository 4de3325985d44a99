"""Which ONNX Runtime is installed: exactly one distribution, or a one-line fix.

Every ONNX Runtime distribution (onnxruntime, onnxruntime-gpu, NVIDIA's Jetson builds of
onnxruntime-gpu, ...) installs the same `onnxruntime` module. With two installed, the one
unpacked last wins file by file and the CUDA and TensorRT providers typically vanish
(onnxruntime issues #7748, #26996), so GPU backends would quietly report "not
available". msn-edge says so instead, and says how to repair it.
"""

from __future__ import annotations

import functools
import importlib.metadata
from collections.abc import Callable, Mapping

# Distributions that install the `onnxruntime` module (the common ones).
ORT_DISTRIBUTIONS = (
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxruntime-directml",
    "onnxruntime-openvino",
    "onnxruntime-qnn",
)
INSTALL_HINT = (
    "pip install 'msn-edge[cpu]', or 'msn-edge[gpu]' on a CUDA machine "
    "(on a Jetson: NVIDIA's onnxruntime-gpu wheel, docs/jetson.md)"
)
MISSING = f"no ONNX Runtime is installed: {INSTALL_HINT}"


def installed(
    version: Callable[[str], str] = importlib.metadata.version,
) -> dict[str, str]:
    """The ONNX Runtime distributions installed here, name -> version."""
    found = {}
    for name in ORT_DISTRIBUTIONS:
        try:
            found[name] = version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def conflict_message(found: Mapping[str, str]) -> str | None:
    """One line saying which ONNX Runtimes clash and how to keep one; None if at most one."""
    if len(found) < 2:
        return None
    names = sorted(found)
    listed = " and ".join(f"{n} {found[n]}" for n in names)
    keep = "onnxruntime-gpu" if "onnxruntime-gpu" in found else names[-1]
    return (
        f"{listed} are both installed and overwrite each other's 'onnxruntime' module "
        f"(GPU providers may be missing): pip uninstall -y {' '.join(names)}, then "
        f"reinstall one ({keep} for the GPU; {INSTALL_HINT})"
    )


@functools.lru_cache(maxsize=1)
def conflict() -> str | None:
    """This environment's conflict message, if any (asked once per process)."""
    return conflict_message(installed())
