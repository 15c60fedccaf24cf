"""IDEFICS v1 folders (IdeficsForVisionText2Text) -> glimpse's FlamingoModel: logits of a padded batch with
padded image slots, and greedy generations, equal transformers', for float and vector gates, with and
without the Perceiver resampler, with and without IDEFICS' q/k norms."""

from __future__ import annotations

import itertools

import pytest
import torch
from hf_helpers import randomize, save
from torch.testing import assert_close

from glimpse.families.flamingo import hf as idefics_hf
from glimpse.families.flamingo.model import FlamingoModel
from glimpse.hub import folder as hf_folder
from glimpse.hub.parts import load_strict, materialize
from glimpse.infer.generate import GenerationConfig, generate
from glimpse.models.cross_attention import media_index_of
from glimpse.models.decoder import positions_from_mask

transformers = pytest.importorskip("transformers")

V, EXTRA = 99, 2
FAKE, IMG = V, V + 1  # IDEFICS' added tokens: <fake_token_around_image>, <image>


def idefics(alpha_type: str, use_resampler: bool, qk_layer_norms: bool):
    T = transformers
    # transformers 5.24 cannot build alpha_initializer "normal" with float gates (torch.normal(size=(1)) gets
    # an int, not a tuple): those start at zero here, and every gate is drawn below anyway
    init = "normal" if alpha_type == "vector" else "zeros"
    cfg = T.IdeficsConfig(
        vocab_size=V, additional_vocab_size=EXTRA, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=37, cross_layer_interval=2, alpha_initializer=init, alphas_initializer_range=0.5,
        alpha_type=alpha_type, use_resampler=use_resampler, qk_layer_norms=qk_layer_norms,
        vision_config=dict(embed_dim=32, image_size=30, patch_size=2, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=37),
        perceiver_config=dict(resampler_depth=2, resampler_n_heads=2, resampler_head_dim=8,
                              resampler_n_latents=16, qk_layer_norms_perceiver=qk_layer_norms))
    m = randomize(T.IdeficsForVisionText2Text(cfg))
    with torch.no_grad():  # open gates of both signs (randomize leaves them near 0.2)
        for name, p in m.named_parameters():
            if "alpha_" in name:
                p.copy_(torch.randn_like(p))
    return m


def inputs():
    """Two left-padded rows, 3 image slots; row 1 has two images, its third slot is zero padding."""
    torch.manual_seed(3)
    t = lambda n: torch.randint(3, V, (n,)).tolist()  # noqa: E731
    img = [FAKE, IMG, FAKE]
    rows = [[1] + t(2) + img + t(3) + img + t(2) + img + t(3),
            [1] + t(1) + img + t(4) + img + t(2)]
    T = max(len(r) for r in rows)
    ids = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.tensor(r)
        mask[i, T - len(r):] = 1
    px = torch.randn(2, 3, 3, 30, 30)
    px[1, 2] = 0
    valid = torch.tensor([[True, True, True], [True, True, False]])
    # the processor's image_attention_mask [B, T, N]: a one-hot of each token's latest image
    index = media_index_of(ids, IMG, valid)
    image_mask = (index[..., None] == torch.arange(3)).long()
    return rows, ids, mask, px, valid, image_mask


def load(folder) -> FlamingoModel:
    """As glimpse.families.load_hf does: built on the meta device, given storage, filled strictly."""
    config = hf_folder.read_json(folder / "config.json")
    with torch.device("meta"):
        built = idefics_hf.build(folder, config)
    model = materialize(built.model)
    load_strict(model, built.tensors, built.rules, built.unused, str(folder))
    return model.eval()


@pytest.mark.parametrize("alpha_type,use_resampler,qk_layer_norms",
                         list(itertools.product(["float", "vector"], [True, False], [False, True])))
def test_idefics_logits_and_generation(tmp_path, alpha_type, use_resampler, qk_layer_norms):
    ref_model = idefics(alpha_type, use_resampler, qk_layer_norms)
    save(ref_model, tmp_path)
    ours = load(tmp_path)
    cfg = ours.cfg
    assert (cfg.style, cfg.image_token_id, cfg.lm.vocab_size) == ("idefics", IMG, V + EXTRA)
    assert list(ours.xattn) == ["0", "2"]  # before layers 0 and 2 (cross_layer_interval 2)
    assert cfg.use_resampler == use_resampler and cfg.gate == alpha_type and cfg.qk_norm == qk_layer_norms

    rows, ids, mask, px, valid, image_mask = inputs()
    pos = positions_from_mask(mask)
    with torch.no_grad():
        ref = ref_model(input_ids=ids, attention_mask=mask, pixel_values=px, image_attention_mask=image_mask,
                        position_ids=pos).logits
        got = ours(ids, mask, px, image_valid=valid, position_ids=pos)
    real = mask.bool()
    assert_close(got[real], ref[real], atol=1e-4, rtol=1e-4)

    ref_model.generation_config.eos_token_id = None
    with torch.no_grad():
        want = ref_model.generate(input_ids=ids, attention_mask=mask, pixel_values=px,
                                  image_attention_mask=image_mask, do_sample=False, max_new_tokens=6,
                                  pad_token_id=0)[:, ids.shape[1]:].tolist()
        memory, masks = ours.generation_memory(rows, [px[0], px[1, :2]])
        out = generate(ours, rows, GenerationConfig(max_new_tokens=6), memory=memory, memory_mask=masks)
    assert out == want
