"""Where bench/train_throughput.py's fp32 step loses against the machine's matmul rate.

Two views in one run: (1) torch.profiler over a few eager steps of the benchmark's config, its ops grouped
by self CPU time; (2) each of the step's GEMM shapes timed alone (forward, input gradient, weight
gradient) and the attention's batched products, as GFLOP/s beside the 2048^3 matmul rate.  If the
step's own shapes run below that rate, the step cannot reach it either, whatever the rest costs.

    python experiments/train_step_profile.py [--batch 128] [--steps 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from train_throughput import config, matmul_gflops  # noqa: E402

from glimpse.families.dual_encoder.model import DualEncoder  # noqa: E402
from glimpse.losses import clip_loss  # noqa: E402


def rate(fn, flops: float, reps: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return flops / best / 1e9


def gemm_rates(batch: int) -> list[tuple[str, float, float]]:
    """(name, GFLOP/s, share of the step's GEMM FLOPs) for the linear layers' three products each."""
    cfg = config()
    v, t = cfg.vision, cfg.text
    rows_v, rows_t = batch * ((v.image_size // v.patch_size) ** 2 + 1), batch * t.context_length
    w = v.width
    layers = [("qkv", 3 * w, w), ("out", w, w), ("mlp up", 4 * w, w), ("mlp down", w, 4 * w)]
    total = sum(2 * m * n * k * 3 * (v.layers if m == rows_v else t.layers)
                for m in (rows_v, rows_t) for _, n, k in layers)
    out = []
    for tower, m, depth in (("vision", rows_v, v.layers), ("text", rows_t, t.layers)):
        for name, n, k in layers:
            x, wt, dy = torch.randn(m, k), torch.randn(n, k), torch.randn(m, n)
            flops = 2 * m * n * k
            share = flops * depth / total
            out.append((f"{tower} {name} fwd  [{m}x{k}]x[{k}x{n}]", rate(lambda x=x, wt=wt: F.linear(x, wt), flops), share))
            out.append((f"{tower} {name} dX   [{m}x{n}]x[{n}x{k}]", rate(lambda dy=dy, wt=wt: dy @ wt, flops), share))
            out.append((f"{tower} {name} dW   [{n}x{m}]x[{m}x{k}]", rate(lambda dy=dy, x=x: dy.t() @ x, flops), share))
    heads, seq, hd = v.heads, rows_v // batch, v.width // v.heads
    q, k_ = torch.randn(batch * heads, seq, hd), torch.randn(batch * heads, seq, hd)
    out.append((f"vision attention scores bmm [{batch * heads}x{seq}x{hd}]", rate(
        lambda: q @ k_.transpose(1, 2), 2 * batch * heads * seq * seq * hd), 0.0))
    qh = torch.randn(batch, heads, seq, hd)
    out.append((f"vision SDPA forward [{batch},{heads},{seq},{hd}]", rate(
        lambda: F.scaled_dot_product_attention(qh, qh, qh), 4 * batch * heads * seq * seq * hd), 0.0))
    return out


def profile_step(batch: int, steps: int) -> None:
    torch.manual_seed(0)
    model = DualEncoder(config())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    pixels, ids = torch.randn(batch, 3, 64, 64), torch.randint(0, 1024, (batch, 32))

    def step():
        opt.zero_grad(set_to_none=True)
        out = model(pixels, ids)
        clip_loss(out["image_embeds"], out["text_embeds"], out["logit_scale"]).backward()
        opt.step()

    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    groups = defaultdict(float)
    for e in events:
        groups[e.key] += e.self_cpu_time_total
    print(f"\n{steps} eager steps, {total / 1e3 / steps:.0f} ms a step of self CPU time (both threads' ops, "
          "not wall time); ops over 1%:")
    for key, us in sorted(groups.items(), key=lambda kv: -kv[1]):
        if us / total >= 0.01:
            print(f"  {key:<44}{us / 1e3 / steps:>9.1f} ms {100 * us / total:>6.1f}%")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args()
    ref = matmul_gflops(torch.float32)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; fp32 matmul 2048^3: {ref:.1f} GFLOP/s")
    print(f"{'product':<58}{'GFLOP/s':>9}{'of rate':>9}{'share':>7}")
    weighted = 0.0
    for name, gflops, share in gemm_rates(a.batch):
        weighted += share / gflops if share else 0.0
        print(f"{name:<58}{gflops:>9.1f}{gflops / ref:>9.2f}{share:>7.1%}" if share else
              f"{name:<58}{gflops:>9.1f}{gflops / ref:>9.2f}")
    print(f"the linear layers' products together (FLOP-weighted harmonic mean): {1 / weighted:.1f} GFLOP/s, "
          f"{1 / weighted / ref:.2f} of the rate")
    profile_step(a.batch, a.steps)
    print(f"fp32 matmul 2048^3 after: {matmul_gflops(torch.float32):.1f} GFLOP/s")


if __name__ == "__main__":
    main()
