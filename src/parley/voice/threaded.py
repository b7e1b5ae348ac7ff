"""Run a blocking, chunk-producing engine on an executor and consume its chunks asynchronously.

Synthesis is CPU work: it must never run on the event loop. The engine calls `emit(chunk)` for each
piece of audio; `emit` returns False once the consumer is gone (barge-in), and the engine stops.

A consumer that goes away first cancels the job if the shared executor has not started it yet (a
cancelled turn must not wait behind other calls' synthesis for a job nobody wants), and waits at
most `CLEANUP_S` for a running one to notice.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor

Emit = Callable[[bytes], bool]

CLEANUP_S = 2.0  # a running engine notices a cancellation at its next chunk (milliseconds)

log = logging.getLogger(__name__)


async def stream_from_executor(executor: Executor, produce: Callable[[Emit], None]) -> AsyncIterator[bytes]:
    loop = asyncio.get_running_loop()
    chunks: asyncio.Queue[bytes | None] = asyncio.Queue()  # None: the engine is done
    cancelled = threading.Event()

    def emit(chunk: bytes) -> bool:
        if cancelled.is_set():
            return False
        if chunk:
            loop.call_soon_threadsafe(chunks.put_nowait, chunk)
        return not cancelled.is_set()

    def job() -> None:
        if cancelled.is_set():
            return  # its turn was cancelled while it waited for a worker
        try:
            produce(emit)
        finally:
            if not cancelled.is_set():
                loop.call_soon_threadsafe(chunks.put_nowait, None)

    job_future = executor.submit(job)
    future = asyncio.wrap_future(job_future)
    try:
        while (chunk := await chunks.get()) is not None:
            yield chunk
        await future  # re-raises an engine error
    finally:
        cancelled.set()
        if not job_future.cancel() and not future.done():
            # Running: the engine aborts at its next chunk; wait (bounded) so no work outlives the turn.
            done, _ = await asyncio.wait([future], timeout=CLEANUP_S)
            if not done:
                log.warning("synthesis job still running %.1f s after its turn ended; left behind", CLEANUP_S)


def produce_all(produce: Callable[[Emit], None]) -> bytes:
    """Run a chunk-producing engine to the end on this thread and join its chunks (tests and
    test-audio generation; never on the event loop)."""
    out = bytearray()

    def keep(chunk: bytes) -> bool:
        out.extend(chunk)
        return True

    produce(keep)
    return bytes(out)
