"""The durable store: one SQLite database (WAL) in the data directory, written by one thread.

The event loop only puts records on a bounded queue; the writer thread writes them, deriving the
call and turn rows as it goes. Finals, turn ends and the call's start and end are committed at once
(a group commit when several are queued), everything else in batches of at most `batch_s`. With
`synchronous=NORMAL` in WAL mode a commit survives the process being killed (`kill -9`); a power cut
may lose the last few. A full queue or a failing disk drops records (logged, counted), never a call.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sqlite3
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from parley.records.store import COMMIT_NOW, CallRecord, Derivation, TurnRecord
from parley.records.writer import BatchedWriter

log = logging.getLogger("parley.records")

DB_NAME = "calls.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
    call_id TEXT PRIMARY KEY,
    correlation_id TEXT NOT NULL DEFAULT '',
    agent TEXT NOT NULL DEFAULT '',
    started_at REAL,
    ended_at REAL,
    end_reason TEXT,
    owner TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS calls_by_start ON calls (started_at);
CREATE TABLE IF NOT EXISTS events (
    call_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    at REAL NOT NULL,
    event TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (call_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS turns (
    call_id TEXT NOT NULL,
    turn_id INTEGER NOT NULL,
    kind TEXT, input TEXT, said TEXT, heard TEXT, outcome TEXT,
    started_at REAL, ended_at REAL,
    first_audio_ms REAL, voice_to_voice_ms REAL, audio_ms REAL, heard_ms REAL,
    error TEXT, barge_ins TEXT,
    PRIMARY KEY (call_id, turn_id)
) WITHOUT ROWID;
PRAGMA user_version = 1;
"""

_TURN_COLUMNS = (
    "call_id, turn_id, kind, input, said, heard, outcome, started_at, ended_at,"
    " first_audio_ms, voice_to_voice_ms, audio_ms, heard_ms, error, barge_ins"
)


_encode = json.JSONEncoder(default=str, ensure_ascii=False).encode

_OPEN_OWNERS: set[str] = set()  # stores of this process still open (their live calls are not lost)


class NoDatabase(LookupError):
    """There is no call records database at that path yet."""


def db_path(data_dir: Path) -> Path:
    return Path(data_dir) / DB_NAME


# How long a writer waits for another's transaction (sqlite's busy timeout): the worker processes of
# `parley serve --workers N` write one database, each from its writer thread, never on an event loop.
WRITE_BUSY_TIMEOUT_S = 15.0


def _connect(path: Path, *, write: bool) -> sqlite3.Connection:
    connection = sqlite3.connect(path, timeout=WRITE_BUSY_TIMEOUT_S if write else 5.0, check_same_thread=False)
    if write:
        _enable_wal(connection)
        connection.execute("PRAGMA synchronous=NORMAL")
    else:
        connection.execute("PRAGMA query_only=1")
    return connection


def _enable_wal(connection: sqlite3.Connection, *, within_s: float = WRITE_BUSY_TIMEOUT_S) -> None:
    """Switch the database to WAL, retrying while another process holds it.

    Two workers opening a new database at once can make sqlite answer "database is locked" at once,
    without waiting for its busy timeout (each holds a lock the other's mode change needs), so the
    wait is done here: the mode is stored in the file, whichever process wins, both go on in WAL.
    """
    deadline = time.monotonic() + within_s
    pause_s = 0.01
    while True:
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() + pause_s > deadline:
                raise
        time.sleep(pause_s)
        pause_s = min(pause_s * 2, 0.2)


class SqliteReader:
    """Reads a records database (the server's read paths and `parley calls`): one connection per read."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @contextlib.contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        if not self.path.exists():
            raise NoDatabase(f"no call records database at {self.path} (no call was recorded there yet)")
        connection = _connect(self.path, write=False)
        try:
            yield connection
        finally:
            connection.close()

    def calls(self, limit: int = 50, since: float | None = None) -> list[CallRecord]:
        select = (
            "SELECT call_id, correlation_id, agent, started_at, ended_at, end_reason,"
            " (SELECT count(*) FROM events e WHERE e.call_id = c.call_id) FROM calls c"
        )
        with self._reading() as db:
            if since is None:
                rows = db.execute(f"{select} ORDER BY started_at DESC LIMIT ?", (limit,)).fetchall()
            else:
                rows = db.execute(
                    f"{select} WHERE started_at >= ? ORDER BY started_at LIMIT ?", (since, limit)
                ).fetchall()
        return [CallRecord(*row) for row in rows]

    def call(self, call_id: str) -> CallRecord | None:
        with self._reading() as db:
            row = db.execute(
                "SELECT call_id, correlation_id, agent, started_at, ended_at, end_reason,"
                " (SELECT count(*) FROM events e WHERE e.call_id = c.call_id) FROM calls c WHERE call_id = ?",
                (call_id,),
            ).fetchone()
        return None if row is None else CallRecord(*row)

    def turns(self, call_id: str) -> list[TurnRecord]:
        with self._reading() as db:
            rows = db.execute(
                f"SELECT {_TURN_COLUMNS} FROM turns WHERE call_id = ? ORDER BY turn_id", (call_id,)
            ).fetchall()
        turns = []
        for row in rows:
            turn = TurnRecord(*row[:-1])
            turn.barge_ins = json.loads(row[-1] or "[]")
            turns.append(turn)
        return turns

    def events(self, call_id: str, after: int = 0, limit: int | None = None) -> list[dict[str, Any]]:
        with self._reading() as db:
            rows = db.execute(
                "SELECT data FROM events WHERE call_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                (call_id, after, -1 if limit is None else limit),
            ).fetchall()
        return [json.loads(data) for (data,) in rows]


class SqliteStore(SqliteReader, BatchedWriter):
    """The `sqlite` CallStore. Opening it creates the database, marks the calls a dead server left
    live as ended (`server_lost`) and deletes calls past retention; then its writer thread starts."""

    kind = "sqlite"
    _record_errors = (sqlite3.Error, ValueError, TypeError)  # a failing disk, a record JSON cannot hold

    def __init__(
        self,
        data_dir: Path,
        *,
        retention_days: float = 30.0,
        queue_size: int = 20_000,
        batch_s: float = 0.2,
        batch_max: int = 1000,
        max_call_bytes: int = 32 * 2**20,
        purge_every_s: float = 3600.0,
    ) -> None:
        SqliteReader.__init__(self, db_path(data_dir))
        BatchedWriter.__init__(
            self,
            queue_size=queue_size,
            batch_s=batch_s,
            batch_max=batch_max,
            purge_every_s=purge_every_s,
            thread_name="parley-records",
        )
        self.retention_s = retention_days * 86400
        self.max_call_bytes = max_call_bytes
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self._derive = Derivation()
        self._call_bytes: dict[str, int] = {}
        self._rows: list[tuple[str, int, float, str, str]] = []  # event rows not inserted yet
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = _connect(self.path, write=True)
        self._db.executescript(_SCHEMA)
        self.lost_calls = self._recover()
        purged = self.purge(time.time() - self.retention_s)
        if self.lost_calls or purged:
            log.info(
                "call records: %d call(s) marked server_lost, %d past retention deleted", len(self.lost_calls), purged
            )
        _OPEN_OWNERS.add(self.owner)
        self._thread.start()

    def _close_backend(self) -> None:
        _OPEN_OWNERS.discard(self.owner)
        self._db.close()

    def mark_lost(self, instance_id: str) -> list[str]:
        """Nothing to do: one server per database, whose lost calls are found when it opens (`lost_calls`)."""
        return []

    # ------------------------------------------------------------------ maintenance
    def purge(self, before: float) -> int:
        connection = _connect(self.path, write=True)
        try:
            with connection:
                gone = [
                    call_id
                    for (call_id,) in connection.execute(
                        "SELECT call_id FROM calls WHERE started_at < ? AND ended_at IS NOT NULL", (before,)
                    )
                ]
                for call_id in gone:
                    self._delete_call(connection, call_id)
            return len(gone)
        finally:
            connection.close()

    @staticmethod
    def _delete_call(db: sqlite3.Connection, call_id: str) -> None:
        db.execute("DELETE FROM events WHERE call_id = ?", (call_id,))
        db.execute("DELETE FROM turns WHERE call_id = ?", (call_id,))
        db.execute("DELETE FROM calls WHERE call_id = ?", (call_id,))

    def _recover(self) -> list[str]:
        return _mark_lost_calls(self._db)

    # ------------------------------------------------------------------ the writer thread
    def _purge_due(self) -> None:
        self._flush_pending()  # the purge writes on its own connection: no open transaction here
        try:
            purged = self.purge(time.time() - self.retention_s)
        except sqlite3.Error as exc:
            log.warning("call records: retention purge failed: %s", exc)
        else:
            if purged:
                log.info("call records: %d call(s) past retention deleted", purged)

    def _flush(self, pending: int) -> None:
        try:
            pending -= self._insert_events()
            self._db.commit()
            self._written += pending
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                self._db.rollback()
            self._drop(pending, f"a commit failed ({exc})")

    def _insert_events(self) -> int:
        """Insert the event rows collected (one executemany: less work holding the GIL); how many
        were lost to an error."""
        rows, self._rows = self._rows, []
        if not rows:
            return 0
        try:
            self._db.executemany(
                "INSERT OR REPLACE INTO events (call_id, seq, at, event, data) VALUES (?, ?, ?, ?, ?)", rows
            )
        except sqlite3.Error as exc:
            self._drop(len(rows), f"writing failed ({exc})")
            return len(rows)
        return 0

    def _write_call(self, call: CallRecord) -> tuple[int, bool]:
        self._insert_events()  # an old call of the same id is deleted below, with its events
        if self._db.execute("SELECT 1 FROM calls WHERE call_id = ?", (call.call_id,)).fetchone():
            log.info("call records: call id %s was used before; its old record is replaced", call.call_id)
            self._delete_call(self._db, call.call_id)
        self._db.execute(
            "INSERT INTO calls (call_id, correlation_id, agent, started_at, ended_at, end_reason, owner)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (call.call_id, call.correlation_id, call.agent, call.started_at, None, None, self.owner),
        )
        self._derive.begin(call)
        self._call_bytes[call.call_id] = 0
        return 1, True

    def _write_event(self, call_id: str, seq: int, record: Mapping[str, Any]) -> tuple[int, bool]:
        name = str(record.get("event", ""))
        used = self._call_bytes.get(call_id, 0)
        if used >= self.max_call_bytes and name != "call_ended":
            self._drop(1, f"call {call_id} passed {self.max_call_bytes} bytes of events")
            return 0, False
        data = _encode(record)
        data = f'{data[:-1]}, "seq": {seq}}}' if len(data) > 2 else f'{{"seq": {seq}}}'
        row = (call_id, seq, self._derive.wall(record), name, data)
        call, turns = self._derive.apply(call_id, record)
        if call is not None:
            self._db.execute(
                "INSERT INTO calls (call_id, correlation_id, agent, started_at, ended_at, end_reason, owner)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (call_id) DO UPDATE SET"
                " correlation_id = excluded.correlation_id, ended_at = excluded.ended_at,"
                " end_reason = excluded.end_reason",
                (
                    call.call_id,
                    call.correlation_id,
                    call.agent,
                    call.started_at,
                    call.ended_at,
                    call.end_reason,
                    self.owner,
                ),
            )
        for turn in turns:
            self._db.execute(
                f"INSERT OR REPLACE INTO turns ({_TURN_COLUMNS}) VALUES ({', '.join('?' * 15)})",
                (
                    turn.call_id,
                    turn.turn_id,
                    turn.kind,
                    turn.input,
                    turn.said,
                    turn.heard,
                    turn.outcome,
                    turn.started_at,
                    turn.ended_at,
                    turn.first_audio_ms,
                    turn.voice_to_voice_ms,
                    turn.audio_ms,
                    turn.heard_ms,
                    turn.error,
                    json.dumps(turn.barge_ins, default=str),
                ),
            )
        self._rows.append(row)  # inserted with the others of the batch (after the derived rows: fine)
        if call_id in self._derive.live:  # a late event of an ended call is not counted: nothing kept for it
            self._call_bytes[call_id] = used + len(data)
        if name == "call_ended":
            self._call_bytes.pop(call_id, None)
        return 1, name in COMMIT_NOW


def recover_lost_calls(data_dir: Path) -> list[str]:
    """Mark the live calls of every dead server process as ended (`server_lost`); their ids. The
    supervisor of worker processes runs it before it starts them and whenever one has died: a worker's
    calls carry its process id (`owner`), so the calls of the workers still running stay live."""
    path = db_path(data_dir)
    if not path.exists():
        return []
    connection = _connect(path, write=True)
    try:
        return _mark_lost_calls(connection)
    finally:
        connection.close()


def _mark_lost_calls(db: sqlite3.Connection) -> list[str]:
    """Calls whose server is gone (killed, crashed) are marked ended, as are their open turns."""
    lost: list[str] = []
    with db:
        # BEGIN IMMEDIATE: the write lock before the read, so two processes recovering at once (a
        # worker starting while the supervisor recovers) do not both mark the same call.
        db.execute("BEGIN IMMEDIATE")
        for call_id, owner in db.execute("SELECT call_id, owner FROM calls WHERE ended_at IS NULL").fetchall():
            if _owner_alive(owner):
                continue
            lost.append(call_id)
            db.execute(
                "UPDATE calls SET end_reason = 'server_lost', ended_at = coalesce("
                " (SELECT max(at) FROM events WHERE call_id = ?), started_at) WHERE call_id = ?",
                (call_id, call_id),
            )
            db.execute("UPDATE turns SET outcome = 'unfinished' WHERE call_id = ? AND outcome = 'open'", (call_id,))
    return lost


def _owner_alive(owner: str) -> bool:
    """Whether the server recording a call still runs (on this host: its process; elsewhere: unknown,
    taken as gone: one server per data directory)."""
    if owner in _OPEN_OWNERS:
        return True
    host, _, rest = owner.partition(":")
    pid_text, _, _ = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False  # a store of this process that was closed (or never closed cleanly)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    """A process that has ended but was not reaped yet (a dead worker whose supervisor was killed,
    in a container whose init does not reap): os.kill still finds it."""
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.Error:  # gone meanwhile
        return True
