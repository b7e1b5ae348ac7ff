"""Tools an LLM agent may call: declared in the agent's YAML, run by parley, bounded in time.

A tool is one of:
- `python: package.module:function`: a Python callable (sync callables run on a worker thread so
  they cannot stall the call's event loop; async ones are awaited). It receives the model's
  arguments as keyword arguments, plus `context` (a ToolContext) if it has a parameter of that name;
- `webhook: {url: ...}`: an HTTP request carrying {tool, arguments, call} as JSON;
- `builtin: end_call` or `builtin: transfer` (to a `target` fixed in the YAML: the model can never
  dial a number of its own choosing).
Handoffs to other agents of a scenario are tools too (made by the scenario, not declared).

Whatever goes wrong (unknown tool, arguments that are not JSON, an exception, a timeout, an HTTP
error) becomes a short error result the model can apologise for; it never ends the call.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from parley.acs.config import parse_target
from parley.protocols import AgentOutput, CallContext, Handoff, Hangup, Transfer

log = logging.getLogger(__name__)

MAX_RESULT_CHARS = 4000  # a tool result goes back into the prompt: keep a runaway one bounded
TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # what the OpenAI API accepts
_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


class ToolError(ValueError):
    """A tool declaration cannot be used (bad import path, bad schema...). `key`: the key of the
    declaration at fault, which the YAML error location then ends with (`tools[0] (lookup).python`)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


# --------------------------------------------------------------------------------------------
# YAML declarations


class WebhookSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(pattern=r"^https?://", description="Called with the tool's arguments as JSON.")
    method: Literal["POST", "PUT", "GET"] = "POST"
    headers: dict[str, str] = Field(
        default_factory=dict, description="Values may reference environment variables: ${API_TOKEN}."
    )


class ToolSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: dict(EMPTY_PARAMETERS))
    python: str | None = Field(None, description="module:function")
    webhook: WebhookSpec | None = None
    builtin: Literal["end_call", "transfer"] | None = None
    target: str | None = Field(None, description="builtin transfer: the number or user to transfer to.")
    say: str | None = Field(
        None, description="Spoken before the tool runs when the model said nothing first ('One moment.')."
    )
    timeout_s: float = Field(8.0, gt=0.0, le=120.0)

    @field_validator("name")
    @classmethod
    def _valid_name(cls, name: str) -> str:
        if not TOOL_NAME.match(name):
            raise ValueError("tool names are 1-64 letters, digits, '_' or '-'")
        return name

    @field_validator("parameters")
    @classmethod
    def _object_schema(cls, schema: dict[str, Any]) -> dict[str, Any]:
        if schema.get("type") != "object":
            raise ValueError("parameters must be a JSON schema of type 'object'")
        return schema

    @model_validator(mode="after")
    def _one_implementation(self) -> ToolSpec:
        given = [k for k in ("python", "webhook", "builtin") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("a tool needs exactly one of python, webhook or builtin")
        if self.builtin == "transfer" and not self.target:
            raise ValueError("builtin transfer needs a target (a phone number or user id)")
        if self.target is not None:
            parse_target(self.target)  # E.164 or an ACS user id, checked now rather than mid-call
        if self.target is not None and self.builtin != "transfer":
            raise ValueError("target only applies to builtin transfer")
        if self.python is not None and ":" not in self.python:
            raise ValueError("python must be 'module:function'")
        if self.python is not None:
            import_callable(self.python)  # now, so the error names the file and the place
        return self


# --------------------------------------------------------------------------------------------
# Running tools


@dataclass
class ToolContext:
    """What a tool may know about the call. `state` is shared by every agent and tool of the call
    and visible to prompt templates as `state`: a tool may remember the verified customer there."""

    call: CallContext
    agent: str
    state: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ToolResult:
    content: str
    action: AgentOutput | None = None  # end the call, transfer it, or hand it to another agent


class Tool(Protocol):
    name: str
    say: str | None
    timeout_s: float

    def definition(self) -> dict[str, Any]: ...

    async def run(self, arguments: dict[str, Any], context: ToolContext) -> ToolResult: ...


def _definition(name: str, description: str, parameters: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}


@dataclass
class PythonTool:
    name: str
    description: str
    parameters: dict[str, Any]
    function: Callable[..., Any]
    say: str | None = None
    timeout_s: float = 8.0

    def definition(self) -> dict[str, Any]:
        return _definition(self.name, self.description, self.parameters)

    async def run(self, arguments: dict[str, Any], context: ToolContext) -> ToolResult:
        kwargs = dict(arguments)
        if _takes_context(self.function):
            kwargs["context"] = context
        if inspect.iscoroutinefunction(self.function):
            value = await self.function(**kwargs)
        else:
            value = await asyncio.to_thread(functools.partial(self.function, **kwargs))
        return ToolResult(_as_text(value))


@functools.cache
def _takes_context(function: Callable[..., Any]) -> bool:
    try:
        return "context" in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


@dataclass
class WebhookTool:
    name: str
    description: str
    parameters: dict[str, Any]
    webhook: WebhookSpec
    say: str | None = None
    timeout_s: float = 8.0

    def definition(self) -> dict[str, Any]:
        return _definition(self.name, self.description, self.parameters)

    async def run(self, arguments: dict[str, Any], context: ToolContext) -> ToolResult:
        payload = {
            "tool": self.name,
            "arguments": arguments,
            "call": {"call_id": context.call.call_id, "caller_id": context.call.caller_id, "agent": context.agent},
        }
        headers = {key: _expand_env(value) for key, value in self.webhook.headers.items()}
        # One short-lived client per call of the tool: tool calls are rare and this keeps no
        # connection pool bound to an event loop that may be gone by the next call.
        async with httpx.AsyncClient(timeout=self.timeout_s) as client:
            if self.webhook.method == "GET":
                flat = {k: v if isinstance(v, str) else json.dumps(v) for k, v in arguments.items()}
                response = await client.get(self.webhook.url, params=flat, headers=headers)
            else:
                response = await client.request(self.webhook.method, self.webhook.url, json=payload, headers=headers)
        if response.status_code >= 400:
            return ToolResult(_error(f"the service answered HTTP {response.status_code}"))
        return ToolResult(_bounded(response.text))


def _expand_env(value: str) -> str:
    return _ENV_REFERENCE.sub(lambda m: os.environ.get(m.group(1), ""), value)


@dataclass
class ActionTool:
    """A tool whose effect is on the call itself: end it, transfer it, hand it to another agent."""

    name: str
    description: str
    action: AgentOutput
    result: str
    say: str | None = None
    parameters: dict[str, Any] = field(
        default_factory=lambda: {
            "type": "object",
            "properties": {"reason": {"type": "string", "description": "Why, in a few words."}},
        }
    )
    timeout_s: float = 1.0

    def definition(self) -> dict[str, Any]:
        return _definition(self.name, self.description, self.parameters)

    async def run(self, arguments: dict[str, Any], context: ToolContext) -> ToolResult:
        return ToolResult(self.result, self.action)


def end_call_tool(name: str = "end_call", description: str = "", say: str | None = None) -> ActionTool:
    return ActionTool(
        name,
        description or "End the phone call. Say goodbye first, in the same reply.",
        Hangup(reason=f"tool:{name}"),
        "The call is ending.",
        say=say or "Thank you for calling. Goodbye.",
    )


def transfer_tool(name: str, target: str, description: str = "", say: str | None = None) -> ActionTool:
    return ActionTool(
        name,
        description or "Transfer the call to a human colleague.",
        Transfer(target, reason=f"tool:{name}"),
        "The call is being transferred.",
        say=say or "Please hold while I transfer your call.",
    )


def handoff_tool(to: str, description: str, handoff: object) -> ActionTool:
    return ActionTool(
        f"transfer_to_{to}",
        description,
        Handoff(to, handoff),
        f"The caller is now talking to {to}.",
    )


def build_tool(spec: ToolSpec) -> Tool:
    """The runnable tool for a declaration. Imports Python tools now: a typo fails at startup."""
    if spec.builtin == "end_call":
        return end_call_tool(spec.name, spec.description, spec.say)
    if spec.builtin == "transfer":
        assert spec.target is not None
        return transfer_tool(spec.name, spec.target, spec.description, spec.say)
    if spec.webhook is not None:
        _check_env_references(spec)
        return WebhookTool(spec.name, spec.description, spec.parameters, spec.webhook, spec.say, spec.timeout_s)
    assert spec.python is not None
    return PythonTool(
        spec.name, spec.description, spec.parameters, import_callable(spec.python), spec.say, spec.timeout_s
    )


def _check_env_references(spec: ToolSpec) -> None:
    """A header naming an unset variable would send an empty credential in the middle of a call."""
    assert spec.webhook is not None
    for value in spec.webhook.headers.values():
        for name in _ENV_REFERENCE.findall(value):
            if name not in os.environ:
                raise ToolError(f"tool {spec.name!r}: header uses ${{{name}}}, which is not set")


def import_callable(reference: str) -> Callable[..., Any]:
    module_name, _, attribute = reference.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ToolError(f"cannot import {module_name!r} for tool {reference!r}: {exc}", "python") from None
    function: object = getattr(module, attribute, None)
    if not callable(function):
        raise ToolError(f"{reference!r}: {module_name} has no callable {attribute!r}", "python")
    return function


class Toolbox:
    """The tools of one agent, by name."""

    def __init__(self, tools: list[Tool]) -> None:
        self.tools: dict[str, Tool] = {}
        for tool in tools:
            if tool.name in self.tools:
                raise ToolError(f"two tools are named {tool.name!r}")
            self.tools[tool.name] = tool

    def __bool__(self) -> bool:
        return bool(self.tools)

    def definitions(self) -> list[dict[str, Any]]:
        return [tool.definition() for tool in self.tools.values()]

    def filler(self, name: str) -> str | None:
        tool = self.tools.get(name)
        return tool.say if tool is not None else None

    async def call(self, name: str, arguments: str, context: ToolContext) -> ToolResult:
        """Run one tool call from the model; every failure becomes an error result, logged."""
        tool = self.tools.get(name)
        if tool is None:
            log.warning("call %s: model called unknown tool %r", context.call.call_id, name)
            return ToolResult(_error(f"there is no tool named {name!r}"))
        try:
            parsed = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            # The arguments may carry what the caller said or keyed (a PIN): their text only at DEBUG.
            log.warning(
                "call %s: tool %s got arguments that are not JSON (%d chars)",
                context.call.call_id,
                name,
                len(arguments),
            )
            log.debug("call %s: tool %s arguments: %r", context.call.call_id, name, arguments[:200])
            return ToolResult(_error("the arguments were not valid JSON"))
        if not isinstance(parsed, dict):
            return ToolResult(_error("the arguments must be a JSON object"))
        started = time.monotonic()
        try:
            async with asyncio.timeout(tool.timeout_s):
                result = await tool.run(parsed, context)
        except TimeoutError:
            log.warning("call %s: tool %s timed out after %.1f s", context.call.call_id, name, tool.timeout_s)
            return ToolResult(_error(f"the tool did not answer within {tool.timeout_s:g} seconds"))
        except TypeError as exc:  # the model's arguments do not fit the function
            log.warning("call %s: tool %s: %s", context.call.call_id, name, exc)
            return ToolResult(_error(f"wrong arguments: {exc}"))
        except Exception as exc:  # noqa: BLE001 - a broken tool must not end the call
            log.warning("call %s: tool %s failed: %s: %s", context.call.call_id, name, type(exc).__name__, exc)
            return ToolResult(_error("the tool failed"))
        log.info(
            "call %s: tool %s answered in %.0f ms", context.call.call_id, name, (time.monotonic() - started) * 1000
        )
        return result


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return _bounded(value)
    try:
        return _bounded(json.dumps(value, ensure_ascii=False, default=str))
    except (TypeError, ValueError):
        return _bounded(str(value))


def _bounded(text: str) -> str:
    return text if len(text) <= MAX_RESULT_CHARS else text[:MAX_RESULT_CHARS] + " [truncated]"


def _error(message: str) -> str:
    return json.dumps({"error": message})
