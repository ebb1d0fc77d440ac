"""Jobs on disk: one SQLite table (standard library), so runs survive a UI restart and a new UI re-attaches.

A job is one training run (or one `generate`) and its history of processes: `argv` is the command line the user
planned; each launch (the first, and every resume) records its own argv, pid and the pid's start time (a pid
reused by another program after a reboot is not mistaken for the trainer).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

# queued -> starting (process up, loading) -> training -> finished | failed | stopped; lost = the process vanished
# without writing its outcome; cancelled = removed from the queue before it started.
ACTIVE = ("starting", "training")
ENDED = ("finished", "failed", "stopped", "lost", "cancelled")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    argv TEXT NOT NULL,
    launch_argv TEXT NOT NULL DEFAULT '[]',
    output_dir TEXT NOT NULL,
    output_name TEXT,
    device TEXT NOT NULL,
    status TEXT NOT NULL,
    pid INTEGER,
    pid_started REAL,
    exit_code INTEGER,
    error TEXT,
    created REAL NOT NULL,
    started REAL,
    ended REAL,
    launches INTEGER NOT NULL DEFAULT 0,
    log_path TEXT NOT NULL DEFAULT '',
    extra TEXT NOT NULL DEFAULT '{}'
)
"""


@dataclass
class Job:
    id: int
    kind: str
    name: str
    argv: list[str]
    output_dir: str
    output_name: str | None
    device: str
    status: str
    launch_argv: list[str] = field(default_factory=list)
    pid: int | None = None
    pid_started: float | None = None
    exit_code: int | None = None
    error: str | None = None
    created: float = 0.0
    started: float | None = None
    ended: float | None = None
    launches: int = 0
    log_path: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


_JSON_COLUMNS = ("argv", "launch_argv", "extra")


class JobStore:
    """Thread-safe access to the jobs table of `<state_dir>/jobs.sqlite3`."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")  # a reader (a second UI) never blocks the writer
        self._db.execute(SCHEMA)

    def _job(self, row: sqlite3.Row) -> Job:
        values = dict(row)
        for name in _JSON_COLUMNS:
            values[name] = json.loads(values[name])
        return Job(**values)

    def add(self, *, kind: str, name: str, argv: list[str], output_dir: str, output_name: str | None, device: str,
            log_path: str = "", extra: dict[str, Any] | None = None) -> Job:
        with self._lock:
            cursor = self._db.execute(
                "INSERT INTO jobs (kind, name, argv, output_dir, output_name, device, status, created, log_path, extra)"
                " VALUES (?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?)",
                (kind, name, json.dumps(argv), output_dir, output_name, device, time.time(), log_path,
                 json.dumps(extra or {})))
            job_id = int(cursor.lastrowid or 0)
        return self.get(job_id)

    def get(self, job_id: int) -> Job:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise KeyError(job_id)
        return self._job(row)

    def all(self) -> list[Job]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs ORDER BY id").fetchall()
        return [self._job(r) for r in rows]

    def with_status(self, *statuses: str) -> list[Job]:
        marks = ",".join("?" * len(statuses))
        with self._lock:
            rows = self._db.execute(f"SELECT * FROM jobs WHERE status IN ({marks}) ORDER BY id", statuses).fetchall()
        return [self._job(r) for r in rows]

    def update(self, job_id: int, **values: Any) -> Job:
        allowed = {f.name for f in fields(Job)} - {"id"}
        unknown = set(values) - allowed
        if unknown:
            raise KeyError(f"unknown job fields {sorted(unknown)}")
        columns = ", ".join(f"{name} = ?" for name in values)
        params = [json.dumps(v) if k in _JSON_COLUMNS else v for k, v in values.items()]
        with self._lock:
            self._db.execute(f"UPDATE jobs SET {columns} WHERE id = ?", (*params, job_id))
        return self.get(job_id)

    def close(self) -> None:
        with self._lock:
            self._db.close()


__all__ = ["ACTIVE", "ENDED", "Job", "JobStore"]
