"""The web pages' routes (parley.web): only the listed files, with their content types and no-cache,
and GET /api/agents behind the API guard. A small app around the router, over real HTTP (TestClient).
Also the browser tests' helper (parley.testing.browser): its flags, and skipping or failing without one."""

from __future__ import annotations

import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

from parley.security.access import api_access
from parley.settings import load_settings
from parley.web import PAGES, STATIC_FILES, web_router


def client(**overrides: object) -> TestClient:
    settings = load_settings(**{"host": "127.0.0.1", "port": 0, "event_log": False, **overrides})
    app = FastAPI()
    app.include_router(web_router(settings, dependencies=[Depends(api_access(settings))]))
    return TestClient(app, base_url="http://127.0.0.1:8000")


def test_the_talk_page_is_served_uncached_and_unframeable():
    response = client().get("/")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-frame-options"] == "DENY"
    assert '<script type="module" src="/static/talk.js">' in response.text


@pytest.mark.parametrize("name", sorted(STATIC_FILES))
def test_every_listed_static_file_is_served_with_its_type(name: str):
    response = client().get(f"/static/{name}")
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-cache"
    expected = {"js": "text/javascript", "css": "text/css"}[name.rsplit(".", 1)[1]]
    assert response.headers["content-type"].startswith(expected)
    assert response.content


@pytest.mark.parametrize(
    "path", ["/static/__init__.py", "/static/index.html", "/static/..%2F__init__.py", "/static/%2E%2E", "/static/"]
)
def test_nothing_but_the_listed_files_is_served(path: str):
    assert client().get(path).status_code == 404


def test_every_page_and_file_named_is_in_the_package():
    from parley.web import read_file

    for name in [*PAGES.values(), *STATIC_FILES]:
        assert read_file(name)


def test_agents_lists_the_loaded_agents_default_first():
    # (TestClient's peer is not a loopback address: the token lets it in.)
    response = client(agent="bank", agents=["pizza", "bank"], api_token="t").get(
        "/api/agents", headers={"Authorization": "Bearer t"}
    )
    assert response.status_code == 200
    assert response.json() == {"default": "bank", "agents": ["bank", "pizza"]}


def test_agents_is_guarded_like_the_other_apis():
    guarded = client(api_token="s3cret")
    assert guarded.get("/api/agents").status_code == 401
    assert guarded.get("/api/agents", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert guarded.get("/api/agents", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    # The pages themselves hold nothing private: open, so the user can type the token into them.
    assert guarded.get("/").status_code == 200
    open_bind = client(host="0.0.0.0")
    assert open_bind.get("/api/agents").status_code == 403


def test_without_a_browser_the_page_tests_skip_saying_why_and_fail_under_ci(monkeypatch, tmp_path):
    from parley.testing import browser

    monkeypatch.setenv("PARLEY_CHROMIUM", str(tmp_path / "no-such-chromium"))
    assert browser.chromium_path() is None
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no Chromium"):
        browser.require_browser()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set"):
        browser.require_browser()
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception):
        browser.require_browser()
    with pytest.raises(RuntimeError, match="no Chromium"):
        browser.launch_chromium().__enter__()


def test_the_fake_microphone_flags():
    from pathlib import Path

    from parley.testing.browser import chromium_args

    args = chromium_args(Path("/tmp/caller.wav"))
    assert "--use-fake-ui-for-media-stream" in args and "--use-fake-device-for-media-stream" in args
    assert "--use-file-for-fake-audio-capture=/tmp/caller.wav" in args
    assert "--autoplay-policy=no-user-gesture-required" in args
    assert chromium_args(Path("/tmp/c.wav"), loop_audio=False)[-1].endswith("/tmp/c.wav%noloop")
    assert not any("fake-audio-capture" in arg for arg in chromium_args())
