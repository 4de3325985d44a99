"""Training under torchrun: 2 CPU processes, gloo, DistributedDataParallel."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from train_helpers import small_config, synth_set

from msn_edge.checkpoint import load_checkpoint
from msn_edge.training import train

# Each rank trains through the library and writes what it ended with, so that the test
# can check that the ranks agree (only rank 0 writes the run folder).
RANK_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    import torch
    from msn_edge.config import Config
    from msn_edge.training import train

    config = Config.from_dict(json.loads(Path(sys.argv[1]).read_text()))
    result = train([Path(sys.argv[2])], Path(sys.argv[3]), config, progress=False)
    rank = int(os.environ["RANK"])
    params = {k: v.detach() for k, v in result.model.named_parameters()}
    out = {"params": params, "losses": result.losses, "epoch": result.epoch}
    torch.save(out, Path(sys.argv[4]) / f"rank{rank}.pt")
    """
)


def test_torchrun_two_processes_agree_and_write_one_run(tmp_path):
    data = synth_set(tmp_path / "data", kinds=("fan", "valve"), ids=2, n_train=6)
    config = small_config(epochs=2)
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    (tmp_path / "rank.py").write_text(RANK_SCRIPT)
    ddp_run = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(tmp_path / "rank.py"), str(tmp_path / "config.json"), str(data), str(ddp_run),
        str(tmp_path),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["epoch"] == ranks[1]["epoch"] == 2
    assert ranks[0]["losses"] == ranks[1]["losses"]  # averaged over both ranks
    for name, p in ranks[0]["params"].items():
        assert torch.equal(p, ranks[1]["params"][name]), name  # gradients were all-reduced

    # One run folder, by rank 0, shaped as a single-process run's.
    single = train([data], tmp_path / "single", config, progress=False, fit_scoring=False)
    a = torch.load(ddp_run / "checkpoint.pt", weights_only=True)
    b = torch.load(single.checkpoint, weights_only=True)
    assert a.keys() == b.keys() and a["classes"] == b["classes"] and a["epoch"] == 2
    for part in ("model", "head"):
        assert {k: v.shape for k, v in a[part].items()} == {k: v.shape for k, v in b[part].items()}
    assert a["head"]["scale"] > 0
    loaded = load_checkpoint(ddp_run)
    for name, p in loaded.model.named_parameters():
        assert torch.equal(p, ranks[0]["params"][name])
    log = (ddp_run / "train_log.jsonl").read_text().splitlines()
    assert len(log) == 2  # rank 0 alone logs
    assert [json.loads(line)["loss"] for line in log] == pytest.approx(ranks[0]["losses"])
    assert (ddp_run / "scoring.npz").is_file() and (ddp_run / "scoring.json").is_file()
