"""A streaming recognizer that recognises nothing: for `stt=whisper`, where Whisper alone gives
the final text. Barge-in then rests on the VAD gate and on the finals (no partials)."""

from __future__ import annotations


class NoPartials:
    sample_rate = 16000

    def begin(self) -> None:
        pass

    def feed(self, pcm: bytes) -> str | None:
        return None

    def end(self) -> str:
        return ""

    def close(self) -> None:
        pass
