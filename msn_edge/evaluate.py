"""Evaluating a run on a data set's test split, and scoring single files with a run.

`evaluate` scores every test clip against its group's prototypes, computes the DCASE
metrics (msn_edge.metrics) and writes what the DCASE tasks and a reader expect: the
per-group `anomaly_score_*.csv` / `decision_result_*.csv`, a results table (markdown and
JSON) and the ROC curves (PNG).
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_curve

from msn_edge.checkpoint import LoadedRun, load_checkpoint
from msn_edge.datasets import Clip, scan
from msn_edge.inference import embed_clips
from msn_edge.metrics import MAX_FPR, METRICS, GroupMetrics, Summary, group_metrics, summarize
from msn_edge.prototypes import (
    GROUPS_FILE,
    PROTOTYPES_FILE,
    Scoring,
    fit_scoring,
    load_scoring,
    score_clips,
)
from msn_edge.runtime.bundle import ScoringGroup
from msn_edge.runtime.errors import DatasetError
from msn_edge.runtime.filescore import FileResult, score_file
from msn_edge.runtime.scorer import anomaly_scores

log = logging.getLogger(__name__)

EVAL_DIR = "eval"  # default output folder inside the run
METRIC_TITLES = {
    "auc": "AUC",
    "pauc": "pAUC",
    "auc_source": "AUC source",
    "auc_target": "AUC target",
}
OFFICIAL_TITLES = {
    "mean": "mean of AUC and pAUC (DCASE 2020)",
    "hmean": "harmonic mean of all AUC source, AUC target and pAUC values (DCASE 2023)",
}


@dataclass
class ClipResult:
    path: Path
    group: str
    domain: str | None
    anomaly: bool  # ground truth
    score: float
    decision: bool  # score > the group's threshold


@dataclass
class Results:
    """Everything one evaluation produced; writers turn it into files."""

    rule: str  # "dcase2020" or "dcase2023"
    rows: list[GroupMetrics]
    summary: Summary
    clips: list[ClipResult]
    thresholds: dict[str, float]
    scoring_from: str  # "run" (the run's prototypes) or "data" (fit on DATA's train split)

    def to_dict(self) -> dict:
        """JSON-ready: fractions in [0, 1], null where a value is undefined (see notes)."""
        s = self.summary
        return {
            "rule": self.rule,
            "official": {"name": s.official_name, "value": _json_float(s.official)},
            "overall": {k: _json_float(v) for k, v in s.overall.items()},
            "per_type": {
                t: {k: _json_float(v) for k, v in vals.items()} for t, vals in s.per_type.items()
            },
            "groups": [
                {
                    "group": r.group,
                    "machine_type": r.machine_type,
                    "n_normal": r.n_normal,
                    "n_anomaly": r.n_anomaly,
                    "threshold": self.thresholds[r.group],
                    **{k: _json_float(v) for k, v in r.values.items()},
                    "notes": r.notes,
                }
                for r in self.rows
            ],
            "notes": s.notes,
            "scoring_from": self.scoring_from,
        }

    def to_markdown(self) -> str:
        """The results table in percent, per group, per machine type, overall."""
        names = METRICS[self.rule]
        unit = "section" if self.rule == "dcase2023" else "ID"
        avg = self.summary.official_name if self.rule == "dcase2023" else "average"
        head = ["machine type", unit, *(f"{METRIC_TITLES[m]} (%)" for m in names)]
        head += ["normal", "anomaly", "notes"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

        def line(cells: list[str]) -> None:
            lines.append("| " + " | ".join(cells) + " |")

        for t, vals in self.summary.per_type.items():
            for r in (r for r in self.rows if r.machine_type == t):
                values = [pct(r.values[m]) for m in names]
                line(
                    [
                        t,
                        r.unit or "-",
                        *values,
                        str(r.n_normal),
                        str(r.n_anomaly),
                        "; ".join(r.notes),
                    ]
                )
            line([f"**{t}**", f"**{avg}**", *(pct(vals[m]) for m in names), "", "", ""])
        line(["**all**", f"**{avg}**", *(pct(self.summary.overall[m]) for m in names), "", "", ""])
        s = self.summary
        text = "\n".join(lines)
        text += f"\n\n**Official score: {pct(s.official)} %** ({OFFICIAL_TITLES[s.official_name]})"
        for note in s.notes:
            text += f"\n\nNote: {note}"
        return text + "\n"


def _json_float(v: float) -> float | None:
    return None if math.isnan(v) else float(v)


def pct(v: float) -> str:
    """A fraction in percent with two decimals; n/a where undefined."""
    return "n/a" if math.isnan(v) else f"{100 * v:.2f}"


def run_dir_of(run_or_path: str | Path) -> Path:
    """The run folder of a run folder or of a checkpoint file inside it."""
    p = Path(run_or_path)
    return p if p.is_dir() else p.parent


def rule_of(clips: Sequence[Clip]) -> str:
    """DCASE 2023 rules for DCASE 2023 data (scan gives one layout per data set), else 2020."""
    return "dcase2023" if clips[0].layout == "dcase2023" else "dcase2020"


def metric_rows(rule: str, clips: Sequence[Clip], scores: np.ndarray) -> list[GroupMetrics]:
    """The metrics of each scoring group (sorted by name) from its test clips' scores."""
    rows = []
    for name in sorted({c.group for c in clips}):
        sel = [i for i, c in enumerate(clips) if c.group == name]
        mine = [clips[i] for i in sel]
        rows.append(
            group_metrics(
                rule,
                name,
                mine[0].machine_type,
                np.array([c.label == "anomaly" for c in mine], dtype=int),
                np.asarray(scores, dtype=float)[sel],
                [c.domain for c in mine],
            )
        )
    return rows


def summary_of(clips: Sequence[Clip], scores: np.ndarray) -> Summary:
    """The DCASE summary (rule of the data) of test clips scored `scores`."""
    rule = rule_of(clips)
    return summarize(rule, metric_rows(rule, clips, scores))


def _scoring_for(
    run: LoadedRun,
    run_dir: Path,
    data_root: Path,
    groups: set[str],
    *,
    refit: bool,
    device: str,
    progress: bool,
) -> tuple[Scoring, str]:
    """The run's own prototypes when they cover every test group, else fit on DATA/train."""
    have = (run_dir / PROTOTYPES_FILE).is_file() and (run_dir / GROUPS_FILE).is_file()
    if have and not refit:
        scoring = load_scoring(run_dir, run.config.model.embedding_dim)
        missing = groups - {g.name for g in scoring.groups}
        if not missing:
            return scoring, "run"
        log.info("the run has no prototypes for %s; fitting them on %s", sorted(missing), data_root)
    elif not refit:
        log.info("the run has no %s; fitting prototypes on %s", PROTOTYPES_FILE, data_root)
    train = [c for c in scan(data_root, split="train") if c.label == "normal"]
    return fit_scoring(run.model, run.config, train, device=device, progress=progress), "data"


def evaluate(
    run_dir: str | Path,
    data_root: str | Path,
    *,
    out_dir: str | Path | None = None,
    device: str = "cpu",
    progress: bool = True,
    refit_scoring: bool = False,
) -> Results:
    """Score DATA's test split with the run, compute the metrics and write the reports.

    Prototypes come from the run (RUN/scoring.npz) unless `refit_scoring` is set or they
    lack a group of DATA; then they are fit on DATA's normal train clips. Reports go to
    `out_dir`, by default RUN/eval.
    """
    data_root = Path(data_root)
    run = load_checkpoint(run_dir)
    run_dir = run_dir_of(run_dir)
    test = scan(data_root, split="test")
    rule = rule_of(test)
    scoring, source = _scoring_for(
        run,
        run_dir,
        data_root,
        {c.group for c in test},
        refit=refit_scoring,
        device=device,
        progress=progress,
    )
    scores = score_clips(run.model, run.config, scoring, test, device=device, progress=progress)
    thresholds = {g.name: g.threshold for g in scoring.groups}
    clips = [
        ClipResult(
            path=c.path,
            group=c.group,
            domain=c.domain,
            anomaly=c.label == "anomaly",
            score=float(s),
            decision=bool(s > thresholds[c.group]),
        )
        for c, s in zip(test, scores, strict=True)
    ]
    rows = metric_rows(rule, test, scores)
    results = Results(rule, rows, summarize(rule, rows), clips, thresholds, source)
    write_results(results, Path(out_dir) if out_dir else run_dir / EVAL_DIR)
    return results


def write_results(results: Results, out_dir: Path) -> list[Path]:
    """All report files into `out_dir` (created); returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = write_dcase_csvs(results, out_dir)
    md, js = out_dir / "results.md", out_dir / "results.json"
    md.write_text(results.to_markdown())
    js.write_text(json.dumps(results.to_dict(), indent=2) + "\n")
    return [*paths, md, js, plot_roc(results, out_dir / "roc.png")]


def write_dcase_csvs(results: Results, out_dir: Path) -> list[Path]:
    """anomaly_score_<group>.csv and decision_result_<group>.csv: file name, value; no header.

    The group name's "/" becomes "_": fan/id_00 -> anomaly_score_fan_id_00.csv, the names
    the DCASE Task 2 evaluators look for.
    """
    paths = []
    for name in sorted({c.group for c in results.clips}):
        mine = [c for c in results.clips if c.group == name]
        stem = name.replace("/", "_")
        for kind, value in (
            ("anomaly_score", lambda c: f"{c.score:.6f}"),
            ("decision_result", lambda c: str(int(c.decision))),
        ):
            path = out_dir / f"{kind}_{stem}.csv"
            with path.open("w", newline="") as f:
                writer = csv.writer(f, lineterminator="\n")
                writer.writerows([c.path.name, value(c)] for c in mine)
            paths.append(path)
    return paths


def plot_roc(results: Results, path: Path) -> Path:
    """One ROC curve per group (all its test clips), the pAUC region shaded."""
    # The object API with the Agg canvas: no pyplot, no global backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.axvspan(0, MAX_FPR, color="tab:orange", alpha=0.15, label=f"pAUC region (FPR ≤ {MAX_FPR:g})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    key = "pauc" if results.rule == "dcase2023" else "auc"  # the value shown per curve
    skipped = []
    for name in sorted({c.group for c in results.clips}):
        mine = [c for c in results.clips if c.group == name]
        labels = np.array([c.anomaly for c in mine], dtype=int)
        if labels.min() == labels.max():
            skipped.append(name)
            continue
        fpr, tpr, _ = roc_curve(labels, [c.score for c in mine])
        value = next(r for r in results.rows if r.group == name).values[key]
        ax.plot(fpr, tpr, linewidth=1.5, label=f"{name} ({METRIC_TITLES[key]} {pct(value)} %)")
    ax.set(
        xlim=(-0.01, 1.01),
        ylim=(-0.01, 1.01),
        xlabel="false positive rate",
        ylabel="true positive rate",
    )
    title = f"ROC per group ({results.rule})"
    if skipped:
        title += f"\nnot plotted, one class only: {', '.join(skipped)}"
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=7)
    fig.savefig(path)
    return path


class RunScorer:
    """Scores single audio files with a run's checkpoint and prototypes (torch).

    The torch twin of the runtime's bundle Detector, for a run not yet exported.
    """

    def __init__(self, run: LoadedRun, scoring: Scoring, group: ScoringGroup, device: str):
        self.run, self.scoring, self.group, self.device = run, scoring, group, device

    @classmethod
    def open(
        cls, run_or_path: str | Path, *, group: str | None = None, device: str = "cpu"
    ) -> RunScorer:
        run = load_checkpoint(run_or_path)
        scoring = load_scoring(run_dir_of(run_or_path), run.config.model.embedding_dim)
        if group is None:
            if len(scoring.groups) != 1:
                names = ", ".join(g.name for g in scoring.groups)
                raise DatasetError(
                    f"{run_or_path}: the run has {len(scoring.groups)} scoring groups "
                    f"({names}); pick one with --group"
                )
            return cls(run, scoring, scoring.groups[0], device)
        return cls(run, scoring, scoring.group(group), device)

    def score_file(
        self, path: str | Path, *, downmix: bool = False, resample: bool = False
    ) -> FileResult:
        """A whole file, every window of it, as the bundle's Detector (runtime.filescore)."""
        fe = self.run.config.frontend
        prototypes = self.scoring.prototypes_of(self.group.name)

        def score_batch(batch: np.ndarray) -> list[float]:
            emb = embed_clips(self.run.model, list(batch), fe, device=self.device)
            return [float(s) for s in anomaly_scores(emb, prototypes)]

        return score_file(
            path, fe, self.group.threshold, score_batch, downmix=downmix, resample=resample
        )
