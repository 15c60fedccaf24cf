"""How close glimpse's LLaVA comes to the hardware: the stage-2 training step's model FLOPs utilisation
(MFU) and batch-1 decoding's share of the memory-bandwidth bound (issue 25's GPU aims: >= 40% MFU in
bf16 at the base size, >= 70% of the bandwidth bound at batch 1).

- MFU: the FLOPs of one stage-2 step (vision frozen, projector + LM learn, AdamW; the model and batch
  of `vlm_vs_transformers.py`), counted by torch's FlopCounterMode (matmuls, convolutions and attention;
  elementwise work is not counted, as MFU conventionally leaves it out: PaLM, appendix B), over the
  median step time, divided by two peaks: the vendor's dense rate for the GPUs in `DEVICES`
  (`--peak-tflops` for others) and the best rate of a large matmul measured in this run (what the device
  attains: the kinder ratio).  On a CPU only the measured one.
- Bandwidth: batch-1 greedy decoding after the prefill.  The time a new token costs is the difference
  of a long and a short generation over the difference of their lengths, so that image encoding, the
  prefill and the CUDA graph's capture cancel out.  The bytes a token must read are every LM weight it
  multiplies by (the LM head included, the input embedding table not: one row of it is read) plus the
  KV cache up to its position (the mean over the generated positions).  Bound = bytes / bandwidth, with
  the vendor's bandwidth and with a device-to-device copy measured in this run (read + write).

    python bench/hw_efficiency.py [--size small|base] [--precision bf16|fp32] [--device cuda|cpu]
                                  [--compile] [--batch B] [--compile-decode] [--skip-train] [--peak-tflops T --bandwidth-gbs B]
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from vlm_vs_transformers import (
    SIZES,
    _median_time,
    _sync,
    batch_inputs,
    glimpse_greedy,
    glimpse_loss,
    glimpse_model,
)

# name fragment -> (dense bf16 TFLOP/s, memory GB/s), from the vendors' data sheets
DEVICES = {
    "H100 80GB HBM3": (989.4, 3350.0),  # SXM
    "H100 PCIe": (756.0, 2000.0),
    "H200": (989.4, 4800.0),
    "A100-SXM4-80GB": (312.0, 2039.0),
}


def vendor_peaks(device: torch.device) -> tuple[float | None, float | None]:
    if device.type != "cuda":
        return None, None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in DEVICES.items() if k in name), (None, None))


def matmul_tflops(device, dtype, n: int, reps: int = 10, rounds: int = 5) -> float:
    """The best of several rounds of an n x n product: what the device attains."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(rounds):
        _sync(device)
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        _sync(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t) / 1e12)
    return best


def copy_gbs(device, megabytes: int, reps: int = 10) -> float:
    """Bytes read plus written per second by a device-to-device copy, the best of `reps`."""
    x = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    best = 0.0
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        y.copy_(x)
        _sync(device)
        best = max(best, 2 * x.numel() / (time.perf_counter() - t) / 1e9)
    return best


@contextlib.contextmanager
def _gqa_expanded():
    """SDPA with grouped-query heads, its keys and values expanded to the query heads (the same FLOPs):
    FlopCounterMode of torch 2.11 rejects the grouped shapes."""
    sdpa = F.scaled_dot_product_attention

    def expanded(q, k, v, *args, enable_gqa: bool = False, **kwargs):
        if enable_gqa and k.shape[-3] != q.shape[-3]:
            k, v = (t.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3) for t in (k, v))
        return sdpa(q, k, v, *args, **kwargs)

    F.scaled_dot_product_attention = expanded
    try:
        yield
    finally:
        F.scaled_dot_product_attention = sdpa


def train_step(model, batch: dict, device, precision: str, steps: int, compile: bool) -> tuple[float, float]:
    """(FLOPs of one stage-2 step, its median seconds)."""
    model.vision.requires_grad_(False)
    # fused on a GPU: one kernel for all parameters instead of a few per tensor (glimpse's trainer does the same)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=device.type == "cuda")
    model.train()
    net = torch.compile(model) if compile else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step(m=net):
        with autocast:
            loss = glimpse_loss(m, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with _gqa_expanded(), FlopCounterMode(display=False) as counter:  # eager: the FLOPs the compiled step runs
        with autocast:
            loss = glimpse_loss(model, batch)
        loss.backward()
    opt.zero_grad(set_to_none=True)
    return counter.get_total_flops(), _median_time(step, device, steps)


def lm_bytes_per_token(lm, prompt_len: int, short: int, long: int) -> tuple[float, float]:
    """(weight bytes, mean KV-cache bytes) one decoding step reads, over positions short..long."""
    embed = lm.token_embed.weight  # the LM head's weight too when tied: then it is read whole
    weights = sum(p.numel() * p.element_size() for p in lm.parameters() if p is not embed or lm.cfg.tie_embeddings)
    c = lm.cfg
    head_dim = getattr(c, "head_dim", 0) or c.width // c.heads
    element = next(lm.parameters()).element_size()
    mean_position = prompt_len + (short + long) / 2
    return weights, 2 * c.layers * c.kv_heads * head_dim * mean_position * element


@torch.no_grad()
def decode_seconds_per_token(model, s: dict, device, precision: str, short: int, long: int,
                             reps: int, compile: bool = False) -> tuple[float, int]:
    model.eval()
    b = batch_inputs({**s, "batch": 1, "text": 32}, model.image_tokens, device)
    if precision == "bf16":
        model.to(torch.bfloat16)
        b["pixel_values"] = b["pixel_values"].to(torch.bfloat16)
    t_short = _median_time(lambda: glimpse_greedy(model, b, short, compile), device, reps, warmup=1)
    t_long = _median_time(lambda: glimpse_greedy(model, b, long, compile), device, reps, warmup=1)
    return (t_long - t_short) / (long - short), b["input_ids"].shape[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=SIZES, default="small")
    ap.add_argument("--precision", choices=["bf16", "fp32"], help="default: bf16 on a GPU, fp32 on a CPU")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, help="training batch (default: the size's)")
    ap.add_argument("--compile", action="store_true", help="time the training step under torch.compile")
    ap.add_argument("--compile-decode", action="store_true",
                    help="decode with compiled steps (GenerationConfig.compile; on CUDA inside the CUDA graph)")
    ap.add_argument("--skip-train", action="store_true", help="decoding only")
    ap.add_argument("--short", type=int, default=16, help="new tokens of the short generation")
    ap.add_argument("--long", type=int, default=144, help="new tokens of the long generation")
    ap.add_argument("--peak-tflops", type=float, help="the device's dense peak at this precision (default: DEVICES)")
    ap.add_argument("--bandwidth-gbs", type=float, help="the device's memory bandwidth (default: DEVICES)")
    a = ap.parse_args()
    device = torch.device(a.device)
    a.precision = a.precision or ("bf16" if device.type == "cuda" else "fp32")  # many CPUs lack native bf16
    s = {**SIZES[a.size], **({"batch": a.batch} if a.batch else {})}
    dtype = torch.bfloat16 if a.precision == "bf16" else torch.float32
    vendor_tflops, vendor_gbs = vendor_peaks(device)
    if a.precision == "fp32":
        vendor_tflops = None  # the table holds bf16 tensor-core rates
    peak = a.peak_tflops or vendor_tflops
    bandwidth = a.bandwidth_gbs or vendor_gbs
    big = device.type == "cuda"
    measured_tflops = matmul_tflops(device, dtype, 8192 if big else 2048)
    measured_gbs = copy_gbs(device, 2048 if big else 256)
    where = torch.cuda.get_device_name(device) if big else f"cpu, {torch.get_num_threads()} threads"
    print(f"size {a.size}, {a.precision}, {where}: matmul {measured_tflops:.2f} TFLOP/s measured"
          f"{f' ({peak:.0f} peak)' if peak else ''}; copy {measured_gbs:.0f} GB/s measured"
          f"{f' ({bandwidth:.0f} peak)' if bandwidth else ''}")

    torch.manual_seed(0)
    model = glimpse_model(s).to(device)
    if not a.skip_train:
        flops, seconds = train_step(model, batch_inputs(s, model.image_tokens, device), device, a.precision,
                                    a.steps, a.compile)
        achieved = flops / seconds / 1e12
        line = (f"stage-2 step{' (compiled)' if a.compile else ''}, batch {s['batch']}: {flops / 1e9:.1f} GFLOP in "
                f"{seconds * 1e3:.1f} ms = {achieved:.2f} TFLOP/s; MFU {achieved / measured_tflops:.1%} of the "
                "measured matmul")
        print(line + (f", {achieved / peak:.1%} of the peak" if peak else ""))

    per_token, prompt_len = decode_seconds_per_token(model, s, device, a.precision, a.short, a.long,
                                                     max(2, a.steps // 2), a.compile_decode)
    weights, kv = lm_bytes_per_token(model.lm, prompt_len, a.short, a.long)
    need = (weights + kv) / per_token / 1e9
    line = (f"batch-1 decoding{' (compiled steps)' if a.compile_decode else ''}: {per_token * 1e3:.2f} ms a token ({1 / per_token:.0f} tokens/s), "
            f"{(weights + kv) / 1e6:.1f} MB a token ({kv / 1e6:.2f} of them KV) = {need:.1f} GB/s; "
            f"{need / measured_gbs:.1%} of the measured copy")
    print(line + (f", {need / bandwidth:.1%} of the peak" if bandwidth else ""))


if __name__ == "__main__":
    main()
