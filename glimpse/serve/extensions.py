"""The glimpse extensions of the OpenAI API (OpenAI has no such endpoints): recommendations and explanations.

    POST /v1/recommendations    recommenders: item ids and scores after a history, or for a known user
    POST /v1/explain            chat models: where the model looked for an answer (glimpse.explain)

`add_extensions(app, ctx)` adds them to the app that `glimpse.serve.app.create_app` builds; `ctx` carries
that app's request helpers (the model check, the slot reservation, the worker queue, image and prompt
decoding within the server's limits), so these routes behave as the OpenAI ones do under load and bad input.
"""

from __future__ import annotations

import base64
import io
from types import SimpleNamespace

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from glimpse.errors import GlimpseError
from glimpse.explain import explain
from glimpse.explain.render import render
from glimpse.serve.guards import APIError
from glimpse.serve.schemas import ExplainRequest, RecommendationRequest


def add_extensions(app: FastAPI, ctx: SimpleNamespace) -> None:
    @app.post("/v1/recommendations")
    async def recommendations(body: RecommendationRequest, request: Request):
        ctx.check_model(body.model)
        if not ctx.recommends:
            raise ctx.unable("does not recommend items")
        if (body.history is None) == (body.user is None):
            raise APIError(400, "give one of history (item ids or data:image URLs) or user", param="history")
        history = body.history or []
        pictures = [i for i, x in enumerate(history) if x.startswith("data:")]
        ctx.check_text([x for x in history if not x.startswith("data:")] + [body.user or ""], "history")
        if len(pictures) > ctx.limits.max_images:
            raise APIError(400, f"too many images: at most {ctx.limits.max_images} per request", param="history")

        def prepare() -> list:
            budget, items = [ctx.limits.max_request_pixels], list(history)
            for i in pictures:
                try:
                    items[i] = {"image": ctx.read_image(history[i], budget, f"#{i}")}
                except GlimpseError as e:
                    raise APIError(400, str(e), param=f"history.{i}") from None
            return items

        items = await ctx.reserved(prepare)()

        def recommend(job):
            if job.cancelled.is_set():
                return None
            if body.user is not None:
                return ctx.pipeline.recommend_users([body.user], body.k)[0]
            return ctx.pipeline.recommend([items], body.k)[0]

        recs, error = await ctx.in_worker(recommend, request)
        if isinstance(error, JSONResponse):
            return error
        if error is not None:
            raise ctx.worker_error(error)
        return {"object": "list", "model": ctx.model_name,
                "data": [{"object": "recommendation", "rank": r + 1, "item": x["item"], "score": x["score"],
                          "title": x["title"], "cold": x["cold"]} for r, x in enumerate(recs)]}

    @app.post("/v1/explain")
    async def explain_answer(body: ExplainRequest, request: Request):
        ctx.check_model(body.model)
        if not ctx.explains:
            raise ctx.unable("does not explain answers")
        messages, answer = list(body.messages), None
        if messages[-1].role == "assistant":  # the answer to explain, as the chat gave it
            last = messages.pop().content
            answer = last if isinstance(last, str) else " ".join(p.text for p in last if p.type == "text")
            if not answer.strip() or not messages:
                raise APIError(400, "the assistant message to explain must be non-empty text after the user's",
                               param="messages")
        texts = [answer or ""]
        for m in messages:
            texts += [m.content] if isinstance(m.content, str) else [p.text for p in m.content if p.type == "text"]
        ctx.check_text(texts, "messages")

        def prepare():
            ids, images = ctx.build_prompt(SimpleNamespace(messages=messages))
            if len(images) != 1:
                raise APIError(400, f"an explanation needs a conversation with one image, not {len(images)}",
                               param="messages")
            return ids, images

        prompt = await ctx.reserved(prepare)()
        max_new = body.max_tokens or 64

        def run(job):
            if job.cancelled.is_set():
                return None
            e = explain(ctx.pipeline.prompt_explainer(prompt, answer, max_new), body.method)
            png = io.BytesIO()
            render(prompt[1][0], e).save(png, format="PNG")
            return e, base64.b64encode(png.getvalue()).decode()

        result, error = await ctx.in_worker(run, request)
        if isinstance(error, JSONResponse):
            return error
        if error is not None:
            raise ctx.worker_error(error)
        e, png = result
        return {"object": "explanation", "model": ctx.model_name, **e.to_dict(), "heatmap": f"data:image/png;base64,{png}"}
