"""A bundle's audit trail: one record per `msn-edge enroll`, and the text `info` shows.

Every enrollment appends a record to the manifest's optional `enrollments` list (the
parent's records are carried over), so a bundle says where each of its groups' prototypes
and thresholds came from: when, from what audio, how much of it, what changed, and which
bundle it was made from (the parent's sha256). The manifest is JSON and the records are
plain values: reading them executes nothing.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone

from msn_edge.runtime.bundle import MODEL_MEMBERS, Bundle
from msn_edge.runtime.errors import BundleError

FIELD = "enrollments"  # the manifest key
# Fields every record has; `info` and the tests rely on them.
RECORD_FIELDS = (
    "utc",
    "msn_edge_version",
    "group",
    "mode",
    "source",
    "seconds",
    "windows",
    "prototypes_before",
    "prototypes_after",
    "threshold_before",
    "threshold_after",
    "threshold_how",
    "calibration",
    "parent",
    "parent_sha256",
    "models_sha256",
)


def utc_now() -> str:
    """ISO 8601 UTC to the second, e.g. 2026-11-30T15:02:21Z."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def history(bundle: Bundle) -> list[dict]:
    """The bundle's enrollment records, oldest first; [] for a bundle never enrolled."""
    records = bundle.manifest.get(FIELD, [])
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise BundleError(f"{bundle.path}: manifest.json has a malformed '{FIELD}' list")
    for i, r in enumerate(records):
        missing = [f for f in RECORD_FIELDS if f not in r]
        if missing:
            raise BundleError(
                f"{bundle.path}: enrollment record {i + 1} lacks {', '.join(missing)}"
            )
    return records


def _threshold(v: float | None) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.4g}"


def _how(calibration: dict) -> str:
    """One phrase for how a group's threshold was set."""
    method = calibration.get("method", "?")
    if calibration.get("false_alarms_per_day") is not None:
        rule = f"{calibration['false_alarms_per_day']:g} false alarms/day"
    elif calibration.get("quantile") is not None:
        rule = f"quantile {calibration['quantile']:g}"
    else:
        rule = ""
    n = calibration.get("n_clips")
    if n is not None and method == "leave-one-out":
        method += f" over {n}"
    elif n is not None and method == "holdout":
        method += f" of {n}"
    return f"{method}{', ' + rule if rule else ''}"


def record_line(r: dict) -> str:
    """One enrollment in one line (more with its warnings)."""
    if r["calibration"].get("method") == "leave-one-out":
        held = "each held out in turn"
    else:
        held = f"{r['windows']['held_out']} held out"
    line = (
        f"{r['utc']}  {r['mode']:<7} {r['group']}: {r['source']}, {r['seconds']:.0f} s, "
        f"{r['windows']['used']} windows ({held}); prototypes "
        f"{r['prototypes_before']} -> {r['prototypes_after']}; threshold "
        f"{_threshold(r['threshold_before'])} -> {_threshold(r['threshold_after'])} "
        f"({r['threshold_how']}); parent {r['parent']} sha256 {r['parent_sha256'][:12]}"
    )
    for w in r.get("warnings", []):
        line += f"\n    warning: {w}"
    return line


def describe(bundle: Bundle) -> str:
    """What `msn-edge info BUNDLE` prints: models, front-end, groups, enrollment history."""
    m, fe = bundle.manifest, bundle.frontend
    models = ", ".join(
        f"{MODEL_MEMBERS[v]} ({len(bundle.model_bytes(v)) / 1e6:.2f} MB)" for v in bundle.variants
    )
    trained = m.get("trained_on") or {}
    trained_text = ", ".join(f"{k} {v}" for k, v in trained.items() if not isinstance(v, list))
    lines = [
        f"bundle {bundle.path}: format {m['format']}, msn-edge {m.get('msn_edge_version', '?')}, "
        f"created {m.get('created_utc', '?')}, sha256 {bundle.sha256[:12]}",
        f"models: {models}",
        f"front-end: {fe.window_s:g} s windows at {fe.sample_rate} Hz; "
        f"embedding {bundle.embedding_dim}",
        f"trained on: {trained_text or 'not recorded'}",
        f"groups ({len(bundle.groups)}; default {m['default_group']}):",
    ]
    width = max(len(g.name) for g in bundle.groups)
    for g in bundle.groups:
        lines.append(
            f"  {g.name:<{width}}  {g.stop - g.start:>4} prototypes  threshold "
            f"{_threshold(g.threshold):<8} ({_how(g.calibration)})"
        )
    records = history(bundle)
    lines.append(f"enrollment history ({len(records) or 'none'}):")
    lines += [f"  {record_line(r)}" for r in records]
    return "\n".join(lines)
