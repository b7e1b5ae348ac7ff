"""ACS Call Automation: answer incoming calls, place calls, hang up and transfer (`CallControl`).

One `CallAutomation` per server, built from Settings (`from_settings`, None without ACS). It talks to
ACS through Microsoft's async SDK (`azure.communication.callautomation.aio`, on aiohttp) and keeps a
small book of the calls it answered or placed:

- every call gets a key of ours before ACS knows it (the call connection id only exists once the
  call is answered or created), used in its callback URL `/api/acs/callbacks/<key>` and in its media
  URL `wss://.../ws/acs?callId=<key>`;
- ACS's call connection id (from the answer / create response, or the first callback) is indexed
  next to it, so `hang_up(call_id)` works with either id: the media stream's
  `x-ms-call-connection-id` header, or our key when a stream came without that header.

Callbacks about a call go into its media call's event log (`acs_event`); those arriving before the
media stream connects are held (a few per call) and written when it does.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from azure.communication.callautomation import (
    AudioFormat,
    CommunicationIdentifier,
    CommunicationUserIdentifier,
    MediaStreamingAudioChannelType,
    MediaStreamingContentType,
    MediaStreamingOptions,
    PhoneNumberIdentifier,
    StreamingTransportType,
)
from azure.communication.callautomation.aio import CallAutomationClient
from azure.core.exceptions import AzureError, HttpResponseError, ResourceNotFoundError

from parley.acs import config as acs_config
from parley.acs.config import CallTarget
from parley.acs.shared import SharedCalls, call_fields
from parley.acs.webhooks import CallbackEvent, IncomingCall
from parley.media.events import CallRegistry, EventLog
from parley.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

# The SDK's defaults (300 s timeouts, 10 retries with up to 2 minutes between them) suit batch jobs,
# not a phone ringing: an answer that comes a minute late answers nobody.
DEFAULT_CLIENT_OPTIONS: dict[str, Any] = {"connection_timeout": 10, "read_timeout": 20, "retry_total": 2}
CALLS_KEPT = 1000  # calls remembered (to map ids and route late callbacks), oldest forgotten first
EARLY_EVENTS_KEPT = 32  # callbacks held per call until its media stream connects


class CallAutomationError(Exception):
    """A Call Automation request failed. The message is safe to log and to return to a client."""


class OutboundCallRefused(ValueError):
    """An outbound call request that cannot be placed as asked (the client's mistake: HTTP 400)."""


@dataclass
class AcsCall:
    """A call this server answered or placed."""

    key: str  # ours: in the callback and media URLs
    direction: Literal["inbound", "outbound"]
    party: str = ""  # who is on the other end: the caller (inbound) or the callee (outbound)
    correlation_id: str = ""
    agent: str = ""  # the agent its media stream asks for ('' = the server's default)
    connection_id: str | None = None  # ACS's call connection id, once known
    media_call_id: str | None = None  # the media call's id in the CallRegistry, once it connected
    disconnected: bool = False  # ACS said CallDisconnected: no media socket may open for it any more
    early_events: deque[tuple[float, dict[str, Any]]] = field(default_factory=lambda: deque(maxlen=EARLY_EVENTS_KEPT))


class CallBook:
    """Calls by our key and by ACS call connection id; bounded, the least recently added go first."""

    def __init__(self, capacity: int = CALLS_KEPT) -> None:
        self._by_key: OrderedDict[str, AcsCall] = OrderedDict()
        self._key_by_connection: dict[str, str] = {}
        self._capacity = capacity

    def __len__(self) -> int:
        return len(self._by_key)

    def new(self, direction: Literal["inbound", "outbound"], party: str, correlation_id: str = "") -> AcsCall:
        return self.add(AcsCall(uuid.uuid4().hex, direction, party=party, correlation_id=correlation_id))

    def add(self, call: AcsCall) -> AcsCall:
        """Keep `call` (a new one, or one another instance answered, read from the shared book)."""
        self._by_key[call.key] = call
        if call.connection_id:
            self._key_by_connection[call.connection_id] = call.key
        while len(self._by_key) > self._capacity:
            self.forget(next(iter(self._by_key.values())))
        return call

    def connected(self, call: AcsCall, connection_id: str) -> None:
        """ACS named the call: index it by its call connection id too."""
        if connection_id and call.key in self._by_key:
            call.connection_id = connection_id
            self._key_by_connection[connection_id] = call.key

    def forget(self, call: AcsCall) -> None:
        self._by_key.pop(call.key, None)
        if call.connection_id is not None:
            self._key_by_connection.pop(call.connection_id, None)

    def by_key(self, key: str) -> AcsCall | None:
        return self._by_key.get(key)

    def find(self, call_id: str) -> AcsCall | None:
        """The call whose key or call connection id this is."""
        key = self._key_by_connection.get(call_id, call_id)
        return self._by_key.get(key)


class CallAutomation:
    """Answers, places and controls calls through ACS; also parley's `CallControl`."""

    def __init__(
        self,
        client: CallAutomationClient,
        *,
        callback_base_url: str,
        sample_rate: int = 16000,
        audio_channel: Literal["mixed", "unmixed"] = "mixed",
        source_caller_id: str | None = None,
        registry: CallRegistry | None = None,
        on_close: list[Callable[[], Awaitable[object]]] | None = None,
    ) -> None:
        self.client = client
        self.callback_base_url = acs_config.public_base_url(callback_base_url)
        self.sample_rate = sample_rate
        self.audio_channel = audio_channel
        self.source_caller_id = source_caller_id
        self.registry = registry
        self.calls = CallBook()
        # Many instances (parley.cluster): the book they all read and write, next to this one's.
        # None: one process, this book is the only one.
        self.shared: SharedCalls | None = None
        self._on_close = on_close or []
        # Called number -> agent name (Settings.agent_for_number); None: the default agent.
        self.agent_for_number: Callable[[str], str | None] = lambda _number: None

    @classmethod
    def from_settings(
        cls, settings: Settings, registry: CallRegistry | None = None, **client_options: Any
    ) -> CallAutomation | None:
        """The service, or None when ACS is not configured. `client_options` go to the SDK client
        (azure-core transport options, e.g. `connection_verify` for a private CA)."""
        if not settings.acs_configured:
            return None
        assert settings.acs_callback_url is not None  # Settings requires it with ACS
        _require_aiohttp()
        options = DEFAULT_CLIENT_OPTIONS | client_options
        on_close: list[Callable[[], Awaitable[object]]] = []
        if settings.acs_connection_string is not None:
            secret = settings.acs_connection_string.get_secret_value()
            client = CallAutomationClient.from_connection_string(secret, **options)
        else:
            assert settings.acs_endpoint is not None
            credential = _entra_credential()
            on_close.append(credential.close)
            client = CallAutomationClient(settings.acs_endpoint, credential, **options)
        service = cls(
            client,
            callback_base_url=settings.acs_callback_url,
            sample_rate=settings.acs_sample_rate,
            audio_channel=settings.acs_audio_channel,
            source_caller_id=settings.acs_source_caller_id,
            registry=registry,
            on_close=on_close,
        )
        service.agent_for_number = settings.agent_for_number
        log.info("ACS Call Automation on: callbacks and media at %s", service.callback_base_url)
        return service

    async def close(self) -> None:
        await self.client.close()
        for close in self._on_close:
            await close()

    # ------------------------------------------------------------------ what we ask ACS for

    def callback_url(self, call: AcsCall) -> str:
        return acs_config.callback_url(self.callback_base_url, call.key)

    def media_streaming(self, call: AcsCall) -> MediaStreamingOptions:
        """Bidirectional audio over our WebSocket from the moment the call connects, with DTMF."""
        return MediaStreamingOptions(
            transport_url=acs_config.media_url(self.callback_base_url, call.key, call.party, call.agent),
            transport_type=StreamingTransportType.WEBSOCKET,
            content_type=MediaStreamingContentType.AUDIO,
            audio_channel_type=(
                MediaStreamingAudioChannelType.UNMIXED
                if self.audio_channel == "unmixed"
                else MediaStreamingAudioChannelType.MIXED
            ),
            start_media_streaming=True,
            enable_bidirectional=True,
            audio_format=AudioFormat.PCM24_K_MONO if self.sample_rate == 24000 else AudioFormat.PCM16_K_MONO,
            enable_dtmf_tones=True,  # agents take key presses (DtmfData on the media stream)
        )

    # ------------------------------------------------------------------ inbound and outbound calls

    async def answer(self, incoming: IncomingCall) -> AcsCall:
        """Answer an IncomingCall event, streaming its media to us. CallAutomationError on failure."""
        call = self.calls.new("inbound", incoming.caller, incoming.correlation_id)
        call.agent = self.agent_for_number(incoming.callee) or ""  # agents by called number
        await self._share(call)  # before ACS may dial the media URL, which any instance may receive
        try:
            answered = await self._ask(
                "answer call",
                self.client.answer_call(
                    incoming_call_context=incoming.incoming_call_context,
                    callback_url=self.callback_url(call),
                    media_streaming=self.media_streaming(call),
                ),
            )
        except CallAutomationError:
            await self._forget(call)
            raise
        self.calls.connected(call, answered.call_connection_id or "")
        await self._share(call)
        log.info(
            "answered a call from %s to %s: call %s, connection %s",
            mask_party(incoming.caller),
            mask_party(incoming.callee),
            call.key,
            call.connection_id,
        )
        return call

    async def place_call(self, target: CallTarget, source_caller_id: str | None = None) -> AcsCall:
        """Call a phone number (shown our source caller id) or an ACS user, streaming media to us."""
        caller_number = source_caller_id or self.source_caller_id
        if target.kind == "phone" and not caller_number:
            raise OutboundCallRefused(
                "calling a phone number needs a source caller id: set PARLEY_ACS_SOURCE_CALLER_ID to"
                " a number of the ACS resource (or pass source_caller_id)"
            )
        call = self.calls.new("outbound", target.value)
        await self._share(call)
        try:
            created = await self._ask(
                "create call",
                self.client.create_call(
                    target_participant=identifier_for(target),
                    callback_url=self.callback_url(call),
                    source_caller_id_number=PhoneNumberIdentifier(caller_number)
                    if target.kind == "phone" and caller_number
                    else None,
                    media_streaming=self.media_streaming(call),
                ),
            )
        except CallAutomationError:
            await self._forget(call)
            raise
        self.calls.connected(call, created.call_connection_id or "")
        await self._share(call)
        log.info("placed a call to %s: call %s, connection %s", mask_party(target.value), call.key, call.connection_id)
        return call

    # ------------------------------------------------------------------ CallControl

    async def hang_up(self, call_id: str) -> None:
        """End the call for everyone. A call ACS no longer knows is already over: not an error."""
        connection_id = self._connection_id(call_id)
        connection = self.client.get_call_connection(connection_id)
        try:
            await self._ask("hang up", connection.hang_up(is_for_everyone=True))
        except CallAutomationError as exc:
            if isinstance(exc.__cause__, ResourceNotFoundError):
                log.info("call %s: already over at ACS (hang up: 404)", call_id)
                return
            raise
        log.info("call %s: hung up (connection %s)", call_id, connection_id)

    async def transfer(self, call_id: str, target: str) -> None:
        """Transfer the caller to a phone number (E.164) or an ACS user (8:acs:...)."""
        parsed = acs_config.parse_target(target)  # AcsConfigError (a ValueError) on a bad target
        connection_id = self._connection_id(call_id)
        connection = self.client.get_call_connection(connection_id)
        await self._ask("transfer", connection.transfer_call_to_participant(identifier_for(parsed)))
        log.info("call %s: transfer to %s accepted by ACS", call_id, mask_party(parsed.value))

    def _connection_id(self, call_id: str) -> str:
        """ACS's call connection id for a media call id (already one, or a key of ours)."""
        call = self.calls.find(call_id)
        if call is None:
            return call_id  # the media stream's x-ms-call-connection-id: ACS's own id
        if call.connection_id is None:
            raise CallAutomationError(f"call {call_id}: ACS has not named this call yet")
        return call.connection_id

    # ------------------------------------------------------------------ callbacks and event logs

    def on_callback(self, key: str, event: CallbackEvent, received_t: float | None = None) -> bool:
        """Log a callback and record it in its media call's events. False: not a call of ours."""
        t = time.monotonic() if received_t is None else received_t
        call = self.calls.by_key(key)
        if call is None:
            log.info(
                "ACS %s for an unknown call %.40r (connection %s): not recorded",
                event.type,
                key,
                event.call_connection_id or "-",
            )
            return False
        if event.call_connection_id and call.connection_id is None:
            self.calls.connected(call, event.call_connection_id)
        if event.type == "CallDisconnected":
            call.disconnected = True
        _log_callback(call, event)
        events = self._media_events(call)
        if events is None:
            call.early_events.append((t, event.record()))
        else:
            events.emit("acs_event", t=t, **event.record())
        return True

    # ------------------------------------------------------------------ many instances (a shared book)

    async def recall(self, call_id: str) -> AcsCall | None:
        """The call whose key or call connection id this is, as the shared book has it now (another
        instance may have answered it, or learnt it is over); the local book alone without one."""
        if self.shared is None or not call_id:
            return self.calls.find(call_id)
        fields = await self.shared.load(call_id)
        if fields is None or not fields.get("key"):
            return self.calls.find(call_id)
        call = self.calls.by_key(fields["key"])
        if call is None:
            direction: Literal["inbound", "outbound"] = (
                "outbound" if fields.get("direction") == "outbound" else "inbound"
            )
            call = self.calls.add(
                AcsCall(
                    fields["key"],
                    direction,
                    party=fields.get("party", ""),
                    correlation_id=fields.get("correlation_id", ""),
                )
            )
        if fields.get("connection_id") and call.connection_id is None:
            self.calls.connected(call, fields["connection_id"])
        call.disconnected = call.disconnected or bool(fields.get("disconnected"))
        return call

    async def deliver_callback(self, key: str, event: CallbackEvent, received_t: float | None = None) -> bool:
        """A callback received by this instance: with a shared book, noted there and sent to the
        instance holding the call's media socket; without one, `on_callback`."""
        if self.shared is None:
            return self.on_callback(key, event, received_t)
        call = await self.recall(key)
        if call is None:
            return self.on_callback(key, event, received_t)  # logs the unknown call
        if event.call_connection_id and call.connection_id is None:
            self.calls.connected(call, event.call_connection_id)
        if event.type == "CallDisconnected":
            call.disconnected = True
        await self._share(call)
        delivery = await self.shared.deliver(call.key, event)
        if delivery == "local":
            return self.apply_callback(call.key, event, received_t)
        log.info(
            "call %s: ACS %s %s",
            call.key,
            event.type,
            "sent to the instance of its media" if delivery == "forwarded" else "held for its media socket",
        )
        return True

    def apply_callback(self, key: str, event: CallbackEvent, received_t: float | None = None) -> bool:
        """A callback for a call whose media socket is here (many instances): recorded, and a
        CallDisconnected ends the media call (the caller is gone; ACS closes the stream anyway)."""
        recorded = self.on_callback(key, event, received_t)
        call = self.calls.by_key(key)
        if event.type == "CallDisconnected" and call is not None and call.media_call_id and self.registry:
            session = self.registry.session(call.media_call_id)
            if session is not None:
                session.end_call("acs_disconnected")
        return recorded

    async def _share(self, call: AcsCall) -> None:
        if self.shared is not None:
            await self.shared.save(call_fields(call))

    async def _forget(self, call: AcsCall) -> None:
        self.calls.forget(call)
        if self.shared is not None:
            await self.shared.drop(call.key, call.connection_id)

    def media_refusal(self, key: str) -> str | None:
        """Why a media socket whose URL has `?callId=<key>` may not open a call (None: it may).

        With Call Automation on, every media stream parley asks ACS for carries the key of a call
        parley answered or placed (`media_streaming`); any other socket is not one of ACS's."""
        if not key:
            return "no callId in the URL (parley puts one in the media URL of every call it answers or places)"
        call = self.calls.by_key(key)
        if call is None:
            return f"callId {key[:40]!r} is not a call parley answered or placed"
        if call.disconnected:
            return f"call {key} is over (ACS sent CallDisconnected)"
        return None

    def media_connected(self, call_id: str, key: str, events: EventLog) -> None:
        """A media stream connected (`key`: its `?callId=`): tie it to its call, write held events."""
        call = (self.calls.by_key(key) if key else None) or self.calls.find(call_id)
        if call is None:
            return
        call.media_call_id = call_id
        while call.early_events:
            t, fields = call.early_events.popleft()
            events.emit("acs_event", t=t, **fields)

    def _media_events(self, call: AcsCall) -> EventLog | None:
        if call.media_call_id is None or self.registry is None:
            return None
        return self.registry.find(call.media_call_id)  # live, or among the recently ended

    # ------------------------------------------------------------------ SDK calls

    async def _ask(self, what: str, request: Awaitable[T]) -> T:
        """Await an SDK request, turning its failures into a CallAutomationError that says what."""
        try:
            return await request
        except HttpResponseError as exc:
            raise CallAutomationError(
                f"{what}: ACS answered HTTP {exc.status_code}: {_first_line(exc.message)}"
            ) from exc
        except AzureError as exc:  # connection refused, TLS, timeout...
            raise CallAutomationError(f"{what}: {type(exc).__name__}: {_first_line(str(exc))}") from exc


def identifier_for(target: CallTarget) -> CommunicationIdentifier:
    if target.kind == "phone":
        return PhoneNumberIdentifier(target.value)
    return CommunicationUserIdentifier(target.value)


def mask_party(party: str) -> str:
    """A phone number with its middle digits hidden (logs are not the place for callers' numbers)."""
    if acs_config.is_e164(party) and len(party) > 6:
        return f"{party[:3]}...{party[-2:]}"
    return party[:24] + ("..." if len(party) > 24 else "") if party else "-"


def _log_callback(call: AcsCall, event: CallbackEvent) -> None:
    result = event.details.get("result", {})
    failed = "Failed" in event.type or (isinstance(result.get("code"), int) and result["code"] >= 400)
    log.log(
        logging.WARNING if failed else logging.INFO,
        "call %s: ACS %s%s",
        call.key,
        event.type,
        f" ({result.get('code')}/{result.get('subCode')}: {result.get('message', '')})" if result else "",
    )


def _first_line(text: str | None, limit: int = 300) -> str:
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else "no message"
    return line[:limit]


def _require_aiohttp() -> None:
    # The async SDK needs aiohttp but imports it only on the first request: say so at startup
    # rather than on the first ringing phone.
    try:
        import aiohttp  # noqa: F401
    except ImportError as exc:
        raise RuntimeError("ACS Call Automation needs the aiohttp package (pip install aiohttp)") from exc


def _entra_credential() -> Any:
    try:
        from azure.identity.aio import DefaultAzureCredential
    except ImportError as exc:
        raise RuntimeError(
            "PARLEY_ACS_ENDPOINT uses Entra ID, which needs the azure-identity package"
            " (pip install azure-identity); or set PARLEY_ACS_CONNECTION_STRING instead"
        ) from exc
    return DefaultAzureCredential()


__all__ = [
    "DEFAULT_CLIENT_OPTIONS",
    "AcsCall",
    "CallAutomation",
    "CallAutomationError",
    "CallBook",
    "OutboundCallRefused",
    "identifier_for",
    "mask_party",
]
