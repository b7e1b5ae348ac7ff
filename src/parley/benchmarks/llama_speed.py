"""How fast an in-process llama.cpp model is on this machine: load time, first token (cold and with
the system prompt cached), tokens per second, how quickly a stream closes at a barge-in, and how
late the event loop runs while it generates.

    python -m parley.benchmarks.llama_speed MODEL [--threads N]

MODEL is a .gguf path or a packaged model name (needs the `llama` extra).
"""

from __future__ import annotations

import asyncio
import time

from parley.agents.llama import PACKAGED_MODELS, LlamaCppClient, LlamaCppError, LlamaCppStream, resolve_model
from parley.agents.llm import DEFAULT_SYSTEM_PROMPT


async def _first_token(client: LlamaCppClient, question: str, max_tokens: int) -> tuple[LlamaCppStream, float, float]:
    """Open a stream and read up to its first content chunk: (stream, its time, the start time)."""
    # The system prompt a phone call really sends.
    messages = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, {"role": "user", "content": question}]
    started = time.monotonic()
    stream = await client.chat.completions.create(
        model=client.model_name, messages=messages, stream=True, max_tokens=max_tokens
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            return stream, time.monotonic(), started
    raise LlamaCppError("the model answered nothing")


async def _measure_stream(client: LlamaCppClient, question: str) -> dict[str, float]:
    stream, first_t, started = await _first_token(client, question, 200)
    tokens = 1
    async for chunk in stream:
        tokens += bool(chunk.choices and chunk.choices[0].delta.content)
    elapsed = time.monotonic() - first_t
    return {
        "ttft_s": first_t - started,
        "tokens": tokens,
        "tokens_per_s": (tokens - 1) / elapsed if elapsed > 0 else float("nan"),
    }


async def _measure_close(client: LlamaCppClient) -> dict[str, float]:
    stream, _, _ = await _first_token(client, "Tell me a long story about a cat.", 400)
    for _ in range(10):  # well into decoding, as at a barge-in
        await anext(stream)
    called = time.monotonic()
    await stream.close()
    returned = time.monotonic()
    released = await stream.wait_released()
    return {"close_call_ms": (returned - called) * 1e3, "released_ms": (released - called) * 1e3}


async def _loop_lags(stop: asyncio.Event) -> list[float]:
    """How late the event loop was for each 1 ms timer while generations ran."""
    lags = []
    while not stop.is_set():
        before = time.monotonic()
        await asyncio.sleep(0.001)
        lags.append(time.monotonic() - before - 0.001)
    return sorted(lags)


async def _benchmark(model: str, threads: int) -> None:
    import psutil

    process = psutil.Process()
    rss_before = process.memory_info().rss
    resolve_started = time.perf_counter()
    resolve_model(model)
    resolve_s = time.perf_counter() - resolve_started
    client = LlamaCppClient(model, n_threads=threads)
    print(
        f"model {client.model_path} ({client.model_path.stat().st_size / 1e6:.0f} MB), "
        f"{threads} threads: resolve {resolve_s:.2f} s, load {client.load_seconds:.2f} s, "
        f"RSS +{(process.memory_info().rss - rss_before) / 1e6:.0f} MB after load"
    )
    stop = asyncio.Event()
    lags = asyncio.create_task(_loop_lags(stop))
    # cold: the system prompt and the question are evaluated; warm: the system prompt is in the
    # KV cache (llama-cpp-python reuses the longest common prefix), as in a call's later turns.
    questions = {"cold": "Tell me a long story about a dog.", "warm": "Describe a walk through Paris in detail."}
    for run, question in questions.items():
        figures = await _measure_stream(client, question)
        print(
            f"  {run}: first token {figures['ttft_s'] * 1e3:.0f} ms, "
            f"{figures['tokens_per_s']:.1f} tokens/s over {figures['tokens']:.0f} tokens"
        )
    closes = [await _measure_close(client) for _ in range(5)]
    stop.set()
    print(
        "  close(): returns in "
        + ", ".join(f"{c['close_call_ms']:.3f}" for c in closes)
        + " ms; model free after "
        + ", ".join(f"{c['released_ms']:.1f}" for c in closes)
        + " ms"
    )
    lag = await lags
    print(
        f"  event loop late by: median {lag[len(lag) // 2] * 1e3:.2f} ms, p99 "
        f"{lag[int(len(lag) * 0.99)] * 1e3:.1f} ms, max {lag[-1] * 1e3:.1f} ms; "
        f"RSS {process.memory_info().rss / 1e6:.0f} MB (process total)"
    )
    await client.close()


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Measure an in-process llama.cpp model.")
    parser.add_argument("model", help="a .gguf path or " + " / ".join(PACKAGED_MODELS))
    parser.add_argument("--threads", type=int, default=2)
    arguments = parser.parse_args()
    asyncio.run(_benchmark(arguments.model, arguments.threads))


if __name__ == "__main__":
    main()
