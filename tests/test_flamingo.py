"""The Flamingo family end to end: interleaved sequences and binding episodes from the shapes world,
training with frozen parts, the few-shot evaluation, the pipeline with several images in place, the
CLI and the server."""

from __future__ import annotations

import base64
import json
import random
import subprocess

import pytest
import torch
from conftest import PY
from PIL import Image

from glimpse.data.tokenizer import Tokenizer
from glimpse.families.flamingo import add_end_of_chunk
from glimpse.families.flamingo.data import (
    IGNORE,
    InterleavedCollate,
    binding_episode,
    encode_chunks,
    nonce_words,
    read_scenes,
    single_object_images,
)


def tiny_flamingo_overrides(world, **extra) -> list[str]:
    base = {
        "data.root": str(world), "data.image_size": 32, "data.num_workers": 0, "init_parts": "{}",
        "model.vision.image_size": 32, "model.vision.width": 32, "model.vision.layers": 2,
        "model.lm.width": 32, "model.lm.layers": 2, "model.lm.heads": 2, "model.lm.kv_heads": 1,
        "model.resampler_depth": 1, "model.resampler_heads": 2, "model.resampler_head_dim": 8,
        "model.resampler_latents": 4, "model.xattn_heads": 2, "model.max_shots": 3, "model.max_images": 2,
        "train.batch_size": 8, "train.max_steps": 4, "train.save_every": 2, "train.log_every": 1,
        "eval.batch_size": 8, "eval.vqa_limit": 6, "eval.max_new_tokens": 6, "eval.few_shot": "[0, 2, 4]",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="module")
def tok(world):
    t = Tokenizer(world / "tokenizer.json")
    add_end_of_chunk(t)
    return t


@pytest.fixture(scope="module")
def flamingo_run(world, tmp_path_factory):
    from glimpse.config import load_recipe
    from glimpse.train.trainer import train

    out = tmp_path_factory.mktemp("runs") / "flamingo"
    train(load_recipe("shapes-flamingo", tiny_flamingo_overrides(world)), out, progress=False)
    return out


def test_end_of_chunk_is_added_once_after_the_vocabulary(world):
    t = Tokenizer(world / "tokenizer.json")
    base = t.vocab_size
    assert add_end_of_chunk(t) == base and add_end_of_chunk(t) == base and t.vocab_size == base + 1
    assert t.encode("<image>Output: a<|endofchunk|>")[-1] == base


def test_word_pools_are_disjoint_and_fixed():
    train, test = nonce_words("train"), nonce_words("test")
    assert not set(train) & set(test) and nonce_words("train") == train and len(set(train)) == len(train)
    # too many training words to learn one by one (a pool of 400 was learned), the test pool the same 400
    assert len(train) > 30_000 and len(test) == 400 and test[:3] == ("loval", "rotab", "pomir")


def test_binding_episodes_bind_words_to_colours(world):
    scenes = read_scenes(_recipe(world).data, world, "train")
    by_colour = single_object_images(scenes)
    colour_of = {i: c for c, idx in by_colour.items() for i in idx}
    rng = random.Random(0)
    images, texts, words, answer = binding_episode(rng, by_colour, nonce_words("train"), 3, shots=6)
    assert len(images) == 7 and len(set(words)) == 3 and texts[-1] == f"Output: {answer}"
    word_of_colour = {}
    for im, t in zip(images, texts):
        word_of_colour.setdefault(colour_of[im], set()).add(t)
    assert all(len(v) == 1 for v in word_of_colour.values())  # one word per colour in an episode
    # the control keeps the words and permutes the examples' images
    again = binding_episode(random.Random(0), by_colour, nonce_words("train"), 3, shots=6, shuffle_images=True)
    assert again[1] == texts and sorted(again[0][:-1]) == sorted(images[:-1]) and again[0][-1] == images[-1]


def test_chunks_label_text_not_images_and_fit_the_context(tok):
    ids, labels = encode_chunks(tok, ["Output: a red circle", "Question: what colour? Answer: red"], 100)
    image = tok.ids["image"]
    assert ids[0] == tok.ids["bos"] and ids.count(image) == 2
    assert all(lab == IGNORE for t, lab in zip(ids, labels) if t == image) and labels[0] == IGNORE
    assert ids.count(tok.ids["endofchunk"]) == 2
    short, _ = encode_chunks(tok, ["Output: a red circle"] * 5, len(ids))
    assert short.count(image) < 5 and len(short) <= len(ids)  # whole chunks only
    prompt, plabels = encode_chunks(tok, ["Output: a"], 100, prompt="Output:")
    assert prompt.count(image) == 2 and all(lab == IGNORE for lab in plabels[len(encode_chunks(tok, ["Output: a"], 100)[0]):])


def test_dataset_is_fixed_by_its_key_and_pads_images(world, tok):
    from glimpse.config import load_recipe
    from glimpse.families import get

    fam = get("flamingo")(load_recipe("shapes-flamingo", tiny_flamingo_overrides(world)), world, tok)
    ds, collate = fam.train_data()
    a, b = ds[(5, 1)], ds[(5, 1)]
    assert a["input_ids"] == b["input_ids"] and torch.equal(a["pixel_values"], b["pixel_values"])
    batch = collate([ds[(i, 0)] for i in range(6)] + [{"error": "corrupt", "message": "x: bad"}])
    n = batch["image_valid"].sum(1)
    assert batch["status"][-1] == "corrupt" and n.min() >= 1 and batch["pixel_values"].shape[1] == n.max()
    assert ((batch["input_ids"] == tok.ids["image"]).sum(1) == n).all()
    assert (batch["pixel_values"][~batch["image_valid"]] == 0).all()
    assert InterleavedCollate(0)([{"error": "x", "message": "m"}])["status"] == ["x"]


def test_text_examples_replace_images_in_training_episodes(world, tok):
    """episode_text_share: binding examples shown as "colour word" lines without an image (the form the
    LM learned in context); the query stays an image, and each image token keeps its own image."""
    from glimpse.config import load_recipe
    from glimpse.families import get

    recipe = load_recipe("shapes-flamingo", tiny_flamingo_overrides(world, **{"model.episode_share": 1.0,
                                                                              "model.episode_text_share": 1.0}))
    fam = get("flamingo")(recipe, world, tok)
    ds, _ = fam.train_data()
    key = next(k for k in ((i, 0) for i in range(50)) if len(ds.sequence(k)[0]) > 2)
    images, texts = ds.sequence(key)
    assert images[:-1] == [None] * (len(images) - 1) and images[-1] is not None
    word = texts[-1].removeprefix("Output: ")
    colour_of_query = ds.scenes[images[-1]].colours[0]
    assert all(len(t.split()) == 2 and t.endswith("\n") for t in texts[:-1])
    assert all((t.split()[1] == word) == (t.split()[0] == colour_of_query) for t in texts[:-1])
    sample = ds[key]
    assert sample["input_ids"].count(tok.ids["image"]) == 1 == sample["pixel_values"].shape[0]
    assert sample["input_ids"].count(tok.ids["endofchunk"]) == 1
    with pytest.raises(Exception, match="episode_text_share"):
        load_recipe("shapes-flamingo", tiny_flamingo_overrides(world, **{"model.episode_text_share": 1.5}))


def _recipe(world):
    from glimpse.config import load_recipe

    return load_recipe("shapes-flamingo", tiny_flamingo_overrides(world))


def test_train_freezes_the_lm_and_learns_gates_and_the_new_token(flamingo_run, world):
    import glimpse

    metrics = [json.loads(line) for line in (flamingo_run / "metrics.jsonl").read_text().splitlines()]
    final = metrics[-1]
    for key in ("test/fewshot_acc_0", "test/fewshot_acc_2", "test/fewshot_control_acc_2", "test/fewshot_chance",
                "test/cider_0shot", "test/cider_4shot", "test_novel/fewshot_acc_2", "test/fewshot_text_examples_acc_4"):
        assert key in final, key
    pipe = glimpse.load(flamingo_run)
    model = pipe.model
    assert model.extra_embed is not None and model.extra_embed.shape[0] == 1
    gates = [b.attn_gate for b in model.xattn.values()]
    assert any(float(g.detach().abs().max()) > 0 for g in gates)  # trained away from 0


def test_binding_episodes_that_do_not_fit_the_context_are_counted_not_scored(flamingo_run):
    """A candidate cut off at the LM's context would score 0, the best log-probability, and win: such
    episodes are left out of the accuracy and counted instead."""
    from glimpse.api import load_run
    from glimpse.families.flamingo.data import read_scenes
    from glimpse.families.flamingo.evaluate import binding_figures
    from glimpse.train.trainer import data_root

    task, model = load_run(flamingo_run)
    r = task.recipe
    scenes = read_scenes(r.data, data_root(r, False), "test")
    kw = dict(ks=[0, 2], episodes=6, colours=r.model.episode_colours, max_pixels=r.data.max_pixels)
    # a chunk `<image>Output: word<|endofchunk|>` is over 10 tokens: k = 0 fits in 24, k = 2 does not
    short = binding_figures(model, task.tokenizer, task.transform, scenes, context_length=24, **kw)
    full = binding_figures(model, task.tokenizer, task.transform, scenes, context_length=10**6, **kw)
    assert short["fewshot_too_long_acc_2"] == 6 == short["fewshot_too_long_control_acc_2"]
    assert short["fewshot_acc_2"] == 0.0 and "fewshot_too_long_acc_0" not in short
    assert short["fewshot_acc_0"] == full["fewshot_acc_0"]
    assert not any(k.startswith("fewshot_too_long") for k in full)


def test_pipeline_interleaves_images_in_place(flamingo_run, world):
    import glimpse

    pipe = glimpse.load(flamingo_run)
    images = sorted((world / "images" / "test").glob("*.png"))[:3]
    msg = [{"role": "user", "content": [{"type": "image", "image": str(images[0])}, {"type": "text", "text": "Output: dax<|endofchunk|>"},
                                        {"type": "image", "image": str(images[1])}, {"type": "text", "text": "Output: blick<|endofchunk|>"},
                                        {"type": "image", "image": str(images[2])}]}]
    ids, ims = pipe.chat_prompt(msg)
    text = pipe.tokenizer.decode(ids, skip_special=False)
    assert len(ims) == 3 and text.count("<image>") == 3 and text.rstrip().endswith("output:")
    assert ids.count(pipe.end_id) == 2
    reply = pipe.chat(msg, max_new_tokens=5)
    assert isinstance(reply, str) and "".join(pipe.chat(msg, max_new_tokens=5, stream=True)) == reply
    assert len(pipe.caption(images[:2], max_new_tokens=4)) == 2
    assert len(pipe.ask(images[:1], ["what colour is the shape?"], max_new_tokens=4)) == 1
    # an image's answer depends on that image: the same prompt with another last image may differ, but the
    # prompt before it is the same tokens
    ids2, _ = pipe.chat_prompt([{"role": "user", "content": msg[0]["content"][:4] + [{"type": "image", "image": str(images[0])}]}])
    assert ids2 == ids


def test_server_takes_several_images_in_one_message(flamingo_run, world):
    from fastapi.testclient import TestClient

    import glimpse
    from glimpse.serve.app import create_app

    pipe = glimpse.load(flamingo_run)
    urls = []
    for p in sorted((world / "images" / "test").glob("*.png"))[:2]:
        urls.append("data:image/png;base64," + base64.b64encode(p.read_bytes()).decode())
    content = [{"type": "image_url", "image_url": {"url": urls[0]}}, {"type": "text", "text": "Output: dax<|endofchunk|>"},
               {"type": "image_url", "image_url": {"url": urls[1]}}]
    with TestClient(create_app(pipe, "flamingo")) as client:
        r = client.post("/v1/chat/completions", json={"model": "flamingo", "max_tokens": 4, "temperature": 0,
                                                      "messages": [{"role": "user", "content": content}]})
        assert r.status_code == 200, r.text
        raw = [base64.b64decode(u.split(",", 1)[1]) for u in urls]
        msg = [{"role": "user", "content": [{"type": "image", "image": raw[0]},
                                            {"type": "text", "text": "Output: dax<|endofchunk|>"},
                                            {"type": "image", "image": raw[1]}]}]
        assert r.json()["choices"][0]["message"]["content"] == pipe.chat(msg, max_new_tokens=4)


def test_cli_caption_and_eval(flamingo_run, world, cli_env, tmp_path):
    image = str(sorted((world / "images" / "test").glob("*.png"))[0])
    r = subprocess.run([PY, "-m", "glimpse", "caption", str(flamingo_run), image, "--max-new-tokens", "4"],
                       capture_output=True, text=True, env=cli_env)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "eval.json"
    r = subprocess.run([PY, "-m", "glimpse", "--quiet", "eval", str(flamingo_run), "--json", str(out)],
                       capture_output=True, text=True, env=cli_env)
    assert r.returncode == 0, r.stderr
    assert "test/fewshot_acc_2" in json.loads(out.read_text())
    assert Image.open(image).size == (32, 32)
    # ask, and a chat with two images attached to one message: the pipeline's answers, token for token
    import glimpse
    from glimpse.data.messages import user_message

    pipe = glimpse.load(flamingo_run)
    first, second = (str(p) for p in sorted((world / "images" / "test").glob("*.png"))[:2])
    r = subprocess.run([PY, "-m", "glimpse", "ask", str(flamingo_run), first, "what colour is the shape?",
                        "--max-new-tokens", "4"], capture_output=True, text=True, env=cli_env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == pipe.ask([first], ["what colour is the shape?"], max_new_tokens=4)[0].strip()
    r = subprocess.run([PY, "-m", "glimpse", "chat", str(flamingo_run), "--max-new-tokens", "4"],
                       input=f"/image {first}\n/image {second}\nOutput:\n/quit\n", capture_output=True, text=True,
                       env=cli_env)
    assert r.returncode == 0, r.stderr
    want = pipe.chat([user_message([first, second], "Output:")], max_new_tokens=4)
    assert f"assistant> {want}\n" in r.stdout


def test_interleaved_documents_stream_from_shards_and_train(world, tok, tmp_path, capsys):
    """MMC4 / OBELICS documents in shards (aligned "texts" and "images" in the .json, image members by position):
    each image opens a chunk holding the text up to the next image, text before the first image is a chunk of its
    own, images past model.max_images are left out; bad documents are counted; a run trains on the stream."""
    import tarfile

    from conftest import tar_add

    from glimpse.config import load_recipe
    from glimpse.data.images import ImageTransform, load_image
    from glimpse.data.stream import ShardSample
    from glimpse.errors import GlimpseError
    from glimpse.families.flamingo.data import StreamDocuments, document_usable
    from glimpse.train.trainer import train

    images = sorted((world / "images" / "train").glob("*.png"))
    transform = ImageTransform(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    decode = StreamDocuments(tok, transform, 10**8, max_images=2, context_length=96)
    doc = {"texts": ["a page about shapes.", None, "a red <image>circle.", "it is small.", None, None, "more."],
           "images": [None, "a.png", None, None, "b.png", "c.png", None]}
    files = {"json": json.dumps(doc).encode(), "1.png": images[0].read_bytes(), "4.png": images[1].read_bytes(),
             "5.png": images[2].read_bytes()}
    item = decode(ShardSample("s/train-0.tar", "doc", files, 0))
    # a marker in the text is a space; the third image is past max_images; the opening text is context only
    want_ids, want_labels = encode_chunks(tok, ["a page about shapes.", "a red circle. it is small.", ""], 96,
                                          text_only=[True, False, False])
    first = want_ids.index(tok.ids["image"])
    assert item["input_ids"] == want_ids and item["labels"] == [IGNORE] * first + want_labels[first:]
    assert item["input_ids"].count(tok.ids["image"]) == 2
    want = torch.stack([transform.normalize(transform.resized_array(load_image(p))) for p in images[:2]])
    assert torch.equal(item["pixel_values"], want)
    # a context that holds the first image's chunk only: one image; an opening text longer than the context: left out
    short_ids, _ = encode_chunks(tok, ["a page about shapes.", "a red circle. it is small."], 96, text_only=[True, False])
    short = StreamDocuments(tok, transform, 10**8, 2, len(short_ids) + 1)(ShardSample("s/t.tar", "doc", files, 0))
    assert short["input_ids"] == short_ids and short["pixel_values"].shape[0] == 1
    long_doc = {**doc, "texts": ["words " * 200, *doc["texts"][1:]]}
    opened = decode(ShardSample("s/t.tar", "doc", {**files, "json": json.dumps(long_doc).encode()}, 0))
    assert opened["input_ids"] == encode_chunks(tok, ["a red circle. it is small.", ""], 96)[0]
    for body, extra, words in ((b"{not json", {}, "not valid JSON"), (json.dumps({"texts": ["x"]}).encode(), {}, "aligned"),
                               (json.dumps({"texts": [None], "images": ["a.png"]}).encode(), {"0.jpg": b"x"}, "bad image"),
                               (json.dumps({"texts": [None, None], "images": ["a", "b"]}).encode(), {"0.png": b"x"},
                                "no image member for position 1"),
                               (json.dumps({"texts": ["x", None], "images": ["a", "b"]}).encode(), {"0.png": b"x"},
                                "position 0 must hold a text or an image"),
                               (json.dumps({"texts": ["only text"], "images": [None]}).encode(), {"0.png": b"x"},
                                "holds no image")):
        bad = decode(ShardSample("s/train-0.tar", "bad", {"json": body, **extra}, 0))
        assert "error" in bad and "train-0.tar:bad" in bad["message"] and words in bad["message"], bad
    assert document_usable(["json", "0.png"]) and not document_usable(["json", "png"])  # not a caption sample

    root = tmp_path / "docs"
    (root / "shards").mkdir(parents=True)
    (root / "tokenizer.json").write_bytes((world / "tokenizer.json").read_bytes())
    captions = json.loads((world / "annotations" / "captions_train.json").read_text())["annotations"]
    for k in range(2):
        with tarfile.open(root / "shards" / f"train-{k}.tar", "w") as tar:
            for d in range(k * 12, (k + 1) * 12):
                picked = [images[(3 * d + j) % len(images)] for j in range(3)]
                tar_add(tar, f"doc{d:03d}.json", json.dumps({
                    "texts": [None, captions[3 * d]["caption"], None, captions[3 * d + 1]["caption"], None],
                    "images": ["a", None, "b", None, "c"]}).encode())
                for pos, p in zip((0, 2, 4), picked):
                    tar_add(tar, f"doc{d:03d}.{pos}.png", p.read_bytes())
            tar_add(tar, f"broken{k}.json", b"{")
            tar_add(tar, f"broken{k}.0.png", images[0].read_bytes())
    sets = {"data.source": "wds", "data.stream": "true", "data.root": str(root), "data.shuffle_buffer": 4,
            "data.files": "{train: 'shards/train-{0..1}.tar'}", "eval.splits": "[]", "eval.during_train": "[]",
            "train.threads": 1, "train.max_steps": 4, "train.save_every": 4, "model.lm.context_length": 96,
            "train.cache_vision_features": "false"}
    train(load_recipe("shapes-flamingo", tiny_flamingo_overrides(world, **sets)), tmp_path / "run", progress=False)
    assert "skipped bad samples" in capsys.readouterr().out  # 26 samples (2 broken), 32 read: the broken came by
    assert len([r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
                if "loss" in r]) == 4
    for key, value, words in (("data.stream", "false", "set data.stream true"), ("eval.splits", "[test]", "eval.splits=")):
        with pytest.raises(GlimpseError, match=words):
            load_recipe("shapes-flamingo", tiny_flamingo_overrides(world, **{**sets, key: value}))


def test_text_binding_documents_keep_one_word_per_colour(world):
    """shapes-lm-icl's documents: "colour word" lines, one made-up word per colour within a document."""
    from glimpse.config import load_recipe
    from glimpse.families import get

    recipe = load_recipe("shapes-lm-icl", [f"data.root={world}", "data.image_size=32", "data.binding_share=1.0"])
    texts, _ = get("causal_lm")(recipe, world, Tokenizer(world / "tokenizer.json")).train_data()
    colours = {"red", "green", "blue", "yellow", "purple", "orange"}
    for key in [(i, 0) for i in range(20)]:
        lines = [line.split() for line in texts[key]["text"].split("\n")]
        assert all(len(p) == 2 and p[0] in colours and p[1] in nonce_words("train") for p in lines)
        word_of = {}
        for colour, word in lines:
            assert word_of.setdefault(colour, word) == word
