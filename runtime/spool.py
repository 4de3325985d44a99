"""A bounded, ordered, on-disk queue of messages (SQLite, from the standard library).

The MQTT sink puts every event here and removes it only when the broker has
acknowledged it, so events wait out a broker that is away, and a monitor restarted
meanwhile delivers what the last one could not. When the queue holds `max_items`, the
oldest messages are dropped to make room, and counted.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from msn_edge.runtime.errors import MsnEdgeError


class DiskQueue:
    """Append at the tail, read from the head in order, delete what was acknowledged."""

    def __init__(self, path: str | Path, max_items: int) -> None:
        if max_items < 1:
            raise MsnEdgeError(f"the MQTT queue must hold at least 1 event, got {max_items}")
        self.path = Path(path)
        self.max_items = max_items
        self.dropped = 0  # messages dropped by the bound since this process opened it
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")  # appends do not block reads
            self._db.execute("PRAGMA synchronous=NORMAL")  # fsync at checkpoints, not per event
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS queue ("
                "id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, payload BLOB NOT NULL)"
            )
            (self._count,) = self._db.execute("SELECT COUNT(*) FROM queue").fetchone()
        except (OSError, sqlite3.Error) as e:
            raise MsnEdgeError(f"{self.path}: cannot open the MQTT queue ({e})") from None

    def __len__(self) -> int:
        return self._count

    def put(self, topic: str, payload: bytes) -> int:
        """Append one message; returns how many old ones the bound dropped for it."""
        with self._lock:
            self._db.execute("INSERT INTO queue (topic, payload) VALUES (?, ?)", (topic, payload))
            self._count += 1
            over = self._count - self.max_items
            if over > 0:
                self._db.execute(
                    "DELETE FROM queue WHERE id IN (SELECT id FROM queue ORDER BY id LIMIT ?)",
                    (over,),
                )
                self._count -= over
                self.dropped += over
            return max(over, 0)

    def peek(self, after: int, limit: int) -> list[tuple[int, str, bytes]]:
        """Up to `limit` messages with ids above `after`, oldest first."""
        with self._lock:
            return self._db.execute(
                "SELECT id, topic, payload FROM queue WHERE id > ? ORDER BY id LIMIT ?",
                (after, limit),
            ).fetchall()

    def ack(self, upto: int) -> None:
        """Delete every message up to and including id `upto` (acknowledged in order)."""
        with self._lock:
            cur = self._db.execute("DELETE FROM queue WHERE id <= ?", (upto,))
            self._count -= cur.rowcount

    def close(self) -> None:
        with self._lock:
            self._db.close()
