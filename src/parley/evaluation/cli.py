"""`parley eval ...`: quality evaluations, printed as tables and written as JSON."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import typer
from rich.console import Console

evaluate = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Evaluations: recognition accuracy (stt), barge-in decisions (bargein) and end of turn (turns).",
)
_progress_console = Console(stderr=True)


def _split(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _progress(quiet: bool) -> Callable[[str], None] | None:
    if quiet:
        return None
    return lambda text: _progress_console.print(f"[dim]{text}[/dim]", highlight=False)


@evaluate.command()
def stt(
    mode: str = typer.Option("two-pass", "--stt", help="two-pass (pocketsphinx + Whisper), pocketsphinx or whisper."),
    variant_list: str = typer.Option(
        "clean,noise10,noise5,telephone",
        "--variants",
        help="Comma-separated: clean, telephone, noise<SNR>[-white|-pink|-babble] (pink by default).",
    ),
    model: Path | None = typer.Option(
        None, "--model", help="CTranslate2 Whisper model directory (default: the bundled tiny.en)."
    ),
    limit: int | None = typer.Option(None, "--limit", "--clips", min=1, help="Use only the first N LibriVox clips."),
    hypotheses: bool = typer.Option(False, "--hypotheses", help="Also print every clip's texts."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress lines."),
    json_path: Path | None = typer.Option(None, "--json", help="Write the results as JSON here."),
) -> None:
    """WER of pocketsphinx and Whisper on the LibriVox clips, clean and degraded."""
    from parley.benchmarks.common import write_json
    from parley.evaluation import stt as module

    try:
        names = _split(variant_list)
        for name in names:
            module.parse_variant(name)  # fail on a typo before loading any model
        result = module.run(mode, names, model, limit, _progress(quiet))
    except (ValueError, RuntimeError) as exc:
        _progress_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    write_json(json_path, result)
    module.print_result(result, hypotheses=hypotheses)


@evaluate.command()
def bargein(
    trials: int = typer.Option(4, min=1, help="Calls per scenario."),
    scenario_list: str = typer.Option(
        "interrupt,interrupt_echo,noise10,echo,backchannel,cough",
        "--scenarios",
        help="Comma-separated: interrupt, interrupt_echo, noise10, noise_bed, echo, backchannel, cough, answer.",
    ),
    seed: int = typer.Option(11, help="Seed for trigger times and noise."),
    url: str | None = typer.Option(None, "--url", help="ws://.../ws/acs of a running server (default: start one)."),
    server: str = typer.Option("subprocess", "--server", help="Where to start the server: subprocess or inprocess."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress lines."),
    json_path: Path | None = typer.Option(None, "--json", help="Write the results as JSON here."),
) -> None:
    """Barge-in decisions against interruptions, echo, noise, backchannels and coughs."""
    from parley.benchmarks.common import server_under_test, write_json
    from parley.evaluation import bargein as module

    scenarios = _split(scenario_list)
    unknown = [name for name in scenarios if name not in module.SCENARIOS]
    if unknown or not scenarios:
        _progress_console.print(
            f"[red]error:[/red] unknown scenario(s) {', '.join(unknown) or '(none given)'}; "
            f"use {', '.join(module.SCENARIOS)}"
        )
        raise typer.Exit(2)
    # A server we start gets a greeting long enough to outlast trigger + stimulus + listening.
    with server_under_test(url, server, greeting=module.LONG_GREETING) as sut:
        result = asyncio.run(module.run(sut.url, scenarios, trials, seed, _progress(quiet)))
    write_json(json_path, result)
    module.print_result(result)


@evaluate.command()
def turns(
    mode_list: str = typer.Option("silence,smart-turn", "--modes", help="Comma-separated turn detections to compare."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Use only the first N turns of each kind."),
    seed: int = typer.Option(7, help="Seed for the pauses' lengths."),
    server: str = typer.Option("subprocess", "--server", help="Where to start the servers: subprocess or inprocess."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress lines."),
    json_path: Path | None = typer.Option(None, "--json", help="Write the results as JSON here."),
) -> None:
    """End of turn: voice-to-voice on complete questions, cuts at mid-sentence pauses, per mode."""
    from parley.benchmarks.common import server_under_test, write_json
    from parley.evaluation import turns as module
    from parley.models import ModelError
    from parley.settings import Settings

    modes = _split(mode_list)
    unknown = [name for name in modes if name not in module.MODES]
    if unknown or not modes:
        _progress_console.print(
            f"[red]error:[/red] unknown mode(s) {', '.join(unknown) or '(none given)'}; use {', '.join(module.MODES)}"
        )
        raise typer.Exit(2)
    settings = Settings()
    turn_set = module.TurnSet(seed=seed)
    try:
        chosen = turn_set.turns(limit)
        # The model first: a missing one fails in a second, not after the silence mode's calls.
        model = (
            module.model_figures(chosen, settings.models_dir, settings.turn_short_silence_ms)
            if "smart-turn" in modes
            else None
        )
    except (ModelError, ValueError) as exc:
        _progress_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    records = {}
    for mode in modes:
        with server_under_test(None, server, greeting="", turn_detection=mode) as sut:
            records[mode] = asyncio.run(module.run_mode(sut.url, chosen, _progress(quiet), mode))
    knobs = ("endpoint_silence_ms", "early_final_ms", "turn_short_silence_ms", "turn_max_silence_ms")
    result = module.result(records, turn_set, model, {knob: getattr(settings, knob) for knob in knobs})
    write_json(json_path, result)
    module.print_result(result)
