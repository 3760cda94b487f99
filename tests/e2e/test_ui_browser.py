"""The /ui page in a real browser: Debian's chromium, driven by Playwright (never a browser it
downloads). The page talks to a real guardproxy (the graded trigger guard, the fake upstream).
With GUARDPROXY_SCREENSHOTS=dir, the playground and the live view are saved there as PNGs (the
README's pictures are made this way)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import openai
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright

from guardproxy.config import AuthSettings, key_hash

from .conftest import proxy_settings
from .harness import FakeUpstream, Loopback, Script, start_proxy

CHROMIUM = "/usr/bin/chromium"
ANSWER = "Take a gun and then a bomb. Done"
KEY = "sk-browser-secret"
TIMEOUT_MS = 15_000  # the page waits on the server's answers; Playwright polls until this deadline


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert shutil.which("chromium") or os.path.exists(CHROMIUM), (
        "Debian's chromium is needed for the page tests: apt-get install -y chromium (the README's install)"
    )
    with sync_playwright() as pw:
        b = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-sync"],
        )
        yield b
        b.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh page whose console errors and uncaught exceptions fail the test."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    p = context.new_page()
    p.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []

    def on_console(msg: ConsoleMessage) -> None:
        # A refused key is an expected 401 the page handles; the browser still logs the failed load.
        if msg.type == "error" and "401" not in msg.text:
            errors.append(msg.text)

    p.on("console", on_console)
    p.on("pageerror", lambda exc: errors.append(str(exc)))
    yield p
    context.close()
    assert errors == [], errors


@pytest.fixture(scope="module")
def ui_proxy(loopback: Loopback, upstream: tuple[FakeUpstream, str], graded_checkpoint: Path) -> str:
    return start_proxy(
        loopback, proxy_settings(upstream[1], graded_checkpoint, mode="strict", audit_text=True)
    )


def screenshot(page: Page, name: str) -> None:
    where = os.environ.get("GUARDPROXY_SCREENSHOTS")
    if where:
        Path(where).mkdir(parents=True, exist_ok=True)
        page.locator("body").screenshot(path=str(Path(where) / name))  # the content, not the empty viewport


def judge_in_page(page: Page, proxy: str, response: str) -> None:
    page.goto(proxy.removesuffix("/v1") + "/ui")
    expect(page.locator("#policy option")).to_have_count(1)
    page.locator("#turns textarea").first.fill("Tell me a story about a hunter.")
    page.locator("#response").fill(response)
    page.locator("#judge").click()
    expect(page.locator("#result")).to_be_visible()


def cut_token(page: Page) -> Any:
    """The token right after the cut marker."""
    return page.locator(".cut-marker + .tok")


def test_playground_colours_tokens_and_marks_the_cut_before_the_trigger(page: Page, ui_proxy: str) -> None:
    judge_in_page(page, ui_proxy, "Here is how to build a bomb")
    bomb = cut_token(page)
    expect(bomb).to_have_text(" bomb")
    expect(bomb).to_have_attribute("data-tier", "Unsafe")
    expect(bomb).to_have_class("tok tier-Unsafe after-cut")
    expect(page.locator(".cut-marker")).to_have_count(1)
    # Before the cut the client received every token, Safe; from the cut on nothing reached it.
    before = page.locator(".tok[data-index]:not(.after-cut)")
    assert before.all_inner_texts() == ["Here", " is", " how", " to", " build", " a"]
    assert set(before.evaluate_all("els => els.map(e => e.dataset.tier)")) == {"Safe"}
    # Hovering a token shows its verdict.
    bomb.hover()
    detail = page.locator("#token-detail")
    expect(detail).to_be_visible()
    expect(detail).to_contain_text("Unsafe")
    expect(detail).to_contain_text("Violent")
    expect(page.locator("#summary")).to_contain_text("cut before token")


def test_thresholds_move_the_cut_in_the_page(page: Page, ui_proxy: str) -> None:
    judge_in_page(page, ui_proxy, ANSWER)
    expect(cut_token(page)).to_have_text(" gun")  # strict: the Controversial " gun" (p ~0.96) is cut
    screenshot(page, "ui-playground.png")
    page.locator("#controversial-on").check()
    page.locator("#controversial").fill("0.97")
    page.locator("#controversial").dispatch_event("change")
    expect(cut_token(page)).to_have_text(" bomb")  # " gun" is Safe at 0.97; the cut moves on
    expect(page.locator('.tok[data-index="2"]')).to_have_attribute("data-tier", "Safe")
    page.locator("#unsafe-on").check()
    page.locator("#unsafe").fill("0.6")
    page.locator("#unsafe").dispatch_event("change")
    expect(page.locator(".cut-marker")).to_have_count(0)  # " bomb" (p ~0.55) is Safe at 0.6 too
    expect(page.locator("#summary")).to_contain_text("allowed")
    page.locator("#unsafe-on").uncheck()
    expect(cut_token(page)).to_have_text(" bomb")


def test_live_view_shows_a_cut_request_as_it_happens(page: Page, ui_proxy: str, fake: FakeUpstream) -> None:
    page.goto(ui_proxy.removesuffix("/v1") + "/ui#live")
    expect(page.locator("#live-status")).to_have_text("● live")
    fake.script = Script(pieces=[["Take", " a", " gun", " and", " then", " a", " bomb"]])
    with openai.OpenAI(base_url=ui_proxy, api_key="k", max_retries=0) as c:
        c.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "a story"}],
            extra_headers={"x-request-id": "browser-live"},
        )
    row = page.locator('#records tr[data-request-id="browser-live"]')
    expect(row).to_have_count(1, timeout=2_000)  # on screen within 2 s of the answer
    expect(row.locator("td").nth(4)).to_have_text("cut")
    row.click()
    expect(page.locator("#record-id")).to_have_text("browser-live")
    expect(page.locator("#record-prompt")).to_contain_text("a story")
    expect(page.locator("#record-tokens .cut-marker + .tok")).to_have_text(" gun")
    expect(page.locator('#engine [data-stat="active_streams"] dd')).to_have_text("0")
    screenshot(page, "ui-live.png")


def test_a_key_is_asked_for_and_a_wrong_one_sees_nothing(
    browser: Browser, loopback: Loopback, upstream: tuple[FakeUpstream, str], graded_checkpoint: Path
) -> None:
    settings = replace(
        proxy_settings(upstream[1], graded_checkpoint), auth=AuthSettings(api_keys_sha256=(key_hash(KEY),))
    )
    proxy = start_proxy(loopback, settings)
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    try:
        page.goto(proxy.removesuffix("/v1") + "/ui")
        dialog = page.locator("#key-dialog")
        expect(dialog).to_be_visible()
        expect(page.locator("#key-input")).to_have_attribute("type", "password")
        page.locator("#key-input").fill("sk-wrong")
        page.locator("#key-submit").click()
        expect(page.locator("#key-error")).to_be_visible()  # refused, asked again
        expect(page.locator("#policy option")).to_have_count(0)  # and nothing was shown
        page.locator("#key-input").fill(KEY)
        page.locator("#key-submit").click()
        expect(dialog).to_be_hidden()
        expect(page.locator("#policy option")).to_have_count(1)
        assert KEY not in page.content()  # the key is never on the page
    finally:
        context.close()
