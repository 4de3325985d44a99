"""`msn-edge enroll`: bring a new machine online, or follow its drift, without retraining.

    feed of normal audio (file, folder, stdin, device)   enroll_feed.py
    -> the bundle's own engine -> unit embeddings        (silent / clipped windows left out)
    -> prototypes and a held-out threshold               enroll_fit.py
    -> a new bundle: the model members byte-identical and verified, the group added,
       replaced or extended (and made the default), an audit record appended (history.py)

The input bundle is never overwritten. Torch-free: enrollment runs on the edge box.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from msn_edge.runtime.bundle import MODEL_MEMBERS, Bundle, ScoringGroup, read_bundle, write_bundle
from msn_edge.runtime.capture import open_device
from msn_edge.runtime.detector import Detector
from msn_edge.runtime.engines import Engine, make_engine
from msn_edge.runtime.enroll_feed import Embedded, Feed, embed_feed, open_feed, source_feed
from msn_edge.runtime.enroll_fit import EnrollOptions, GroupFit, fit_group, independent_windows
from msn_edge.runtime.errors import AudioError, BundleError, MsnEdgeError
from msn_edge.runtime.history import history, utc_now
from msn_edge.runtime.scorer import anomaly_scores
from msn_edge.runtime.sources import Source
from msn_edge.runtime.version import __version__

log = logging.getLogger(__name__)

MIN_WINDOWS = 6  # windows sharing no audio: one minute of 10 s windows at the least
MAX_REJECTED = 0.5  # more than this share of silent/clipped windows: not normal running
# Median normal score of the enrolled audio over the median threshold of the machines
# the model was trained on. A model that suits the machine puts its normal running about
# as close to the prototypes as it puts its training machines' (a ratio below 1); far
# above, it has not learnt what this machine's normal is. First choice, to be revisited
# with trained models: in benchmarks/results-first-shot.md (1-epoch models) the held-out
# machines scored 0.25-0.55, and 5.1 the one whose first-shot AUC was chance.
OFF_DISTRIBUTION_RATIO = 2.0


def enrolled_path(parent: Path, group: str) -> Path:
    """Where `monitor --enroll-first` writes: beside the parent, named by group and time."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", group).strip("-.") or "group"
    stamp = utc_now().replace("-", "").replace(":", "")
    return parent.with_name(f"{parent.stem}.{slug}.{stamp}.msn")


def check_output(parent: Path, out: Path, *, force: bool = False) -> None:
    """Fail before any audio is read if the new bundle cannot or must not be written there."""
    out, parent = Path(out), Path(parent)
    if out.resolve() == parent.resolve() or (out.exists() and out.samefile(parent)):
        raise MsnEdgeError(
            f"{out}: is the input bundle; enrolling never overwrites it (choose another -o)"
        )
    if out.is_dir():
        raise MsnEdgeError(f"{out}: is a folder; give the new bundle's file name")
    if out.exists() and not force:
        raise MsnEdgeError(f"{out}: already exists (pass --force to replace it)")
    folder = out.parent
    if not folder.is_dir():
        raise MsnEdgeError(f"{folder}: no such folder for the new bundle")
    try:  # what os.access would say, but true for root on a read-only mount too
        probe = folder / f".{out.name}.probe"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise MsnEdgeError(f"{folder}: cannot write the new bundle there ({e.strerror})") from None


@dataclass(frozen=True)
class EnrollResult:
    path: Path
    bundle: Bundle  # the new bundle, read back and verified
    record: dict  # the audit record appended to it
    warnings: list[str]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _checks(parent: Bundle, data: Embedded, fit: GroupFit) -> tuple[dict, list[str]]:
    """How far this machine's normal sits from what the model was trained on."""
    reference = float(np.median([g.threshold for g in parent.groups]))
    median = float(np.median(fit.held_scores))
    nearest = float(np.median(anomaly_scores(data.emb, parent.prototypes)))
    checks = {
        "median_normal_score": median,
        "reference_threshold": reference,
        "ratio": median / reference if reference > 0 else math.inf,
        "median_distance_to_parent_prototypes": nearest,
    }
    warnings = []
    if checks["ratio"] > OFF_DISTRIBUTION_RATIO:
        warnings.append(
            f"this machine's normal audio scores {checks['ratio']:.1f}x the model's usual "
            f"threshold (median {median:.3g} vs {reference:.3g}): it is far from what the "
            "model was trained on, so the model may not suit this machine"
        )
    return checks, warnings


def _guard(data: Embedded, feed: Feed, size: int, require_seconds: float | None) -> list[str]:
    """Errors for audio that cannot be enrolled; warnings for what was left out."""
    if feed.stats.stopped:
        raise MsnEdgeError(f"stopped after {feed.seconds:.0f} s of audio; nothing enrolled")
    if require_seconds is not None and feed.stats.ended:
        raise MsnEdgeError(
            f"{feed.description}: the audio ended after {feed.seconds:.0f} s, before the "
            f"{require_seconds:g} s asked for; nothing enrolled"
        )
    rejected = data.silent + data.clipped
    n_all = len(data.emb) + rejected
    health = f"{data.silent} silent and {data.clipped} clipped of {n_all} windows"
    if n_all and rejected > MAX_REJECTED * n_all:
        raise AudioError(
            f"{feed.description}: {health}: that is not a machine running normally "
            "(check the microphone, its connection and the input gain)"
        )
    independent = independent_windows(data.segments, data.starts, size) if len(data.emb) else 0
    if independent < MIN_WINDOWS:
        window_s = size / feed.sample_rate
        raise AudioError(
            f"{feed.description}: too little audio to enroll: {feed.seconds:.0f} s gave "
            f"{independent} usable windows of {window_s:g} s ({health}); enrollment needs "
            f"at least {MIN_WINDOWS} ({MIN_WINDOWS * window_s:g} s of normal running)"
        )
    warnings = []
    if rejected:
        warnings.append(f"{health} were left out")
    if feed.stats.tiled:
        warnings.append(f"{feed.stats.tiled} files shorter than a window were tiled to one")
    return warnings


def _regroup(parent: Bundle, name: str, fit: GroupFit) -> tuple[np.ndarray, list[ScoringGroup]]:
    """The parent's groups with `name` set to `fit`, first: it becomes the default group."""
    blocks = [(name, fit.prototypes, fit.threshold, fit.calibration)] + [
        (g.name, parent.prototypes[g.start : g.stop], g.threshold, g.calibration)
        for g in parent.groups
        if g.name != name
    ]
    groups, start = [], 0
    for group, rows, threshold, calibration in blocks:
        groups.append(ScoringGroup(group, start, start + len(rows), threshold, calibration))
        start += len(rows)
    return np.concatenate([b[1] for b in blocks]).astype(np.float32), groups


def _record(
    parent: Bundle,
    existing: ScoringGroup | None,
    options: EnrollOptions,
    feed: Feed,
    data: Embedded,
    fit: GroupFit,
    engine: Engine,
    models: dict[str, bytes],
) -> dict:
    """The audit record of one enrollment (runtime/history.py lists the required fields)."""
    fe = parent.frontend
    hop_s = fit.calibration["hop_s"]
    return {
        "utc": utc_now(),
        "msn_edge_version": __version__,
        "group": options.group,
        "mode": "update" if options.update else "replace" if existing else "new",
        "source": feed.description,
        "seconds": round(feed.seconds, 3),
        "windows": {
            "used": len(data.emb),
            "held_out": int(fit.held_scores.size),  # leave-one-out: every window, in turn
            "fit": fit.calibration["n_fit"],
            "silent": data.silent,
            "clipped": data.clipped,
            "window_s": fe.window_s,
            "hop_s": hop_s,
        },
        "gaps": feed.stats.gaps,
        "backend": engine.name,
        "precision": engine.precision,
        "prototypes_before": 0 if existing is None else existing.stop - existing.start,
        "prototypes_after": len(fit.prototypes),
        "threshold_before": None if existing is None else existing.threshold,
        "threshold_after": fit.threshold,
        "threshold_how": _how(fit.calibration, options),
        "calibration": fit.calibration,
        "parent": parent.path.name,
        "parent_sha256": parent.sha256,
        "models_sha256": {MODEL_MEMBERS[v]: _sha256(b) for v, b in models.items()},
    }


def enroll(
    parent: Bundle,
    engine: Engine,
    feed: Feed,
    out: str | Path,
    options: EnrollOptions,
    *,
    force: bool = False,
    require_seconds: float | None = None,
) -> EnrollResult:
    """Enroll `feed`'s audio as `options.group` of `parent` and write the bundle `out`.

    `require_seconds`: fail unless the feed gives this much audio (the monitor's
    --enroll-first asks for a duration, and a stream that ends early is a fault).
    """
    fe = parent.frontend
    hop = options.hop(fe)
    out = Path(out)
    check_output(parent.path, out, force=force)
    past = history(parent)  # a malformed trail fails now, not after minutes of listening
    existing = next((g for g in parent.groups if g.name == options.group), None)
    if options.update and existing is None:
        known = ", ".join(g.name for g in parent.groups)
        raise MsnEdgeError(
            f"--update adds to an existing group; {parent.path} has no '{options.group}' "
            f"(groups: {known}); leave out --update to enroll a new machine"
        )
    mode = "update" if options.update else "replace" if existing else "new"
    log.info(
        "enrolling '%s' (%s) from %s with %s %s",
        options.group,
        mode,
        feed.description,
        engine.name,
        engine.precision,
    )
    started = time.perf_counter()
    data = embed_feed(engine, fe, feed)
    warnings = _guard(data, feed, fe.window_samples, require_seconds)
    hop_s = hop / fe.sample_rate
    fit = fit_group(
        data,
        fe.window_samples,
        hop_s,
        options,
        existing,
        parent.prototypes[existing.start : existing.stop] if existing else None,
    )
    checks, off = _checks(parent, data, fit)
    warnings += off
    for w in warnings:
        log.warning(w)

    models = {v: parent.model_bytes(v) for v in parent.variants}
    prototypes, groups = _regroup(parent, options.group, fit)
    record = _record(parent, existing, options, feed, data, fit, engine, models)
    record.update(checks=checks, warnings=warnings)
    record["processing_s"] = round(time.perf_counter() - started, 3)
    write_bundle(
        out,
        model_onnx=models["fp32"],
        model_int8_onnx=models.get("int8"),
        model_int8_cpu_onnx=models.get("int8-cpu"),
        prototypes=prototypes,
        groups=groups,
        frontend=fe,
        trained_on=parent.manifest.get("trained_on", {}),
        metadata=parent.manifest.get("metadata", {}),
        enrollments=[*past, record],
    )
    written = _verify(out, parent, models, prototypes)
    log.info("wrote %s", out)
    return EnrollResult(out, written, record, warnings)


def _how(calibration: dict, options: EnrollOptions) -> str:
    if calibration["false_alarms_per_day"] is not None:
        how = (
            f"{calibration['false_alarms_per_day']:g} false alarms/day at a "
            f"{calibration['hop_s']:g} s hop (quantile {calibration['quantile']:.6g}"
            f"{', tail extrapolated' if calibration['extrapolated'] else ''})"
        )
    else:
        how = f"quantile {calibration['quantile']:g}"
    how += f" of {calibration['n_clips']} {calibration['method']} scores"
    if options.update:
        how += f", at least the previous {calibration['previous_threshold']:.4g}"
    return how


def _verify(out: Path, parent: Bundle, models: dict[str, bytes], prototypes: np.ndarray):
    """Read the new bundle back: the models must be the parent's, byte for byte."""
    try:
        written = read_bundle(out)
        same = written.variants == parent.variants and all(
            written.model_bytes(v) == b for v, b in models.items()
        )
        if not same or not np.array_equal(written.prototypes, prototypes):
            raise BundleError(f"{out}: the written bundle does not hold what was enrolled")
    except BundleError:
        out.unlink(missing_ok=True)
        raise
    return written


def enroll_first(
    detector: Detector,
    source: Source,
    minutes: float,
    *,
    group: str,
    hop_s: float | None = None,
    out: Path | None = None,
    tick: Callable[[], None] | None = None,
) -> tuple[EnrollResult, int]:
    """`monitor --enroll-first`: listen to `source` for `minutes` and enroll the new bundle
    (beside the old one). Returns it and how many samples of `source` it took: monitoring
    picks up there, with the rest of the last chunk (given back to `source`).

    `tick` is called after every chunk read and while a vanished device is reopened (the
    watchdog ping: enrolling takes minutes).
    """
    parent = detector.bundle
    out = out or enrolled_path(parent.path, group)
    options = EnrollOptions(group=group, hop_s=hop_s, max_seconds=60.0 * minutes)
    check_output(parent.path, out)
    feed = source_feed(
        source,
        parent.frontend,
        options.hop(parent.frontend),
        max_seconds=options.max_seconds,
        tick=tick,
    )
    log.info("listening to %s for %g min to enroll '%s'", source.name, minutes, group)
    result = enroll(parent, detector.engine, feed, out, options, require_seconds=60.0 * minutes)
    return result, feed.stats.samples


def enroll_from(
    bundle: str | Path,
    out: str | Path,
    options: EnrollOptions,
    *,
    device: str | None = None,
    input_path: str | None = None,
    backend: str = "auto",
    precision: str = "fp32",
    threads: int | None = None,
    capture: str = "auto",
    force: bool = False,
) -> EnrollResult:
    """`msn-edge enroll`: the bundle's own model listens to the ALSA `device` for
    `options.max_seconds`, or reads `input_path` (a file, a folder of them, or - for
    stdin), and the group is enrolled into the new bundle `out`."""
    parent = read_bundle(bundle)
    hop = options.hop(parent.frontend)
    check_output(parent.path, Path(out), force=force)  # before minutes of listening
    engine = make_engine(parent, backend, precision=precision, threads=threads)
    with contextlib.ExitStack() as stack:
        stack.callback(engine.close)
        if device is not None:
            source = stack.enter_context(
                open_device(device, parent.frontend.sample_rate, capture=capture)
            )
            feed = source_feed(source, parent.frontend, hop, max_seconds=options.max_seconds)
        else:
            feed = open_feed(input_path, parent.frontend, hop, options.max_seconds)
        return enroll(parent, engine, feed, Path(out), options, force=force)
