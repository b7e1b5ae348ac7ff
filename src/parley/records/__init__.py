"""Durable call records: every call's events, and the calls and turns derived from them."""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING

from parley.records.memory import MemoryStore
from parley.records.store import CallRecord, CallStore, TurnRecord

if TYPE_CHECKING:
    from parley.settings import Settings

__all__ = ["CallRecord", "CallStore", "MemoryStore", "TurnRecord", "build_store"]


def build_store(settings: Settings) -> CallStore:
    """The store `settings.store` names (sqlite: opened now, in `settings.data_dir`)."""
    if settings.store == "memory":
        return MemoryStore(max_calls=max(1, settings.recent_calls_kept))
    from parley.records.sqlite import SqliteStore

    try:
        return SqliteStore(settings.data_dir, retention_days=settings.retention_days)
    except (OSError, sqlite3.Error) as exc:  # an unwritable directory, a corrupt or locked file, a full disk
        raise RuntimeError(
            f"call records: cannot open the database in {settings.data_dir} (PARLEY_DATA_DIR): {exc}"
        ) from exc
