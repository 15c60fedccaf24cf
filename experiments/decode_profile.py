"""Where batch-1 decoding's time goes on a GPU: the kernels of a greedy generation of the base LLaVA's LM
(CUDA graphs, bf16), by total CUDA time, against the wall time of the same generation.  If the
kernels' sum is close to the wall time, the GPU is busy and the kernels themselves (GEMVs below the
copy rate) are what to speed up; if far below, the gaps between them are (bench/RESULTS.md).

    python experiments/decode_profile.py [--size base] [--new-tokens 64]
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from vlm_vs_transformers import SIZES, batch_inputs, glimpse_greedy, glimpse_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=SIZES, default="base")
    ap.add_argument("--new-tokens", type=int, default=64)
    a = ap.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    model = glimpse_model(SIZES[a.size]).to(device).eval()
    b = batch_inputs({**SIZES[a.size], "batch": 1, "text": 32}, model.image_tokens, device)
    if cuda:
        model.to(torch.bfloat16)
        b["pixel_values"] = b["pixel_values"].to(torch.bfloat16)
    with torch.no_grad():
        glimpse_greedy(model, b, a.new_tokens)  # warm up: kernels chosen, graph captured once
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        glimpse_greedy(model, b, a.new_tokens)
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            glimpse_greedy(model, b, a.new_tokens)
            if cuda:
                torch.cuda.synchronize()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, key, 0) > 0]
    total = sum(getattr(e, key) for e in events
                if not cuda or getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA)
    print(f"{a.size}, {a.new_tokens} new tokens: wall {wall * 1e3:.1f} ms; kernels {total / 1e3:.1f} ms "
          f"({total / 1e6 / wall:.0%} of the wall time)")
    print(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=60))


if __name__ == "__main__":
    main()
