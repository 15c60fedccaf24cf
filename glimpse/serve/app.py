"""The OpenAI-compatible HTTP API over one glimpse model (FastAPI).

    GET  /                      the web chat page (glimpse/serve/chat.html)
    GET  /health                {"status": "ok", ...}
    GET  /v1/models             the one model served
    POST /v1/chat/completions   vision-language models; `stream: true` as server-sent events
    POST /v1/embeddings         dual encoders; texts, and images as data: URLs (an extension)
    POST /v1/images/generations text-to-image models; PNGs as b64_json, `seed` an extension
    POST /v1/recommendations    recommenders (a glimpse extension): item ids and scores after a history
    POST /v1/explain            chat models (a glimpse extension): where the model looked for an answer

Every error is OpenAI's body {"error": {"message", "type", "param", "code"}} with a 4xx status for
anything the client can fix.  Messages never carry a traceback or server internals: requests are
checked (schemas.py), images decoded and prompts built (inputs.py) before a request is queued, so the model
worker only sees requests that can run.
"""

from __future__ import annotations

import asyncio
import base64
import io
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from glimpse.errors import GlimpseError
from glimpse.families.base import can_chat, can_embed, can_explain_chat, can_generate_images, can_recommend
from glimpse.serve.engine import Engine, Job, QueueFull
from glimpse.serve.extensions import add_extensions
from glimpse.serve.guards import APIError, BodyLimit, Gate, ServerLimits, error_response
from glimpse.serve.inputs import RequestReader
from glimpse.serve.replies import answer_or_disconnect, sse_chunks
from glimpse.serve.schemas import (
    ChatCompletionRequest,
    EmbeddingRequest,
    ImageGenerationRequest,
)

PAGE = Path(__file__).with_name("chat.html")
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")  # the Host names a loopback server answers to
EMBED_CHUNK = 32  # inputs embedded between two looks at whether the client is still there


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    if err.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    # a union's branch names (str, list[...], tagged-union[...]) say nothing to a client: drop them
    loc = [p for p in loc if not any(c in p for c in "[]") and p not in ("str", "int", "list")]
    param = ".".join(loc) or None
    return (f"{param}: {err.get('msg', 'invalid value')}" if param else err.get("msg", "invalid request")), param


def create_app(pipeline, model_name: str, limits: ServerLimits | None = None, remote=None, api_key: str | None = None,
               allowed_hosts: tuple[str, ...] | None = None) -> FastAPI:
    """The API over a loaded pipeline (`glimpse.load(RUN)`); `remote` is a RemoteImageFetcher to
    allow http(s) image URLs from its allowlisted hosts (None: only data: URLs); `api_key` and
    `allowed_hosts` say who may ask (Gate)."""
    limits = limits or ServerLimits()
    # what the model does, by the pipeline's methods (glimpse.families.base)
    chats, embeds, draws = can_chat(pipeline), can_embed(pipeline), can_generate_images(pipeline)
    recommends = can_recommend(pipeline)
    explains = can_explain_chat(pipeline)  # chat models whose answers glimpse.explain traces
    engine = Engine(pipeline, max_batch=limits.max_batch, max_pending=limits.max_pending)
    reader = RequestReader(pipeline, model_name, limits, remote)  # text, images and videos under the limits
    app = FastAPI(title="glimpse", version="1", docs_url=None, redoc_url=None)
    app.state.engine, app.state.model_name = engine, model_name
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    app.add_middleware(Gate, api_key=api_key, allowed_hosts=allowed_hosts)  # outermost: before any body is read
    app.router.add_event_handler("shutdown", engine.close)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_response(400, message, param=param, code="invalid_value" if param else None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        type = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), type)

    @app.exception_handler(Exception)
    async def _crash(request, exc: Exception):  # a bug: say nothing about it to the client
        return error_response(500, "internal server error", "server_error")

    # -- helpers ---------------------------------------------------------------------------
    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")

    def reserved(prepare):
        """Run `prepare` (off the event loop) in a slot reserved first, so a burst is refused before any
        decoding; the slot is given back if the request is refused while it is prepared."""
        async def run(*args):
            try:
                engine.reserve()
            except QueueFull:
                raise busy() from None
            try:
                return await run_in_threadpool(prepare, *args)
            except BaseException:
                engine.unreserve()
                raise
        return run

    def worker_error(error: Exception) -> Exception:
        """What the worker raised, for the client: a user error (a GlimpseError) is a 400, a bug a 500."""
        return APIError(400, str(error)) if isinstance(error, GlimpseError) else error

    def unable(what: str) -> APIError:
        """The 400 of an endpoint the model cannot answer, saying where it is answered."""
        where = [route for route, can in (("/v1/chat/completions", chats), ("/v1/embeddings", embeds),
                                          ("/v1/images/generations", draws), ("/v1/recommendations", recommends),
                                          ("/v1/explain", explains))
                 if can]
        hint = f"; use {' or '.join(where)}" if where else ""
        return APIError(400, f"{model_name} {what}{hint}", param="model", code="unsupported_model")

    def busy() -> APIError:
        return APIError(429, "the server is busy: too many requests in flight; retry later",
                        type="rate_limit_error", code="rate_limit_exceeded",
                        headers={"Retry-After": str(limits.retry_after_s)})

    async def in_worker(call, request: Request):
        """Run `call(job)` in the model worker for a request whose slot is reserved: (result, error), or a
        499 response when the client leaves first (the job is cancelled: one not started leaves the
        queue; `call` looks at `job.cancelled` to stop early)."""
        loop, done = asyncio.get_running_loop(), asyncio.Queue()
        job = Job(on_done=lambda r, e: loop.call_soon_threadsafe(done.put_nowait, ("done", r, e)))
        job.call = lambda: call(job)
        engine.submit(job, reserved=True)
        try:
            event = await answer_or_disconnect(request, done)
        except asyncio.CancelledError:  # the server is shutting down
            engine.cancel(job)
            raise
        if event is None:
            engine.cancel(job)
            return None, error_response(499, "the client closed the request", code="client_closed_request")
        _, result, error = event
        return result, error

    # -- routes ----------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(PAGE.read_text())

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "pending": engine.pending, "batches": engine.batches,
                "rows": engine.rows, "joined": engine.joined, "cancelled": engine.cancelled}

    @app.get("/v1/models")
    async def models():
        can = (["chat"] if chats else []) + (["embeddings"] if embeds else []) + (["images"] if draws else []) \
            + (["explain"] if explains else [])
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "glimpse", "capabilities": can}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        if not chats:
            raise unable("is not a vision-language chat model")
        if body.n > limits.max_batch:  # a request's choices decode together, in one batch
            raise APIError(400, f"n ({body.n}) is over this server's batch of {limits.max_batch} rows", param="n")
        texts = []
        for m in body.messages:
            texts += [m.content] if isinstance(m.content, str) else [p.text for p in m.content if p.type == "text"]
        reader.check_text(texts, "messages")

        def prepare():
            ids, images = reader.build_prompt(body)
            room = pipeline.context_length - len(ids)
            max_new = body.max_completion_tokens or body.max_tokens or max(1, min(256, room))
            if max_new > room:
                raise APIError(400, f"the prompt ({len(ids)} tokens) plus max_tokens ({max_new}) exceeds the "
                               f"model's context of {pipeline.context_length} tokens", param="messages",
                               code="context_length_exceeded")
            return ids, images, max_new

        ids, images, max_new = await reserved(prepare)()
        sampling = body.temperature > 0
        options = {"do_sample": sampling, "stop_strings": body.stops(), "seed": body.seed,
                   "temperature": body.temperature if sampling else 1.0, "top_p": body.top_p if sampling else 1.0}
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def on_token(choice, token):
            loop.call_soon_threadsafe(events.put_nowait, ("token", choice, token))

        def on_done(result, error):
            loop.call_soon_threadsafe(events.put_nowait, ("done", result, error))

        job = Job(on_done=on_done, prompts=[(ids, images)] * body.n, max_new_tokens=max_new, options=options,
                  on_token=on_token if body.stream else None)
        engine.submit(job, reserved=True)
        reply = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}

        def usage(tokens):
            done = sum(len(t) for t in tokens)
            return {"prompt_tokens": len(ids), "completion_tokens": done, "total_tokens": len(ids) + done}

        def finish(tokens):
            return "length" if len(tokens) >= max_new else "stop"

        if body.stream:
            return StreamingResponse(sse_chunks(engine, job, events, reply, body, pipeline.tokenizer.decode, usage,
                                                finish),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            event = await answer_or_disconnect(request, events)
        except asyncio.CancelledError:  # the server is shutting down
            engine.cancel(job)
            raise
        if event is None:  # the client left: free its slot
            engine.cancel(job)
            return error_response(499, "the client closed the request", code="client_closed_request")
        _, tokens, error = event
        if error is not None:
            raise worker_error(error)
        choices = [{"index": i, "message": {"role": "assistant", "content": pipeline.tokenizer.decode(t).strip()},
                    "logprobs": None, "finish_reason": finish(t)} for i, t in enumerate(tokens)]
        return {**reply, "object": "chat.completion", "choices": choices, "usage": usage(tokens)}

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request):
        check_model(body.model)
        if not embeds:
            raise unable("has no embeddings (it embeds neither texts nor images)")
        inputs = body.inputs()
        kinds = ["images" if x.startswith("data:image/") else "texts" for x in inputs]
        for i, kind in enumerate(kinds):
            if not hasattr(pipeline, f"embed_{kind}"):  # a single-tower encoder
                raise APIError(400, f"{model_name} does not embed {kind}", param=f"input.{i}")
        if kinds.count("images") > limits.max_images:
            raise APIError(400, f"too many images: at most {limits.max_images} per request", param="input")
        texts = [i for i, kind in enumerate(kinds) if kind == "texts"]
        reader.check_text([inputs[i] for i in texts], "input")

        def prepare() -> dict:
            budget, images = [limits.max_request_pixels], {}
            for i, kind in enumerate(kinds):
                if kind == "images":
                    try:
                        images[i] = reader.read_image(inputs[i], budget, f"#{i}")
                    except GlimpseError as e:
                        raise APIError(400, str(e), param=f"input.{i}") from None
            return images

        images = await reserved(prepare)()

        def embed(job):
            """In the worker, a chunk at a time, so that a request whose client left stops early; the
            tokens are counted here too, never on the event loop."""
            out = [None] * len(inputs)
            for values, run in (({i: inputs[i] for i in texts}, "embed_texts"), (images, "embed_images")):
                rows = list(values)
                for start in range(0, len(rows), EMBED_CHUNK):
                    if job.cancelled.is_set():
                        return None
                    chunk = rows[start:start + EMBED_CHUNK]
                    for i, e in zip(chunk, getattr(pipeline, run)([values[i] for i in chunk])):
                        out[i] = e
            return out, sum(len(pipeline.tokenizer.encode(inputs[i])) for i in texts)

        result, error = await in_worker(embed, request)  # a client that leaves stops it at its next chunk
        if isinstance(error, JSONResponse):
            return error
        if error is not None:
            raise worker_error(error)
        vectors, tokens = result
        data = []
        for i, v in enumerate(vectors):
            v = v.float().numpy()
            emb = base64.b64encode(v.astype(np.float32).tobytes()).decode() if body.encoding_format == "base64" \
                else v.tolist()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        return {"object": "list", "data": data, "model": model_name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @app.post("/v1/images/generations")
    async def images_generations(body: ImageGenerationRequest, request: Request):
        check_model(body.model)
        if not draws:
            raise unable("does not generate images")
        side = pipeline.image_size
        if body.size not in (None, "auto", f"{side}x{side}"):
            raise APIError(400, f"size {body.size!r} is not supported: this model generates {side}x{side} images "
                           f"(size \"{side}x{side}\" or \"auto\")", param="size", code="invalid_value")
        if body.response_format == "url":
            raise APIError(400, "response_format \"url\" is not supported: this server returns b64_json only",
                           param="response_format", code="invalid_value")
        if body.stream:
            raise APIError(400, "stream is not supported: the images come whole", param="stream",
                           code="invalid_value")
        if not body.prompt.strip():
            raise APIError(400, "the prompt is blank", param="prompt", code="invalid_value")
        n = body.n or 1
        try:
            engine.reserve()  # the slot is taken here, so a burst is refused with a 429
        except QueueFull:
            raise busy() from None

        def draw(job):
            """In the worker, the PNGs encoded there too (never on the event loop); a job whose client left
            before it started does nothing."""
            if job.cancelled.is_set():
                return None
            out = []
            for image in pipeline.generate_images(body.prompt, n=n, seed=body.seed):
                buf = io.BytesIO()
                image.save(buf, "PNG")
                out.append(base64.b64encode(buf.getvalue()).decode())
            return out

        pngs, error = await in_worker(draw, request)  # a client that leaves: one not started is dropped
        if isinstance(error, JSONResponse):
            return error
        if isinstance(error, GlimpseError):  # the pipeline refused the request: its first line, as a 400
            raise APIError(400, (str(error).strip().splitlines() or ["the model refused the request"])[0])
        if error is not None:
            raise error
        return {"created": int(time.time()), "data": [{"b64_json": p, "revised_prompt": None} for p in pngs]}

    # the glimpse extensions (recommendations, explanations), with this app's helpers
    add_extensions(app, SimpleNamespace(
        pipeline=pipeline, model_name=model_name, limits=limits, recommends=recommends, explains=explains,
        check_model=check_model, unable=unable, check_text=reader.check_text, reserved=reserved,
        read_image=reader.read_image, build_prompt=reader.build_prompt, in_worker=in_worker, worker_error=worker_error))

    def openapi():  # the schema names the one model served (requests naming another get a 404)
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            for name in ("ChatCompletionRequest", "EmbeddingRequest", "ImageGenerationRequest", "RecommendationRequest"):
                schema["components"]["schemas"][name]["properties"]["model"]["enum"] = [model_name]
            if draws:  # and the one image size it generates
                side = pipeline.image_size
                schema["components"]["schemas"]["ImageGenerationRequest"]["properties"]["size"] = {
                    "anyOf": [{"type": "string", "enum": [f"{side}x{side}", "auto"]}, {"type": "null"}],
                    "title": "Size"}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app
