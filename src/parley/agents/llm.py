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

Tool calls are not part of this slice: their deltas are accumulated and ignored (debug log).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import openai
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from parley.agents.speakable import SpeakableStream, clean_inline
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

TokenProvider = Callable[[], "str | Awaitable[str]"]
Outcome = Literal[
    "pending", "completed", "first_token_timeout", "total_timeout", "failed", "cancelled", "greeting"
]


class LlmConfig(BaseModel):
    """Which model to call, how, and how long a caller may be kept waiting."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    provider: Literal["openai", "azure", "compatible"] = "openai"
    model: str = Field("gpt-4o-mini", min_length=1, description="Model name; for Azure the deployment.")
    base_url: str | None = Field(
        None, description="Compatible servers: e.g. http://localhost:11434/v1 (Ollama)."
    )
    api_key: SecretStr | None = Field(
        None, description="Default: OPENAI_API_KEY (AZURE_OPENAI_API_KEY for Azure)."
    )
    azure_endpoint: str | None = Field(None, description="Default: AZURE_OPENAI_ENDPOINT.")
    api_version: str | None = Field(None, description="Azure API version; default OPENAI_API_VERSION.")
    azure_ad_token: SecretStr | None = Field(None, description="Azure: an Entra ID access token.")
    azure_ad_token_provider: TokenProvider | None = Field(
        None, exclude=True, description="Azure: returns (or awaits) a fresh Entra ID token."
    )
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="None: the server's default.")
    max_tokens: int | None = Field(None, gt=0)
    first_token_timeout_s: float = Field(4.0, gt=0.0)
    total_timeout_s: float = Field(20.0, gt=0.0)
    max_retries: int = Field(2, ge=0, description="Before the first token only.")
    retry_backoff_s: float = Field(0.25, ge=0.0, description="First retry delay; doubles, jittered.")
    fallback_text: str = Field(DEFAULT_FALLBACK, min_length=1)
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
    timeout = openai.Timeout(
        config.total_timeout_s, connect=min(config.first_token_timeout_s, config.total_timeout_s)
    )
    if config.provider == "azure":
        return _azure_client(config, timeout)
    api_key = _secret(config.api_key) or os.environ.get("OPENAI_API_KEY")
    if config.provider == "compatible":
        api_key = api_key or COMPATIBLE_DUMMY_KEY
    elif not api_key:
        raise ValueError("provider 'openai' needs api_key (or the OPENAI_API_KEY variable)")
    return openai.AsyncOpenAI(api_key=api_key, base_url=config.base_url, timeout=timeout, max_retries=0)


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
        **credential,
    )


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
    """One assistant reply: its HTTP stream, the text received and said, its history entry."""

    started: float
    user_entry: dict[str, Any] | None = None
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


class LlmAgent:
    """One call's conversation with a chat model (implements parley's Agent protocol).

    `client` may be shared between calls (one connection pool); the conversation is per agent.
    """

    def __init__(
        self,
        config: LlmConfig,
        client: openai.AsyncOpenAI | None = None,
        *,
        context: CallContext | None = None,
    ) -> None:
        self.config = config
        self.client = client if client is not None else build_client(config)
        self.context = context
        self.messages: list[dict[str, Any]] = []
        if config.system_prompt:
            self.messages.append({"role": "system", "content": config.system_prompt})
        self.last_stream_closed_t: float | None = None
        """time.monotonic() when the last reply's HTTP stream was closed (barge-in benchmarks)."""
        self.last_outcome: Outcome | None = None
        self._reply: _Reply | None = None  # the latest reply (what truncate_last_reply acts on)
        self._greeted = False

    @property
    def _call_id(self) -> str:
        return self.context.call_id if self.context is not None else "-"

    def greeting(self) -> str | None:
        """The configured greeting. The handler asks for it when it speaks it, so it is recorded
        as the assistant's first message then (the model must know it already said hello)."""
        text = self.config.greeting
        if text and not self._greeted:
            self._greeted = True
            entry = {"role": "assistant", "content": text}
            self.messages.append(entry)
            self._reply = _Reply(time.monotonic(), entry=entry, outcome="greeting")
        return text

    # ---------------------------------------------------------------------------------- a reply
    async def respond(self, user: UserInput) -> AsyncGenerator[AgentOutput, None]:
        """Stream the model's answer as Say clauses. Cancelling (or closing) the iteration closes
        the HTTP stream at once; consumers should iterate inside `contextlib.aclosing`."""
        reply = self._begin(user)
        try:
            text = await self._first_text(reply)
            while text is not None:
                for say in self._speak(reply, text):
                    yield say
                text = await self._next_text(reply)
            for say in self._finish(reply):
                yield say
        finally:
            # Reached on completion, on cancellation at an await (CancelledError) and on aclose()
            # at a yield (GeneratorExit): either way the stream is closed now, not read to its end.
            await self._end(reply)

    def _begin(self, user: UserInput) -> _Reply:
        entry = {"role": "user", "content": _user_text(user)}
        self.messages.append(entry)
        reply = _Reply(time.monotonic(), user_entry=entry)
        self._reply = reply
        return reply

    async def _first_text(self, reply: _Reply) -> str | None:
        """The first content delta, opening (and retrying) the stream within the first-token budget.

        None when there is none: timeout, a failure that retries did not cure, or an empty answer.
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
                reply.stream = await self.client.chat.completions.create(**self._request())
                while True:
                    text = reply.absorb(await anext(reply.stream))
                    if text:
                        return text
            except StopAsyncIteration:
                reply.outcome = "completed"  # the model answered nothing at all
                return None
            except Exception as exc:
                await self._close_stream(reply)
                if attempt >= self.config.max_retries or not _retryable(exc):
                    raise
                attempt += 1
                delay = self.config.retry_backoff_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.5)
                log.info("call %s: %s; retry %d in %.2f s", self._call_id, _describe(exc), attempt, delay)
                await asyncio.sleep(delay)

    def _request(self) -> dict[str, Any]:
        request: dict[str, Any] = {
            "model": self.config.model,
            "messages": [dict(message) for message in self.messages],
            "stream": True,
        }
        if self.config.temperature is not None:
            request["temperature"] = self.config.temperature
        if self.config.max_tokens is not None:
            request["max_tokens"] = self.config.max_tokens
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

    def _finish(self, reply: _Reply) -> list[Say]:
        if reply.outcome == "completed":
            tail = reply.clauses.push(reply.markdown.flush()) + reply.clauses.flush()
            says = self._says(reply, tail)
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
        if reply.tool_calls:
            log.debug("call %s: ignored tool calls (not supported yet): %s", self._call_id,
                      list(reply.tool_calls.values()))
        log.debug("call %s: reply %s after %.3f s: %r", self._call_id, reply.outcome,
                  time.monotonic() - reply.started, reply.text)

    async def _close_stream(self, reply: _Reply) -> None:
        stream, reply.stream = reply.stream, None
        if stream is None:
            return
        try:
            await stream.close()  # closes the HTTP response: the server sees the disconnect
        except Exception as exc:  # noqa: BLE001 - a failing close must not hide the reply
            log.debug("call %s: closing the stream: %s", self._call_id, _describe(exc))
        self.last_stream_closed_t = time.monotonic()

    # ---------------------------------------------------------------------------------- barge-in
    def truncate_last_reply(self, heard_text: str, *, forget_input: bool = False) -> None:
        """The caller interrupted the last reply having heard only `heard_text` of it.

        Its history entry becomes the heard text, or is dropped when nothing was heard. Safe to
        call right after cancelling the reply's task, before its cleanup has run: later deltas
        no longer touch the history. `forget_input=True` (nothing heard and the handler will
        answer the same input again, merged with the next) also drops the user message, so the
        model does not see it twice.
        """
        reply = self._reply
        if reply is None:
            return
        reply.interrupted = True
        heard = " ".join(heard_text.split())
        if reply.entry is not None:
            if heard:
                reply.entry["content"] = heard
            else:
                self._forget(reply.entry)
                reply.entry = None
        if forget_input and not heard and reply.user_entry is not None:
            self._forget(reply.user_entry)
            reply.user_entry = None

    on_interrupted = truncate_last_reply

    def _forget(self, entry: dict[str, Any]) -> None:
        # By identity: two turns may hold equal dicts ("yes" twice).
        for index in range(len(self.messages) - 1, -1, -1):
            if self.messages[index] is entry:
                del self.messages[index]
                return


def _user_text(user: UserInput) -> str:
    if user.kind == "dtmf":
        return "The caller pressed: " + " ".join(user.digits)
    return user.text.strip()


def _describe(exc: BaseException) -> str:
    status = getattr(exc, "status_code", None)
    name = type(exc).__name__
    return f"{name} {status}: {exc}" if status is not None else f"{name}: {exc}"


def llm_agent_factory(config: LlmConfig, client: openai.AsyncOpenAI | None = None) -> AgentFactory:
    """Build the client now (configuration mistakes fail at startup) and share it between calls."""
    shared = client if client is not None else build_client(config)

    def build(context: CallContext) -> LlmAgent:
        return LlmAgent(config, shared, context=context)

    return build
