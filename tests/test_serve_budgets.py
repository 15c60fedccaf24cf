"""What one request may cost the server, and the bookkeeping around it: images and decoded pixels per
request on every endpoint, images shrunk to the model's size as soon as they are decoded, the queue slot
taken before any decoding, text refused by length before anything tokenizes it, no tokenizing on the
event loop, n bounded by the batch, and the counters of /health telling cancelled from finished."""

from __future__ import annotations

import io
import threading

import httpx
import pytest
from conftest import LiveServer, image_data_url
from PIL import Image
from test_serve import MODEL, Blocker, ask, data_url, make_app, wait_for

import glimpse.serve.app as app_module
import glimpse.serve.inputs as inputs_module


def bitmap_png(size) -> bytes:
    """A 1-bit PNG: a few hundred bytes on the wire, width x height x 3 bytes decoded."""
    buf = io.BytesIO()
    Image.new("1", size, 1).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def images(world):
    return sorted((world / "images" / "test").glob("*.png"))[:2]


def test_images_and_decoded_pixels_are_budgeted_per_request(vlm, dual):
    big = data_url(bitmap_png((3000, 3000)))  # 9M pixels: under the per-image limit, two are over the request's
    assert len(big) < 20_000
    with LiveServer(make_app(vlm, max_request_pixels=16_000_000)) as s:
        two = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": big}}] * 2
                + [{"type": "text", "text": "x"}]}]
        r = httpx.post(s.url + "/v1/chat/completions", json={"model": MODEL, "messages": two, "max_tokens": 2})
        assert r.status_code == 400 and "over its budget of 16,000,000 decoded pixels" in r.json()["error"]["message"]
    with LiveServer(app_module.create_app(dual, "clip", app_module.ServerLimits(max_images=2))) as s:
        r = httpx.post(s.url + "/v1/embeddings", json={"model": "clip", "input": [big] * 3})
        assert r.status_code == 400 and "too many images: at most 2" in r.json()["error"]["message"]
        r = httpx.post(s.url + "/v1/embeddings", json={"model": "clip", "input": ["a red circle", big]})
        assert r.status_code == 200 and len(r.json()["data"]) == 2


def test_a_waiting_request_holds_its_images_at_the_model_size(vlm):
    app = make_app(vlm)
    engine = app.state.engine
    big = data_url(bitmap_png((2000, 1500)))
    with LiveServer(app) as s, Blocker(engine):
        t = threading.Thread(target=httpx.post, args=(s.url + "/v1/chat/completions",),
                             kwargs={"json": {"model": MODEL, "messages": ask(big, "hi"), "max_tokens": 2},
                                     "timeout": 60})
        t.start()
        wait_for(lambda: len(engine._waiting) == 1)
        (ids, images), = engine._waiting[0].prompts
        side = vlm.transform.image_size
        assert [im.size for im in images] == [(side, side)]  # not 2000 x 1500
    t.join()


def test_a_burst_is_refused_before_its_images_are_decoded(vlm, images, monkeypatch):
    decoded = []
    real = inputs_module.load_image

    def counting(*a, **kw):
        decoded.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(inputs_module, "load_image", counting)
    app = make_app(vlm, max_pending=3)
    engine = app.state.engine
    body = {"model": MODEL, "messages": ask(image_data_url(images[0]), "hi"), "max_tokens": 2}
    with LiveServer(app) as s, Blocker(engine):  # the blocker holds one of the 3 slots
        results = []
        threads = [threading.Thread(target=lambda: results.append(
            httpx.post(s.url + "/v1/chat/completions", json=body, timeout=60).status_code)) for _ in range(12)]
        for t in threads:
            t.start()
        wait_for(lambda: sum(code == 429 for code in results) == 10)
        assert len(decoded) == 2  # only the two requests that got a slot decoded their image
    for t in threads:
        t.join()
    assert sorted(results) == [200, 200] + [429] * 10


def test_the_choices_of_a_request_share_its_images(vlm, images, monkeypatch):
    calls = []
    real = vlm.image_features
    monkeypatch.setattr(vlm, "image_features", lambda ims: calls.append(len(ims)) or real(ims))
    with LiveServer(make_app(vlm)) as s:
        r = httpx.post(s.url + "/v1/chat/completions", json={
            "model": MODEL, "messages": ask(image_data_url(images[1]), "hi"), "max_tokens": 2, "n": 3,
            "temperature": 1.0, "seed": 1}, timeout=60)
        assert r.status_code == 200 and len(r.json()["choices"]) == 3
    assert calls == [1]  # one image, encoded (and hashed) once for the three rows


def test_n_over_the_batch_is_refused(vlm, images):
    with LiveServer(make_app(vlm, max_batch=2)) as s:
        r = httpx.post(s.url + "/v1/chat/completions", json={
            "model": MODEL, "messages": ask(image_data_url(images[0]), "hi"), "max_tokens": 2, "n": 3})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"


def test_long_text_is_refused_before_tokenizing_and_tokens_are_counted_off_the_event_loop(dual, monkeypatch):
    threads = []
    real = dual.tokenizer.encode
    monkeypatch.setattr(dual.tokenizer, "encode", lambda *a, **kw: threads.append(threading.current_thread().name)
                        or real(*a, **kw))
    with LiveServer(app_module.create_app(dual, "clip", app_module.ServerLimits(max_request_chars=1000))) as s:
        r = httpx.post(s.url + "/v1/embeddings", json={"model": "clip", "input": ["a" * 600, "b" * 600]})
        assert r.status_code == 400 and "over the 1,000-character limit" in r.json()["error"]["message"]
        assert threads == []  # refused before anything tokenized it
        long = "word " * 150
        r = httpx.post(s.url + "/v1/chat/completions", json={"model": "clip", "messages": [
            {"role": "user", "content": long}, {"role": "user", "content": long}]})
        assert r.status_code == 400
        r = httpx.post(s.url + "/v1/embeddings", json={"model": "clip", "input": ["a red circle"]})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] > 0
    assert threads and set(threads) == {"glimpse-engine"}  # usage counted by the worker, not the event loop


def test_a_finished_stream_is_not_counted_as_cancelled(vlm, images):
    app = make_app(vlm)
    with LiveServer(app) as s:
        body = {"model": MODEL, "messages": ask(image_data_url(images[0]), "hi"), "max_tokens": 3, "stream": True}
        with httpx.stream("POST", s.url + "/v1/chat/completions", json=body, timeout=60) as r:
            lines = [x for x in r.iter_lines() if x]
        assert lines[-1] == "data: [DONE]"
        wait_for(lambda: app.state.engine.pending == 0)
        assert httpx.get(s.url + "/health").json()["cancelled"] == 0


def test_an_abandoned_embeddings_call_never_runs(dual, monkeypatch):
    ran = []
    real = dual.embed_texts
    monkeypatch.setattr(dual, "embed_texts", lambda texts: ran.append(len(texts)) or real(texts))
    app = app_module.create_app(dual, "clip")
    engine = app.state.engine
    with LiveServer(app) as s, Blocker(engine):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(s.url + "/v1/embeddings", json={"model": "clip", "input": ["a red circle"]}, timeout=1.0)
        wait_for(lambda: engine.cancelled == 1 and engine.pending == 1)  # only the blocker is left
    assert ran == []
