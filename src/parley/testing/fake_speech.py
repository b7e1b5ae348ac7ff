"""A fake Azure Speech service on loopback, for tests: the real Speech SDK connects to it.

`azure-cognitiveservices-speech` accepts `endpoint=ws://127.0.0.1:PORT`, so parley's Azure plugins
run their production code (the SDK's native client included) with no cloud account. The fake
speaks the subset of the SDK's service protocol observed from SDK 1.53. That protocol is
undocumented: this module is a test fixture, never a reference.

What the SDK sends (WebSocket subprotocol `USP`; the handshake fails without it):
- text frames: `Header:value` lines, a blank line, a body. `Path: speech.config` (client info),
  then per recognition turn `speech.context` (JSON: language, language id, phrase list...) or, for
  synthesis, `synthesis.context` (output format) and `ssml`; `telemetry` now and then;
- binary frames: a 2-byte big-endian header length, the header lines (`Path: audio`,
  `X-RequestId`), then PCM. The first frame of a turn is a 44-byte WAV header; an empty payload
  ends the audio.
What the fake answers, each message carrying the request's `X-RequestId`:
- recognition: `turn.start`, then per stretch of non-silent audio `speech.startDetected`,
  `speech.hypothesis` every `hypothesis_every_ms` of speech and `speech.phrase` once
  `segmentation_ms` of silence followed it, with offsets and durations in 100 ns ticks of the
  audio received; at the end of the audio `speech.endDetected` and `turn.end`;
- synthesis: `turn.start`, binary `audio` frames (a tone at the requested rate) and `turn.end`.
An upgrade can be refused with an HTTP status (401, 429, 500...) to exercise the SDK's errors.
"""

from __future__ import annotations

import asyncio
import html
import http
import json
import logging
import math
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import numpy as np
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

__all__ = ["TICKS_PER_SECOND", "FakeSpeechService", "SpeechConnection"]

log = logging.getLogger(__name__)

TICKS_PER_SECOND = 10_000_000  # the service's offsets and durations are in 100 ns ticks
_WAV_HEADER_BYTES = 44
_FRAME_MS = 20


@dataclass
class SpeechConnection:
    """One WebSocket the SDK opened (or tried to open), as the fake saw it."""

    path: str
    query: dict[str, str]
    headers: dict[str, str]
    opened_t: float
    status: int = 101  # an HTTP status when the upgrade was refused
    contexts: list[dict[str, Any]] = field(default_factory=list)  # speech.context / synthesis.context
    ssml: list[str] = field(default_factory=list)
    audio_bytes: int = 0  # PCM received, WAV headers excluded
    phrases_sent: list[str] = field(default_factory=list)
    closed_t: float | None = None
    synthesis_finished: list[bool] = field(default_factory=list)  # per ssml: all audio was sent

    @property
    def kind(self) -> str:
        return "tts" if "tts" in self.path or "websocket" in self.path else "stt"


class FakeSpeechService:
    """The fake service on a background thread. `url` is the endpoint to give the SDK.

    `texts`: what each successive phrase says (then `default_text`; "" answers NoMatch).
    `reject`: HTTP statuses for the next connection attempts, in order (then accepted).
    """

    def __init__(
        self,
        *,
        default_text: str = "hello",
        segmentation_ms: int = 500,
        hypothesis_every_ms: int = 200,
        silence_dbfs: float = -50.0,
        tts_ms_per_char: int = 40,
        tts_chunk_ms: int = 100,
        tts_chunk_delay_s: float = 0.005,
    ) -> None:
        self.texts: deque[str] = deque()
        self.default_text = default_text
        self.reject: deque[int] = deque()
        self.segmentation_ms = segmentation_ms
        self.hypothesis_every_ms = hypothesis_every_ms
        self.silence_dbfs = silence_dbfs
        self.tts_ms_per_char = tts_ms_per_char
        self.tts_chunk_ms = tts_chunk_ms
        self.tts_chunk_delay_s = tts_chunk_delay_s
        self.connections: list[SpeechConnection] = []
        self._records: dict[int, SpeechConnection] = {}
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._server: Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-speech", daemon=True)

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self) -> FakeSpeechService:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(10)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"ws://127.0.0.1:{port}"
        return self

    def stop(self) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()
            await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def reset(self) -> None:
        self.texts.clear()
        self.reject.clear()
        self.connections.clear()

    def of_kind(self, kind: str) -> list[SpeechConnection]:
        return [c for c in self.connections if c.kind == kind]

    async def _serve(self) -> Server:
        return await serve(
            self._handle,
            "127.0.0.1",
            0,
            subprotocols=[Subprotocol("USP")],
            process_request=self._admit,
            max_size=None,
            close_timeout=0.5,  # an idle SDK connection may not answer a close frame
        )

    def _admit(self, connection: ServerConnection, request: Request) -> Response | None:
        """Record the attempt; refuse the upgrade with the next scripted status, if any."""
        url = urlsplit(request.path)
        record = SpeechConnection(
            path=url.path,
            query=dict(parse_qsl(url.query)),
            headers={k.lower(): v for k, v in request.headers.raw_items()},
            opened_t=time.monotonic(),
        )
        self.connections.append(record)
        self._records[id(connection)] = record
        status = self.reject.popleft() if self.reject else 0
        if status:
            record.status = status
            return connection.respond(http.HTTPStatus(status), f"fake speech service: {status}\n")
        return None

    # --- one connection ----------------------------------------------------------------------------
    async def _handle(self, ws: ServerConnection) -> None:
        record = self._records.pop(id(ws))
        session = _Session(self, ws, record)
        try:
            async for message in ws:
                await session.on_message(message)
        except ConnectionClosed as exc:  # the SDK drops the socket on stop and close: normal
            log.debug("fake speech: connection closed: %s", exc)
        finally:
            session.cancel_synthesis()
            record.closed_t = time.monotonic()


class _Session:
    """The state of one SDK connection: recognition segmentation or synthesis requests."""

    def __init__(self, service: FakeSpeechService, ws: ServerConnection, record: SpeechConnection) -> None:
        self.service = service
        self.ws = ws
        self.record = record
        self.request_id = ""
        self.languages: list[str] = []
        self._context_segmentation_ms: int | None = None  # the client's setting, if it sent one
        self.output_rate = 16000
        self._frame_bytes = 16000 * 2 * _FRAME_MS // 1000
        self._pending = b""  # received PCM not yet a whole 20 ms frame
        self._received = 0  # PCM bytes received in this connection
        self._segment_start: int | None = None  # byte offset of the open speech segment
        self._last_voiced_end = 0
        self._silent_ms = 0
        self._since_hypothesis_ms = 0
        self._segment_text = ""
        self._synthesis: asyncio.Task[None] | None = None

    @property
    def segmentation_ms(self) -> int:
        return self._context_segmentation_ms or self.service.segmentation_ms

    # --- dispatch -----------------------------------------------------------------------------------
    async def on_message(self, message: str | bytes) -> None:
        if isinstance(message, bytes):
            await self._on_audio(message)
            return
        head, _, body = message.partition("\r\n\r\n")
        headers = _headers(head)
        path = headers.get("path", "")
        self.request_id = headers.get("x-requestid", self.request_id)
        if path == "speech.context":
            await self._on_speech_context(json.loads(body))
        elif path == "synthesis.context":
            self._on_synthesis_context(json.loads(body))
        elif path == "ssml":
            self.record.ssml.append(body)
            self._synthesis = asyncio.create_task(self._synthesize(body, self.request_id))

    async def send(self, path: str, body: dict[str, Any], request_id: str | None = None) -> None:
        request_id = request_id or self.request_id
        await self.ws.send(
            f"X-RequestId:{request_id}\r\nPath:{path}\r\n"
            f"Content-Type:application/json; charset=utf-8\r\n\r\n{json.dumps(body)}"
        )

    # --- recognition ---------------------------------------------------------------------------------
    async def _on_speech_context(self, context: dict[str, Any]) -> None:
        self.record.contexts.append(context)
        language_id = context.get("languageId") or {}
        self.languages = list(language_id.get("languages") or [])
        detection = context.get("phraseDetection") or {}
        silence = detection.get(detection.get("mode", "CONVERSATION"), {}).get("segmentation", {})
        if "segmentationSilenceTimeoutMs" in silence:
            self._context_segmentation_ms = int(silence["segmentationSilenceTimeoutMs"])
        await self.send("turn.start", {"context": {"serviceTag": f"fake-{id(self)}"}})

    async def _on_audio(self, message: bytes) -> None:
        size = int.from_bytes(message[:2], "big")
        headers = _headers(message[2 : 2 + size].decode())
        self.request_id = headers.get("x-requestid", self.request_id)
        pcm = message[2 + size :]
        if pcm[:4] == b"RIFF" and len(pcm) == _WAV_HEADER_BYTES:
            return
        if not pcm:
            await self._end_of_audio()
            return
        self.record.audio_bytes += len(pcm)
        self._pending += pcm
        while len(self._pending) >= self._frame_bytes:
            frame, self._pending = self._pending[: self._frame_bytes], self._pending[self._frame_bytes :]
            await self._on_frame(frame)

    async def _on_frame(self, frame: bytes) -> None:
        frame_start = self._received
        self._received += len(frame)
        if _dbfs(frame) > self.service.silence_dbfs:
            await self._on_voiced_frame(frame_start)
        elif self._segment_start is not None:
            self._silent_ms += _FRAME_MS
            if self._silent_ms >= self.segmentation_ms:
                await self._send_phrase()

    async def _on_voiced_frame(self, frame_start: int) -> None:
        if self._segment_start is None:
            self._segment_start = frame_start
            self._since_hypothesis_ms = 0
            self._segment_text = self.service.texts.popleft() if self.service.texts else self.service.default_text
            await self.send("speech.startDetected", {"Offset": _ticks(frame_start)})
        self._last_voiced_end = self._received
        self._silent_ms = 0
        self._since_hypothesis_ms += _FRAME_MS
        if self._since_hypothesis_ms >= self.service.hypothesis_every_ms and self._segment_text:
            self._since_hypothesis_ms = 0
            await self._send_hypothesis()

    async def _send_hypothesis(self) -> None:
        assert self._segment_start is not None
        words = self._segment_text.split()
        heard_ms = (self._received - self._segment_start) * 1000 // (2 * 16000)
        count = max(1, min(len(words), heard_ms // 300))  # about one word per 300 ms of speech
        body = {
            "Text": " ".join(words[:count]).lower().strip(".,?!"),
            "Offset": _ticks(self._segment_start),
            "Duration": _ticks(self._received - self._segment_start),
        }
        await self.send("speech.hypothesis", self._with_language(body))

    async def _send_phrase(self) -> None:
        assert self._segment_start is not None
        start, text = self._segment_start, self._segment_text
        self._segment_start = None
        body: dict[str, Any] = {
            "RecognitionStatus": "Success" if text else "NoMatch",
            "Offset": _ticks(start),
            "Duration": _ticks(self._last_voiced_end - start),
        }
        if text:
            body["DisplayText"] = text
        self.record.phrases_sent.append(text)
        await self.send("speech.phrase", self._with_language(body))

    def _with_language(self, body: dict[str, Any]) -> dict[str, Any]:
        if self.languages:  # continuous language identification: the first candidate is "detected"
            body["PrimaryLanguage"] = {"Language": self.languages[0], "Confidence": "High"}
        return body

    async def _end_of_audio(self) -> None:
        if self._segment_start is not None:
            await self._send_phrase()
        await self.send("speech.endDetected", {"Offset": _ticks(self._received)})
        await self.send("turn.end", {})

    # --- synthesis -------------------------------------------------------------------------------------
    def _on_synthesis_context(self, context: dict[str, Any]) -> None:
        self.record.contexts.append(context)
        output = context.get("synthesis", {}).get("audio", {}).get("outputFormat", "")
        match = re.match(r"raw-(\d+)khz-16bit-mono-pcm", output)
        self.output_rate = int(match.group(1)) * 1000 if match else 16000

    async def _synthesize(self, ssml: str, request_id: str) -> None:
        """A tone as long as the text deserves, in chunks, a little faster than real time."""
        finished = self.record.synthesis_finished
        index = len(finished)
        finished.append(False)
        await self.send("turn.start", {"context": {"serviceTag": f"fake-tts-{index}"}}, request_id)
        spoken = html.unescape(re.sub(r"<[^>]+>", "", ssml)).strip()
        total_ms = max(self.service.tts_chunk_ms, self.service.tts_ms_per_char * len(spoken))
        chunk_samples = self.output_rate * self.service.tts_chunk_ms // 1000
        for first in range(0, self.output_rate * total_ms // 1000, chunk_samples):
            await self.ws.send(_audio_frame(request_id, _tone(first, chunk_samples, self.output_rate)))
            await asyncio.sleep(self.service.tts_chunk_delay_s)
        finished[index] = True
        await self.send("turn.end", {}, request_id)

    def cancel_synthesis(self) -> None:
        if self._synthesis is not None:
            self._synthesis.cancel()


def _headers(block: str) -> dict[str, str]:
    headers = {}
    for line in block.split("\r\n"):
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return headers


def _audio_frame(request_id: str, pcm: bytes) -> bytes:
    head = f"X-RequestId:{request_id}\r\nPath:audio\r\n".encode()
    return len(head).to_bytes(2, "big") + head + pcm


def _tone(first_sample: int, count: int, rate: int, hz: float = 440.0) -> bytes:
    t = (first_sample + np.arange(count)) / rate
    return (0.3 * 32767 * np.sin(2 * math.pi * hz * t)).astype("<i2").tobytes()


def _ticks(pcm_bytes: int, rate: int = 16000) -> int:
    return pcm_bytes // 2 * TICKS_PER_SECOND // rate


def _dbfs(frame: bytes) -> float:
    samples = np.frombuffer(frame, dtype="<i2").astype(np.float32) / 32768.0
    power = float(np.mean(samples * samples)) if samples.size else 0.0
    return 10 * math.log10(power) if power > 1e-12 else -120.0
