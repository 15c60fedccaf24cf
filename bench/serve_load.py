"""Serving throughput and latency: the batching server vs a one-request-at-a-time server.

Starts `glimpse serve RUN` twice in subprocesses on loopback, in one run and on the same model:
batched (continuous batching, --max-batch 32 rows by default, as the server) and one-at-a-time (--max-batch 1:
requests wait their turn).  For 1, 8 and 32 closed-loop clients (each sends its next request when its
answer arrives), for --seconds each, it measures requests/s and p50 / p95 latency of greedy VQA-style
chat requests on the world's test images, and prints the batched/baseline ratios.

    python bench/serve_load.py [RUN] [--seconds 15] [--max-tokens 16]

RUN defaults to the demo's LLaVA model (runs/demo/shapes-llava-stage2, made by `glimpse demo`).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

QUESTIONS = ["what color is the shape?", "what shape is it?", "how many shapes are there?",
             "describe the image.", "is the shape large?", "where is the shape?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: str, max_batch: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "glimpse", "serve", run, "--port", str(port),
                             "--max-batch", str(max_batch), "--max-pending", "256", "--model-name", "m"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the server did not start: {proc.stderr.read().decode()[-2000:]}")


async def load(url: str, clients: int, seconds: float, images: list[str], max_tokens: int) -> dict:
    latencies, errors = [], 0
    deadline = time.monotonic() + seconds

    async def client(k: int):
        nonlocal errors
        async with httpx.AsyncClient(timeout=120) as http:
            i = k
            while time.monotonic() < deadline:
                i += clients
                body = {"model": "m", "max_tokens": max_tokens, "temperature": 0, "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": images[i % len(images)]}},
                    {"type": "text", "text": QUESTIONS[i % len(QUESTIONS)]}]}]}
                t0 = time.perf_counter()
                r = await http.post(url + "/v1/chat/completions", json=body)
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(clients)))
    wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else latencies * 19
    return {"rps": len(latencies) / wall, "p50": statistics.median(latencies), "p95": q[18],
            "n": len(latencies), "errors": errors}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", nargs="?", default="runs/demo/shapes-llava-stage2")
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--clients", default="1,8,32")
    a = ap.parse_args()
    if not (Path(a.run) / "recipe.yaml").is_file():
        raise SystemExit(f"no run at {a.run}: run `glimpse demo` first, or name a vlm run")
    from glimpse.config import recipe_from_dict
    from glimpse.data.world import ensure_shapes

    data = recipe_from_dict(yaml.safe_load((Path(a.run) / "recipe.yaml").read_text())).data
    root = Path(data.root) if data.root else ensure_shapes(data, progress=False)  # the run's own world
    paths = sorted((root / "images" / "test").glob("*.png"))[:32]
    if not paths:
        raise SystemExit(f"no test images under {root}/images/test")
    images = ["data:image/png;base64," + base64.b64encode(p.read_bytes()).decode() for p in paths]
    levels = [int(c) for c in a.clients.split(",")]
    results = {}
    for name, batch in [("batched", a.max_batch), ("one-at-a-time", 1)]:
        proc, url = start_server(a.run, batch)
        try:
            asyncio.run(load(url, 1, 2.0, images, a.max_tokens))  # warm up
            for c in levels:
                results[(name, c)] = r = asyncio.run(load(url, c, a.seconds, images, a.max_tokens))
                print(f"{name:>14} clients={c:<3} {r['rps']:7.2f} req/s  p50 {r['p50'] * 1000:7.1f} ms  "
                      f"p95 {r['p95'] * 1000:7.1f} ms  ({r['n']} answered, {r['errors']} errors)", flush=True)
        finally:
            proc.terminate()
            proc.wait(30)
    print(f"\nrun {a.run}, max_tokens {a.max_tokens}, greedy, {a.seconds:.0f} s per level, "
          f"{os.cpu_count()} CPUs visible")
    print("| clients | batched req/s | one-at-a-time req/s | req/s ratio | batched p50 / p95 ms | "
          "one-at-a-time p50 / p95 ms |")
    print("|---|---|---|---|---|---|")
    for c in levels:
        b, o = results[("batched", c)], results[("one-at-a-time", c)]
        print(f"| {c} | {b['rps']:.2f} | {o['rps']:.2f} | {b['rps'] / o['rps']:.2f}x | "
              f"{b['p50'] * 1000:.0f} / {b['p95'] * 1000:.0f} | {o['p50'] * 1000:.0f} / {o['p95'] * 1000:.0f} |")
    print(json.dumps({f"{k[0]}/{k[1]}": v for k, v in results.items()}))


if __name__ == "__main__":
    main()
