"""Training MSN with Sub-cluster AdaCos, mixup and label smoothing (spec §3).

One function runs on one device and, unchanged, under torchrun with
DistributedDataParallel (nanoGPT style: RANK/WORLD_SIZE/LOCAL_RANK from the environment;
only rank 0 shows progress, logs and saves):

    msn-edge train data/fan -o runs/fan
    torchrun --nproc_per_node 4 --no-python msn-edge train data/fan -o runs/fan

The batch size is global: each of W processes takes batch_size / W clips per step.
Every random choice of a clip (offset, mixup partner and λ, smoothing factor) is drawn
from a generator seeded by (seed, epoch, clip index), and the order from the sampler's
(seed, epoch): a run is the same with any number of DataLoader workers, and a resumed
run continues exactly where the interrupted one would have gone. The data pipeline is
train_data.py; what Ctrl-C and SIGTERM do, interrupts.py.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from msn_edge import prototypes
from msn_edge.auxiliary import ClassPlan, build_classes
from msn_edge.checkpoint import (
    CHECKPOINT_FILE,
    CheckpointError,
    epoch_path,
    new_state,
    read_checkpoint,
    save_checkpoint,
)
from msn_edge.config import Config
from msn_edge.datasets import Clip
from msn_edge.devices import (
    DistEnv,
    amp_choice,
    ddp_args,
    dist_from_env,
    process_group_args,
    training_device,
)
from msn_edge.interrupts import signals_deferred, sigterm_as_interrupt
from msn_edge.loss import SubClusterAdaCos, loss_head
from msn_edge.model import MSN
from msn_edge.runtime.errors import DatasetError, MsnEdgeError
from msn_edge.train_data import MixupSet, load_waves, training_clips

log = logging.getLogger(__name__)

LOG_FILE = "train_log.jsonl"
MIN_BATCH = 2  # clips per step and process: BatchNorm cannot train on one
MAX_DIFF_SHOWN = 5  # config fields named in a refused resume


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path | None  # the last complete checkpoint (None if none was written)
    epoch: int  # completed epochs
    classes: list[str]
    auxiliary: dict | None
    losses: list[float] = field(default_factory=list)  # mean loss of each epoch run now
    interrupted: bool = False  # Ctrl-C / SIGTERM: stopped, the last checkpoint kept
    scoring_fitted: bool = False
    model: MSN | None = None  # the trained network, unwrapped, on the training device


class Classifier(nn.Module):
    """MSN and its loss head as one module, so that DDP synchronises both.

    With `feature_exchange` (FeatEx, Wilkinghoff 2024), the head classifies 2C classes:
    every clip's own embedding [spectrum_i ‖ spectrogram_i] is labelled with its class
    among the first C, and an exchanged one [spectrum_π(i) ‖ spectrogram_i], π a random
    permutation of the batch, with the mean of both clips' targets among the last C.
    Telling the two apart needs the branches to agree on details of the very clip, not
    only on its class: that keeps the embedding from collapsing within a class.
    """

    def __init__(self, msn: MSN, head: SubClusterAdaCos, feature_exchange: bool = False):
        super().__init__()
        self.msn = msn
        self.head = head
        self.feature_exchange = feature_exchange
        self.split = msn.cfg.spectrum_dim  # the embedding is [spectrum ‖ spectrogram]

    def forward(self, spec: torch.Tensor, spectrum: torch.Tensor, target: torch.Tensor):
        emb = self.msn(spec, spectrum)  # (B, D), under autocast when enabled
        with torch.autocast(emb.device.type, enabled=False):
            emb = emb.float()
            if self.feature_exchange:
                emb, target = exchange_features(emb, target, self.split)
            return self.head(emb, target)  # the loss in float32


def exchange_features(
    emb: torch.Tensor, target: torch.Tensor, split: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """FeatEx: (B, D), (B, C) -> (2B, D), (2B, 2C); own clips first, exchanged after."""
    perm = torch.randperm(len(emb), device=emb.device)
    mixed = torch.cat([emb[perm, :split], emb[:, split:]], dim=1)
    zeros = torch.zeros_like(target)
    own = torch.cat([target, zeros], dim=1)
    exchanged = torch.cat([zeros, 0.5 * (target + target[perm])], dim=1)
    return torch.cat([emb, mixed]), torch.cat([own, exchanged])


class Stepper:
    """One optimisation step; mixed precision on CUDA when `amp` (bf16 from compute
    capability 8.0, else fp16 with loss scaling: msn_edge.devices), float32 on the CPU."""

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, dev: torch.device, amp: bool
    ):
        self.model, self.optimizer = model, optimizer
        cc = torch.cuda.get_device_capability(dev) if dev.type == "cuda" else None
        self.amp = amp_choice(dev.type, cc, amp)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp.scaled)
        on = self.amp.enabled
        self.autocast = torch.autocast("cuda", dtype=self.amp.dtype) if on else nullcontext()

    def __call__(
        self, spec: torch.Tensor, spectrum: torch.Tensor, target: torch.Tensor
    ) -> torch.Tensor:
        """The batch's loss (detached), after the update."""
        with self.autocast:
            loss = self.model(spec, spectrum, target)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach()


_Dist = DistEnv


def _dist_from_env() -> DistEnv:
    return dist_from_env(dict(os.environ))


def resolve_device(device: str | None, local_rank: int = 0) -> torch.device:
    """cuda when present (or asked for), else cpu; under torchrun, this process's GPU."""
    cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return training_device(device, local_rank=local_rank, cuda_count=cuda_count)


@contextmanager
def _quiet_unless(main: bool) -> Iterator[None]:
    """Only rank 0 logs: the other ranks' msn_edge loggers show errors only."""
    logger = logging.getLogger("msn_edge")
    level = logger.level
    if not main:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _config_diff(a: Config, b: Config) -> list[str]:
    """Names of the fields that differ, e.g. ["train.lr"]; epochs may change on resume."""
    da, db = a.to_dict(), b.to_dict()
    diff = ["preset"] if da["preset"] != db["preset"] else []
    for section, values in da.items():
        if isinstance(values, dict):
            diff += [f"{section}.{k}" for k, v in values.items() if db[section][k] != v]
    return [d for d in diff if d != "train.epochs"]


def _check_resume(state: dict, config: Config, plan: ClassPlan, path: Path) -> None:
    """Resuming must continue the same run: the same config (epochs aside) and classes."""
    diff = _config_diff(Config.from_dict(state["config"]), config)
    if diff:
        shown = ", ".join(diff[:MAX_DIFF_SHOWN]) + (", ..." if len(diff) > MAX_DIFF_SHOWN else "")
        raise CheckpointError(f"{path}: cannot resume, the config differs ({shown})")
    if list(state["classes"]) != plan.classes:
        raise CheckpointError(
            f"{path}: cannot resume, the data has classes {plan.classes}, "
            f"the checkpoint {list(state['classes'])}"
        )


def train(
    data_roots: Sequence[Path],
    run_dir: Path,
    config: Config,
    *,
    resume: bool = False,
    device: str | None = None,
    progress: bool = True,
    aux: str = "transforms",
    fit_scoring: bool = True,
) -> TrainResult:
    """Train MSN on the normal training clips of `data_roots`, jointly, into `run_dir`.

    Writes RUN/checkpoint.pt and RUN/epochs/epoch_NNN.pt after every epoch, a line per
    epoch to RUN/train_log.jsonl and, when done, the scoring prototypes and thresholds
    (RUN/scoring.npz, RUN/scoring.json; real clips only, never auxiliary ones).
    `aux` is what may be added when there are too few classes (msn_edge.auxiliary).
    Ctrl-C or SIGTERM stops cleanly and returns with `interrupted=True`.
    """
    ddp = _dist_from_env()
    dev = resolve_device(device, ddp.local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # before anything opens a CUDA context (else on GPU 0)
    if ddp.world > 1 and not dist.is_initialized():
        dist.init_process_group(**process_group_args(dev))
    try:
        with sigterm_as_interrupt(), _quiet_unless(ddp.main):
            run = _Run(ddp, dev, Path(run_dir), config, progress and ddp.main)
            result = run.fit(data_roots, resume=resume, aux=aux, fit_scoring=fit_scoring)
        if ddp.world > 1 and not result.interrupted:
            # Leave together: rank 0 still fits the scoring when the others are done, and a
            # gloo peer torn down under a live one can abort the process at exit.
            dist.barrier()
        return result
    finally:
        if ddp.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


class _Run:
    """One training run on this process: data, model, optimizer, and the epoch loop."""

    def __init__(self, ddp: _Dist, dev: torch.device, run_dir: Path, config: Config, show: bool):
        self.ddp, self.dev, self.run_dir, self.config, self.show = ddp, dev, run_dir, config, show
        self.ckpt_path = run_dir / CHECKPOINT_FILE
        per_rank = config.train.batch_size // ddp.world
        if per_rank < MIN_BATCH:
            raise MsnEdgeError(
                f"batch size {config.train.batch_size} over {ddp.world} processes leaves "
                f"{per_rank} clips per step; BatchNorm needs at least {MIN_BATCH}"
            )

    def fit(self, data_roots: Sequence[Path], *, resume: bool, aux: str, fit_scoring: bool):
        if self.ckpt_path.exists() and not resume:
            raise CheckpointError(
                f"{self.ckpt_path} exists; pass --resume to continue that run, "
                "or choose another folder"
            )
        tc = self.config.train
        clips = training_clips(data_roots)
        waves = load_waves(clips, self.config.frontend, self.show)
        plan = build_classes(clips, waves, self.config, aux=aux)
        log.info("%d clips, %d classes: %s", len(clips), len(plan.classes), ", ".join(plan.classes))
        self._build(len(plan.classes))
        start = self._restore(plan) if resume else 0
        result = TrainResult(
            self.run_dir,
            self.ckpt_path if resume else None,
            start,
            plan.classes,
            plan.auxiliary,
            model=self.msn,
        )
        self.meta = {  # the checkpoint's provenance (checkpoint.new_state)
            "classes": plan.classes,
            "auxiliary": plan.auxiliary,
            "data": {
                "roots": [str(r) for r in data_roots],
                "n_clips": len(clips),
                "groups": sorted({c.group for c in clips}),
            },
        }
        dataset = MixupSet(
            waves + plan.extra_waves,
            plan.labels + plan.extra_labels,
            len(plan.classes),
            self.config.frontend,
            tc,
        )
        if len(dataset) < MIN_BATCH * self.ddp.world:
            raise DatasetError(f"{len(dataset)} training clips are too few to train on")
        self.epochs = self._epochs(len(dataset))
        try:
            for epoch in range(start, self.epochs):
                loss, record = self._epoch(dataset, epoch)
                with signals_deferred():  # an epoch is saved whole, or not at all
                    if self.ddp.main:
                        result.checkpoint = self._save(epoch + 1, record)
                    result.losses.append(loss)
                    result.epoch = epoch + 1
            if result.checkpoint is None and self.ddp.main:  # epochs 0: the initial weights
                result.checkpoint = self._save(start, None)
            if fit_scoring and self.ddp.main:
                _fit_scoring(self.msn, self.config, clips, self.run_dir, self.dev, self.show)
                result.scoring_fitted = True
        except KeyboardInterrupt:
            result.interrupted = True
            if self.ddp.main:
                where = (
                    f"{result.checkpoint} (epoch {result.epoch})" if result.checkpoint else "none"
                )
                log.warning("interrupted; last complete checkpoint: %s", where)
        return result

    def _epochs(self, n_items: int) -> int:
        """`epochs`, or more where the data is so small that they make fewer than
        `min_steps` optimizer steps (a batch of 64 over 55 clips is one step an epoch)."""
        tc = self.config.train
        if tc.epochs == 0:  # asked for the initial weights (an untrained reference)
            return 0
        per_epoch = max(1, -(-n_items // tc.batch_size))
        epochs = max(tc.epochs, -(-tc.min_steps // per_epoch))
        if epochs > tc.epochs:
            log.info("%d epochs of %d steps reach min_steps %d", epochs, per_epoch, tc.min_steps)
        return epochs

    def _build(self, n_classes: int) -> None:
        tc = self.config.train
        torch.manual_seed(tc.seed)  # the same initial weights on every rank
        self.msn = MSN(self.config.model)
        head_classes = 2 * n_classes if tc.feature_exchange else n_classes
        self.head = loss_head(
            tc.loss, self.config.model.embedding_dim, head_classes, tc.sub_clusters
        )
        net = Classifier(self.msn, self.head, tc.feature_exchange).to(self.dev)
        self.optimizer = torch.optim.Adam(net.parameters(), lr=tc.lr)
        self.model = (
            DistributedDataParallel(net, **ddp_args(self.dev)) if self.ddp.world > 1 else net
        )
        self.step = Stepper(self.model, self.optimizer, self.dev, tc.amp)

    def _restore(self, plan: ClassPlan) -> int:
        """Weights, optimizer and RNG of RUN/checkpoint.pt; returns its completed epochs."""
        state = read_checkpoint(self.ckpt_path)
        _check_resume(state, self.config, plan, self.ckpt_path)
        self.msn.load_state_dict(state["model"])
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        log.info("resuming %s after epoch %d", self.ckpt_path, state["epoch"])
        return int(state["epoch"])

    def _loader(self, dataset: MixupSet, epoch: int) -> DataLoader:
        tc, ddp = self.config.train, self.ddp
        dataset.set_epoch(epoch)
        # Order from (seed, epoch), also with one process, so a resumed run goes on alike.
        sampler = DistributedSampler(
            dataset, num_replicas=ddp.world, rank=ddp.rank, shuffle=True, seed=tc.seed
        )
        sampler.set_epoch(epoch)
        per_rank = tc.batch_size // ddp.world
        return DataLoader(
            dataset,
            batch_size=per_rank,
            sampler=sampler,
            num_workers=tc.num_workers,
            pin_memory=self.dev.type == "cuda",
            # BatchNorm cannot train on one clip: drop a last batch of exactly one.
            drop_last=len(sampler) % per_rank == 1,
        )

    def _epoch(self, dataset: MixupSet, epoch: int) -> tuple[float, dict]:
        """One pass over the data; the mean loss over all ranks, and the log record."""
        t0 = time.perf_counter()
        self.model.train()
        total = torch.zeros((), device=self.dev)
        count = torch.zeros((), device=self.dev)
        desc = f"epoch {epoch + 1}/{self.epochs}"
        loader = self._loader(dataset, epoch)
        bar = tqdm(loader, desc=desc, unit="batch", disable=not self.show, leave=False)
        for batch in bar:
            spec, spectrum, target = (x.to(self.dev, non_blocking=True) for x in batch)
            loss = self.step(spec, spectrum, target)
            total += loss * len(target)
            count += len(target)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if self.ddp.world > 1:
            dist.all_reduce(total)
            dist.all_reduce(count)
        mean = (total / count).item()
        if not math.isfinite(mean):  # before anything is saved: the last good epoch stays
            raise MsnEdgeError(
                f"{desc}: the loss is {mean}; stopped (check the data with "
                "`msn-edge datasets DATA --check`, or lower the learning rate)"
            )
        seconds = time.perf_counter() - t0
        record = {
            "epoch": epoch + 1,
            "loss": mean,
            "scale": self.head.scale.item(),
            "seconds": round(seconds, 3),
            "clips_per_s": round(count.item() / seconds, 2),
        }
        log.info("%s: loss %.4f, scale %.2f, %.1f s", desc, mean, record["scale"], seconds)
        return mean, record

    def _save(self, epoch: int, record: dict | None) -> Path:
        """checkpoint.pt (with optimizer and RNG), epochs/epoch_NNN.pt (weights), the log."""
        state = new_state(
            self.config, self.msn, epoch=epoch, head=self.head.state_dict(), **self.meta
        )
        full = {**state, "optimizer": self.optimizer.state_dict(), "rng": torch.get_rng_state()}
        path = save_checkpoint(self.ckpt_path, full)
        save_checkpoint(epoch_path(self.run_dir, epoch), state)
        if record is not None:
            with open(self.run_dir / LOG_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")
        return path


def _fit_scoring(
    msn: MSN, config: Config, clips: Sequence[Clip], run_dir: Path, dev: torch.device, show: bool
) -> None:
    """Prototypes and thresholds from the real clips (auxiliary ones never take part)."""
    scoring = prototypes.fit_scoring(msn, config, clips, device=str(dev), progress=show)
    prototypes.save_scoring(run_dir, scoring)
    log.info("scoring prototypes and thresholds written to %s", run_dir)
