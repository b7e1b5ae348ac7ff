"""How one agent of a scenario passes the caller to another (the `handoffs:` of an agent's YAML).

    handoffs:
      - to: cards                      # the agent taking over
        description: Lost or stolen cards, card limits.   # tells an LLM when to hand off
        announce: "Let me put you through to our card team."  # said first; leave out for silent
        history: shared                # shared: the next agent sees the conversation; fresh: not
        then: respond                  # respond: it answers the caller's words; greet: it greets

An LLM agent hands off by calling the tool `transfer_to_<to>`; a scripted agent through an
intent's `handoff: <to>`. Either way the scenario switches agents within the same turn. With
`then: respond`, a scripted agent that has no intent for the caller's words greets instead of
saying its fallback (ScenarioAgent._can_answer).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class HandoffSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    to: str = Field(min_length=1)
    description: str = ""
    announce: str | None = None
    history: Literal["shared", "fresh"] = "shared"
    then: Literal["respond", "greet"] = "respond"

    @field_validator("announce", mode="before")
    @classmethod
    def _blank_is_silent(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value
