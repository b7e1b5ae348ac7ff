"""A synthesizer that never leaves a caller in silence: the configured voice, watched by timeouts,
with the embedded voice standing in while it fails.

Every clause goes to the configured (primary) synthesizer with a bound on its first chunk and on
the gap between chunks. If it raises, times out or returns no audio before its first chunk, the
same clause is spoken by the fallback voice, and the primary is skipped for a backoff (1, 2, 4 ...
30 s, shared by every call of the process) before it is tried again: a dead cloud endpoint costs
one timeout, not one per clause. A failure after the first chunk cannot be hidden (the caller has
heard half a clause): it is raised as `SynthesisFailed` for the reply to end the turn.

Cleanup is bounded too: a synthesizer whose stream will not close within `cleanup_s` is left
behind with a warning rather than holding the turn.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field

from parley.protocols import Synthesizer

log = logging.getLogger(__name__)


class SynthesisFailed(RuntimeError):
    """The synthesizer raised, stalled or said nothing; the message says which and why."""


@dataclass(frozen=True, slots=True)
class SynthesisLimits:
    first_chunk_s: float = 5.0  # a clause's first audio (a cloud round trip, a cold model)
    next_chunk_s: float = 5.0  # between two chunks of one clause
    cleanup_s: float = 2.0  # closing an abandoned stream


@dataclass(slots=True)
class Backoff:
    """When to try a failing engine again: 1, 2, 4 ... `max_s` seconds after each failure in a row."""

    initial_s: float = 1.0
    max_s: float = 30.0
    failures: int = 0
    _retry_at: float = field(default=0.0, repr=False)

    def waiting(self, now: float | None = None) -> bool:
        return self.failures > 0 and (time.monotonic() if now is None else now) < self._retry_at

    def failed(self, now: float | None = None) -> float:
        self.failures += 1
        delay = min(self.max_s, self.initial_s * 2 ** (self.failures - 1))
        self._retry_at = (time.monotonic() if now is None else now) + delay
        return delay

    def succeeded(self) -> None:
        self.failures = 0


class GuardedSynthesizer:
    """`primary` watched by `limits`; `fallback` (may be None) speaks while it fails."""

    def __init__(
        self,
        primary: Synthesizer,
        fallback: Synthesizer | None,
        *,
        name: str,
        limits: SynthesisLimits | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        self.primary = primary
        self.fallback = fallback
        self.name = name
        self.limits = limits or SynthesisLimits()
        self.backoff = backoff or Backoff()

    async def stream(self, text: str, sample_rate: int) -> AsyncIterator[bytes]:
        if self.fallback is None or not self.backoff.waiting():
            chunks = watched(self.primary.stream(text, sample_rate), self.limits, self.name)
            try:
                first = await anext(chunks)
            except (SynthesisFailed, StopAsyncIteration) as exc:
                await chunks.aclose()
                self._primary_failed(exc if isinstance(exc, SynthesisFailed) else None, text)
            else:
                self.backoff.succeeded()
                try:
                    yield first
                    async for chunk in chunks:
                        yield chunk
                except SynthesisFailed:
                    if self.fallback is not None:
                        self.backoff.failed()  # what follows (the apology too) is the fallback's
                    raise
                finally:
                    await chunks.aclose()
                return
        assert self.fallback is not None
        chunks = watched(self.fallback.stream(text, sample_rate), self.limits, f"{self.name} fallback")
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            await chunks.aclose()

    def _primary_failed(self, error: SynthesisFailed | None, text: str) -> None:
        reason = str(error) if error is not None else f"{self.name}: no audio for {len(text)} characters of text"
        if self.fallback is None:
            raise SynthesisFailed(reason)
        delay = self.backoff.failed()
        log.error("synthesis failed (%s); the fallback voice speaks, %s retried in %.0f s", reason, self.name, delay)


async def watched(chunks: AsyncIterator[bytes], limits: SynthesisLimits, name: str) -> AsyncGenerator[bytes, None]:
    """`chunks` with a deadline on the first chunk and between chunks; errors become SynthesisFailed."""
    timeout = limits.first_chunk_s
    try:
        while True:
            try:
                async with asyncio.timeout(timeout):
                    chunk = await anext(chunks)
            except StopAsyncIteration:
                return
            except TimeoutError:
                which = "first audio" if timeout == limits.first_chunk_s else "next chunk"
                raise SynthesisFailed(f"{name}: no {which} within {timeout:.1f} s") from None
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                raise SynthesisFailed(f"{name}: {type(exc).__name__}: {exc}") from exc
            timeout = limits.next_chunk_s
            yield chunk
    finally:
        await close_within(chunks, limits.cleanup_s, name)


async def close_within(chunks: AsyncIterator[bytes], seconds: float, name: str) -> None:
    """Close an engine's stream, waiting at most `seconds` (a stuck engine must not hold a turn)."""
    aclose = getattr(chunks, "aclose", None)
    if aclose is None:
        return
    try:
        async with asyncio.timeout(seconds):
            await aclose()
    except TimeoutError:
        log.warning("%s: stream did not close within %.1f s; left behind", name, seconds)
    except Exception as exc:  # noqa: BLE001 - closing a broken stream may raise its error again
        log.debug("%s: error while closing its stream: %s", name, exc)
