"""System prompts as Jinja templates, rendered with what is known about the call.

Variables a template may use:
    call_id, caller_id      who and which call (caller_id is "" when the transport does not say)
    dtmf                    every key the caller pressed so far, in order ("" if none)
    last_dtmf               the keys of the latest key press
    now, time, date, weekday the current time in the scenario's timezone ("14:05", "1 December 2026")
    agent                   the name of the agent the prompt belongs to
    facts                   the scenario's `facts:` (menu, hours, prices...): facts come from here
                            or from tools, never from the model's memory
    state                   values tools stored for this call (e.g. the verified customer)

Templates are compiled at startup (a syntax error fails there, naming the agent) and rendered in a
sandbox at every request, so `time` is always current and `state` reflects the latest tool results.
A variable that is not set renders as empty text instead of failing in the middle of a call.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import jinja2
from jinja2.sandbox import SandboxedEnvironment

from parley.agents.tools import ToolContext
from parley.protocols import CallContext, UserInput

_ENVIRONMENT = SandboxedEnvironment(undefined=jinja2.ChainableUndefined, autoescape=False)


class PromptError(ValueError):
    """A template that does not compile."""


class PromptTemplate:
    def __init__(self, source: str) -> None:
        self.source = source
        try:
            self._template = _ENVIRONMENT.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise PromptError(f"template error at line {exc.lineno}: {exc.message}") from None

    def render(self, variables: dict[str, Any]) -> str:
        return self._template.render(variables).strip()


def timezone(name: str | None) -> dt.tzinfo:
    if not name:
        return dt.UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown timezone {name!r} (use an IANA name like Europe/London)") from None


@dataclass
class CallSession:
    """What every agent of one call shares: the call's facts, the keys pressed, the tools' state."""

    context: CallContext
    facts: dict[str, Any] = field(default_factory=dict)
    tz: dt.tzinfo = dt.UTC
    state: dict[str, Any] = field(default_factory=dict)
    digits: list[str] = field(default_factory=list)

    def note(self, user: UserInput) -> None:
        if user.kind == "dtmf" and user.digits:
            self.digits.append(user.digits)

    def variables(self, agent: str) -> dict[str, Any]:
        now = dt.datetime.now(self.tz)
        return {
            "call_id": self.context.call_id,
            "caller_id": self.context.caller_id,
            "dtmf": "".join(self.digits),
            "last_dtmf": self.digits[-1] if self.digits else "",
            "now": now,
            "time": now.strftime("%H:%M"),
            "date": f"{now.day} {now:%B %Y}",
            "weekday": now.strftime("%A"),
            "agent": agent,
            "facts": self.facts,
            "state": self.state,
        }

    def tool_context(self, agent: str) -> ToolContext:
        return ToolContext(self.context, agent, self.state)
