"""Training device, mixed precision and DDP settings from what the machine reports.

The choices are pure functions of the compute capability, the GPU count and torchrun's
environment, so they are tested here for GPUs this machine does not have; the CUDA test
at the end runs them on a real GPU where there is one.
"""

import math

import pytest
import torch
from train_helpers import small_config, synth_set

from msn_edge.devices import (
    AmpChoice,
    DistEnv,
    amp_choice,
    ddp_args,
    dist_from_env,
    process_group_args,
    training_device,
)
from msn_edge.runtime.errors import BackendError
from msn_edge.training import Stepper, train

FP16 = AmpChoice(True, torch.float16, True)
BF16 = AmpChoice(True, torch.bfloat16, False)
FP32 = AmpChoice(False, None, False)


@pytest.mark.parametrize(
    ("gpu", "capability", "expected"),
    [
        ("V100", (7, 0), FP16),
        ("Jetson Xavier", (7, 2), FP16),  # is_bf16_supported() says True: emulated
        ("T4", (7, 5), FP16),
        ("A100", (8, 0), BF16),
        ("RTX 3090", (8, 6), BF16),
        ("Jetson Orin", (8, 7), BF16),
        ("H100", (9, 0), BF16),
    ],
)
def test_amp_dtype_follows_compute_capability(gpu, capability, expected):
    assert amp_choice("cuda", capability, amp=True) == expected, gpu


def test_amp_off_on_the_cpu_or_when_disabled():
    assert amp_choice("cpu", None, amp=True) == FP32
    assert amp_choice("cuda", (9, 0), amp=False) == FP32
    assert FP32.describe() == "float32"
    assert FP16.describe() == "fp16 autocast + loss scaling"
    with pytest.raises(ValueError, match="compute capability"):
        amp_choice("cuda", None, amp=True)


def test_cpu_stepper_trains_in_float32_without_a_scaler():
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def loss_of(x, _spectrum, target):
        return ((model(x).squeeze(1) - target) ** 2).mean()

    step = Stepper(loss_of, opt, torch.device("cpu"), amp=True)
    assert step.amp == FP32 and not step.scaler.is_enabled()
    x, target = torch.ones(3, 4), torch.zeros(3)
    before = model.weight.detach().clone()
    loss = step(x, None, target)
    assert loss.dtype == torch.float32 and not torch.equal(model.weight, before)


def test_dist_env_from_torchrun_variables():
    assert dist_from_env({}) == DistEnv(0, 0, 1)
    assert dist_from_env({"WORLD_SIZE": "1", "RANK": "0"}) == DistEnv(0, 0, 1)
    env = {"WORLD_SIZE": "8", "RANK": "5", "LOCAL_RANK": "1"}  # 2 nodes x 4 GPUs, node 1
    assert dist_from_env(env) == DistEnv(rank=5, local_rank=1, world=8)
    assert not dist_from_env(env).main and DistEnv().main
    with pytest.raises(BackendError, match="RANK / LOCAL_RANK are missing.*torchrun"):
        dist_from_env({"WORLD_SIZE": "2", "RANK": "1"})


def test_training_device_from_local_rank_and_gpu_count():
    assert training_device(None, local_rank=0, cuda_count=0) == torch.device("cpu")
    assert training_device(None, local_rank=0, cuda_count=1) == torch.device("cuda", 0)
    assert training_device(None, local_rank=3, cuda_count=4) == torch.device("cuda", 3)
    assert training_device("cuda", local_rank=1, cuda_count=2) == torch.device("cuda", 1)
    assert training_device("cpu", local_rank=1, cuda_count=2) == torch.device("cpu")


@pytest.mark.parametrize(
    ("requested", "local_rank", "count", "message"),
    [
        ("cuda", 1, 1, r"LOCAL_RANK 1 but this node has 1 visible GPU\(s\): start at most 1"),
        (None, 4, 4, r"LOCAL_RANK 4 but this node has 4 visible GPU\(s\)"),
        ("cuda", 0, 0, "--device cuda: this torch build sees no CUDA GPU"),
        ("tpu", 0, 0, "unknown training device 'tpu'; use cpu or cuda"),
    ],
)
def test_training_device_refusals(requested, local_rank, count, message):
    with pytest.raises(BackendError, match=message):
        training_device(requested, local_rank=local_rank, cuda_count=count)


def test_process_group_and_ddp_arguments():
    gpu1 = torch.device("cuda", 1)
    assert process_group_args(gpu1) == {"backend": "nccl", "device_id": gpu1}
    assert ddp_args(gpu1) == {"device_ids": [1], "output_device": 1}
    cpu = torch.device("cpu")
    assert process_group_args(cpu) == {"backend": "gloo"}
    assert ddp_args(cpu) == {}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_training_with_the_amp_of_this_gpu(tmp_path):
    data = synth_set(tmp_path / "data", kinds=("fan", "valve"), ids=1, n_train=6)
    result = train([data], tmp_path / "run", small_config(epochs=1), device="cuda")
    assert result.epoch == 1 and all(math.isfinite(x) for x in result.losses)
    assert next(result.model.parameters()).device == torch.device("cuda", 0)
    capability = torch.cuda.get_device_capability(0)
    step = Stepper(
        result.model, torch.optim.Adam(result.model.parameters()), torch.device("cuda", 0), True
    )
    assert step.amp == amp_choice("cuda", capability, True)
    assert step.scaler.is_enabled() == (capability < (8, 0))
