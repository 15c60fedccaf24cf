"""Load on loopback, counted, not timed.  32 concurrent clients against a server whose queue holds 16 while
its worker is held: exactly the free slots are admitted, every other request is refused at once with a
429, then the admitted ones are answered in shared batches, the refused ones on their retry, and no slot
leaks.  And the memory bound: 32 clients each sending the largest request the limits allow leave the
server's resident memory under 1.5 GB."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
from collections import Counter
from pathlib import Path

import httpx
from conftest import LiveServer, image_data_url, serve_process
from PIL import Image
from test_serve import Blocker, wait_for

import glimpse
from glimpse.serve import ServerLimits, create_app

CLIENTS, PENDING = 32, 16
QUESTIONS = ["describe the image.", "what color is the shape?", "what shape is it?", "is it big?"]


def body(images: list[str], k: int) -> dict:
    return {"model": "m", "max_tokens": 4 + k % 5, "temperature": 0, "stream": k % 4 == 0,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": images[k % len(images)]}},
                                                      {"type": "text", "text": QUESTIONS[k % len(QUESTIONS)]}]}]}


async def request(http: httpx.AsyncClient, url: str, payload: dict, refused: list | None = None) -> int:
    if payload["stream"]:
        async with http.stream("POST", url, json=payload) as r:
            if r.status_code == 429 and refused is not None:
                refused.append(1)
            text = "".join([line async for line in r.aiter_lines()])
            assert r.status_code != 200 or text.endswith("data: [DONE]")
            return r.status_code
    r = await http.post(url, json=payload)
    if r.status_code == 429 and refused is not None:
        refused.append(1)
    if r.status_code == 200:
        assert r.json()["choices"][0]["message"]["content"] is not None
    elif r.status_code == 429:
        assert r.headers["retry-after"]
    return r.status_code


def test_32_clients_against_a_queue_of_16(tiny_vlm_run, world):
    images = [image_data_url(p) for p in sorted((world / "images" / "test").glob("*.png"))[:8]]
    app = create_app(glimpse.load(tiny_vlm_run), "m", ServerLimits(max_batch=8, max_pending=PENDING))
    engine = app.state.engine
    statuses: Counter = Counter()
    with LiveServer(app) as s:
        url = s.url + "/v1/chat/completions"

        async def round_(ks, refused=None):
            async with httpx.AsyncClient(timeout=120) as http:
                return await asyncio.gather(*(request(http, url, body(images, k), refused) for k in ks))

        blocker = Blocker(engine)
        blocker.__enter__()  # the worker is held: admitted requests wait
        first: list[int] = []
        refused_now: list[int] = []
        runner = threading.Thread(target=lambda: first.extend(asyncio.run(round_(range(CLIENTS), refused_now))))
        runner.start()
        # every request has arrived: PENDING - 1 admitted and queued (the blocker holds a slot), the rest refused
        wait_for(lambda: len(engine._waiting) == PENDING - 1 and len(refused_now) == CLIENTS - PENDING + 1,
                 timeout=120)
        blocker.__exit__()
        runner.join()
        statuses.update(first)
        assert statuses == Counter({200: PENDING - 1, 429: CLIENTS - PENDING + 1}), statuses
        refused = [k for k, code in zip(range(CLIENTS), first) if code == 429]

        async def until_served(http, k):  # a client that was told to retry, retrying
            while (code := await request(http, url, body(images, k))) == 429:
                await asyncio.sleep(0.05)
            return code

        async def retry_all():
            async with httpx.AsyncClient(timeout=120) as http:
                return await asyncio.gather(*(until_served(http, k) for k in refused))

        assert set(asyncio.run(retry_all())) == {200}  # the worker is free now: every one is served
        health = httpx.get(s.url + "/health").json()
    assert health["pending"] == 0 and health["cancelled"] == 0  # every slot came back, nothing was dropped
    # the 15 that waited together were decoded in shared batches of up to 8 rows, not one by one
    assert health["batches"] < health["rows"]


def bitmap_url(side: int) -> str:
    buf = io.BytesIO()
    Image.new("1", (side, side), 1).save(buf, "PNG")  # a few KB on the wire, side x side x 3 bytes decoded
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def resident_peak(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_resident_memory_stays_bounded_under_the_largest_requests(tiny_vlm_run, cli_env):
    # the largest request the default limits allow: 8 images, 32M decoded pixels in all (4M each: two of
    # 16M would be as many), the most text, max_tokens within the context
    image = bitmap_url(2000)
    content = [{"type": "image_url", "image_url": {"url": image}}] * 8 + [{"type": "text", "text": "a " * 40}]
    payload = {"model": "vlm", "max_tokens": 8, "messages": [{"role": "user", "content": content}]}
    proc, url = serve_process([str(tiny_vlm_run), "--max-pending", str(CLIENTS)], cli_env)
    try:
        async def all_at_once():
            async with httpx.AsyncClient(timeout=600) as http:
                return await asyncio.gather(*(http.post(url + "/v1/chat/completions", json=payload)
                                              for _ in range(CLIENTS)))

        replies = asyncio.run(all_at_once())
        codes = Counter(r.status_code for r in replies)
        peak = resident_peak(proc.pid)
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    assert set(codes) <= {200, 400}, codes  # answered, or refused for its context; never a 5xx
    print(f"server resident peak: {peak / 2**30:.2f} GiB under {CLIENTS} clients; {dict(codes)}")
    assert peak < 1.5 * 2**30
