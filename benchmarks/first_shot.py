"""First-shot quality: machines a model never trained on, enrolled on the edge, against
the same model trained with them.

    python benchmarks/first_shot.py            # rewrites benchmarks/results-first-shot.md
    python benchmarks/first_shot.py --epochs 20 --work /tmp/first-shot --keep
    python benchmarks/first_shot.py --work /tmp/first-shot --reuse   # enrollment part only

Two `tiny` models are trained on the CPU (the `msn-edge train` command, whatever its
recipe is today) and exported to bundles (`msn-edge export`):
- "with": every machine of a synthetic set (3 kinds x 3 machines) and the real MIMII fan
  id_00 (../shared/data/mimii_fan);
- "without": the same minus the held-out machines: the third machine (id_02) of each
  synthetic kind and the MIMII fan.
For each held-out machine X, the runtime (torch-free, as on the edge box) enrolls X's
normal training clips into the "without" bundle and scores X's test clips: the first-shot
AUC. X's own group of the "with" bundle scores the same clips: the trained-with-X AUC.
Enrolling on the first minute, the first two, and all of X's training clips shows how much
listening is enough; the time enrollment takes per minute of audio is measured on this
machine (its load average is recorded: a shared machine is slower).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from msn_edge.metrics import auc
from msn_edge.runtime.bundle import read_bundle
from msn_edge.runtime.detector import Detector
from msn_edge.runtime.engines import make_engine
from msn_edge.runtime.enroll import OFF_DISTRIBUTION_RATIO, enroll
from msn_edge.runtime.enroll_feed import file_feed
from msn_edge.runtime.enroll_fit import EnrollOptions
from msn_edge.synth import KINDS, synthesize

ROOT = Path(__file__).resolve().parents[1]
MIMII = ROOT.parent / "shared" / "data" / "mimii_fan" / "fan"
RESULTS = ROOT / "benchmarks" / "results-first-shot.md"
CLI = [sys.executable, "-c", "from msn_edge.cli import main; main()"]
IDS = 3  # synthetic machines per kind; the last one (id_02) is held out
N_TRAIN, N_TEST = 20, 10  # per synthetic machine: normal training clips; test normal = anomalous
ENROLL_MINUTES = (1.0, 2.0, None)  # None: all of X's training clips


@dataclass
class Row:
    machine: str
    train_clips: int
    test_normal: int
    test_anomaly: int
    auc_with: float  # the model trained with X, X's trained prototypes
    auc_first_shot: dict[str, float]  # enrolled minutes ("all") -> AUC, model trained without X
    enroll_s: float  # wall time of enrolling all of X's clips
    enroll_audio_s: float
    score_ratio: float  # median normal score / the model's median threshold (the warning's)
    warnings: list[str]


def _link(files: list[Path], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        (folder / f.name).symlink_to(f.resolve())


def build_data(work: Path, reuse: bool) -> dict[str, tuple[list[Path], list[Path]]]:
    """Synthesize, then the two training sets as folders of links; held-out machines'
    (train clips, test clips). `reuse`: the data of an earlier run is there."""
    src = work / "synth"
    if not reuse:
        synthesize(src, seed=0, kinds=KINDS, ids_per_kind=IDS, n_train=N_TRAIN,
                   n_test_normal=N_TEST, n_test_anomaly=N_TEST)  # fmt: skip
    held: dict[str, tuple[list[Path], list[Path]]] = {}
    held_id = f"id_{IDS - 1:02d}"
    for kind in KINDS:
        train = sorted((src / kind / "train").glob("*.wav"))
        if not reuse:
            _link(train, work / "with" / kind / "train")
            _link([p for p in train if held_id not in p.name], work / "without" / kind / "train")
        test = sorted((src / kind / "test").glob(f"*_{held_id}_*.wav"))
        held[f"{kind}/{held_id}"] = ([p for p in train if held_id in p.name], test)
    if MIMII.is_dir():
        train = sorted((MIMII / "train").glob("*.wav"))
        if not reuse:  # its own type folder: no clash with the synthetic fan/id_00
            _link(train, work / "with" / "mimii_fan" / "train")
        held["mimii_fan/id_00"] = (train, sorted((MIMII / "test").glob("*.wav")))
    else:
        print(f"note: {MIMII} not found; the MIMII fan row is left out", file=sys.stderr)
    return held


def cli(*args: str) -> None:
    t = time.perf_counter()
    subprocess.run([*CLI, *args], check=True)
    print(f"[{time.perf_counter() - t:.0f} s] msn-edge {' '.join(args)}", file=sys.stderr)


def train_and_export(work: Path, name: str, epochs: int, seed: int) -> Path:
    run = work / f"run-{name}"
    cli("train", str(work / name), "-o", str(run), "--preset", "tiny", "--epochs", str(epochs),
        "--seed", str(seed), "--device", "cpu", "--no-progress")  # fmt: skip
    bundle = work / f"{name}.msn"
    cli("export", str(run), "-o", str(bundle))
    return bundle


def score_auc(bundle: Path, group: str, test: list[Path]) -> float:
    det = Detector.open(bundle, backend="cpu", group=group)
    scores = np.array([det.score_file(p).score for p in test])
    labels = np.array([p.name.startswith("anomaly") for p in test], dtype=int)
    return auc(labels, scores)


def first_shot(without: Path, group: str, train: list[Path], test: list[Path], work: Path):
    """AUC after enrolling the first minutes of `train` (None: all); the last enrollment."""
    parent = read_bundle(without)
    engine = make_engine(parent, "cpu")
    aucs, result, seconds = {}, None, 0.0
    for minutes in ENROLL_MINUTES:
        options = EnrollOptions(group=group, max_seconds=None if minutes is None else 60 * minutes)
        out = work / f"enrolled-{group.replace('/', '-')}-{minutes or 'all'}.msn"
        feed = file_feed(train, parent.frontend, parent.frontend.window_samples,
                         max_seconds=options.max_seconds)  # fmt: skip
        t = time.perf_counter()
        result = enroll(parent, engine, feed, out, options, force=True)
        seconds = time.perf_counter() - t
        aucs["all" if minutes is None else f"{minutes:g} min"] = score_auc(out, group, test)
    return aucs, result, seconds


def load() -> float:
    return os.getloadavg()[0]


def to_markdown(rows: list[Row], meta: dict) -> str:
    cols = [k for k in rows[0].auc_first_shot] if rows else []
    lines = [
        "# First-shot quality (generated by benchmarks/first_shot.py; do not edit)",
        "",
        f"Models: `tiny` preset, {meta['epochs']} epochs, seed {meta['seed']}, trained on the "
        f"CPU by `msn-edge train` ({meta['train_s']['with']:.0f} s and "
        f"{meta['train_s']['without']:.0f} s with export); msn-edge {meta['version']}. "
        f"Machine: {meta['cpus']} CPUs, 1-min load average {meta['load_before']:.1f} before, "
        f"{meta['load_after']:.1f} after (shared machine: times are upper bounds).",
        "",
        "AUC on each held-out machine's test clips (score = min cosine distance to the "
        "group's prototypes, one 10 s window per clip from its start). *with X*: the model "
        "trained with X, X's trained prototypes. *first shot*: the model trained without X, "
        "X enrolled by `msn-edge enroll` on the first minutes of X's normal training clips.",
        "",
        "| machine X | train clips | test normal + anomaly | AUC with X | "
        + " | ".join(f"first shot, {c}" for c in cols)
        + " | normal score ratio | enroll time per min of audio |",
        "|---|---|---|---|" + "---|" * len(cols) + "---|---|",
    ]
    for r in rows:
        per_min = r.enroll_s / (r.enroll_audio_s / 60)
        lines.append(
            f"| {r.machine} | {r.train_clips} | {r.test_normal} + {r.test_anomaly} | "
            f"{100 * r.auc_with:.1f} | "
            + " | ".join(f"{100 * r.auc_first_shot[c]:.1f}" for c in cols)
            + f" | {r.score_ratio:.2f} | {per_min:.2f} s |"
        )
    if rows:
        mean_with = np.mean([r.auc_with for r in rows])
        means = [np.mean([r.auc_first_shot[c] for r in rows]) for c in cols]
        lines.append(
            f"| **mean** | | | **{100 * mean_with:.1f}** | "
            + " | ".join(f"**{100 * m:.1f}**" for m in means)
            + " | | |"
        )
    lines += ["", "Enrollment warnings (first shot, all clips):", ""]
    lines += [f"- {r.machine}: {'; '.join(r.warnings) or 'none'}" for r in rows]
    lines += [
        "",
        "*normal score ratio*: the median held-out score of X's normal clips over the median "
        "threshold of the bundle's trained groups; `enroll` warns above "
        f"{OFF_DISTRIBUTION_RATIO:g} that the model may not suit the machine. "
        "*enroll time*: wall time of `enroll` (reading the clips, front-end, model, "
        "k-means, calibration, writing and verifying the bundle) per minute of audio, "
        "ONNX Runtime on the CPU.",
        "",
        "With 10 normal + 10 anomalous test clips, one standard error of an AUC near 0.8 is "
        "about 0.07; differences below that are noise.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, help="working folder [default: a temporary one]")
    parser.add_argument("--keep", action="store_true", help="keep the working folder")
    parser.add_argument(
        "--reuse", action="store_true", help="reuse --work's data and bundles (a --keep run)"
    )
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    work = args.work or Path(tempfile.mkdtemp(prefix="first-shot-"))
    if args.reuse:
        if not (work / "with.msn").is_file() or not (work / "without.msn").is_file():
            sys.exit(f"{work}: no bundles of an earlier run to --reuse")
        previous = json.loads(args.results.with_suffix(".json").read_text())["meta"]
        args.epochs, args.seed = previous["epochs"], previous["seed"]
    elif work.exists() and any(work.iterdir()):
        sys.exit(f"{work}: not empty; give a new --work folder")
    work.mkdir(parents=True, exist_ok=True)
    load_before = load()
    try:
        held = build_data(work, args.reuse)
        train_s = previous["train_s"] if args.reuse else {}
        bundles = {name: work / f"{name}.msn" for name in ("with", "without")}
        for name in () if args.reuse else bundles:
            t = time.perf_counter()
            train_and_export(work, name, args.epochs, args.seed)
            train_s[name] = time.perf_counter() - t
        rows = []
        for machine, (train, test) in held.items():
            aucs, result, seconds = first_shot(bundles["without"], machine, train, test, work)
            rows.append(
                Row(
                    machine=machine,
                    train_clips=len(train),
                    test_normal=sum(p.name.startswith("normal") for p in test),
                    test_anomaly=sum(p.name.startswith("anomaly") for p in test),
                    auc_with=score_auc(bundles["with"], machine, test),
                    auc_first_shot=aucs,
                    enroll_s=seconds,
                    enroll_audio_s=result.record["seconds"],
                    score_ratio=result.record["checks"]["ratio"],
                    warnings=result.warnings,
                )
            )
            print(json.dumps(asdict(rows[-1])), file=sys.stderr)
        from msn_edge.runtime.version import __version__

        meta = {
            "epochs": args.epochs,
            "seed": args.seed,
            "train_s": train_s,
            "version": __version__,
            "cpus": os.cpu_count(),
            "load_before": load_before,
            "load_after": load(),
        }
        text = to_markdown(rows, meta)
        args.results.write_text(text)
        args.results.with_suffix(".json").write_text(
            json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2) + "\n"
        )
        print(text)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
