"""Training throughput in clips/s: the numpy front-end, the optimisation step, and both.

    python benchmarks/train_throughput.py                      # tiny and dcase2020, CPU (+ CUDA)
    python benchmarks/train_throughput.py --presets tiny --steps 10

Three numbers per preset and device, on random 10 s clips held in memory (as training
holds them):
- front-end: MixupSet items per second (tiling, mixup, STFT, utterance spectrum) in
  this one process; DataLoader workers multiply it up to the number of cores;
- step: forward + Sub-cluster AdaCos + backward + Adam on ready features;
- end to end: the DataLoader (front-end, `--workers` processes) feeding the steps, as
  `msn-edge train` runs.
Each rate comes from the median call (step, item), so that other processes on a shared
CPU disturb it less. Prints a markdown table to stdout.
"""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import replace

import numpy as np
import torch
from torch.utils.data import DataLoader

from msn_edge.config import Config, preset
from msn_edge.loss import SubClusterAdaCos
from msn_edge.model import MSN
from msn_edge.train_data import MixupSet
from msn_edge.training import Classifier, Stepper

N_CLASSES = 8
N_CLIPS = 64  # distinct clips in memory; items cycle through them
CPU_BATCH = {"tiny": 16, "dcase2020": 4, "dcase2023": 2}  # one CPU step in seconds, not minutes


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _dataset(config: Config) -> MixupSet:
    rng = np.random.default_rng(0)
    n = config.frontend.window_samples
    waves = [rng.standard_normal(n).astype(np.float32) * 0.1 for _ in range(N_CLIPS)]
    labels = [i % N_CLASSES for i in range(N_CLIPS)]
    return MixupSet(waves, labels, N_CLASSES, config.frontend, config.train)


def _median_rate(per_call_s: list[float], clips_per_call: int) -> float:
    """Clips/s from the median call: robust to other processes sharing the CPU."""
    return clips_per_call / float(np.median(per_call_s))


def _timed(fn, n: int, dev: torch.device) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return times


def frontend_rate(ds: MixupSet, n_items: int) -> float:
    ds[0]  # warm-up: numpy's FFT plans
    items = iter(range(n_items))
    return _median_rate(_timed(lambda: ds[next(items) % len(ds)], n_items, torch.device("cpu")), 1)


def _stepper(config: Config, dev: torch.device) -> Stepper:
    torch.manual_seed(0)
    head = SubClusterAdaCos(config.model.embedding_dim, N_CLASSES, config.train.sub_clusters)
    net = Classifier(MSN(config.model), head).to(dev).train()
    return Stepper(
        net, torch.optim.Adam(net.parameters(), lr=config.train.lr), dev, config.train.amp
    )


def step_rate(config: Config, ds: MixupSet, dev: torch.device, batch: int, steps: int) -> float:
    step = _stepper(config, dev)
    items = [ds[i % len(ds)] for i in range(batch)]
    spec, spectrum, target = (torch.stack(x).to(dev) for x in zip(*items, strict=True))
    step(spec, spectrum, target)  # warm-up: allocation, kernel choice
    return _median_rate(_timed(lambda: step(spec, spectrum, target), steps, dev), batch)


def end_to_end_rate(
    config: Config, ds: MixupSet, dev: torch.device, batch: int, steps: int, workers: int
) -> float:
    step = _stepper(config, dev)
    loader = DataLoader(
        ds, batch_size=batch, shuffle=True, num_workers=workers, pin_memory=dev.type == "cuda"
    )

    def batches():
        while True:
            yield from loader

    it = batches()
    step(*(x.to(dev) for x in next(it)))  # warm-up, and the workers' start
    return _median_rate(
        _timed(lambda: step(*(x.to(dev, non_blocking=True) for x in next(it))), steps, dev), batch
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["tiny", "dcase2020"])
    p.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    p.add_argument(
        "--workers", type=int, default=None, help="DataLoader workers  [default: the preset's]"
    )
    p.add_argument("--cuda-batch", type=int, default=64, help="batch on CUDA (paper: 64)")
    args = p.parse_args()

    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
        f"{platform.processor() or platform.machine()}"
        + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")
    )
    print()
    print(
        "| preset | device | batch | workers "
        "| front-end clips/s | step clips/s | end to end clips/s |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for name in args.presets:
        config = preset(name)
        ds = _dataset(config)
        fe = frontend_rate(ds, 2 * CPU_BATCH.get(name, 4))
        for dev in devices:
            batch = CPU_BATCH.get(name, 4) if dev.type == "cpu" else args.cuda_batch
            cfg = replace(config, train=replace(config.train, batch_size=batch))
            steps = step_rate(cfg, ds, dev, batch, args.steps)
            workers = cfg.train.num_workers if args.workers is None else args.workers
            e2e = end_to_end_rate(cfg, ds, dev, batch, args.steps, workers)
            label = "cuda (amp)" if dev.type == "cuda" and cfg.train.amp else dev.type
            print(
                f"| {name} | {label} | {batch} | {workers} | {fe:.1f} | {steps:.1f} | {e2e:.1f} |"
            )


if __name__ == "__main__":
    main()
