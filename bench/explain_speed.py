"""Explanation time per 64-px image, per method, for trained runs (a dual encoder, a fusion encoder, a LLaVA):
the whole `explain(explainer, method)` call on a ready explainer (one forward in explain mode, the backward
of the gradient methods, the relevance equations; occlusion's batch of painted-over images), beside the
plain forward that computes the same score (`explainer.score`, the fast SDPA path).

    python bench/explain_speed.py RUN [RUN ...] [--images 20] [--threads 2]

Prints the median and p95 in milliseconds and the ratio to the fast forward, and the machine's fp32
matmul rate (compare times only within one run of this script).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import glimpse
from glimpse.explain import METHODS, explain
from glimpse.explain.evaluate import explain_cases
from glimpse.hardware import matmul_gflops


def timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(1000 * (time.perf_counter() - t))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--world", required=True, help="a shapes world (64 px) whose test scenes are explained")
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"fp32 matmul {matmul_gflops():.0f} GFLOP/s, {a.threads} threads")
    for run in a.runs:
        pipe = glimpse.load(run)
        cases = explain_cases(a.world, "test", n=a.images, asks=pipe.explains)
        explainers = [pipe.explainer(c.image, c.text) if pipe.explains == "texts"
                      else pipe.explainer(c.image, question=c.text) for c in cases]
        print(f"\n{run} ({len(explainers)} images)")
        forward = [t for ex in explainers for t in timed(lambda ex=ex: ex.score(ex.pixels), 3)[1:]]
        base = float(np.median(forward))
        print(f"  {'forward (fast path)':<22} median {base:7.1f} ms")
        for method in METHODS:
            explain(explainers[0], method)  # warm-up
            ms = [t for ex in explainers for t in timed(lambda ex=ex, method=method: explain(ex, method), 1)]
            med = float(np.median(ms))
            print(f"  {method:<22} median {med:7.1f} ms   p95 {np.percentile(ms, 95):7.1f} ms   "
                  f"{med / base:5.1f}x the forward")


if __name__ == "__main__":
    main()
