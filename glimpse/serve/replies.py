"""How a request's answer reaches its client: waiting for the model's answer while watching for the
client leaving, and a streamed completion's server-sent events (OpenAI's chunks)."""

from __future__ import annotations

import asyncio
import json

from starlette.requests import Request

from glimpse.errors import GlimpseError
from glimpse.infer.generate import TextStream


async def answer_or_disconnect(request: Request, events: asyncio.Queue):
    """The job's final event, or None as soon as the client disconnects (no polling: one task
    waits for the answer, one for the connection's http.disconnect)."""

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    answer = asyncio.ensure_future(events.get())
    gone = asyncio.ensure_future(disconnected())
    done = set()
    try:
        done, _ = await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (answer, gone):
            if task not in done:
                task.cancel()
    return answer.result() if answer in done else None


async def sse_chunks(engine, job, events, reply, body, decode, usage, finish):
    """The chunks of a streamed completion, as OpenAI sends them; the job is cancelled if the client
    goes away (the response task is cancelled and this generator closed)."""
    def chunk(choices, **extra):
        return "data: " + json.dumps({**reply, "object": "chat.completion.chunk", "choices": choices,
                                      **extra}) + "\n\n"

    streams = [TextStream(decode) for _ in range(body.n)]
    finished = False  # the job answered: its slot was released by the worker, nothing to cancel
    try:
        for i in range(body.n):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        while True:
            event = await events.get()
            if event[0] == "token":
                _, i, token = event
                piece = streams[i].push(token)
                if piece:
                    yield chunk([{"index": i, "delta": {"content": piece}, "finish_reason": None}])
                continue
            _, tokens, error = event
            finished = True
            if error is not None:
                message, kind = (str(error), "invalid_request_error") if isinstance(error, GlimpseError) else \
                    ("internal server error", "server_error")
                err = {"message": message, "type": kind, "param": None, "code": None}
                yield "data: " + json.dumps({"error": err}) + "\n\n"
                break
            for i, t in enumerate(tokens):
                yield chunk([{"index": i, "delta": {}, "finish_reason": finish(t)}])
            if body.stream_options is not None and body.stream_options.include_usage:
                yield chunk([], usage=usage(tokens))
            break
        yield "data: [DONE]\n\n"
    finally:
        if not finished:  # the client left mid-stream (or the server is closing): free its slot now
            engine.cancel(job)
