"""The causal_lm family: next-token loss, pretraining through the shared trainer, loading."""

import json

import pytest
import torch
import torch.nn.functional as F

import glimpse
from glimpse.config import load_recipe
from glimpse.errors import GlimpseError
from glimpse.families.causal_lm.pipeline import LanguageModelPipeline
from glimpse.losses import lm_loss
from glimpse.train.trainer import train


def test_lm_loss_is_shifted_cross_entropy_ignoring_padding():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7)
    labels = torch.tensor([[1, 2, 3, -100], [4, 5, -100, -100]])
    # position t predicts label t+1: pairs (row 0: t=0..2 -> 2,3,-) (row 1: t=0 -> 5)
    expected = F.cross_entropy(torch.stack([logits[0, 0], logits[0, 1], logits[1, 0]]), torch.tensor([2, 3, 5]))
    torch.testing.assert_close(lm_loss(logits, labels), expected)


def lm_overrides(world, **extra):
    base = {"data.root": str(world), "data.image_size": 32, "data.num_workers": 0, "model.width": 32,
            "model.layers": 2, "model.heads": 4, "model.kv_heads": 2, "model.context_length": 48,
            "train.batch_size": 16, "train.max_steps": 30, "train.warmup_steps": 3, "train.lr": 3e-3,
            "train.log_every": 1, "train.save_every": 15, "train.eval_every": 15, "eval.batch_size": 64}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def test_pretraining_learns_the_captions_and_loads(world, tmp_path):
    run = tmp_path / "lm"
    results = train(load_recipe("shapes-lm", lm_overrides(world)), run, progress=False)
    assert results["test/perplexity"] == pytest.approx(2.718281828 ** results["test/lm_loss"], rel=1e-6)
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0] - 1.0  # 30 steps on a tiny vocabulary: clearly learning
    assert any("val/lm_loss" in r for r in records)
    assert not (run / "preprocess.json").exists()  # no images in this family

    m = glimpse.load(run)
    assert isinstance(m, LanguageModelPipeline)
    caption, scrambled = "a small red circle on the left", "left the on circle red small a"
    ppl = m.perplexity([caption, scrambled])
    assert ppl[0] < ppl[1]  # the word order of the world has been learned

    prompts = ["a small red", "there is a large blue square on the left and"]
    batched = m.generate(prompts, max_new_tokens=6)
    assert batched == [m.generate([p], max_new_tokens=6)[0] for p in prompts]  # padding changes nothing
    assert all(isinstance(t, str) and t for t in batched)
    sampled = m.generate(prompts, max_new_tokens=6, do_sample=True, top_p=0.9, seed=1)
    assert sampled == m.generate(prompts, max_new_tokens=6, do_sample=True, top_p=0.9, seed=1)


def test_bad_decoder_settings_are_refused(world):
    with pytest.raises(GlimpseError, match="kv_heads 3 do not divide"):
        load_recipe("shapes-lm", ["model.kv_heads=3"])
    with pytest.raises(GlimpseError, match="arch 't5' must be llama or gpt2"):
        load_recipe("shapes-lm", ["model.arch=t5"])


def test_loss_at_targets_equals_the_full_loss():
    from glimpse.losses import lm_loss_at_targets
    from glimpse.models.decoder import CausalLM, DecoderConfig

    torch.manual_seed(0)
    m = CausalLM(DecoderConfig(vocab_size=50, width=32, layers=2, heads=4, kv_heads=2))
    ids = torch.randint(0, 50, (3, 9))
    labels = ids.masked_fill(torch.rand(3, 9) < 0.6, -100)
    full = lm_loss(m(ids), labels)
    torch.testing.assert_close(lm_loss_at_targets(m(ids, return_hidden=True), m.lm_head, labels), full)
    hidden = m(ids, return_hidden=True).detach().requires_grad_()
    lm_loss_at_targets(hidden, m.lm_head, labels).backward()
    assert hidden.grad[:, -1].abs().sum() == 0  # the last position predicts nothing


def test_world_documents_answer_in_one_style_and_cover_the_images(world):
    """`data.lm_text: world`: a caption of each image, its questions in the few-shot format, and
    a document's answers either all short or all full sentences."""
    from glimpse.data.conversations import vqa_items
    from glimpse.data.lm_text import WorldTexts
    from glimpse.data.pairs import load_pairs

    d = load_recipe("shapes-lm", [f"data.root={world}", "data.lm_text=world"]).data
    items, vqa = load_pairs(d, world, "train"), vqa_items(d, world, "train")
    texts = WorldTexts(items, vqa)
    short = {(q["question"], q["answer"]) for q in vqa}
    sentences = {(q["question"], q["sentence"]) for q in vqa}
    assert all(q["sentence"] and q["sentence"] != q["answer"] for q in vqa)  # the world writes both
    captions = {c for it in items for c in it.captions}
    styles = set()
    for idx in range(40):
        doc = texts[(idx, 3)]["text"]
        assert doc == texts[(idx, 3)]["text"]  # a key is one document
        assert doc.split("\n")[0] in captions
        qas = [line[len("Question: "):].split(" Answer: ") for line in doc.split("\n") if line.startswith("Question: ")]
        kinds = {"short" if tuple(qa) in short else "sentence" if tuple(qa) in sentences else "?" for qa in qas}
        assert "?" not in kinds and len(kinds) <= 1, doc
        styles |= kinds or {"caption"}
    assert styles == {"caption", "short", "sentence"}


def test_pretraining_on_world_documents(world, tmp_path):
    recipe = load_recipe("shapes-lm", lm_overrides(world, **{"data.lm_text": "world", "model.context_length": 96,
                                                              "train.max_steps": 20, "train.eval_every": 0}))
    results = train(recipe, tmp_path / "lm", progress=False)
    records = [json.loads(x) for x in (tmp_path / "lm" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0] - 1.0 and results["test/lm_loss"] < losses[0]
    m = glimpse.load(tmp_path / "lm")
    assert m.perplexity(["Question: how many shapes are there? Answer: 2"])[0] < \
        m.perplexity(["Answer: there how Question: shapes 2 many are?"])[0]
