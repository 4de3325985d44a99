"""Checkpoints: a plain dict of tensors and JSON-like values, loadable with weights_only=True.

Keys: format, msn_edge_version, config (Config.to_dict()), model (state dict of the
unwrapped MSN, so no loader strips prefixes), head (the Sub-cluster AdaCos weights and
scale, needed to resume), optimizer (RUN/checkpoint.pt only), epoch (completed epochs),
classes (names in label order), auxiliary (the auxiliary classes added, or None), data
(roots, n_clips, groups), rng (torch CPU RNG state, for resume).

Run folder: RUN/checkpoint.pt is the latest full checkpoint; RUN/epochs/epoch_NNN.pt keep
every epoch's weights (without the optimizer, which would triple their size).
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from msn_edge.config import Config
from msn_edge.model import MSN
from msn_edge.runtime.atomic import atomic_writer
from msn_edge.runtime.errors import MsnEdgeError
from msn_edge.runtime.version import __version__

CHECKPOINT_FORMAT = 1
CHECKPOINT_FILE = "checkpoint.pt"
EPOCHS_DIR = "epochs"
REQUIRED_KEYS = ("format", "config", "model", "epoch", "classes")


class CheckpointError(MsnEdgeError):
    """A checkpoint that is missing, unreadable, of another format, or of another run."""


@dataclass
class LoadedRun:
    config: Config
    model: MSN  # in eval mode
    classes: list[str]
    meta: dict  # every other key of the checkpoint (epoch, auxiliary, data, ...)


def epoch_path(run_dir: Path, epoch: int) -> Path:
    return run_dir / EPOCHS_DIR / f"epoch_{epoch:03d}.pt"


def new_state(
    config: Config,
    model: MSN,
    classes: Sequence[str],
    *,
    epoch: int = 0,
    auxiliary: dict | None = None,
    data: dict | None = None,
    **extra,
) -> dict:
    """The checkpoint dict `save_checkpoint` writes, from the unwrapped model: its weights,
    config, class names and provenance; `extra` adds training's keys (head, optimizer, rng)."""
    return {
        "config": config.to_dict(),
        "model": model.state_dict(),
        "epoch": epoch,
        "classes": list(classes),
        "auxiliary": auxiliary,
        "data": {} if data is None else data,
        **extra,
    }


def save_checkpoint(path: str | Path, state: dict) -> Path:
    """Write atomically (temp file, then rename): a crash or Ctrl-C never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"format": CHECKPOINT_FORMAT, "msn_edge_version": __version__, **state}
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise ValueError(f"checkpoint state lacks {missing}")
    with atomic_writer(path) as f:
        torch.save(state, f)
    return path


def read_checkpoint(run_or_path: str | Path, map_location: str = "cpu") -> dict:
    """The raw checkpoint dict of RUN (its checkpoint.pt) or of a .pt file."""
    path = Path(run_or_path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint there (train writes RUN/{CHECKPOINT_FILE})")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path}: not a readable msn-edge checkpoint (not a torch zip file; train writes "
            f"RUN/{CHECKPOINT_FILE}, export writes a .msn bundle)"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for corrupt or unsafe files
        raise CheckpointError(f"{path}: not a readable msn-edge checkpoint ({_why(e)})") from None
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        raise CheckpointError(f"{path}: not an msn-edge checkpoint (keys missing)")
    if state["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path}: checkpoint format {state['format']}, this msn-edge reads {CHECKPOINT_FORMAT}"
        )
    return state


def _why(e: Exception) -> str:
    """torch's reason, without its advice to load with weights_only=False (which would let
    the file run code): a checkpoint is only ever loaded as tensors and plain values."""
    text = str(e)
    if "weights_only" in text or "npickl" in text:
        return "it holds objects other than tensors and plain values, which are never loaded"
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return first[:200]


def load_checkpoint(run_or_path: str | Path, map_location: str = "cpu") -> LoadedRun:
    """The trained MSN of a run folder or checkpoint file, with its config and classes."""
    state = read_checkpoint(run_or_path, map_location)
    try:
        config = Config.from_dict(state["config"])
        model = MSN(config.model)
        model.load_state_dict(state["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"{run_or_path}: checkpoint does not match its config ({e})"
        ) from None
    model.eval()
    meta = {k: v for k, v in state.items() if k not in ("config", "model", "classes")}
    return LoadedRun(config, model, list(state["classes"]), meta)
