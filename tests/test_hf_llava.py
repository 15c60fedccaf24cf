"""LlavaForConditionalGeneration folders: transformers-style input (the image token repeated once per
image feature), logits on padded batches and greedy generations equal transformers'."""

from __future__ import annotations

import json

import pytest
import torch
from hf_helpers import randomize, save, write_tokenizer
from torch.testing import assert_close

import glimpse
from glimpse.families import load_hf
from glimpse.families.vlm.model import VisionLanguageModel
from glimpse.families.vlm.pipeline import VisionLanguagePipeline
from glimpse.infer.generate import GenerationConfig, generate
from glimpse.models.decoder import positions_from_mask

transformers = pytest.importorskip("transformers")

V, IMG = 64, 63
VISION = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4, image_size=16,
              patch_size=8)
LM = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
          pad_token_id=0)


def llava(variant: str):
    T = transformers
    if variant == "clip_llama":  # LLaVA-1.5: penultimate layer, class token dropped, GQA, untied
        cfg = T.LlavaConfig(vision_config=T.CLIPVisionConfig(**VISION), text_config=T.LlamaConfig(**LM),
                            image_token_index=IMG, vision_feature_layer=-2, vision_feature_select_strategy="default")
    else:  # a SigLIP tower (every patch) on a tied Qwen2 LM with q/k/v biases
        cfg = T.LlavaConfig(vision_config=T.SiglipVisionConfig(**VISION),
                            text_config=T.Qwen2Config(**LM, tie_word_embeddings=True),
                            image_token_index=IMG, vision_feature_layer=-1, vision_feature_select_strategy="full")
    return randomize(T.LlavaForConditionalGeneration(cfg))


def batch(n_feat: int):
    """Two left-padded sequences, each with one image's worth of image tokens."""
    torch.manual_seed(3)
    rows = []
    for n_text in (6, 3):
        pre = torch.randint(3, IMG, (2,)).tolist()
        post = torch.randint(3, IMG, (n_text,)).tolist()
        rows.append([1] + pre + [IMG] * n_feat + post)
    T = max(len(r) for r in rows)
    ids = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.tensor(r)
        mask[i, T - len(r):] = 1
    torch.manual_seed(4)
    return ids, mask, torch.randn(2, 3, 16, 16), rows


@pytest.mark.parametrize("variant", ["clip_llama", "siglip_qwen2"])
def test_llava_logits_and_generation(tmp_path, variant):
    hf = llava(variant)
    save(hf, tmp_path)
    m = load_hf(tmp_path)
    assert m.family == "vlm" and isinstance(m.model, VisionLanguageModel)
    ours = m.model
    n_feat = ours.image_tokens
    assert n_feat == (4 if variant == "clip_llama" else 4)  # 2x2 patches; CLIP's class token dropped
    ids, mask, px, rows = batch(n_feat)
    pos = positions_from_mask(mask)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, pixel_values=px, position_ids=pos).logits
        got = ours(ids, mask, px, position_ids=pos)
    real = mask.bool()
    assert_close(got[real], ref[real], atol=1e-4, rtol=1e-4)

    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        hf_out = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=px, do_sample=False,
                             max_new_tokens=6, pad_token_id=0)[:, ids.shape[1]:].tolist()
        feats = ours.get_image_features(px)
        embeds = [ours.merge(torch.tensor([r]), feats[i:i + 1])[0] for i, r in enumerate(rows)]
    assert generate(ours.lm, rows, GenerationConfig(max_new_tokens=6), pad_id=0, prefix_embeds=embeds) == hf_out


TEMPLATE = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + ' ' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}")


def write_llava_folder(path) -> None:
    """A complete tiny LLaVA-1.5-style folder: weights, tokenizer, chat template, preprocessor."""
    save(llava("clip_llama"), path)
    words = [f"w{i}" for i in range(V - 5)]  # <image> lands on id 63
    write_tokenizer(path, words + ["<image>"], ["<pad>", "<s>", "</s>", "<unk>"])
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    (path / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 16}, "crop_size": {"height": 16, "width": 16}, "do_center_crop": True,
         "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25], "resample": 3}))


def test_glimpse_load_gives_a_chat_pipeline(tmp_path):
    write_llava_folder(tmp_path)
    template = TEMPLATE
    pipe = glimpse.load(tmp_path)
    assert isinstance(pipe, VisionLanguagePipeline)
    assert pipe.template == template and pipe.transform.mean == (0.5, 0.5, 0.5)
    from PIL import Image

    img = Image.new("RGB", (20, 16), (200, 30, 30))
    ids, images = pipe.chat_prompt([{"role": "user", "content": [{"type": "image", "image": img},
                                                                  {"type": "text", "text": "w1 w2"}]}])
    assert ids.count(IMG) == 4 and len(images) == 1
    answer = pipe.ask([img], ["w3"], max_new_tokens=4)
    assert isinstance(answer[0], str)
