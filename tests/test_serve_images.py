"""POST /v1/images/generations over a text-to-image run: the official `openai` client gets decodable PNGs of
the model's size, the same seed gives the same bytes, bad requests get a 4xx OpenAI error, a burst a 429, a
client that leaves frees its slot; chat and embeddings on such a model (and images on other models) are
clean 400s; and the web page, in headless Chromium, shows the images of a prompt."""

from __future__ import annotations

import base64
import io
import re
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
import schemathesis
from conftest import LiveServer
from hypothesis import HealthCheck, settings
from PIL import Image
from test_serve import Blocker, wait_for
from test_serve_web import CHROMIUM, FLAGS

import glimpse
from glimpse.errors import GlimpseError
from glimpse.serve import ServerLimits, create_app

MODEL = "tiny-t2i"
PROMPT = "a small red circle on the left"


@pytest.fixture(scope="module")
def t2i(tiny_t2i_run):
    return glimpse.load(tiny_t2i_run)


@pytest.fixture(scope="module")
def server(t2i):
    with LiveServer(create_app(t2i, MODEL)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def pixels(b64: str) -> np.ndarray:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB"))


def test_images_with_the_openai_client(client, t2i):
    assert t2i.image_size == 32
    r = client.images.generate(model=MODEL, prompt=PROMPT, n=2, size="32x32", response_format="b64_json")
    assert isinstance(r.created, int) and len(r.data) == 2 and r.usage is None
    got = [pixels(d.b64_json) for d in r.data]
    assert [g.shape for g in got] == [(32, 32, 3)] * 2 and all(d.revised_prompt is None for d in r.data)
    want = t2i.generate_arrays([PROMPT], 2, seed=0)[0]  # the Python API's images, seed 0 by default
    assert all(np.array_equal(g, w) for g, w in zip(got, want))
    # the seed (a glimpse extension): the same seed, the same bytes; the pipeline's images for that seed
    a, b = (client.images.generate(model=MODEL, prompt=PROMPT, n=2, extra_body={"seed": 3}) for _ in range(2))
    assert [d.b64_json for d in a.data] == [d.b64_json for d in b.data]
    assert all(np.array_equal(pixels(d.b64_json), w) for d, w in zip(a.data, t2i.generate_arrays([PROMPT], 2, 3)[0]))
    # size "auto", n and the ignored options left to the defaults or null
    one = client.images.generate(model=MODEL, prompt=PROMPT, size="auto", quality="hd", style="vivid", user="u1")
    assert len(one.data) == 1 and np.array_equal(pixels(one.data[0].b64_json), t2i.generate_arrays([PROMPT])[0, 0])


def test_models_list_images_and_other_endpoints_say_what_the_model_does(server, client):
    assert client.models.list().data[0].model_extra["capabilities"] == ["images"]
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL, "messages": [
        {"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and r.json()["error"]["message"] == \
        f"{MODEL} is not a vision-language chat model; use /v1/images/generations"
    r = httpx.post(server.url + "/v1/embeddings", json={"model": MODEL, "input": "a red circle"})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith(f"{MODEL} has no embeddings")


def body(**over) -> dict:
    return {"model": MODEL, "prompt": PROMPT, **over}


BAD = {
    "n over 8": (body(n=9), "n:"),
    "n zero": (body(n=0), "n:"),
    "empty prompt": (body(prompt=""), "prompt:"),
    "blank prompt": (body(prompt="   "), "blank"),
    "prompt over 1000 characters": (body(prompt="x" * 1001), "1000"),
    "prompt not a string": (body(prompt=["a", "b"]), "prompt:"),
    "no prompt": ({"model": MODEL}, "prompt:"),
    "unsupported size": (body(size="256x256"), "this model generates 32x32 images"),
    "url response": (body(response_format="url"), "this server returns b64_json only"),
    "jpeg output": (body(output_format="jpeg"), "output_format"),
    "stream": (body(stream=True), "stream"),
    "seed negative": (body(seed=-1), "seed:"),
    "seed a string": (body(seed="3"), "seed:"),
    "wrong model": (body(model="dall-e-3"), "does not exist"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_requests_get_a_4xx_openai_error(server, name):
    request, says = BAD[name]
    r = httpx.post(server.url + "/v1/images/generations", json=request)
    assert r.status_code == (404 if name == "wrong model" else 400), r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and says in err["message"]
    assert not re.search(r"Traceback|File \"|\.py\b|site-packages|/tmp/|/work/", err["message"])


def test_the_openai_client_raises_its_exceptions(client):
    import openai

    with pytest.raises(openai.NotFoundError):
        client.images.generate(model="dall-e-3", prompt=PROMPT)
    with pytest.raises(openai.BadRequestError, match="32x32"):
        client.images.generate(model=MODEL, prompt=PROMPT, size="256x256")


def test_a_burst_gets_429_and_a_client_that_leaves_frees_its_slot(t2i):
    app = create_app(t2i, MODEL, ServerLimits(max_pending=2))
    engine = app.state.engine
    with LiveServer(app) as s, Blocker(engine):
        waiting = threading.Thread(target=httpx.post, args=(s.url + "/v1/images/generations",),
                                   kwargs={"json": body(), "timeout": 60})
        waiting.start()
        wait_for(lambda: engine.pending == 2)
        r = httpx.post(s.url + "/v1/images/generations", json=body())
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"
    waiting.join()
    assert engine.batches == 0 and engine.cancelled == 0
    app = create_app(t2i, MODEL)  # (a server's shutdown closes its engine)
    engine = app.state.engine
    with LiveServer(app) as s, Blocker(engine):
        with pytest.raises(httpx.ReadTimeout):  # abandoned while the worker is busy: it never runs
            httpx.post(s.url + "/v1/images/generations", json=body(), timeout=1.0)
        wait_for(lambda: engine.cancelled == 1 and engine.pending == 1)  # only the blocker is left


class Refusing:
    """A text-to-image pipeline that refuses every prompt, as a real one refuses bad values."""
    image_size = 32

    def generate_images(self, prompt, n=1, seed=0, **kw):
        raise GlimpseError("this model draws shapes only\n(a second line the client never sees)")


class ChatOnly:
    """The chat protocol's names (glimpse.families.base.CHAT_METHODS), never called here."""
    chat = chat_prompt = complete = tokenizer = None
    context_length = 64


def test_pipeline_errors_and_models_without_images_are_400s(tiny_run):
    with LiveServer(create_app(Refusing(), "refusing")) as s:
        r = httpx.post(s.url + "/v1/images/generations", json=body(model="refusing"))
        assert r.status_code == 400 and r.json()["error"]["message"] == "this model draws shapes only"
        wait_for(lambda: s.app.state.engine.pending == 0)
    for pipeline, name, use in ((ChatOnly(), "chat-only", "/v1/chat/completions"),
                                (glimpse.load(tiny_run), "tiny-clip", "/v1/embeddings")):
        with LiveServer(create_app(pipeline, name)) as s:
            assert "images" not in httpx.get(s.url + "/v1/models").json()["data"][0]["capabilities"]
            r = httpx.post(s.url + "/v1/images/generations", json=body(model=name))
            assert r.status_code == 400 and r.json()["error"]["message"] == \
                f"{name} does not generate images; use {use}"


def test_the_page_shows_the_images_of_a_prompt(server, client, tmp_path):
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: install Debian's chromium package (the README's test setup)")
    want = [d.b64_json for d in client.images.generate(model=MODEL, prompt=PROMPT, n=4, extra_body={"seed": 5}).data]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 900, "height": 640})
        page.goto(server.url + "/")
        page.wait_for_function(f"document.getElementById('model').textContent === '{MODEL}'")
        assert page.locator("[data-testid=file]").is_hidden()
        page.fill("[data-testid=seed]", "5")
        page.fill("[data-testid=text]", PROMPT)
        page.click("[data-testid=send]")
        page.wait_for_selector("[data-testid=images][data-done='1']", timeout=60_000)
        shown = page.locator("[data-testid=images] .grid img")
        assert shown.count() == 4  # the page asks for 4 by default
        assert [shown.nth(i).get_attribute("src") for i in range(4)] == ["data:image/png;base64," + b for b in want]
        assert page.evaluate("[...document.querySelectorAll('.grid img')].every(i => i.naturalWidth === 32)")
        page.select_option("[data-testid=count]", "2")  # a second prompt, Enter sends
        page.fill("[data-testid=text]", "a big blue square at the top")
        page.keyboard.press("Enter")
        page.wait_for_function("document.querySelectorAll(\"[data-testid=images][data-done='1']\").length == 2",
                               timeout=60_000)
        assert page.locator("[data-testid=images]").nth(1).locator("img").count() == 2
        assert page.locator(".msg.error").count() == 0
        page.screenshot(path=str(tmp_path / "web_images.png"), full_page=True)
        print(f"screenshot: {tmp_path / 'web_images.png'}")
        browser.close()



@pytest.fixture(scope="module")
def images_schema(t2i):
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(t2i, MODEL))
    schema.config.generation.update(modes=[schemathesis.GenerationMode.POSITIVE,
                                           schemathesis.GenerationMode.NEGATIVE], deterministic=True)
    return schema


@schemathesis.pytest.from_fixture("images_schema").include(path="/v1/images/generations").parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_image_request_gets_a_5xx(case):
    """Requests generated from the server's own schema, valid and broken in every field (as test_serve_fuzz
    does for chat): PNGs of the model's size or a 4xx OpenAI error, never a 5xx."""
    response = case.call()
    assert response.status_code < 500, (case.body, response.text)
    if response.status_code >= 400:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    else:
        assert all(pixels(d["b64_json"]).shape == (32, 32, 3) for d in response.json()["data"])
