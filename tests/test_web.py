"""The chat page that `llava-nb serve` hosts at `/`, driven in a real browser (Chromium)."""

from __future__ import annotations

import time

import matplotlib.cbook
import pytest

import llava_nb as ln

pytest.importorskip("uvicorn")
pytest.importorskip("playwright")

from playwright.sync_api import expect

from llava_nb.models import Model
from llava_nb.server import create_app, serving

PHOTO = str(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


@pytest.fixture
def page_of(browser, tiny_llava, tmp_path):
    served = Model(tiny_llava).load()
    app = create_app(served)
    with serving(app) as url:
        context = browser.new_context(viewport={"width": 900, "height": 700})
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url + "/")
        yield page, app.state.llava
        page.screenshot(path=str(tmp_path / "web-page.png"))
        context.close()
        assert errors == [], errors


def test_a_two_turn_chat_with_an_image_then_stop(page_of, tiny_llava):
    page, service = page_of
    expect(page.locator("#state")).to_have_text("ready")
    expect(page.locator("#model")).to_have_text(tiny_llava)
    page.fill("#max-tokens", "8")

    page.set_input_files("#file", PHOTO)
    page.wait_for_selector("#attached img")
    page.fill("#question", "What is in this picture?")
    page.press("#question", "Enter")
    first = page.locator(".msg.assistant").nth(0)
    first.locator(".meta").filter(has_text=" s").wait_for()
    assert page.locator(".msg.user img").count() == 1  # the thumbnail stays with the question

    page.fill("#question", "And what is she wearing?")
    page.click("#send")
    second = page.locator(".msg.assistant").nth(1)
    second.locator(".meta").filter(has_text=" s").wait_for()

    # the page's conversation is the same conversation, token for token, as a local Chat's
    local = ln.Chat(tiny_llava, max_new_tokens=8)
    assert first.locator(".text").text_content() == local.ask(
        "What is in this picture?", image=PHOTO
    )
    assert second.locator(".text").text_content() == local.ask("And what is she wearing?")

    # a long answer, stopped from the page: the server stops generating it
    page.fill("#max-tokens", "1000")
    page.fill("#question", "Tell me everything.")
    page.press("#question", "Enter")
    third = page.locator(".msg.assistant").nth(2)
    expect(third.locator(".text")).not_to_have_text("")
    assert page.text_content("#send") == "Stop"
    page.click("#send")
    third.locator(".meta").filter(has_text="stopped").wait_for()
    assert page.text_content("#send") == "Send"
    deadline = time.monotonic() + 60  # moments here; generous for a loaded machine
    while not any(r["disconnected"] for r in service.finished):
        assert time.monotonic() < deadline, list(service.finished)
        time.sleep(0.05)
    record = next(r for r in service.finished if r["disconnected"])
    assert 0 < record["completion_tokens"] < 1000


def test_a_bad_image_is_a_readable_error_and_the_page_goes_on(page_of, tmp_path):
    page, _ = page_of
    expect(page.locator("#state")).to_have_text("ready")
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"not a png at all")
    page.set_input_files("#file", str(fake))
    error = page.locator(".msg.error")
    error.wait_for()
    assert "is not an image the browser can read" in error.text_content()
    page.fill("#max-tokens", "4")
    page.fill("#question", "Hello?")
    page.press("#question", "Enter")
    page.locator(".msg.assistant .meta").filter(has_text=" s").wait_for()
