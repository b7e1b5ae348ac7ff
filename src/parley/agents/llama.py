"""An in-process llama.cpp chat model, shaped like the part of `openai.AsyncOpenAI` LlmAgent uses.

    client = LlamaCppClient("qwen2.5-0.5b")            # or a path to any .gguf
    stream = await client.chat.completions.create(model="local", messages=[...], stream=True)
    async for chunk in stream: ...                       # openai ChatCompletionChunk objects
    await stream.close()                                 # barge-in: returns at once

Needs the optional extra (`pip install 'parley[llama]'`); llama_cpp is imported only when a client
is built, so the rest of parley works without it.

Why it is built this way:

- A `llama_cpp.Llama` is not thread-safe and holds one KV cache, so each client owns one worker
  thread that runs generations one at a time, first come first served. Callers waiting their turn
  await an asyncio queue: the event loop is never blocked, neither by a generation nor by a wait.
- Tokens cross to the event loop with `loop.call_soon_threadsafe`, one chunk per token (llama.cpp
  releases the GIL while it computes, so the loop keeps running between tokens).
- `close()` only sets a flag and returns. The worker checks it before handing over each chunk and
  then closes llama-cpp-python's generator, so the native loop stops after the token being computed
  and the model is free for the next caller about one token later. A prompt being evaluated is
  not interrupted (llama.cpp offers no safe hook for that from Python); with the prefix cache the
  prompt of a follow-up turn is short.
- Errors in the worker come out of `__anext__` as `LlamaCppError`; every generation ends with
  either a sentinel or an error, so a reader never waits forever.
- Tools: only with `chat_format="chatml-function-calling"` and a `tool_choice` naming one function
  (streamed as tool_calls deltas). Otherwise they are dropped with a one-time warning; see
  TOOL_CALLING_CHAT_FORMATS for why 'auto' is not offered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, Self

from openai.types.chat import ChatCompletionChunk

from parley.agents.llama_models import PACKAGED_MODELS, known_models_help, resolve_model

__all__ = [
    "PACKAGED_MODELS",
    "TOOL_CALLING_CHAT_FORMATS",
    "LlamaCppClient",
    "LlamaCppError",
    "LlamaCppStream",
    "known_models_help",
    "resolve_model",
]

log = logging.getLogger(__name__)

INSTALL_HINT = "install the extra: pip install 'parley[llama]'"

TOOL_CALLING_CHAT_FORMATS = frozenset({"chatml-function-calling"})
"""llama-cpp-python chat handlers that turn `tools` into streamed tool_calls deltas (for ChatML
models such as SmolLM2 and Qwen2.5). Measured with 0.3.36: only a forced `tool_choice` (one named
function) streams correctly; 'auto' either raises "Automatic streaming tool choice is not
supported" or constrains a plain answer to the function-name grammar, so it is not passed on."""

_PASSED_THROUGH = ("temperature", "max_tokens", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty")
"""Request fields handed to llama-cpp-python as they are (same names, same meaning)."""

_IGNORED_QUIETLY = frozenset(
    {
        "model",
        "stream",
        "stream_options",
        "user",
        "n",
        "timeout",
        "extra_headers",
        "extra_query",
        "extra_body",
        "parallel_tool_calls",
    }
)
"""OpenAI request fields with nothing to do in-process (n must be 1, which is what we do)."""

_END = object()  # end of a generation, on the chunk queue

_params_patch_lock = threading.Lock()


class LlamaCppError(RuntimeError):
    """A generation failed inside llama.cpp / llama-cpp-python (or the client was closed)."""


# --------------------------------------------------------------------------------------------
# Loading


def _import_llama_cpp() -> ModuleType:
    try:
        import llama_cpp
    except ImportError as exc:
        raise ValueError(f"the llama-cpp backend needs llama-cpp-python: {INSTALL_HINT}") from exc
    return llama_cpp


@contextlib.contextmanager
def _model_params_overridden(llama_cpp: ModuleType, **fields: Any) -> Iterator[None]:
    """Set llama_model_params fields that `Llama()` does not expose as arguments.

    Llama() starts from `llama_model_default_params()`, so that function is wrapped while the model
    loads (under a lock: the wrapper is process-wide). Fields unknown to this build are skipped.
    """
    low_level = llama_cpp.llama_cpp
    known = {name for name, _ in low_level.llama_model_params._fields_}
    wanted = {name: value for name, value in fields.items() if name in known}
    original = low_level.llama_model_default_params

    def with_overrides() -> Any:
        params = original()
        for name, value in wanted.items():
            setattr(params, name, value)
        return params

    with _params_patch_lock:
        low_level.llama_model_default_params = with_overrides
        try:
            yield
        finally:
            low_level.llama_model_default_params = original


def _load_llama(
    path: Path,
    *,
    n_threads: int,
    n_ctx: int,
    chat_format: str | None,
    weight_repacking: bool,
    verbose: bool,
    options: dict[str, Any],
) -> Any:
    llama_cpp = _import_llama_cpp()
    # Weight repacking ("extra buffer types") also enables llama.cpp's AMX kernels when the CPU
    # advertises AMX. Seen on a Firecracker VM that advertises AMX without enabling it for the
    # guest: the first matmul dies with SIGSEGV (ldtilecfg) and takes the whole server down. What
    # repacking buys (faster matmuls for some quantisation types) is not worth that risk by
    # default; hosts known to be fine can ask for it.
    with _model_params_overridden(llama_cpp, use_extra_bufts=weight_repacking):
        return llama_cpp.Llama(
            model_path=str(path),
            n_threads=n_threads,
            n_threads_batch=n_threads,  # its default is every core: keep to our budget
            n_ctx=n_ctx,
            chat_format=chat_format,
            verbose=verbose,
            **options,
        )


# --------------------------------------------------------------------------------------------
# One generation, shared by the worker thread and the stream


class _Generation:
    """A queued request: its arguments, the queue its chunks arrive on, and its stop flag."""

    def __init__(self, arguments: dict[str, Any], model_name: str, loop: asyncio.AbstractEventLoop) -> None:
        self.arguments = arguments
        self.model_name = model_name
        self.loop = loop
        self.items: asyncio.Queue[Any] = asyncio.Queue()
        self.released: asyncio.Future[float] = loop.create_future()
        """Resolves to time.monotonic() when the worker is done with this generation."""
        self._stop = threading.Event()
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def request_stop(self) -> None:
        self._stop.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    # ------------------------------------------------------------------ on the worker thread
    def run(self, llama: Any, closing: threading.Event) -> None:
        outcome: Any = _END
        try:
            if closing.is_set():
                outcome = LlamaCppError("the llama.cpp client was closed")
            elif not self.stop_requested:  # closed while it waited its turn: nothing to do
                self._stream_chunks(llama, closing)
        except Exception as exc:  # noqa: BLE001 - whatever failed, the reader must hear of it
            outcome = LlamaCppError(f"llama.cpp generation failed: {type(exc).__name__}: {exc}")
            outcome.__cause__ = exc
        finally:
            released_t = time.monotonic()
            self._deliver(outcome)
            self._call_in_loop(_resolve, self.released, released_t)

    def _stream_chunks(self, llama: Any, closing: threading.Event) -> None:
        chunks = llama.create_chat_completion(**self.arguments, stream=True)
        try:
            for raw in chunks:
                if self.stop_requested or closing.is_set():
                    break
                self._deliver(_to_chunk(raw, self))
        finally:
            # Closing the generator raises GeneratorExit at its yield: llama-cpp-python stops
            # before evaluating another token (a plain `break` would leave that to the GC).
            close = getattr(chunks, "close", None)
            if close is not None:
                close()

    def _deliver(self, item: Any) -> None:
        self._call_in_loop(self.items.put_nowait, item)

    def _call_in_loop(self, function: Callable[..., Any], *args: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(function, *args)
        except RuntimeError:  # the caller's event loop is closed: nobody is listening any more
            self.request_stop()


def _resolve(future: asyncio.Future[float], value: float) -> None:
    if not future.done():
        future.set_result(value)


# --------------------------------------------------------------------------------------------
# Chunks: llama-cpp-python's OpenAI-shaped dicts -> openai's own types


def _to_chunk(raw: Mapping[str, Any], generation: _Generation) -> ChatCompletionChunk:
    """Validate a llama-cpp-python stream chunk as an openai ChatCompletionChunk, filling the
    fields it may leave out (and naming the model as the request did, like OpenAI does)."""
    data = dict(raw)
    data["id"] = data.get("id") or generation.id
    data["created"] = int(data.get("created") or generation.created)
    data["model"] = generation.model_name
    data["object"] = "chat.completion.chunk"
    data["choices"] = [_choice(choice, position) for position, choice in enumerate(data.get("choices") or [])]
    return ChatCompletionChunk.model_validate(data)


def _choice(raw: Mapping[str, Any], position: int) -> dict[str, Any]:
    choice = dict(raw)
    if choice.get("index") is None:
        choice["index"] = position
    delta = dict(choice.get("delta") or {})
    if delta.get("tool_calls"):
        delta["tool_calls"] = [
            {**call, "index": call["index"] if call.get("index") is not None else number}
            for number, call in enumerate(delta["tool_calls"])
        ]
    choice["delta"] = delta
    return choice


# --------------------------------------------------------------------------------------------
# The worker thread


class _GenerationWorker:
    """The only thread that touches the Llama object: runs queued generations in order."""

    def __init__(self, llama: Any, name: str) -> None:
        self._llama = llama
        self._jobs: queue.SimpleQueue[_Generation | None] = queue.SimpleQueue()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def closed(self) -> bool:
        return self._closing.is_set()

    def submit(self, generation: _Generation) -> None:
        if self._closing.is_set():
            raise LlamaCppError("the llama.cpp client is closed")
        self._jobs.put(generation)

    def stop(self, timeout: float | None) -> bool:
        """Finish the running generation at its next token, fail the queued ones, end the thread.
        Returns whether the thread ended within `timeout`."""
        self._closing.set()
        self._jobs.put(None)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while (generation := self._jobs.get()) is not None:
            generation.run(self._llama, self._closing)


# --------------------------------------------------------------------------------------------
# The stream handed to the caller


class LlamaCppStream:
    """The chunks of one chat completion, like `openai.AsyncStream[ChatCompletionChunk]`."""

    def __init__(self, generation: _Generation) -> None:
        self._generation = generation
        self._finished = False
        self.close_requested_t: float | None = None
        """time.monotonic() of the first close() (barge-in measurements)."""

    def __aiter__(self) -> LlamaCppStream:
        return self

    async def __anext__(self) -> ChatCompletionChunk:
        if self._finished:
            raise StopAsyncIteration
        item = await self._generation.items.get()
        if item is _END:
            self._finished = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._finished = True
            raise item
        return item

    async def close(self) -> None:
        """Stop the generation. Returns at once; the worker drops the model at its next token."""
        if self.close_requested_t is None:
            self.close_requested_t = time.monotonic()
        self._finished = True
        self._generation.request_stop()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def wait_released(self) -> float:
        """Wait until the worker is done with this generation; returns that time.monotonic()."""
        return await asyncio.shield(self._generation.released)

    @property
    def released_t(self) -> float | None:
        released = self._generation.released
        return released.result() if released.done() else None

    def __del__(self) -> None:
        # Dropped without close() (a consumer that just stopped reading): stop generating anyway.
        generation = getattr(self, "_generation", None)
        if generation is not None:
            generation.request_stop()


# --------------------------------------------------------------------------------------------
# The client


class _Completions:
    def __init__(self, client: LlamaCppClient) -> None:
        self._client = client

    async def create(self, **request: Any) -> LlamaCppStream:
        return self._client._start(request)


class _Chat:
    def __init__(self, client: LlamaCppClient) -> None:
        self.completions = _Completions(client)


class LlamaCppClient:
    """A GGUF model served in-process; `client.chat.completions.create(...)` streams like OpenAI.

    Build it at startup (loading takes a fraction of a second to a few seconds) and share it:
    requests from every call queue for the one model. `model` is a .gguf path or a packaged model
    name (see `resolve_model`).
    """

    def __init__(
        self,
        model: str | os.PathLike[str],
        *,
        n_threads: int = 2,
        n_ctx: int = 4096,
        chat_format: str | None = None,
        weight_repacking: bool = False,
        model_dir: Path | None = None,
        verbose: bool = False,
        **llama_options: Any,
    ) -> None:
        """`chat_format` None uses the chat template inside the GGUF; "chatml-function-calling"
        enables forced tool calls. `llama_options` go to `llama_cpp.Llama` as they are."""
        _import_llama_cpp()  # fail with the install hint before touching any file
        self.model_path = resolve_model(model, cache_dir=model_dir)
        self.model_name = _display_name(model, self.model_path)
        self.chat_format = chat_format
        started = time.perf_counter()
        self.llama = _load_llama(
            self.model_path,
            n_threads=n_threads,
            n_ctx=n_ctx,
            chat_format=chat_format,
            weight_repacking=weight_repacking,
            verbose=verbose,
            options=llama_options,
        )
        self.load_seconds = time.perf_counter() - started
        self.chat = _Chat(self)
        self._worker = _GenerationWorker(self.llama, name=f"llama-cpp:{self.model_name}")
        self._warned: set[str] = set()
        log.info(
            "llama.cpp model %s loaded in %.2f s (%d threads, context %d)",
            self.model_path,
            self.load_seconds,
            n_threads,
            n_ctx,
        )

    # ------------------------------------------------------------------ requests
    def _start(self, request: dict[str, Any]) -> LlamaCppStream:
        if not request.get("stream", False):
            raise ValueError("LlamaCppClient only streams: pass stream=True")
        generation = _Generation(
            self._arguments(request), str(request.get("model") or self.model_name), asyncio.get_running_loop()
        )
        self._worker.submit(generation)
        return LlamaCppStream(generation)

    def _arguments(self, request: dict[str, Any]) -> dict[str, Any]:
        """llama-cpp-python's create_chat_completion arguments for an OpenAI-style request."""
        if "messages" not in request:
            raise ValueError("a chat completion needs messages")
        arguments: dict[str, Any] = {"messages": [_message(m) for m in request["messages"]]}
        for name in _PASSED_THROUGH:
            if request.get(name) is not None:
                arguments[name] = request[name]
        if request.get("max_completion_tokens") is not None and "max_tokens" not in arguments:
            arguments["max_tokens"] = request["max_completion_tokens"]
        arguments |= self._tool_arguments(request.get("tools"), request.get("tool_choice"))
        self._warn_about_unknown(request)
        return arguments

    def _tool_arguments(self, tools: Any, tool_choice: Any) -> dict[str, Any]:
        if not tools or tool_choice == "none":
            return {}
        forced = isinstance(tool_choice, Mapping) and tool_choice.get("type") == "function"
        if self.chat_format in TOOL_CALLING_CHAT_FORMATS and forced:
            return {"tools": list(tools), "tool_choice": dict(tool_choice)}
        if self.chat_format in TOOL_CALLING_CHAT_FORMATS:
            self._warn_once(
                "tool-choice",
                "llama.cpp: tools are ignored unless tool_choice names "
                f"one function (tool_choice {tool_choice!r} cannot stream with "
                f"llama-cpp-python's {self.chat_format} handler)",
            )
        else:
            self._warn_once(
                "tools",
                "llama.cpp: tools are ignored: chat_format "
                f"{self.chat_format!r}"
                " has no function calling (use chat_format='chatml-function-calling'"
                " and a tool_choice naming one function)",
            )
        return {}

    def _warn_about_unknown(self, request: dict[str, Any]) -> None:
        handled = {"messages", "max_completion_tokens", "tools", "tool_choice", *_PASSED_THROUGH, *_IGNORED_QUIETLY}
        unknown = sorted(name for name in request if name not in handled)
        if unknown:
            self._warn_once(f"unknown:{unknown}", f"llama.cpp: ignoring request fields {unknown}")

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)

    # ------------------------------------------------------------------ lifetime
    def shutdown(self, timeout: float | None = 10.0) -> None:
        """Stop the worker (the running generation at its next token) and free the model."""
        if self._worker.closed:
            return
        if self._worker.stop(timeout):
            self.llama.close()
        else:
            log.warning("llama.cpp worker still busy after %s s: model left loaded", timeout)

    async def close(self) -> None:
        """Like AsyncOpenAI.close(): release everything (without blocking the event loop)."""
        await asyncio.to_thread(self.shutdown)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def _display_name(model: str | os.PathLike[str], path: Path) -> str:
    """The packaged model's name as given, else the file name without .gguf."""
    name = os.fspath(model).strip()
    return name if name.lower() in PACKAGED_MODELS else path.stem


def _message(message: Mapping[str, Any]) -> dict[str, Any]:
    """A chat message as llama-cpp-python's Jinja templates expect it: content always a string
    (OpenAI allows None beside tool_calls and lists of text parts, templates concatenate it)."""
    copy = dict(message)
    content = copy.get("content")
    if content is None:
        copy["content"] = ""
    elif not isinstance(content, str):
        copy["content"] = "".join(part.get("text", "") for part in content if isinstance(part, Mapping))
    return copy
