"""Run a blocking, chunk-producing engine on an executor and consume its chunks asynchronously.

Synthesis is CPU work: it must never run on the event loop. The engine calls `emit(chunk)` for each
piece of audio; `emit` returns False once the consumer is gone (barge-in), and the engine stops.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor

Emit = Callable[[bytes], bool]


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
        try:
            produce(emit)
        finally:
            if not cancelled.is_set():
                loop.call_soon_threadsafe(chunks.put_nowait, None)

    future = asyncio.wrap_future(executor.submit(job))
    try:
        while (chunk := await chunks.get()) is not None:
            yield chunk
        await future  # re-raises an engine error
    finally:
        cancelled.set()
        if not future.done():
            # The engine aborts at its next chunk (milliseconds); wait so no work outlives the turn.
            await asyncio.wait([future])


def produce_all(produce: Callable[[Emit], None]) -> bytes:
    """Run a chunk-producing engine to the end on this thread and join its chunks (tests and
    test-audio generation; never on the event loop)."""
    out = bytearray()

    def keep(chunk: bytes) -> bool:
        out.extend(chunk)
        return True

    produce(keep)
    return bytes(out)
