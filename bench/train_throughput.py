"""Dual-encoder training-step throughput as a fraction of this machine's matmul rate.

Measures, in one run and at the same precision, (a) the achieved GFLOP/s of a full CLIP
training step (forward, backward, AdamW; median step time) at a fixed config, counting FLOPs
with torch's FlopCounterMode, and (b) the best GFLOP/s of a plain torch.matmul of a large
square product over several rounds.
Prints the ratio for fp32 and for bf16 autocast, each first with glibc's malloc as it comes, then as
`glimpse train` runs on CPU, with malloc keeping freed blocks (glimpse.hardware.keep_freed_cpu_memory;
it cannot be undone in a process, hence the order).

    python bench/train_throughput.py [--steps 10] [--batch 128] [--compile] [--act gelu gelu_tanh]
        [--precision fp32] [--malloc default keep]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from glimpse.families.dual_encoder.model import DualEncoder, DualEncoderConfig
from glimpse.hardware import keep_freed_cpu_memory
from glimpse.losses import clip_loss
from glimpse.models.text import TextConfig
from glimpse.models.vision import VisionConfig


# the fixed config: a ViT-S-sized pair of towers with glimpse's default (erf) GELU.  On torch 2.13's CPU
# kernels the erf GELU runs at the speed of a copy while the tanh approximation is about 1.6x slower
# forward and backward (SigLIP's; `--act gelu_tanh`), about 4% of an fp32 step at this size
# (bench/RESULTS.md, 2026-11-28).
def config(act: str = "gelu") -> DualEncoderConfig:
    return DualEncoderConfig(
        vision=VisionConfig(image_size=64, patch_size=8, width=384, layers=6, heads=6, act=act),
        text=TextConfig(vocab_size=1024, context_length=32, width=384, layers=4, heads=6, act=act),
        embed_dim=256,
    )


def matmul_gflops(dtype: torch.dtype, n: int = 2048, reps: int = 5, rounds: int = 5) -> float:
    """The best of several rounds: the machine's attainable rate, so the ratio errs low, not high."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t) / 1e9)
    return best


def train_step_gflops(precision: str, batch: int, steps: int, compile: bool = False,
                      cfg: DualEncoderConfig | None = None) -> tuple[float, float]:
    cfg = cfg or config()
    torch.manual_seed(0)
    model = DualEncoder(cfg)
    net = torch.compile(model) if compile else model  # as train.compile: the same parameters
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    pixels = torch.randn(batch, 3, 64, 64)
    ids = torch.randint(0, 1024, (batch, cfg.text.context_length))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

    def step(m=net):
        opt.zero_grad(set_to_none=True)
        with autocast:
            out = m(pixels, ids)
            loss = clip_loss(out["image_embeds"], out["text_embeds"], out["logit_scale"])
        loss.backward()
        opt.step()

    with FlopCounterMode(display=False) as counter:  # counted on the eager model: the same FLOPs
        step(model)
    flops = counter.get_total_flops()
    for _ in range(3 if compile else 2):  # the first compiled steps compile
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    dt = statistics.median(times)
    return flops / dt / 1e9, batch / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--compile", action="store_true", help="also time the fp32 step under torch.compile")
    ap.add_argument("--act", nargs="+", default=["gelu"], choices=["gelu", "gelu_tanh", "quick_gelu"],
                    help="the towers' activation; several: one fp32 row each, in the same run")
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--malloc", nargs="+", default=["default", "keep"], choices=["default", "keep"],
                    help="glibc malloc as it comes, then keeping freed blocks (as glimpse train does on CPU)")
    a = ap.parse_args()
    cfg = config(a.act[0])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; config: ViT {cfg.vision.width}x"
          f"{cfg.vision.layers} on 64px/8, text {cfg.text.width}x{cfg.text.layers}, batch {a.batch}")
    print(f"{'precision':<30}{'step GFLOP/s':>14}{'samples/s':>11}{'matmul GFLOP/s':>16}{'ratio':>8}")
    for malloc in sorted(set(a.malloc), key=["default", "keep"].index):
        if malloc == "keep" and not keep_freed_cpu_memory():
            print("malloc keep: not available here (not Linux with glibc)")
            break
        for precision in a.precision:
            ref = matmul_gflops(torch.float32 if precision == "fp32" else torch.bfloat16)
            rows = [(f"{precision} {act}", dict(cfg=config(act)))
                    for act in (a.act if precision == "fp32" else a.act[:1])]
            if a.compile and precision == "fp32":
                rows.append((f"compiled {a.act[0]}", dict(cfg=cfg, compile=True)))
            for name, kw in rows:
                achieved, sps = train_step_gflops(precision, a.batch, a.steps, **kw)
                print(f"{name + ', malloc ' + malloc:<30}{achieved:>14.1f}{sps:>11.1f}{ref:>16.1f}"
                      f"{achieved / ref:>8.2f}")

if __name__ == "__main__":
    main()
