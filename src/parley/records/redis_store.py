"""The `redis` store: call records in one Redis that every instance shares, so any instance reads
any call's events (the events API answers for a call served elsewhere).

Writing works as in the SQLite store: the event loop only puts records on a bounded queue; one
writer thread derives the call and turn rows (`Derivation`, so rows match SQLite's) and sends
everything in pipelines: commit-now events (finals, turn ends, the call's start and end) at once,
the others in batches of at most `batch_s`. A full queue or an unreachable Redis drops records
(logged at most every 10 s, counted), never blocks or fails a call; the writer backs off and
reconnects by itself.

Keys (`prefix` defaults to `parley:`; docs/records.md has the layout and the redis.conf to use):

    {prefix}call:<id>      hash: call_id, correlation_id, agent, started_at, ended_at, end_reason,
                           instance (its owner), last_at (wall time of its last event, while live)
    {prefix}events:<id>    stream: each event's JSON (with its seq) in field `d`, entry id `<seq>-0`
    {prefix}turns:<id>     hash: turn id -> the turn row's JSON
    {prefix}calls          sorted set: call ids scored by start time (`calls()`)
    {prefix}live:<inst>    set: the live calls instance <inst> serves (`mark_lost` reads it)

An ended call's three keys expire `retention_days` after it ended; `purge` (at startup and every
hour) deletes ended calls by start time and prunes the index.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any, cast
from urllib.parse import urlsplit

import orjson
import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from parley.records.store import COMMIT_NOW, CallRecord, Derivation, RecordsUnavailable, TurnRecord
from parley.records.writer import BatchedWriter

log = logging.getLogger("parley.records")


# The rows mark_lost ends, in one script: Redis runs it atomically, so two instances marking the
# same dead one at once end each call once (the second finds it ended, or gone from the live set).
# Turn rows are written by this module as compact JSON: `"outcome":"open"` cannot occur inside a
# string value (its quotes would be escaped), so the substitution only hits the field.
_MARK_LOST = """
local prefix, instance, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local lost = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local call = prefix .. 'call:' .. id
  local row = redis.call('HMGET', call, 'instance', 'ended_at', 'started_at', 'last_at')
  if row[1] == instance and not row[2] then
    local ended = row[4] or row[3]
    if not ended then
      local now = redis.call('TIME')
      ended = now[1] .. '.' .. string.format('%06d', tonumber(now[2]))
    end
    redis.call('HSET', call, 'ended_at', ended, 'end_reason', 'server_lost')
    redis.call('HDEL', call, 'last_at')
    local turns = prefix .. 'turns:' .. id
    local all = redis.call('HGETALL', turns)
    for i = 1, #all, 2 do
      local unfinished, n = string.gsub(all[i + 1], '"outcome":"open"', '"outcome":"unfinished"', 1)
      if n > 0 then redis.call('HSET', turns, all[i], unfinished) end
    end
    for _, key in ipairs({call, prefix .. 'events:' .. id, turns}) do redis.call('EXPIRE', key, ttl) end
    lost[#lost + 1] = id
  end
  redis.call('SREM', KEYS[1], id)
end
return lost
"""

_CALL_FIELDS = ("correlation_id", "agent", "started_at", "ended_at", "end_reason", "instance")
_JSON_OPTIONS = orjson.OPT_NON_STR_KEYS
_BACKOFF_FIRST_S = 0.5
_BACKOFF_MAX_S = 10.0
_PURGE_CHUNK = 500


def redact_url(url: str) -> str:
    """The URL without its password (for logs and errors)."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = f"{parts.username}:" if parts.username else ":"
        host = parts.hostname or ""
        netloc = f"{user}***@{host}" + (f":{parts.port}" if parts.port else "")
        return parts._replace(netloc=netloc).geturl()
    except ValueError:  # not a URL at all: show nothing of it
        return "<unparsable URL>"


def scrub(text: str, url: str) -> str:
    """`text` with the URL's password (if any) replaced: error messages may quote it."""
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    return text.replace(password, "***") if password else text


def _reason(exc: redis.RedisError) -> str:
    """The error without the command redis-py quotes for a pipeline (an event: the caller's words)."""
    return str(exc).rsplit("caused error: ", 1)[-1]


def _members(reply: Any) -> list[bytes]:
    """A sorted-set range reply without scores (the client is typed for every form of reply)."""
    return cast(list[bytes], reply)


def _float(value: bytes | None) -> float | None:
    return None if value is None else float(value)


def _text(value: bytes | None) -> str:
    return "" if value is None else value.decode()


class RedisStore(BatchedWriter):
    """The `redis` CallStore. Opening it checks that Redis answers (raising if not), ends the calls
    a previous run of this same `instance_id` left live (`lost_calls`), and applies retention; then
    its writer thread starts."""

    kind = "redis"

    def __init__(
        self,
        url: str,
        instance_id: str,
        *,
        retention_days: float = 30.0,
        prefix: str = "parley:",
        queue_size: int = 20_000,
        batch_s: float = 0.2,
        batch_max: int = 1000,
        max_call_bytes: int = 32 * 2**20,
        purge_every_s: float = 3600.0,
        connect_timeout_s: float = 2.0,
        io_timeout_s: float = 5.0,
    ) -> None:
        super().__init__(
            queue_size=queue_size,
            batch_s=batch_s,
            batch_max=batch_max,
            purge_every_s=purge_every_s,
            thread_name="parley-records-redis",
        )
        self._url = url  # with its password: never logged (redact_url, scrub)
        self.instance_id = instance_id
        self.prefix = prefix
        self.retention_s = retention_days * 86400
        self.max_call_bytes = max_call_bytes
        timeouts = {"socket_connect_timeout": connect_timeout_s, "socket_timeout": io_timeout_s}
        # The writer retries once at once (a socket the server closed since), then backs off itself:
        # redis-py's own back-off would hold the writer while the queue fills.
        self._w = redis.Redis.from_url(url, retry=Retry(NoBackoff(), 1), **timeouts)
        self._r = redis.Redis.from_url(url, retry=Retry(ExponentialBackoff(0.5, 0.05), 2), **timeouts)
        self._derive = Derivation()
        self._pipe = self._w.pipeline(transaction=False)  # the records written, not sent yet
        self._last_at: dict[str, float] = {}  # live calls' latest event (wall), sent with the pipeline
        self._call_bytes: dict[str, int] = {}
        self._last_seq: dict[str, int] = {}  # the latest seq sent per live call
        self._down_until = 0.0  # while Redis is unreachable: no attempt before this (monotonic)
        self._backoff = _BACKOFF_FIRST_S
        try:
            self._r.ping()
            self._mark_lost_script = self._r.register_script(_MARK_LOST)
            self.lost_calls = self.mark_lost(instance_id)
            purged = self.purge(time.time() - self.retention_s)
        except BaseException:
            self._w.close()
            self._r.close()
            raise
        if self.lost_calls or purged:
            log.info(
                "call records: %d call(s) marked server_lost, %d past retention deleted", len(self.lost_calls), purged
            )
        self._thread.start()

    # ------------------------------------------------------------------ keys
    def _call_key(self, call_id: str) -> str:
        return f"{self.prefix}call:{call_id}"

    def _events_key(self, call_id: str) -> str:
        return f"{self.prefix}events:{call_id}"

    def _turns_key(self, call_id: str) -> str:
        return f"{self.prefix}turns:{call_id}"

    def _live_key(self, instance_id: str) -> str:
        return f"{self.prefix}live:{instance_id}"

    @property
    def _index_key(self) -> str:
        return f"{self.prefix}calls"

    # ------------------------------------------------------------------ writing (any thread)
    def _shown(self, why: str) -> str:
        return scrub(why, self._url)

    def _close_backend(self) -> None:
        self._w.close()
        self._r.close()  # its connections; a later read connects again (reads after close work, as SQLite's)

    # ------------------------------------------------------------------ maintenance and recovery
    @contextmanager
    def _talking(self) -> Iterator[None]:
        """Redis errors out of reads and maintenance as one error that says what happened."""
        try:
            yield
        except redis.RedisError as exc:
            raise RecordsUnavailable(f"call records: Redis failed: {scrub(str(exc), self._url)}") from exc

    def mark_lost(self, instance_id: str) -> list[str]:
        ttl = max(1, int(self.retention_s))
        with self._talking():
            lost = self._mark_lost_script(keys=[self._live_key(instance_id)], args=[self.prefix, instance_id, ttl])
        return [call_id.decode() for call_id in lost]

    def purge(self, before: float) -> int:
        with self._talking():
            ids = [i.decode() for i in _members(self._r.zrangebyscore(self._index_key, "-inf", f"({before!r}"))]
            deleted = 0
            for start in range(0, len(ids), _PURGE_CHUNK):
                chunk = ids[start : start + _PURGE_CHUNK]
                pipe = self._r.pipeline(transaction=False)
                for call_id in chunk:
                    pipe.hmget(self._call_key(call_id), ["call_id", "ended_at"])
                rows = pipe.execute()
                pipe = self._r.pipeline(transaction=False)
                for call_id, (known, ended) in zip(chunk, rows, strict=True):
                    if known is not None and ended is None:
                        continue  # live (or lost and not marked yet): kept
                    deleted += known is not None  # no row: its keys expired, only the index entry is left
                    pipe.delete(self._call_key(call_id), self._events_key(call_id), self._turns_key(call_id))
                    pipe.zrem(self._index_key, call_id)
                pipe.execute()
        return deleted

    # ------------------------------------------------------------------ reading (may block)
    def _read_calls(self, ids: list[bytes]) -> list[CallRecord]:
        pipe = self._r.pipeline(transaction=False)
        for raw in ids:
            call_id = raw.decode()
            pipe.hgetall(self._call_key(call_id))
            pipe.xlen(self._events_key(call_id))
        replies = pipe.execute()
        calls = []
        for raw, row, count in zip(ids, replies[::2], replies[1::2], strict=True):
            if b"call_id" in row:  # no row: expired, or purged since the index was read
                calls.append(self._call_from(raw.decode(), row, count))
        return calls

    @staticmethod
    def _call_from(call_id: str, row: dict[bytes, bytes], events: int) -> CallRecord:
        return CallRecord(
            call_id,
            correlation_id=_text(row.get(b"correlation_id")),
            agent=_text(row.get(b"agent")),
            started_at=_float(row.get(b"started_at")),
            ended_at=_float(row.get(b"ended_at")),
            end_reason=None if row.get(b"end_reason") is None else _text(row.get(b"end_reason")),
            events=events,
            instance=_text(row.get(b"instance")),
        )

    def calls(self, limit: int = 50, since: float | None = None) -> list[CallRecord]:
        found: list[CallRecord] = []
        offset = 0
        with self._talking():
            while len(found) < limit:
                want = limit - len(found)
                if since is None:
                    ids = _members(self._r.zrevrange(self._index_key, offset, offset + want - 1))
                else:
                    ids = _members(self._r.zrangebyscore(self._index_key, repr(since), "+inf", start=offset, num=want))
                if not ids:
                    break
                offset += len(ids)
                found.extend(self._read_calls(ids))
        return found

    def call(self, call_id: str) -> CallRecord | None:
        with self._talking():
            found = self._read_calls([call_id.encode()])
        return found[0] if found else None

    def turns(self, call_id: str) -> list[TurnRecord]:
        with self._talking():
            rows = self._r.hgetall(self._turns_key(call_id))
        turns = [TurnRecord(**orjson.loads(data)) for data in rows.values()]
        return sorted(turns, key=lambda turn: turn.turn_id)

    def events(self, call_id: str, after: int = 0, limit: int | None = None) -> list[dict[str, Any]]:
        with self._talking():
            entries = self._r.xrange(self._events_key(call_id), f"{after + 1}-0", "+", count=limit)
        return [orjson.loads(fields[b"d"]) for _, fields in cast(list[tuple[bytes, dict[bytes, bytes]]], entries)]

    # ------------------------------------------------------------------ the writer thread
    def _purge_due(self) -> None:
        try:
            purged = self.purge(time.time() - self.retention_s)
        except RecordsUnavailable as exc:
            log.warning("call records: retention purge failed: %s", exc)
        else:
            if purged:
                log.info("call records: %d call(s) past retention deleted", purged)

    def _flush(self, pending: int) -> None:
        """Send the pipeline: its records are written, or (Redis down or failing) dropped and counted."""
        for call_id, wall in self._last_at.items():
            if call_id in self._derive.live:  # an ended call's row has its end instead
                self._pipe.hset(self._call_key(call_id), "last_at", repr(wall))
        self._last_at.clear()
        pipe, self._pipe = self._pipe, self._w.pipeline(transaction=False)
        if time.monotonic() < self._down_until:
            self._drop(pending, "Redis is unreachable")
            return
        try:
            pipe.execute()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            self._down_until = time.monotonic() + self._backoff
            if self._backoff == _BACKOFF_FIRST_S:
                log.warning(
                    "call records: Redis at %s is unreachable (%s)", redact_url(self._url), scrub(str(exc), self._url)
                )
            self._backoff = min(self._backoff * 2, _BACKOFF_MAX_S)
            self._drop(pending, f"Redis is unreachable ({exc})")
            return
        except redis.RedisError as exc:  # Redis answered with an error (out of memory, a key of another type)
            self._drop(pending, f"writing to Redis failed ({_reason(exc)})")
            return
        if self._backoff != _BACKOFF_FIRST_S:
            log.info("call records: Redis at %s answers again", redact_url(self._url))
            self._backoff = _BACKOFF_FIRST_S
        self._written += pending

    def _write_row(self, call: CallRecord) -> None:
        """The whole call row (so a row lost while Redis was down is back with the next change)."""
        key = self._call_key(call.call_id)
        values = {name: getattr(call, name) for name in _CALL_FIELDS} | {"instance": self.instance_id}
        present = {"call_id": call.call_id} | {
            name: repr(value) if isinstance(value, float) else str(value)
            for name, value in values.items()
            if value is not None
        }
        self._pipe.hset(key, mapping=present)  # type: ignore[arg-type]
        absent = [name for name, value in values.items() if value is None]
        if absent:
            self._pipe.hdel(key, *absent)
        if call.started_at is not None:
            self._pipe.zadd(self._index_key, {call.call_id: call.started_at})
        if call.live:
            self._pipe.sadd(self._live_key(self.instance_id), call.call_id)
        else:
            self._pipe.srem(self._live_key(self.instance_id), call.call_id)
            self._pipe.hdel(key, "last_at")

    def _write_call(self, call: CallRecord) -> tuple[int, bool]:
        # A known call id starts afresh: its old events and turns go (queued events of it too,
        # being earlier in the same pipeline, as SQLite deletes them).
        self._pipe.delete(self._call_key(call.call_id), self._events_key(call.call_id), self._turns_key(call.call_id))
        self._last_at.pop(call.call_id, None)
        self._last_seq.pop(call.call_id, None)
        self._write_row(call)
        self._derive.begin(call)
        self._call_bytes[call.call_id] = 0
        return 1, True

    def _write_event(self, call_id: str, seq: int, record: Mapping[str, Any]) -> tuple[int, bool]:
        name = str(record.get("event", ""))
        if seq <= self._last_seq.get(call_id, 0):  # a stream's ids only grow: Redis would refuse the batch
            self._drop(1, f"call {call_id}: event seq {seq} after seq {self._last_seq[call_id]}")
            return 0, False
        used = self._call_bytes.get(call_id, 0)
        if used >= self.max_call_bytes and name != "call_ended":
            self._drop(1, f"call {call_id} passed {self.max_call_bytes} bytes of events")
            return 0, False
        data = orjson.dumps(record, default=str, option=_JSON_OPTIONS)
        data = data[:-1] + b',"seq":%d}' % seq if len(data) > 2 else b'{"seq":%d}' % seq
        wall = self._derive.wall(record)
        call, turns = self._derive.apply(call_id, record)
        if call is not None:
            self._write_row(call)
        for turn in turns:
            self._pipe.hset(self._turns_key(call_id), str(turn.turn_id), orjson.dumps(asdict(turn), default=str))
        self._pipe.xadd(self._events_key(call_id), {"d": data}, id=f"{seq}-0")
        if call_id in self._derive.live:  # tracked while live only: a late event of an ended call adds nothing
            self._last_seq[call_id] = seq
            self._call_bytes[call_id] = used + len(data)
            self._last_at[call_id] = wall
        elif name == "call_ended":
            for tracked in (self._call_bytes, self._last_seq, self._last_at):
                tracked.pop(call_id, None)
            ttl = max(1, int(self.retention_s))
            for key in (self._call_key(call_id), self._events_key(call_id), self._turns_key(call_id)):
                self._pipe.expire(key, ttl)
        return 1, name in COMMIT_NOW
