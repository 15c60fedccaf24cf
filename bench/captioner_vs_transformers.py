"""Encoder-decoder captioner: glimpse vs transformers' VisionEncoderDecoderModel (ViT + GPT-2), same sizes.

Both models are built from one description (a ViT encoder, a GPT-2 decoder with cross-attention in
every block), with random weights: speed does not depend on their values.  Measured in one run:

- training: samples/s of a teacher-forcing step (encoder and decoder learn; AdamW), captions of
  `caption` tokens;
- decoding: greedy tokens/s at batch 1 and 16 from the decoder start token (EOS ignored, image
  encoding included for both).  glimpse computes the image's cross-attention keys and values once
  per layer and keeps them in its KV cache.

    python bench/captioner_vs_transformers.py [--size small|base] [--precision fp32|bf16] [--device cpu|cuda]

Prints each figure and the ratio glimpse / transformers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from glimpse.families.encoder_decoder.model import EncoderDecoderCaptioner, EncoderDecoderConfig
from glimpse.infer.generate import GenerationConfig, generate
from glimpse.losses import seq2seq_loss
from glimpse.models.decoder import DecoderConfig
from glimpse.models.vision import VisionConfig

sys.path.insert(0, str(Path(__file__).parent))
from vlm_vs_transformers import _median_time  # noqa: E402  one timing rule for the benches

START = 1
SIZES = {
    "tiny": dict(image=32, patch=8, v_width=64, v_layers=2, v_heads=2, width=64, layers=2, heads=4, vocab=512,
                 batch=4, caption=12),  # a smoke run
    # CPU-sized: a ViT-S/8 at 64 px (65 encoder tokens) and a 6-layer 512-wide GPT-2
    "small": dict(image=64, patch=8, v_width=384, v_layers=6, v_heads=6, width=512, layers=6, heads=8, vocab=8192,
                  batch=32, caption=24),
    # nlpconnect/vit-gpt2-image-captioning's shape: ViT-B/16 at 224 px and GPT-2 small
    "base": dict(image=224, patch=16, v_width=768, v_layers=12, v_heads=12, width=768, layers=12, heads=12,
                 vocab=50257, batch=32, caption=24),
}


def glimpse_model(s: dict) -> EncoderDecoderCaptioner:
    cfg = EncoderDecoderConfig(
        vision=VisionConfig(image_size=s["image"], patch_size=s["patch"], width=s["v_width"], layers=s["v_layers"],
                            heads=s["v_heads"], class_token=True, pre_norm=False, patch_bias=True, eps=1e-12),
        decoder=DecoderConfig(arch="gpt2", vocab_size=s["vocab"], width=s["width"], layers=s["layers"],
                              heads=s["heads"], context_length=128),
        decoder_start_token_id=START)
    return EncoderDecoderCaptioner(cfg)


def hf_model(m: EncoderDecoderCaptioner):
    from transformers import GPT2Config, VisionEncoderDecoderConfig, VisionEncoderDecoderModel, ViTConfig

    v, d = m.cfg.vision, m.decoder.cfg
    enc = ViTConfig(hidden_size=v.width, num_hidden_layers=v.layers, num_attention_heads=v.heads,
                    intermediate_size=int(v.width * v.mlp_ratio), image_size=v.image_size, patch_size=v.patch_size)
    dec = GPT2Config(vocab_size=d.vocab_size, n_positions=d.context_length, n_embd=d.width, n_layer=d.layers,
                     n_head=d.heads, add_cross_attention=True, is_decoder=True, bos_token_id=START, eos_token_id=START)
    cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id = cfg.pad_token_id = START
    for c in (cfg, cfg.encoder, cfg.decoder):
        c._attn_implementation = "sdpa"
    model = VisionEncoderDecoderModel(cfg)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = START
    model.generation_config.decoder_start_token_id = START
    return model


def batch_inputs(s: dict, device, batch: int | None = None) -> dict:
    g = torch.Generator().manual_seed(0)
    B = batch or s["batch"]
    labels = torch.randint(10, s["vocab"], (B, s["caption"]), generator=g)
    return {"pixel_values": torch.randn(B, 3, s["image"], s["image"], generator=g).to(device), "labels": labels.to(device)}


def glimpse_loss(model, b):
    ids = torch.cat([torch.full_like(b["labels"][:, :1], START), b["labels"][:, :-1]], 1)
    return seq2seq_loss(model(b["pixel_values"], ids, return_hidden=True), model.decoder.lm_head, b["labels"])


def hf_loss(model, b):
    return model(**b).loss


def train_samples_per_s(model, loss_fn, batch: dict, device, precision: str, steps: int, compile: bool = False) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model.train()
    net = torch.compile(model) if compile else model

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = loss_fn(net, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return batch["labels"].shape[0] / _median_time(step, device, steps)


@torch.no_grad()
def decode_tokens_per_s(model, kind: str, s: dict, batch: int, new_tokens: int, device, precision: str,
                        reps: int) -> float:
    model.eval()
    b = batch_inputs(s, device, batch)
    if precision == "bf16":
        model.to(torch.bfloat16)
        b["pixel_values"] = b["pixel_values"].to(torch.bfloat16)

    def run():
        if kind == "glimpse":
            memory = list(model.encode(b["pixel_values"]))
            out = generate(model.decoder, [[START]] * batch, GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True),
                           pad_id=START, memory=memory)
            assert all(len(o) == new_tokens for o in out)
        else:
            out = model.generate(pixel_values=b["pixel_values"], max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False)
            assert out.shape[1] == 1 + new_tokens

    return batch * new_tokens / _median_time(run, device, reps, warmup=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=SIZES, default="small")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--compile", action="store_true", help="also time glimpse's step under torch.compile")
    a = ap.parse_args()
    device = torch.device(a.device)
    s = SIZES[a.size]
    torch.manual_seed(0)
    ours = glimpse_model(s).to(device)
    theirs = hf_model(ours).to(device)
    n = sum(p.numel() for p in ours.parameters()) / 1e6
    n_hf = sum(p.numel() for p in theirs.parameters()) / 1e6
    if device.type == "cpu":
        from glimpse.hardware import matmul_gflops

        where = f"{torch.get_num_threads()} threads, fp32 matmul {matmul_gflops():.0f} GFLOP/s"
    else:
        where = torch.cuda.get_device_name()
    print(f"size {a.size}: glimpse {n:.1f}M parameters, transformers {n_hf:.1f}M; {a.precision} on {device} ({where})")
    batch = batch_inputs(s, device)
    rows = [("train samples/s", train_samples_per_s(ours, glimpse_loss, batch, device, a.precision, a.steps),
             train_samples_per_s(theirs, hf_loss, batch, device, a.precision, a.steps))]
    if a.compile:  # the transformers side stays eager, as its Trainer runs by default
        rows.append(("train samples/s, compiled",
                     train_samples_per_s(ours, glimpse_loss, batch, device, a.precision, a.steps, compile=True),
                     rows[0][2]))
    for bs in (1, 16):
        reps = max(2, a.steps // 2)
        rows.append((f"greedy tokens/s, batch {bs}",
                     decode_tokens_per_s(ours, "glimpse", s, bs, a.new_tokens, device, a.precision, reps),
                     decode_tokens_per_s(theirs, "hf", s, bs, a.new_tokens, device, a.precision, reps)))
    print(f"{'':28s} {'glimpse':>10s} {'transformers':>13s} {'ratio':>7s}")
    for name, g, h in rows:
        print(f"{name:28s} {g:10.1f} {h:13.1f} {g / h:6.2f}x")


if __name__ == "__main__":
    main()
