"""The web chat page at /, in headless Chromium (Debian's `chromium`, driven by Playwright): a real
image upload and two questions, the answers streamed in and the conversation kept; and a server with an
API key, whose page asks for it.  The screenshot goes to the test's temporary folder (its path is printed
for a person to look at), never into the source tree."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import LiveServer, image_data_url

import glimpse
from glimpse.serve import create_app

CHROMIUM = os.environ.get("GLIMPSE_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_upload_ask_and_follow_up_in_chromium(tiny_vlm_run, world, tmp_path):
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: install Debian's chromium package (the README's test setup)")
    vlm = glimpse.load(tiny_vlm_run)
    image = sorted((world / "images" / "test").glob("*.png"))[0]
    url = image_data_url(image)
    first = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                          {"type": "text", "text": "describe the image."}]}]
    expected = vlm.chat(first, max_new_tokens=64)  # the page asks greedily for at most 64 tokens
    with LiveServer(create_app(vlm, "tiny-vlm")) as s, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 900, "height": 640})
        page.goto(s.url + "/")
        page.wait_for_function("document.getElementById('model').textContent === 'tiny-vlm'")
        page.set_input_files("[data-testid=file]", str(image))
        page.wait_for_selector("[data-testid=preview] img")
        page.fill("[data-testid=text]", "describe the image.")
        page.click("[data-testid=send]")
        page.wait_for_selector("[data-testid=answer][data-done='1']", timeout=60_000)
        answers = page.locator("[data-testid=answer] span")
        assert answers.nth(0).inner_text() == expected and expected.strip()
        # "where did it look?": the conversation so far goes to /v1/explain, the heatmap comes back as a PNG
        page.click("[data-testid=explain]")
        page.wait_for_selector("[data-testid=heatmap]", timeout=60_000)
        assert page.get_attribute("[data-testid=heatmap]", "src").startswith("data:image/png;base64,")
        assert page.locator("[data-testid=explain]").count() == 0  # the button gives way to the picture
        # a follow-up without a new image: the page sends the whole conversation, image included
        page.fill("[data-testid=text]", "what color is it?")
        page.keyboard.press("Enter")
        page.wait_for_function("document.querySelectorAll(\"[data-testid=answer][data-done='1']\").length == 2",
                               timeout=60_000)
        follow = first + [{"role": "assistant", "content": expected}, {"role": "user", "content": "what color is it?"}]
        assert answers.nth(1).inner_text() == vlm.chat(follow, max_new_tokens=64)
        assert page.evaluate("messages.length") == 4
        assert page.locator(".msg.user img").count() == 1 and page.locator(".msg.error").count() == 0
        page.screenshot(path=str(tmp_path / "web_chat.png"), full_page=True)
        print(f"screenshot: {tmp_path / 'web_chat.png'}")
        browser.close()


def test_the_page_asks_for_the_api_key_of_a_guarded_server(tiny_vlm_run):
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: install Debian's chromium package (the README's test setup)")
    asked = []
    with LiveServer(create_app(glimpse.load(tiny_vlm_run), "tiny-vlm", api_key="sk-page")) as s, \
            sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page()
        page.on("dialog", lambda d: (asked.append(d.message), d.accept("sk-page")))
        page.goto(s.url + "/")
        page.wait_for_function("document.getElementById('model').textContent === 'tiny-vlm'")
        page.fill("[data-testid=text]", "hello")
        page.click("[data-testid=send]")
        page.wait_for_selector("[data-testid=answer][data-done='1']", timeout=60_000)
        assert page.locator(".msg.error").count() == 0
        browser.close()
    assert asked == ["This server needs its API key:"]  # asked once, then kept
