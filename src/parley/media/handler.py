"""MediaHandler: one call, on the event loop.

    socket ─► codec ─► RecognitionThread (VAD + recognizer) ─► ThreadBridge ─► on_speech_started /
    on_partial / on_final (here, on the loop) ─► BargeInPolicy decides, TurnInbox ─► RouteTurnLoop ─►
    turn task: agent ─► synthesizer ─► Player ─► OutboundWriter ─► socket

Everything here runs on the loop and never blocks: recognition has its own thread, synthesis runs
on a shared executor. A barge-in is a synchronous function: mark the turn dead, queue StopAudio
through the one writer, cancel the turn's task; cleanup is awaited afterwards.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from starlette.websockets import WebSocket, WebSocketState

from parley.engines import Engines
from parley.media.bargein import ActiveTurn, BargeInPolicy, Decision, Signal, SpeechEvidence, is_farewell
from parley.media.bridge import (
    Final,
    OnsetLost,
    Partial,
    SpeechContinues,
    SpeechOnset,
    SpeechStarted,
    ThreadBridge,
)
from parley.media.dtmf import DigitCollector, DigitRules
from parley.media.echo import EchoGate, EchoReference, EchoState
from parley.media.events import CallRegistry, EventLog
from parley.media.limits import (
    BURST_S,
    ERROR_WINDOW_S,
    HANDSHAKE_TIMEOUT,
    MAX_CALL_DURATION,
    MAX_ERRORS,
    Deadlines,
    ErrorWindow,
    InboundRateLimiter,
    message_cost,
)
from parley.media.player import Player
from parley.media.recognition import RecognitionThread, SegmenterConfig
from parley.media.reply import END, Clip, ReplyLimits, ReplyProducer, wait_bounded
from parley.media.turns import Pending, RouteTurnLoop, Turn, TurnInbox
from parley.media.writer import OutboundWriter
from parley.protocols import (
    Agent,
    CallContext,
    CallControl,
    ExpectsDigits,
    Hangup,
    RecordsSpoken,
    ReportsEvents,
    SpeakingPreferences,
    Transfer,
    TruncatesReplies,
    UserInput,
)
from parley.settings import Settings
from parley.transports import acs
from parley.transports.wire import (
    AcsWire,
    MarksPlayout,
    MediaWire,
    Outbound,
    Played,
    StreamEnded,
    StreamStarted,
)

log = logging.getLogger(__name__)

# Messages handled in a row before giving the loop to others: a backlog (or a flood) arrives in
# reads of hundreds of messages, which would otherwise be handled in one uninterrupted step.
_YIELD_EVERY = 16
_LOGGED_ERRORS = 20  # log the first errors in full, then only every 100th
_RECENT_WORDS = 16  # how much of the agent's speech its echo may repeat back
_CAUGHT_UP_FRAMES = 5  # recognition this close behind the line (100 ms) has heard what was said
_RESUME_RECHECK_S = 0.2
_CLOSING_LIMIT_S = 10.0  # finish_politely: the call ends by then even if the closing line has not


class MediaHandler:
    def __init__(
        self,
        *,
        call_id: str,
        settings: Settings,
        engines: Engines,
        correlation_id: str = "",
        caller_id: str = "",
        registry: CallRegistry | None = None,
        wire: MediaWire | None = None,
        agent_name: str = "",
    ) -> None:
        self.call_id = call_id
        self.wire: MediaWire = wire if wire is not None else AcsWire()
        # Hang-up and transfer of the phone call: the engines' (ACS Call Automation) unless a channel
        # sets its own (`call_control`: Twilio's REST API, or None). `control_call_id` is the id it
        # knows the call by (Twilio's CallSid, from the stream's start).
        self._channel_control: CallControl | None = None
        self._channel_control_set = False
        self.control_call_id = call_id
        self.correlation_id = correlation_id
        self.caller_id = caller_id  # for the calls console (masked there): GET /api/calls/live
        self.settings = settings
        self.engines = engines
        self.registry = registry
        self.events = EventLog(call_id, to_log=settings.event_log, mask_dtmf=not settings.log_dtmf)
        self.caller_id = caller_id
        self.agent_name = agent_name  # '' = the server's default agent
        self.agent = self._new_agent(agent_name)
        self.policy = BargeInPolicy(
            partial_min_chars=settings.bargein_partial_chars,
            on_dtmf=settings.bargein_on_dtmf,
            speaking=settings.bargein_speaking,
            thinking=settings.bargein_thinking,
            backchannels=tuple(settings.backchannels),
        )
        self.inbox = TurnInbox(settings.turn_queue_size)
        self.digits = DigitCollector(
            DigitRules(settings.dtmf_interdigit_ms / 1000, settings.dtmf_terminator, settings.dtmf_max_digits)
        )
        self._digit_timer: asyncio.TimerHandle | None = None
        self.route = RouteTurnLoop(self.inbox, self._run_turn, call_id)
        self.format: acs.AudioFormat | None = None
        self.writer: OutboundWriter | None = None
        self.player: Player | None = None
        self.reply: ReplyProducer | None = None
        self.bridge: ThreadBridge | None = None
        self.recognition: RecognitionThread | None = None
        self.echo_reference = EchoReference() if settings.echo_gate else None
        self.frames_in = 0
        self.input_errors = 0
        # Per-call limits (docs/operations.md, "Per-call limits"); the clocks start in run().
        self._errors = ErrorWindow(MAX_ERRORS, ERROR_WINDOW_S)
        self._inbound: InboundRateLimiter | None = None
        self.deadlines: Deadlines | None = None
        self._latest_utterance_id = 0
        self._last_final_utterance_id = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._control_requests: list[asyncio.Task[None]] = []
        self._hangup = asyncio.Event()
        self._end_reason = "caller_hangup"
        self._close_code = 1000
        self._close_reason = ""
        self._finishing = False  # finish_politely was called: the closing line, then the hang-up
        self._closing_done = asyncio.Event()
        self._ending = False  # run() is shutting the call down
        # A goodbye's hang-up (or a transfer) whose turn the caller talked over: carried out after
        # the caller's words are answered, or at once if those words were a farewell.
        self._deferred_control: Hangup | Transfer | None = None

    @property
    def call_control(self) -> CallControl | None:
        return self._channel_control if self._channel_control_set else self.engines.call_control

    @call_control.setter
    def call_control(self, control: CallControl | None) -> None:
        self._channel_control, self._channel_control_set = control, True

    # ------------------------------------------------------------------ socket lifecycle
    async def run(self, websocket: WebSocket) -> None:
        """Serve the call until the caller hangs up, the agent ends it, or the peer misbehaves."""
        self._start_limits(time.monotonic())
        self.writer = OutboundWriter(_sender(websocket), self.events, self.wire.stop)
        self._spawn(self.writer.run(), "writer")
        self._spawn(self._watch_deadlines(), "deadlines")
        self.events.emit("call_started", correlation_id=self.correlation_id)
        if self.registry:
            self.registry.started(self)
        receiving = asyncio.create_task(self._receive(websocket), name=f"receive-{self.call_id}")
        hangup = asyncio.create_task(self._hangup.wait(), name=f"hangup-{self.call_id}")
        try:
            await asyncio.wait([receiving, hangup], return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._ending = True
            for task in (receiving, hangup):
                task.cancel()
            await asyncio.gather(receiving, hangup, return_exceptions=True)
            if not receiving.cancelled() and (error := receiving.exception()) is not None:
                log.error("call %s: ended by an error", self.call_id, exc_info=error)
                self._end_reason = f"error: {type(error).__name__}"
            await self._shutdown()
            await self._close_socket(websocket)

    async def _receive(self, websocket: WebSocket) -> None:
        handled = 0
        while True:
            handled += 1
            if handled % _YIELD_EVERY == 0:
                await asyncio.sleep(0)
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                self._end_reason = f"caller_hangup (code {message.get('code', 1000)})"
                return
            data = message.get("text")
            if data is None:
                data = message.get("bytes") or b""
            self.on_message(data, time.monotonic())
            if self._hangup.is_set():
                return

    async def _close_socket(self, websocket: WebSocket) -> None:
        if websocket.application_state == WebSocketState.CONNECTED:
            try:
                await websocket.close(code=self._close_code, reason=self._close_reason)
            except Exception:  # noqa: BLE001 - already closed from the other side (any transport's error)
                pass

    def _start_limits(self, now: float) -> None:
        settings = self.settings
        self._inbound = InboundRateLimiter(settings.max_inbound_rate, now, BURST_S)
        self.deadlines = Deadlines(
            now,
            handshake_s=settings.handshake_timeout_s,
            idle_s=settings.idle_timeout_s,
            max_call_s=settings.max_call_s,
        )

    async def _watch_deadlines(self) -> None:
        """One timer per call (not one per message): sleeps until the next deadline, looks again."""
        deadlines = self.deadlines
        assert deadlines is not None
        while True:
            now = time.monotonic()
            expired = deadlines.expired(now)
            if expired == MAX_CALL_DURATION:
                log.info("call %s: reached max_call_s (%.0f s); finishing", self.call_id, deadlines.max_call_s)
                self.finish_politely(MAX_CALL_DURATION)
            elif expired == HANDSHAKE_TIMEOUT:
                self._limit_hit(
                    expired, 1008, f"no AudioMetadata or AudioData within {deadlines.handshake_s:g} s of connecting"
                )
                return
            elif expired is not None:
                self._limit_hit(expired, 1008, f"no message for {deadlines.idle_s:g} s")
                return
            await asyncio.sleep(max(0.0, deadlines.next_check() - time.monotonic()))

    def _limit_hit(self, reason: str, close_code: int, detail: str) -> None:
        """A per-call limit closes the socket: one log line (call id, reason, detail), the end reason
        in call_ended, the reason in the close frame."""
        if self._hangup.is_set():
            return
        log.warning("call %s: closing (%d %s): %s", self.call_id, close_code, reason, detail)
        self.end_call(reason, close_code)

    def _spawn(self, coroutine: Coroutine[Any, Any, None], name: str) -> None:
        self._tasks.append(asyncio.create_task(coroutine, name=f"{name}-{self.call_id}"))

    async def _shutdown(self) -> None:
        """End every thread and task of this call, awaiting each one (nothing outlives the call)."""
        if self._digit_timer is not None:  # keys still being collected: nobody is left to answer them
            self._digit_timer.cancel()
            self._digit_timer = None
        if self.bridge:
            self.bridge.close()
        if self.recognition:
            self.recognition.stop()
        if self._control_requests:  # a hang-up request must reach ACS, not die with the call
            await asyncio.wait(self._control_requests, timeout=10)
        for task in reversed(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.recognition:
            await _join_thread(self.recognition)
        self.events.emit(
            "call_ended",
            reason=self._end_reason,
            frames_in=self.frames_in,
            frames_sent=self.writer.frames_sent if self.writer else 0,
            dropped_frames=self.dropped_frames,
            input_errors=self.input_errors,
            echo=self._echo_summary(),
        )
        if self.registry:
            self.registry.ended(self)

    def _echo_summary(self) -> dict[str, object] | None:
        """What the echo gate learnt about this line (read after the recognition thread ended)."""
        gate = self.recognition.echo_gate if self.recognition else None
        if gate is None:
            return None
        return {
            "state": gate.state.value,
            "loss_db": round(gate.loss_db, 1),
            "lag_ms": round(gate.lag_s * 1000),
            "suppressed_windows": gate.suppressed,
        }

    @property
    def dropped_frames(self) -> int:
        return self.recognition.dropped_frames if self.recognition else 0

    @property
    def end_reason(self) -> str:
        return self._end_reason

    def end_call(self, reason: str, close_code: int = 1000) -> None:
        self._end_reason = reason
        self._close_code = close_code
        self._close_reason = reason.encode()[:123].decode(errors="ignore")  # a close reason's limit
        self._hangup.set()

    def finish_politely(self, reason: str) -> None:
        """End the call with a goodbye (server drain, max call duration). Call on the loop.

        Queued inputs are dropped, the current turn is stopped as a barge-in would stop it (StopAudio
        first, none of its audio after), `settings.closing_text` is spoken as a turn the caller cannot
        interrupt, then the call is hung up (through Call Automation when configured) with end reason
        `reason`. Before the media started (no AudioMetadata yet) the call ends at once. Bounded:
        the call ends after `_CLOSING_LIMIT_S` even if the closing line has not finished. A second
        call does nothing.
        """
        if self._finishing or self._ending or self._hangup.is_set():
            return
        self._finishing = True
        log.info("call %s: finishing (%s)", self.call_id, reason)
        if self.player is None or not self.settings.closing_text.strip():
            self._hang_up(Hangup(reason))
            return
        self._deferred_control = None  # whatever the agent wanted, the call ends now
        turn = self.route.current
        if turn is not None and not turn.cancelled:
            self._stop_turn(turn, time.monotonic())
        closing = Pending(
            "closing", None, self._latest_utterance_id, interruptible=False, say=self.settings.closing_text
        )
        self.inbox.close_with(closing)  # nothing the caller says or keys from now on is answered
        self._spawn(self._hang_up_after_closing(reason), "closing")

    async def _hang_up_after_closing(self, reason: str) -> None:
        try:
            async with asyncio.timeout(_CLOSING_LIMIT_S):
                await self._closing_done.wait()
        except TimeoutError:
            log.warning(
                "call %s: the closing line did not end within %.0f s; hanging up", self.call_id, _CLOSING_LIMIT_S
            )
        self._hang_up(Hangup(reason))

    def _new_agent(self, agent_name: str) -> Agent:
        agent = self.engines.factory_for(agent_name)(CallContext(self.call_id, self.correlation_id, self.caller_id))
        if isinstance(agent, ReportsEvents):  # handoffs and tool calls go into the call's events
            agent.listen(self._agent_event)
        return agent

    def _on_stream_started(self, started: StreamStarted) -> None:
        """The channel's handshake: the call's own id (Twilio's CallSid) goes into the events and
        addresses call control; the parameters are named, not logged (they carry phone numbers).
        A channel may name the agent only here (Twilio's `start` parameters)."""
        if started.call_id:
            self.control_call_id = started.call_id
        self.events.emit(
            "stream_started",
            channel=self.wire.name,
            channel_call_id=started.call_id,
            parameters=sorted(started.parameters),
        )
        if self.format is None:  # the agent made at connect has not said a word: it may be replaced
            self._choose_agent(started.parameters.get("agent", ""), started.parameters.get("from", "")[:64])
        self._on_metadata(started.format)

    def _choose_agent(self, wanted: str, caller_id: str) -> None:
        """The agent (and the caller's number, for its prompts) the handshake names."""
        if wanted and wanted != self.agent_name and not self.engines.has_agent(wanted):
            self._input_error(f"the stream asks for agent {wanted!r}, which this server does not load")
            wanted = ""
        changed = bool(wanted) and wanted != self.agent_name
        if caller_id and not self.caller_id:
            self.caller_id = caller_id
            changed = True
        if not changed:
            return
        self.agent_name = wanted or self.agent_name
        self.agent = self._new_agent(self.agent_name)
        if wanted:
            self.events.emit("agent_selected", agent=wanted)

    def _agent_event(self, name: str, /, **fields: Any) -> None:
        if name in ("agent_handoff", "tool_called"):
            self.events.emit(name, **fields)

    # ------------------------------------------------------------------ inbound messages
    def on_message(self, data: str | bytes, arrival_t: float) -> None:
        if self._inbound is None:  # driven without run() (unit tests): the clocks start now
            self._start_limits(arrival_t)
        assert self._inbound is not None and self.deadlines is not None
        # The rate check comes first and is O(1): a flood costs no parsing beyond the cap.
        if not self._inbound.admit(arrival_t, message_cost(len(data))):
            self._limit_hit(
                "inbound_rate_exceeded",
                1008,
                f"inbound media faster than {self._inbound.rate:g}x real time, beyond the burst allowance",
            )
            return
        self.deadlines.message(arrival_t)
        try:
            message = self.wire.parse(data, self.format)
        except acs.AcsProtocolError as exc:
            self._input_error(str(exc), arrival_t)
            return
        if isinstance(message, acs.AudioFrame):
            self._on_audio(message, arrival_t)
        elif isinstance(message, acs.AudioMetadata):
            self._on_metadata(message.format)
        elif isinstance(message, StreamStarted):
            self._on_stream_started(message)
        elif isinstance(message, acs.Dtmf):
            self._on_dtmf(message.digits)
        elif isinstance(message, Played):
            self.on_played(message.name, arrival_t)
        elif isinstance(message, StreamEnded):
            self.end_call(f"caller_hangup ({message.reason or 'stream stopped'})")
        else:
            log.debug("call %s: ignoring %s", self.call_id, type(message).__name__)

    def _on_audio(self, frame: acs.AudioFrame, arrival_t: float) -> None:
        if self.format is None:
            # The codec only lets such a frame through when its length names a supported rate.
            inferred = acs.infer_format(len(frame.pcm))
            assert inferred is not None
            log.warning("call %s: AudioData before AudioMetadata; assuming %d Hz", self.call_id, inferred.sample_rate)
            self._start_media(inferred)
        self.frames_in += 1
        assert self.recognition is not None  # started with the media, above or at AudioMetadata
        self.recognition.submit(frame.pcm, arrival_t, sound=not frame.silent)

    def on_played(self, name: str, arrival_t: float) -> None:
        """The far end reports it has played up to the mark `name` (wires that mark playout): what
        the caller heard (history truncation, the resume point) follows it from now on."""
        if self.player is None or not self.player.played(name, arrival_t):
            log.debug("call %s: mark %s says nothing new about playout", self.call_id, name)

    def _on_metadata(self, audio_format: acs.AudioFormat) -> None:
        if self.format is None:
            self._start_media(audio_format)
        elif audio_format.sample_rate != self.format.sample_rate:
            self._input_error(
                f"AudioMetadata changed the sample rate from {self.format.sample_rate} to "
                f"{audio_format.sample_rate} Hz mid-call; keeping {self.format.sample_rate} Hz"
            )

    def _input_error(self, message: str, now: float | None = None) -> None:
        self.input_errors += 1
        if self.input_errors <= _LOGGED_ERRORS or self.input_errors % 100 == 0:
            log.error("call %s: bad inbound message (#%d): %s", self.call_id, self.input_errors, message)
            self.events.emit("input_error", error=message, count=self.input_errors)
        if self._errors.add(time.monotonic() if now is None else now):
            self._limit_hit("protocol_errors", 1007, f"more than {MAX_ERRORS} bad messages within {ERROR_WINDOW_S:g} s")

    def _start_media(self, audio_format: acs.AudioFormat) -> None:
        """The handshake is done: only now are engines taken from the pools (the recognition thread)."""
        self.format = audio_format
        if self.deadlines is not None:
            self.deadlines.handshake_done()
        assert self.writer is not None
        self.player = Player(
            self.writer,
            audio_format.frame_bytes,
            self.settings.playout_lead_ms,
            self.echo_reference,
            encode=self.wire.audio,
            mark=self.wire.mark if isinstance(self.wire, MarksPlayout) else None,
        )
        self.reply = ReplyProducer(
            call_id=self.call_id,
            agent=self.agent,
            synthesizer_for=self.engines.synthesizer_for,
            events=self.events,
            sample_rate=audio_format.sample_rate,
            limits=ReplyLimits(self.settings.agent_timeout_s, self.settings.turn_cleanup_timeout_s),
            apology_text=self.settings.apology_text,
        )
        self.bridge = ThreadBridge(asyncio.get_running_loop(), self)
        self.recognition = RecognitionThread(
            call_id=self.call_id,
            input_rate=audio_format.sample_rate,
            vads=self.engines.vads,
            recognizers=self.engines.recognizers,
            bridge=self.bridge,
            config=SegmenterConfig(
                threshold=self.settings.vad_threshold,
                speech_start_ms=self.settings.speech_start_ms,
                onset_events=self.settings.bargein_onset and self.policy.pauses_on_onset,
                onset_rise_db=self.settings.onset_rise_db,
                onset_min_dbfs=self.settings.onset_min_dbfs,
                endpoint_silence_ms=self.settings.endpoint_silence_ms,
                preroll_ms=self.settings.preroll_ms,
                max_utterance_s=self.settings.max_utterance_s,
                early_final_ms=self.settings.early_final_ms,
                long_speech_ms=self.settings.bargein_confirm_ms,
                turn_detector=self.engines.turn_detector,
                turn_short_silence_ms=self.settings.turn_short_silence_ms,
                turn_max_silence_ms=self.settings.turn_max_silence_ms,
            ),
            capacity=self.settings.inbound_queue_frames,
            final_pass=self.engines.final_pass,
            echo_gate=EchoGate(self.echo_reference) if self.echo_reference else None,
        )
        self.recognition.start()
        self._spawn(self.route.run(), "route-turns")
        self._queue_greeting()

    def _queue_greeting(self) -> None:
        text = self.settings.greeting if self.settings.greeting is not None else self.agent.greeting()
        if not text:
            return
        if self.settings.greeting is not None and isinstance(self.agent, RecordsSpoken):
            self.agent.record_spoken(text)  # the agent's own greeting records itself; this one is ours
        interruptible = self.settings.greeting_interruptible
        if interruptible is None:
            interruptible = self.agent.greeting_interruptible if isinstance(self.agent, SpeakingPreferences) else True
        self.inbox.put(Pending("greeting", None, 0, interruptible, say=text))

    # ------------------------------------------------------------------ speech events (from the bridge)
    def on_speech_onset(self, event: SpeechOnset) -> None:
        if self.route.current is not None:  # only onsets over a turn are worth a record (they may pause it)
            self.events.emit(
                "speech_onset",
                t=event.detected_t,
                utterance_id=event.utterance_id,
                onset_t=event.onset_t,
                cue=event.cue,
            )
        self._consider_barge_in(Signal("onset", event.utterance_id))

    def on_onset_lost(self, event: OnsetLost) -> None:
        self._consider_barge_in(Signal("onset_lost", event.utterance_id))

    def on_speech_started(self, event: SpeechStarted) -> None:
        self._latest_utterance_id = max(self._latest_utterance_id, event.utterance_id)
        self.events.emit("speech_started", t=event.detected_t, utterance_id=event.utterance_id, onset_t=event.onset_t)
        self.inbox.hold()  # answer once the caller has finished, everything they said at once
        self._consider_barge_in(Signal("vad", event.utterance_id))

    def on_speech_continues(self, event: SpeechContinues) -> None:
        self._consider_barge_in(Signal("continues", event.utterance_id))

    def on_partial(self, event: Partial) -> None:
        self.events.emit("partial", t=event.t, utterance_id=event.utterance_id, text=event.text)
        self._consider_barge_in(Signal("partial", event.utterance_id, event.text))

    def on_final(self, event: Final) -> None:
        self.events.emit(
            "speech_ended",
            t=event.endpoint_t or event.t,
            utterance_id=event.utterance_id,
            speech_end_t=event.speech_end_t,
        )
        self.events.emit(
            "final",
            t=event.t,
            utterance_id=event.utterance_id,
            text=event.text,
            speech_end_t=event.speech_end_t,
            voiced_ms=event.voiced_ms,
            avg_logprob=None if event.avg_logprob is None else round(event.avg_logprob, 3),
            no_speech_prob=None if event.no_speech_prob is None else round(event.no_speech_prob, 3),
        )
        evidence = SpeechEvidence(event.voiced_ms, event.avg_logprob, event.no_speech_prob)
        decision = self._consider_barge_in(Signal("final", event.utterance_id, event.text, evidence))
        if self._deferred_control is not None and is_farewell(event.text):
            self._carry_out(self._take_deferred_control(), "farewell")  # "thanks, bye" over the goodbye
        elif event.text.strip() and not decision.said_over_agent:
            self.inbox.put(Pending("speech", UserInput("speech", text=event.text), event.utterance_id))
        self._last_final_utterance_id = max(self._last_final_utterance_id, event.utterance_id)
        if event.utterance_id >= self._latest_utterance_id:
            self.inbox.release()  # (a second-pass final may arrive after the next utterance began)

    def on_recognition_failed(self, message: str) -> None:
        self.events.emit("input_error", error=message)
        self.inbox.release()  # never leave turns held waiting for a final that cannot come
        turn = self.route.current
        if turn is not None and turn.interruption_pending:
            self._resume(turn, "recognition_failed")

    def _on_dtmf(self, digits: str) -> None:
        if len(digits) > self.settings.max_dtmf_message_digits:  # not processed; the keys not logged
            self._input_error(
                f"DtmfData with {len(digits)} keys (max_dtmf_message_digits is"
                f" {self.settings.max_dtmf_message_digits}); ignored"
            )
            return
        self.events.emit("dtmf", digits=digits)
        self._consider_barge_in(Signal("dtmf"))
        for entered in self.digits.press(digits, self._digits_expected()):
            self._queue_digits(entered)
        if self._digit_timer is not None:
            self._digit_timer.cancel()
            self._digit_timer = None
        if self.digits.collecting:
            self._digit_timer = asyncio.get_running_loop().call_later(
                self.digits.rules.interdigit_s, self._digits_timed_out, self.digits.generation
            )

    def _digits_timed_out(self, generation: int) -> None:
        self._digit_timer = None
        entered = self.digits.expire(generation)
        if entered:
            self._queue_digits(entered)

    def _queue_digits(self, digits: str) -> None:
        self.events.emit("dtmf_input", digits=digits)
        self.inbox.put(Pending("dtmf", UserInput("dtmf", digits=digits), self._latest_utterance_id))

    def _digits_expected(self) -> int | None:
        return self.agent.digits_expected() if isinstance(self.agent, ExpectsDigits) else None

    # ------------------------------------------------------------------ barge-in
    def _consider_barge_in(self, signal: Signal) -> Decision:
        turn = self.route.current
        now = time.monotonic()
        active = None
        if turn is not None and not turn.cancelled:
            active = self._active_turn(turn, now)
        decision = self.policy.decide(signal, active)
        if turn is None or active is None:
            return decision
        if decision.action == "cancel":
            self._barge_in(turn, decision.reason)
        elif decision.action in ("pause", "hold"):
            self._hold(turn, now, pause=decision.action == "pause", signal=signal)
        elif decision.action == "resume":
            self._resume(turn, decision.reason)
        elif signal.trigger not in ("partial", "final", "timeout", "onset", "onset_lost"):
            self.events.emit("barge_in_ignored", turn_id=active.turn_id, reason=decision.reason, trigger=signal.trigger)
        return decision

    def _active_turn(self, turn: Turn, now: float) -> ActiveTurn:
        track = self.player.track_of(turn.id) if self.player else None
        interruptible = turn.interruptible
        segment = track.segment_at(now) if track else None
        if segment is not None and not segment.interruptible:
            interruptible = False
        speaking = track is not None and track.start_t is not None
        recent = " ".join(track.played_text(now).split()[-_RECENT_WORDS:]) if track else ""
        return ActiveTurn(
            turn.id,
            interruptible,
            turn.source_utterance_id,
            state="speaking" if speaking else "thinking",
            pending=turn.interruption_pending,
            pending_onset=turn.pending_onset,
            recent_text=recent,
            line_echo=self._line_may_echo(),
        )

    def _line_may_echo(self) -> bool:
        """False once the echo gate has learnt that this line carries no echo of the agent."""
        gate = self.recognition.echo_gate if self.recognition else None
        return gate is None or gate.state is not EchoState.NONE

    def _barge_in(self, turn: Turn, trigger: str) -> None:
        """Synchronous on purpose: StopAudio is queued before anything else can run on the loop."""
        now = time.monotonic()
        self.events.emit("barge_in_decided", t=now, turn_id=turn.id, trigger=trigger)
        if turn.interruption_pending:
            self.events.emit("barge_in_confirmed", t=now, turn_id=turn.id, reason=trigger)
        self._stop_turn(turn, now)
        if turn.control is not None:  # the caller talked over a goodbye (or a "please hold")
            self._deferred_control = turn.control
            self.events.emit("control_deferred", turn_id=turn.id, control=type(turn.control).__name__)
        self.inbox.drop_greetings()
        if turn.heard_ms == 0 and turn.user is not None and not (trigger == "dtmf" and turn.kind == "dtmf"):
            # The caller heard none of this answer: answer that input together with what comes next
            # (not a key input cut by the next key: the caller has moved on to a new one).
            self.inbox.put_back(Pending(turn.kind, turn.user, turn.source_utterance_id))

    def _stop_turn(self, turn: Turn, now: float) -> None:
        """Cancel `turn` at once: StopAudio queued ahead of everything (none of its audio follows),
        its agent and task cancelled, what the caller heard of it recorded."""
        assert self.writer is not None and self.player is not None
        turn.cancelled = True
        track = self.player.track_of(turn.id)
        self.writer.stop_audio(turn.id, send_stop=not (track is not None and track.paused))
        if turn.agent_task is not None:
            turn.agent_task.cancel()  # the agent's stream closes next, whatever TTS is doing
        turn.heard_ms = track.heard_ms(now) if track else 0.0
        turn.heard_text = track.heard_text(now) if track else ""
        self.player.cut(now)
        if turn.task is not None:
            turn.task.cancel()
        self._tell_agent_what_was_heard(turn)

    def _tell_agent_what_was_heard(self, turn: Turn) -> None:
        """An agent that keeps history (an LLM) remembers only the part of its reply the caller
        heard; if none was heard the input is answered again, so it forgets that too."""
        if isinstance(self.agent, TruncatesReplies) and turn.agent_started:
            self.agent.truncate_last_reply(turn.heard_text, forget_input=turn.heard_ms == 0 and turn.user is not None)

    def _hold(self, turn: Turn, now: float, *, pause: bool, signal: Signal) -> None:
        """A possible barge-in: stop the audio at once (pause) or keep talking (hold) until proof.

        An onset pauses and waits only `onset_resume_ms` for sustained speech; sustained speech
        (after an onset, or alone) waits `resume_after_ms` for words."""
        assert self.writer is not None and self.player is not None
        onset = signal.trigger == "onset"
        turn.interruption_pending = True
        turn.pending_onset = onset
        turn.pending_count += 1
        track = self.player.track_of(turn.id)
        if not (track is not None and track.paused):  # (sustained speech after an onset: paused already)
            heard = None
            if pause and track is not None:
                self.writer.pause_audio(turn.id)
                heard = round(self.player.pause(track, now), 1)
            self.events.emit(
                "barge_in_paused" if pause else "barge_in_pending",
                t=now,
                turn_id=turn.id,
                utterance_id=signal.utterance_id,
                heard_ms=heard,
                trigger=signal.trigger,
            )
        wait_ms = self.settings.onset_resume_ms if onset else self.settings.resume_after_ms
        asyncio.get_running_loop().call_later(wait_ms / 1000, self._on_pending_timeout, turn, turn.pending_count)

    def _on_pending_timeout(self, turn: Turn, pending_count: int) -> None:
        if turn.cancelled or not turn.interruption_pending or turn.pending_count != pending_count:
            return
        if self.route.current is not turn:
            return
        if self._caller_may_be_speaking():
            # Under load recognition can run seconds behind: resuming now would talk over a caller
            # whose words have not been heard yet. Look again shortly; the final decides anyway.
            asyncio.get_running_loop().call_later(_RESUME_RECHECK_S, self._on_pending_timeout, turn, pending_count)
            return
        self._consider_barge_in(Signal("timeout"))

    def _caller_may_be_speaking(self) -> bool:
        """The caller's utterance has not ended yet, or recognition has not caught up with the line."""
        behind = self.recognition is not None and self.recognition.backlog > _CAUGHT_UP_FRAMES
        return behind or self._latest_utterance_id > self._last_final_utterance_id

    def _resume(self, turn: Turn, reason: str) -> None:
        """A false interruption (no words, a backchannel, our echo): carry on with the reply."""
        assert self.player is not None
        brief = turn.pending_onset
        turn.interruption_pending = False
        turn.pending_onset = False
        track = self.player.track_of(turn.id)
        position = None
        if track is not None and track.paused:
            # A pause on an onset alone (at most onset_resume_ms) was barely a gap: go on where it
            # stopped. After sustained sound the caller has lost the thread: replay the clause.
            position = round(self.player.resume(track, replay_clause=not brief), 1)
        self.events.emit("barge_in_resumed", t=time.monotonic(), turn_id=turn.id, reason=reason, from_ms=position)

    # ------------------------------------------------------------------ one turn
    async def _run_turn(self, turn: Turn) -> None:
        assert self.player is not None
        self.events.emit(
            "turn_started",
            turn_id=turn.id,
            kind=turn.kind,
            input=(turn.user.text or turn.user.digits) if turn.user else turn.say,
        )
        track = self.player.begin(turn.id)
        clips: asyncio.Queue[object] = asyncio.Queue(maxsize=64)
        assert self.reply is not None
        producer = asyncio.create_task(self.reply.produce(turn, clips), name=f"produce-{self.call_id}-{turn.id}")
        hangup: Hangup | Transfer | None = None
        try:
            while (item := await clips.get()) is not END:
                if isinstance(item, Hangup | Transfer):
                    hangup = item
                elif isinstance(item, Clip):
                    await self.player.play(track, item.pcm, item.text, item.interruptible)
            await producer
            await self.player.finish(track)
            self.events.emit(
                "turn_completed",
                turn_id=turn.id,
                audio_ms=track.sent_ms,
                text=" ".join(segment.text for segment in track.segments),
            )
        except asyncio.CancelledError:
            self.events.emit(
                "turn_cancelled",
                turn_id=turn.id,
                heard_ms=round(turn.heard_ms, 1),
                heard_text=turn.heard_text,
                audio_ms=track.sent_ms,
            )
            raise
        except Exception as exc:
            log.exception("call %s: turn %d failed", self.call_id, turn.id)
            self.events.emit("turn_cancelled", turn_id=turn.id, error=str(exc), audio_ms=track.sent_ms)
            return
        finally:
            producer.cancel()
            await wait_bounded(
                producer, self.settings.turn_cleanup_timeout_s, f"call {self.call_id}: turn {turn.id}'s audio producer"
            )
            if turn.kind == "closing":
                self._closing_done.set()
        if hangup is None and self._deferred_control is not None:
            hangup = self._take_deferred_control()  # the caller's last words are answered: now end
        if hangup is not None:
            self._carry_out(hangup, "agent")

    def _take_deferred_control(self) -> Hangup | Transfer:
        control, self._deferred_control = self._deferred_control, None
        assert control is not None
        return control

    def _carry_out(self, control: Hangup | Transfer, why: str) -> None:
        log.info("call %s: %s (%s)", self.call_id, type(control).__name__.lower(), why)
        if isinstance(control, Transfer):
            self._transfer(control)
        else:
            self._hang_up(control)

    def _hang_up(self, hangup: Hangup) -> None:
        """End the call: for everyone through Call Automation when configured, and the media here."""
        control = self.call_control
        if control is not None:
            self._request(control.hang_up(self.control_call_id), "hang up")
        self.end_call(hangup.reason)

    def _transfer(self, transfer: Transfer) -> None:
        """The media socket cannot move a call: Call Automation does (the media stream then ends
        and the socket closes). Without it the call ends here, saying why."""
        self.events.emit("transfer_requested", target=transfer.target, reason=transfer.reason)
        control = self.call_control
        if control is not None:
            self._request(control.transfer(self.control_call_id, transfer.target), "transfer")
            return
        log.warning(
            "call %s: the agent asked to transfer to %s, but no call control (ACS Call "
            "Automation) is configured; ending the call",
            self.call_id,
            transfer.target,
        )
        self.end_call(f"transfer_unavailable:{transfer.target}")

    def _request(self, request: Awaitable[None], what: str) -> None:
        """A call-control request runs to its end even when the call ends now (shutdown waits)."""
        task = asyncio.create_task(self._call_control(request, what), name=f"{what}-{self.call_id}")
        self._control_requests.append(task)

    async def _call_control(self, request: Awaitable[None], what: str) -> None:
        try:
            await request
        except Exception as exc:  # noqa: BLE001 - a failed request must not take the call down
            log.error("call %s: %s failed: %s", self.call_id, what, exc)
            self.events.emit("input_error", error=f"{what} failed: {exc}")
            control = self.call_control
            if what == "transfer" and control is not None:
                # Closing the media socket alone would leave the caller on a silent line.
                self._request(control.hang_up(self.control_call_id), "hang up")
            self.end_call(f"{what}_failed")


def _sender(websocket: WebSocket) -> Callable[[Outbound], Awaitable[None]]:
    """Text messages as text frames, bytes as binary ones; an empty message is nothing to send (a
    wire's message it could not address, e.g. Twilio's before its stream started)."""

    async def send(message: Outbound) -> None:
        if not message:
            return
        if isinstance(message, str):
            await websocket.send_text(message)
        else:
            await websocket.send_bytes(message)

    return send


async def _join_thread(recognition: RecognitionThread, within_s: float = 5.0) -> None:
    """Wait for the recognition thread without blocking the loop or borrowing an executor thread
    (a thread has no awaitable end: poll its liveness)."""
    deadline = time.monotonic() + within_s
    while recognition.alive and time.monotonic() < deadline:  # noqa: ASYNC110 - polling a thread
        await asyncio.sleep(0.005)
    if recognition.alive:
        log.error("recognition thread did not stop within %.1f s", within_s)
