"""Which device a training process uses, and how: mixed precision and DDP settings.

Pure functions of what the machine reports (compute capability, GPU count, LOCAL_RANK),
so that every choice is tested on a CPU-only machine; `training.py` only asks torch for
those facts and calls them.

- Mixed precision: bf16 only where the GPU has bf16 tensor cores (compute capability
  8.0, Ampere, and later). `torch.cuda.is_bf16_supported()` also says True where bf16 is
  merely emulated (T4 sm_75, V100 sm_70, Jetson Xavier sm_72), where it runs slower than
  fp32; there fp16 with loss scaling is the fast and safe choice.
- DDP under torchrun: process `LOCAL_RANK` owns `cuda:LOCAL_RANK`. It must be the current
  device before anything touches CUDA (else every rank opens a context on GPU 0), DDP
  gets `device_ids=[local_rank]`, and NCCL is bound to it with `init_process_group(...,
  device_id=...)`. A LOCAL_RANK beyond the visible GPUs is an error that says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from msn_edge.runtime.errors import BackendError

BF16_MIN_CAPABILITY = (8, 0)  # Ampere: native bf16 tensor cores
TRAINING_DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class AmpChoice:
    """What `Stepper` runs: autocast on or off, its dtype, and whether losses are scaled."""

    enabled: bool
    dtype: torch.dtype | None  # torch.bfloat16 | torch.float16 | None (float32)
    scaled: bool  # fp16 needs a GradScaler; bf16 has fp32's exponent range and does not

    def describe(self) -> str:
        if not self.enabled:
            return "float32"
        return "bf16 autocast" if self.dtype == torch.bfloat16 else "fp16 autocast + loss scaling"


def amp_choice(device_type: str, capability: tuple[int, int] | None, amp: bool) -> AmpChoice:
    """Mixed precision for a device: bf16 on compute capability >= 8.0, fp16 + scaler below.

    `capability` is `torch.cuda.get_device_capability(dev)` on CUDA, None elsewhere; the
    CPU trains in float32.
    """
    if not amp or device_type != "cuda":
        return AmpChoice(False, None, False)
    if capability is None:
        raise ValueError("a CUDA device needs its compute capability to choose a dtype")
    if tuple(capability) >= BF16_MIN_CAPABILITY:
        return AmpChoice(True, torch.bfloat16, False)
    return AmpChoice(True, torch.float16, True)


@dataclass(frozen=True)
class DistEnv:
    """This process's place under torchrun (rank 0 of 1 when run alone)."""

    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def dist_from_env(environ: dict[str, str]) -> DistEnv:
    """RANK / LOCAL_RANK / WORLD_SIZE as torchrun sets them; one process if absent."""
    try:
        world = int(environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return DistEnv()
        return DistEnv(int(environ["RANK"]), int(environ["LOCAL_RANK"]), world)
    except (KeyError, ValueError) as e:
        raise BackendError(
            f"WORLD_SIZE is set but RANK / LOCAL_RANK are missing or not integers ({e}); "
            "start distributed training with torchrun"
        ) from None


def training_device(requested: str | None, *, local_rank: int, cuda_count: int) -> torch.device:
    """The device of the process with `local_rank` on a node with `cuda_count` GPUs.

    None picks cuda when there is a GPU, else cpu. A process on CUDA owns GPU
    `local_rank`; more processes than GPUs is an error (two ranks on one GPU would
    deadlock NCCL or silently share its memory).
    """
    if requested is None:
        requested = "cuda" if cuda_count > 0 else "cpu"
    if requested not in TRAINING_DEVICES:
        raise BackendError(f"unknown training device {requested!r}; use cpu or cuda")
    if requested == "cpu":
        return torch.device("cpu")
    if cuda_count == 0:
        raise BackendError("--device cuda: this torch build sees no CUDA GPU")
    if not 0 <= local_rank < cuda_count:
        raise BackendError(
            f"LOCAL_RANK {local_rank} but this node has {cuda_count} visible GPU(s): start "
            f"at most {cuda_count} processes per node (torchrun --nproc_per_node), or "
            "train on the CPU with --device cpu"
        )
    return torch.device("cuda", local_rank)


def process_group_args(dev: torch.device) -> dict:
    """`init_process_group` arguments: NCCL bound to this process's GPU, or gloo on the CPU."""
    if dev.type == "cuda":
        return {"backend": "nccl", "device_id": dev}
    return {"backend": "gloo"}


def ddp_args(dev: torch.device) -> dict:
    """`DistributedDataParallel` arguments: the one GPU this process drives (none on the CPU)."""
    if dev.type == "cuda":
        return {"device_ids": [dev.index], "output_device": dev.index}
    return {}
