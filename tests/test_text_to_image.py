"""Text-to-image: the priors' sampling (MaskGIT's schedule, the autoregressive KV cache, guidance), the
generation metrics against hand computations, and a tiny run trained, evaluated, loaded and used from
the command line."""

from __future__ import annotations

import json
import math
import random
import subprocess

import numpy as np
import pytest
import torch
from conftest import PY, tiny_t2i_overrides, tiny_vq_overrides
from PIL import Image

from glimpse.data.shapes_words import parse_caption, scene_caption, scene_key
from glimpse.data.world import read_scenes
from glimpse.errors import GlimpseError
from glimpse.families.text_to_image.evaluate import hard_negatives
from glimpse.families.text_to_image.model import TextToImage, TextToImageConfig
from glimpse.families.text_to_image.sampling import sample_autoregressive, sample_maskgit
from glimpse.metrics.generation import clip_score, frechet_distance, hard_r_precision, r_precision
from glimpse.models.decoder import DecoderConfig
from glimpse.models.dual_encoder import DualEncoderConfig
from glimpse.models.text import TextConfig
from glimpse.models.vision import VisionConfig
from glimpse.models.vq import VQConfig


def tiny_model(kind: str, groups: int = 1) -> TextToImage:
    torch.manual_seed(0)
    vq = VQConfig(block_out_channels=[8, 8, 16], norm_num_groups=8, latent_channels=8, vq_embed_dim=4,
                  num_vq_embeddings=16, sample_size=16, codebook_groups=groups)  # 4 x 4 codes (x groups)
    prior = DecoderConfig(arch="gpt2", vocab_size=16 * groups + 1, width=32, layers=2, heads=2, cross_attention=True,
                          bidirectional=kind == "maskgit",
                          context_length=vq.tokens_per_image + (kind == "autoregressive"))
    clip = DualEncoderConfig(vision=VisionConfig(image_size=16, patch_size=8, width=32, layers=1, heads=2),
                             text=TextConfig(vocab_size=50, context_length=12, width=32, layers=1, heads=2), embed_dim=16)
    return TextToImage(TextToImageConfig(clip=clip, vq=vq, prior=prior, kind=kind)).eval()


def prompts(n: int = 3):
    ids = torch.randint(3, 50, (n, 7))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0  # one padded prompt
    return ids, mask


def test_maskgit_unmasks_on_the_cosine_schedule():
    model = tiny_model("maskgit")
    N, mask_id = 16, model.cfg.special_id
    seen = []
    forward = model.forward

    def spy(inputs, memory, memory_mask):
        seen.append((inputs[: len(inputs) // 2] == mask_id).sum(1).tolist())
        return forward(inputs, memory, memory_mask)

    model.forward = spy
    memory, memory_mask = model.text_memory(*prompts())
    codes = sample_maskgit(model, memory, memory_mask, steps=4, guidance=2.0, temperature=1.0, choice_temperature=4.5,
                           generator=torch.Generator().manual_seed(0))
    assert codes.shape == (3, N) and not (codes == mask_id).any() and codes.max() < 16
    expected = [N] + [math.floor(N * math.cos(math.pi / 2 * t / 4)) for t in (1, 2, 3)]
    assert seen == [[e] * 3 for e in expected]  # 16, 14, 11, 6 still masked before each step


def test_one_maskgit_step_fills_the_grid_and_greedy_is_deterministic():
    model = tiny_model("maskgit")
    memory, memory_mask = model.text_memory(*prompts())
    a = sample_maskgit(model, memory, memory_mask, steps=1, guidance=1.0, temperature=0.0, choice_temperature=0.0)
    b = sample_maskgit(model, memory, memory_mask, steps=1, guidance=1.0, temperature=0.0, choice_temperature=0.0)
    with torch.no_grad():
        full = model(torch.full((3, 16), model.cfg.special_id), memory, memory_mask).argmax(-1)
    assert torch.equal(a, b) and torch.equal(a, full)


@pytest.mark.parametrize("kind", ["maskgit", "autoregressive"])
def test_priors_write_every_group_of_a_product_quantised_tokenizer(kind):
    """With codebook groups the prior writes G codes a position, group g's from its own ids (offset by
    g * K, the other groups' ids never sampled there), and the tokenizer decodes them, back in its own ids,
    as its grid of [h, w, G] codes."""
    model = tiny_model(kind, groups=2)
    memory, memory_mask = model.text_memory(*prompts())
    sample = sample_maskgit if kind == "maskgit" else sample_autoregressive
    extra = {"steps": 4, "choice_temperature": 1.0} if kind == "maskgit" else {}
    codes = sample(model, memory, memory_mask, guidance=2.0, temperature=5.0,  # hot: every id is likely
                   generator=torch.Generator().manual_seed(0), **extra)
    assert codes.shape == (3, 32)
    assert codes[:, 0::2].max() < 16 and codes[:, 1::2].min() >= 16 and codes[:, 1::2].max() < 32
    tokens = model.vq_ids(codes)
    assert torch.equal(model.prior_ids(tokens), codes) and tokens.max() < 16
    with torch.no_grad():
        images = model.vq.decode_tokens(tokens)
        torch.testing.assert_close(images, model.vq.decode_tokens(tokens.view(3, 4, 4, 2)))
    assert images.shape == (3, 3, 16, 16)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_autoregressive_cache_equals_recompute(guidance):
    model = tiny_model("autoregressive")
    memory, memory_mask = model.text_memory(*prompts())
    got = sample_autoregressive(model, memory, memory_mask, guidance=guidance, temperature=0.0)
    uncond = torch.zeros_like(memory_mask)
    uncond[..., 0] = True
    rows = torch.full((3, 1), model.cfg.special_id)
    with torch.no_grad():
        for _ in range(16):  # no cache: the whole sequence again for every code
            both = model(torch.cat([rows, rows]), torch.cat([memory, memory]), torch.cat([memory_mask, uncond]))[:, -1]
            c, u = both.chunk(2)
            rows = torch.cat([rows, (u + guidance * (c - u)).argmax(-1, keepdim=True)], 1)
    assert torch.equal(got, rows[:, 1:])


@pytest.mark.parametrize("mode", ["conjunction", "leave_one_out"])
def test_composed_guidance_adds_one_term_per_phrase(mode):
    """One MaskGIT step with phrases equals the formula computed from separate forward passes:
    u + g (c - u) + w sum_i (c_i - u) (conjunction) or + w sum_i (c - c_-i) (leave one out)."""
    model = tiny_model("maskgit")
    ids, mask = prompts()
    memory, memory_mask = model.text_memory(ids, mask)
    p_ids, p_mask = torch.randint(3, 50, (3, 4)), torch.ones(3, 4, dtype=torch.long)  # shorter than the prompts
    owner = torch.tensor([0, 0, 2])  # prompt 0 has two phrases, prompt 1 none, prompt 2 one
    p_memory, p_memory_mask = model.text_memory(p_ids, p_mask)
    g, w = 2.0, 0.7
    got = sample_maskgit(model, memory, memory_mask, steps=1, guidance=g, temperature=0.0, choice_temperature=0.0,
                         phrases=(p_memory, p_memory_mask, owner, w, mode))
    blank = torch.full((3, 16), model.cfg.special_id)
    uncond = torch.zeros_like(memory_mask)
    uncond[..., 0] = True
    with torch.no_grad():
        c, u = model(blank, memory, memory_mask), model(blank, memory, uncond)
        per = model(blank, p_memory, p_memory_mask)
    want = u + g * (c - u)
    for i, row in enumerate(owner.tolist()):
        want[row] += w * ((per[i] - u[row]) if mode == "conjunction" else (c[row] - per[i]))
    assert torch.equal(got, want.argmax(-1))
    plain = sample_maskgit(model, memory, memory_mask, steps=1, guidance=g, temperature=0.0, choice_temperature=0.0)
    assert torch.equal(got[1], plain[1]) and not torch.equal(got, plain)


def test_prompts_split_into_object_phrases():
    from glimpse.families.text_to_image.pipeline import split_phrases

    assert split_phrases("there is a small green circle at the top, a large yellow cross at the bottom") == [
        "there is a small green circle at the top", "a large yellow cross at the bottom"]
    assert split_phrases("a large red circle on the left and a small blue square at the top") == [
        "a large red circle on the left", "a small blue square at the top"]
    assert split_phrases("a picture of a small yellow square near the bottom") == []  # one object: nothing to compose
    assert split_phrases("a red circle, a blue square, and a green cross") == ["a red circle", "a blue square",
                                                                             "a green cross"]


def test_a_dropped_text_reads_only_the_null_slot():
    model = tiny_model("maskgit")
    ids, mask = prompts()
    memory, memory_mask = model.text_memory(ids, mask, keep=torch.tensor([True, False, False]))
    assert memory_mask[1, 0, 0].tolist() == [True] + [False] * (memory.shape[1] - 1)
    assert memory_mask[0, 0, 0, :7].all() and not memory_mask[0, 0, 0, 7:].any()  # null, pooled, 5 real tokens
    inputs = torch.full((3, 16), model.cfg.special_id)
    with torch.no_grad():
        out = model(inputs, memory, memory_mask)
    torch.testing.assert_close(out[1], out[2])  # different prompts, both dropped: the same logits
    assert not torch.allclose(out[0], out[1])


def test_r_precision_and_clip_score_by_hand():
    eye = torch.eye(4)
    assert r_precision(eye, eye, negatives=3, repeats=2) == 1.0
    assert r_precision(eye, eye.roll(1, 0), negatives=3) == 0.0  # each image matches another prompt best
    # 2 of 4 images closer to a negative than to their prompt, whichever negatives are drawn (all 3 are)
    images = torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0.4, 0.6], [0, 0, 0.6, 0.4]])
    assert r_precision(images, eye, negatives=3, repeats=3) == 0.5
    negs = torch.stack([eye[[1, 2]], eye[[0, 2]], eye[[3, 0]], eye[[2, 0]]])  # [4, 2, 4]
    assert hard_r_precision(images, eye, negs) == 0.5
    assert clip_score(eye, eye) == pytest.approx(1.0)
    assert clip_score(torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 0.0]])) == pytest.approx(math.sqrt(0.5))


def test_frechet_distance_by_hand_and_against_scipy():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0, 3.0])
    b = torch.randn(4000, 3, generator=g, dtype=torch.float64) * torch.tensor([2.0, 2.0, 1.0]) + 1.0
    # diagonal Gaussians: |mu_a - mu_b|^2 + sum (sigma_a - sigma_b)^2, up to sampling error
    assert frechet_distance(a, b) == pytest.approx(3.0 + 1.0 + 0.0 + 4.0, rel=0.05)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    linalg = pytest.importorskip("scipy.linalg")
    x, y = torch.randn(50, 6, generator=g, dtype=torch.float64), torch.randn(60, 6, generator=g, dtype=torch.float64)
    sa, sb = np.cov(x.numpy().T), np.cov(y.numpy().T)
    ref = ((x.mean(0) - y.mean(0)) ** 2).sum().item() + np.trace(sa + sb - 2 * linalg.sqrtm(sa @ sb).real)
    assert frechet_distance(x, y) == pytest.approx(ref, rel=1e-6)


def test_hard_negatives_change_one_thing():
    scene = [{"size": "large", "colour": "red", "shape": "circle", "position": "left"},
             {"size": "small", "colour": "blue", "shape": "square", "position": "top"}]
    truth = scene_key(scene)
    negatives = hard_negatives(scene, random.Random(0))
    assert len(negatives) == 9 == len(set(negatives))
    for caption in negatives:
        parsed = parse_caption(caption)
        assert parsed is not None and parsed != truth and len(parsed) == 2
        changed = sum(a != b for x, y in zip(sorted(parsed), sorted(truth)) for a, b in zip(x, y))
        swapped = sorted((o[1], o[2]) for o in parsed) == sorted((o[1], o[2]) for o in truth) or \
            sorted(o[1] for o in parsed) == sorted(o[1] for o in truth)
        assert changed >= 1 and (changed <= 2 or swapped)
    assert parse_caption(scene_caption(scene)) == truth


def test_train_evaluate_load_and_generate(tiny_t2i_run, world, cli_env, tmp_path):
    import glimpse

    figures = json.loads((tiny_t2i_run / "eval.json").read_text())
    for split in ("test", "test_novel"):
        for key in ("exact_1", "per_object_1", "clip_rprec_1", "hard_rprec_1", "exact_rerank", "clip_rprec_rerank",
                    "clip_rprec_real"):
            assert 0 <= figures[f"{split}/{key}"] <= 1, key
        for key in ("fd_gclip_1", "fd_gclip_rerank", "fd_gclip_real"):
            assert 0 <= figures[f"{split}/{key}"] < float("inf"), key
        assert math.isfinite(figures[f"{split}/clip_score_ratio_1"])
        assert figures[f"{split}/n"] == 12
    assert "test_novel/novel_object_1" in figures

    pipe = glimpse.load(tiny_t2i_run)
    images = pipe.generate_images("a large red circle on the left", n=2, seed=3)
    assert len(images) == 2 and images[0].size == (32, 32) and images[0].mode == "RGB"
    again = pipe.generate_images(["a large red circle on the left"], n=2, seed=3)[0]
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(images, again))
    best = pipe.generate_images("a small blue square at the top", n=1, seed=0, candidates=3)
    assert len(best) == 1
    for bad in ({"n": 0}, {"n": 65}, {"steps": 0}, {"guidance": -1.0}):
        with pytest.raises(GlimpseError):
            pipe.generate_images("a red circle", **{"n": 1, **bad})
    with pytest.raises(GlimpseError, match="non-empty"):
        pipe.generate_images("  ")
    two = ["a large red circle on the left and a small blue square at the top"]
    composed = pipe.generate_arrays(two, 2, phrase_guidance=2.0)
    assert composed.shape == (1, 2, 32, 32, 3) and not np.array_equal(composed, pipe.generate_arrays(two, 2))

    out = tmp_path / "gen"
    r = subprocess.run([PY, "-m", "glimpse", "generate", str(tiny_t2i_run), "a large red circle on the left",
                        "--n", "2", "--out", str(out), "--seed", "1", "--steps", "2"],
                       env=cli_env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["0001-00.png", "0001-01.png"]
    # --guidance reaches the sampler: the files are the API's images at that guidance
    unguided = tmp_path / "unguided"
    r = subprocess.run([PY, "-m", "glimpse", "generate", str(tiny_t2i_run), "a large red circle on the left",
                        "--n", "2", "--out", str(unguided), "--seed", "1", "--steps", "2", "--guidance", "0"],
                       env=cli_env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    want = pipe.generate_images("a large red circle on the left", n=2, seed=1, steps=2, guidance=0.0)
    got = [np.asarray(Image.open(unguided / f"0001-0{i}.png")) for i in range(2)]
    assert all(np.array_equal(g, np.asarray(w)) for g, w in zip(got, want))
    default = [np.asarray(Image.open(out / f"0001-0{i}.png")) for i in range(2)]
    assert not all(np.array_equal(g, d) for g, d in zip(got, default))
    r = subprocess.run([PY, "-m", "glimpse", "generate", str(tiny_t2i_run), "x", "--n", "100"],
                       env=cli_env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--n" in r.stderr


def test_the_prior_trains_on_streamed_image_caption_shards(world, tiny_run, tiny_vq_run, tmp_path):
    """From image-caption shards (`data.stream`), each batch's images are encoded by the frozen tokenizer in the
    loss: the codes are those the cached path computes for the same images; the run trains; the recipe check
    refuses what needs the world (evaluation by its scene parser, caption_drop's scene descriptions)."""
    import shutil

    from glimpse.api import load_run
    from glimpse.config import load_recipe
    from glimpse.data.pairs import StreamPairs
    from glimpse.data.stream import ShardSample, read_shard
    from glimpse.families.base import vq_transform
    from glimpse.families.text_to_image.data import encode_codes
    from glimpse.train.trainer import train

    root = tmp_path / "data"
    (root / "shards").mkdir(parents=True)
    shutil.copy(world / "tokenizer.json", root / "tokenizer.json")
    for shard in (world / "shards").glob("train-*.tar"):
        shutil.copy(shard, root / "shards" / shard.name)
    sets = {"data.source": "wds", "data.stream": "true", "data.root": str(root), "data.shuffle_buffer": 8,
            "data.files": "{train: 'shards/train-*.tar'}", "eval.splits": "[]", "eval.during_train": "[]",
            "train.threads": 1, "train.max_steps": 3, "train.save_every": 3}
    recipe = load_recipe("shapes-t2i", tiny_t2i_overrides(world, tiny_run, tiny_vq_run, **sets))
    train(recipe, tmp_path / "run", progress=False)
    assert len([r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
                if "loss" in r]) == 3
    _, model = load_run(tmp_path / "run")
    transform = vq_transform(recipe.model.vq)
    shard = sorted((root / "shards").glob("*.tar"))[0]
    samples = list(read_shard(str(shard)))[:6]
    decode = StreamPairs(transform, recipe.data.max_pixels, 0)
    pixels = torch.stack([decode(ShardSample(str(shard), k, f, 0))["pixel_values"] for k, f in samples])
    streamed = model.vq.tokens(pixels).flatten(1)
    _, cached, _ = encode_codes(model.vq, [f["png"] for _, f in samples], transform, recipe.data.max_pixels,
                                torch.device("cpu"), progress=False)
    assert torch.equal(streamed, cached.long())
    for key, value, words in (("eval.splits", "[test]", "scene parser"), ("model.caption_drop", 0.3, "caption_drop"),
                              ("data.stream", "false", "data.stream true")):
        with pytest.raises(GlimpseError, match=words):
            load_recipe("shapes-t2i", tiny_t2i_overrides(world, tiny_run, tiny_vq_run, **{**sets, key: value}))


def test_the_autoregressive_prior_trains_and_generates(world, tiny_run, tiny_vq_run, tmp_path):
    import glimpse
    from glimpse.config import load_recipe
    from glimpse.train.trainer import train

    recipe = load_recipe("shapes-t2i", tiny_t2i_overrides(world, tiny_run, tiny_vq_run, **{
        "model.kind": "autoregressive", "train.max_steps": 2, "eval.splits": "[]"}))
    train(recipe, tmp_path / "ar", progress=False)
    images = glimpse.load(tmp_path / "ar").generate_images("a small green square at the top", n=1, seed=0)
    assert images[0].size == (32, 32)


def test_a_product_quantised_tokenizer_trains_and_a_prior_generates_on_it(world, tiny_run, tmp_path):
    """shapes-vq with model.vq.codebook_groups = 2 trains (k-means, restarts, evaluation over both groups'
    codes), then shapes-t2i reads it through init_parts and generates."""
    import glimpse
    from glimpse.api import load_run
    from glimpse.config import load_recipe
    from glimpse.train.trainer import train

    groups = {"model.vq.codebook_groups": 2}
    train(load_recipe("shapes-vq", tiny_vq_overrides(world, **groups, **{"train.max_steps": 2})), tmp_path / "vq",
          progress=False)
    family, tokenizer = load_run(tmp_path / "vq")
    family.root = world
    figures = family.evaluate(tokenizer, ["test"])
    scenes = read_scenes(world, "test")[: figures["test/n"]]
    codes = glimpse.load(tmp_path / "vq").tokens([sc.path for sc in scenes])
    assert codes.shape == (len(scenes), 4, 4, 2)
    used = {(g, int(k)) for g in range(2) for k in codes[..., g].unique()}  # a code is its group and its id
    assert figures["test/codebook_usage"] == pytest.approx(len(used) / 32)
    recipe = load_recipe("shapes-t2i", tiny_t2i_overrides(world, tiny_run, tmp_path / "vq", **groups, **{
        "train.max_steps": 2, "eval.splits": "[]"}))
    train(recipe, tmp_path / "t2i", progress=False)
    images = glimpse.load(tmp_path / "t2i").generate_images("a small green square at the top", n=1, seed=0)
    assert images[0].size == (32, 32)
    # a recipe whose tokenizer settings are not the run's is told so
    plain = load_recipe("shapes-t2i", tiny_t2i_overrides(world, tiny_run, tmp_path / "vq", **{"train.max_steps": 1}))
    with pytest.raises(GlimpseError, match="settings for vq must be that run's"):
        train(plain, tmp_path / "t2i-plain", progress=False)


def test_recipe_checks_name_the_key(world, tiny_run, tiny_vq_run, tmp_path):
    from glimpse.config import load_recipe
    from glimpse.train.trainer import train

    for key, value, words in (("model.kind", "diffusion", "model.kind"), ("freeze", "[vq]", "freeze"),
                              ("model.cond_drop", "1.5", "model.cond_drop")):
        with pytest.raises(GlimpseError, match=words):
            recipe = load_recipe("shapes-t2i", tiny_t2i_overrides(world, tiny_run, tiny_vq_run, **{key: value}))
            train(recipe, tmp_path / key, progress=False)


def test_demo_t2i_writes_a_report(world, tmp_path, capsys):
    from conftest import tiny_overrides, tiny_vq_overrides

    from glimpse.cli import main

    clip = tiny_overrides(world, **{"train.max_steps": 3, "eval.splits": "[test]", "eval.during_train": "[]"})
    vq = tiny_vq_overrides(world, **{"train.max_steps": 2, "eval.splits": "[test]"})
    t2i = [o for o in tiny_t2i_overrides(world, "unused", "unused", **{"train.max_steps": 2, "eval.splits": "[test]",
                                                                    "eval.vqa_limit": 4})
           if not o.startswith(("init_parts", "data."))]
    main(["--quiet", "demo", "t2i", "--out", str(tmp_path / "demo"),
          *[f"--set={o}" for o in clip], *[f"--set=vq.{o}" for o in vq], *[f"--set=t2i.{o}" for o in t2i]])
    out = capsys.readouterr().out
    assert "test/exact_1" in out and "GFLOP/s" in out and "glimpse generate" in out
    report = (tmp_path / "demo" / "report.html").read_text()
    assert report.count("<img") == 2 * 6 * 5 and "novel combination" in report and "src=\"http" not in report
