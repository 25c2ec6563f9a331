"""The chat page at / in headless Chromium (Debian's `chromium`, driven by Playwright): type a message, see the
answer stream in, with the settings and the conversation sent along, and nothing fetched from outside.

Uses the scripted bigram model of test_server.py, whose greedy replies are known: " or not" in plain mode,
reasoning " to be" then " or not" in thinking mode.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from nanoseek.server.api import ServeConfig, ServerThread
from test_server import tiny_model_dir

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason="headless Chromium not found: install Debian's `chromium` package")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = tiny_model_dir(tmp_path_factory.mktemp("page") / "scripted", scripted=True)
    with ServerThread(ServeConfig(str(model_dir))) as srv:
        yield srv  # not waited for: the page itself must wait for /health


def test_chat_page_streams_replies(server):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            requests = []
            page.on("request", lambda r: requests.append(r))
            page.goto(server.url + "/")
            expect(page.locator("#status")).to_have_attribute("data-state", "ready", timeout=60_000)
            expect(page.locator("#model")).to_contain_text("scripted")

            page.fill("#temperature", "0")
            page.fill("#max-tokens", "50")
            page.fill("#input", "To be?")
            page.click("#send")
            reply = page.locator(".msg.assistant").nth(0)
            expect(reply).to_have_attribute("data-state", "done", timeout=60_000)
            expect(reply.locator(".content")).to_have_text(" or not")
            assert int(reply.get_attribute("data-chunks")) >= 2  # arrived in pieces, not at once
            expect(reply.locator(".reasoning")).to_be_hidden()
            expect(reply.locator(".meta")).to_contain_text("finish: stop")
            expect(page.locator(".msg.user").nth(0)).to_have_text("To be?")

            # second turn, thinking mode: the history goes along, the reasoning shows in its own collapsible box
            page.check("#thinking")
            page.fill("#input", "And then?")
            page.locator("#input").press("Enter")  # Enter sends, Shift+Enter would add a line
            reply2 = page.locator(".msg.assistant").nth(1)
            expect(reply2).to_have_attribute("data-state", "done", timeout=60_000)
            expect(reply2.locator(".content")).to_have_text(" or not")
            expect(reply2.locator(".reasoning")).to_be_visible()
            expect(reply2.locator(".reasoning .text")).to_have_text(" to be")
            assert reply2.locator(".reasoning").get_attribute("open") is None  # collapsed once the answer came
            reply2.locator(".reasoning summary").click()
            expect(reply2.locator(".reasoning .text")).to_be_visible()

            posts = [json.loads(r.post_data) for r in requests if r.url.endswith("/v1/chat/completions")]
            assert len(posts) == 2
            assert posts[0]["temperature"] == 0 and posts[0]["max_tokens"] == 50 and posts[0]["stream"] is True
            assert [m["role"] for m in posts[1]["messages"]] == ["user", "assistant", "user"]
            assert posts[1]["messages"][1]["content"] == " or not"
            assert posts[1]["thinking"] == {"type": "enabled"}
            # works offline: every request went to this server
            assert all(r.url.startswith(server.url) for r in requests), [r.url for r in requests]
        finally:
            browser.close()
