"""An agent backed by an OpenAI-compatible chat model, streamed clause by clause.

Works with OpenAI, Azure OpenAI (API key or Entra ID token) and any server speaking the same
chat-completions API (Ollama, vLLM, llama.cpp server...). What matters on a phone line:

- **Speak early**: the reply is streamed; each clause is yielded as soon as it is complete, so the
  first clause is synthesised and played while the model is still writing the rest.
- **Stop at once**: when the caller barges in, the consuming task is cancelled (or the generator
  closed); the HTTP stream is closed right away instead of being read to its end, so the server
  stops generating (and billing) and the connection is not held.
- **Never leave the caller in silence**: no first token within `first_token_timeout_s` (or an
  error before it) -> the fallback sentence is spoken. Retries (429, 5xx, connection errors) only
  happen before the first token: after it, the caller has heard part of an answer and a retried
  answer would start over, so a failure ends the reply with what was said.
- **History is what the caller heard**: the conversation keeps the user turns and the assistant's
  text; after a barge-in, `truncate_last_reply(heard_text)` cuts the last answer to what was
  actually played, so the model does not believe it said things the caller never heard.

- **Tools**: the agent's tools (parley.agents.tools) are offered to the model; their calls are
  run (concurrently, each with a timeout) and answered, then the model continues, at most
  `max_tool_rounds` times per turn (the last round forbids tools so the caller gets an answer).
  A tool may end the call, transfer it or hand the caller to another agent of the scenario.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
import random
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import openai
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from parley.agents.prompt import CallSession, PromptTemplate
from parley.agents.speakable import SpeakableStream, clean_inline
from parley.agents.tools import Toolbox
from parley.protocols import AgentFactory, AgentOutput, CallContext, Say, UserInput
from parley.voice.clauses import ClauseBuffer

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator

log = logging.getLogger(__name__)

DEFAULT_SYSTEM_PROMPT = (
    "You are a friendly assistant answering a phone call. Your words are converted to speech: "
    "answer briefly, in one to three short spoken sentences, in plain text without markdown, "
    "lists, links or emoji. Ask one question at a time."
)
DEFAULT_FALLBACK = "Sorry, I'm having trouble answering right now. Could you say that again?"
COMPATIBLE_DUMMY_KEY = "not-needed"
"""Local servers (Ollama, llama.cpp) ignore the key, but the client refuses to run without one."""
ENTRA_SCOPE = "https://cognitiveservices.azure.com/.default"
MAX_HISTORY_MESSAGES = 60  # sent per request, besides the system prompt (about 15-30 exchanges)
KEEPALIVE_S = 60.0
"""How long an idle connection to the model's server stays open. The SDK's default (httpx's 5 s)
closed it between most turns of a call (the reply is played, the caller speaks), so the next
request paid DNS, TCP and TLS again. A connection the server closed sooner is noticed when taken
from the pool; one closed just as a request goes out fails before the first token and is retried."""

TokenProvider = Callable[[], "str | Awaitable[str]"]
Outcome = Literal["pending", "completed", "first_token_timeout", "total_timeout", "failed", "cancelled", "greeting"]


class LlmConfig(BaseModel):
    """Which model to call, how, and how long a caller may be kept waiting."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    provider: Literal["openai", "azure", "compatible", "llama-cpp"] = "openai"
    model: str = Field(
        default="gpt-4o-mini",
        min_length=1,
        description="Model name; for Azure the deployment; for llama-cpp a GGUF path or a packaged model name.",
    )
    base_url: str | None = Field(
        default=None, description="Compatible servers: e.g. http://localhost:11434/v1 (Ollama)."
    )
    api_key: SecretStr | None = Field(
        default=None, description="Default: OPENAI_API_KEY (AZURE_OPENAI_API_KEY for Azure)."
    )
    azure_endpoint: str | None = Field(default=None, description="Default: AZURE_OPENAI_ENDPOINT.")
    api_version: str | None = Field(default=None, description="Azure API version; default OPENAI_API_VERSION.")
    azure_ad_token: SecretStr | None = Field(default=None, description="Azure: an Entra ID access token.")
    azure_ad_token_provider: TokenProvider | None = Field(
        default=None, exclude=True, description="Azure: returns (or awaits) a fresh Entra ID token."
    )
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, description="None: the server's default.")
    threads: int = Field(default=2, ge=1, le=64, description="llama-cpp: CPU threads for generation.")
    max_tokens: int | None = Field(default=None, gt=0)
    first_token_timeout_s: float = Field(default=4.0, gt=0.0)
    total_timeout_s: float = Field(default=20.0, gt=0.0)
    max_retries: int = Field(default=2, ge=0, description="Before the first token only.")
    retry_backoff_s: float = Field(default=0.25, ge=0.0, description="First retry delay; doubles, jittered.")
    fallback_text: str = Field(default=DEFAULT_FALLBACK, min_length=1)
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    greeting: str | None = None

    @model_validator(mode="after")
    def _check_provider_fields(self) -> LlmConfig:
        credentials = [self.api_key, self.azure_ad_token, self.azure_ad_token_provider]
        if sum(c is not None for c in credentials) > 1:
            raise ValueError("give only one of api_key, azure_ad_token, azure_ad_token_provider")
        azure_only = {
            "azure_endpoint": self.azure_endpoint,
            "api_version": self.api_version,
            "azure_ad_token": self.azure_ad_token,
            "azure_ad_token_provider": self.azure_ad_token_provider,
        }
        if self.provider != "azure":
            misplaced = [name for name, value in azure_only.items() if value is not None]
            if misplaced:
                raise ValueError(f"{', '.join(misplaced)} only apply to provider 'azure'")
        elif self.base_url is not None:
            raise ValueError("provider 'azure' takes azure_endpoint, not base_url")
        if self.provider == "compatible" and not self.base_url:
            raise ValueError("provider 'compatible' needs base_url (e.g. http://localhost:11434/v1)")
        return self


# --------------------------------------------------------------------------------------------
# Client


def build_client(config: LlmConfig) -> openai.AsyncOpenAI | openai.AsyncAzureOpenAI:
    """The SDK client for `config` (an AsyncAzureOpenAI for Azure). Raises ValueError if unusable.

    The SDK's own retries are off: they would retry after the first token too and ignore our
    first-token budget. Its HTTP timeout is only a backstop behind our own timeouts.
    """
    timeout = openai.Timeout(config.total_timeout_s, connect=min(config.first_token_timeout_s, config.total_timeout_s))
    if config.provider == "azure":
        return _azure_client(config, timeout)
    if config.provider == "llama-cpp":
        return _llama_client(config)
    api_key = _secret(config.api_key) or os.environ.get("OPENAI_API_KEY")
    if config.provider == "compatible":
        api_key = api_key or COMPATIBLE_DUMMY_KEY
    elif not api_key:
        raise ValueError(
            "provider 'openai' needs api_key (or the OPENAI_API_KEY variable); an agent written for the"
            " in-process model (pizza-local) needs PARLEY_LLM_PROVIDER=llama-cpp and"
            " PARLEY_LLM_MODEL=qwen2.5-0.5b instead, with the llama extra (`make llama`)"
        )
    return openai.AsyncOpenAI(
        api_key=api_key, base_url=config.base_url, timeout=timeout, max_retries=0, http_client=_http_client(timeout)
    )


def _http_client(timeout: openai.Timeout) -> Any:
    """The SDK's own HTTP client defaults, with idle connections kept KEEPALIVE_S."""
    http = _http_module()
    limits = http.Limits(max_connections=1000, max_keepalive_connections=100, keepalive_expiry=KEEPALIVE_S)
    return openai.DefaultAsyncHttpxClient(timeout=timeout, limits=limits)


def _azure_client(config: LlmConfig, timeout: openai.Timeout) -> openai.AsyncAzureOpenAI:
    endpoint = config.azure_endpoint or os.environ.get("AZURE_OPENAI_ENDPOINT")
    if not endpoint:
        raise ValueError("provider 'azure' needs azure_endpoint (or AZURE_OPENAI_ENDPOINT)")
    api_version = config.api_version or os.environ.get("OPENAI_API_VERSION")
    if not api_version:
        raise ValueError("provider 'azure' needs api_version (or OPENAI_API_VERSION)")
    credential: dict[str, Any]
    if config.azure_ad_token_provider is not None:
        credential = {"azure_ad_token_provider": config.azure_ad_token_provider}
    elif config.azure_ad_token is not None:
        credential = {"azure_ad_token": _secret(config.azure_ad_token)}
    elif key := _secret(config.api_key) or os.environ.get("AZURE_OPENAI_API_KEY"):
        credential = {"api_key": key}
    elif token := os.environ.get("AZURE_OPENAI_AD_TOKEN"):
        credential = {"azure_ad_token": token}
    else:
        raise ValueError(
            "provider 'azure' needs api_key (or AZURE_OPENAI_API_KEY), azure_ad_token or "
            "azure_ad_token_provider (see entra_token_provider())"
        )
    return openai.AsyncAzureOpenAI(
        azure_endpoint=endpoint,
        api_version=api_version,
        azure_deployment=config.model,
        timeout=timeout,
        max_retries=0,
        http_client=_http_client(timeout),
        **credential,
    )


def _llama_client(config: LlmConfig) -> Any:
    """In-process llama.cpp (the optional `llama` extra): the same streaming interface, offline."""
    from parley.agents.llama import LlamaCppClient, resolve_model

    return LlamaCppClient(resolve_model(config.model), n_threads=config.threads)


def entra_token_provider(scope: str = ENTRA_SCOPE) -> TokenProvider:
    """An Entra ID token provider from azure-identity's DefaultAzureCredential (managed identity,
    workload identity, az login...). azure-identity is optional: imported only when asked for."""
    try:
        from azure.identity.aio import DefaultAzureCredential, get_bearer_token_provider
    except ImportError as exc:
        raise ValueError(
            "Entra ID authentication needs the azure-identity package (pip install azure-identity)"
        ) from exc
    provider: TokenProvider = get_bearer_token_provider(DefaultAzureCredential(), scope)
    return provider


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None


def _retryable(exc: BaseException) -> bool:
    """Worth another attempt: rate limits, server errors, connection trouble (incl. timeouts)."""
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code == 429 or exc.status_code >= 500
    return isinstance(exc, openai.APIConnectionError)


# --------------------------------------------------------------------------------------------
# The agent


@dataclass(eq=False)
class _Reply:
    """One completion request of a turn: its HTTP stream, the text received and said, its
    assistant message in history. A turn has more than one when the model calls tools."""

    started: float
    tools_allowed: bool = False
    entry: dict[str, Any] | None = None  # its assistant message, once there is text
    stream: Any = None  # openai.AsyncStream[ChatCompletionChunk] while open
    parts: list[str] = field(default_factory=list)  # every content delta received
    said: list[str] = field(default_factory=list)  # the spoken text of every Say yielded
    tool_calls: dict[int, dict[str, str]] = field(default_factory=dict)
    interrupted: bool = False  # truncate_last_reply() ran: the history entry is final
    outcome: Outcome = "pending"
    markdown: SpeakableStream = field(default_factory=SpeakableStream)
    clauses: ClauseBuffer = field(default_factory=ClauseBuffer)

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def absorb(self, chunk: Any) -> str:
        """Record one chat.completion.chunk; returns its content text ('' if it has none)."""
        # Azure sends content-filter chunks without choices; some servers send a usage chunk.
        choices = getattr(chunk, "choices", None) or []
        delta = getattr(choices[0], "delta", None) if choices else None
        if delta is None:
            return ""
        for call in getattr(delta, "tool_calls", None) or []:
            self._absorb_tool_call(call)
        text = getattr(delta, "content", None) or ""
        if text:
            self.parts.append(text)
        return text

    def _absorb_tool_call(self, call: Any) -> None:
        # Tool calls stream as fragments keyed by index: the id and name once, arguments in pieces.
        slot = self.tool_calls.setdefault(getattr(call, "index", 0) or 0, {"name": "", "arguments": ""})
        if getattr(call, "id", None):
            slot["id"] = call.id
        function = getattr(call, "function", None)
        if function is not None:
            slot["name"] += getattr(function, "name", None) or ""
            slot["arguments"] += getattr(function, "arguments", None) or ""


@dataclass(eq=False)
class _Turn:
    """One caller input and every reply (completion request) that answered it."""

    user_entry: dict[str, Any] | None = None
    replies: list[_Reply] = field(default_factory=list)
    ran_tools: bool = False


class LlmAgent:
    """One call's conversation with a chat model (implements parley's Agent protocol).

    `client` may be shared between calls (one connection pool); the conversation is per agent.
    In a scenario, `prompt` (a Jinja template), `session` (what the call's agents share),
    `toolbox` and `name` come from the agent's YAML; alone, `config.system_prompt` is used as is.
    """

    def __init__(
        self,
        config: LlmConfig,
        client: openai.AsyncOpenAI | None = None,
        *,
        context: CallContext | None = None,
        name: str = "assistant",
        prompt: PromptTemplate | None = None,
        session: CallSession | None = None,
        toolbox: Toolbox | None = None,
        max_tool_rounds: int = 3,
        voice: str | None = None,
        greeting_interruptible: bool = True,
        on_event: Callable[..., None] | None = None,
    ) -> None:
        self.config = config
        self._on_event = on_event
        self.client = client if client is not None else build_client(config)
        self.name = name
        self.voice = voice
        self.greeting_interruptible = greeting_interruptible
        self._owns_session = session is None
        self.session = session if session is not None else CallSession(context or CallContext("-"))
        self.context = self.session.context
        if prompt is None and config.system_prompt:
            prompt = PromptTemplate(config.system_prompt)
        self.prompt = prompt
        self.toolbox = toolbox or Toolbox([])
        self.max_tool_rounds = max_tool_rounds
        self.messages: list[dict[str, Any]] = []
        self._last_system_text = ""
        if prompt is not None:
            self.messages.append({"role": "system", "content": self._system_text()})
        self.last_stream_closed_t: float | None = None
        """time.monotonic() when the last reply's HTTP stream was closed (barge-in benchmarks)."""
        self.last_outcome: Outcome | None = None
        self._turn: _Turn | None = None  # the latest turn (what truncate_last_reply acts on)
        self._greeted = False

    @property
    def _call_id(self) -> str:
        return self.context.call_id

    def _system_text(self) -> str:
        """The prompt rendered now; if it fails (a template computing with state a tool has not
        set yet), the last good rendering, or the template's text, so the call goes on."""
        assert self.prompt is not None
        try:
            self._last_system_text = self.prompt.render(self.session.variables(self.name))
        except Exception as exc:  # noqa: BLE001 - a template error must not silence the agent
            log.error(
                "call %s: agent %s: prompt template failed: %s: %s", self._call_id, self.name, type(exc).__name__, exc
            )
        return self._last_system_text or self.prompt.source

    def greeting(self) -> str | None:
        """The configured greeting. The handler asks for it when it speaks it, so it is recorded
        as the assistant's first message then (the model must know it already said hello)."""
        text = self.config.greeting
        if text and not self._greeted:
            self._greeted = True
            self.record_spoken(text)
        return text

    def record_spoken(self, text: str) -> None:
        """Something said in this agent's name outside a reply (a greeting, a handoff line)."""
        entry = {"role": "assistant", "content": text}
        self.messages.append(entry)
        reply = _Reply(time.monotonic(), entry=entry, outcome="greeting", said=[text])
        self._turn = _Turn(replies=[reply])

    # ---------------------------------------------------------------------------------- history
    def history(self, *, before_last_input: bool = False) -> list[dict[str, Any]]:
        """The conversation as plain user/assistant text (no system prompt, no tool traffic), for
        another agent taking over. `before_last_input` leaves out the latest caller input and
        what followed it (the next agent answers that input itself)."""
        messages = self.messages
        if before_last_input and self._turn is not None and self._turn.user_entry is not None:
            index = next((i for i, m in enumerate(messages) if m is self._turn.user_entry), None)
            if index is not None:
                messages = messages[:index]
        return [
            {"role": m["role"], "content": m["content"]}
            for m in messages
            if m["role"] in ("user", "assistant") and m.get("content")
        ]

    def adopt_history(self, messages: list[dict[str, Any]]) -> None:
        """Continue a conversation another agent had (a handoff with shared history)."""
        system = self.messages[:1] if self.messages and self.messages[0]["role"] == "system" else []
        self.messages = system + [dict(m) for m in messages]
        self._turn = None

    # ---------------------------------------------------------------------------------- a reply
    async def respond(self, user: UserInput) -> AsyncGenerator[AgentOutput, None]:
        """Stream the model's answer as Say clauses, running tool calls between requests.

        Cancelling (or closing) the iteration closes the HTTP stream at once; consumers should
        iterate inside `contextlib.aclosing`."""
        turn = self._begin(user)
        for round_index in range(self.max_tool_rounds + 1):
            tools_allowed = bool(self.toolbox) and round_index < self.max_tool_rounds
            reply = _Reply(time.monotonic(), tools_allowed=tools_allowed)
            turn.replies.append(reply)
            try:
                text = await self._first_text(reply)
                while text is not None:
                    for say in self._speak(reply, text):
                        yield say
                    text = await self._next_text(reply)
            finally:
                # Reached on completion, on cancellation at an await (CancelledError) and on
                # aclose() at a yield (GeneratorExit): the stream is closed now, not read to its end.
                await self._end(reply)
            # Tool calls in the last round (a server ignoring tool_choice "none") are not run: the
            # caller gets the answer's text, or the fallback.
            if reply.outcome != "completed" or not (reply.tool_calls and self.toolbox and reply.tools_allowed):
                for say in self._finish(reply):
                    yield say
                return
            for say in self._says(reply, self._flush(reply)):
                yield say
            if (filler := self._filler(reply)) is not None:
                yield filler
            action = await self._run_tools(turn, reply)
            if action is not None:
                yield action
                return

    def _begin(self, user: UserInput) -> _Turn:
        if self._owns_session:
            self.session.note(user)
        entry = {"role": "user", "content": _user_text(user)}
        self.messages.append(entry)
        turn = _Turn(user_entry=entry)
        self._turn = turn
        return turn

    async def _first_text(self, reply: _Reply) -> str | None:
        """The first content delta, opening (and retrying) the stream within the first-token budget.

        None when there is none: timeout, a failure that retries did not cure, or an answer with
        no text (possibly only tool calls).
        """
        budget = min(self.config.first_token_timeout_s, self.config.total_timeout_s)
        try:
            async with asyncio.timeout(budget - (time.monotonic() - reply.started)):
                return await self._open_with_retries(reply)
        except TimeoutError:
            reply.outcome = "first_token_timeout"
            log.warning("call %s: no first token within %.1f s", self._call_id, budget)
        except Exception as exc:  # noqa: BLE001 - any failure: the caller hears the fallback
            reply.outcome = "failed"
            log.warning("call %s: chat completion failed: %s", self._call_id, _describe(exc))
        await self._close_stream(reply)
        return None

    async def _open_with_retries(self, reply: _Reply) -> str | None:
        attempt = 0
        while True:
            try:
                reply.stream = await self.client.chat.completions.create(**self._request(reply))
                while True:
                    text = reply.absorb(await anext(reply.stream))
                    if text:
                        return text
            except StopAsyncIteration:
                reply.outcome = "completed"  # no text at all (maybe only tool calls)
                return None
            except Exception as exc:
                await self._close_stream(reply)
                reply.tool_calls.clear()  # fragments of a failed attempt
                if attempt >= self.config.max_retries or not _retryable(exc):
                    raise
                attempt += 1
                delay = self.config.retry_backoff_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.5)
                log.info("call %s: %s; retry %d in %.2f s", self._call_id, _describe(exc), attempt, delay)
                await asyncio.sleep(delay)

    def _request(self, reply: _Reply) -> dict[str, Any]:
        if self.prompt is not None and self.messages and self.messages[0]["role"] == "system":
            self.messages[0]["content"] = self._system_text()  # time, DTMF and state move on
        request: dict[str, Any] = {
            "model": self.config.model,
            "messages": [dict(message) for message in _recent(self.messages, MAX_HISTORY_MESSAGES)],
            "stream": True,
        }
        if self.config.temperature is not None:
            request["temperature"] = self.config.temperature
        if self.config.max_tokens is not None:
            request["max_tokens"] = self.config.max_tokens
        if self.toolbox:
            request["tools"] = self.toolbox.definitions()
            # The last round forbids tools: the caller must get an answer, not another lookup.
            request["tool_choice"] = "auto" if reply.tools_allowed else "none"
        return request

    async def _next_text(self, reply: _Reply) -> str | None:
        """The next delta's content ('' for chunks without), or None once the reply is over.

        The total timeout wraps only the read: never a yield, where the consumer's own awaits
        would be cancelled by it.
        """
        remaining = self.config.total_timeout_s - (time.monotonic() - reply.started)
        try:
            async with asyncio.timeout(remaining):
                chunk = await anext(reply.stream)
        except StopAsyncIteration:
            reply.outcome = "completed"
            return None
        except TimeoutError:
            reply.outcome = "total_timeout"
            log.warning("call %s: reply cut at %.1f s", self._call_id, self.config.total_timeout_s)
            return None
        except Exception as exc:  # noqa: BLE001 - mid-answer: end it with what was said
            reply.outcome = "failed"
            log.warning("call %s: stream failed mid-answer: %s", self._call_id, _describe(exc))
            return None
        return reply.absorb(chunk)

    def _speak(self, reply: _Reply, text: str) -> list[Say]:
        if not text:
            return []
        self._record(reply, reply.text)
        plain = reply.markdown.push(text)
        return self._says(reply, reply.clauses.push(plain)) if plain else []

    def _says(self, reply: _Reply, clauses: list[str]) -> list[Say]:
        says = []
        for clause in clauses:
            spoken = clean_inline(clause)
            if spoken:  # a clause of only emoji or link syntax says nothing
                reply.said.append(spoken)
                says.append(Say(spoken))
        return says

    @staticmethod
    def _flush(reply: _Reply) -> list[str]:
        return reply.clauses.push(reply.markdown.flush()) + reply.clauses.flush()

    def _finish(self, reply: _Reply) -> list[Say]:
        if reply.outcome == "completed":
            says = self._says(reply, self._flush(reply))
            if reply.said:
                return says
            log.warning("call %s: the model's answer had nothing to say", self._call_id)
        elif reply.said:
            # Ended early: the unfinished clause is dropped (half a word sounds broken) and the
            # history keeps what the caller was given, not text that was never spoken.
            self._record(reply, " ".join(reply.said))
            return []
        reply.said.append(self.config.fallback_text)
        self._record(reply, self.config.fallback_text)
        return [Say(self.config.fallback_text)]

    def _record(self, reply: _Reply, content: str) -> None:
        """Set the reply's assistant message (created in history at its first text)."""
        if reply.interrupted:
            return  # truncate_last_reply() already set what the caller heard
        if reply.entry is None:
            reply.entry = {"role": "assistant", "content": content}
            self.messages.append(reply.entry)
        else:
            reply.entry["content"] = content

    async def _end(self, reply: _Reply) -> None:
        await self._close_stream(reply)
        if reply.outcome == "pending":
            reply.outcome = "cancelled"
        self.last_outcome = reply.outcome
        log.debug(
            "call %s: reply %s after %.3f s: %r, tools %s",
            self._call_id,
            reply.outcome,
            time.monotonic() - reply.started,
            reply.text,
            list(reply.tool_calls.values()),
        )

    async def _close_stream(self, reply: _Reply) -> None:
        stream, reply.stream = reply.stream, None
        if stream is None:
            return
        try:
            await stream.close()  # closes the HTTP response: the server sees the disconnect
        except Exception as exc:  # noqa: BLE001 - a failing close must not hide the reply
            log.debug("call %s: closing the stream: %s", self._call_id, _describe(exc))
        self.last_stream_closed_t = time.monotonic()

    # ---------------------------------------------------------------------------------- tools
    def _filler(self, reply: _Reply) -> Say | None:
        """A tool's 'One moment.' when the model went straight to the tool without a word."""
        if reply.said:
            return None
        for slot in reply.tool_calls.values():
            if text := self.toolbox.filler(slot["name"]):
                reply.said.append(text)
                self._record(reply, text)
                return Say(text)
        return None

    async def _run_tools(self, turn: _Turn, reply: _Reply) -> AgentOutput | None:
        """Run the reply's tool calls at once and record them with their results in history.

        Recorded only when every result is in: a request with a tool call and no result is
        rejected by the API, so a barge-in during the tools leaves the history as it was."""
        calls = [
            (slot.get("id") or f"call_{len(self.messages)}_{index}", slot["name"], slot["arguments"])
            for index, slot in sorted(reply.tool_calls.items())
        ]
        context = self.session.tool_context(self.name)
        # Set before running: a tool cut short by a barge-in may still have acted (a webhook sent),
        # so its input must not be forgotten and answered (and acted on) again.
        turn.ran_tools = True
        started = time.monotonic()
        results = await asyncio.gather(*(self.toolbox.call(name, arguments, context) for _, name, arguments in calls))
        if self._on_event is not None:
            for (_, name, _), result in zip(calls, results, strict=True):
                self._on_event(
                    "tool_called",
                    agent=self.name,
                    tool=name,
                    ms=round((time.monotonic() - started) * 1000, 1),
                    ok=not result.content.startswith('{"error"'),
                )
        entry = reply.entry or {"role": "assistant", "content": None}
        entry["tool_calls"] = [
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
            for call_id, name, arguments in calls
        ]
        if reply.entry is None:
            reply.entry = entry
            self.messages.append(entry)
        for (call_id, name, _), result in zip(calls, results, strict=True):
            self.messages.append({"role": "tool", "tool_call_id": call_id, "content": result.content})
            # Results may hold personal data (a verified customer): their text only at debug level.
            log.info("call %s: agent %s called %s", self._call_id, self.name, name)
            log.debug("call %s: %s -> %s", self._call_id, name, result.content[:200])
        return next((r.action for r in results if r.action is not None), None)

    # ---------------------------------------------------------------------------------- barge-in
    def truncate_last_reply(self, heard_text: str, *, forget_input: bool = False) -> None:
        """The caller interrupted the last turn having heard only `heard_text` of it.

        Each reply's history entry becomes the part of the heard text it said, or is dropped
        when none of it was heard (an entry with tool calls keeps them: they ran). Safe to call
        right after cancelling the reply's task, before its cleanup has run: later deltas no
        longer touch the history. `forget_input=True` (nothing heard and the handler will answer
        the same input again, merged with the next) also drops the user message so the model
        does not see it twice, unless tools ran for it (their results must stay explained).
        """
        turn = self._turn
        if turn is None:
            return
        heard = heard_text.split()
        for reply in turn.replies:
            reply.interrupted = True
            count = min(len(heard), len(" ".join(reply.said).split()))
            self._set_heard(reply, " ".join(heard[:count]))
            heard = heard[count:]
        nothing_heard = not heard_text.split()
        if forget_input and nothing_heard and not turn.ran_tools and turn.user_entry is not None:
            self._forget(turn.user_entry)
            turn.user_entry = None

    on_interrupted = truncate_last_reply

    def _set_heard(self, reply: _Reply, heard: str) -> None:
        entry = reply.entry
        if entry is None:
            return
        if heard:
            entry["content"] = heard
        elif entry.get("tool_calls"):
            entry["content"] = None
        else:
            self._forget(entry)
            reply.entry = None

    def _forget(self, entry: dict[str, Any]) -> None:
        # By identity: two turns may hold equal dicts ("yes" twice).
        for index in range(len(self.messages) - 1, -1, -1):
            if self.messages[index] is entry:
                del self.messages[index]
                return


def _recent(messages: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """The system prompt and at most `limit` of the latest messages, starting at a caller's
    message (never with a tool result cut off from its call): a long call must not outgrow the
    model's context, which would fail every later request."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    rest = messages[len(system) :]
    if len(rest) <= limit:
        return messages
    start = len(rest) - limit
    while start < len(rest) and rest[start]["role"] != "user":
        start += 1
    return system + rest[start:] if start < len(rest) else messages


def _user_text(user: UserInput) -> str:
    if user.kind == "dtmf":
        return "The caller pressed: " + " ".join(user.digits)
    return user.text.strip()


def _describe(exc: BaseException) -> str:
    status = getattr(exc, "status_code", None)
    name = type(exc).__name__
    return f"{name} {status}: {exc}" if status is not None else f"{name}: {exc}"


# --------------------------------------------------------------------------------------------
# Warm-up


def warm_up(client: Any, build_agent: Callable[[Any], LlmAgent]) -> bool:
    """Pay at startup what the first request would pay (blocking: call it off the event loop).

    Measured against a loopback server, the first request of a process took 40-100 ms more than the
    next ones (bench/llm_first_request.py), none of it network: the SDK imports its chat resources on first use (~30 ms,
    `client.chat` builds the parsed-completion models), httpcore loads anyio's asyncio backend
    on its first connection (~15 ms), and the first request transforms the parameters' types
    and the first chunk builds the deferred pydantic models of the response (~5 ms each). So the
    agent rehearses one turn: `build_agent(rehearsal_client)` answers "Hello?" with its real
    prompt and tools through the real SDK, answered in-process by a canned stream (nothing is
    sent, nothing is billed), then a tool-call chunk is parsed the same way. The connection itself
    is not opened (that would take a request to the provider): the first request opens it. An Azure
    token provider is asked for a token (as the first request would): its cache is warmed too.
    A failure is logged and ignored: the first caller then pays as before. True if it rehearsed.
    """
    if not isinstance(client, openai.AsyncOpenAI):  # AsyncAzureOpenAI is one too; llama-cpp is not
        return False
    # httpx logs every request at INFO: the rehearsal's would read as requests sent to the provider.
    http_log = logging.getLogger(_http_module().__name__)
    rehearsing = threading.get_ident()

    def hide(record: logging.LogRecord) -> bool:
        return record.thread != rehearsing

    http_log.addFilter(hide)
    try:
        asyncio.run(_rehearse(client, build_agent))
    except Exception as exc:  # noqa: BLE001 - a warm-up must never stop the server
        log.warning("LLM warm-up failed (the first request will be slower): %s", _describe(exc))
        return False
    finally:
        http_log.removeFilter(hide)
    return True


async def _rehearse(client: openai.AsyncOpenAI, build_agent: Callable[[Any], LlmAgent]) -> None:
    client.chat.completions  # noqa: B018 - the SDK's lazy imports, cached on the shared client
    import anyio  # httpx's dependency: its asyncio backend is imported on the first connection

    anyio.Event()
    http = _http_module()
    bodies = iter([_canned_sse({"content": "Hello."}), _canned_sse({"tool_calls": [_CANNED_TOOL_CALL]})])

    def answer(request: Any) -> Any:
        return http.Response(200, headers={"content-type": "text/event-stream"}, content=next(bodies))

    async with http.AsyncClient(transport=http.MockTransport(answer)) as http_client:
        rehearsal = client.with_options(http_client=http_client)
        agent = build_agent(rehearsal)
        async for _ in agent.respond(UserInput("speech", "Hello?")):
            pass
        if agent.last_outcome != "completed":
            raise RuntimeError(f"the rehearsal ended {agent.last_outcome}")
        stream = await rehearsal.chat.completions.create(model=agent.config.model, messages=[], stream=True)
        async for _ in stream:
            pass


_CANNED_TOOL_CALL = {"index": 0, "id": "call_0", "type": "function", "function": {"name": "f", "arguments": "{}"}}


def _canned_sse(delta: dict[str, Any]) -> bytes:
    chunks = [{"role": "assistant", "content": ""}, delta]
    events = [
        {
            "id": "warm-up",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": "warm-up",
            "choices": [{"index": 0, "delta": chunk, "finish_reason": None}],
        }
        for chunk in chunks
    ]
    return b"".join(f"data: {json.dumps(event)}\n\n".encode() for event in events) + b"data: [DONE]\n\n"


def _http_module() -> Any:
    """The HTTP library the SDK's clients are built on (httpx; httpx2 in recent SDKs)."""
    base = next(cls for cls in openai.DefaultAsyncHttpxClient.__mro__ if cls.__name__ == "AsyncClient")
    return importlib.import_module(base.__module__.partition(".")[0])


def llm_agent_factory(config: LlmConfig, client: openai.AsyncOpenAI | None = None) -> AgentFactory:
    """Build the client now (configuration mistakes fail at startup) and share it between calls."""
    shared = client if client is not None else build_client(config)

    def build(context: CallContext) -> LlmAgent:
        return LlmAgent(config, shared, context=context)

    return build
