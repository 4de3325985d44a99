"""Draw a monitor's events file: score timeline, threshold, verdicts and alarm spans.

matplotlib is imported only here, inside the function: the edge box does not need it
to monitor, only to draw (install the `plot` extra).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from msn_edge.runtime.errors import MsnEdgeError

FIGSIZE_IN = (12.0, 4.5)
DPI = 100
NORMAL_COLOUR = "tab:blue"
ANOMALOUS_COLOUR = "tab:red"
THRESHOLD_COLOUR = "black"
ALARM_COLOUR = "tab:red"
ALARM_ALPHA = 0.15
GAP_COLOUR = "tab:orange"


def _utc(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


@dataclass
class Timeline:
    start: list[datetime] = field(default_factory=list)
    end: list[datetime] = field(default_factory=list)
    score: list[float] = field(default_factory=list)
    threshold: list[float] = field(default_factory=list)
    anomalous: list[bool] = field(default_factory=list)
    gaps: set[int] = field(default_factory=set)  # windows that follow lost audio
    alarms: list[tuple[datetime, datetime | None]] = field(default_factory=list)  # raised, cleared


def read_events(path: str | Path) -> Timeline:
    """Parse an events file (JSON lines) into what the plot needs; bad lines are errors."""
    path = Path(path)
    tl = Timeline()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise MsnEdgeError(f"{path}: cannot read the events file ({e.strerror})") from None
    except UnicodeDecodeError:
        raise MsnEdgeError(f"{path}: not a monitor events file (not UTF-8 text)") from None
    invalid_before = False
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            ev = json.loads(line)
            kind = ev["event"]
            if kind == "window" and ev.get("verdict") == "invalid":
                invalid_before = True  # no score to draw: the line breaks there
            elif kind == "window":
                tl.start.append(_utc(ev["start"]))
                tl.end.append(_utc(ev["end"]))
                tl.score.append(float(ev["score"]))
                tl.threshold.append(float(ev["threshold"]))
                tl.anomalous.append(bool(ev["anomalous"]))
                if ev.get("after_gap") or invalid_before:
                    tl.gaps.add(len(tl.score) - 1)
                invalid_before = False
            elif kind == "alarm":
                tl.alarms.append((_utc(ev["time"]), None))
            elif kind == "clear" and tl.alarms and tl.alarms[-1][1] is None:
                tl.alarms[-1] = (tl.alarms[-1][0], _utc(ev["time"]))
        except (ValueError, KeyError, TypeError) as e:
            raise MsnEdgeError(f"{path}:{n}: not a monitor event ({e})") from None
    if not tl.score:
        raise MsnEdgeError(f"{path}: no window events to plot")
    return tl


def _broken_at(xs: list, ys: list[float], breaks: set[int]) -> tuple[list, list[float]]:
    """The series with a NaN before each break, so that no line is drawn across a gap."""
    out_x, out_y = [], []
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        if i in breaks:
            out_x.append(x)
            out_y.append(float("nan"))
        out_x.append(x)
        out_y.append(y)
    return out_x, out_y


def plot_timeline(events: str | Path, out: str | Path, *, title: str | None = None) -> Path:
    """Write a PNG of the score over time; the threshold, anomalous windows, alarms, gaps."""
    try:  # the object API with the Agg canvas: no pyplot, no global backend switch
        import matplotlib.dates as mdates
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MsnEdgeError("plotting needs matplotlib: pip install 'msn-edge[plot]'") from None
    tl = read_events(events)
    mid = [s + (e - s) / 2 for s, e in zip(tl.start, tl.end, strict=True)]  # window centres
    fig = Figure(figsize=FIGSIZE_IN, dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(*_broken_at(mid, tl.score, tl.gaps), color=NORMAL_COLOUR, linewidth=1.0, label="score")
    ax.plot(
        *_broken_at(mid, tl.threshold, tl.gaps),
        color=THRESHOLD_COLOUR,
        linestyle="--",
        linewidth=1.0,
        label="threshold",
    )
    bad = [i for i, a in enumerate(tl.anomalous) if a]
    ax.scatter(
        [mid[i] for i in bad],
        [tl.score[i] for i in bad],
        color=ANOMALOUS_COLOUR,
        s=14,
        zorder=3,
        label=f"anomalous ({len(bad)} of {len(mid)})",
    )
    for n, (since, until) in enumerate(tl.alarms):
        ax.axvspan(
            since,
            until or tl.end[-1],
            color=ALARM_COLOUR,
            alpha=ALARM_ALPHA,
            label="alarm raised" if n == 0 else None,
        )
    for n, gap in enumerate(sorted(tl.gaps)):
        ax.axvline(
            tl.start[gap],
            color=GAP_COLOUR,
            linewidth=1.0,
            linestyle=":",
            label="gap (audio lost)" if n == 0 else None,
        )
    locator = mdates.AutoDateLocator()
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    ax.set_xlabel("time (UTC)")
    ax.set_ylabel("anomaly score")
    alarms = f"{len(tl.alarms)} alarm" + ("" if len(tl.alarms) == 1 else "s")
    ax.set_title(title or f"{Path(events).name}: {len(mid)} windows, {alarms}")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    out = Path(out)
    try:
        fig.savefig(out, format="png")
    except OSError as e:
        raise MsnEdgeError(f"{out}: cannot write the plot ({e.strerror})") from None
    return out
