"""One typed settings object for the whole server.

Values come from (highest first): CLI flags, `PARLEY_*` environment variables, a `.env` file, defaults.
The object is built once at startup and passed down; nothing deeper reads the environment.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import urlsplit

import pydantic_settings
from pydantic import BeforeValidator, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from parley.acs import config as acs_config
from parley.media.bargein import DEFAULT_BACKCHANNELS
from parley.models import default_models_dir
from parley.security.acs_auth import ACS_ISSUER, ACS_JWKS_URL, AcsAuthConfig

if TYPE_CHECKING:
    from parley.agents.llm import LlmConfig


@dataclass(frozen=True, slots=True)
class SettingsProblem:
    """One bad setting. `field` is the setting at fault (None: the message names the settings)."""

    message: str
    field: str | None = None

    @property
    def env(self) -> str | None:
        return f"PARLEY_{self.field.upper()}" if self.field else None

    def line(self, flag: str | None = None) -> str:
        """One line for the console: `PARLEY_PORT (--port): Input should be ...`."""
        if self.env is None:
            return self.message
        return f"{self.env}{f' ({flag})' if flag else ''}: {self.message}"

    def __str__(self) -> str:
        return f"{self.field} ({self.env}): {self.message}" if self.field else self.message


class SettingsError(ValueError):
    """Bad configuration: `problems` name each offending setting, one line each."""

    def __init__(self, problems: list[SettingsProblem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(problem) for problem in problems))


class _Problems(ValueError):
    """Raised by the validators below; load_settings turns it into SettingsError."""

    def __init__(self, problems: list[SettingsProblem]) -> None:
        self.problems = problems
        super().__init__("; ".join(str(problem) for problem in problems))


def _problem(message: str, field: str | None = None) -> _Problems:
    return _Problems([SettingsProblem(message, field)])


def _split_list(value: object) -> object:
    """A list setting from the environment: comma-separated (`uh-huh, okay`) or a JSON list."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not a JSON list ({exc.msg}); or give comma-separated values") from None
    return [item.strip() for item in text.split(",") if item.strip()]


def _split_mapping(value: object) -> object:
    """A mapping setting from the environment: `key=value` pairs, comma-separated, or a JSON object."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not a JSON object ({exc.msg}); or give key=value pairs, comma-separated") from None
    pairs = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, mapped = item.partition("=")
        if not sep or not key.strip() or not mapped.strip():
            raise ValueError(f"{item!r} is not key=value")
        pairs[key.strip()] = mapped.strip()
    return pairs


def _phone_key(number: str) -> str:
    text = number.strip().lower().removeprefix("tel:").removeprefix("4:")
    return re.sub(r"[\s().-]", "", text)


# NoDecode: pydantic-settings would otherwise insist on JSON for a list and fail with a traceback.
StrList = Annotated[list[str], NoDecode, BeforeValidator(_split_list)]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PARLEY_", env_file=".env", env_file_encoding="utf-8", extra="ignore")

    # --- server -----------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Interface to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 = any free port).")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = Field(
        "auto",
        description="json: one JSON object per line; console: short lines with emoji markers;"
        " auto: json unless stdout is a terminal.",
    )
    event_log: bool = Field(True, description="Write per-call events as JSON lines to the log.")
    events_api: bool = Field(
        True, description="Serve GET /api/calls/{id}/events (call transcripts: keep off on public hosts)."
    )
    recent_calls_kept: int = Field(100, ge=0, description="Ended calls whose events stay queryable.")
    max_message_bytes: int = Field(65536, ge=4096, description="Largest inbound WebSocket message.")
    websocket_impl: Literal["auto", "websockets", "websockets-sansio", "wsproto"] = Field(
        "auto", description="uvicorn's WebSocket implementation (see bench/README.md for figures)."
    )

    # --- admission and per-call limits (docs/operations.md) -------------------------------------
    max_calls: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="Media sockets served at once; beyond it the upgrade is refused with HTTP 503."
        " Default: derived from the CPU cores and the engine profile (printed at startup).",
    )
    handshake_timeout_s: float = Field(
        5.0, gt=0, le=300, description="A media socket that sends no AudioMetadata/first frame in this time is closed."
    )
    idle_timeout_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="A media socket that sends nothing for this long is closed (ACS streams"
        " a frame every 20 ms, silence included).",
    )
    max_call_s: float = Field(4 * 3600.0, gt=0, description="A call is ended (politely) after this long.")
    max_inbound_rate: float = Field(
        4.0,
        ge=1.5,
        le=1000,
        description="Sustained inbound audio faster than this many times real time closes the socket (1008).",
    )
    max_dtmf_message_digits: int = Field(
        32, ge=1, le=4096, description="A DtmfData message with more keys than this is refused as bad input."
    )
    overload_loop_lag_ms: float = Field(
        100.0, gt=0, description="Event-loop lag (p99 over the last seconds) above which new calls are refused."
    )
    overload_backlog_frames: int = Field(
        100, ge=1, description="Recognition backlog (frames behind, worst call) above which new calls are refused."
    )
    overload_queued_jobs: int = Field(
        8,
        ge=1,
        description="Jobs waiting per worker on a shared executor (synthesis, Whisper finals) above which new"
        " calls are refused.",
    )

    # --- access and privacy ----------------------------------------------------------------------
    api_token: SecretStr | None = Field(
        None,
        description="Bearer token for the calls/events/stats APIs. Without it those APIs answer only on a"
        " loopback bind.",
    )
    log_dtmf: bool = Field(False, description="Keep DTMF digits in events and logs (default: masked, PINs stay out).")
    allowed_origins: StrList = Field(
        default_factory=list,
        description="Browser origins allowed to open media sockets (ACS sends no Origin; any other is refused).",
    )

    # --- call records ----------------------------------------------------------------------------
    store: Literal["sqlite", "memory", "redis"] | None = Field(
        None,
        description="Where call records go: sqlite (durable, in data_dir), redis (shared by every instance;"
        " default when PARLEY_REDIS_URL is set, else sqlite) or memory (tests, benchmarks).",
    )
    data_dir: Path = Field(Path("parley-data"), description="Directory of the call records database.")
    retention_days: float = Field(30.0, gt=0, description="Call records older than this are deleted.")

    # --- scale: worker processes, Redis cluster, metrics and traces (docs/scaling.md) -----------
    workers: int | None = Field(
        None,
        ge=1,
        le=256,
        description="Worker processes sharing the port (default: one per core with cloud or plumbing engines,"
        " 1 with the embedded models, which every worker loads for itself).",
    )
    redis_url: SecretStr | None = Field(
        None,
        description="redis://[:password@]host:port/db shared by every instance: call registry and ownership,"
        " ACS call book, routed hang-ups, call records, cluster-wide admission (unset: one process).",
    )
    instance_id: str | None = Field(
        None,
        max_length=64,
        pattern=r"^[A-Za-z0-9._:-]+$",
        description="This instance's name in the cluster (default: hostname and process id).",
    )
    cluster_max_calls: int | None = Field(
        None, ge=1, description="Live calls across every instance sharing PARLEY_REDIS_URL (default: no cluster cap)."
    )
    metrics: bool = Field(True, description="Serve Prometheus metrics on GET /metrics (guarded like /api/stats).")

    # --- graceful drain --------------------------------------------------------------------------
    drain_timeout_s: float = Field(
        30.0, ge=0, le=86_400, description="On SIGTERM, how long live calls may go on before they are closed."
    )
    closing_text: str = Field(
        "Sorry, this line is closing now. Please call again. Goodbye.",
        description="What a caller hears when the server drains or the call reaches max_call_s.",
    )

    engines: Literal["embedded", "plumbing"] = Field(
        "embedded",
        description="'plumbing' swaps recognizer, agent and TTS for cost-free test doubles (VAD kept)"
        " to measure the server's own capacity; never for real calls.",
    )

    # --- agent ------------------------------------------------------------------------------------
    agent: str = Field(
        "pizza",
        description="Agent or scenario: a packaged example from agents/examples/ (`parley serve --help`"
        " lists them) or a YAML path.",
    )
    agents: StrList = Field(
        default_factory=list,
        description="More agents this server loads next to `agent` (the default), chosen per call:"
        " `?agent=NAME` on a media URL, the called number (`agents_by_number`), the web page's picker.",
    )
    agents_by_number: Annotated[dict[str, str], NoDecode, BeforeValidator(_split_mapping)] = Field(
        default_factory=dict,
        description="Called number -> agent, for ACS incoming calls and Twilio's `To`:"
        " '+14255550100=bank,+14255550101=pizza' or a JSON object. Numbers not listed get `agent`.",
    )
    greeting: str | None = Field(None, description="Overrides the agent's greeting ('' = no greeting).")
    greeting_interruptible: bool | None = Field(
        None, description="Overrides the agent's setting: can the caller barge in on the greeting?"
    )

    # --- LLM agents (defaults for every LLM agent; a scenario's `model:` overrides per agent) -------
    llm_provider: Literal["openai", "azure", "compatible", "llama-cpp"] = Field(
        "openai",
        description="openai; azure (Azure OpenAI); compatible (Ollama, vLLM, llama.cpp server... at"
        " llm_base_url); llama-cpp (in-process, the optional `llama` extra).",
    )
    llm_model: str = Field(
        "gpt-4o-mini",
        description="Model; Azure: the deployment name; llama-cpp: a .gguf path or smollm2 / qwen2.5-0.5b.",
    )
    llm_base_url: str | None = Field(None, description="compatible: e.g. http://localhost:11434/v1.")
    llm_api_key: SecretStr | None = Field(None, description="Default: OPENAI_API_KEY (AZURE_OPENAI_API_KEY for Azure).")
    llm_azure_endpoint: str | None = Field(None, description="https://<resource>.openai.azure.com")
    llm_api_version: str | None = Field(None, description="Azure OpenAI API version, e.g. 2024-10-21.")
    llm_azure_auth: Literal["key", "entra"] = Field(
        "key", description="Azure: an API key, or Entra ID (managed identity, az login; needs azure-identity)."
    )
    llm_temperature: float | None = Field(None, ge=0.0, le=2.0)
    llm_max_tokens: int | None = Field(None, gt=0, description="Cap on one reply's tokens.")
    llm_first_token_timeout_s: float = Field(
        4.0, gt=0.0, description="No first token by then: the fallback line is spoken."
    )
    llm_total_timeout_s: float = Field(20.0, gt=0.0, description="A reply is cut after this long.")
    llm_max_retries: int = Field(2, ge=0, le=10, description="On 429/5xx, before the first token only.")
    llm_threads: int = Field(2, ge=1, le=64, description="llama-cpp: CPU threads.")

    # --- voice activity and barge-in ----------------------------------------------------------------
    vad_threshold: float = Field(0.5, gt=0.0, lt=1.0, description="Silero speech probability.")
    speech_start_ms: int = Field(
        64, ge=32, le=1000, description="Sustained speech before an utterance (and barge-in) starts."
    )
    endpoint_silence_ms: int = Field(500, ge=100, le=5000, description="Silence that ends an utterance (final result).")
    preroll_ms: int = Field(300, ge=0, le=2000, description="Audio before speech onset kept for STT.")
    max_utterance_s: float = Field(30.0, gt=1.0, description="Force a final after this long.")
    bargein_partial_chars: int = Field(
        4, ge=0, description="A partial this long also triggers barge-in (0 = partials never do)."
    )
    bargein_on_dtmf: bool = Field(True, description="A DTMF key interrupts the agent.")
    bargein_speaking: Literal["pause", "confirm", "stop", "off"] = Field(
        "pause",
        description="Caller speech while the agent talks: 'pause' stops the audio at once and resumes"
        " it if no real words follow (backchannel, cough, echo); 'confirm' keeps talking until words"
        " or sustained speech confirm; 'stop' cancels at once (seeds); 'off' never interrupts.",
    )
    bargein_thinking: Literal["cancel", "off"] = Field(
        "cancel", description="Caller speech before the agent's audio starts cancels that answer."
    )
    bargein_confirm_ms: int = Field(
        600, ge=100, le=5000, description="Voiced speech this long confirms a barge-in (beyond a backchannel)."
    )
    bargein_onset: bool = Field(
        True,
        description="Pause the agent at the first VAD window over the threshold (the speech onset) instead of"
        " after speech_start_ms of sustained speech ('pause' and 'stop' modes); a pause that sustained speech"
        " does not follow resumes where it stopped.",
    )
    onset_rise_db: float = Field(
        25.0,
        ge=6.0,
        le=60.0,
        description="A caller frame this much louder than the line's background (its median level over the last"
        " second) is a speech onset while the agent talks (the VAD then confirms it or not).",
    )
    onset_min_dbfs: float = Field(
        -40.0, ge=-70.0, le=0.0, description="...and at least this loud: quieter frames wait for the VAD."
    )
    onset_resume_ms: int = Field(
        300,
        ge=50,
        le=2000,
        description="A pause on a speech onset that no sustained speech follows resumes after at most this long,"
        " where it stopped (a pause after sustained sound resumes at the start of the clause it cut).",
    )
    resume_after_ms: int = Field(
        2000, ge=200, le=20000, description="A pending barge-in with no words after this long resumes the reply."
    )
    backchannels: StrList = Field(
        default_factory=lambda: list(DEFAULT_BACKCHANNELS),
        description="Words/phrases that never interrupt the agent on their own (comma-separated or a JSON list).",
    )
    echo_gate: bool = Field(True, description="Ignore inbound audio explained by the echo of the agent's own voice.")

    # --- recognition ------------------------------------------------------------------------------
    stt: Literal["two-pass", "pocketsphinx", "whisper", "azure"] = Field(
        "two-pass",
        description="'two-pass': pocketsphinx partials + Whisper finals; 'pocketsphinx': fast, less"
        " accurate; 'whisper': Whisper finals only (no partials); 'azure': Azure AI Speech (cloud).",
    )
    stt_model: str | None = Field(
        None, description="CTranslate2 Whisper model directory (default: bundled tiny.en, hash-verified)."
    )
    stt_language: str = Field("en", description="Language for multilingual Whisper models.")
    stt_workers: int = Field(1, ge=1, le=16, description="Whisper passes running at once (process-wide).")
    stt_threads: int = Field(2, ge=1, le=64, description="CPU threads per Whisper pass.")
    stt_trim_context: bool = Field(
        True, description="Encode only the utterance (3-4x faster) instead of Whisper's 30 s window."
    )
    early_final_ms: int = Field(
        200, ge=0, le=5000, description="Start the Whisper pass this far into the closing silence."
    )
    partial_interval_ms: int = Field(100, ge=20, le=2000, description="How often partials update.")

    # --- turn detection ---------------------------------------------------------------------------
    turn_detection: Literal["silence", "smart-turn"] = Field(
        "smart-turn",
        description="How a caller's turn ends: 'silence' after PARLEY_ENDPOINT_SILENCE_MS; 'smart-turn' asks"
        " the Smart Turn v3.2 model after PARLEY_TURN_SHORT_SILENCE_MS (complete: end now; else wait for"
        " more speech up to PARLEY_TURN_MAX_SILENCE_MS). Needs `parley models fetch smart-turn` (`make"
        " serve` runs it); without the model the default falls back to 'silence' with a warning.",
    )
    turn_short_silence_ms: int = Field(
        100,
        ge=64,
        le=2000,
        description="smart-turn: silence after which the model is asked (and the Whisper pass starts).",
    )
    turn_max_silence_ms: int = Field(
        1500, ge=200, le=10000, description="smart-turn: silence that ends a turn the model judged incomplete."
    )
    models_dir: Path = Field(
        default_factory=default_models_dir,
        description="Where `parley models fetch` stores models (default $XDG_CACHE_HOME/parley/models).",
    )

    # --- synthesis and playout -------------------------------------------------------------------
    tts: Literal["piper", "espeak", "azure"] = Field(
        "piper", description="Text-to-speech engine ('azure': Azure AI Speech, cloud)."
    )
    tts_voice: str | None = Field(
        None,
        description="Voice: Piper .onnx path (default: bundled en_US-joe-medium) or espeak-ng voice"
        " name (default en-us). Agent YAML may override.",
    )
    tts_rate: float = Field(1.0, ge=0.25, le=4.0, description="Piper speaking-rate multiplier.")
    tts_rate_wpm: int = Field(175, ge=80, le=450, description="espeak-ng words per minute.")
    tts_threads: int = Field(
        2,
        ge=1,
        le=64,
        description="ONNX threads per Piper synthesis: 2 cuts first audio ~40 ms on an idle 2-core"
        " machine; 1 uses ~20% less CPU per call and does better when the cores are busy.",
    )
    synth_workers: int = Field(2, ge=1, le=64, description="Threads shared by all calls for TTS.")

    # --- faults: watchdogs and fallbacks (no call may go silent) ---------------------------------
    tts_fallback: bool = Field(
        True,
        description="When the configured voice fails (error, timeout, no audio) the embedded voice"
        " speaks instead (Piper for tts=azure, espeak-ng for tts=piper) and the configured one is"
        " retried with backoff (1, 2, 4 ... 30 s).",
    )
    tts_first_audio_timeout_s: float = Field(
        5.0, gt=0.0, le=120.0, description="A clause with no audio after this long counts as a TTS failure."
    )
    tts_chunk_timeout_s: float = Field(
        5.0, gt=0.0, le=120.0, description="A TTS stream silent this long between chunks counts as failed."
    )
    agent_timeout_s: float = Field(
        25.0,
        gt=0.0,
        le=600.0,
        description="The agent's first output, and each next one, must come within this long (above the"
        " LLM's own timeouts): a stuck agent ends its turn with the apology line.",
    )
    turn_cleanup_timeout_s: float = Field(
        2.0, gt=0.0, le=60.0, description="Closing an agent stream or a synthesis job waits at most this long."
    )
    dtmf_interdigit_ms: int = Field(
        1000,
        ge=100,
        le=10000,
        description="Keys pressed this close together are one input (an account number); a menu key"
        " the agent expects alone is answered at once.",
    )
    dtmf_terminator: str = Field("#", max_length=1, description="Ends a key input at once ('' for none).")
    dtmf_max_digits: int = Field(20, ge=1, le=64, description="A key input is complete at this many digits.")
    apology_text: str = Field(
        "Sorry, I'm having trouble right now. Could you say that again?",
        description="Spoken when a turn fails (agent or voice error, timeout) so the caller is not left in silence.",
    )

    # --- Azure AI Speech (stt=azure, tts=azure) -----------------------------------------------------
    azure_speech_key: SecretStr | None = Field(None, description="Speech resource key (with a region).")
    azure_speech_region: str | None = Field(None, description="Speech resource region, e.g. westeurope.")
    azure_speech_endpoint: str | None = Field(
        None,
        description="wss://<resource>.cognitiveservices.azure.com (serves STT and TTS), or a full"
        " ws(s):// STT or TTS endpoint; replaces the region.",
    )
    azure_speech_auth: Literal["key", "entra"] = Field(
        "key", description="A key, or Entra ID (needs azure-identity and the custom-domain endpoint)."
    )
    azure_speech_language: str = Field("en-US", description="Recognition language.")
    azure_speech_languages: StrList = Field(
        default_factory=list,
        description="Two or more locales: continuous language identification among them (comma-separated"
        " or a JSON list).",
    )
    azure_speech_phrases: StrList = Field(
        default_factory=list, description="Phrase list: names and terms to favour (comma-separated or a JSON list)."
    )
    azure_speech_segmentation_silence_ms: int | None = Field(
        None, ge=100, le=5000, description="Silence that ends an Azure phrase (service default if unset)."
    )
    azure_tts_voice: str = Field(
        "en-US-JennyNeural",
        description="Azure voice: NAME[;style=STYLE][;degree=D][;rate=R]; tts_voice overrides it.",
    )

    @model_validator(mode="after")
    def _check_azure_speech(self) -> Settings:
        if "azure" not in (self.stt, self.tts):
            return self
        if self.azure_speech_auth == "entra" and not self.azure_speech_endpoint:
            raise _problem(
                "PARLEY_AZURE_SPEECH_AUTH=entra needs PARLEY_AZURE_SPEECH_ENDPOINT (the resource's custom domain)",
                "azure_speech_endpoint",
            )
        if not self.azure_speech_endpoint and not (self.azure_speech_key and self.azure_speech_region):
            raise _problem(
                "Azure Speech (stt/tts=azure) needs azure_speech_key and azure_speech_region"
                " (PARLEY_AZURE_SPEECH_KEY, PARLEY_AZURE_SPEECH_REGION), or azure_speech_endpoint"
                " (PARLEY_AZURE_SPEECH_ENDPOINT)"
            )
        endpoint = self.azure_speech_endpoint
        if endpoint and not endpoint.startswith(("wss://", "ws://", "https://")):
            raise _problem(f"must be a wss://, ws:// or https:// URL (got {endpoint!r})", "azure_speech_endpoint")
        if len(self.azure_speech_languages) == 1:
            raise _problem("needs two or more locales (or use PARLEY_AZURE_SPEECH_LANGUAGE)", "azure_speech_languages")
        return self

    playout_lead_ms: int = Field(
        100, ge=0, le=2000, description="How far ahead of the playout clock audio may be sent."
    )

    # --- per-call engines ----------------------------------------------------------------------
    engine_pool_warm: int = Field(2, ge=0, le=256, description="VAD/recognizers loaded at startup.")
    engine_pool_idle: int = Field(
        16, ge=0, le=1024, description="Idle VAD/recognizers kept for reuse (~90 MB per recognizer)."
    )
    engine_pool_idle_s: float = Field(
        60.0,
        ge=0.0,
        le=86_400.0,
        description="Idle VAD/recognizers beyond the warm count are released after this long (pools shrink after bursts).",
    )

    # --- queues -------------------------------------------------------------------------------------
    inbound_queue_frames: int = Field(
        500, ge=50, description="Audio frames buffered for the recognition thread (500 = 10 s)."
    )
    turn_queue_size: int = Field(8, ge=1, description="Pending caller inputs before they are merged.")

    # --- ACS: Call Automation (answer, call, hang up, transfer) and ACS token checks (docs/azure.md) --
    acs_connection_string: SecretStr | None = Field(
        None,
        description="endpoint=https://<resource>.communication.azure.com/;accesskey=<key>: turns Call"
        " Automation on (HMAC). Or acs_endpoint with Entra ID.",
    )
    acs_endpoint: str | None = Field(
        None,
        description="https://<resource>.communication.azure.com with Entra ID (azure-identity's"
        " DefaultAzureCredential: managed identity, az login) instead of a connection string.",
    )
    acs_callback_url: str | None = Field(
        None,
        description="Public https base URL of this server (e.g. a dev tunnel): ACS posts call events to"
        " <url>/api/acs/callbacks/<id> and streams media to wss://<host>/ws/acs?callId=<id>.",
    )
    acs_sample_rate: int = Field(
        16000, description="Media streaming PCM format for both directions: 16000 or 24000 Hz."
    )
    acs_audio_channel: Literal["mixed", "unmixed"] = Field(
        "mixed", description="'mixed': one stream of all participants; 'unmixed': per participant."
    )
    acs_source_caller_id: str | None = Field(
        None, description="E.164 number of the ACS resource, shown to the people parley phones."
    )
    acs_incoming_code: SecretStr | None = Field(
        None,
        description="Shared secret the Event Grid subscription sends to /api/acs/incoming as ?code=..."
        " (or header x-parley-code); unset = any caller may post events there.",
    )
    acs_outbound_token: SecretStr | None = Field(
        None, description="Bearer token POST /api/calls requires; unset = outbound calls are refused."
    )
    acs_resource_id: str = Field(
        "",
        description="The ACS resource's immutable id: the audience of ACS's JWTs. Setting it turns token checks on.",
    )
    acs_auth_enabled: bool | None = Field(
        None,
        description="Check ACS's JWT on the media socket and callbacks. Unset: on when ACS is configured"
        " or acs_resource_id is set; false: off (local development only).",
    )
    acs_auth_issuer: str = Field(ACS_ISSUER, description="Expected `iss` of ACS tokens.")
    acs_auth_jwks_url: str = Field(ACS_JWKS_URL, description="ACS's signing keys (JWKS).")
    acs_auth_jwks_file: Path | None = Field(
        None, description="A local JWKS file used instead of the URL (air-gapped hosts, tests)."
    )
    acs_auth_leeway_s: float = Field(60.0, ge=0, le=600, description="Clock skew tolerated on exp/nbf.")
    acs_auth_refresh_min_interval_s: float = Field(
        60.0, ge=0, description="At most one signing-key refresh this often (unknown kids)."
    )
    acs_auth_jwks_max_age_s: float = Field(
        3600.0, gt=0, description="Refetch signing keys this old (a withdrawn key stops being trusted)."
    )

    # --- Twilio Media Streams: /api/twilio/voice, /ws/twilio (docs/twilio.md) ----------------------
    twilio_auth_token: SecretStr | None = Field(
        None,
        description="The Twilio account's auth token: checks X-Twilio-Signature on the voice webhook and"
        " the media WebSocket, and (with twilio_account_sid) authenticates hang-up and transfer requests.",
    )
    twilio_account_sid: str | None = Field(
        None, description="AC...: with the auth token, the agents' hang-up and transfer reach the Twilio call."
    )
    twilio_public_url: str | None = Field(
        None,
        description="The https:// URL Twilio reaches this server at (e.g. an ngrok tunnel): the Stream"
        " URL in the TwiML and the URL signatures are checked against. Unset: the request's own URL.",
    )
    twilio_api_base: str = Field("https://api.twilio.com", description="Twilio's REST API (tests: a fake).")
    twilio_api_timeout_s: float = Field(10.0, gt=0, le=120, description="Timeout of one Twilio REST request.")
    twilio_allow_unsigned: bool = Field(
        False,
        description="Without twilio_auth_token, serve Twilio's endpoints on a non-loopback bind anyway"
        " (unauthenticated: anyone can start calls; never in production).",
    )

    @property
    def twilio_calls_configured(self) -> bool:
        """Hang-up and transfer of Twilio calls through Twilio's REST API are possible."""
        return bool(self.twilio_account_sid) and self.twilio_auth_token is not None

    @model_validator(mode="after")
    def _check_twilio(self) -> Settings:
        url = self.twilio_public_url
        if url is not None:
            parts = urlsplit(url.strip())
            if parts.scheme not in ("https", "http") or not parts.netloc or parts.query or parts.fragment:
                raise _problem("must be an http(s):// URL such as https://abc.ngrok.app", "twilio_public_url")
        return self

    @property
    def acs_configured(self) -> bool:
        """Call Automation is on: parley answers, places and controls calls through ACS."""
        return self.acs_connection_string is not None or bool(self.acs_endpoint)

    @property
    def acs_auth_active(self) -> bool:
        if self.acs_auth_enabled is not None:
            return self.acs_auth_enabled
        return self.acs_configured or bool(self.acs_resource_id.strip())

    def acs_auth_config(self) -> AcsAuthConfig:
        return AcsAuthConfig(
            enabled=self.acs_auth_active,
            audience=self.acs_resource_id.strip(),
            issuer=self.acs_auth_issuer,
            jwks_url=self.acs_auth_jwks_url,
            jwks_file=self.acs_auth_jwks_file,
            leeway_s=self.acs_auth_leeway_s,
            refresh_min_interval_s=self.acs_auth_refresh_min_interval_s,
            jwks_max_age_s=self.acs_auth_jwks_max_age_s,
        )

    @property
    def agent_names(self) -> list[str]:
        """Every agent this server loads, the default first, each once."""
        return list(dict.fromkeys([self.agent, *self.agents]))

    def agent_for_number(self, number: str) -> str | None:
        """The agent `agents_by_number` names for a called number (None: the default agent).
        Numbers match after dropping spaces, dashes and brackets; `tel:` and `4:` prefixes are ignored."""
        wanted = _phone_key(number)
        return next((agent for listed, agent in self.agents_by_number.items() if _phone_key(listed) == wanted), None)

    @model_validator(mode="after")
    def _check_agents_by_number(self) -> Settings:
        unknown = sorted({agent for agent in self.agents_by_number.values() if agent not in self.agent_names})
        if unknown:
            raise _problem(
                f"agents_by_number names agent(s) not loaded: {', '.join(unknown)};"
                " add them to PARLEY_AGENTS (or make one PARLEY_AGENT)",
                "agents_by_number",
            )
        return self

    @model_validator(mode="after")
    def _default_store(self) -> Settings:
        """Records go where every instance can read them: Redis when the cluster has one."""
        if self.store is None:
            self.store = "redis" if self.redis_url is not None else "sqlite"
        return self

    @model_validator(mode="after")
    def _check_acs(self) -> Settings:
        problems = acs_config.settings_problems(self)
        if problems:
            raise _Problems([SettingsProblem(problem) for problem in problems])
        return self

    @model_validator(mode="after")
    def _check_consistency(self) -> Settings:
        problems = []
        if self.endpoint_silence_ms <= self.speech_start_ms:
            problems.append(
                SettingsProblem(
                    f"must be longer than PARLEY_SPEECH_START_MS ({self.endpoint_silence_ms} ms <="
                    f" {self.speech_start_ms} ms)",
                    "endpoint_silence_ms",
                )
            )
        elif self.early_final_ms >= self.endpoint_silence_ms:
            problems.append(
                SettingsProblem(
                    f"must be shorter than PARLEY_ENDPOINT_SILENCE_MS ({self.early_final_ms} ms >="
                    f" {self.endpoint_silence_ms} ms)",
                    "early_final_ms",
                )
            )
        if self.turn_short_silence_ms >= self.turn_max_silence_ms:
            problems.append(
                SettingsProblem(
                    f"must be shorter than PARLEY_TURN_MAX_SILENCE_MS ({self.turn_short_silence_ms} ms >="
                    f" {self.turn_max_silence_ms} ms)",
                    "turn_short_silence_ms",
                )
            )
        if self.llm_provider == "compatible" and not self.llm_base_url:
            problems.append(
                SettingsProblem(
                    "needed with PARLEY_LLM_PROVIDER=compatible (flag --llm-base-url): the server's base URL,"
                    " e.g. http://localhost:11434/v1",
                    "llm_base_url",
                )
            )
        if problems:
            raise _Problems(problems)
        return self

    def llm_config(self) -> LlmConfig:
        """The LLM defaults as the agents' config (credentials are only checked when used)."""
        from parley.agents.llm import LlmConfig, entra_token_provider

        azure = self.llm_provider == "azure"
        entra = azure and self.llm_azure_auth == "entra"
        return LlmConfig(
            provider=self.llm_provider,
            model=self.llm_model,
            base_url=None if azure else self.llm_base_url,
            api_key=None if entra else self.llm_api_key,
            azure_endpoint=self.llm_azure_endpoint if azure else None,
            api_version=self.llm_api_version if azure else None,
            azure_ad_token_provider=entra_token_provider() if entra else None,
            temperature=self.llm_temperature,
            max_tokens=self.llm_max_tokens,
            first_token_timeout_s=self.llm_first_token_timeout_s,
            total_timeout_s=self.llm_total_timeout_s,
            max_retries=self.llm_max_retries,
            threads=self.llm_threads,
        )


def load_settings(**overrides: object) -> Settings:
    """Build Settings with CLI overrides (None means 'not given'); raise SettingsError on bad values."""
    given: dict[str, Any] = {key: value for key, value in overrides.items() if value is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        raise SettingsError(_describe(exc)) from None
    except pydantic_settings.SettingsError as exc:  # a value the environment source cannot even parse
        raise SettingsError([_unparsable(exc)]) from None


def _describe(exc: ValidationError) -> list[SettingsProblem]:
    problems: list[SettingsProblem] = []
    for error in exc.errors():
        cause = error.get("ctx", {}).get("error")
        if isinstance(cause, _Problems):
            problems.extend(cause.problems)
            continue
        message = error["msg"].removeprefix("Value error, ")
        if not error["loc"]:
            # A model-level error's input is every given value, secrets included: never echo it.
            problems.append(SettingsProblem(message))
            continue
        field, *inner = (str(part) for part in error["loc"])
        if inner:
            message = f"item {'.'.join(inner)}: {message}"
        got = "" if field in _SECRET_FIELDS else f" (got {_shown(error.get('input'))})"
        problems.append(SettingsProblem(f"{message}{got}", field))
    return problems


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _unparsable(exc: pydantic_settings.SettingsError) -> SettingsProblem:
    match = re.search(r'field "(\w+)"', str(exc))
    cause = f": {exc.__cause__}" if exc.__cause__ else ""
    if match is None:
        return SettingsProblem(f"{exc}{cause}")
    return SettingsProblem(f"cannot read the value{cause}", match.group(1))


_SECRET_FIELDS = frozenset(
    name for name, field in Settings.model_fields.items() if "SecretStr" in str(field.annotation)
)
