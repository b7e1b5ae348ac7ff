"""Fuzz the ACS codec and the media handler at scale with the properties of tests/test_properties.py.

    PYTHONPATH=src python bench/fuzz_handler.py --examples 100000 --json out.json

The codec runs `--examples` generated frames (any str/bytes, mutated valid messages, builder round
trips, re-cased messages); the handler runs as many generated call scripts as fit in
`--handler-seconds` (each is a real call on the in-memory harness, ~0.1-0.5 s of wall time). No
example stops the run: every broken promise is counted, and the first few are kept in the JSON.
Failures of the handler in barge-in `pause` mode that match the known defect of tests/test_properties.py
(PLAYER_SWALLOWS_CANCEL: a cancelled turn left paused forever) are counted apart from any other.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any

import hypothesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

_ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(_ROOT / "src"), str(_ROOT / "tests")]  # this tree's parley, and its properties
import test_properties as props  # noqa: E402 - the properties live with the tests
from parley.transports import acs  # noqa: E402

KEEP = 10  # failing examples kept in the JSON, per section


def _settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.generate],  # count every failure; no shrinking
        suppress_health_check=list(HealthCheck),
    )


# ------------------------------------------------------------------------------- the codec
codec_cases = st.one_of(
    st.tuples(st.just("any"), st.tuples(props.any_frame, props.FORMATS)),
    st.tuples(st.just("mutated"), props.mutated_messages()),
    st.tuples(st.just("round_trip"), props.valid_inbound()),
    st.tuples(st.just("recased"), props.recased_messages()),
    st.tuples(st.just("outbound_round_trip"), st.binary(max_size=2000)),
)


def _codec_case(kind: str, case: Any) -> None:
    if kind in ("any", "mutated"):
        props.check_both(*case)
    elif kind == "round_trip":
        props.test_inbound_builders_round_trip.hypothesis.inner_test(case)
    elif kind == "recased":
        props.test_case_of_keys_and_kinds_does_not_matter.hypothesis.inner_test(case)
    else:
        props.test_outbound_audio_builder_round_trips_or_refuses.hypothesis.inner_test(case)


def fuzz_codec(examples: int) -> dict[str, Any]:
    counts: collections.Counter[str] = collections.Counter()
    failures: list[dict[str, str]] = []

    @_settings(examples)
    @given(codec_cases)
    def run(case: tuple[str, Any]) -> None:
        kind, value = case
        counts[kind] += 1
        try:
            _codec_case(kind, value)
        except Exception as exc:  # noqa: BLE001 - every escape is a failure to count
            counts["failures"] += 1
            if len(failures) < KEEP:
                failures.append({"kind": kind, "error": repr(exc)[:500], "example": repr(value)[:500]})

    started = time.monotonic()
    run()
    seconds = time.monotonic() - started
    total = sum(v for k, v in counts.items() if k != "failures")
    return {
        "examples": total,
        "by_kind": {k: v for k, v in counts.items() if k != "failures"},
        "failures": counts["failures"],
        "failing_examples": failures,
        "seconds": round(seconds, 1),
        "examples_per_s": round(total / seconds, 1),
    }


# ------------------------------------------------------------------------------- the handler
def _known_defect(script: props.CallScript, problems: list[str]) -> bool:
    """The stuck paused turn (PLAYER_SWALLOWS_CANCEL), and the finals it keeps from being answered."""
    if script.bargein_speaking != "pause":
        return False
    stuck = any("never settled" in p and "cancelled=True" in p and "interruption_pending=True" in p for p in problems)
    return stuck and all("never settled" in p or "never became a turn's input" in p for p in problems)


def fuzz_handler(seconds: float, max_examples: int) -> dict[str, Any]:
    counts: collections.Counter[str] = collections.Counter()
    events: collections.Counter[str] = collections.Counter()
    by_mode: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    failures: list[dict[str, Any]] = []
    call_seconds: list[float] = []
    deadline = time.monotonic() + seconds

    @_settings(25)
    @given(props.call_scripts())
    def chunk(script: props.CallScript) -> None:
        if time.monotonic() > deadline or counts["examples"] >= max_examples:
            return
        report = props.check_call_script(script)
        counts["examples"] += 1
        call_seconds.append(report.seconds)
        mode = by_mode[script.bargein_speaking]
        mode["examples"] += 1
        for event in report.events:
            events[event["event"]] += 1
        if not report.problems:
            return
        known = _known_defect(script, report.problems)
        counts["known_defect" if known else "failures"] += 1
        mode["known_defect" if known else "failures"] += 1
        if (not known or len(failures) < 2) and len(failures) < KEEP:
            failures.append({"known_defect": known, "script": repr(script)[:1500], "problems": report.problems})

    started = time.monotonic()
    while time.monotonic() < deadline and counts["examples"] < max_examples:
        chunk()  # 25 fresh examples per call (a new random seed each time)
    elapsed = time.monotonic() - started
    call_seconds.sort()
    return {
        "examples": counts["examples"],
        "failures": counts["failures"],
        "known_defect_failures": counts["known_defect"],
        "by_mode": {mode: dict(c) for mode, c in sorted(by_mode.items())},
        "failing_examples": failures,
        "seconds": round(elapsed, 1),
        "call_seconds": {
            "p50": round(call_seconds[len(call_seconds) // 2], 3) if call_seconds else None,
            "max": round(call_seconds[-1], 3) if call_seconds else None,
        },
        "events": dict(sorted(events.items())),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=100_000, help="codec examples")
    parser.add_argument("--handler-seconds", type=float, default=600.0, help="time budget of the handler")
    parser.add_argument("--handler-examples", type=int, default=1_000_000, help="at most this many call scripts")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    logging.disable(logging.CRITICAL)  # every bad frame is logged by the handler; millions of lines
    started = time.monotonic()
    result: dict[str, Any] = {
        "benchmark": "fuzz_handler",
        "python": platform.python_version(),
        "hypothesis": hypothesis.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "max_message_chars": acs.MAX_MESSAGE_CHARS,
    }
    print(f"codec: {args.examples} examples ...", flush=True)
    result["codec"] = codec = fuzz_codec(args.examples)
    print(
        f"codec: {codec['examples']} examples, {codec['failures']} failures, {codec['seconds']} s "
        f"({codec['examples_per_s']}/s)",
        flush=True,
    )
    if args.handler_seconds > 0:
        print(f"handler: call scripts for {args.handler_seconds:.0f} s ...", flush=True)
        result["handler"] = handler = fuzz_handler(args.handler_seconds, args.handler_examples)
        print(
            f"handler: {handler['examples']} calls, {handler['failures']} failures, "
            f"{handler['known_defect_failures']} of the known paused-turn defect, {handler['seconds']} s",
            flush=True,
        )
    result["seconds"] = round(time.monotonic() - started, 1)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    failed = result["codec"]["failures"] + result.get("handler", {}).get("failures", 0)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
