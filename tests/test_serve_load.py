"""A bounded load test on loopback: 32 concurrent clients for 20 s against a live server whose
queue holds 16.  Every request must be answered (200) or refused at once (429); no 5xx, no error
of the transport, and no slot may leak."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import httpx
from conftest import LiveServer, image_data_url

import glimpse
from glimpse.serve import ServerLimits, create_app

CLIENTS, SECONDS = 32, 20.0


async def client(url: str, images: list[str], k: int, statuses: Counter, deadline: float) -> None:
    questions = ["describe the image.", "what color is the shape?", "what shape is it?", "is it big?"]
    async with httpx.AsyncClient(timeout=60) as http:
        i = 0
        while time.monotonic() < deadline:
            i += 1
            body = {"model": "m", "max_tokens": 4 + (k + i) % 8, "temperature": 0 if (k + i) % 3 else 0.8,
                    "messages": [{"role": "user", "content": [
                        {"type": "image_url", "image_url": {"url": images[(k + i) % len(images)]}},
                        {"type": "text", "text": questions[(k * 7 + i) % len(questions)]}]}]}
            if (k + i) % 4 == 0:  # a quarter of the requests stream
                async with http.stream("POST", url, json={**body, "stream": True}) as r:
                    text = "".join([line async for line in r.aiter_lines()])
                    statuses[r.status_code] += 1
                    assert r.status_code != 200 or text.endswith("data: [DONE]")
            else:
                r = await http.post(url, json=body)
                statuses[r.status_code] += 1
                if r.status_code == 200:
                    assert r.json()["choices"][0]["message"]["content"] is not None
            if r.status_code == 429:
                assert r.headers["retry-after"]
                await asyncio.sleep(0.05)


def test_32_clients_for_20_seconds(tiny_vlm_run, world):
    images = [image_data_url(p) for p in sorted((world / "images" / "test").glob("*.png"))[:8]]
    app = create_app(glimpse.load(tiny_vlm_run), "m", ServerLimits(max_batch=8, max_pending=16))
    statuses: Counter = Counter()
    with LiveServer(app) as s:
        deadline = time.monotonic() + SECONDS

        async def main():
            await asyncio.gather(*(client(s.url + "/v1/chat/completions", images, k, statuses, deadline)
                                   for k in range(CLIENTS)))

        asyncio.run(main())
        health = httpx.get(s.url + "/health").json()
    assert set(statuses) <= {200, 429}, statuses
    assert statuses[200] >= CLIENTS and statuses[429] > 0, statuses  # served, and the bound held
    assert health["pending"] == 0  # every slot came back
    assert health["rows"] / health["batches"] > 1.5  # requests were decoded together
    print(f"load: {dict(statuses)} in {SECONDS:.0f} s; {health['batches']} batches, {health['rows']} rows")
