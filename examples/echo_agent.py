"""A custom parley agent written in Python: it says back what the caller said.

    python examples/echo_agent.py                       # ws://127.0.0.1:8000/ws/acs, this agent
    parley call my_question.wav --url ws://127.0.0.1:8000/ws/acs

Only the agent is replaced: recognition and synthesis are the server's usual engines, configured
by the PARLEY_* settings (PARLEY_PORT, PARLEY_TTS...). tests/test_extending.py makes a real call
to it, and docs/extending.md walks through it.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

from parley.engines import Engines, build_engines
from parley.protocols import AgentOutput, CallContext, Hangup, Say, UserInput
from parley.settings import Settings


class EchoAgent:
    """Repeats each caller turn; a "bye" ends the call. The server builds one per call.

    It implements `parley.protocols.Agent` (greeting, respond) and, optionally,
    `SpeakingPreferences` (voice, greeting_interruptible). It keeps no history, so it does not
    implement `TruncatesReplies`: after a barge-in there is nothing to correct.
    """

    voice: str | None = None  # None: the server's default voice
    greeting_interruptible = True  # the caller may talk over the greeting

    def __init__(self, context: CallContext) -> None:
        self.context = context  # call_id, caller_id... (unused here)

    def greeting(self) -> str | None:
        return "Echo here. Say something and I will say it back."

    async def respond(self, user: UserInput) -> AsyncGenerator[AgentOutput, None]:
        if user.kind == "dtmf":
            yield Say(f"You pressed {' '.join(user.digits)}.")
            return
        text = user.text.strip().rstrip(".?!")
        yield Say(f"You said: {text}.")
        if "bye" in text.lower():  # "goodbye", "good bye", "bye now"
            yield Say("Goodbye!", interruptible=False)
            yield Hangup("caller_said_goodbye")  # after what was said before it has played


def echo_engines(settings: Settings) -> Engines:
    """The engines the settings name (the embedded ones by default), EchoAgent answering calls."""
    engines = build_engines(settings)
    engines.agent_factory = EchoAgent  # any callable CallContext -> Agent
    return engines


def main() -> None:
    import uvicorn

    from parley import logs
    from parley.server import create_app, uvicorn_config
    from parley.settings import load_settings

    settings = load_settings()
    logs.configure(settings.log_level)
    app = create_app(settings, echo_engines(settings))
    uvicorn.Server(uvicorn_config(app, settings)).run()


if __name__ == "__main__":
    main()
