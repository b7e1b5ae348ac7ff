"""What a simulated call says and where it calls: `CallOptions` and the clip cut into frames."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np

from parley.audio import loud_frames, read_wav, to_frames

DEFAULT_MEDIA_PATH = "/ws/acs"
"""The media-streaming path parley serves for ACS (and `parley serve` prints); Twilio's is /ws/twilio."""

_WS_SCHEMES = {"ws": "ws", "wss": "wss", "http": "ws", "https": "wss"}


@dataclass(slots=True)
class CallOptions:
    """What to say, when to say it, and where to call."""

    url: str
    audio: Path | None = None
    pcm: np.ndarray | None = None
    # A timeline instead of one clip: (seconds from call start, WAV path or int16 at sample_rate).
    # Each utterance starts at its time whatever the agent does; overlapping ones are mixed.
    say: list[tuple[float, Path | np.ndarray]] = field(default_factory=list)
    proto: str = "acs"  # the far end to play: "acs" (ACS media streaming) or "twilio" (Media Streams)
    agent: str | None = None  # asked for by name: ?agent=NAME on the URL (Twilio: also a customParameter)
    sample_rate: int = 16000
    barge_in_at: float | None = None
    out: Path | None = None
    call_id: str | None = None
    correlation_id: str | None = None
    max_wait_s: float = 15.0
    quiet_after_s: float = 1.5
    greeting_wait_s: float = 6.0
    progress: bool = False
    dtmf: list[tuple[float, str]] = field(default_factory=list)
    fetch_events: bool = True
    # The server's token (PARLEY_API_TOKEN, read from this process's environment by default): sent as
    # `Authorization: Bearer` on the media WebSocket's upgrade and to the events API.
    api_token: str | None = field(default_factory=lambda: os.environ.get("PARLEY_API_TOKEN") or None, repr=False)
    # Twilio's auth token (PARLEY_TWILIO_AUTH_TOKEN by default): a Twilio call signs its upgrade with it.
    twilio_auth_token: str | None = field(
        default_factory=lambda: os.environ.get("PARLEY_TWILIO_AUTH_TOKEN") or None, repr=False
    )
    end_after_stop_s: float | None = None  # hang up this long after a StopAudio (barge-in trials)
    end_after_answer_s: float | None = None  # hang up this long after the answer starts (latency trials)
    # A speakerphone: every uplink frame also carries the agent audio that played echo_delay_ms
    # earlier, at echo_db relative to it (None: a headset, no echo).
    echo_db: float | None = None
    echo_delay_ms: int = 40
    background: np.ndarray | None = None  # int16 at sample_rate, looped under every uplink frame


def _clip_samples(options: CallOptions) -> np.ndarray:
    """The clip to speak, from `pcm` or `audio`, validated."""
    if (options.audio is None) == (options.pcm is None):
        raise ValueError("give exactly one of CallOptions.audio or CallOptions.pcm (or only CallOptions.say)")
    if options.pcm is not None:
        pcm = _checked_pcm(options.pcm, "CallOptions.pcm")
    else:
        assert options.audio is not None
        pcm = read_wav(options.audio, options.sample_rate)
    if pcm.size == 0:
        raise ValueError("the clip to speak is empty")
    return pcm


def _checked_pcm(value: np.ndarray, what: str) -> np.ndarray:
    pcm = np.asarray(value)
    if pcm.dtype != np.int16 or pcm.ndim != 1:
        raise ValueError(f"{what} must be a 1-D int16 array at the call's sample rate")
    return pcm


@dataclass(frozen=True, slots=True, order=True)
class Utterance:
    """One thing the caller says: where it starts on the clip's timeline, and for how long (samples)."""

    start: int
    length: int


def _timeline(options: CallOptions) -> tuple[np.ndarray, list[Utterance]]:
    """The caller's audio from call start with every `say` utterance at its time (overlaps mixed)."""
    placed = []
    for at, what in options.say:
        if not 0 <= at < float("inf"):
            raise ValueError(f"say time {at} is not a number of seconds >= 0")
        pcm = _checked_pcm(what, "a say clip") if isinstance(what, np.ndarray) else read_wav(what, options.sample_rate)
        if pcm.size == 0:
            raise ValueError(f"the clip to say at {at:g} s is empty")
        placed.append((round(at * options.sample_rate), pcm))
    mixed = np.zeros(max(start + pcm.size for start, pcm in placed), dtype=np.int32)
    for start, pcm in placed:
        mixed[start : start + pcm.size] += pcm
    utterances = sorted(Utterance(start, pcm.size) for start, pcm in placed)
    return np.clip(mixed, -32768, 32767).astype(np.int16), utterances


def caller_audio(options: CallOptions) -> tuple[np.ndarray, list[Utterance]]:
    """What the caller sends when it speaks: the one clip, or the `say` timeline; and its utterances."""
    if options.say:
        if options.audio is not None or options.pcm is not None:
            raise ValueError("give CallOptions.say or a clip (audio / pcm), not both")
        if options.barge_in_at is not None:
            raise ValueError("barge_in_at applies to a single clip; say times are fixed from call start")
        return _timeline(options)
    pcm = _clip_samples(options)
    return pcm, [Utterance(0, pcm.size)]


@dataclass(frozen=True, slots=True)
class ClipFrames:
    """The clip cut into 20 ms frames, with each frame's speech/zero flags computed up front so
    the sender does no analysis on its real-time path."""

    frames: np.ndarray  # (n, samples_per_frame) int16
    loud: np.ndarray  # bool per frame: RMS above ONSET_DBFS
    zero: np.ndarray  # bool per frame: all samples zero (sent with silent=true, like ACS)

    @classmethod
    def from_pcm(cls, pcm: np.ndarray, samples_per_frame: int) -> ClipFrames:
        frames = to_frames(pcm, samples_per_frame)
        return cls(frames=frames, loud=loud_frames(frames), zero=np.asarray(~frames.any(axis=1)))

    def __len__(self) -> int:
        return len(self.frames)


def media_url(text: str, default_path: str = DEFAULT_MEDIA_PATH) -> str:
    """A media-streaming WebSocket URL from what a person types: ws(s):// as it is, http(s)://
    mapped to ws(s)://, a bare host:port taken as ws://; no path means `default_path` (/ws/acs).

    Raises ValueError (one line, naming the URL) for anything else."""
    text = text.strip()
    given = text if "://" in text else f"ws://{text}"
    parts = urlsplit(given)
    scheme = _WS_SCHEMES.get(parts.scheme.lower())
    if scheme is None:
        raise ValueError(
            f"{text!r} is not a server URL: expected ws://host:port/ws/acs (or http://, wss://, host:port)"
        )
    try:
        parts.port  # noqa: B018 -- raises on a port that is not a number in range
    except ValueError:
        raise ValueError(f"{text!r}: the port is not a number from 0 to 65535") from None
    if not parts.hostname:
        raise ValueError(f"{text!r} names no host: expected ws://host:port/ws/acs")
    path = parts.path if parts.path not in ("", "/") else default_path
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


def with_agent(url: str, agent: str | None) -> str:
    """`url` asking for an agent by name: `?agent=NAME` (replacing any agent already there)."""
    return url if agent is None else with_query(url, {"agent": agent})


def with_query(url: str, params: dict[str, str]) -> str:
    """`url` with these query parameters set (replacing any of the same name), others kept."""
    if not params:
        return url
    parts = urlsplit(url)
    query = [(key, value) for key, value in parse_qsl(parts.query, keep_blank_values=True) if key not in params]
    return urlunsplit((*parts[:3], urlencode([*query, *params.items()]), parts.fragment))
