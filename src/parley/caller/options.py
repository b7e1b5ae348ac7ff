"""What a simulated call says and where it calls: `CallOptions` and the clip cut into frames."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from parley.audio import loud_frames, read_wav, to_frames

DEFAULT_MEDIA_PATH = "/ws/acs"
"""The media-streaming path parley serves (and `parley serve` prints)."""

_WS_SCHEMES = {"ws": "ws", "wss": "wss", "http": "ws", "https": "wss"}


@dataclass(slots=True)
class CallOptions:
    """What to say, when to say it, and where to call."""

    url: str
    audio: Path | None = None
    pcm: np.ndarray | None = None
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
    # The server's events API token (PARLEY_API_TOKEN, read from this process's environment by default).
    api_token: str | None = field(default_factory=lambda: os.environ.get("PARLEY_API_TOKEN") or None, repr=False)
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
        raise ValueError("give exactly one of CallOptions.audio or CallOptions.pcm")
    if options.pcm is not None:
        pcm = np.asarray(options.pcm)
        if pcm.dtype != np.int16 or pcm.ndim != 1:
            raise ValueError("CallOptions.pcm must be a 1-D int16 array at the call's sample rate")
    else:
        assert options.audio is not None
        pcm = read_wav(options.audio, options.sample_rate)
    if pcm.size == 0:
        raise ValueError("the clip to speak is empty")
    return pcm


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


def media_url(text: str) -> str:
    """A media-streaming WebSocket URL from what a person types: ws(s):// as it is, http(s)://
    mapped to ws(s)://, a bare host:port taken as ws://; no path means /ws/acs.

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
    path = parts.path if parts.path not in ("", "/") else DEFAULT_MEDIA_PATH
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))
