"""A Python environment without torch, as on an edge box: for tests of the torch-free paths."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BLOCK_TORCH = """
import sys

class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError("No module named 'torch' (blocked)", name=name)
        return None

sys.meta_path.insert(0, _NoTorch())
"""
# Appended to a child's code: it fails if anything imported torch after all.
TORCH_NOT_IMPORTED = (
    "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)"
)


def no_torch_env(folder: Path) -> dict[str, str]:
    """os.environ for child processes that cannot import torch (a sitecustomize in
    `folder` blocks it); checked, so a test cannot pass because the blocker failed."""
    (folder / "sitecustomize.py").write_text(BLOCK_TORCH)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(folder), *sys.path]))
    probe = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True)
    assert probe.returncode != 0, "the blocker must hide torch"
    return env
