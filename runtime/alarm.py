"""Per-window verdicts -> alarms: K anomalous windows in a row raise one, a normal one clears it.

One anomalous window is often a door slam or a forklift; a machine that has gone wrong
stays wrong. Requiring K consecutive windows trades K windows of delay for far fewer
false alarms, and the alarm holds until the machine sounds normal again.

Windows on both sides of a gap in the audio are not "in a row": `gap()` restarts the count
toward an alarm. An alarm already raised stays raised across a gap (nothing said the
machine recovered) until a normal window clears it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AlarmChange:
    kind: str  # "alarm" (raised) or "clear" (ended)
    index: int  # the window that caused the change
    run_start_index: int  # first anomalous window of the run
    run_start: int  # its first sample's position in the stream (samples)
    run_windows: int  # anomalous windows in the run (so far, for "alarm")


class AlarmState:
    """Feed every window's verdict in order; `update` returns an AlarmChange or None."""

    def __init__(self, after: int) -> None:
        if after < 1:
            raise ValueError(f"an alarm needs at least 1 anomalous window, got {after}")
        self.after = after
        self.active = False
        self.alarms = 0  # alarms raised so far
        self._run = 0  # anomalous windows in a row, up to the latest
        self._run_start = (0, 0)  # (index, start sample) of the run's first window

    def gap(self) -> None:
        """Audio was lost: the next anomalous window starts a new run (unless alarmed)."""
        if not self.active:
            self._run = 0

    def update(self, index: int, anomalous: bool, start: int) -> AlarmChange | None:
        """One window's verdict; `start` is its first sample's position in the stream."""
        if anomalous:
            if self._run == 0:
                self._run_start = (index, start)
            self._run += 1
            if self.active or self._run < self.after:
                return None
            self.active = True
            self.alarms += 1
            return AlarmChange("alarm", index, *self._run_start, self._run)
        change = AlarmChange("clear", index, *self._run_start, self._run) if self.active else None
        self.active = False
        self._run = 0
        return change
