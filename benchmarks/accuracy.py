"""Detection accuracy: MSN against the DCASE 2020 autoencoder baseline, in one run.

    python benchmarks/accuracy.py                      # regenerates results-accuracy.md
    python benchmarks/accuracy.py --data DATA          # the same comparison on your data
    python benchmarks/accuracy.py --sets synth --seeds 0 --no-int8    # a quick look

"Does this beat a simple baseline on my machine?" is a user's first question, so every
system sees the same clips: the normal training clips of a data set (DCASE 2020 / 2023
layout or a plain folder, see `msn-edge datasets`) train it, its test clips score it.
Per data set and seed:
- `msn`: msn-edge's MSN, trained with the preset's recipe (`msn-edge train`), scored
  with its own prototypes (`msn-edge evaluate`); with int8, the exported bundle's fp32,
  int8-cpu and int8 (TensorRT form) models scored on the same test clips;
- `untrained`: the same network at its seeded initial weights, same prototypes rule:
  what the training adds;
- `autoencoder`: the DCASE 2020 Task 2 baseline (benchmarks/autoencoder.py).
The seed is the training seed of every system and, for the synthetic sets, the data
set's seed too, so the spread covers both. Built-in sets: `synth` (the demo's data set
at seed 0; other seeds are other machines), `synth-shift` (test clips at another
running speed: normal operating points never heard in training) and `mimii_fan`
(real fan, ../shared/data). The shared DCASE samples have one or two test clips per
machine, too few for an AUC, and are listed as skipped.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from msn_edge.benchmarks.autoencoder import AEConfig, AutoencoderBaseline
from msn_edge.checkpoint import load_checkpoint
from msn_edge.config import RECIPES, Config, preset, with_recipe
from msn_edge.datasets import scan
from msn_edge.evaluate import evaluate
from msn_edge.inference import embed_clips
from msn_edge.metrics import group_metrics, summarize
from msn_edge.synth import synthesize
from msn_edge.training import train

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"
RESULTS = HERE / "results-accuracy.md"
SYNTH_TEST_CLIPS = 25  # normal and anomalous test clips per machine ID: SE of an AUC ~0.04
SHIFT_SPEED = 1.05  # synth-shift: test machines run 5 % faster than in training
MIN_TEST_CLIPS = 5  # of each label per data set, or the set is skipped
SYSTEMS = ("msn", "untrained", "autoencoder")
VARIANTS = ("fp32", "int8-cpu", "int8")  # exported models scored with --int8

log = logging.getLogger("accuracy")


@dataclass
class Outcome:
    """One system on one data set with one seed."""

    system: str
    seed: int
    official: float
    per_type: dict[str, dict[str, float]]  # machine type -> auc / pauc (or dcase2023 keys)
    train_s: float
    variants: dict[str, float] = field(default_factory=dict)  # int8: variant -> official
    within_cosine: float = math.nan  # MSN: mean cosine of a group's training embeddings


def _data_sets(names: list[str], work: Path) -> dict[str, Callable[[int], Path]]:
    """Name -> f(seed) giving the data folder; synthetic sets are written on first use."""

    def synthetic(name: str, **kw) -> Callable[[int], Path]:
        def make(seed: int) -> Path:
            out = work / f"{name}-seed{seed}"
            if not out.exists():
                synthesize(
                    out,
                    seed=seed,
                    n_test_normal=SYNTH_TEST_CLIPS,
                    n_test_anomaly=SYNTH_TEST_CLIPS,
                    **kw,
                )
            return out

        return make

    known = {
        "synth": synthetic("synth"),
        "synth-shift": synthetic("synth-shift", test_speed=SHIFT_SPEED),
        "mimii_fan": lambda seed: SHARED / "mimii_fan",
    }
    unknown = set(names) - set(known)
    if unknown:
        raise SystemExit(f"unknown data set(s) {sorted(unknown)}; choose from {sorted(known)}")
    return {n: known[n] for n in names}


def test_clip_counts(data: Path) -> tuple[int, int]:
    """(normal, anomalous) test clips of a data folder."""
    test = scan(data, split="test")
    n_anomaly = sum(c.label == "anomaly" for c in test)
    return len(test) - n_anomaly, n_anomaly


def _config(
    name: str, seed: int, epochs: int | None, recipe: str | None, overrides: list[str]
) -> Config:
    """The preset, its recipe or another, then `section.field=value` overrides (the
    ablation's knobs, e.g. `train.mixup_prob=0.5`, `model.input_scale=linear`)."""
    cfg = preset(name)
    if recipe:
        cfg = with_recipe(cfg, recipe)
    changes: dict[str, dict] = {"model": {}, "train": {}}
    for item in overrides:
        key, _, text = item.partition("=")
        section, _, fld = key.partition(".")
        if section not in changes or not hasattr(getattr(cfg, section), fld):
            raise SystemExit(f"--override {item}: expected model.FIELD=V or train.FIELD=V")
        current = getattr(getattr(cfg, section), fld)
        if isinstance(current, bool):
            value = text.lower() in ("1", "true", "yes")
        elif isinstance(current, tuple):
            value = tuple(float(x) for x in text.split(",") if x)
        else:
            value = type(current)(text)
        changes[section][fld] = value
    train_cfg = replace(cfg.train, seed=seed, **({"epochs": epochs} if epochs else {}))
    return replace(
        cfg,
        model=replace(cfg.model, **changes["model"]),
        train=replace(train_cfg, **changes["train"]),
    )


def within_class_cosine(run: Path, data: Path) -> float:
    """Mean cosine between the training embeddings of one group, averaged over groups:
    near 1 means the embedding has collapsed within a class (all normal clips alike)."""
    loaded = load_checkpoint(run)
    clips = [c for c in scan(data, split="train") if c.label == "normal"]
    emb = embed_clips(loaded.model, clips, loaded.config.frontend)
    values = []
    for group in sorted({c.group for c in clips}):
        e = emb[[c.group == group for c in clips]]
        if len(e) > 1:
            values.append(float((np.sum(e @ e.T) - len(e)) / (len(e) * (len(e) - 1))))
    return float(np.mean(values))


def run_msn(
    data: Path, cfg: Config, run: Path, *, trained: bool, int8: bool, threads: int | None
) -> Outcome:
    """Train (or only initialise) MSN into `run` unless it holds a checkpoint already,
    evaluate it; with int8, score the exported bundle's models."""
    if not trained:
        cfg = replace(cfg, train=replace(cfg.train, epochs=0, min_steps=0))
    seconds = math.nan
    if not (run / "checkpoint.pt").exists():  # else: a run trained before (--msn-run)
        t0 = time.perf_counter()
        train([data], run, cfg, progress=False)
        seconds = time.perf_counter() - t0
    results = evaluate(run, data, progress=False)
    s = results.summary
    outcome = Outcome(
        "msn" if trained else "untrained", cfg.train.seed, s.official, s.per_type, seconds
    )
    outcome.within_cosine = within_class_cosine(run, data)
    if int8 and trained:
        from msn_edge.export.pack import ExportOptions, export_bundle

        report = export_bundle(
            run, run / "model.msn", ExportOptions(int8=True, eval_data=data, threads=threads)
        )
        name = s.official_name
        outcome.variants = {v: m[name] for v, m in report.metrics.items()}
    return outcome


def run_autoencoder(data: Path, seed: int) -> Outcome:
    train_clips = [c for c in scan(data, split="train") if c.label == "normal"]
    test = scan(data, split="test")
    ae = AutoencoderBaseline(AEConfig(seed=seed)).fit(train_clips)
    scores = ae.score(test)
    rule = "dcase2023" if test[0].layout == "dcase2023" else "dcase2020"
    rows = []
    for group in sorted({c.group for c in test}):
        sel = np.array([c.group == group for c in test])
        mine = [c for c, keep in zip(test, sel, strict=True) if keep]
        labels = np.array([c.label == "anomaly" for c in mine], dtype=int)
        domains = [c.domain for c in mine]
        rows.append(group_metrics(rule, group, mine[0].machine_type, labels, scores[sel], domains))
    s = summarize(rule, rows)
    return Outcome("autoencoder", seed, s.official, s.per_type, ae.train_seconds)


def _mean_std(values: list[float]) -> str:
    values = [100 * v for v in values if not math.isnan(v)]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.fmean(values):.1f} ± {statistics.stdev(values):.1f}"


def report(results: dict[str, list[Outcome]], meta: dict) -> str:
    """The markdown page: per data set, per system, per machine type, over seeds."""
    lines = [
        "# Detection accuracy: MSN vs the DCASE 2020 autoencoder baseline",
        "",
        "Regenerate with `python benchmarks/accuracy.py` (see its docstring). Figures are "
        "mean ± standard deviation over seeds, in percent; `official` is the DCASE 2020 "
        "score (mean of AUC and pAUC, averaged per machine type). Training times were "
        "measured on the machine below.",
        "",
        "```",
        json.dumps(meta, indent=1),
        "```",
    ]
    for name, outcomes in results.items():
        if not outcomes:
            continue
        types = sorted({t for o in outcomes for t in o.per_type})
        metrics = sorted({m for o in outcomes for v in o.per_type.values() for m in v})
        seeds = sorted({o.seed for o in outcomes})
        lines += ["", f"## {name}", "", f"Seeds: {', '.join(map(str, seeds))}.", ""]
        head = ["system", "official"]
        head += [f"{t} {m}" for t in types for m in metrics] + ["training s", "within cos"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        systems = sorted(
            {o.system for o in outcomes}, key=lambda n: (SYSTEMS.index(n.split()[0]), n)
        )
        for system in systems:
            mine = [o for o in outcomes if o.system == system]
            if not mine:
                continue
            cells = [system, _mean_std([o.official for o in mine])]
            for t in types:
                for m in metrics:
                    cells.append(_mean_std([o.per_type.get(t, {}).get(m, math.nan) for o in mine]))
            train_s = [o.train_s for o in mine if not math.isnan(o.train_s)]
            cells.append(f"{statistics.fmean(train_s):.0f}" if train_s else "–")
            cos = [o.within_cosine for o in mine if not math.isnan(o.within_cosine)]
            cells.append(f"{statistics.fmean(cos):.3f}" if cos else "–")
            lines.append("| " + " | ".join(cells) + " |")
        with_int8 = [o for o in outcomes if o.variants]
        if with_int8:
            lines += ["", "Exported MSN models on the same test clips (official score):", ""]
            lines += ["| system | model | official | vs fp32 |", "|---|---|---|---|"]
            for system in sorted({o.system for o in with_int8}):
                mine = [o for o in with_int8 if o.system == system]
                for v in VARIANTS:
                    drops = [o.variants[v] - o.variants["fp32"] for o in mine]
                    cells = [system, v, _mean_std([o.variants[v] for o in mine]), _mean_std(drops)]
                    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", type=Path, help="your data folder instead of the built-in sets")
    ap.add_argument("--sets", nargs="+", default=["synth", "synth-shift", "mimii_fan"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument(
        "--msn-run",
        type=Path,
        help="with --data and one seed: score this "
        "trained run (msn-edge train -o RUN) instead of training MSN",
    )
    ap.add_argument("--preset", default="tiny", help="MSN preset (tiny on a CPU)")
    ap.add_argument("--epochs", type=int, default=None, help="[default: the preset's]")
    ap.add_argument(
        "--recipes",
        nargs="+",
        choices=sorted(RECIPES),
        default=list(RECIPES),
        help="train MSN with each of these recipes (msn-edge train --recipe) [default: all]",
    )
    ap.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="SECTION.FIELD=V",
        help="change one config field, e.g. train.mixup_prob=0.5 (repeatable)",
    )
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    ap.add_argument("--no-int8", action="store_true", help="skip exporting and scoring int8")
    ap.add_argument("--threads", type=int, default=None, help="torch / ONNX Runtime threads")
    ap.add_argument("--work", type=Path, help="keep runs and data here [default: a temp dir]")
    ap.add_argument(
        "--out", type=Path, help=f"markdown report [default: {RESULTS.name}, or stdout with --data]"
    )
    ap.add_argument("--json", type=Path, help="also write every outcome as JSON")
    ap.add_argument(
        "--report-from",
        nargs="+",
        metavar="JSON[:RECIPE]",
        help="only write the report from --json files of earlier runs "
        "(e.g. data sets run in parallel)",
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.msn_run and (not args.data or len(args.seeds) != 1 or len(args.recipes) != 1):
        ap.error("--msn-run goes with --data, one --seeds value and the run's one --recipes")
    if args.report_from:
        merged: dict[str, list[Outcome]] = {}
        meta: dict = {}
        for item in args.report_from:
            path, _, label = str(item).partition(":")
            saved = json.loads(Path(path).read_text())
            recipes = [label] if label else saved["meta"].get("recipes", [])
            meta = {
                **saved["meta"],
                "recipes": list(dict.fromkeys([*meta.get("recipes", []), *recipes])),
                "skipped": {**meta.get("skipped", {}), **saved["meta"]["skipped"]},
            }
            for name, outcomes in saved["results"].items():
                for o in outcomes:
                    if label and o["system"] == "msn":  # runs made before recipes were named
                        o = {**o, "system": f"msn ({label})"}
                    merged.setdefault(name, []).append(Outcome(**o))
        (args.out or RESULTS).write_text(report(merged, meta))
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.data:
            sets = {args.data.name: lambda seed: args.data}
        else:
            sets = _data_sets(args.sets, work / "data")
        results: dict[str, list[Outcome]] = {}
        skipped: dict[str, str] = {}
        for name, make in sets.items():
            results[name] = []
            for seed in args.seeds:
                data = make(seed)
                if not data.exists():
                    skipped[name] = f"{data} is not there"
                    break
                n_normal, n_anomaly = test_clip_counts(data)
                if min(n_normal, n_anomaly) < MIN_TEST_CLIPS:
                    skipped[name] = f"{n_normal} normal / {n_anomaly} anomalous test clips"
                    break
                run_root = work / "runs" / name / f"seed{seed}"
                # MSN once per recipe; the untrained reference with the first recipe.
                jobs = [
                    (system, recipe)
                    for system in args.systems
                    for recipe in (args.recipes if system == "msn" else args.recipes[:1])
                ]
                for system, recipe in jobs:
                    what = system if system == "autoencoder" else f"{system} ({recipe})"
                    log.info("%s, seed %d: %s", name, seed, what)
                    if system == "autoencoder":
                        outcome = run_autoencoder(data, seed)
                    else:
                        cfg = _config(args.preset, seed, args.epochs, recipe, args.override)
                        trained = system == "msn"
                        run = run_root / f"{system}-{recipe}"
                        if trained and args.msn_run:
                            run = args.msn_run
                        outcome = run_msn(
                            data,
                            cfg,
                            run,
                            trained=trained,
                            int8=not args.no_int8,
                            threads=args.threads,
                        )
                        if trained:
                            outcome.system = f"msn ({recipe})"
                    log.info("  official %.1f %%", 100 * outcome.official)
                    results[name].append(outcome)
        if not args.data:
            for shared in ("dcase2020_id00", "dcase2023_dev"):
                if (SHARED / shared).exists():
                    n_normal, n_anomaly = test_clip_counts(SHARED / shared)
                    skipped[shared] = f"{n_normal} normal / {n_anomaly} anomalous test clips"
        meta = {
            "preset": args.preset,
            "epochs": args.epochs or "preset",
            "recipes": args.recipes,
            "overrides": args.override,
            "seeds": args.seeds,
            "synthetic test clips per ID": f"{SYNTH_TEST_CLIPS} normal + {SYNTH_TEST_CLIPS} "
            "anomalous",
            "synth-shift test speed": SHIFT_SPEED,
            "skipped": skipped,
            "cpu": platform.processor() or platform.machine(),
            "torch threads": torch.get_num_threads(),
        }
        text = report(results, meta)
        if args.json:
            outcomes = {k: [vars(o) for o in v] for k, v in results.items()}
            args.json.write_text(json.dumps({"meta": meta, "results": outcomes}, indent=1))
        out = args.out or (None if args.data else RESULTS)
        if out:
            out.write_text(text)
            log.info("wrote %s", out)
        else:
            sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
