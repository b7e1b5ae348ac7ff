"""`parley call` for real conversations: --say timelines, --dtmf, --proto, --token, --agent, the stereo --out.

The option checks run before anything is dialled (no server needed); the calls go to a real
parley server on loopback with the plumbing engines (Silero VAD, a recognizer double that makes a
final of every utterance, tones for speech), in real time.
"""

from __future__ import annotations

import json
import wave
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from parley.audio import write_wav
from parley.caller import CallOptions, media_url, run_call, with_agent
from parley.cli import app
from parley.server import BackgroundServer
from parley.settings import load_settings

runner = CliRunner()


@pytest.fixture(scope="module")
def hello_wav(tmp_path_factory: pytest.TempPathFactory, hours_pcm: np.ndarray) -> Path:
    path = tmp_path_factory.mktemp("say") / "hours.wav"
    write_wav(path, hours_pcm, 16000)
    return path


@pytest.fixture(scope="module")
def plumbing() -> Iterator[BackgroundServer]:
    settings = load_settings(host="127.0.0.1", port=0, event_log=False, engines="plumbing", greeting="")
    with BackgroundServer(settings) as server:
        yield server


@pytest.fixture(scope="module")
def guarded() -> Iterator[BackgroundServer]:
    """A server whose events API needs PARLEY_API_TOKEN."""
    settings = load_settings(
        host="127.0.0.1", port=0, event_log=False, engines="plumbing", greeting="", api_token="s3cret-token"
    )
    with BackgroundServer(settings) as server:
        yield server


def stereo(path: Path) -> np.ndarray:
    with wave.open(str(path), "rb") as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (2, 2, 16000)
        return np.frombuffer(wav.readframes(wav.getnframes()), "<i2").reshape(-1, 2)


# --------------------------------------------------------------------------------------------
# Option errors: one line, exit code 2, before dialling (the URL below has nobody listening)
# --------------------------------------------------------------------------------------------

NOBODY = "ws://127.0.0.1:9/ws"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--say", "x:{wav}"], "--say 'x:{wav}': the format is SECONDS:WAV"),
        (["--say", "-1:{wav}"], "the format is SECONDS:WAV"),
        (["--say", "{wav}"], "the format is SECONDS:WAV"),
        (["--say", "2:"], "the format is SECONDS:WAV"),
        (["--say", "inf:{wav}"], "the format is SECONDS:WAV"),
        (["--say", "1:{missing}"], "missing.wav: no such file"),
        (["{wav}", "--say", "1:{wav}"], "give AUDIO (said once) or --say SECONDS:WAV (a timeline), not both"),
        ([], "nothing to say: give AUDIO (a WAV) or --say SECONDS:WAV"),
        (["--say", "1:{wav}", "--barge-in-at", "1"], "--barge-in-at applies to AUDIO"),
        (["--say", "1:{wav}", "--dtmf", "2"], "--dtmf '2': the format is SECONDS:DIGITS"),
        (["--say", "1:{wav}", "--dtmf", "2:9x"], "are not DTMF keys"),
        (["{wav}", "--proto", "sip"], "--proto 'sip': expected acs or twilio"),
        (["{wav}", "--proto", "twilio", "--sample-rate", "24000"], "--proto twilio runs at --sample-rate 16000"),
        (["{wav}", "--url", "ftp://example.org"], "--url 'ftp://example.org' is not a server URL"),
    ],
)
def test_bad_options_are_one_line_errors(arguments: list[str], message: str, hello_wav: Path, tmp_path: Path) -> None:
    values = {"wav": str(hello_wav), "missing": str(tmp_path / "missing.wav")}
    argv = ["call", *(argument.format(**values) for argument in arguments)]
    if "--url" not in argv:
        argv += ["--url", NOBODY]
    result = runner.invoke(app, argv)
    assert result.exit_code == 2, result.output
    assert message.format(**values) in " ".join(result.output.split()), result.output


def test_urls_take_the_protocol_path_and_the_agent() -> None:
    assert media_url("127.0.0.1:8000", "/ws/twilio") == "ws://127.0.0.1:8000/ws/twilio"
    assert media_url("http://h:1/custom", "/ws/twilio") == "ws://h:1/custom"
    assert with_agent("ws://h:1/ws/acs", "bank") == "ws://h:1/ws/acs?agent=bank"
    assert with_agent("ws://h:1/ws/acs?callId=7&agent=old", "a b") == "ws://h:1/ws/acs?callId=7&agent=a+b"
    assert with_agent("ws://h:1/ws/acs", None) == "ws://h:1/ws/acs"


async def test_call_options_are_checked_before_dialling(hours_pcm: np.ndarray) -> None:
    url = NOBODY  # nobody listens: a check that passed would fail with DialError instead
    with pytest.raises(ValueError, match="not both"):
        await run_call(CallOptions(url=url, pcm=hours_pcm, say=[(1.0, hours_pcm)]))
    with pytest.raises(ValueError, match="barge_in_at applies to a single clip"):
        await run_call(CallOptions(url=url, say=[(1.0, hours_pcm)], barge_in_at=1.0))
    with pytest.raises(ValueError, match="say time -1"):
        await run_call(CallOptions(url=url, say=[(-1.0, hours_pcm)]))
    with pytest.raises(ValueError, match="the clip to say at 2 s is empty"):
        await run_call(CallOptions(url=url, say=[(2.0, np.zeros(0, np.int16))]))
    with pytest.raises(ValueError, match="1-D int16"):
        await run_call(CallOptions(url=url, say=[(2.0, np.zeros(10, np.float32))]))
    with pytest.raises(ValueError, match="proto 'sip'"):
        await run_call(CallOptions(url=url, pcm=hours_pcm, proto="sip"))


# --------------------------------------------------------------------------------------------
# Real calls
# --------------------------------------------------------------------------------------------


def test_a_say_timeline_with_keys_is_two_utterances_and_a_stereo_recording(
    plumbing: BackgroundServer, hello_wav: Path, tmp_path: Path
) -> None:
    report_path, out = tmp_path / "report.json", tmp_path / "call.wav"
    result = runner.invoke(
        app,
        [
            "call",
            "--url",
            f"127.0.0.1:{plumbing.port}",
            "--say",
            f"0.3:{hello_wav}",
            "--say",
            f"4.5:{hello_wav}",
            "--dtmf",
            "3.5:42",
            "--out",
            str(out),
            "--json",
            str(report_path),
            "--quiet",
            "--max-wait",
            "8",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    # Both utterances reached the server, each at its time: two finals, in order.
    finals = [e for e in report["events"] if e["event"] == "final"]
    assert len(finals) == 2, [e["event"] for e in report["events"]]
    first, second = report["utterances"]
    assert first["at_ms"] == pytest.approx(300, abs=40) and second["at_ms"] == pytest.approx(4500, abs=40)
    assert first["onset_ms"] < finals[0]["t_ms"] < second["onset_ms"] < finals[1]["t_ms"]
    assert [digits for _, digits in report["dtmf_sent"]] == ["42"]
    assert any(e["event"] == "dtmf_input" for e in report["events"]) or report["dtmf_sent"]
    assert "utterance 2 at" in result.output

    # The recording: the caller on the left where the utterances were said, the agent on the right.
    both = stereo(out)
    assert both.shape[0] == pytest.approx(report["duration_ms"] * 16, abs=2)
    said, heard = both[:, 0], both[:, 1]
    ms = lambda value: round(value * 16)  # noqa: E731 - ms -> sample index
    assert not said[: ms(280)].any() and said[ms(first["onset_ms"]) : ms(first["end_ms"])].any()
    assert said[ms(second["onset_ms"]) : ms(second["end_ms"])].any()
    assert heard.any() and not heard[: ms(first["onset_ms"])].any()  # no greeting: the agent replied
    start, end = report["stretches"][0]
    assert np.count_nonzero(heard[ms(start) : ms(end)]) > 0.9 * ms(end - start)


def test_the_token_reaches_the_events_api(guarded: BackgroundServer, hello_wav: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("PARLEY_API_TOKEN", raising=False)
    url = f"127.0.0.1:{guarded.port}"
    common = ["call", str(hello_wav), "--url", url, "--max-wait", "2", "--quiet"]
    without = runner.invoke(app, common)
    assert without.exit_code == 1, without.output  # the call ran; its events could not be read
    assert "events fetch failed" in without.output and "401" in without.output
    wrong = runner.invoke(app, [*common, "--token", "not-it"])
    assert wrong.exit_code == 1 and "401" in wrong.output
    right = runner.invoke(app, [*common, "--token", "s3cret-token"])
    assert right.exit_code == 0, right.output
    monkeypatch.setenv("PARLEY_API_TOKEN", "s3cret-token")  # the default, as before
    from_env = runner.invoke(app, common)
    assert from_env.exit_code == 0, from_env.output


async def test_the_token_and_the_agent_go_on_the_media_upgrade(hours_pcm: np.ndarray) -> None:
    """What the server sees on the upgrade: Authorization: Bearer, ?agent=NAME (a bare websockets server)."""
    import websockets
    from websockets.asyncio.server import ServerConnection

    seen: dict[str, str] = {}

    async def handler(ws: ServerConnection) -> None:
        assert ws.request is not None
        seen["path"] = ws.request.path
        seen["authorization"] = ws.request.headers.get("authorization", "")
        await ws.close()

    async with websockets.serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        options = CallOptions(
            url=f"ws://127.0.0.1:{port}/ws/acs",
            pcm=hours_pcm,
            agent="bank",
            api_token="t0ken",
            fetch_events=False,
        )
        report = await run_call(options)
    assert seen == {"path": "/ws/acs?agent=bank", "authorization": "Bearer t0ken"}
    assert report.url.endswith("/ws/acs?agent=bank") and report.hung_up_by_server
