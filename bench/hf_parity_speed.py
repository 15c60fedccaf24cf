"""Loaded Hugging Face checkpoints: glimpse's parts vs transformers' own classes, same weights.

A random transformers `CLIPVisionModel` and `LlamaForCausalLM` are saved with save_pretrained and
loaded back by glimpse's production path (glimpse.hub); outputs are checked equal, then timed in one
run, in fp32 and in bf16 (both sides cast):

- image features/s: glimpse ImageEncoder.get_image_features vs CLIPVisionModel(...).pooler_output;
- forward tokens/s: glimpse CausalLM logits vs LlamaForCausalLM(...).logits (one batch, no cache).

    python bench/hf_parity_speed.py [--size small|base] [--device cpu|cuda] [--iters N]

Prints each figure (median of rounds) and the ratio glimpse / transformers (the median of the
per-round ratios; glimpse and transformers alternate round by round).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from glimpse.families import load_hf

SIZES = {
    "tiny": dict(image=32, patch=8, v_width=64, v_layers=2, v_heads=2, images=4,
                 width=64, layers=2, heads=4, kv=2, inter=128, vocab=512, batch=2, seq=16),
    # CPU-sized: a ViT-S/8 at 64 px and a ~25M-parameter Llama (SmolLM-ish shape, narrower)
    "small": dict(image=64, patch=8, v_width=384, v_layers=6, v_heads=6, images=32,
                  width=384, layers=6, heads=6, kv=2, inter=1024, vocab=8192, batch=4, seq=128),
    # GPU-sized: CLIP ViT-B/16 at 224 px and a TinyLlama-1.1B-shaped LM
    "base": dict(image=224, patch=16, v_width=768, v_layers=12, v_heads=12, images=64,
                 width=2048, layers=22, heads=32, kv=4, inter=5632, vocab=32000, batch=8, seq=512),
}


def paired(ours, theirs, iters: int, sync) -> tuple[float, float, float]:
    """Median seconds per call of each, and the median of the per-round ratios theirs / ours.
    The two run alternately, round after round, so that a busy (shared) machine slows both alike."""
    for _ in range(2):
        ours(), theirs()
    sync()
    a, b = [], []
    for _ in range(iters):
        for fn, out in ((ours, a), (theirs, b)):
            t = time.perf_counter()
            fn()
            sync()
            out.append(time.perf_counter() - t)
    return statistics.median(a), statistics.median(b), statistics.median(y / x for x, y in zip(a, b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=list(SIZES), default="small")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--iters", type=int, default=5)
    a = ap.parse_args()
    import transformers as T

    s, dev = SIZES[a.size], torch.device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    vision = T.CLIPVisionModel(T.CLIPVisionConfig(
        hidden_size=s["v_width"], intermediate_size=4 * s["v_width"], num_hidden_layers=s["v_layers"],
        num_attention_heads=s["v_heads"], image_size=s["image"], patch_size=s["patch"])).eval()
    lm = T.LlamaForCausalLM(T.LlamaConfig(
        vocab_size=s["vocab"], hidden_size=s["width"], intermediate_size=s["inter"], num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"], num_key_value_heads=s["kv"], max_position_embeddings=4096,
        tie_word_embeddings=False)).eval()
    pixels = torch.randn(s["images"], 3, s["image"], s["image"], device=dev)
    ids = torch.randint(0, s["vocab"], (s["batch"], s["seq"]), device=dev)
    print(f"device {dev} ({torch.get_num_threads()} threads), size {a.size}: CLIP ViT {s['v_width']}x{s['v_layers']} "
          f"at {s['image']} px, batch {s['images']}; Llama {s['width']}x{s['layers']} (GQA {s['heads']}/{s['kv']}), "
          f"batch {s['batch']} x {s['seq']} tokens; transformers {T.__version__}, torch {torch.__version__}")
    print(f"{'':34}{'glimpse':>12}{'transformers':>14}{'ratio':>8}")
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        vision.save_pretrained(f"{tmp}/vision")
        lm.save_pretrained(f"{tmp}/lm")
        for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            g_vis = load_hf(f"{tmp}/vision", dtype=dtype, device=a.device).model
            g_lm = load_hf(f"{tmp}/lm", dtype=dtype, device=a.device).model
            h_vis, h_lm = vision.to(dev, dtype), lm.to(dev, dtype)
            px = pixels.to(dtype)
            tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.1, rtol=0.1)
            torch.testing.assert_close(g_vis.get_image_features(px), h_vis(pixel_values=px).pooler_output, **tol)
            if dtype == torch.float32:
                torch.testing.assert_close(g_lm(ids), h_lm(input_ids=ids).logits, **tol)
            tg, th, r = paired(lambda g=g_vis, x=px: g.get_image_features(x),
                               lambda h=h_vis, x=px: h(pixel_values=x).pooler_output, a.iters, sync)
            n = s["images"]
            print(f"{'image features/s, ' + name:34}{n / tg:12.1f}{n / th:14.1f}{r:7.2f}x")
            tg, th, r = paired(lambda g=g_lm: g(ids), lambda h=h_lm: h(input_ids=ids).logits, a.iters, sync)
            n = s["batch"] * s["seq"]
            print(f"{'LM forward tokens/s, ' + name:34}{n / tg:12.1f}{n / th:14.1f}{r:7.2f}x")

if __name__ == "__main__":
    main()
