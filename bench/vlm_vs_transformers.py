"""LLaVA-style model: glimpse vs transformers' LlavaForConditionalGeneration, same architecture and sizes.

Both models are built from one description (a CLIP vision tower with a class token, LLaVA's
penultimate-layer patch features, an mlp2x_gelu projector, a Llama LM with grouped-query
attention), with random weights: speed does not depend on their values.  Measured in one run:

- training: samples/s of a LLaVA stage-2 step (vision frozen; projector + LM learn; AdamW),
  loss on the answer tokens only, as LLaVA's data gives it;
- decoding: greedy tokens/s at batch 1 and 16, the same prompt (image + text) and the same
  number of new tokens (EOS ignored); image encoding and prefill included for both.  On a CPU,
  glimpse decodes on oneDNN-packed weights (glimpse/infer/packed_linear.py); the "F.linear weights"
  rows are the same model without them.  `--compile-decode` adds glimpse with each decode step
  compiled (`GenerationConfig.compile`, CPU only; infer/static_decode.py), its one-time compile
  printed apart and left out of the tokens/s, against transformers' default (eager) `generate`.
- `--roofline`: each batch-1 decode step (the time for 33 new tokens less that for 1, over 32, so image
  encoding and prefill fall out) against the memory roof: the bytes a step reads (the LM's weights but
  its input embedding, whose one row a step reads, plus the KV cache) over the machine's read bandwidth
  (`glimpse.hardware.memory_read_gbps`), the figure issue 25 asks of a GPU (>= 70%), here for any device.

    python bench/vlm_vs_transformers.py [--size small|base] [--precision fp32|bf16] [--device cpu|cuda] [--roofline]

Prints each figure and the ratio glimpse / transformers.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from glimpse.families.vlm.model import VisionLanguageModel, VLMConfig
from glimpse.hardware import memory_read_gbps
from glimpse.infer.generate import GenerationConfig, generate
from glimpse.losses import lm_loss_at_targets
from glimpse.models.decoder import DecoderConfig
from glimpse.models.vision import VisionConfig

IMAGE_TOKEN = 3
SIZES = {
    "tiny": dict(image=32, patch=8, v_width=64, v_layers=2, v_heads=2, width=64, layers=2, heads=4, kv=2,
                 vocab=512, batch=4, text=24, answer=8),  # the test suite's smoke run
    # CPU-sized: a ViT-S/8 at 64 px (64 image tokens) and a ~110M-parameter Llama
    "small": dict(image=64, patch=8, v_width=384, v_layers=6, v_heads=6, width=768, layers=8, heads=12, kv=4,
                  vocab=32000, batch=8, text=96, answer=32),
    # GPU-sized: CLIP ViT-B/16 at 224 px (196 image tokens) and a TinyLlama-1.1B-shaped LM
    "base": dict(image=224, patch=16, v_width=768, v_layers=12, v_heads=12, width=2048, layers=22, heads=32, kv=4,
                 vocab=32000, batch=16, text=128, answer=48),
}


def glimpse_model(s: dict) -> VisionLanguageModel:
    cfg = VLMConfig(
        vision=VisionConfig(image_size=s["image"], patch_size=s["patch"], width=s["v_width"], layers=s["v_layers"],
                            heads=s["v_heads"], act="quick_gelu", class_token=True, pre_norm=True, pool="cls"),
        lm=DecoderConfig(arch="llama", vocab_size=s["vocab"], width=s["width"], layers=s["layers"],
                         heads=s["heads"], kv_heads=s["kv"], context_length=4096, tie_embeddings=False),
        connector="mlp2x_gelu", vision_feature_layer=-2, vision_feature_select="patch", image_token_id=IMAGE_TOKEN)
    return VisionLanguageModel(cfg)


def hf_model(m: VisionLanguageModel):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    v, lm = m.cfg.vision, m.lm.cfg
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=v.width, intermediate_size=int(v.width * v.mlp_ratio),
                                       num_hidden_layers=v.layers, num_attention_heads=v.heads,
                                       image_size=v.image_size, patch_size=v.patch_size, hidden_act="quick_gelu"),
        text_config=LlamaConfig(vocab_size=lm.vocab_size, hidden_size=lm.width, intermediate_size=lm.mlp_hidden,
                                num_hidden_layers=lm.layers, num_attention_heads=lm.heads,
                                num_key_value_heads=lm.kv_heads, max_position_embeddings=4096,
                                tie_word_embeddings=False),
        image_token_index=IMAGE_TOKEN, image_seq_length=m.image_tokens, projector_hidden_act="gelu",
        vision_feature_layer=-2, vision_feature_select_strategy="default")
    config._attn_implementation = "sdpa"
    model = LlavaForConditionalGeneration(config)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def batch_inputs(s: dict, image_tokens: int, device) -> dict:
    g = torch.Generator().manual_seed(0)
    B, T = s["batch"], s["text"]
    text = torch.randint(10, s["vocab"], (B, T), generator=g)
    ids = torch.cat([text[:, :1], torch.full((B, image_tokens), IMAGE_TOKEN), text[:, 1:]], 1)
    labels = torch.full_like(ids, -100)
    labels[:, -s["answer"]:] = ids[:, -s["answer"]:]  # the answer: the last tokens of each sample
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": labels.to(device),
            "pixel_values": torch.randn(B, 3, s["image"], s["image"], generator=g).to(device)}


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median_time(fn, device, steps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def train_samples_per_s(model, loss_fn, batch: dict, device, precision: str, steps: int, compile: bool = False) -> float:
    vision = model.vision if hasattr(model, "vision") else model.model.vision_tower
    vision.requires_grad_(False)  # LLaVA stage 2
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    model.train()
    net = torch.compile(model) if compile else model

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = loss_fn(net, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return batch["input_ids"].shape[0] / _median_time(step, device, steps)


def glimpse_loss(model, b):
    hidden = model(b["input_ids"], b["attention_mask"], b["pixel_values"], return_hidden=True)
    return lm_loss_at_targets(hidden, model.lm.lm_head, b["labels"])


def hf_loss(model, b):
    return model(**b).loss


def decode_runner(model, kind: str, s: dict, batch: int, new_tokens: int, device, precision: str,
                  compile: bool = False):
    """A function that decodes `new_tokens` greedily for a batch of `batch` prompts (image + text)."""
    model.eval()
    b = batch_inputs({**s, "batch": batch, "text": 32}, glimpse_image_tokens(s), device)
    if precision == "bf16":  # inference runs on bf16 weights (training used autocast on fp32 ones)
        model.to(torch.bfloat16)
        b["pixel_values"] = b["pixel_values"].to(torch.bfloat16)

    @torch.no_grad()
    def run():
        if kind == "glimpse":
            glimpse_greedy(model, b, new_tokens, compile=compile)
        else:
            out = model.generate(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                 pixel_values=b["pixel_values"], max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False)
            assert out.shape[1] == b["input_ids"].shape[1] + new_tokens

    if compile:  # the first run compiles the prefill and the step for this batch's shapes: timed apart
        t = time.perf_counter()
        run()
        print(f"  compiling glimpse's prefill and decode step, batch {batch}: {time.perf_counter() - t:.0f} s")
    return run


def decode_tokens_per_s(runners: dict, batch: int, new_tokens: int, device, reps: int) -> dict:
    """Greedy tokens/s of each runner (`decode_runner`), timed in turns (one run of each, `reps` times;
    the median of each), so that a machine whose speed drifts during the benchmark (memory bandwidth
    shared with neighbours) slows every contender alike."""
    times = {name: [] for name in runners}
    for run in runners.values():
        run()  # warm-up
    for _ in range(reps):
        for name, run in runners.items():
            _sync(device)
            t = time.perf_counter()
            run()
            _sync(device)
            times[name].append(time.perf_counter() - t)
    return {name: batch * new_tokens / statistics.median(t) for name, t in times.items()}


def glimpse_greedy(model, b: dict, new_tokens: int, compile: bool = False) -> None:
    """glimpse's greedy decoding of a batch from `batch_inputs`: image encoding, prefill, `new_tokens` steps."""
    ids = b["input_ids"]
    embeds = model.merge(ids, model.get_image_features(b["pixel_values"]))
    cfg = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True, compile=compile)
    out = generate(model.lm, ids.tolist(), cfg, prefix_embeds=list(embeds))
    assert all(len(o) == new_tokens for o in out)


def step_bytes(model: VisionLanguageModel, bytes_per_value: int, positions: int) -> tuple[float, float]:
    """(weights, KV cache) bytes one batch-1 decode step reads at `positions` cached tokens: every LM weight
    but the input embedding's (one row of it), and each layer's keys and values."""
    lm = model.lm
    weights = sum(p.numel() for n, p in lm.named_parameters() if not n.startswith("token_embed."))
    kv = 2 * lm.cfg.layers * (lm.cfg.kv_heads or lm.cfg.heads) * (lm.cfg.width // lm.cfg.heads) * positions
    return weights * bytes_per_value, kv * bytes_per_value


def roofline(ours, theirs, s: dict, device, precision: str, reps: int, compile: bool) -> None:
    """Print each batch-1 decode step's time and its share of the memory roof."""
    n = 33
    prompt = 32 + glimpse_image_tokens(s)  # decode_tokens_per_s's prompt: 32 text tokens and the image's
    w, kv = step_bytes(ours, 2 if precision == "bf16" else 4, prompt + n // 2)
    gbps = memory_read_gbps(str(device))
    roof = gbps * 1e9 / (w + kv)
    print(f"batch-1 decode steps against the memory roof: {(w + kv) / 1e6:.1f} MB a step (weights "
          f"{w / 1e6:.1f}, KV cache {kv / 1e6:.1f}), memory read {gbps:.1f} GB/s -> at most {roof:.1f} steps/s")
    kinds = {"glimpse": (ours, "glimpse", False), "transformers": (theirs, "hf", False)}
    if compile:
        kinds["glimpse, compiled steps"] = (ours, "glimpse", True)
    rates = {k: decode_tokens_per_s({name: decode_runner(model, kind, s, 1, k, device, precision, comp)
                                     for name, (model, kind, comp) in kinds.items()}, 1, k, device, reps)
             for k in (n, 1)}
    for name in kinds:
        step = (n / rates[n][name] - 1 / rates[1][name]) / (n - 1)
        print(f"  {name:26s} {step * 1e3:7.2f} ms a step, {1 / step:6.1f} steps/s: {1 / step / roof:.2f} of the roof")


def glimpse_image_tokens(s: dict) -> int:
    return (s["image"] // s["patch"]) ** 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=SIZES, default="small")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--compile", action="store_true", help="also time glimpse's step under torch.compile")
    ap.add_argument("--compile-decode", action="store_true", help="also time glimpse's decoding with compiled steps (CPU)")
    ap.add_argument("--skip", choices=["train", "decode"], action="append", default=[])
    ap.add_argument("--roofline", action="store_true", help="also batch-1 decode steps against the memory roof")
    a = ap.parse_args()
    device = torch.device(a.device)
    s = SIZES[a.size]
    torch.manual_seed(0)
    ours = glimpse_model(s).to(device)
    theirs = hf_model(ours).to(device)
    n = sum(p.numel() for p in ours.parameters()) / 1e6
    n_hf = sum(p.numel() for p in theirs.parameters()) / 1e6
    print(f"size {a.size}: glimpse {n:.1f}M parameters, transformers {n_hf:.1f}M; {a.precision} on {device} "
          f"({torch.cuda.get_device_name() if device.type == 'cuda' else f'{torch.get_num_threads()} threads'})")
    rows = []
    if "train" not in a.skip:
        batch = batch_inputs(s, ours.image_tokens, device)
        g = train_samples_per_s(ours, glimpse_loss, batch, device, a.precision, a.steps)
        h = train_samples_per_s(theirs, hf_loss, batch, device, a.precision, a.steps)
        rows.append(("train samples/s", g, h))
        if a.compile:
            c = train_samples_per_s(ours, glimpse_loss, batch, device, a.precision, a.steps, compile=True)
            rows.append(("train samples/s, compiled", c, h))
    if "decode" not in a.skip:
        plain = None
        if device.type == "cpu":  # the same weights without the decode-time oneDNN packing, for the history
            plain = copy.deepcopy(ours)
            plain.lm._glimpse_packed = True  # pack_linears then leaves it as it is
        for bs in (1, 16):
            runners = {"hf": decode_runner(theirs, "hf", s, bs, a.new_tokens, device, a.precision),
                       "glimpse": decode_runner(ours, "glimpse", s, bs, a.new_tokens, device, a.precision)}
            if plain is not None:
                runners["plain"] = decode_runner(plain, "glimpse", s, bs, a.new_tokens, device, a.precision)
            if a.compile_decode:
                runners["compiled"] = decode_runner(ours, "glimpse", s, bs, a.new_tokens, device, a.precision,
                                                    compile=True)
            r = decode_tokens_per_s(runners, bs, a.new_tokens, device, max(2, a.steps // 2))
            rows.append((f"greedy tokens/s, batch {bs}", r["glimpse"], r["hf"]))
            if plain is not None:
                rows.append((f"  ... F.linear weights, batch {bs}", r["plain"], r["hf"]))
            if a.compile_decode:
                rows.append((f"  ... compiled steps, batch {bs}", r["compiled"], r["hf"]))
    if a.roofline:
        roofline(ours, theirs, s, device, a.precision, max(3, a.steps // 2), a.compile_decode)
    print(f"{'':28s} {'glimpse':>10s} {'transformers':>13s} {'ratio':>7s}")
    for name, g, h in rows:
        print(f"{name:28s} {g:10.1f} {h:13.1f} {g / h:6.2f}x")


if __name__ == "__main__":
    main()
