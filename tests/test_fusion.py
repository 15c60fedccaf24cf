"""The fusion encoder (ALBEF): masking, hard negatives, tied MLM head, fusion operators, the loss,
freezing, fine-tuning from a pretraining run, VQA-classification and re-ranked retrieval eval."""

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from glimpse import runs
from glimpse.config import load_recipe
from glimpse.data.pairs import description_keys
from glimpse.errors import GlimpseError
from glimpse.families.fusion import FusionConfig, FusionEncoder, fusion_loss
from glimpse.families.fusion.answers import answer_scores, answer_vocabulary
from glimpse.losses import (
    clip_loss,
    hard_negative_indices,
    itc_loss,
    itm_hard_negatives,
    known_matches,
    mask_tokens,
)
from glimpse.metrics.retrieval import recall_from_scores
from glimpse.models.fusion import FUSIONS
from glimpse.models.text import TextConfig
from glimpse.models.vision import VisionConfig
from glimpse.train import checkpoint as ckpt
from glimpse.train.trainer import train

V = 50  # tiny vocabulary; id V is the appended mask token


def tiny_cfg(**kw) -> FusionConfig:
    return FusionConfig(vision=VisionConfig(image_size=16, patch_size=8, width=16, layers=1, heads=2, pool="mean",
                                            class_token=False),
                        text=TextConfig(vocab_size=V + 1, context_length=12, width=24, layers=1, heads=2, causal=False,
                                        pool="cls"),
                        fusion_layers=1, embed_dim=8, mask_token_id=V, **kw)


def tiny_batch(b=6, T=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (b, T), generator=g)
    ids[:, 0] = 1  # bos
    mask = torch.ones(b, T, dtype=torch.long)
    mask[0, 6:] = 0  # one padded caption
    ids[0, 6:] = 0
    return torch.randn(b, 3, 16, 16, generator=g), ids, mask


def tiny_overrides(world, recipe="pretrain", **extra):
    base = {"data.root": str(world), "data.image_size": 32, "data.num_workers": 0,
            "model.vision.image_size": 32, "model.vision.patch_size": 8, "model.vision.width": 32,
            "model.vision.layers": 1, "model.vision.heads": 2, "model.text.width": 32, "model.text.layers": 1,
            "model.text.heads": 2, "model.fusion_layers": 1, "model.embed_dim": 16, "model.rerank_k": 5,
            "train.batch_size": 16, "train.max_steps": 4, "train.warmup_steps": 1, "train.log_every": 1,
            "train.save_every": 4, "eval.batch_size": 64, "eval.splits": "[test]"}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


# -- masking -------------------------------------------------------------------------------------

def test_mask_tokens_picks_15_percent_and_splits_80_10_10():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (400, 60), generator=g)
    ids[:, 0], ids[:, -1] = 1, 2  # bos, eos: never masked
    mask = torch.ones_like(ids)
    mask[:, 50:] = 0  # padding: never masked
    masked, labels = mask_tokens(ids, mask, mask_id=1000, vocab_size=1000, special_ids=[0, 1, 2], generator=g)
    picked = labels != -100
    assert not picked[:, 0].any() and not picked[:, 50:].any()
    assert torch.equal(labels[picked], ids[picked])
    rate = picked[:, 1:50].float().mean().item()
    assert abs(rate - 0.15) < 0.01, rate
    n = picked.sum().item()
    to_mask = (masked[picked] == 1000).sum().item() / n
    kept = (masked[picked] == ids[picked]).sum().item() / n
    swapped = 1 - to_mask - kept
    assert abs(to_mask - 0.8) < 0.02 and abs(kept - 0.1) < 0.02 and abs(swapped - 0.1) < 0.02, (to_mask, kept)
    assert torch.equal(masked[~picked], ids[~picked])  # nothing else changes


# -- hard negatives --------------------------------------------------------------------------------

def test_hard_negatives_follow_similarity_and_never_the_positive():
    torch.manual_seed(0)
    sim = torch.zeros(4, 4)
    sim[0, 2] = 8.0  # row 0's hardest negative is column 2
    sim[:, :] += torch.eye(4) * 20  # the positives are the most similar of all
    draws = torch.stack([hard_negative_indices(sim, torch.arange(4)) for _ in range(300)])  # [300, 4]
    assert not (draws == torch.arange(4)).any()  # never the positive
    assert (draws[:, 0] == 2).float().mean() > 0.95  # drawn by similarity
    counts = torch.bincount(draws[:, 1], minlength=4)  # flat row: uniform over the 3 others
    assert counts[1] == 0 and counts.min().item() == 0 and (counts[[0, 2, 3]] > 60).all()
    # a duplicate of the positive (the same caption) is not a negative; when nothing else is left, it may be
    same = torch.zeros(4, 4, dtype=torch.bool)
    same[0, 2] = True
    draws = torch.stack([hard_negative_indices(sim, torch.arange(4), same) for _ in range(100)])
    assert not (draws[:, 0] == 2).any() and not (draws[:, 0] == 0).any()
    only_dup = torch.tensor([[True, True], [True, True]])
    assert hard_negative_indices(torch.zeros(2, 2), torch.arange(2), only_dup).tolist() == [1, 0]
    with pytest.raises(GlimpseError, match="at least 2 samples"):
        hard_negative_indices(torch.zeros(1, 1), torch.arange(1))


def test_known_matches_spread_itc_targets_and_are_never_itm_negatives():
    # image 0 shows a red circle and a blue square; image 1 a red circle; image 2 a blue square
    samples = [{"caption": "a red circle", "descriptions": ["scene 0", "a red circle", "a blue square"]},
               {"caption": "scene 1", "descriptions": ["scene 1", "a red circle"]},
               {"caption": "a blue square", "descriptions": ["scene 2", "a blue square"]}]
    keys = description_keys(samples, "caption")
    assert keys["image_keys"].shape == (3, 3) and (keys["image_keys"][1:, 2] == -1).all()
    t2i, i2t = known_matches(keys["text_keys"], keys["image_keys"])
    assert t2i.int().tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]
    assert i2t.int().tolist() == [[1, 0, 1], [1, 1, 0], [0, 0, 1]]
    torch.manual_seed(0)
    img, txt, scale = F.normalize(torch.randn(3, 8), dim=-1), F.normalize(torch.randn(3, 8), dim=-1), torch.tensor(10.0)
    eye = torch.eye(3, dtype=torch.bool)
    assert torch.allclose(itc_loss(img, txt, scale, matches=(eye, eye)), clip_loss(img, txt, scale))
    # by hand: each row's cross-entropy against its matches, shared evenly
    def soft_ce(logits, m):
        return -(logits.log_softmax(1) * m.float() / m.sum(1, keepdim=True)).sum(1).mean()
    want = (soft_ce(scale * img @ txt.T, i2t) + soft_ce(scale * txt @ img.T, t2i)) / 2
    assert torch.allclose(itc_loss(img, txt, scale, matches=(t2i, i2t)), want)
    # ITM: text 0's only true negative image is 2; image 0's only true negative text is 1
    out = {"image_embeds": img, "text_embeds": txt, "logit_scale": scale,
           "patches": torch.arange(3.0)[:, None, None].expand(3, 2, 4), "pooled": torch.arange(3.0)[:, None],
           "text_states": torch.arange(3.0)[:, None, None].expand(3, 5, 4), "text_mask": torch.ones(3, 5, dtype=torch.long),
           "input_ids": torch.arange(3)[:, None].expand(3, 5)}
    for _ in range(20):
        neg_patches, neg_pooled, neg_states, _ = itm_hard_negatives(out, matches=(t2i, i2t))
        assert neg_pooled[0, 0] == 2 and neg_states[0, 0, 0] == 1


def test_itm_negatives_are_other_samples_features():
    torch.manual_seed(0)
    model = FusionEncoder(tiny_cfg())
    pixels, ids, mask = tiny_batch()
    ids[3] = ids[4]  # samples 3 and 4 share a caption: neither is the other's negative
    mask[3] = mask[4]
    seen = {}

    def spy(out):
        seen.update(out)
        negs = itm_hard_negatives(out)
        seen["negs"] = negs
        return negs

    model(pixels, ids, mask, hard_negatives=spy)
    neg_patches, neg_pooled, neg_states, neg_mask = seen["negs"]
    for i in range(6):
        img = [j for j in range(6) if torch.equal(seen["patches"][j], neg_patches[i])]
        txt = [j for j in range(6) if torch.equal(seen["text_states"][j], neg_states[i])]
        assert len(img) == 1 and img[0] != i and {i, img[0]} != {3, 4}
        assert len(txt) == 1 and txt[0] != i and {i, txt[0]} != {3, 4}
        assert torch.equal(neg_mask[i], mask[txt[0]]) and torch.equal(neg_pooled[i], seen["pooled"][img[0]])


# -- model ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("op", FUSIONS)
def test_each_fusion_operator_forward_backward(op):
    torch.manual_seed(0)
    model = FusionEncoder(tiny_cfg(fusion=op))
    pixels, ids, mask = tiny_batch()
    mlm_ids, labels = mask_tokens(ids, mask, V, V, [0, 1], probability=0.3)
    out = model(pixels, ids, mask, mlm_ids, labels, itm_hard_negatives)
    n = (labels != -100).sum().item()
    assert out["itm_logits"].shape == (18, 2)
    assert out["mlm_logits"].shape == (n, V + 1) and out["mlm_targets"].shape == (n,)
    assert out["image_embeds"].shape == out["text_embeds"].shape == (6, 8)
    fused = model.fuse(out["text_states"], mask, out["patches"], out["pooled"])
    assert fused.shape == (6, 9, 24)
    loss, parts = fusion_loss(out, model.cfg)
    loss.backward()
    missing = [k for k, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == [], missing  # every part learns (DDP would refuse unused parameters)
    # the image really reaches the fused states (a different image changes them)
    other = model.encode_image(model.vision, torch.randn(6, 3, 16, 16))
    assert not torch.allclose(fused, model.fuse(out["text_states"], mask, *other))


def test_padding_does_not_change_fused_states():
    torch.manual_seed(0)
    model = FusionEncoder(tiny_cfg(fusion="concat")).eval()
    pixels, ids, mask = tiny_batch()
    patches, pooled = model.encode_image(model.vision, pixels)
    short = model.fuse(model.text.forward_features(ids[:1, :6], mask[:1, :6]), mask[:1, :6], patches[:1], pooled[:1])
    long = model.fuse(model.text.forward_features(ids[:1], mask[:1]), mask[:1], patches[:1], pooled[:1])
    torch.testing.assert_close(short, long[:, :6], atol=1e-5, rtol=1e-5)


def test_mlm_head_is_tied_to_the_text_embedding(tmp_path):
    torch.manual_seed(0)
    model = FusionEncoder(tiny_cfg())
    assert model.mlm_head.decoder.weight is model.text.token_embed.weight
    pixels, ids, mask = tiny_batch()
    mlm_ids, labels = mask_tokens(ids, mask, V, V, [0, 1], probability=0.5)
    out = model(pixels, ids, mask, mlm_ids, labels)
    F.cross_entropy(out["mlm_logits"], out["mlm_targets"]).backward()
    assert model.text.token_embed.weight.grad is not None
    # saved once, and still tied after loading
    opt = torch.optim.AdamW(model.parameters())
    path = ckpt.save_checkpoint(tmp_path, 1, model, opt, {})
    torch.manual_seed(1)
    other = FusionEncoder(tiny_cfg())
    runs.load_weights(other, path / "model.safetensors")
    assert other.mlm_head.decoder.weight is other.text.token_embed.weight
    torch.testing.assert_close(other.mlm_head.decoder.weight, model.text.token_embed.weight)


def test_loss_is_mlm_plus_alpha_itm_plus_beta_itc():
    torch.manual_seed(0)
    model = FusionEncoder(tiny_cfg(mlm_weight=0.5, itm_weight=2.0, itc_weight=3.0))
    pixels, ids, mask = tiny_batch()
    mlm_ids, labels = mask_tokens(ids, mask, V, V, [0, 1], probability=0.5)
    out = model(pixels, ids, mask, mlm_ids, labels, itm_hard_negatives)
    total, parts = fusion_loss(out, model.cfg)
    assert set(parts) == {"mlm", "itm", "itc"}
    assert total.item() == pytest.approx(0.5 * parts["mlm"] + 2.0 * parts["itm"] + 3.0 * parts["itc"], rel=1e-5)
    itm_ref = F.cross_entropy(out["itm_logits"], torch.tensor([1] * 6 + [0] * 12))
    assert parts["itm"] == pytest.approx(itm_ref.item(), rel=1e-5)
    assert parts["mlm"] == pytest.approx(F.cross_entropy(out["mlm_logits"], out["mlm_targets"]).item(), rel=1e-5)
    itc = clip_loss(out["image_embeds"], out["text_embeds"], out["logit_scale"])
    assert parts["itc"] == pytest.approx(itc.item(), rel=1e-5)


def test_momentum_distillation_teacher():
    torch.manual_seed(0)
    model = FusionEncoder(tiny_cfg(distill=True, momentum=0.9))
    assert all(not p.requires_grad for p in model.teacher.parameters())
    assert model.teacher["mlm_head"].decoder.weight is model.teacher["text"].token_embed.weight
    with torch.no_grad():
        for p in model.text.parameters():
            p.add_(1.0)  # the student moves away from its copy
    before = model.teacher["text"].final_norm.weight.clone()
    pixels, ids, mask = tiny_batch()
    mlm_ids, labels = mask_tokens(ids, mask, V, V, [0, 1], probability=0.5)
    out = model(pixels, ids, mask, mlm_ids, labels, itm_hard_negatives)
    # one EMA step: 0.9 * teacher + 0.1 * student
    torch.testing.assert_close(model.teacher["text"].final_norm.weight, 0.9 * before + 0.1 * model.text.final_norm.weight)
    assert out["teacher_mlm_logits"].shape == out["mlm_logits"].shape
    # the soft targets change the loss; with alpha 0 it is the plain one
    plain = clip_loss(out["image_embeds"], out["text_embeds"], out["logit_scale"])
    same = itc_loss(out["image_embeds"], out["text_embeds"], out["logit_scale"], out["teacher_image_embeds"],
                    out["teacher_text_embeds"], alpha=0.0)
    mixed = itc_loss(out["image_embeds"], out["text_embeds"], out["logit_scale"], out["teacher_image_embeds"],
                     out["teacher_text_embeds"], alpha=0.4)
    torch.testing.assert_close(same, plain)
    assert abs(mixed.item() - plain.item()) > 1e-4
    fusion_loss(out, model.cfg)[0].backward()  # the teacher takes no gradient
    assert all(p.grad is None for p in model.teacher.parameters())


def test_answer_vocabulary_and_soft_scores():
    items = [{"answer": "red"}, {"answer": "Red."}, {"answer": "2"}, {"answer": "yes"}, {"answer": "yes"}]
    assert answer_vocabulary(items) == ["red", "yes", "2"]
    assert answer_vocabulary(items, 1) == ["red"]
    s = answer_scores(["red", "yes", "2"], ["red"] * 8 + ["crimson", "Red"])
    assert s[0].item() == pytest.approx(1.0) and s[1] == 0 and s[2] == 0
    s = answer_scores(["red", "blue"], ["red"] * 2 + ["blue"] * 8)
    assert 0 < s[0].item() < 1 and s[1].item() == pytest.approx(1.0)


def test_recall_with_reranked_scores():
    sim = torch.tensor([[0.9, 0.8, 0.1], [0.2, 0.3, 0.9], [0.5, 0.4, 0.1]])  # ITC: captions 0, 1 right; 2 wrong
    target = torch.tensor([0, 1, 2])
    assert recall_from_scores(sim, target, (1,))["t2i_r1"] == pytest.approx(0.0 + 0 + 0 + 1 / 3)
    reranked = torch.full_like(sim, float("-inf"))
    reranked[0, :2] = torch.tensor([0.0, -1.0])  # re-ranked top 2 of each caption
    reranked[1, 1:] = torch.tensor([0.0, -1.0])
    reranked[2, :2] = torch.tensor([0.0, -1.0])  # its target was not a candidate: a miss
    assert recall_from_scores(reranked, target, (1,))["t2i_r1"] == pytest.approx(2 / 3)


# -- recipes, training, evaluation ----------------------------------------------------------------

@pytest.mark.parametrize("key,value,message", [
    ("model.fusion", "sum", "model.fusion: 'sum' is not one of cross_attention, concat, weighted_sum, product"),
    ("model.objective", "caption", "model.objective: 'caption' is not one of pretrain, retrieval, vqa"),
    ("model.text.causal", "true", "model.text.causal: True must be false"),
    ("model.mlm_probability", "1.5", "model.mlm_probability: 1.5 must be within (0, 1)"),
    ("model.itm_weight", "-1", "model.itm_weight: -1.0 must not be negative"),
    ("model.fusion_layers", "0", "model.fusion_layers: 0 must be at least 1"),
    ("model.momentum", "1.0", "model.momentum: 1.0 must be within [0, 1)"),
])
def test_recipe_validation_errors(key, value, message):
    with pytest.raises(GlimpseError) as e:
        load_recipe("shapes-fusion-pretrain", [f"{key}={value}"])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_phrase_captions_join_each_training_image_s_captions(world):
    """model.phrase_captions: each shapes-world training image's one-object phrases join its captions (the
    explanation study's ITM positives); refused where there are no scenes to read."""
    from glimpse.data.tokenizer import Tokenizer
    from glimpse.data.world import read_scenes
    from glimpse.families import get

    recipe = load_recipe("shapes-fusion-pretrain", tiny_overrides(world, **{"model.phrase_captions": "true"}))
    dataset, _ = get("fusion")(recipe, world, Tokenizer(world / "tokenizer.json")).train_data()
    scenes = {Path(w.path).name: w for w in read_scenes(world, "train")}
    for item in dataset.items[:10]:
        scene = scenes[Path(item.image).name]
        phrases = [f"a {o['size']} {o['colour']} {o['shape']}" for o in scene.scene]
        assert item.captions == scene.captions + phrases
    recipe = load_recipe("shapes-fusion-pretrain", tiny_overrides(world, **{"model.phrase_captions": "true",
                                                                            "model.phrase_repeat": "3"}))
    dataset, _ = get("fusion")(recipe, world, Tokenizer(world / "tokenizer.json")).train_data()
    item = dataset.items[0]
    phrases = [f"a {o['size']} {o['colour']} {o['shape']}" for o in scenes[Path(item.image).name].scene]
    assert item.captions == scenes[Path(item.image).name].captions + phrases * 3  # phrases weigh 3x as much
    # known_matches: a phrase's other images in the batch are known to match it, and the loss reads that
    recipe = load_recipe("shapes-fusion-pretrain", tiny_overrides(world, **{"model.phrase_captions": "true",
                                                                            "model.known_matches": "true"}))
    family = get("fusion")(recipe, world, Tokenizer(world / "tokenizer.json"))
    dataset, collate = family.train_data()
    samples = [dataset[(i, 5)] for i in range(16)]  # choice 5: each image's first phrase (after 5 captions)
    batch = collate(samples)
    t2i, _ = known_matches(batch["text_keys"], batch["image_keys"])
    for i, s in enumerate(samples):
        assert t2i[i].tolist() == [s["caption"] in other["descriptions"] for other in samples]
    assert t2i.sum() > 16  # some phrase names an object of another image too
    assert torch.isfinite(family.loss(family.build_model(), batch))
    with pytest.raises(GlimpseError, match="model.phrase_repeat"):
        load_recipe("shapes-fusion-pretrain", tiny_overrides(world, **{"model.phrase_repeat": "0"}))
    with pytest.raises(GlimpseError, match="model.phrase_captions"):
        load_recipe("shapes-fusion-pretrain", tiny_overrides(world, **{"model.phrase_captions": "true",
                                                                       "data.format": "wds"}))


@pytest.fixture(scope="module")
def pretrain_run(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("fusion") / "pretrain"
    train(load_recipe("shapes-fusion-pretrain", tiny_overrides(world)), out, progress=False)
    return out


def test_pretrain_run_evaluates_itc_and_reranked_retrieval(pretrain_run):
    results = json.loads((pretrain_run / "eval.json").read_text())
    for k in ("test/t2i_r1", "test/t2i_r1_rerank", "test/i2t_r1_rerank", "test/t2i_r5_rerank", "test/t2i_r1_itm"):
        assert 0.0 <= results[k] <= 1.0, k
    assert "test/t2i_r10_rerank" not in results  # k = 5: R@10 after re-ranking 5 would mean nothing
    records = [json.loads(x) for x in (pretrain_run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))


def test_vqa_finetune_from_pretrain_with_frozen_towers(world, pretrain_run, tmp_path):
    out = tmp_path / "vqa"
    results = train(load_recipe("shapes-fusion-vqa", tiny_overrides(
        world, **{"init": str(pretrain_run), "freeze": "[vision, text]", "eval.vqa_limit": 40})), out, progress=False)
    assert 0.0 <= results["test/vqa_acc"] <= 1.0 and "test/vqa_acc_yes_no" in results
    before, after = runs.read_weights(runs.latest_checkpoint(pretrain_run) / "model.safetensors"), \
        runs.read_weights(runs.latest_checkpoint(out) / "model.safetensors")
    assert not any(k.startswith(("mlm_head", "itm_head", "itc")) for k in after)  # heads VQA does not use
    assert any(k.startswith("vqa_head") for k in after)
    for k, v in after.items():
        if k.startswith(("vision.", "text.")):
            assert torch.equal(v, before[k]), k  # frozen parts kept the pretrained weights
    assert any(not torch.equal(v, before[k]) for k, v in after.items() if k.startswith("fusion."))
    # the run loads and answers from its own answer list
    import glimpse

    pipe = glimpse.load(out)
    images = sorted((world / "images" / "test").glob("*.png"))[:2]
    answers = pipe.ask(images, ["how many shapes are there?", "what colour is the circle?"])
    assert all(a in pipe.model.cfg.answers for a in answers)
    from glimpse.cli import main

    main(["--quiet", "eval", str(out), "--split", "test", "--set", "eval.vqa_limit=20", "--set", f"data.root={world}",
          "--json", str(tmp_path / "e.json")])
    assert "test/vqa_acc" in json.loads((tmp_path / "e.json").read_text())


def test_init_needs_a_fusion_run(world, tmp_path):
    from glimpse.families.dual_encoder.model import DualEncoder, DualEncoderConfig

    clip = DualEncoder(DualEncoderConfig(vision=VisionConfig(width=16, layers=1, heads=2),
                                         text=TextConfig(vocab_size=V, width=16, layers=1, heads=2), embed_dim=8))
    ckpt.save_checkpoint(tmp_path / "clip", 1, clip, torch.optim.AdamW(clip.parameters()), {})
    with pytest.raises(GlimpseError, match="no fusion part"):
        train(load_recipe("shapes-fusion-vqa", tiny_overrides(world, init=str(tmp_path / "clip"))), tmp_path / "x",
              progress=False)


def _ddp_worker(rank, world, store, results):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)  # no port to race for
    torch.manual_seed(rank)
    b, E = 3, 6
    # each local text's most similar image sits on the other process, at the same row
    emb = F.one_hot(torch.arange(b) + 3 * rank, E).float()
    img = emb.clone()
    txt = F.one_hot(torch.arange(b) + 3 * (1 - rank), E).float()
    patches = (torch.arange(b).float()[:, None, None] + 10 * rank).expand(b, 2, 4).clone().requires_grad_()
    states = torch.randn(b, 5 + rank, 4, requires_grad=True)  # unequal text lengths over processes
    out = {"image_embeds": img, "text_embeds": txt, "logit_scale": torch.tensor(100.0), "patches": patches,
           "pooled": patches[:, 0], "text_states": states, "text_mask": torch.ones(b, 5 + rank, dtype=torch.long),
           "input_ids": torch.arange(b)[:, None].expand(b, 5 + rank) + 10 * rank}
    # rank 0's first image also holds rank 1's first text (its key), and rank 1's images hold more keys
    text_keys = torch.arange(b) + 100 * rank
    image_keys = torch.cat([text_keys[:, None], torch.full((b, 1 + rank), -1)], 1)
    if rank == 0:
        image_keys[0, 1] = 100
    t2i, i2t = known_matches(text_keys, image_keys)
    results[f"matches{rank}"] = (t2i.nonzero().tolist(), i2t.nonzero().tolist())
    neg_patches, _, neg_states, neg_mask = itm_hard_negatives(out)
    owners = (neg_patches[:, 0, 0] // 10).long().tolist()
    neg_patches.sum().backward()
    dist.all_reduce(patches.grad)
    results[rank] = {"owners": owners, "rows": (neg_patches[:, 0, 0] % 10).long().tolist(),
                     "mask_len": neg_mask.shape[1], "grad": patches.grad.sum().item()}
    dist.destroy_process_group()


def test_hard_negatives_are_gathered_across_processes(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, tmp_path / "store", results), nprocs=2, join=True)
    for rank in range(2):
        r = results[rank]
        assert r["owners"] == [1 - rank] * 3 and r["rows"] == [0, 1, 2], r  # drawn from the other process
        assert r["mask_len"] == 6  # text padded to the longest over processes
        assert r["grad"] > 0  # the negative's owner gets its gradient
    # (t2i, i2t) nonzero [local row, global column]: the diagonal, and rank 1's first text with rank 0's first image
    assert results["matches0"] == ([[0, 0], [1, 1], [2, 2]], [[0, 0], [0, 3], [1, 1], [2, 2]])
    assert results["matches1"] == ([[0, 0], [0, 3], [1, 4], [2, 5]], [[0, 3], [1, 4], [2, 5]])
