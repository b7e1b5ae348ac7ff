"""Logging setup shared by the commands: logging that never blocks a call.

A log call only puts the record on a bounded queue (`put_nowait`); a listener thread writes the
records to the real sink (stdout). When the sink is stuck (a pipe nobody reads, a slow terminal) the
queue fills and new records are dropped and counted (`dropped()`, `/api/stats`, a line at shutdown)
instead of freezing the event loop and every call on it.

Two formats (`PARLEY_LOG_FORMAT`): `json`, one JSON object per line (time, level, logger, message,
and for a call event its own fields), the default when stdout is not a terminal; `console`, short
human lines with emoji markers for the key call events, through rich when stdout is a terminal.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import json
import logging
import logging.handlers
import os
import queue
import sys
import threading
import time
from typing import IO, Any, Literal

LogFormat = Literal["auto", "json", "console"]

QUEUE_RECORDS = 10000  # records waiting for the sink before new ones are dropped
STOP_WAIT_S = 2.0  # at exit, how long the listener may take to write what is queued

# The attribute of a LogRecord that carries a call event's dict (see parley.media.events).
EVENT_ATTR = "parley_event"

EVENT_MARKERS = {
    "call_started": "☎️ ",
    "call_ended": "☎️ ",
    "speech_started": "🎤",
    "speech_ended": "🎤",
    "partial": "💭",
    "final": "📝",
    "dtmf": "🔢",
    "dtmf_input": "🔢",
    "turn_started": "▶️ ",
    "first_audio_sent": "🔊",
    "barge_in_decided": "🛑",
    "stop_audio_sent": "🛑",
    "barge_in_paused": "⏸️ ",
    "barge_in_resumed": "🔁",
    "barge_in_confirmed": "🛑",
    "turn_completed": "✅",
    "turn_cancelled": "✂️ ",
    "turn_failed": "❌",
    "input_error": "⚠️ ",
    "agent_text": "💬",
    "transfer_requested": "↪️ ",
}


class DroppingQueueHandler(logging.handlers.QueueHandler):
    """A QueueHandler that never waits: on a full queue the record is dropped and counted."""

    def __init__(self, records: queue.Queue[Any]) -> None:
        super().__init__(records)
        self._dropped = 0
        self._count_lock = threading.Lock()

    @property
    def dropped(self) -> int:
        return self._dropped

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            with self._count_lock:
                self._dropped += 1

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        # The message is formatted here (its arguments may change later); the listener formats the
        # rest. Unlike the base class, the traceback stays with the record for the console handler.
        record = logging.makeLogRecord(record.__dict__)
        event = getattr(record, EVENT_ATTR, None)
        # A call event's formatters read its dict: its JSON message is not made on the caller's thread.
        record.msg = str(event.get("event")) if isinstance(event, dict) else record.getMessage()
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        return record


class _Listener(logging.handlers.QueueListener):
    """QueueListener (its thread is a daemon) that can be stopped without hanging on a stuck sink."""

    def stop_within(self, timeout: float) -> bool:
        """Ask the thread to write what is queued and end; wait up to `timeout`. False: it did not."""
        thread = self._thread
        if thread is None:
            return True
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.enqueue_sentinel()
                break
            except queue.Full:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.01)
        thread.join(max(0.0, deadline - time.monotonic()))
        self._thread = None
        return not thread.is_alive()


class _FdStream:
    """Writes straight to a file descriptor. A write blocked on a full pipe then holds no lock of
    sys.stdout, so the interpreter can still exit (a blocked buffered write makes exit abort)."""

    encoding = "utf-8"

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def isatty(self) -> bool:
        return os.isatty(self.fd)

    def write(self, text: str) -> int:
        data = text.encode("utf-8", "replace")
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]
        return len(text)

    def flush(self) -> None:
        pass


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (+ exception); a call event's own
    fields are merged in (a field named like one of those gets a `field_` prefix)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
        }
        event = getattr(record, EVENT_ATTR, None)
        if isinstance(event, dict):
            line["message"] = str(event.get("event", ""))
            for key, value in event.items():
                line[f"field_{key}" if key in ("time", "level", "logger", "message") else key] = value
        else:
            line["message"] = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exception"] = record.exc_text
        return json.dumps(line, default=str, ensure_ascii=False)


class ConsoleFormatter(logging.Formatter):
    """Short human lines; call events as `🛑 barge_in_decided [call] key=value ...`."""

    def __init__(self, *, with_time: bool) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(message)s" if with_time else "%(message)s", "%H:%M:%S")

    def formatMessage(self, record: logging.LogRecord) -> str:
        event = getattr(record, EVENT_ATTR, None)
        if isinstance(event, dict):
            record.message = describe_event(event)
        else:
            record.message = f"{record.name}: {record.getMessage()}"
        return super().formatMessage(record)


def describe_event(event: dict[str, Any]) -> str:
    name = str(event.get("event", "?"))
    parts = [EVENT_MARKERS.get(name, "• "), name, f"[{str(event.get('call_id', '-'))[-12:]}]"]
    for key, value in event.items():
        if key in ("event", "t", "call_id"):
            continue
        text = f"{value:.3f}" if isinstance(value, float) else str(value)
        parts.append(f"{key}={text[:120]}{'…' if len(text) > 120 else ''}")
    return " ".join(parts)


class _Pipeline:
    def __init__(self, records: queue.Queue[Any], handler: DroppingQueueHandler, listener: _Listener) -> None:
        self.records = records
        self.handler = handler
        self.listener = listener


_pipeline: _Pipeline | None = None
_lock = threading.Lock()


def resolve_format(log_format: str, stream: IO[str] | None = None) -> Literal["json", "console"]:
    """`auto` is JSON lines unless stdout is a terminal."""
    if log_format in ("json", "console"):
        return log_format  # type: ignore[return-value]
    stream = sys.stdout if stream is None else stream
    try:
        return "console" if stream.isatty() else "json"
    except (AttributeError, ValueError):
        return "json"


def _handle_unlocked(handler: logging.Handler, record: logging.LogRecord) -> bool:
    """Handler.handle without the handler's lock: only the writer thread writes to the sink, and
    logging's own exit hook takes every handler's lock, so a write stuck on a full pipe while
    holding it would hang the process at exit."""
    if not handler.filter(record):
        return False
    handler.emit(record)
    return True


class _StreamSink(logging.StreamHandler):  # type: ignore[type-arg]
    def handle(self, record: logging.LogRecord) -> bool:
        return _handle_unlocked(self, record)


def _sink(fmt: Literal["json", "console"], stream: IO[str]) -> logging.Handler:
    target: Any = stream
    try:
        stream.flush()
        target = _FdStream(stream.fileno())
    except (AttributeError, ValueError, OSError):
        pass  # not a real file (a test's capture): write to it as it is
    tty = False
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        pass
    if fmt == "console" and tty:
        from rich.console import Console
        from rich.logging import RichHandler

        class _RichSink(RichHandler):
            def handle(self, record: logging.LogRecord) -> bool:
                return _handle_unlocked(self, record)

        handler: logging.Handler = _RichSink(
            console=Console(file=target), rich_tracebacks=True, show_path=False, markup=False
        )
        handler.setFormatter(ConsoleFormatter(with_time=False))
        return handler
    handler = _StreamSink(target)
    handler.setFormatter(JsonFormatter() if fmt == "json" else ConsoleFormatter(with_time=True))
    return handler


def configure(
    level: str = "info",
    *,
    events_to_console: bool = True,
    log_format: LogFormat = "auto",
    stream: IO[str] | None = None,
    queue_records: int = QUEUE_RECORDS,
    sink: logging.Handler | None = None,
) -> None:
    """Route all logging through the bounded queue to a writer thread. `sink` replaces the stdout
    handler (tests); `stream` replaces stdout."""
    global _pipeline
    shutdown()
    stream = sys.stdout if stream is None else stream
    if sink is None:
        sink = _sink(resolve_format(log_format, stream), stream)
    records: queue.Queue[Any] = queue.Queue(queue_records)
    handler = DroppingQueueHandler(records)
    handler.setLevel(level.upper())  # also for loggers with a lower level of their own (uvicorn's)
    listener = _Listener(records, sink, respect_handler_level=True)
    with _lock:
        _pipeline = _Pipeline(records, handler, listener)
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("parley.events").setLevel(logging.NOTSET if events_to_console else logging.WARNING)
    listener.start()


def active() -> bool:
    """True once configure() has set up the queue (uvicorn then leaves logging to it)."""
    return _pipeline is not None


def dropped() -> int:
    """Records dropped because the sink was not keeping up (0 when logging is not configured)."""
    pipeline = _pipeline
    return pipeline.handler.dropped if pipeline is not None else 0


def shutdown(timeout: float = STOP_WAIT_S) -> None:
    """Write what is queued (waiting at most `timeout` for a stuck sink) and remove the queue."""
    global _pipeline
    with _lock:
        pipeline, _pipeline = _pipeline, None
    if pipeline is None:
        return
    logging.getLogger().removeHandler(pipeline.handler)
    deadline = time.monotonic() + timeout
    if pipeline.handler.dropped:
        note = logging.LogRecord(
            "parley.logs",
            logging.WARNING,
            __file__,
            0,
            "%d log records were dropped: the log output was not keeping up",
            (pipeline.handler.dropped,),
            None,
        )
        with contextlib.suppress(queue.Full):
            pipeline.records.put(pipeline.handler.prepare(note), timeout=timeout)
    pipeline.listener.stop_within(max(0.0, deadline - time.monotonic()))


atexit.register(shutdown)
