"""Durable call records: every call's events, and the calls and turns derived from them."""

from __future__ import annotations

import os
import socket
import sqlite3
from typing import TYPE_CHECKING

from parley.records.memory import MemoryStore
from parley.records.store import CallRecord, CallStore, RecordsUnavailable, TurnRecord

if TYPE_CHECKING:
    from parley.settings import Settings

__all__ = ["CallRecord", "CallStore", "MemoryStore", "RecordsUnavailable", "TurnRecord", "build_store"]


def build_store(settings: Settings) -> CallStore:
    """The store `settings.store` names (sqlite: opened now, in `settings.data_dir`; redis: connected
    now, to `settings.redis_url`)."""
    if settings.store == "memory":
        return MemoryStore(max_calls=max(1, settings.recent_calls_kept))
    if settings.store == "redis":
        return _redis_store(settings)
    from parley.records.sqlite import SqliteStore

    try:
        return SqliteStore(settings.data_dir, retention_days=settings.retention_days)
    except (OSError, sqlite3.Error) as exc:  # an unwritable directory, a corrupt or locked file, a full disk
        raise RuntimeError(
            f"call records: cannot open the database in {settings.data_dir} (PARLEY_DATA_DIR): {exc}"
        ) from exc


def default_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _redis_store(settings: Settings) -> CallStore:
    import redis

    from parley.records.redis_store import RedisStore, redact_url, scrub

    if settings.redis_url is None:
        raise RuntimeError("call records: PARLEY_STORE=redis needs PARLEY_REDIS_URL (redis://host:port/db)")
    url = settings.redis_url.get_secret_value()
    instance_id = settings.instance_id or default_instance_id()
    try:
        return RedisStore(url, instance_id, retention_days=settings.retention_days)
    except (redis.RedisError, RecordsUnavailable, OSError, ValueError) as exc:  # unreachable, refused, bad URL
        raise RuntimeError(
            f"call records: cannot use Redis at {redact_url(url)} (PARLEY_REDIS_URL): {scrub(str(exc), url)}"
        ) from None  # the chained error could quote the URL
