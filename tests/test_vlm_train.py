"""Vision-language decoders end to end: conversation data, training, generation-based eval, the
pipeline (caption / ask / chat with cached image features), and the CLI."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
from collections import Counter

import pytest
import torch
from conftest import PY, tiny_vlm_overrides
from PIL import Image

from glimpse.data.chat import IGNORE
from glimpse.data.conversations import ConversationCollate, encode_sample, expand_images, training_records
from glimpse.data.tokenizer import Tokenizer
from glimpse.errors import GlimpseError


@pytest.fixture(scope="module")
def tok(world):
    return Tokenizer(world / "tokenizer.json")


def test_expand_images_repeats_the_placeholder_unsupervised():
    ids, labels = expand_images([1, 9, 5, 9, 6], [IGNORE, IGNORE, 5, IGNORE, 6], image_id=9, image_tokens=3)
    assert ids == [1, 9, 9, 9, 5, 9, 9, 9, 6]
    assert labels == [IGNORE, IGNORE, IGNORE, IGNORE, 5, IGNORE, IGNORE, IGNORE, 6]


def test_encode_sample_labels_only_the_answers(tok):
    msgs = [{"role": "user", "content": "<image>\nwhat shape is on the left?"}, {"role": "assistant", "content": "circle"},
            {"role": "user", "content": "how many shapes are there?"}, {"role": "assistant", "content": "2"}]
    ids, labels = encode_sample(tok, "compact", msgs, n_images=1, image_tokens=4, context_length=200)
    img = tok.ids["image"]
    assert ids.count(img) == 4 and all(labels[i] == IGNORE for i, t in enumerate(ids) if t == img)
    said = tok.decode([t for t, lab in zip(ids, labels) if lab != IGNORE], skip_special=False)
    assert said.replace(" ", "") == "circle<eos>2<eos>"


def test_encode_sample_drops_what_it_cannot_align(tok):
    msgs = [{"role": "user", "content": "describe the image. <image>"}, {"role": "assistant", "content": "a red circle"}]
    # the context ends inside the image block: dropped, not cut
    assert encode_sample(tok, "compact", msgs, 1, image_tokens=16, context_length=10) == "image_cut"
    assert encode_sample(tok, "compact", msgs, 2, image_tokens=4, context_length=100) == "image_count"
    # the answer lies beyond the context: nothing to learn
    assert encode_sample(tok, "compact", msgs, 1, image_tokens=4, context_length=14) == "no_target"
    ids, labels = encode_sample(tok, "compact", msgs, 1, image_tokens=4, context_length=100)
    assert len(ids) < 100


def test_training_records_and_collate(world, tok):
    from glimpse.config import load_recipe

    r = load_recipe("shapes-llava-stage2", tiny_vlm_overrides(world))
    records = training_records(r.data, world)
    llava = json.loads((world / "annotations" / "llava_train.json").read_text())
    vqa = json.loads((world / "annotations" / "vqa_questions_train.json").read_text())["questions"]
    per_image = Counter(q["image_id"] for q in vqa)  # + VQA conversations of up to 2 questions per image
    assert len(records) == len(llava) + sum((n + 1) // 2 for n in per_image.values())
    short = records[-1]["messages"]
    assert short[0]["content"].startswith("<image>\n") and "single word" in short[0]["content"]
    r.data.vqa_mix, r.data.format = False, "coco"
    assert "captions" in training_records(r.data, world)[0]
    batch = ConversationCollate(tok.pad_id)([
        {"input_ids": [1, 2, 3], "labels": [IGNORE, 2, 3], "pixel_values": [torch.zeros(3, 4, 4)]},
        {"error": "corrupt", "message": "bad"},
        {"input_ids": [1, 5], "labels": [IGNORE, 5], "pixel_values": [torch.ones(3, 4, 4), torch.ones(3, 4, 4)]}])
    assert batch["status"] == [None, "corrupt", None] and batch["pixel_values"].shape[0] == 3
    assert batch["input_ids"][1].tolist() == [1, 5, tok.pad_id] and batch["labels"][1, 2] == IGNORE
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_conversation_dataset_tokenizes_a_sample_once_and_knows_its_length(world, tok, monkeypatch):
    from glimpse.data import conversations
    from glimpse.data.conversations import ConversationDataset

    msgs = [{"role": "user", "content": "<image>\nhow many shapes are there?"}, {"role": "assistant", "content": "2"}]
    records = [{"images": ["a.png"], "messages": msgs},
               {"images": ["a.png"], "captions": ["a red circle", "a large red circle at the top of it"]}]
    rows = {"a.png": 0}
    calls = []
    encode = conversations.encode_sample
    monkeypatch.setattr(conversations, "encode_sample", lambda *a: calls.append(a[2][-1]["content"]) or encode(*a))
    ds = ConversationDataset(records, tok, "compact", None, 0, 4, 96, rows)
    first = [ds[(0, 7)], ds[(1, 0)], ds[(1, 1)]]
    again = [ds[(0, 3)], ds[(1, 2)], ds[(1, 5)]]  # the same conversation, captions 0 and 1 again
    assert calls == ["2", "a red circle", "a large red circle at the top of it"]
    assert again == [first[0], first[1], first[2]]
    # lengths follow the real token counts (words + template + image tokens), for length grouping
    real = [len(s["input_ids"]) for s in first]
    lengths = ds.lengths()
    assert abs(lengths[0] - real[0]) <= 5 and abs(lengths[1] - (real[1] + real[2]) / 2) <= 5
    monkeypatch.setattr(conversations, "ENCODED_CACHE_LIMIT", 1)  # a large data set keeps nothing
    big = ConversationDataset(records, tok, "compact", None, 0, 4, 96, rows)
    big[(0, 0)], big[(0, 0)]
    assert calls[-2:] == ["2", "2"]


@pytest.mark.parametrize("recipe", ["shapes-llava-stage1", "shapes-frozen"])
def test_stage1_and_frozen_train_with_frozen_parts(world, tmp_path, recipe):
    from glimpse.config import load_recipe
    from glimpse.runs import read_weights
    from glimpse.train.trainer import train

    r = load_recipe(recipe, tiny_vlm_overrides(world, **{"eval.few_shot": "[0, 1]"}))
    results = train(r, tmp_path / "run", progress=False)
    first, last = (read_weights(tmp_path / "run" / "checkpoints" / s / "model.safetensors")
                   for s in ("step_0000002", "step_0000004"))
    changed = {k.split(".")[0] for k in first if not torch.equal(first[k], last[k])}
    assert changed == ({"connector"} if recipe.endswith("stage1") else {"connector", "vision"})
    assert {"test/vqa_acc", "test_novel/vqa_acc", "test/cider", "test/bleu_4", "test/vqa_acc_1shot"} <= set(results)
    assert all(0.0 <= v <= 10.0 for v in results.values())


def test_pipeline_caption_ask_chat_and_feature_cache(tiny_vlm_run, world):
    import glimpse

    m = glimpse.load(tiny_vlm_run)
    images = sorted((world / "images" / "test").glob("*.png"))[:3]
    caps = m.caption(images, max_new_tokens=5)
    assert len(caps) == 3 and all(isinstance(c, str) for c in caps)
    # batched answers equal one-at-a-time answers (left padding is invisible)
    qs = ["how many shapes are there?", "what colour is the circle?", "is there a red square?"]
    batched = m.ask(images, qs, short=True, max_new_tokens=5)
    assert batched == [m.ask([im], [q], short=True, max_new_tokens=5)[0] for im, q in zip(images, qs)]
    # a chat: the image is sent again each turn (as OpenAI clients do) but encoded once
    data_url = "data:image/png;base64," + base64.b64encode(images[0].read_bytes()).decode()
    m.encoded_images = 0
    m._cache.clear()
    turn = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url}},
                                         {"type": "text", "text": "what shape is on the left?"}]}]
    first = m.chat(turn, max_new_tokens=4)
    turn += [{"role": "assistant", "content": first}, {"role": "user", "content": "and its colour?"}]
    streamed = "".join(m.chat(turn, max_new_tokens=4, stream=True))
    assert streamed == m.chat(turn, max_new_tokens=4)
    assert m.encoded_images == 1


def test_pipeline_refuses_bad_requests(tiny_vlm_run, world):
    import glimpse
    from glimpse.errors import ContextLengthError

    m = glimpse.load(tiny_vlm_run)
    image = sorted((world / "images" / "test").glob("*.png"))[0]
    with pytest.raises(ContextLengthError, match="context"):
        m.ask([image], ["what?"], max_new_tokens=10_000)
    with pytest.raises(GlimpseError, match="data: URL"):
        m.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}])
    with pytest.raises(GlimpseError, match="corrupt|format|truncated"):
        m.caption([b"\x89PNG\r\n\x1a\n not really"])
    # a literal <image> in text claims no image slot
    assert isinstance(m.chat([{"role": "user", "content": "<image> <image> hi"}], max_new_tokens=2), str)
    with pytest.raises(GlimpseError, match="role"):
        m.chat([{"content": "hi"}])


def test_eval_cli_and_generation_commands(tiny_vlm_run, world, cli_env, tmp_path):
    out = tmp_path / "eval.json"
    r = subprocess.run([PY, "-m", "glimpse", "--quiet", "eval", str(tiny_vlm_run), "--json", str(out)],
                       capture_output=True, text=True, env=cli_env)
    assert r.returncode == 0, r.stderr
    figures = json.loads(out.read_text())
    assert {"test/vqa_acc", "test_novel/vqa_acc", "test/cider", "test_novel/cider"} <= set(figures)
    image = str(sorted((world / "images" / "test").glob("*.png"))[0])
    for args in (["caption", image], ["ask", image, "how many shapes are there?"]):
        r = subprocess.run([PY, "-m", "glimpse", *args[:1], str(tiny_vlm_run), *args[1:], "--max-new-tokens", "4"],
                           capture_output=True, text=True, env=cli_env)
        assert r.returncode == 0 and r.stdout.strip() != "" or r.stdout == "\n", r.stderr
    chat = subprocess.run([PY, "-m", "glimpse", "chat", str(tiny_vlm_run), "--max-new-tokens", "3"],
                          input=f"/image {image}\nhow many shapes are there?\n/image nope.png\nand now?\n/quit\n",
                          capture_output=True, text=True, env=cli_env)
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.count("assistant> ") == 2 and "no such image: nope.png" in chat.stdout
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    r = subprocess.run([PY, "-m", "glimpse", "caption", str(tiny_vlm_run), str(bad)], capture_output=True,
                       text=True, env=cli_env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "bad.png" in r.stderr


def test_image_part_of_pil_image(tiny_vlm_run):
    import glimpse

    m = glimpse.load(tiny_vlm_run)
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), "white").save(buf, format="PNG")
    a = m.chat([{"role": "user", "content": [{"type": "image", "image": Image.open(io.BytesIO(buf.getvalue()))},
                                             {"type": "text", "text": "describe the image."}]}], max_new_tokens=3)
    b = m.caption([buf.getvalue()], max_new_tokens=3)[0]
    assert a == b


def test_cached_vision_features_train_exactly_like_pixels(world, tmp_path):
    """A frozen tower's features computed once give the same losses and weights as encoding the
    images at every step."""
    from glimpse.config import load_recipe
    from glimpse.runs import read_weights
    from glimpse.train.trainer import train

    for cached in (False, True):
        r = load_recipe("shapes-llava-stage2", tiny_vlm_overrides(
            world, **{"train.cache_vision_features": cached, "eval.splits": "[]", "train.save_every": 4}))
        train(r, tmp_path / str(cached), progress=False)
    losses = [[json.loads(x)["loss"] for x in (tmp_path / str(c) / "metrics.jsonl").read_text().splitlines()
               if '"loss"' in x] for c in (False, True)]
    assert len(losses[0]) == 4 and losses[0] == pytest.approx(losses[1], rel=1e-5)
    a, b = (read_weights(tmp_path / str(c) / "checkpoints" / "step_0000004" / "model.safetensors")
            for c in (False, True))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)



@pytest.mark.parametrize("cached", [False, True])
def test_padding_groups_give_the_same_loss_and_gradients(world, tok, cached):
    """train.padding_groups splits a batch by length, each part padded to its own longest: the
    same loss and gradients as one padded batch, with every sample's images (0, 1 or 2) kept."""
    from glimpse import families
    from glimpse.config import load_recipe
    from glimpse.data.conversations import ConversationDataset
    from glimpse.families.feature_cache import cache_tower_features

    r = load_recipe("shapes-llava-stage2", tiny_vlm_overrides(world))
    task = families.get("vlm")(r, world, tok)
    torch.manual_seed(0)
    model = task.build_model()
    imgs = sorted((world / "images" / "train").iterdir())[:3]
    say = [{"role": "assistant", "content": "a large red circle at the top and a small blue square"}]
    records = [{"images": [imgs[0]], "messages": [{"role": "user", "content": "<image>\nhow many?"},
                                                  {"role": "assistant", "content": "2"}]},
               {"images": [], "messages": [{"role": "user", "content": "say something long."}] + say},
               {"images": [imgs[1], imgs[2]], "messages": [{"role": "user", "content": "<image><image>\nsame?"},
                                                           {"role": "assistant", "content": "no"}]},
               {"images": [imgs[2]], "messages": [{"role": "user", "content": "<image>\ndescribe it."}] + say}]
    images = [i for r in records for i in r["images"]]
    rows, task.feature_cache = cache_tower_features(model, images, task.transform, r.data.max_pixels,
                                                    torch.device("cpu"), progress=False) if cached else (None, None)
    ds = ConversationDataset(records, tok, "compact", task.transform, r.data.max_pixels, model.image_tokens, 160, rows)
    batch = ConversationCollate(tok.pad_id)([ds[(i, 0)] for i in range(4)])
    results = []
    for groups in (1, 3):
        r.train.padding_groups = groups
        model.zero_grad()
        loss = task.loss(model, batch)
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    assert len(results[0][1]) == len(results[1][1]) > 0
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(results[0][1], results[1][1]))

def test_feature_cache_drops_bad_images_and_counts_them(world, tok):
    from glimpse import families
    from glimpse.config import load_recipe
    from glimpse.data.conversations import ConversationDataset
    from glimpse.data.images import ImageError
    from glimpse.families.feature_cache import cache_tower_features

    r = load_recipe("shapes-llava-stage2", tiny_vlm_overrides(world))
    task = families.get("vlm")(r, world, tok)
    model = task.build_model()
    good = next((world / "images" / "train").iterdir())
    msgs = [{"role": "user", "content": "<image>\nhow many shapes are there?"}, {"role": "assistant", "content": "2"}]
    records = [{"images": [good], "messages": msgs}, {"images": [b"not an image"], "messages": msgs},
               {"images": [good], "messages": msgs}]
    images = [i for r in records for i in r["images"]]
    rows, cache = cache_tower_features(model, images, task.transform, r.data.max_pixels, torch.device("cpu"),
                                       progress=False)
    assert cache.shape == (1, 16, 32)  # one distinct good image, 4x4 patches of the 32 px tower
    assert isinstance(rows[b"not an image"], ImageError)
    ds = ConversationDataset(records, tok, "compact", task.transform, r.data.max_pixels, 16, 96, rows)
    batch = ConversationCollate(tok.pad_id)([ds[(i, 0)] for i in range(3)])
    assert batch["status"] == [None, "format", None] and batch["image_rows"].tolist() == [0, 0]
    assert "pixel_values" not in batch


def test_feature_cache_reuses_the_same_towers_features(world, tok, tmp_path):
    """LLaVA stage 2 after stage 1 in one process: the same frozen tower encodes only the images
    stage 1 did not; another tower (one weight changed) encodes everything again."""
    from glimpse import families
    from glimpse.config import load_recipe
    from glimpse.data.images import load_image
    from glimpse.families.feature_cache import cache_tower_features

    r = load_recipe("shapes-llava-stage2", tiny_vlm_overrides(world))
    task = families.get("vlm")(r, world, tok)
    model = task.build_model()
    paths = sorted((world / "images" / "train").iterdir())[:5]
    encoded = []
    tower_features = model.tower_features
    model.tower_features = lambda px: encoded.append(len(px)) or tower_features(px)

    def cache(images):
        return cache_tower_features(model, list(images), task.transform, r.data.max_pixels,
                                    torch.device("cpu"), progress=False)

    rows_a, cache_a = cache(paths[:3])
    rows_b, cache_b = cache(paths[1:][::-1])  # two new images, two seen; another order
    assert encoded == [3, 2]
    assert sorted(rows_b.values()) == list(range(4)) and cache_b.shape[0] == 4
    for p in paths[1:3]:  # the reused rows hold the features the first call computed
        assert torch.equal(cache_b[rows_b[str(p)]], cache_a[rows_a[str(p)]])
    fresh = tower_features(torch.stack([task.transform(load_image(paths[4]))]))[0]
    assert torch.allclose(cache_b[rows_b[str(paths[4])]], fresh)
    copy = tmp_path / "copy.png"  # a file rewritten under the same path is read again
    copy.write_bytes(paths[0].read_bytes())
    cache([copy])
    copy.write_bytes(paths[4].read_bytes())
    os.utime(copy, ns=(copy.stat().st_mtime_ns + 10**9,) * 2)
    rows_c, cache_c = cache([copy])
    assert encoded == [3, 2, 1, 1] and torch.allclose(cache_c[0], fresh)
    with torch.no_grad():
        next(model.vision.parameters()).add_(1.0)
    cache(paths[:3])
    assert encoded == [3, 2, 1, 1, 3]


def test_feature_cache_needs_a_frozen_tower(world):
    from glimpse.config import load_recipe

    with pytest.raises(GlimpseError, match="train.cache_vision_features"):
        load_recipe("shapes-llava-stage2", tiny_vlm_overrides(world, **{"freeze": "[]"}))
