"""Training under torchrun: 2 CPU processes, gloo, DistributedDataParallel; on a machine
with 2 or more GPUs, also 2 CUDA processes over NCCL, one GPU each."""

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

    import torch.distributed as dist

    seen = {}  # what train() asked of init_process_group
    init = dist.init_process_group

    def spy(*args, **kwargs):
        seen.update(kwargs, device_id=str(kwargs.get("device_id")))
        return init(*args, **kwargs)

    dist.init_process_group = spy
    config = Config.from_dict(json.loads(Path(sys.argv[1]).read_text()))
    device = sys.argv[5]
    result = train([Path(sys.argv[2])], Path(sys.argv[3]), config, progress=False, device=device)
    rank = int(os.environ["RANK"])
    params = {k: v.detach().cpu() for k, v in result.model.named_parameters()}
    out = {
        "params": params, "losses": result.losses, "epoch": result.epoch,
        "backend": seen["backend"], "device_id": seen["device_id"],
        "param_device": str(next(result.model.parameters()).device),
    }
    torch.save(out, Path(sys.argv[4]) / f"rank{rank}.pt")
    """
)


def _torchrun(tmp_path, device: str, nproc: int = 2, env: dict | None = None):
    """Train through the library in `nproc` torchrun processes; (process, data, run dir)."""
    data = synth_set(tmp_path / "data", kinds=("fan", "valve"), ids=2, n_train=6)
    config = small_config(epochs=2)
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    (tmp_path / "rank.py").write_text(RANK_SCRIPT)
    ddp_run = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc_per_node", str(nproc), str(tmp_path / "rank.py"), str(tmp_path / "config.json"),
        str(data), str(ddp_run), str(tmp_path), device,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    return done, data, ddp_run, config


@pytest.mark.slow  # two torchrun processes train
def test_torchrun_two_processes_agree_and_write_one_run(tmp_path):
    # CPU and gloo, explicitly: on a CUDA machine train() would otherwise pick the GPUs.
    done, data, ddp_run, config = _torchrun(tmp_path, "cpu", env={"CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr[-3000:]

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["backend"] for r in ranks] == ["gloo", "gloo"]
    assert [r["device_id"] for r in ranks] == ["None", "None"]
    assert [r["param_device"] for r in ranks] == ["cpu", "cpu"]
    assert ranks[0]["epoch"] == ranks[1]["epoch"] == 2
    assert ranks[0]["losses"] == ranks[1]["losses"]  # averaged over both ranks
    for name, p in ranks[0]["params"].items():
        assert torch.equal(p, ranks[1]["params"][name]), name  # gradients were all-reduced

    # One run folder, by rank 0, shaped as a single-process run's.
    single = train(
        [data], tmp_path / "single", config, progress=False, fit_scoring=False, device="cpu"
    )
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


GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.gpu
@pytest.mark.skipif(GPUS < 2, reason=f"NCCL DDP needs 2 CUDA GPUs, this machine has {GPUS}")
def test_torchrun_nccl_one_gpu_per_process(tmp_path):
    done, *_ = _torchrun(tmp_path, "cuda")
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["backend"] for r in ranks] == ["nccl", "nccl"]
    assert [r["device_id"] for r in ranks] == ["cuda:0", "cuda:1"]
    assert [r["param_device"] for r in ranks] == ["cuda:0", "cuda:1"]
    assert ranks[0]["losses"] == ranks[1]["losses"]
    for name, p in ranks[0]["params"].items():
        assert torch.equal(p, ranks[1]["params"][name]), name


@pytest.mark.gpu
@pytest.mark.skipif(GPUS < 1, reason="needs a CUDA GPU")
def test_more_processes_than_gpus_is_a_clear_error(tmp_path):
    done, *_ = _torchrun(tmp_path, "cuda", nproc=GPUS + 1)
    assert done.returncode != 0
    assert f"LOCAL_RANK {GPUS} but this node has {GPUS} visible GPU(s)" in done.stderr
