"""Scenarios: several agents in one YAML file, handing the caller to each other.

    name: Riverside Bank
    start: reception                 # the agent that answers the call (default: the first)
    timezone: Europe/London          # for {{ time }} in prompts (default UTC)
    facts: {hours: "nine to five"}   # prompts read {{ facts.hours }}, scripted replies {facts.hours}
    agents:
      - name: reception              # a scripted agent: intents, fallback (parley.agents.scripted)
        intents: [...]
        handoffs: [{to: cards, announce: "Putting you through."}]
      - name: cards                  # an LLM agent: a prompt (Jinja), model settings, tools
        prompt: "You help {{ caller_id }} with cards. Our hours: {{ facts.hours }}."
        model: {temperature: 0.3}
        tools: [...]

An agent's kind is `scripted` when it has intents and `llm` when it has a prompt (or say `kind:`).
A file with one agent and no `agents:` list is a scenario of that one agent, so every agent file
is a scenario. Everything is validated, imported and connected at startup (a typo, a missing
tool, a bad template or missing LLM credentials fail there, not in a call); per call only the
conversation state is created.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from parley.agents.handoff import HandoffSpec
from parley.agents.llm import LlmAgent, LlmConfig, build_client, warm_up
from parley.agents.loading import (
    AgentConfigError,
    describe_validation_error,
    read_yaml_mapping,
)
from parley.agents.prompt import CallSession, PromptError, PromptTemplate, timezone
from parley.agents.scripted import ScriptedAgent, ScriptSpec, resolve_script_path
from parley.agents.tools import (
    TOOL_NAME,
    Tool,
    Toolbox,
    ToolError,
    ToolSpec,
    build_tool,
    handoff_tool,
)
from parley.protocols import (
    Agent,
    AgentEventListener,
    AgentFactory,
    AgentOutput,
    CallContext,
    ExpectsDigits,
    Handoff,
    KeepsHistory,
    Message,
    RecordsSpoken,
    Say,
    TruncatesReplies,
    UserInput,
)

log = logging.getLogger(__name__)

_Model = TypeVar("_Model", bound=BaseModel)
MAX_HANDOFFS_PER_TURN = 3  # A -> B -> A ... within one caller turn is a loop, not a conversation
ScenarioError = AgentConfigError


class ModelSpec(BaseModel):
    """An agent's model settings; anything left out comes from the server's PARLEY_LLM_* settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    provider: Literal["openai", "azure", "compatible", "llama-cpp"] | None = None
    model: str | None = None
    base_url: str | None = None
    azure_endpoint: str | None = None
    api_version: str | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    max_tokens: int | None = Field(default=None, gt=0)
    first_token_timeout_s: float | None = Field(default=None, gt=0.0)
    total_timeout_s: float | None = Field(default=None, gt=0.0)
    max_retries: int | None = Field(default=None, ge=0)
    threads: int | None = Field(default=None, ge=1, le=64)

    def apply(self, defaults: LlmConfig, **extra: Any) -> LlmConfig:
        """`defaults` with this agent's settings on top. Another provider than the server's
        starts from a clean slate for where and how to connect (its URL, keys, endpoint)."""
        fields = defaults.model_dump(exclude={"azure_ad_token_provider"})
        fields["azure_ad_token_provider"] = defaults.azure_ad_token_provider
        if self.provider is not None and self.provider != defaults.provider:
            for name in (
                "base_url",
                "api_key",
                "azure_endpoint",
                "api_version",
                "azure_ad_token",
                "azure_ad_token_provider",
            ):
                fields[name] = None
        fields.update(self.model_dump(exclude_none=True))
        fields.update(extra)
        for secret in ("api_key", "azure_ad_token"):  # dumped as SecretStr: pass the secret on
            value = fields.get(secret)
            if value is not None and hasattr(value, "get_secret_value"):
                fields[secret] = value.get_secret_value()
        return LlmConfig(**fields)


class LlmAgentSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["llm"] = "llm"
    name: str = Field(min_length=1)
    description: str = ""
    voice: str | None = None
    greeting: str | None = None
    greeting_interruptible: bool = True
    prompt: str = Field(min_length=1, description="System prompt, a Jinja template.")
    model: ModelSpec = Field(default_factory=ModelSpec)
    fallback: str | None = Field(None, description="Said when the model fails or is too slow.")
    tools: list[ToolSpec] = Field(default_factory=list)
    handoffs: list[HandoffSpec] = Field(default_factory=list)
    max_tool_rounds: int = Field(3, ge=0, le=10)

    @field_validator("greeting", "voice", "fallback", mode="before")
    @classmethod
    def _blank_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("prompt")
    @classmethod
    def _prompt_compiles(cls, prompt: str) -> str:
        try:
            template = PromptTemplate(prompt)
        except PromptError as exc:
            raise ValueError(f"prompt: {exc}") from None
        # Rendered once as at a call's start (no caller id, no keys, empty state): computing with
        # a value a tool sets later must be guarded ({% if state.total %}), or it fails here.
        try:
            template.render(CallSession(CallContext("startup-check")).variables("check"))
        except Exception as exc:  # noqa: BLE001 - any template error, named for the author
            raise ValueError(f"prompt fails to render at the start of a call: {type(exc).__name__}: {exc}") from None
        return prompt

    @model_validator(mode="after")
    def _unique_tool_names(self) -> LlmAgentSpec:
        names = [tool.name for tool in self.tools] + [f"transfer_to_{h.to}" for h in self.handoffs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"tool names must be unique: {', '.join(duplicates)}")
        return self


AgentSpec = Annotated[ScriptSpec | LlmAgentSpec, Field(discriminator="kind")]


class ScenarioSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    description: str = ""
    start: str | None = Field(default=None, description="The agent answering the call (default: the first).")
    timezone: str | None = None
    facts: dict[str, Any] = Field(default_factory=dict)
    agents: list[AgentSpec] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _infer_kinds(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("agents"), list):
            data = dict(data)
            facts = data.get("facts")
            data["agents"] = [_with_facts(_with_kind(agent), facts) for agent in data["agents"]]
        return data

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, name: str | None) -> str | None:
        timezone(name)
        return name

    @model_validator(mode="after")
    def _connected(self) -> ScenarioSpec:
        names = [agent.name for agent in self.agents]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"agent names must be unique: {', '.join(duplicates)}")
        if self.start is not None and self.start not in names:
            raise ValueError(f"start agent {self.start!r} is not one of the agents ({', '.join(names)})")
        for agent in self.agents:
            for handoff in agent.handoffs:
                if handoff.to not in names:
                    raise ValueError(f"agent {agent.name!r} hands off to unknown agent {handoff.to!r}")
                if handoff.to == agent.name:
                    raise ValueError(f"agent {agent.name!r} hands off to itself")
                if isinstance(agent, LlmAgentSpec) and not TOOL_NAME.match(f"transfer_to_{handoff.to}"):
                    raise ValueError(
                        f"agent {handoff.to!r} cannot be a handoff target of an LLM agent: its name"
                        " makes the tool transfer_to_<name>, so use letters, digits, '_' or '-'"
                        " (at most 52)"
                    )
        return self

    @property
    def start_agent(self) -> str:
        return self.start or self.agents[0].name


def _with_facts(agent: Any, facts: Any) -> Any:
    """A scripted agent reads the scenario's facts ({facts.hours}) as if they were its own, so a
    fact is written once for every agent; an agent's own `facts:` add to them or override them."""
    if not isinstance(agent, dict) or agent.get("kind") != "scripted" or not isinstance(facts, dict) or not facts:
        return agent
    own = agent.get("facts")
    if own is not None and not isinstance(own, dict):
        return agent  # reported by the agent's validation
    return {**agent, "facts": {**facts, **(own or {})}}


def _with_kind(agent: Any) -> Any:
    if not isinstance(agent, dict) or "kind" in agent:
        return agent
    if "intents" in agent:
        return {**agent, "kind": "scripted"}
    if "prompt" in agent:
        return {**agent, "kind": "llm"}
    return {**agent, "kind": "scripted"}  # reported as a scripted agent missing its intents


# --------------------------------------------------------------------------------------------
# Loading


def load_scenario(path: str | Path) -> ScenarioSpec:
    """Read a scenario (or a single agent) file; any problem raises ScenarioError naming the file."""
    path = Path(path)
    data = read_yaml_mapping(path, "agent file")
    if "agents" in data:
        return _validate(path, data, ScenarioSpec)
    agent = _with_kind(data)
    spec: ScriptSpec | LlmAgentSpec
    if agent.get("kind") == "llm":
        spec = _validate(path, agent, LlmAgentSpec)
    else:
        spec = _validate(path, agent, ScriptSpec)
    return ScenarioSpec(name=spec.name, agents=[spec])


def _validate(path: Path, data: dict[str, Any], model: type[_Model]) -> _Model:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ScenarioError(describe_validation_error(path, data, exc, model)) from None


# --------------------------------------------------------------------------------------------
# Built once at startup


@dataclass
class Member:
    """One agent of a scenario with everything calls share: its model client and its tools."""

    spec: ScriptSpec | LlmAgentSpec
    config: LlmConfig | None = None
    client: Any = None
    prompt: PromptTemplate | None = None
    tools: tuple[Tool, ...] = ()


class Scenario:
    def __init__(self, spec: ScenarioSpec, llm_defaults: LlmConfig | None = None) -> None:
        self.spec = spec
        self.tz = timezone(spec.timezone)
        clients: dict[tuple[Any, ...], Any] = {}
        self.members = {agent.name: _member(agent, llm_defaults or LlmConfig(), clients) for agent in spec.agents}

    @property
    def voices(self) -> set[str]:
        """The voices the agents speak in (loaded at startup, not in the middle of a call)."""
        return {member.spec.voice for member in self.members.values() if member.spec.voice}

    @property
    def uses_llm(self) -> bool:
        return any(member.config is not None for member in self.members.values())

    def agent(self, context: CallContext) -> ScenarioAgent:
        return ScenarioAgent(self, context)

    def warm(self) -> None:
        """Rehearse each LLM agent's first turn, answered in-process (parley.agents.llm.warm_up)."""
        call = ScenarioAgent(self, CallContext("warm-up"))
        for name, member in self.members.items():
            if member.config is None:
                continue

            def rehearsal_agent(client: Any, member: Member = member) -> LlmAgent:
                agent = call._build(dataclasses.replace(member, client=client))
                assert isinstance(agent, LlmAgent)
                return agent

            started = time.perf_counter()
            if warm_up(member.client, rehearsal_agent):
                log.info("agent %s: first request rehearsed in %.0f ms", name, (time.perf_counter() - started) * 1000)


def _member(spec: ScriptSpec | LlmAgentSpec, defaults: LlmConfig, clients: dict[tuple[Any, ...], Any]) -> Member:
    if isinstance(spec, ScriptSpec):
        return Member(spec)
    extra: dict[str, Any] = {"greeting": spec.greeting, "system_prompt": None}
    if spec.fallback is not None:
        extra["fallback_text"] = spec.fallback
    try:
        config = spec.model.apply(defaults, **extra)
        tools = tuple(build_tool(tool) for tool in spec.tools)
        client = _shared_client(config, clients)
    except (ValueError, ToolError) as exc:
        raise ScenarioError(f"agent {spec.name!r}: {exc}") from None
    return Member(spec, config, client, PromptTemplate(spec.prompt), tools)


def _shared_client(config: LlmConfig, clients: dict[tuple[Any, ...], Any]) -> Any:
    """One client (connection pool, or loaded local model) per distinct connection."""
    key = (
        config.provider,
        config.base_url,
        config.azure_endpoint,
        config.api_version,
        config.threads,
        # The secrets themselves: SecretStr compares and prints the same for every key.
        config.api_key.get_secret_value() if config.api_key else None,
        config.azure_ad_token.get_secret_value() if config.azure_ad_token else None,
        id(config.azure_ad_token_provider) if config.azure_ad_token_provider else None,
        config.model if config.provider in ("azure", "llama-cpp") else None,  # bound per deployment/model
    )
    if key not in clients:
        clients[key] = build_client(config)
    return clients[key]


def resolve_agent_path(name_or_path: str) -> Path:
    """A bare name ("pizza", "bank-llm") selects a packaged example; anything else is a path."""
    return resolve_script_path(name_or_path)


def scenario_agent_factory(name_or_path: str, llm_defaults: LlmConfig | None = None) -> AgentFactory:
    """Load, validate and connect the scenario now; build each call's agents per call."""
    scenario = Scenario(load_scenario(resolve_agent_path(name_or_path)), llm_defaults)
    return scenario.agent


# --------------------------------------------------------------------------------------------
# One call


class ScenarioAgent:
    """The call's agent: whichever scenario member is active answers, stamping its voice."""

    def __init__(self, scenario: Scenario, context: CallContext) -> None:
        self.scenario = scenario
        self.context = context
        self.session = CallSession(context, scenario.spec.facts, scenario.tz)
        self.active = scenario.spec.start_agent
        self._agents: dict[str, Agent] = {}
        self._speaker: Agent | None = None  # who said the latest words (truncation goes there)
        self._speaker_offset = 0  # words said earlier in the same turn by others
        self._listener: AgentEventListener | None = None
        self._last_input: UserInput | None = None

    def listen(self, listener: AgentEventListener) -> None:
        """`listener(event_name, **fields)` hears handoffs and tool calls (the call's event log)."""
        self._listener = listener

    def _emit(self, name: str, **fields: Any) -> None:
        if self._listener is not None:
            self._listener(name, **fields)

    # ------------------------------------------------------------------ Agent protocol
    @property
    def voice(self) -> str | None:
        return self.scenario.members[self.active].spec.voice

    @property
    def greeting_interruptible(self) -> bool:
        return self.scenario.members[self.active].spec.greeting_interruptible

    def digits_expected(self) -> int | None:
        agent = self.member(self.active)
        return agent.digits_expected() if isinstance(agent, ExpectsDigits) else None

    def member(self, name: str) -> Agent:
        """The call's instance of agent `name` (made on first use: most calls meet few agents)."""
        if name not in self._agents:
            self._agents[name] = self._build(self.scenario.members[name])
        return self._agents[name]

    def greeting(self) -> str | None:
        agent = self.member(self.active)
        self._speaker, self._speaker_offset = agent, 0
        return agent.greeting()

    async def respond(self, user: UserInput) -> AsyncGenerator[AgentOutput, None]:
        if user is not self._last_input:  # an input answered again (nothing heard) is noted once
            self.session.note(user)
            self._last_input = user
        said_words = 0
        for hop in range(MAX_HANDOFFS_PER_TURN + 1):
            agent = self.member(self.active)
            self._speaker, self._speaker_offset = agent, said_words
            handoff: Handoff | None = None
            async with contextlib.aclosing(agent.respond(user)) as outputs:
                async for output in outputs:
                    if isinstance(output, Handoff):
                        handoff = output
                        break
                    if isinstance(output, Say):
                        output = dataclasses.replace(output, voice=self._voice(self.active))
                        said_words += len(output.text.split())
                    yield output
            if handoff is None:
                return
            if hop == MAX_HANDOFFS_PER_TURN:
                log.warning(
                    "call %s: handoff loop (%d in one turn); staying with %s", self.context.call_id, hop, self.active
                )
                return
            spec = handoff.handoff if isinstance(handoff.handoff, HandoffSpec) else HandoffSpec(to=handoff.to)
            greet = spec.then == "greet" or not self._can_answer(spec.to, user)
            async for output in self._hand_off(agent, spec, said_words, greet=greet):
                said_words += len(output.text.split()) if isinstance(output, Say) else 0
                yield output
            if greet:
                return

    def _can_answer(self, name: str, user: UserInput) -> bool:
        """Whether agent `name` has an answer to `user` of its own. A scripted agent that would
        only say its fallback ("Sorry, I didn't catch that") to the words that brought the caller
        (a key pressed at reception, "check my account") greets instead: the caller hears who
        took over and what they can ask. An LLM agent can always answer."""
        agent = self.member(name)
        return agent.understands(user) if isinstance(agent, ScriptedAgent) else True

    async def _hand_off(
        self, source: Agent, spec: HandoffSpec, said_words: int, *, greet: bool
    ) -> AsyncGenerator[AgentOutput, None]:
        log.info(
            "call %s: handoff %s -> %s (%s, history %s)",
            self.context.call_id,
            self.active,
            spec.to,
            "announced" if spec.announce else "silent",
            spec.history,
        )
        then = "greet" if greet else "respond"
        self._emit(
            "agent_handoff",
            source=self.active,
            target=spec.to,
            announced=bool(spec.announce),
            history=spec.history,
            then=then,
        )
        messages: list[Message] = []
        if spec.history == "shared" and isinstance(source, KeepsHistory):
            # Taken before the announcement is recorded: it closes the source's turn.
            messages = source.history(before_last_input=not greet)
        if spec.announce:
            _record_spoken(source, spec.announce)
            if spec.history == "shared" and greet:
                messages.append({"role": "assistant", "content": spec.announce})
            yield Say(spec.announce, voice=self._voice(self.active))
        target = self.member(spec.to)
        if isinstance(target, KeepsHistory):
            target.adopt_history(messages)
        self.active = spec.to
        if greet:
            greeting = self.scenario.members[spec.to].spec.greeting
            if greeting:
                # The turn's earlier words (the source's reply, the announcement) come first in
                # what the caller heard: the greeting starts after them.
                announced = len(spec.announce.split()) if spec.announce else 0
                self._speaker, self._speaker_offset = target, said_words + announced
                _record_spoken(target, greeting)
                yield Say(greeting, interruptible=self.greeting_interruptible, voice=self._voice(spec.to))

    def record_spoken(self, text: str) -> None:
        """Words said for the active agent outside a reply (the server's own greeting)."""
        agent = self.member(self.active)
        if isinstance(agent, RecordsSpoken):
            agent.record_spoken(text)
            self._speaker, self._speaker_offset = agent, 0

    def truncate_last_reply(self, heard_text: str, *, forget_input: bool = False) -> None:
        """Tell the agent that spoke last what the caller heard of its words."""
        speaker = self._speaker
        if not isinstance(speaker, TruncatesReplies):
            return
        words = heard_text.split()
        speaker.truncate_last_reply(" ".join(words[self._speaker_offset :]), forget_input=forget_input and not words)

    # ------------------------------------------------------------------ helpers
    def _voice(self, name: str) -> str:
        return self.scenario.members[name].spec.voice or ""  # "" = the server's default voice

    def _build(self, member: Member) -> Agent:
        spec = member.spec
        if isinstance(spec, ScriptSpec):
            return ScriptedAgent(spec, self.context)
        assert member.config is not None
        handoffs = [handoff_tool(h.to, _handoff_description(self.scenario, h), h) for h in spec.handoffs]
        return LlmAgent(
            member.config,
            member.client,
            name=spec.name,
            prompt=member.prompt,
            session=self.session,
            toolbox=Toolbox([*member.tools, *handoffs]),
            max_tool_rounds=spec.max_tool_rounds,
            voice=spec.voice,
            greeting_interruptible=spec.greeting_interruptible,
            on_event=self._emit,
        )


def _handoff_description(scenario: Scenario, handoff: HandoffSpec) -> str:
    target = scenario.members[handoff.to].spec
    what = handoff.description or target.description or f"the {handoff.to} agent"
    return f"Hand the caller over to {handoff.to}: {what}"


def _record_spoken(agent: Agent, text: str) -> None:
    if isinstance(agent, KeepsHistory):
        agent.record_spoken(text)
