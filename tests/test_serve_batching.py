"""Continuous batching in the server's engine (glimpse/serve/engine.py over infer/batch.py): requests join a
running batch between decoding steps, leave it as soon as they end or their client goes away, and every
greedy answer is token for token the answer the request gets alone."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from conftest import image_data_url

import glimpse
from glimpse.errors import ContextLengthError
from glimpse.serve.engine import Engine, Job

GREEDY = {"do_sample": False, "stop_strings": [], "seed": None, "temperature": 1.0, "top_p": 1.0}
QUESTIONS = ["describe the image.", "what color is it?", "what shape is it?", "how many shapes are there?"]


@pytest.fixture(scope="module")
def vlm(tiny_vlm_run):
    """The tiny LLaVA with its language model and projector shaken: the 4-step model says the same token
    whatever it sees, which would hide a misaligned row; this one's answers differ by image and question."""
    pipeline = glimpse.load(tiny_vlm_run)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in [*pipeline.model.lm.parameters(), *pipeline.model.connector.parameters()]:
            p.add_(torch.randn_like(p) * 0.2)
    return pipeline


@pytest.fixture(scope="module")
def prompts(vlm, world):
    images = sorted((world / "images" / "test").glob("*.png"))[:8]
    return [vlm.chat_prompt([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_data_url(im)}},
                                                          {"type": "text", "text": QUESTIONS[i % 4] + " " * (i % 3)}]}])
            for i, im in enumerate(images)]


class Request:
    """A job and what came back: streamed tokens, the result, and its place in `log` (answer order)."""

    def __init__(self, engine, prompt, max_tokens, log, choices=1, options=GREEDY, on_token=None):
        self.engine, self.done, self.result, self.error = engine, threading.Event(), None, None
        self.streamed = [[] for _ in range(choices)]

        def on_done(result, error):
            self.result, self.error = result, error
            log.append(self)
            self.done.set()

        def stream(choice, token):
            self.streamed[choice].append(token)
            if on_token is not None:
                on_token(self, choice, token)

        self.job = Job(on_done=on_done, prompts=[prompt] * choices, max_new_tokens=max_tokens, options=dict(options),
                       on_token=stream)

    def submit(self):
        self.engine.submit(self.job)
        return self

    def wait(self):
        assert self.done.wait(60), "no answer"
        assert self.error is None, self.error
        return self.result


def wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_requests_that_arrive_while_others_decode_join_and_answer_as_alone(vlm, prompts):
    alone = [vlm.complete([p], 24)[0] for p in prompts]
    assert len(alone[0]) >= 8, "the first answer must run long enough for the others to join it"
    assert len({tuple(a[:6]) for a in alone}) > 3  # the answers differ: a misaligned row would show
    engine, log = Engine(vlm, max_batch=8, max_pending=16), []
    late = [Request(engine, prompts[1], 3, log), Request(engine, prompts[2], 12, log, choices=2),
            Request(engine, prompts[3], 24, log)]  # a short prompt, two choices, a longer one
    later = [Request(engine, prompts[4], 6, log), Request(engine, prompts[5], 24, log)]

    def arrive(request, choice, token):  # the worker streams the first answer: the others come meanwhile
        if len(request.streamed[0]) == 2:
            for r in late:
                r.submit()
        if len(request.streamed[0]) == 5:
            for r in later:
                r.submit()

    first = Request(engine, prompts[0], 20, log, on_token=arrive).submit()
    try:
        assert first.wait() == [alone[0][:20]]
        for r, i in zip(late + later, range(1, 6)):
            n = r.job.max_new_tokens
            assert r.wait() == [alone[i][:n]] * len(r.streamed), i  # greedy: every choice is the answer alone
            assert r.streamed == r.result
        assert engine.batches == 1 and engine.joined == 6 and engine.rows == 7
        # a row that ended left at once: the 3-token request was answered while the first still decoded
        assert log.index(late[0]) < log.index(first)
        wait_for(lambda: engine.pending == 0)
    finally:
        engine.close()


def test_a_request_whose_client_leaves_mid_batch_leaves_and_the_others_continue(vlm, prompts):
    alone = [vlm.complete([p], 16)[0] for p in prompts[:4]]
    engine, log, release = Engine(vlm, max_batch=8, max_pending=16), [], threading.Event()

    def leave(request, choice, token):
        if len(request.streamed[0]) == 3:
            engine.cancel(request.job)  # as the API does when the client disconnects

    engine.submit(Job(on_done=lambda r, e: None, call=lambda: release.wait(30)))  # hold the worker
    try:
        gone = Request(engine, prompts[0], 16, log, on_token=leave).submit()
        stay = [Request(engine, p, 16, log).submit() for p in prompts[1:4]]
        wait_for(lambda: len(engine._waiting) == 4)
        release.set()
        assert [r.wait() for r in stay] == [[a] for a in alone[1:4]]
        assert gone.streamed == [alone[0][:3]] and not gone.done.is_set()  # no token after it left, no answer
        assert engine.cancelled == 1 and engine.batches == 1
        wait_for(lambda: engine.pending == 0)
    finally:
        release.set()
        engine.close()


def test_a_request_that_decodes_differently_stops_the_joining(vlm, prompts):
    sampled = {"do_sample": True, "temperature": 1.3, "top_p": 0.9, "seed": 7, "stop_strings": []}
    alone = [vlm.complete([p], 12)[0] for p in prompts[:4]]
    drawn = vlm.complete([prompts[2]], 12, **sampled)[0]
    assert len(alone[0]) >= 4
    engine, log = Engine(vlm, max_batch=8, max_pending=16), []
    queued = [Request(engine, prompts[1], 12, log), Request(engine, prompts[2], 12, log, options=sampled),
              Request(engine, prompts[3], 12, log)]

    def arrive(request, choice, token):
        if len(request.streamed[0]) == 2:
            for r in queued:
                r.submit()

    first = Request(engine, prompts[0], 12, log, on_token=arrive).submit()
    try:
        assert first.wait() == [alone[0]]
        assert queued[0].wait() == [alone[1]] and queued[2].wait() == [alone[3]]
        # the seeded request ran alone: its draws depend on its seed only
        assert queued[1].wait() == [drawn]
        # the greedy request queued before it joined; the one queued after it waited for the batch to drain
        assert engine.joined == 1 and engine.batches == 3
        assert log.index(queued[1]) < log.index(queued[2])
    finally:
        engine.close()


def test_a_request_that_fails_to_join_gets_its_error_and_the_batch_goes_on(vlm, prompts):
    alone = vlm.complete([prompts[0]], 12)[0]
    engine, log = Engine(vlm, max_batch=8, max_pending=16), []
    ids, images = prompts[1]
    too_long = Request(engine, (ids, images), vlm.context_length, log)  # prompt + max_tokens over the context

    def arrive(request, choice, token):
        if len(request.streamed[0]) == 2:
            too_long.submit()

    first = Request(engine, prompts[0], 12, log, on_token=arrive).submit()
    try:
        assert too_long.done.wait(60) and isinstance(too_long.error, ContextLengthError)
        assert first.wait() == [alone]
        wait_for(lambda: engine.pending == 0)
    finally:
        engine.close()
