"""CLIP, SigLIP and BERT folders load through glimpse.hub and compute what transformers computes."""

from __future__ import annotations

import json

import pytest
import torch
from hf_helpers import randomize, save
from torch.testing import assert_close

from glimpse.errors import GlimpseError
from glimpse.families import load_hf
from glimpse.families.dual_encoder.model import DualEncoder, ImageEncoder, TextEncoder

transformers = pytest.importorskip("transformers")

V = 50
VISION = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, image_size=16,
              patch_size=8)
TEXT = dict(hidden_size=24, intermediate_size=36, num_hidden_layers=2, num_attention_heads=2, vocab_size=V,
            max_position_embeddings=12, eos_token_id=V - 1, bos_token_id=V - 2, pad_token_id=0)


def pixels(n=3, size=16):
    torch.manual_seed(5)
    return torch.randn(n, 3, size, size)


def clip_texts():
    """Right-padded ids ending each text with the eos (CLIP pools the eos), and their mask."""
    torch.manual_seed(6)
    ids = torch.randint(1, V - 2, (3, 9))
    mask = torch.ones_like(ids)
    for row, n in enumerate((9, 5, 3)):
        ids[row, n - 1] = V - 1
        ids[row, n:] = 0
        mask[row, n:] = 0
    return ids, mask


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_clip_full(tmp_path, act):
    cfg = transformers.CLIPConfig(vision_config={**VISION, "hidden_act": act}, text_config={**TEXT, "hidden_act": act},
                                  projection_dim=16)
    hf = randomize(transformers.CLIPModel(cfg))
    save(hf, tmp_path)
    m = load_hf(tmp_path)
    assert m.family == "dual_encoder" and isinstance(m.model, DualEncoder)
    ids, mask = clip_texts()
    with torch.no_grad():
        assert_close(m.model.get_image_features(pixels()), _feat(hf.get_image_features(pixel_values=pixels())))
        assert_close(m.model.get_text_features(ids, mask),
                     _feat(hf.get_text_features(input_ids=ids, attention_mask=mask)))
        assert_close(m.model.logit_scale, hf.logit_scale)


def _feat(x):
    """transformers 5 returns a model output from get_*_features; older ones a tensor."""
    return x if torch.is_tensor(x) else x.pooler_output


def test_clip_vision_only_and_text_only(tmp_path):
    vcfg = transformers.CLIPVisionConfig(**VISION, projection_dim=16)
    hf_v = randomize(transformers.CLIPVisionModelWithProjection(vcfg))
    save(hf_v, tmp_path / "v")
    hf_plain = randomize(transformers.CLIPVisionModel(vcfg), seed=3)
    save(hf_plain, tmp_path / "vp")
    tcfg = transformers.CLIPTextConfig(**TEXT, projection_dim=16)
    hf_t = randomize(transformers.CLIPTextModelWithProjection(tcfg))
    save(hf_t, tmp_path / "t")
    ids, mask = clip_texts()
    with torch.no_grad():
        v = load_hf(tmp_path / "v")
        assert v.family == "dual_encoder" and isinstance(v.model, ImageEncoder)
        assert_close(v.model.get_image_features(pixels()), hf_v(pixel_values=pixels()).image_embeds)
        p = load_hf(tmp_path / "vp")
        out = hf_plain(pixel_values=pixels())
        assert_close(p.model.get_image_features(pixels()), out.pooler_output)
        # our tower's token states include the post-norm; HF's last_hidden_state does not
        post = getattr(hf_plain, "vision_model", hf_plain).post_layernorm
        assert_close(p.model(pixels()), post(out.last_hidden_state))
        t = load_hf(tmp_path / "t")
        assert t.family == "dual_encoder" and isinstance(t.model, TextEncoder)
        assert_close(t.model.get_text_features(ids, mask), hf_t(input_ids=ids, attention_mask=mask).text_embeds)
        with pytest.raises(ValueError, match="text-only"):
            t.model.get_image_features(pixels())


def test_siglip_full(tmp_path):
    cfg = transformers.SiglipConfig(vision_config={**VISION}, text_config={**TEXT, "projection_size": 32})
    hf = randomize(transformers.SiglipModel(cfg))
    save(hf, tmp_path)
    m = load_hf(tmp_path)
    assert m.family == "dual_encoder" and isinstance(m.model, DualEncoder) and m.model.cfg.loss == "siglip"
    torch.manual_seed(7)
    ids = torch.randint(0, V, (3, 12))  # SigLIP texts are padded to the full length, no mask
    with torch.no_grad():
        assert_close(m.model.get_image_features(pixels()), _feat(hf.get_image_features(pixel_values=pixels())))
        assert_close(m.model.get_text_features(ids), _feat(hf.get_text_features(input_ids=ids)))
        assert_close(m.model.logit_bias, hf.logit_bias[0])


def test_siglip_vision_tower_with_map_head(tmp_path):
    hf = randomize(transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**VISION)))
    save(hf, tmp_path)
    m = load_hf(tmp_path)
    with torch.no_grad():
        out = hf(pixel_values=pixels())
        assert_close(m.model.get_image_features(pixels()), out.pooler_output)
        assert_close(m.model(pixels()), out.last_hidden_state)


def bert_batch():
    torch.manual_seed(8)
    ids = torch.randint(0, V, (3, 10))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    return ids, mask


def test_bert_hidden_states(tmp_path):
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=16, type_vocab_size=2)
    hf = randomize(transformers.BertModel(cfg))
    save(hf, tmp_path)
    m = load_hf(tmp_path)
    assert m.family == "dual_encoder" and isinstance(m.model, TextEncoder)
    ids, mask = bert_batch()
    types = (torch.arange(10) >= 5).long().expand(3, 10)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        got = m.model(ids, mask)
        real = mask.bool()
        assert_close(got[real], ref[real])
        assert_close(m.model(ids, mask, types)[real], hf(input_ids=ids, attention_mask=mask,
                                                         token_type_ids=types).last_hidden_state[real])
        assert_close(m.model.get_text_features(ids, mask), ref[:, 0])  # no sentence pooling file: CLS


def test_fp16_and_bf16_checkpoints_load_and_cast(tmp_path):
    cfg = transformers.CLIPVisionConfig(**VISION)
    hf = randomize(transformers.CLIPVisionModel(cfg))
    save(hf, tmp_path / "half", torch.float16)
    ref = load_hf(tmp_path / "half")  # cast up to fp32 by default
    assert ref.model.vision.pos_embed.dtype == torch.float32
    with torch.no_grad():
        assert_close(ref.model.get_image_features(pixels()), hf.float()(pixel_values=pixels()).pooler_output)
    bf = load_hf(tmp_path / "half", dtype="bf16")
    assert all(p.dtype == torch.bfloat16 for p in bf.model.parameters())


def test_sharded_checkpoint(tmp_path):
    hf = randomize(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)))
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    with torch.no_grad():
        assert_close(load_hf(tmp_path).model.get_image_features(pixels()), hf(pixel_values=pixels()).pooler_output)


def _rewrite(folder, fn):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(folder / "model.safetensors"))
    fn(sd)
    save_file(sd, str(folder / "model.safetensors"))


def test_strict_loading_names_the_tensor(tmp_path):
    hf = randomize(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)))
    key = "encoder.layers.1.mlp.fc1.weight"
    for name, fn, message in [
        ("missing", lambda sd: sd.pop(key), f"missing tensor {key}"),
        ("extra", lambda sd: sd.update({"surprise": torch.zeros(2)}), "unexpected tensor surprise"),
        ("shape", lambda sd: sd.update({key: torch.zeros(41, 32)}), f"tensor {key} has shape \\(41, 32\\)"),
    ]:
        save(hf, tmp_path / name)
        _rewrite(tmp_path / name, fn)
        with pytest.raises(GlimpseError, match=message):
            load_hf(tmp_path / name)
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(GlimpseError, match="model_type 't5'"):
        load_hf(tmp_path / "odd")


def test_siglip_text_only_and_bert_with_an_mlm_head(tmp_path):
    hf_t = randomize(transformers.SiglipTextModel(transformers.SiglipTextConfig(**TEXT, projection_size=20)))
    save(hf_t, tmp_path / "st")
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=16)
    mlm = randomize(transformers.BertForMaskedLM(cfg))  # "bert." prefix; the MLM head is declared unused
    save(mlm, tmp_path / "mlm")
    torch.manual_seed(9)
    ids = torch.randint(0, V, (2, 12))
    ids_b, mask = bert_batch()
    with torch.no_grad():
        t = load_hf(tmp_path / "st")
        assert_close(t.model.get_text_features(ids), hf_t(input_ids=ids).pooler_output)
        b = load_hf(tmp_path / "mlm")
        ref = mlm.bert(input_ids=ids_b, attention_mask=mask).last_hidden_state
        assert_close(b.model(ids_b, mask)[mask.bool()], ref[mask.bool()])
