"""Video: glimpse's reader against bare PyAV, and the video LLaVA against transformers'
LlavaNextVideoForConditionalGeneration at the same sizes, in one run.

- reader: decoded frames/s of `glimpse.data.video.read_video` (allowlists, limits, sampling) against a
  bare PyAV loop over the same files, decoding every frame (fps sampling at the file's own rate), and
  clips/s of the uniform 8-frame sampling that training and evaluation use;
- model: both built from one description (a CLIP tower with a class token, the penultimate layer, the
  patch grid average-pooled with stride 2 before an mlp2x_gelu projector, a Llama LM; 8 frames a clip)
  with random weights: training samples/s (tower frozen) and greedy tokens/s at batch 1 and 8.

    python bench/video_vs_transformers.py [--size tiny|small] [--device cpu|cuda]

Prints each figure and the ratio glimpse / the other.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from vlm_vs_transformers import _median_time, train_samples_per_s

from glimpse.data.video import read_video, write_video
from glimpse.families.video_llava.model import VideoLanguageModel, VideoLLaVAConfig
from glimpse.infer.generate import GenerationConfig, generate
from glimpse.losses import lm_loss_at_targets
from glimpse.models.decoder import DecoderConfig
from glimpse.models.vision import VisionConfig

VIDEO_TOKEN = 3
SIZES = {
    "tiny": dict(image=32, patch=8, v_width=64, v_layers=2, v_heads=2, width=64, layers=2, heads=4, kv=2,
                 vocab=512, batch=2, text=24, answer=8, clips=4, clip_frames=16, clip_px=64),
    # CPU-sized: a ViT-S/8 at 64 px (8x8 patches pooled to 4x4: 128 tokens a clip) and a ~110M Llama
    "small": dict(image=64, patch=8, v_width=384, v_layers=6, v_heads=6, width=768, layers=8, heads=12, kv=4,
                  vocab=32000, batch=8, text=64, answer=16, clips=40, clip_frames=64, clip_px=256),
}
FRAMES = 8


def write_clips(folder: Path, s: dict) -> list[Path]:
    """Clips of a square crossing a noisy background (noise keeps the encoder from coasting)."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(s["clips"]):
        px, T = s["clip_px"], s["clip_frames"]
        frames = rng.integers(0, 255, (T, px, px, 3), dtype=np.uint8) // 4 + 160
        for t in range(T):
            x = int(t * (px - px // 4) / max(T - 1, 1))
            frames[t, px // 3: px // 3 + px // 4, x: x + px // 4] = (215, 35, 35)
        paths.append(folder / f"clip{i}.mp4")
        write_video(frames, paths[-1], fps=8)
    return paths


def reader_rows(paths: list[Path]) -> list[tuple]:
    import av

    def bare() -> int:
        n = 0
        for p in paths:
            with av.open(str(p)) as c:
                for f in c.decode(video=0):
                    f.to_ndarray(format="rgb24")
                    n += 1
        return n

    def ours() -> int:
        return sum(len(read_video(p, 0, sampling="fps", fps=8.0)) for p in paths)

    def timed(fn) -> tuple[float, int]:
        fn()  # warm
        t = time.perf_counter()
        n = fn()
        return time.perf_counter() - t, n

    (tb, nb), (tg, ng) = timed(bare), timed(ours)
    assert nb == ng, (nb, ng)
    t8 = time.perf_counter()
    for p in paths:
        read_video(p, FRAMES)
    t8 = time.perf_counter() - t8
    return [("reader: decoded frames/s", ng / tg, nb / tb, "bare PyAV"),
            ("reader: 8-frame clips/s", len(paths) / t8, None, "")]


def glimpse_model(s: dict) -> VideoLanguageModel:
    cfg = VideoLLaVAConfig(
        vision=VisionConfig(image_size=s["image"], patch_size=s["patch"], width=s["v_width"], layers=s["v_layers"],
                            heads=s["v_heads"], act="quick_gelu", class_token=True, pre_norm=True, pool="cls"),
        lm=DecoderConfig(arch="llama", vocab_size=s["vocab"], width=s["width"], layers=s["layers"],
                         heads=s["heads"], kv_heads=s["kv"], context_length=4096, tie_embeddings=False),
        connector="mlp2x_gelu", vision_feature_layer=-2, vision_feature_select="patch", image_token_id=VIDEO_TOKEN,
        num_frames=FRAMES, spatial_pool="average", spatial_pool_stride=2, frame_positions=False)
    return VideoLanguageModel(cfg)


def hf_model(m: VideoLanguageModel):
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextVideoConfig,
        LlavaNextVideoForConditionalGeneration,
    )

    v, lm = m.cfg.vision, m.lm.cfg
    config = LlavaNextVideoConfig(
        vision_config=CLIPVisionConfig(hidden_size=v.width, intermediate_size=int(v.width * v.mlp_ratio),
                                       num_hidden_layers=v.layers, num_attention_heads=v.heads,
                                       image_size=v.image_size, patch_size=v.patch_size, hidden_act="quick_gelu"),
        text_config=LlamaConfig(vocab_size=lm.vocab_size, hidden_size=lm.width, intermediate_size=lm.mlp_hidden,
                                num_hidden_layers=lm.layers, num_attention_heads=lm.heads,
                                num_key_value_heads=lm.kv_heads, max_position_embeddings=4096,
                                tie_word_embeddings=False),
        video_token_index=VIDEO_TOKEN, image_token_index=VIDEO_TOKEN + 1, spatial_pool_mode="average",
        spatial_pool_stride=2, vision_feature_layer=-2, vision_feature_select_strategy="default")
    config._attn_implementation = "sdpa"
    model = LlavaNextVideoForConditionalGeneration(config)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def batch_inputs(s: dict, video_tokens: int, device, batch: int | None = None, text: int | None = None) -> dict:
    g = torch.Generator().manual_seed(0)
    B, T = batch or s["batch"], text or s["text"]
    words = torch.randint(10, s["vocab"], (B, T), generator=g)
    ids = torch.cat([words[:, :1], torch.full((B, video_tokens), VIDEO_TOKEN), words[:, 1:]], 1)
    labels = torch.full_like(ids, -100)
    labels[:, -s["answer"]:] = ids[:, -s["answer"]:]
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": labels.to(device),
            "pixel_values_videos": torch.randn(B, FRAMES, 3, s["image"], s["image"], generator=g).to(device)}


def glimpse_loss(model, b):
    hidden = model(b["input_ids"], b["attention_mask"], b["pixel_values_videos"], return_hidden=True)
    return lm_loss_at_targets(hidden, model.lm.lm_head, b["labels"])


def hf_loss(model, b):
    return model(**b).loss


@torch.no_grad()
def decode_tokens_per_s(model, kind: str, s: dict, batch: int, new_tokens: int, device, reps: int,
                        video_tokens: int) -> float:
    model.eval()
    b = batch_inputs(s, video_tokens, device, batch=batch, text=16)

    def run():
        if kind == "glimpse":
            ids = b["input_ids"]
            embeds = model.merge(ids, model.get_image_features(b["pixel_values_videos"]))
            out = generate(model.lm, ids.tolist(), GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True),
                           prefix_embeds=list(embeds))
            assert all(len(o) == new_tokens for o in out)
        else:
            out = model.generate(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                 pixel_values_videos=b["pixel_values_videos"], max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False)
            assert out.shape[1] == b["input_ids"].shape[1] + new_tokens

    return batch * new_tokens / _median_time(run, device, reps, warmup=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=SIZES, default="small")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=32)
    a = ap.parse_args()
    device, s = torch.device(a.device), SIZES[a.size]
    from glimpse.hardware import matmul_gflops

    print(f"size {a.size} on {device}: fp32 matmul {matmul_gflops(device=device.type):.1f} GFLOP/s "
          f"({torch.get_num_threads()} threads)")
    with tempfile.TemporaryDirectory() as tmp:
        rows = reader_rows(write_clips(Path(tmp), s))
    torch.manual_seed(0)
    ours = glimpse_model(s).to(device)
    theirs = hf_model(ours).to(device)
    n_tok = ours.image_tokens
    batch = batch_inputs(s, n_tok, device)
    rows.append(("train samples/s", train_samples_per_s(ours, glimpse_loss, batch, device, "fp32", a.steps),
                 train_samples_per_s(theirs, hf_loss, batch, device, "fp32", a.steps), "transformers"))
    for bs in (1, 8):
        reps = max(2, a.steps // 2)
        rows.append((f"greedy tokens/s, batch {bs}",
                     decode_tokens_per_s(ours, "glimpse", s, bs, a.new_tokens, device, reps, n_tok),
                     decode_tokens_per_s(theirs, "hf", s, bs, a.new_tokens, device, reps, n_tok), "transformers"))
    print(f"{n_tok} video tokens a clip ({FRAMES} frames)")
    print(f"{'':28s} {'glimpse':>10s} {'other':>10s} {'ratio':>7s}  other")
    for name, g, h, other in rows:
        if h is None:
            print(f"{name:28s} {g:10.1f}")
        else:
            print(f"{name:28s} {g:10.1f} {h:10.1f} {g / h:6.2f}x  {other}")


if __name__ == "__main__":
    main()
