"""Engine pools: reuse, shrinking back after bursts, thread safety, failures while disposing."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from parley import native_memory
from parley.pool import EnginePool, PoolReaper


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Engine:
    def __init__(self, number: int) -> None:
        self.number = number
        self.disposed = False


def make_pool(clock: Clock, *, warm: int = 2, max_idle: int = 16, idle_s: float = 60.0) -> EnginePool[Engine]:
    counter = iter(range(10_000))

    def dispose(engine: Engine) -> None:
        engine.disposed = True

    return EnginePool(
        "test", lambda: Engine(next(counter)), dispose=dispose, max_idle=max_idle, warm=warm, idle_s=idle_s, clock=clock
    )


def burst(pool: EnginePool[Engine], calls: int) -> list[Engine]:
    engines = [pool.acquire() for _ in range(calls)]
    for engine in engines:
        pool.release(engine)
    return engines


def test_idle_instances_beyond_warm_are_released_after_the_idle_time() -> None:
    clock = Clock()
    pool = make_pool(clock, warm=2, idle_s=60)
    pool.warm(2)
    engines = burst(pool, 10)
    assert pool.figures() == {"created": 10, "disposed": 0, "idle": 10, "in_use": 0}

    clock.now += 59
    assert pool.shrink() == 0  # not idle long enough
    clock.now += 2
    assert pool.shrink() == 8
    assert pool.figures() == {"created": 10, "disposed": 8, "idle": 2, "in_use": 0}
    assert sum(engine.disposed for engine in engines) == 8

    clock.now += 3600
    assert pool.shrink() == 0  # never below the warm count
    assert pool.idle == 2


def test_recently_used_instances_are_kept_and_reused_first() -> None:
    clock = Clock()
    pool = make_pool(clock, warm=0, idle_s=60)
    old = burst(pool, 4)
    clock.now += 50
    recent = pool.acquire()
    pool.release(recent)  # one in use again: its idle time starts over
    clock.now += 20
    assert pool.shrink() == 3
    assert pool.idle == 1
    assert pool.acquire() is recent and not recent.disposed
    assert sum(engine.disposed for engine in old) == 3


def test_instances_in_use_are_never_released() -> None:
    clock = Clock()
    pool = make_pool(clock, warm=0, idle_s=1)
    held = [pool.acquire() for _ in range(3)]
    clock.now += 100
    assert pool.shrink() == 0
    assert pool.in_use == 3 and not any(engine.disposed for engine in held)
    for engine in held:
        pool.release(engine)
    assert pool.idle == 3


def test_dispose_errors_are_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()

    def broken(engine: Engine) -> None:
        raise RuntimeError(f"engine {engine.number} will not close")

    pool: EnginePool[Engine] = EnginePool("broken", lambda: Engine(0), dispose=broken, max_idle=1, clock=clock)
    a, b = pool.acquire(), pool.acquire()
    with caplog.at_level(logging.ERROR, logger="parley.pool"):
        pool.release(a)
        pool.release(b)  # beyond max_idle: disposed, and the dispose fails
        clock.now += 120
        assert pool.shrink() == 1  # the idle one: disposed (failing) too
        pool.close()
    failures = [record for record in caplog.records if "disposing of an instance failed" in record.getMessage()]
    assert len(failures) == 2
    assert pool.figures()["disposed"] == 2 and pool.idle == 0


def test_a_failing_recycle_discards_the_instance(caplog: pytest.LogCaptureFixture) -> None:
    def recycle(engine: Engine) -> None:
        raise ValueError("cannot reset")

    disposed: list[Engine] = []
    pool: EnginePool[Engine] = EnginePool("r", lambda: Engine(0), recycle=recycle, dispose=disposed.append)
    engine = pool.acquire()
    with caplog.at_level(logging.ERROR, logger="parley.pool"):
        pool.release(engine)
    assert disposed == [engine] and pool.idle == 0 and pool.in_use == 0
    assert "could not reset an instance" in caplog.text


def test_concurrent_acquire_release_and_shrink_keep_the_counts_right() -> None:
    pool: EnginePool[Engine] = EnginePool("threads", lambda: Engine(0), max_idle=4, warm=1, idle_s=0.0)
    errors: list[BaseException] = []
    stop = threading.Event()

    def caller() -> None:
        try:
            for _ in range(300):
                engine = pool.acquire()
                time.sleep(0)
                pool.release(engine)
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    def reaper() -> None:
        while not stop.is_set():
            pool.shrink()

    threads = [threading.Thread(target=caller) for _ in range(8)]
    shrinker = threading.Thread(target=reaper)
    shrinker.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stop.set()
    shrinker.join()
    assert not errors
    figures = pool.figures()
    assert figures["in_use"] == 0
    assert figures["created"] - figures["disposed"] == figures["idle"]
    assert 1 <= figures["idle"] <= 4


def test_a_failing_create_does_not_count_as_in_use() -> None:
    def create() -> Engine:
        raise OSError("model file missing")

    pool: EnginePool[Engine] = EnginePool("fails", create)
    with pytest.raises(OSError):
        pool.acquire()
    assert pool.figures() == {"created": 0, "disposed": 0, "idle": 0, "in_use": 0}


def test_the_reaper_shrinks_pools_and_trims_after_calls_ended() -> None:
    clock = Clock()
    pool = make_pool(clock, warm=1, idle_s=5)
    burst(pool, 3)
    reaper = PoolReaper([pool], interval_s=0.05)
    trims = native_memory.trims
    assert reaper.run_once() == 0  # nothing idle long enough, but calls ended: trimmed
    assert native_memory.trims == trims + (1 if native_memory.available() else 0)
    assert reaper.run_once() == 0 and native_memory.trims == trims + (1 if native_memory.available() else 0)
    clock.now += 10
    reaper.start()
    deadline = time.monotonic() + 5
    while pool.idle > 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    reaper.stop()
    assert pool.idle == 1 and pool.figures()["disposed"] == 2


def test_the_reaper_survives_a_pool_that_fails_to_shrink(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(EnginePool[Engine]):
        def shrink(self) -> int:
            raise RuntimeError("boom")

    clock = Clock()
    good = make_pool(clock, warm=0, idle_s=1)
    burst(good, 2)
    clock.now += 5
    with caplog.at_level(logging.ERROR, logger="parley.pool"):
        assert PoolReaper([Broken("broken", lambda: Engine(0)), good]).run_once() == 2
    assert "broken pool: shrinking failed" in caplog.text


@pytest.mark.skipif(not native_memory.available(), reason="glibc only")
def test_malloc_figures_and_trim_on_glibc() -> None:
    figures = native_memory.malloc_figures()
    assert figures["malloc_in_use_mb"] > 0  # type: ignore[operator]
    assert native_memory.trim() >= 0.0
    assert native_memory.malloc_figures()["malloc_trims"] == figures["malloc_trims"] + 1  # type: ignore[operator]
