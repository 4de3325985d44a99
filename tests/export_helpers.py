"""A small run and its exported bundle, built once per test process for the export tests.

The run is the tiny model on 2.5 s windows (tests/train_helpers.py) with random weights
and random BatchNorm statistics (so no layer is an identity), saved as the training code
saves runs, with prototypes fit on a synthetic DCASE 2020 data set. Exporting takes tens
of seconds, so `tiny_export` runs `msn-edge export --int8 --eval-data` once and every
export test file reads its bundle.
"""

from __future__ import annotations

import functools
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from click.testing import CliRunner
from train_helpers import small_config, synth_set

from msn_edge.checkpoint import new_state, save_checkpoint
from msn_edge.cli import main
from msn_edge.config import Config
from msn_edge.model import MSN
from msn_edge.prototypes import fit_scoring, save_scoring
from msn_edge.training import training_clips


def random_model(config: Config, seed: int) -> MSN:
    """An MSN with random weights and BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    model = MSN(config.model)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def make_run(run_dir: Path, data: Path, seed: int, config: Config | None = None) -> Path:
    """A run folder as training leaves it: checkpoint.pt and the scoring files.

    `config` defaults to `small_config()` (the tiny model on 2.5 s windows).
    """
    config = small_config() if config is None else config
    model = random_model(config, seed)
    clips = training_clips([data])
    data_record = {
        "roots": [str(data)],
        "n_clips": len(clips),
        "groups": sorted({c.group for c in clips}),
    }
    classes = sorted({c.class_name for c in clips})
    save_checkpoint(run_dir / "checkpoint.pt", new_state(config, model, classes, data=data_record))
    save_scoring(run_dir, fit_scoring(model, config, clips))
    return run_dir


@dataclass(frozen=True)
class TinyExport:
    data: Path  # synthetic DCASE 2020 set: fan id_00 and id_01
    run: Path
    bundle: Path
    exit_code: int
    stdout: str  # the export report table
    output: str  # stdout and stderr

    def manifest(self) -> dict:
        with zipfile.ZipFile(self.bundle) as z:
            return json.loads(z.read("manifest.json"))

    def member(self, name: str) -> bytes:
        with zipfile.ZipFile(self.bundle) as z:
            return z.read(name)


@functools.cache
def tiny_export(base: Path) -> TinyExport:
    """`msn-edge export RUN -o fan.msn --int8 --eval-data DATA` on the small run."""
    base.mkdir(parents=True, exist_ok=True)
    data = synth_set(base / "data", ids=2, n_train=6, n_test=3)
    run = make_run(base / "run", data, seed=0)
    bundle = base / "fan.msn"
    args = ["export", str(run), "-o", str(bundle), "--int8", "--eval-data", str(data)]
    result = CliRunner().invoke(main, args)
    return TinyExport(data, run, bundle, result.exit_code, result.stdout, result.output)


def exported_bundle(tmp_path_factory) -> TinyExport:
    """The shared export, under the session's temporary folder; fails on a bad exit."""
    result = tiny_export(tmp_path_factory.getbasetemp() / "tiny_export")
    assert result.exit_code == 0, result.output
    return result
