"""Explanations in use (glimpse.explain): the pipelines explain end to end, randomised weights give other maps,
and a Hugging Face LLaVA folder explains too.  The equations, metrics and explain mode itself are tested in
test_explain.py and test_explain_parity.py; the command line and the server in test_explain_cli_serve.py."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image
from test_explain_parity import chefer_self_reference, fusion_modules, min_max, right_padded, tiny_fusion
from torch.testing import assert_close

import glimpse
from glimpse.errors import GlimpseError
from glimpse.explain import METHODS, Explanation, explain
from glimpse.explain.core import PIXEL_METHODS
from glimpse.explain.evaluate import evaluate_explanations, explain_cases, randomised
from glimpse.explain.relevance import ATTENTION_METHODS
from glimpse.explain.towers import grads_of
from glimpse.metrics.explain import spearman
from glimpse.models.attention import record_attention
from glimpse.models.decoder import DecoderConfig
from glimpse.models.vision import VisionConfig
from glimpse.models.vlm import VisionLanguageModel, VLMConfig

V = 40  # tiny vocabulary of the hand-built models
TIGHT = dict(atol=1e-5, rtol=1e-5)

# -- 7. the pipelines end to end --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def image(world):
    return world / "images" / "test" / "test_000000.png"


def assert_a_map(grid, shape=(4, 4)):
    assert grid.shape == shape and bool(torch.isfinite(grid).all())
    assert float(grid.min()) == 0.0 and float(grid.max()) in (0.0, 1.0)  # min-max scaled (all 0: constant)


@pytest.mark.parametrize("method", METHODS)
def test_dual_encoder_explains_every_method(dual, image, method):
    text = "a small red circle"
    (e,) = dual.explain([image], [text], method=method)
    assert isinstance(e, Explanation) and e.method == method and e.target == f"similarity to {text!r}"
    side = dual.transform.image_size if method in PIXEL_METHODS else 4  # a map per pixel, or per patch
    assert_a_map(e.grid, (side, side))
    assert e.score == pytest.approx(float(dual.embed_images([image]) @ dual.embed_texts([text])[0]), abs=1e-5)
    assert e.tokens == ["<bos>", "a", "small", "red", "circle", "<eos>"]
    if method in ATTENTION_METHODS:
        assert len(e.token_scores) == len(e.tokens) and all(0 <= s <= 1 for s in e.token_scores)
        assert max(e.token_scores) == 1.0
        assert float(e.grid.max()) == 1.0
    assert e.words == [] and e.seconds > 0
    d = e.to_dict()
    assert len(d["grid"]) == side and all(len(r) == side for r in d["grid"])
    assert json.loads(json.dumps(d))["method"] == method


def test_dual_encoder_explain_refuses_bad_calls(dual, image):
    with pytest.raises(GlimpseError, match="2 images but 1 texts"):
        dual.explain([image, image], ["a red circle"])
    with pytest.raises(ValueError, match="unknown explanation method"):
        dual.explain([image], ["a red circle"], method="nonsense")


def test_vlm_explains_its_own_answer_word_by_word(vlm, image):
    question = "what colour is the circle?"
    (e,) = vlm.explain([image], [question], method="raw")  # the answer greedy decoding gives
    answer = vlm.ask([image], [question], short=True)[0]
    assert e.target == f"answer {answer!r}"
    assert 1 <= len(e.words) <= 32 and all(isinstance(w, str) for w, _ in e.words)
    for _, g in e.words:
        assert_a_map(g)
    assert_a_map(e.grid)
    assert "what" in e.tokens and "colour" in e.tokens and len(e.tokens) == len(e.token_scores)


@pytest.mark.parametrize("method", METHODS)
def test_vlm_explains_every_method(vlm, image, method):
    explainer = vlm.explainer(image, question="what colour is the circle?", max_new_tokens=3)
    e = explain(explainer, method)
    assert e.method == method and e.target == f"answer {explainer.answer!r}"
    side = explainer.pixels.shape[-1] if method in PIXEL_METHODS else 4
    assert_a_map(e.grid, (side, side))
    assert math.isfinite(e.score) and e.score <= 0  # a log-probability
    if method not in ATTENTION_METHODS:
        assert e.words == [] and e.token_scores == []
    else:
        assert len(e.words) == len(explainer.answer_words) >= 1
        for _, g in e.words:
            assert_a_map(g)
        assert len(e.tokens) == len(e.token_scores) > 0 and all(0 <= s <= 1 for s in e.token_scores)


def test_vlm_explains_a_given_answer(vlm, image):
    question = "what colour is the circle?"
    (e,) = vlm.explain([image], [question], method="chefer", answers=["red"])
    assert e.target == "answer 'red'" and [w for w, _ in e.words] == ["red"]
    assert_a_map(e.words[0][1])
    (two,) = vlm.explain([image], [question], method="rollout", answers=["red circle"])
    assert two.target == "answer 'red circle'" and [w for w, _ in two.words] == ["red", "circle"]
    # the score is the answer's log-probability, read at the positions that predict its tokens
    ids, _ = vlm.question_prompt(question, image, short=True)
    answer = vlm.tokenizer.hf.encode("red circle", add_special_tokens=False).ids
    with torch.no_grad():
        logits = vlm.model(torch.tensor([ids + answer]), pixel_values=vlm.load_pixels(image)[None])[0]
    lp = logits.float().log_softmax(-1)
    assert e.score == pytest.approx(float(lp[len(ids) - 1, answer[0]]), abs=1e-4)
    assert two.score == pytest.approx(float(lp[len(ids) - 1, answer[0]] + lp[len(ids), answer[1]]), abs=1e-4)
    with pytest.raises(GlimpseError, match="1 images for 1 questions and 2 answers"):
        vlm.explain([image], ["what colour is the circle?"], answers=["red", "blue"])


def test_vlm_relevance_follows_the_rules_on_the_recorded_maps(vlm, image):
    """Chefer's text relevance (the predicting row of R less its identity) and Grad-CAM's patch map (the last
    LM layer's gradient-weighted row over the image tokens, spread onto the patches each token holds),
    recomputed here from the recorded maps."""
    from glimpse.models.connectors import pixel_shuffle

    question = "what colour is the circle?"
    ex = vlm.explainer(image, question=question, answer="red")
    m = vlm.model
    with record_attention() as rec, torch.enable_grad():
        logits = m(ex.ids, pixel_values=ex.pixels)
        row = logits[0, -2].float()  # the answer token's margin to the runner-up (what the gradient methods explain)
        answer = int(ex.answer_ids[0])
        target = row[answer] - torch.cat([row[:answer], row[answer + 1:]]).max()
    maps = rec.maps_of([b.attn for b in m.lm.blocks])
    grads = grads_of(target, maps)
    pos = ex.ids.shape[1] - 2  # the last prompt token predicts the one answer token
    image_rows = (ex.ids[0] == m.cfg.image_token_id).nonzero()[:, 0]
    text_rows = (ex.ids[0, :pos + 1] != m.cfg.image_token_id).nonzero()[:, 0]

    row = chefer_self_reference(maps, grads)[0, pos] - (torch.arange(ex.ids.shape[1]) == pos).float()
    assert_close(torch.tensor(explain(ex, "chefer").token_scores), min_max(row[text_rows]), atol=1e-4, rtol=1e-4)

    cam = (grads[-1] * maps[-1]).clamp(min=0).mean(1)[0, pos, image_rows]  # [image tokens]
    f, side = m.cfg.pixel_shuffle, m.cfg.vision.image_size // m.cfg.vision.patch_size
    held = pixel_shuffle(torch.arange(float(side * side)).view(1, -1, 1), f)[0].long()  # token -> its patches
    patches = torch.zeros(side * side)
    for k, cells in enumerate(held):
        patches[cells] = cam[k] / (f * f)
    e = explain(ex, "gradcam")
    assert_close(e.grid, min_max(patches).view(side, side), atol=1e-4, rtol=1e-4)
    assert_close(e.words[0][1], e.grid)  # one word: its map is the whole map


def test_vlm_explain_chat_explains_the_last_assistant_message(vlm, image):
    picture = Image.open(image).convert("RGB")
    asked = {"role": "user", "content": [{"type": "image", "image": picture},
                                         {"type": "text", "text": "what colour is the circle?"}]}
    e = vlm.explain_chat([asked, {"role": "assistant", "content": "red"}], method="raw")
    assert e.target == "answer 'red'" and [w for w, _ in e.words] == ["red"]
    ids, _ = vlm.chat_prompt([asked])  # the answer is explained after the prompt that asked for it
    assert e.tokens == vlm.tokenizer.pieces([t for t in ids if t != vlm.model.cfg.image_token_id])
    with pytest.raises(GlimpseError, match="non-empty text"):
        vlm.explain_chat([asked, {"role": "assistant", "content": "  "}])
    two = {"role": "user", "content": [{"type": "image", "image": picture}, {"type": "image", "image": picture},
                                       {"type": "text", "text": "which is red?"}]}
    with pytest.raises(GlimpseError, match="one image"):
        vlm.explain_chat([two, {"role": "assistant", "content": "red"}])


def test_vlm_image_token_relevance_lands_on_the_patches_the_token_holds():
    """With a 2 x 2 pixel shuffle each image token stands for 4 patches: its relevance is spread over exactly
    those, as glimpse.models.connectors.pixel_shuffle groups them."""
    from types import SimpleNamespace

    from glimpse.explain.explainers import VisionLanguageExplainer
    from glimpse.models.connectors import pixel_shuffle

    torch.manual_seed(0)
    lm = DecoderConfig(arch="llama", vocab_size=V, width=32, layers=1, heads=2, context_length=32)
    m = VisionLanguageModel(VLMConfig(vision=VisionConfig(image_size=32, patch_size=8, width=16, layers=1, heads=2),
                                      lm=lm, pixel_shuffle=2, image_token_id=V - 1))
    assert m.image_tokens == 4
    held = pixel_shuffle(torch.arange(16.0).view(1, 16, 1), 2)[0]  # [4 tokens, 4 patch numbers]
    fake = SimpleNamespace(model=m)
    for k in range(4):
        onehot = torch.zeros(4)
        onehot[k] = 1.0
        grid = VisionLanguageExplainer._to_patches(fake, onehot, None)
        expected = torch.zeros(16)
        expected[held[k].long()] = 0.25
        assert_close(grid, expected)
        through_tower = VisionLanguageExplainer._to_patches(fake, onehot, torch.eye(17))  # class token + 16
        assert_close(through_tower, expected)


def test_fusion_explainer_every_method():
    from glimpse.families.fusion.explain import FusionExplainer

    px = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(8))
    ids, mask = right_padded((6,), 8, seed=2)
    tokens = [f"t{i}" for i in range(8)]
    for objective in ("pretrain", "vqa"):
        m = tiny_fusion(objective)
        ex = FusionExplainer(m, px, ids, mask, tokens, "six words", answer="blue" if objective == "vqa" else None)
        assert ex.target == ("answer 'blue'" if objective == "vqa" else "match with 'six words'")
        with torch.no_grad():
            logits = (m.answer_logits(px, ids, mask) if objective == "vqa" else
                      m.itm_logits(m.text.forward_features(ids, mask), mask, *m.encode_image(m.vision, px)))
        expected = logits.log_softmax(-1)[0, 1]  # the match class, or "blue" (answer 1)
        assert ex.base_score == pytest.approx(float(expected), abs=1e-5)
        for method in METHODS:
            e = explain(ex, method)
            assert_a_map(e.grid, (16, 16) if method in PIXEL_METHODS else (2, 2))
            if method in ("chefer", "rollout"):
                assert len(e.token_scores) == 8 and e.token_scores[6:] == [0.0, 0.0]  # padding
    with pytest.raises(GlimpseError, match="not one of"):
        FusionExplainer(tiny_fusion("vqa"), px, ids, mask, tokens, "six words", answer="purple")


def handle_residual(R):
    """Chefer's eqs. 8-9 as hila-chefer/Transformer-MM-Explainability writes them, with a guard for a row that
    holds nothing but its identity (a padding token's, which nothing reads: 0 rather than 0 / 0)."""
    eye = torch.eye(R.shape[-1])
    r = R - eye
    sums = r.sum(-1, keepdim=True)
    return torch.where(sums > 0, r / sums.clamp_min(1e-30), r) + eye


def test_fusion_chefer_map_follows_the_bimodal_rules():
    """The image map of a fusion model's match: rules 6-7 through each tower and each fusion layer's
    self-attention, rule 10 (R_ti += R̄_ttᵀ Ā R̄_ii) at each cross-attention, then the [CLS] row of R_ti over
    the patches; recomputed here from the recorded maps in the order the layers run."""
    from glimpse.families.fusion.explain import FusionExplainer

    m = tiny_fusion("pretrain")
    px = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(8))
    ids, mask = right_padded((6,), 8, seed=2)
    ex = FusionExplainer(m, px, ids, mask, [f"t{i}" for i in range(8)], "six words")
    with record_attention() as rec, torch.enable_grad():
        target = ex._target(ex._logits(px, m.text.forward_features(ids, mask)))[0]
    mods = fusion_modules(m)
    maps = rec.maps_of(mods)
    grads = dict(zip(map(id, mods), grads_of(target, maps)))
    attn = dict(zip(map(id, mods), maps))

    def cam(mod):
        return (grads[id(mod)] * attn[id(mod)]).clamp(min=0).mean(1)[0]

    def through(mods_, R):
        for mod in mods_:
            R = R + cam(mod) @ R
        return R

    R_ii = through([b.attn for b in m.vision.blocks], torch.eye(5))
    R_tt = through([b.attn for b in m.text.blocks], torch.eye(8))
    R_ti = torch.zeros(8, 5)
    for b in m.fusion.blocks:
        a = cam(b.attn)
        R_tt, R_ti = R_tt + a @ R_tt, R_ti + a @ R_ti
        R_ti = R_ti + handle_residual(R_tt).T @ cam(b.cross) @ handle_residual(R_ii)
    e = explain(ex, "chefer")
    assert_close(e.grid, min_max(R_ti[0, 1:]).view(2, 2), atol=1e-4, rtol=1e-4)


def test_fusion_chefer_token_scores_leave_out_the_cls_tokens_own_identity():
    from glimpse.families.fusion.explain import FusionExplainer

    m = tiny_fusion("pretrain")
    px = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(8))
    ids, mask = right_padded((6,), 8, seed=2)
    ex = FusionExplainer(m, px, ids, mask, [f"t{i}" for i in range(8)], "six words")
    e = explain(ex, "chefer")
    # the reference: rules 5-6 through the text tower and the fusion layers' self-attention (the cross-attention
    # adds nothing to R_tt: the image never attends to the text), then the [CLS] row without its own entry
    text_mods = [b.attn for b in m.text.blocks] + [b.attn for b in m.fusion.blocks]
    with record_attention() as rec, torch.enable_grad():
        target = ex._target(ex._logits(px, m.text.forward_features(ids, mask)))[0]
    maps = rec.maps_of(text_mods)
    R = chefer_self_reference(maps, grads_of(target, maps))
    row = (R[0, 0] * mask[0]).detach()
    row[0] = 0
    assert_close(torch.tensor(e.token_scores), min_max(row), atol=1e-4, rtol=1e-4)


def test_explain_cases_name_one_object_of_two_or_three(world):
    cases = explain_cases(world, "test", n=200, asks="texts")  # every scene of 2-3 objects that names one
    assert 4 <= len(cases) < 40 and explain_cases(world, "test", n=4, asks="texts") == cases[:4]
    coco = json.loads((world / "annotations" / "instances_test.json").read_text())
    by_file = {im["file_name"]: im["id"] for im in coco["images"]}
    for c in cases:
        objs = [a for a in coco["annotations"] if a["image_id"] == by_file[c.image.rsplit("/", 1)[-1]]]
        assert len(objs) in (2, 3) and c.kind == "name" and c.answer == ""
        named = [o for o in objs if o["bbox"] == c.box]
        assert len(named) == 1 and c.text == f"a {named[0]['size']} {named[0]['colour']} {named[0]['shape']}"
        assert sum((o["colour"], o["shape"]) == (named[0]["colour"], named[0]["shape"]) for o in objs) == 1
    questions = explain_cases(world, "test", n=4, asks="questions")
    assert [c.kind for c in questions] == ["colour", "shape", "colour", "shape"]
    assert all(c.answer and c.text.startswith("what ") for c in questions)
    with pytest.raises(GlimpseError, match="missing"):
        explain_cases(world / "nowhere", "test")


def test_evaluate_explanations_gives_every_figure(dual, world):
    cases = explain_cases(world, "test", n=4, asks="texts")
    out = evaluate_explanations(dual, cases, deletion_n=2, sanity_n=2)
    for method in METHODS:
        for figure in ("pointing", "energy", "deletion_auc", "randomised_rho", "ms"):
            key = f"explain/{method}/{figure}"
            assert key in out and math.isfinite(out[key]), key
        assert 0 <= out[f"explain/{method}/pointing"] <= 1 and 0 <= out[f"explain/{method}/energy"] <= 1
        assert -1 <= out[f"explain/{method}/randomised_rho"] <= 1 and out[f"explain/{method}/ms"] > 0
    for figure in ("pointing", "energy"):
        assert 0 < out[f"explain/random/{figure}"] < 1
    assert out["explain/random/pointing"] > out["explain/random/energy"]  # the tolerance grows the box
    assert out["explain/random/energy"] < out["explain/ideal/energy"] <= 1  # the best a 4 x 4 map can do
    assert math.isfinite(out["explain/random/deletion_auc"])
    assert out["explain/n"] == 4
    with pytest.raises(GlimpseError, match="no explanation cases"):
        evaluate_explanations(dual, [])


# -- 8. model randomisation -------------------------------------------------------------------------------
def test_randomised_redraws_every_weight_of_a_copy_only(dual, image):
    before = {k: v.clone() for k, v in dual.model.state_dict().items()}
    (trained,) = dual.explain([image], ["a small red circle"], method="chefer")
    other = randomised(dual, seed=0)
    assert other.model is not dual.model
    mine = dict(dual.model.named_parameters())
    for name, p in other.model.named_parameters():
        if p.numel() > 1:
            assert not torch.equal(p, mine[name]), name
            assert float(p.detach().std()) == pytest.approx(float(mine[name].detach().std()), rel=0.5), name
    for k, v in dual.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    (again,) = dual.explain([image], ["a small red circle"], method="chefer")
    assert torch.equal(again.grid, trained.grid)
    (redrawn,) = other.explain([image], ["a small red circle"], method="chefer")
    assert not torch.equal(redrawn.grid, trained.grid)
    assert redrawn.score != pytest.approx(trained.score)
    assert_close(randomised(dual, seed=0).model.state_dict(), other.model.state_dict())  # seeded


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_spearman_of_maps_on_a_gpu():
    m = torch.rand(4, 4, device="cuda")
    assert spearman(m, m) == pytest.approx(1.0)


@cuda
def test_randomised_on_a_gpu(tiny_run):
    pipe = glimpse.load(tiny_run, device="cuda")
    other = randomised(pipe)
    assert next(other.model.parameters()).is_cuda


# -- a Hugging Face LLaVA folder -------------------------------------------------------------------------
def test_a_hugging_face_llava_folder_explains_an_answer(tmp_path, image):
    """A LlavaForConditionalGeneration folder loaded by glimpse explains like a glimpse run: the answer's
    relevance through its Llama LM and on through its CLIP tower (class token dropped, penultimate layer)."""
    pytest.importorskip("transformers")
    from test_hf_llava import write_llava_folder

    write_llava_folder(tmp_path)
    pipe = glimpse.load(tmp_path)
    for method in METHODS:
        e = pipe.explain([image], ["w3 w4 w5"], method=method, answers=["w7 w8"])[0]
        assert e.target == "answer 'w7 w8'"
        # occlusion and integrated gradients: one map (per pixel for the latter)
        assert [w for w, _ in e.words] == (["w7", "w8"] if method in ATTENTION_METHODS else [])
        side = pipe.transform.image_size if method in PIXEL_METHODS else 2
        assert e.grid.shape == (side, side) and torch.isfinite(e.grid).all() and float(e.grid.max()) <= 1
    with record_attention() as rec, torch.no_grad():
        ex = pipe.explainer(image, question="w3 w4 w5", answer="w7 w8")
        logits = pipe.model(ex.ids, pixel_values=ex.pixels)
    assert_close(logits, pipe.model(ex.ids, pixel_values=ex.pixels), atol=1e-5, rtol=1e-5)  # explain mode = fast path
    assert len(rec.calls) >= len(pipe.model.lm.blocks)
