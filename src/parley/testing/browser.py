"""A real Chromium for the web pages' tests, driven by Playwright (`playwright` is in the `test` extra).

Debian's `chromium` is the browser (CI installs it: .ci/run); Playwright's own browser download is
never used, so `executable_path` always names an installed binary. The microphone is Chromium's
fake capture device, fed from a WAV file (`fake_audio`): Chromium loops the file for as long as the
page captures, so a clip should end in silence long enough for the conversation it drives. Media
permissions are granted without a prompt, and audio plays without a user gesture.

Without the browser or Playwright a test skips, saying which is missing, unless `CI` is set: there
a missing browser is a failure (CI is meant to run these tests, not to skip them quietly).

    from parley.testing.browser import launch_chromium, require_browser

    def test_page(tmp_path):
        require_browser()
        with launch_chromium(fake_audio=wav) as browser:
            page = browser.new_page()
            page.goto(server.http_url + "/")
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from playwright.sync_api import Browser

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
FAKE_AUDIO_RATE = 48000  # the rate Chromium's audio runs at; a WAV at this rate needs no conversion


def chromium_path() -> str | None:
    """The Chromium binary: PARLEY_CHROMIUM if set, else Debian's, else one on PATH."""
    configured = os.environ.get("PARLEY_CHROMIUM")
    if configured:
        return configured if Path(configured).is_file() else None
    for candidate in CHROMIUM_CANDIDATES:
        if Path(candidate).is_file():
            return candidate
    return shutil.which("chromium") or shutil.which("chromium-browser")


def browser_unavailable() -> str | None:
    """Why no browser test can run here (None: Playwright and Chromium are both installed)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright for Python is not installed (pip install -e '.[test]')"
    if chromium_path() is None:
        return "no Chromium (apt-get install chromium, or set PARLEY_CHROMIUM to its binary)"
    return None


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_browser() -> None:
    """Skip the calling test when the browser is missing; under CI, fail it instead."""
    import pytest

    reason = browser_unavailable()
    if reason is None:
        return
    if in_ci():
        pytest.fail(f"CI is set and the browser tests cannot run: {reason}")
    pytest.skip(f"needs a real browser: {reason}")


def chromium_args(fake_audio: Path | None = None, *, loop_audio: bool = True) -> list[str]:
    """Chromium's flags: the fake microphone (fed from `fake_audio`), no permission prompt, autoplay."""
    args = [
        "--use-fake-ui-for-media-stream",  # grant getUserMedia without a prompt
        "--use-fake-device-for-media-stream",
        "--autoplay-policy=no-user-gesture-required",
        "--no-sandbox",  # CI containers often run as root, where Chromium's sandbox cannot start
        "--disable-dev-shm-usage",  # small /dev/shm in containers
    ]
    if fake_audio is not None:
        suffix = "" if loop_audio else "%noloop"
        args.append(f"--use-file-for-fake-audio-capture={fake_audio}{suffix}")
    return args


@contextmanager
def launch_chromium(
    fake_audio: Path | None = None, *, loop_audio: bool = True, extra_args: Sequence[str] = (), headless: bool = True
) -> Iterator[Browser]:
    """A headless Chromium, closed on exit. Call `require_browser()` first for a clear skip."""
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    if executable is None:
        raise RuntimeError(browser_unavailable() or "no Chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=executable,
            headless=headless,
            args=[*chromium_args(fake_audio, loop_audio=loop_audio), *extra_args],
        )
        try:
            yield browser
        finally:
            browser.close()


__all__ = [
    "FAKE_AUDIO_RATE",
    "browser_unavailable",
    "chromium_args",
    "chromium_path",
    "in_ci",
    "launch_chromium",
    "require_browser",
]
