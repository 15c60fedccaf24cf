"""The OpenAI-compatible server: the official `openai` client against a live server (streaming
included), batching, the bounded queue, disconnects, and every kind of bad input."""

from __future__ import annotations

import base64
import io
import json
import re
import threading
import time

import httpx
import numpy as np
import pytest
from conftest import LiveServer, image_data_url
from PIL import Image

import glimpse
from glimpse.errors import GlimpseError
from glimpse.serve import ServerLimits, create_app
from glimpse.serve.engine import Job

MODEL = "tiny-vlm"


@pytest.fixture(scope="module")
def images(world):
    return sorted((world / "images" / "test").glob("*.png"))[:6]


def make_app(pipeline, **limits):
    return create_app(pipeline, MODEL, ServerLimits(**limits))


@pytest.fixture(scope="module")
def server(vlm):
    with LiveServer(make_app(vlm, max_image_pixels=200_000, max_request_pixels=300_000, max_body_bytes=2_000_000,
                             max_images=2, max_batch=4, max_request_chars=20_000)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def ask(url, question):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                          {"type": "text", "text": question}]}]


class Blocker:
    """Occupies the model worker until released, so that requests pile up in the queue."""

    def __init__(self, engine):
        self.release, self.started = threading.Event(), threading.Event()
        self.engine = engine

    def __enter__(self):
        def hold():
            self.started.set()
            self.release.wait(30)

        self.engine.submit(Job(on_done=lambda r, e: None, call=hold))
        assert self.started.wait(10)
        return self

    def __exit__(self, *exc):
        self.release.set()


def wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# -- the openai client ----------------------------------------------------------------------
def test_models_health_and_page(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "/v1/chat/completions" in page.text


def test_chat_completion_with_the_openai_client(client, vlm, images):
    url = image_data_url(images[0])
    r = client.chat.completions.create(model=MODEL, messages=ask(url, "what color is it?"), temperature=0,
                                       max_tokens=12)
    answer = r.choices[0].message.content
    assert r.object == "chat.completion" and r.model == MODEL and r.choices[0].message.role == "assistant"
    assert answer == vlm.chat(ask(url, "what color is it?"), max_new_tokens=12)  # the Python API's answer
    prompt_ids, _ = vlm.chat_prompt(ask(url, "what color is it?"))
    assert r.usage.prompt_tokens == len(prompt_ids)  # image tokens included
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert 1 <= r.usage.completion_tokens <= 12
    assert r.choices[0].finish_reason == ("length" if r.usage.completion_tokens == 12 else "stop")


def test_streaming_with_the_openai_client_matches_the_whole_answer(client, server, images):
    messages = ask(image_data_url(images[1]), "describe the image.")
    whole = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=16)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=16,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    # on the wire: server-sent events ending with [DONE]
    body = {"model": MODEL, "messages": messages, "stream": True, "max_tokens": 4}
    lines = [ln for ln in httpx.post(server.url + "/v1/chat/completions", json=body).text.split("\n") if ln]
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)
    # n streams, interleaved by choice index; greedy, so each is the whole answer
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=16,
                                                 n=2, stream=True))
    for i in range(2):
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices[0].index == i) == text


def test_n_seed_stop_and_multi_turn(client, vlm, images):
    messages = ask(image_data_url(images[2]), "describe the image.")
    kw = dict(model=MODEL, messages=messages, temperature=1.5, max_tokens=10, n=3, seed=7)
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]  # seeded
    greedy = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=10)
    text = greedy.choices[0].message.content
    # a stop string the greedy answer holds, whatever the tiny model says: its second token's text; the
    # answer ends before the token that completes it (the generation engine's documented cut)
    tokens = vlm.complete([vlm.chat_prompt(messages)], 10)[0]
    assert len(tokens) >= 2 and vlm.tokenizer.decode(tokens).strip() == text
    stop = next(t for t in (vlm.tokenizer.decode(tokens[i:i + 1]).strip() for i in range(1, len(tokens))) if t)
    k = next(i for i in range(len(tokens)) if stop in vlm.tokenizer.decode(tokens[:i + 1]))
    cut = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=10, stop=[stop])
    assert cut.choices[0].message.content == vlm.tokenizer.decode(tokens[:k]).strip()
    assert cut.choices[0].finish_reason == "stop"
    follow = messages + [{"role": "assistant", "content": text}, {"role": "user", "content": "and the size?"}]
    r = client.chat.completions.create(model=MODEL, messages=follow, temperature=0, max_tokens=8)
    assert r.usage.prompt_tokens > greedy.usage.prompt_tokens


def test_errors_reach_the_openai_client_as_its_exceptions(client, images):
    import openai

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ask(image_data_url(images[0]), "x " * 4000))
    assert e.value.code == "context_length_exceeded"


# -- batching, the queue, disconnects ------------------------------------------------------
def test_concurrent_requests_are_batched_and_answer_as_alone(vlm, images):
    app = make_app(vlm, max_batch=8)
    engine = app.state.engine
    prompts = [ask(image_data_url(im), q) for im, q in zip(images, ["describe the image.", "what color is it?",
                                                                     "what shape is it?"] * 2)]
    alone = [vlm.chat(m, max_new_tokens=6 + i) for i, m in enumerate(prompts)]
    with LiveServer(app) as s:
        results = [None] * len(prompts)

        def call(i):
            body = {"model": MODEL, "messages": prompts[i], "temperature": 0, "max_tokens": 6 + i}
            results[i] = httpx.post(s.url + "/v1/chat/completions", json=body, timeout=60).json()

        with Blocker(engine):
            threads = [threading.Thread(target=call, args=(i,)) for i in range(len(prompts))]
            for t in threads:
                t.start()
            # every request in the queue, not only reserved: one may still decode its image on a loaded machine
            wait_for(lambda: len(engine._waiting) == len(prompts))
            before = engine.batches
        for t in threads:
            t.join()
        assert engine.batches == before + 1  # all six decoded as one batch
        assert [r["choices"][0]["message"]["content"] for r in results] == alone
        assert [r["usage"]["completion_tokens"] <= 6 + i for i, r in enumerate(results)] == [True] * 6


class WholeBatches:
    """The pipeline without the step API (`open_batch`), as the encoder-decoder and Flamingo pipelines are:
    the engine decodes each group to its end with `complete`."""

    def __init__(self, pipeline):
        self._pipeline = pipeline

    def __getattr__(self, name):
        if name == "open_batch":
            raise AttributeError(name)
        return getattr(self._pipeline, name)


@pytest.mark.parametrize("whole", [False, True])
def test_requests_that_together_overflow_the_context(vlm, images, whole):
    """Each fits alone; the longest prompt plus the largest max_tokens does not.  A running batch pads a
    row only as far as its longest row, so they share it (and answer as alone); whole-batch decoding
    decodes the longest prompt for the largest max_tokens, so there they are not batched."""
    app = make_app(WholeBatches(vlm) if whole else vlm, max_batch=8)
    engine, ctx = app.state.engine, vlm.context_length
    long_q = "describe the image. " * 12
    long_len = len(vlm.chat_prompt(ask(image_data_url(images[0]), long_q))[0])
    short_len = len(vlm.chat_prompt(ask(image_data_url(images[1]), "hi"))[0])
    bodies = [{"model": MODEL, "temperature": 0, "messages": ask(image_data_url(images[0]), long_q),
               "max_tokens": ctx - long_len},
              {"model": MODEL, "temperature": 0, "messages": ask(image_data_url(images[1]), "hi"),
               "max_tokens": ctx - short_len}]
    assert long_len > short_len
    with LiveServer(app) as s:
        results = [None, None]

        def call(i):
            results[i] = httpx.post(s.url + "/v1/chat/completions", json=bodies[i], timeout=120)

        with Blocker(engine):
            threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            wait_for(lambda: len(engine._waiting) == 2)
            before = engine.batches
        for t in threads:
            t.join()
    assert [r.status_code for r in results] == [200, 200], [r.text for r in results]
    assert engine.batches == before + (2 if whole else 1)
    alone = [vlm.chat(b["messages"], max_new_tokens=b["max_tokens"]) for b in bodies]
    assert [r.json()["choices"][0]["message"]["content"] for r in results] == alone


def test_full_queue_answers_429_with_retry_after(vlm, images):
    app = make_app(vlm, max_pending=3)
    body = {"model": MODEL, "messages": ask(image_data_url(images[0]), "hi"), "max_tokens": 2}
    with LiveServer(app) as s, Blocker(app.state.engine):
        threads = [threading.Thread(target=httpx.post, args=(s.url + "/v1/chat/completions",),
                                    kwargs={"json": body, "timeout": 60}) for _ in range(2)]
        for t in threads:
            t.start()
        wait_for(lambda: app.state.engine.pending == 3)
        r = httpx.post(s.url + "/v1/chat/completions", json=body)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"
    for t in threads:
        t.join()


def test_a_client_that_leaves_frees_its_slot(vlm, images):
    app = make_app(vlm)
    engine = app.state.engine
    body = {"model": MODEL, "messages": ask(image_data_url(images[0]), "hi"), "max_tokens": 4}
    with LiveServer(app) as s, Blocker(engine):
        with pytest.raises(httpx.ReadTimeout):  # a plain request, abandoned
            httpx.post(s.url + "/v1/chat/completions", json=body, timeout=1.0)
        wait_for(lambda: engine.cancelled == 1 and engine.pending == 1)  # only the blocker is left
        with httpx.stream("POST", s.url + "/v1/chat/completions", json={**body, "stream": True}) as r:
            lines = r.iter_lines()  # (kept: a dropped iterator closes the connection when collected)
            assert next(lines).startswith("data: ")  # the role chunk comes before any token
            wait_for(lambda: engine.pending == 2)
        wait_for(lambda: engine.cancelled == 2 and engine.pending == 1)  # a stream, closed early


# -- bad input ------------------------------------------------------------------------------
def png_bytes(size, color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def data_url(raw: bytes, mime="image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


GOOD = data_url(png_bytes((32, 32)))


def chat_body(**over):
    return {"model": MODEL, "messages": ask(GOOD, "what is it?"), "max_tokens": 4, **over}


BAD_REQUESTS = {
    "not json": b"{\"model\": ",
    "not an object": b"[1, 2]",
    "no model": json.dumps({"messages": ask(GOOD, "x")}),
    "no messages": json.dumps({"model": MODEL}),
    "empty messages": json.dumps(chat_body(messages=[])),
    "messages not a list": json.dumps(chat_body(messages="hi")),
    "unknown role": json.dumps(chat_body(messages=[{"role": "robot", "content": "hi"}])),
    "content a number": json.dumps(chat_body(messages=[{"role": "user", "content": 3}])),
    "unknown part": json.dumps(chat_body(messages=[{"role": "user", "content": [{"type": "audio"}]}])),
    "temperature negative": json.dumps(chat_body(temperature=-1)),
    "temperature huge": json.dumps(chat_body(temperature=1e9)),
    "temperature a string": json.dumps(chat_body(temperature="hot")),
    "temperature nan": b"{\"model\": \"tiny-vlm\", \"messages\": [{\"role\": \"user\", \"content\": \"x\"}], "
                       b"\"temperature\": NaN}",
    "top_p zero": json.dumps(chat_body(top_p=0)),
    "top_p above one": json.dumps(chat_body(top_p=1.5)),
    "max_tokens zero": json.dumps(chat_body(max_tokens=0)),
    "max_tokens negative": json.dumps(chat_body(max_tokens=-3)),
    "max_tokens huge": json.dumps(chat_body(max_tokens=10**12)),
    "max_tokens a float": json.dumps(chat_body(max_tokens=2.5)),
    "n zero": json.dumps(chat_body(n=0)),
    "n huge": json.dumps(chat_body(n=1000)),
    "stop too many": json.dumps(chat_body(stop=["a"] * 10)),
    "seed negative": json.dumps(chat_body(seed=-1)),
    "stream a string": json.dumps(chat_body(stream="yes")),
    "bad base64": json.dumps(chat_body(messages=ask("data:image/png;base64,@@@@", "x"))),
    "not base64 encoded": json.dumps(chat_body(messages=ask("data:image/png,abc", "x"))),
    "not an image": json.dumps(chat_body(messages=ask(data_url(b"hello world, no pixels here"), "x"))),
    "truncated image": json.dumps(chat_body(messages=ask(data_url(png_bytes((64, 64))[:60]), "x"))),
    "oversized image": json.dumps(chat_body(messages=ask(data_url(png_bytes((600, 600))), "x"))),
    "too many images": json.dumps(chat_body(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": GOOD}}] * 3 + [{"type": "text", "text": "x"}]}])),
    "http url": json.dumps(chat_body(messages=ask("http://169.254.169.254/latest/meta-data", "x"))),
    "file url": json.dumps(chat_body(messages=ask("file:///etc/passwd", "x"))),
    "context exceeded": json.dumps(chat_body(messages=ask(GOOD, "word " * 3000))),
    "decoded pixels over the request's budget": json.dumps(chat_body(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(png_bytes((400, 400)))}}] * 2
        + [{"type": "text", "text": "x"}]}])),
    "text over the request's budget": json.dumps(chat_body(messages=[{"role": "user", "content": "word " * 3000}] * 2)),
    "n over the batch": json.dumps(chat_body(n=5)),
    "non-ascii url": json.dumps(chat_body(messages=ask("http://b\u00e9b\u00e9.example/\u00e9.png", "x"))),
    "max_tokens beyond context": json.dumps(chat_body(max_tokens=5000)),
    "unknown model": json.dumps(chat_body(model="gpt-4o")),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_requests_get_a_4xx_openai_error(server, name):
    r = httpx.post(server.url + "/v1/chat/completions", content=BAD_REQUESTS[name],
                   headers={"Content-Type": "application/json"})
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert not re.search(r"Traceback|File \"|\.py\b|site-packages|/tmp/|/work/|/root/", err["message"])
    if name in ("context exceeded", "max_tokens beyond context"):
        assert err["code"] == "context_length_exceeded"
    if name == "unknown model":
        assert r.status_code == 404


def test_oversized_bodies_get_413_and_unknown_routes_an_error_body(server):
    big = json.dumps(chat_body(messages=ask(data_url(b"\0" * 3_000_000), "x")))
    r = httpx.post(server.url + "/v1/chat/completions", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: the body is counted as it comes
        for _ in range(30):
            yield b"x" * 100_000

    r = httpx.post(server.url + "/v1/chat/completions", content=chunks())
    assert r.status_code == 413
    for method, path in [("GET", "/v1/nothing"), ("GET", "/v1/chat/completions"), ("DELETE", "/v1/models")]:
        r = httpx.request(method, server.url + path)
        assert r.status_code in (404, 405) and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_a_vanishing_temperature_is_answered(client, images):
    r = client.chat.completions.create(model=MODEL, messages=ask(image_data_url(images[0]), "hi"), max_tokens=3,
                                       temperature=1e-40)
    greedy = client.chat.completions.create(model=MODEL, messages=ask(image_data_url(images[0]), "hi"), max_tokens=3,
                                            temperature=0)
    assert r.choices[0].message.content == greedy.choices[0].message.content


def test_server_limits_below_one_are_refused(vlm, tiny_vlm_run, cli_env):
    import subprocess

    from conftest import PY

    for limits in ({"max_batch": 0}, {"max_pending": -1}, {"max_images": True}):
        with pytest.raises(GlimpseError, match="must be a whole number of at least 1"):
            ServerLimits(**limits)
    r = subprocess.run([PY, "-m", "glimpse", "serve", str(tiny_vlm_run), "--max-batch", "0"], env=cli_env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--max-batch: '0' is not a whole number of at least 1" in r.stderr


def test_the_server_keeps_serving_after_bad_input(client, images):
    r = client.chat.completions.create(model=MODEL, messages=ask(image_data_url(images[0]), "hi"), max_tokens=3)
    assert r.choices[0].message.content is not None


# -- embeddings -----------------------------------------------------------------------------
def test_embeddings_for_texts_and_images(tiny_run, world, vlm):
    from openai import OpenAI

    dual = glimpse.load(tiny_run)
    image = sorted((world / "images" / "test").glob("*.png"))[0]
    with LiveServer(create_app(dual, "tiny-clip")) as s:
        client = OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        r = client.embeddings.create(model="tiny-clip", input=["a red circle", image_data_url(image)])
        got = np.array([d.embedding for d in r.data], dtype=np.float32)
        assert np.allclose(got[0], dual.embed_texts(["a red circle"])[0].numpy(), atol=1e-5)
        assert np.allclose(got[1], dual.embed_images([image])[0].numpy(), atol=1e-5)
        assert r.usage.prompt_tokens == len(dual.tokenizer.encode("a red circle"))
        # the client's default wire format is base64; a plain list comes back on request
        raw = httpx.post(s.url + "/v1/embeddings", json={"model": "tiny-clip", "input": "a red circle",
                                                         "encoding_format": "float"}).json()
        assert np.allclose(raw["data"][0]["embedding"], got[0], atol=1e-6)
        for body in [{"model": "tiny-clip", "input": [1, 2]}, {"model": "tiny-clip", "input": []},
                     {"model": "tiny-clip", "input": "data:image/png;base64,AAAA"},
                     {"model": "tiny-clip", "messages": [{"role": "user", "content": "hi"}]}]:
            r = httpx.post(s.url + "/v1/embeddings", json=body)
            assert r.status_code == 400, body
        r = httpx.post(s.url + "/v1/chat/completions", json={"model": "tiny-clip", "messages": [
            {"role": "user", "content": "hi"}]})
        assert r.status_code == 400 and "not a vision-language chat model" in r.json()["error"]["message"]
    with LiveServer(create_app(vlm, MODEL)) as s:
        r = httpx.post(s.url + "/v1/embeddings", json={"model": MODEL, "input": "x"})
        assert r.status_code == 400


def test_glimpse_serve_command(tiny_vlm_run, cli_env):
    from conftest import serve_process

    proc, url = serve_process([str(tiny_vlm_run), "--model-name", "mine"], cli_env)
    try:
        models = httpx.get(url + "/v1/models").json()
        assert models["data"][0]["id"] == "mine"
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    assert f"serving mine on {url}" in out


def _up(url) -> bool:
    try:
        return httpx.get(url).status_code == 200
    except httpx.HTTPError:
        return False


def test_serving_a_hugging_face_llava_folder(tmp_path):
    """`glimpse serve` takes what `glimpse.load` takes, a transformers LLaVA folder included."""
    from openai import OpenAI
    from test_hf_llava import write_llava_folder

    write_llava_folder(tmp_path)
    pipe = glimpse.load(tmp_path)
    with LiveServer(create_app(pipe, "hf-llava")) as s:
        client = OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        r = client.chat.completions.create(model="hf-llava", messages=ask(GOOD, "w3 w4"), temperature=0,
                                           max_tokens=5)
    assert r.choices[0].message.content == pipe.chat(ask(GOOD, "w3 w4"), max_new_tokens=5)
    assert r.usage.prompt_tokens == len(pipe.chat_prompt(ask(GOOD, "w3 w4"))[0])
