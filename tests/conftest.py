"""Shared fixtures: real test speech (espeak-ng, generated, never committed) and a real server."""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from parley.audio import write_wav
from parley.server import BackgroundServer
from parley.settings import load_settings
from parley.testing.fake_llm import FakeLlm, ServerThread
from parley.voice.espeak import EspeakSynthesizer

# A CI machine runs the suite on two busy cores: a test's server must not refuse the test's next call
# because the loop lagged 100 ms while models loaded. Overload refusal has its own tests
# (test_admission.py), which set their thresholds; servers started in subprocesses inherit this.
os.environ.setdefault("PARLEY_OVERLOAD_LOOP_LAG_MS", "2000")

# Phrases the pocketsphinx default recognises well enough from espeak-ng's en-us voice
# (measured: "what are your opening hours" -> "what are your opening hours|dollars").
HOURS_PHRASE = "what are your opening hours"
ORDER_PHRASE = "I want to order a pizza"


@pytest.fixture(scope="session", autouse=True)
def _records_in_a_tmp_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Servers started by tests (in-process or `parley serve`) record calls under a tmp dir, never ./parley-data."""
    data_dir = tmp_path_factory.mktemp("parley-data")
    previous = os.environ.get("PARLEY_DATA_DIR")
    os.environ["PARLEY_DATA_DIR"] = str(data_dir)
    yield data_dir
    if previous is None:
        os.environ.pop("PARLEY_DATA_DIR", None)
    else:
        os.environ["PARLEY_DATA_DIR"] = previous


@pytest.fixture(scope="session")
def voice() -> EspeakSynthesizer:
    return EspeakSynthesizer(ThreadPoolExecutor(1), "en-us", 175)


@pytest.fixture(scope="session")
def speech_dir(tmp_path_factory: pytest.TempPathFactory, voice: EspeakSynthesizer) -> Path:
    """WAV files of caller phrases at 16 kHz, plus 24 kHz variants."""
    root = tmp_path_factory.mktemp("speech")
    for name, text in {"hours": HOURS_PHRASE, "order": ORDER_PHRASE}.items():
        for rate in (16000, 24000):
            pcm = voice.synthesize_blocking(text, rate)
            write_wav(root / f"{name}_{rate}.wav", pcm, rate)
    return root


@pytest.fixture(scope="session")
def hours_pcm(voice: EspeakSynthesizer) -> np.ndarray:
    return np.frombuffer(voice.synthesize_blocking(HOURS_PHRASE, 16000), dtype=np.int16)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """For tests that configure logging (parley.logs): the root logger as it was, afterwards."""
    import logging

    from parley import logs

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    events_level = logging.getLogger("parley.events").level
    yield
    logs.shutdown()
    for handler in root.handlers[:]:
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("parley.events").setLevel(events_level)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real redis-server for the whole session (tests that use it skip, saying why, without one)."""
    from parley.testing.redis_server import RedisUnavailable, redis_server

    try:
        with redis_server() as url:
            yield url
    except RedisUnavailable as exc:
        pytest.skip(f"needs a real Redis: {exc}")


def make_server(**overrides: object) -> BackgroundServer:
    settings = load_settings(host="127.0.0.1", port=0, event_log=False, **overrides)
    return BackgroundServer(settings).start()


# Long enough to barge in on at 1 s, short enough to keep the suite quick.
TEST_GREETING = "Hi, thanks for calling. How can I help you today?"


@pytest.fixture(scope="module")
def server():
    srv = make_server(greeting=TEST_GREETING, log_dtmf=True)  # tests read the keys back from events
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def fake_server() -> Iterator[FakeLlm]:
    """A local fake OpenAI-compatible server (real HTTP + SSE), one per test module."""
    app = FakeLlm()
    server = ServerThread(app)
    app.url = server.start()
    yield app
    server.stop()


# --------------------------------------------------------------------------------------------
# Test tiers. `make test-fast` (pytest -m "not slow") runs the unit and in-memory tests in
# seconds; `make test` runs everything. Every test module is classified here, in one place:
# FAST, SLOW (it starts parley servers, loads speech or language models, or makes real-time
# calls), or a set of its slow tests when only those are. An unclassified module, or a listed
# test that no longer exists, stops the run.
# --------------------------------------------------------------------------------------------

FAST = "fast"
SLOW = "slow"

TIERS: dict[str, str | frozenset[str]] = {
    "test_acs_auth.py": FAST,  # JWT checks; a JWKS server and a small app on loopback
    "test_access.py": SLOW,  # API tokens, Origin and call checks, redaction: servers and real calls
    "test_agent_selection.py": FAST,  # ?agent=, the handshake's agent, agents by number
    "test_admission.py": frozenset(  # the overload test waits for the loop to calm down (~10 s)
        {"test_an_overloaded_loop_refuses_new_calls_and_readyz_says_why"}
    ),
    "test_acs_call_automation.py": SLOW,  # parley with fake ACS over TLS, the real SDK
    "test_acs_codec.py": FAST,
    "test_twilio_codec.py": FAST,
    "test_twilio_wire.py": FAST,
    "test_twilio_marks.py": FAST,
    "test_twilio_auth.py": FAST,  # signatures; a fake Twilio REST API on loopback
    "test_twilio_e2e.py": SLOW,  # a parley server, Twilio-like calls at real time
    "test_cluster_acs.py": SLOW,  # two parleys with the fake ACS over TLS, the real SDK, on one Redis
    "test_cluster.py": frozenset(  # a `parley serve` subprocess killed, and waits for TTLs and timeouts
        {
            "test_a_killed_instance_is_cleaned_up_by_a_survivor",
            "test_a_command_for_an_instance_that_is_gone_or_silent_is_a_defined_error",
            "test_a_restart_under_the_same_id_releases_what_the_previous_process_left",
        }
    ),
    "test_azure_speech.py": SLOW,  # the real Speech SDK against a fake service, calls
    "test_bargein_e2e.py": SLOW,
    "test_bench_smoke.py": SLOW,
    "test_caller.py": SLOW,  # real-time calls against local servers
    "test_caller_twilio_e2e.py": SLOW,  # parley call --proto twilio against a real server
    "test_caller_twilio.py": frozenset(  # real-time calls against a fake Twilio app
        {
            "test_a_twilio_call_speaks_the_stream_echoes_marks_and_clears_on_barge_in",
            "test_a_mark_comes_back_once_the_audio_before_it_has_played",
            "test_media_after_clear_is_counted",
        }
    ),
    "test_call_cli.py": frozenset(  # real-time calls against plumbing servers
        {
            "test_a_say_timeline_with_keys_is_two_utterances_and_a_stereo_recording",
            "test_the_token_reaches_the_events_api",
        }
    ),
    "test_clauses.py": FAST,
    "test_cli.py": SLOW,
    "test_drain.py": SLOW,  # `parley serve` subprocesses drained with SIGTERM
    "test_e2e.py": SLOW,
    "test_echo_gate.py": SLOW,  # Silero VAD and pocketsphinx on real-time audio
    "test_echo_search.py": FAST,  # the vectorised lag search against the loop it replaced
    "test_handoff.py": FAST,
    "test_browser_channel.py": SLOW,  # /ws/browser on real servers: refusals and a call
    "test_browser_wire.py": FAST,  # the browser channel's codec, its events and access rules
    "test_web_calls.py": SLOW,  # the calls console: real-time calls, a real Chromium
    "test_web_routes.py": FAST,
    "test_web_talk.py": SLOW,  # a real Chromium talking to a real server (Piper's voice as the microphone)  # the pages' router in a small app (TestClient)  # the loop -> recognition thread frame queue
    "test_audio_levels.py": FAST,
    "test_engines.py": SLOW,  # loads every engine
    "test_extending.py": SLOW,  # the example agent on a real server, real calls
    "test_faults.py": FAST,
    "test_flood.py": SLOW,  # a flooding process against a real server, a real-time call  # in-memory harness: a real MediaHandler, scripted engines
    "test_eval.py": frozenset({"test_eval_stt_smoke", "test_eval_bargein_smoke"}),
    "test_llama.py": frozenset(  # the ones that load SmolLM2 (skipped without the llama extra)
        {
            "test_streams_openai_chunks_with_text",
            "test_close_mid_stream_returns_at_once_and_frees_the_model",
            "test_concurrent_requests_take_turns_without_blocking_the_loop",
            "test_closing_a_queued_request_skips_it",
            "test_generation_errors_surface_from_anext",
            "test_only_streaming_is_offered",
            "test_tools_are_ignored_with_one_warning_without_a_tool_format",
            "test_forced_tool_call_streams_tool_call_deltas",
            "test_llm_agent_answers_with_say_outputs",
            "test_llm_agent_barge_in_closes_the_stream",
        }
    ),
    "test_llm_agent.py": FAST,  # against a local fake LLM server
    "test_llm_e2e.py": SLOW,
    "test_llm_warm.py": frozenset(  # a parley server; a 6 s pause
        {"test_the_server_warms_its_llm_agents_at_startup", "test_a_turn_after_a_pause_reuses_the_connection"}
    ),
    "test_loadgen.py": frozenset(  # the ones that send real-time calls
        {
            "test_the_caller_sends_valid_acs_frames_on_a_steady_schedule",
            "test_concurrent_calls_against_a_plumbing_server",
            "test_misbehaving_server_is_recorded_per_call",
        }
    ),
    "test_logging.py": frozenset({"test_a_stdout_nobody_reads_never_freezes_the_server"}),  # runs `parley serve`
    "test_limits.py": frozenset(  # real servers
        {
            "test_finish_politely_over_a_real_socket",
            "test_sockets_that_only_connect_take_no_engines_and_are_closed_after_the_handshake_timeout",
            "test_a_flooding_peer_is_closed_with_1008_over_a_real_socket",
            "test_a_long_dtmf_message_over_a_real_socket_is_refused_and_the_call_goes_on",
        }
    ),
    "test_media_units.py": FAST,
    "test_onset.py": FAST,  # the onset detector on real speech (Silero), its policy, pauses in the harness
    "test_metrics.py": FAST,  # metrics from event records; the endpoint through an ASGI client
    "test_metrics_e2e.py": SLOW,  # a plumbing server and a barge-in call; `parley serve` processes
    "test_piper.py": SLOW,  # the Piper voice model
    "test_pool.py": FAST,  # engine pools with stand-in engines, the pool reaper thread
    "test_properties.py": SLOW,  # hypothesis: thousands of codec and harness examples (~35 s)
    "test_protocols.py": SLOW,  # builds the shipped agents and synthesizers
    "test_recognition.py": SLOW,  # Whisper, pocketsphinx, Silero
    "test_recognition_faults.py": FAST,  # engine doubles
    "test_records.py": frozenset(  # a plumbing server; `parley serve` killed and restarted
        {"test_a_killed_server_keeps_the_finished_turns_of_a_call"}
    ),
    "test_records_redis.py": frozenset({"test_a_call_served_by_one_instance_is_read_from_another"}),  # 2 servers
    "test_robustness.py": SLOW,
    "test_tracing.py": frozenset(  # a plumbing server and a barge-in call; a process that imports the server
        {"test_a_real_call_makes_a_call_span_with_its_turns", "test_off_means_nothing_of_opentelemetry_is_imported"}
    ),
    "test_workers.py": frozenset(  # real `parley serve --workers 2`; two processes writing records
        {
            "test_two_processes_writing_one_database_lose_nothing",
            "test_two_workers_share_the_port_spread_calls_reset_together_and_drain_on_sigterm",
            "test_a_killed_worker_is_restarted_and_only_its_calls_are_lost",
            "test_a_worker_that_cannot_start_stops_the_server",
            "test_workers_die_with_a_killed_supervisor",
            "test_a_sigterm_while_the_workers_start_stops_them_all",
            "test_a_second_sigterm_ends_the_workers_without_waiting_for_the_calls",
            "test_bench_load_with_two_workers_reports_each_worker",
        }
    ),
    "test_workers_redis.py": SLOW,  # `parley serve --workers 2` on a real redis-server
    "test_turn_models.py": frozenset({"test_pip_download_from_a_local_index"}),  # runs pip (offline)
    "test_turn_detection.py": SLOW,  # Smart Turn on Piper/espeak speech, real-time recognition threads
    "test_turn_eval.py": frozenset({"test_eval_turns_smoke"}),  # real calls to two in-process servers
    "test_scenario.py": FAST,
    "test_scripted_agent.py": FAST,
    "test_scripted_listening.py": FAST,  # slots, scoring, facts, handoffs: the packaged scenarios
    "test_settings.py": FAST,
    "test_bench_machine.py": FAST,
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    problems: set[str] = set()
    for item in items:
        module = item.path.name
        tier = TIERS.get(module)
        if tier is None:
            problems.add(f"{module} is not classified: add it to TIERS in tests/conftest.py")
        elif tier == SLOW:
            item.add_marker(pytest.mark.slow)
        elif isinstance(tier, frozenset):
            missing = {name for name in tier if not hasattr(getattr(item, "module", None), name)}
            problems.update(f"{module}: TIERS names {name}, which it does not define" for name in missing)
            if getattr(item, "originalname", item.name) in tier:
                item.add_marker(pytest.mark.slow)
    if problems:
        raise pytest.UsageError("test tiers:\n  " + "\n  ".join(sorted(problems)))
