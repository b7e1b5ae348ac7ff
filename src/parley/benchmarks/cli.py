"""`parley bench ...`: reproducible measurements, printed and written as JSON."""

from __future__ import annotations

import asyncio
import importlib.metadata
from pathlib import Path
from typing import Any

import typer

from parley.benchmarks import common

bench = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Benchmarks: barge-in, latency, llm, load, soak (see bench/README.md).",
)

UrlOption = typer.Option(None, "--url", help="ws://.../ws/acs of a running server [default: start one].")
ServerOption = typer.Option("subprocess", "--server", help="Where to start the server: subprocess or inprocess.")
JsonOption = typer.Option(None, "--json", help="Write the results as JSON here.")


def _finish(title: str, result: dict[str, Any], rows: list[tuple[str, object]], json_path: Path | None) -> None:
    common.write_json(json_path, result)
    common.print_summary(title, rows, result["machine"])


@bench.command()
def bargein(
    trials: int = typer.Option(20, min=1, help="Calls, one barge-in each."),
    clip: list[Path] = typer.Option(None, "--clip", help="WAV(s) to speak [default: the shipped LibriVox clips]."),
    noise: bool = typer.Option(False, "--noise", help="Barge in with noise beds instead: counts false stops."),
    proto: str = typer.Option(
        "acs", "--proto", help="Call as acs (stop = StopAudio) or twilio (Media Streams to /ws/twilio, stop = clear)."
    ),
    line_noise: float | None = typer.Option(
        None, "--line-noise", max=0.0, help="A pink noise bed at this dBFS under the whole call (a line's background)."
    ),
    url: str | None = UrlOption,
    server: str = ServerOption,
    json_path: Path | None = JsonOption,
) -> None:
    """Speech onset -> StopAudio (twilio: clear), decision -> stop, leaked audio and media after the
    stop, missed (or false stops)."""
    from parley.benchmarks import bargein as module

    if proto not in ("acs", "twilio"):
        raise typer.BadParameter("--proto must be acs or twilio")
    with common.server_under_test(url, server) as sut:
        # --url names the server; the path is the protocol's (a given ws://.../ws/acs calls /ws/twilio).
        result = asyncio.run(
            module.run(module.proto_url(sut.url, proto), trials, clip, noise, proto=proto, line_noise_dbfs=line_noise)
        )
    _finish("parley bench bargein", result, module.summary_rows(result), json_path)


@bench.command()
def latency(
    trials: int = typer.Option(20, min=1),
    clip: list[Path] = typer.Option(None, "--clip", help="WAV(s) to speak [default: the shipped LibriVox clips]."),
    url: str | None = UrlOption,
    server: str = ServerOption,
    json_path: Path | None = JsonOption,
) -> None:
    """Voice-to-voice latency with the server-side breakdown."""
    from parley.benchmarks import latency as module

    with common.server_under_test(url, server, greeting="") as sut:
        result = asyncio.run(module.run(sut.url, trials, clip))
    _finish("parley bench latency", result, module.summary_rows(result), json_path)


@bench.command()
def llm(
    trials: int = typer.Option(20, min=1, help="Calls: one streamed answer and one barge-in each."),
    server: str = ServerOption,
    json_path: Path | None = JsonOption,
) -> None:
    """LLM agent: first streamed clause -> first audio; barge-in -> LLM stream closed (fake model)."""
    from parley.benchmarks import llm as module

    with module.fake_llm() as fake, common.server_under_test(None, server, **module.server_settings(fake)) as sut:
        result = asyncio.run(module.run(sut.url, trials, fake))
    _finish("parley bench llm", result, module.summary_rows(result), json_path)


@bench.command()
def load(
    calls: int = typer.Option(50, min=1, help="Concurrent calls (the first step with --sweep)."),
    seconds: float = typer.Option(30.0, min=2.0, help="Length of each call."),
    profile: str = typer.Option("plumbing", help="plumbing (test doubles, VAD kept) or embedded."),
    sweep: bool = typer.Option(False, "--sweep", help="Raise the number of calls until a limit is hit."),
    workers: int = typer.Option(
        1, min=1, help="Worker processes of the server it starts (parley serve --workers N; loop lag per worker)."
    ),
    url: str | None = UrlOption,
    server: str = ServerOption,
    json_path: Path | None = JsonOption,
) -> None:
    """Concurrent calls: server loop lag, pacing jitter, barge-in, CPU, RSS, errors, dropped frames."""
    _check_loadgen_websockets()
    from parley.benchmarks import load as module

    if profile not in ("plumbing", "embedded"):
        raise typer.BadParameter("profile must be plumbing or embedded")
    if workers > 1 and server != "subprocess":
        raise typer.BadParameter("--workers needs --server subprocess (worker processes are separate processes)")
    clip = common.default_clips()[1]  # a short sentence: more barge-ins per call
    # Each worker warms its own engine pool: the calls it will carry, about its share.
    warm = min(-(-calls // workers), 32)
    with common.server_under_test(url, server, engines=profile, engine_pool_warm=warm, workers=workers) as sut:
        result = asyncio.run(module.run(sut, calls, seconds, clip, profile if not url else "external", sweep))
    _finish("parley bench load", result, module.summary_rows(result), json_path)


def _check_loadgen_websockets() -> None:
    """The load generator hooks into websockets' connection internals, tested on 17.x only."""
    installed = importlib.metadata.version("websockets")
    if installed.split(".")[0] != "17":
        common.console.print(
            f"[yellow]warning:[/yellow] the load generator is tested on websockets 17.x, not {installed}"
            " (pip install 'parley\\[bench]')"
        )


@bench.command()
def soak(
    calls: int = typer.Option(1000, min=1),
    parallel: int = typer.Option(8, min=1, help="Calls in flight at a time."),
    clip: list[Path] = typer.Option(None, "--clip"),
    busy: int = typer.Option(0, min=0, help="CPU burner processes running during the soak (a busy machine)."),
    settle: float = typer.Option(
        20.0, min=0.0, help="Seconds to wait after the warm-up and the last call (pools shrink back meanwhile)."
    ),
    idle_sockets: int = typer.Option(
        0, min=0, help="Instead of calls: hold this many media sockets that connect and never send; RSS above idle."
    ),
    hold: float = typer.Option(10.0, min=0.0, help="With --idle-sockets: seconds to hold them open."),
    metadata: bool = typer.Option(False, "--metadata", help="With --idle-sockets: each sends one AudioMetadata."),
    url: str | None = UrlOption,
    server: str = ServerOption,
    json_path: Path | None = JsonOption,
) -> None:
    """Many short calls through one server: RSS growth, threads, and what holds the memory."""
    from parley.benchmarks import soak as module

    settings: dict[str, object] = {"greeting": "Hello, how can I help?", "engine_pool_idle_s": module.POOL_IDLE_S}
    if idle_sockets:
        settings["max_calls"] = max(100, 2 * idle_sockets)  # admission control must not refuse them
        with common.server_under_test(url, server, **settings) as sut:
            idle = asyncio.run(module.idle_sockets(sut, idle_sockets, hold, busy, metadata, settle))
        _finish("parley bench soak --idle-sockets", idle, module.idle_summary_rows(idle), json_path)
        return
    with common.server_under_test(url, server, **settings) as sut:
        result = asyncio.run(module.run(sut, calls, parallel, clip, busy, settle))
    _finish("parley bench soak", result, module.summary_rows(result), json_path)
