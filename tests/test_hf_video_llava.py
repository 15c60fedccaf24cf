"""LlavaNextVideoForConditionalGeneration folders with video input: logits and greedy generations equal
transformers' for the average and max spatial pools (tiny random models)."""

from __future__ import annotations

import json

import pytest
import torch
from hf_helpers import randomize, save, write_tokenizer
from torch.testing import assert_close

import glimpse
from glimpse.errors import GlimpseError
from glimpse.families import load_hf
from glimpse.infer.generate import GenerationConfig, generate
from glimpse.models.decoder import positions_from_mask

transformers = pytest.importorskip("transformers")

V, VIDEO, IMG, FRAMES = 64, 62, 63, 8
VISION = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4, image_size=32,
              patch_size=8)
LM = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
          pad_token_id=0)


def next_video(pool: str):
    T = transformers
    cfg = T.LlavaNextVideoConfig(vision_config=T.CLIPVisionConfig(**VISION), text_config=T.LlamaConfig(**LM),
                                 video_token_index=VIDEO, image_token_index=IMG, spatial_pool_mode=pool,
                                 spatial_pool_stride=2, vision_feature_layer=-2,
                                 vision_feature_select_strategy="default")
    return randomize(T.LlavaNextVideoForConditionalGeneration(cfg))


def batch(n_feat: int):
    """Two left-padded sequences, each with one clip's worth of video tokens."""
    torch.manual_seed(3)
    rows = []
    for n_text in (6, 3):
        rows.append([1] + torch.randint(3, VIDEO, (2,)).tolist() + [VIDEO] * n_feat
                    + torch.randint(3, VIDEO, (n_text,)).tolist())
    T = max(len(r) for r in rows)
    ids, mask = torch.zeros(2, T, dtype=torch.long), torch.zeros(2, T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = torch.tensor(r), 1
    torch.manual_seed(4)
    return ids, mask, torch.randn(2, FRAMES, 3, 32, 32), rows


@pytest.mark.parametrize("pool", ["average", "max"])
def test_llava_next_video_logits_and_generation(tmp_path, pool):
    hf = next_video(pool)
    save(hf, tmp_path)
    m = load_hf(tmp_path)
    assert m.family == "video_llava"
    ours = m.model
    assert ours.image_tokens == FRAMES * 4  # a 4x4 patch grid pooled to 2x2, for each of 8 frames
    ids, mask, px, rows = batch(ours.image_tokens)
    pos = positions_from_mask(mask)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, pixel_values_videos=px, position_ids=pos).logits
        got = ours(ids, mask, px, position_ids=pos)
    real = mask.bool()
    assert_close(got[real], ref[real], atol=1e-4, rtol=1e-4)

    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        hf_out = hf.generate(input_ids=ids, attention_mask=mask, pixel_values_videos=px, do_sample=False,
                             max_new_tokens=6, pad_token_id=0)[:, ids.shape[1]:].tolist()
        feats = ours.get_image_features(px)
        embeds = [ours.merge(torch.tensor([r]), feats[i:i + 1])[0] for i, r in enumerate(rows)]
    assert generate(ours.lm, rows, GenerationConfig(max_new_tokens=6), pad_id=0, prefix_embeds=embeds) == hf_out


def test_a_conv_pool_is_refused_in_one_line(tmp_path):
    T = transformers
    cfg = T.LlavaNextVideoConfig(vision_config=T.CLIPVisionConfig(**VISION), text_config=T.LlamaConfig(**LM),
                                 video_token_index=VIDEO, image_token_index=IMG, spatial_pool_mode="conv")
    save(randomize(T.LlavaNextVideoForConditionalGeneration(cfg)), tmp_path)
    with pytest.raises(GlimpseError, match="spatial_pool_mode 'conv'"):
        load_hf(tmp_path)


def test_glimpse_load_asks_about_a_clip_file(tmp_path, video_world):
    save(next_video("average"), tmp_path)
    words = [f"w{i}" for i in range(V - 6)]  # <video> lands on id 62, <image> on 63
    write_tokenizer(tmp_path, words + ["<video>", "<image>"], ["<pad>", "<s>", "</s>", "<unk>"])
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + ' ' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}")}))
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}, "do_center_crop": True,
         "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25], "resample": 3}))
    pipe = glimpse.load(tmp_path)
    clip = str(sorted((video_world / "videos" / "test").glob("*.mp4"))[0])
    assert pipe.transform.mean == (0.5, 0.5, 0.5)
    answer = pipe.ask([clip], ["w3 w4"], max_new_tokens=3)
    assert isinstance(answer[0], str)
