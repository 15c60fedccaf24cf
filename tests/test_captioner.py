"""The encoder-decoder captioner end to end: teacher-forcing batches, training on the shapes world,
generation with the cross-attention cache, the pipeline, the CLI, the server, and the round trip
through a VisionEncoderDecoderModel folder."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from conftest import PY

from glimpse.data.tokenizer import Tokenizer
from glimpse.errors import GlimpseError
from glimpse.families.encoder_decoder import CaptionCollate
from glimpse.families.encoder_decoder.model import IGNORE, EncoderDecoderCaptioner, EncoderDecoderConfig
from glimpse.infer.generate import GenerationConfig, generate
from glimpse.models.decoder import DecoderConfig
from glimpse.models.vision import VisionConfig


def tiny_captioner_overrides(world, **extra) -> list[str]:
    base = {
        "data.root": str(world), "data.image_size": 32, "data.num_workers": 0,
        "model.vision.image_size": 32, "model.vision.width": 32, "model.vision.layers": 2, "model.vision.heads": 2,
        "model.decoder.width": 48, "model.decoder.layers": 2, "model.decoder.heads": 2,  # widths differ: a proj
        "train.batch_size": 16, "train.max_steps": 6, "train.save_every": 3, "train.log_every": 1,
        "train.eval_every": 0, "train.warmup_steps": 2, "eval.batch_size": 16, "eval.max_new_tokens": 8,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="module")
def captioner_run(world, tmp_path_factory):
    from glimpse.config import load_recipe
    from glimpse.train.trainer import train

    out = tmp_path_factory.mktemp("runs") / "captioner"
    train(load_recipe("shapes-captioner", tiny_captioner_overrides(world)), out, progress=False)
    return out


def test_collate_shifts_labels_behind_the_start_token(world):
    tok = Tokenizer(world / "tokenizer.json")
    collate = CaptionCollate(tok, 12, start_id=tok.ids["bos"])
    image = torch.zeros(3, 4, 4)
    batch = collate([{"pixel_values": image, "caption": "a red circle"}, {"error": "corrupt", "message": "x: bad"},
                     {"pixel_values": image, "caption": "a small blue square at the top left"}])
    assert batch["status"] == [None, "corrupt", None] and batch["messages"] == ["x: bad"]
    labels, ids = batch["labels"], batch["decoder_input_ids"]
    row = tok.encode("a red circle", add_eos=True)
    assert labels[0, :len(row)].tolist() == row and (labels[0, len(row):] == IGNORE).all()
    assert ids[0, 0] == tok.ids["bos"] and ids[0, 1:len(row)].tolist() == row[:-1]
    assert not (ids == IGNORE).any()
    assert labels[1, -1] == tok.ids["eos"]  # truncated to the context, the eos kept


def test_cached_generation_equals_recompute():
    torch.manual_seed(0)
    cfg = EncoderDecoderConfig(vision=VisionConfig(image_size=16, patch_size=4, width=32, layers=1, heads=2,
                                                   pre_norm=False, patch_bias=True),
                               decoder=DecoderConfig(arch="llama", vocab_size=40, width=32, layers=2, heads=2),
                               decoder_start_token_id=1)
    model = EncoderDecoderCaptioner(cfg).eval()
    pixels = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        memory = model.encode(pixels)
        got = generate(model.decoder, [[1], [1, 7, 8], [1, 9]], GenerationConfig(max_new_tokens=6, ignore_eos=True),
                       memory=list(memory))
        for row, prompt in enumerate([[1], [1, 7, 8], [1, 9]]):
            ids = list(prompt)
            for _ in range(6):  # no cache: the whole sequence again for every token
                logits = model(None, torch.tensor([ids]), memory=memory[row:row + 1])
                ids.append(int(logits[0, -1].argmax()))
            assert got[row] == ids[len(prompt):]


def test_train_eval_load_caption_and_export(captioner_run, world, cli_env, tmp_path):
    import glimpse

    metrics = [json.loads(line) for line in (captioner_run / "metrics.jsonl").read_text().splitlines()]
    final = metrics[-1]
    assert {"test/cider", "test/bleu_4", "test/exact", "test/shuffled_cider", "test_novel/cider"} <= set(final)
    assert final["test/caption_n"] == 40 and final["test/skipped"] == 0
    pipe = glimpse.load(captioner_run)
    image = sorted((world / "images" / "test").glob("*.png"))[0]
    caption = pipe.caption([image], max_new_tokens=8)[0]
    assert pipe.caption([image], prompt="a picture of", max_new_tokens=8)[0].startswith("a picture of")
    msg = [{"role": "user", "content": [{"type": "image", "image": str(image)}, {"type": "text", "text": "hi"}]}]
    assert pipe.chat(msg, max_new_tokens=8) == caption  # a captioner describes the image, whatever the text
    assert "".join(pipe.chat(msg, max_new_tokens=8, stream=True)) == caption
    with pytest.raises(GlimpseError, match="send an image"):
        pipe.chat([{"role": "user", "content": "hello"}])
    # the CLI: caption, and export to a folder that transformers loads and glimpse reads back
    r = subprocess.run([PY, "-m", "glimpse", "caption", str(captioner_run), str(image), "--max-new-tokens", "8"],
                       capture_output=True, text=True, env=cli_env)
    assert r.returncode == 0 and r.stdout.strip() == caption, r.stderr
    r = subprocess.run([PY, "-m", "glimpse", "ask", str(captioner_run), str(image), "what is this?",
                        "--max-new-tokens", "8"], capture_output=True, text=True, env=cli_env)
    assert r.returncode == 0 and r.stdout.strip() == caption, r.stderr
    r = subprocess.run([PY, "-m", "glimpse", "chat", str(captioner_run), "--max-new-tokens", "8"],
                       input=f"/image {image}\nwhat is this?\n/quit\n", capture_output=True, text=True, env=cli_env)
    assert r.returncode == 0 and f"assistant> {caption}\n" in r.stdout, r.stderr
    dst = tmp_path / "hf"
    r = subprocess.run([PY, "-m", "glimpse", "convert", str(captioner_run), str(dst), "--to", "hf"],
                       capture_output=True, text=True, env=cli_env)
    assert r.returncode == 0, r.stderr
    from transformers import VisionEncoderDecoderModel

    hf_model, info = VisionEncoderDecoderModel.from_pretrained(dst, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    back = glimpse.load(dst)
    assert back.caption([image], max_new_tokens=8)[0] == caption
    pixels = pipe.transform(__import__("PIL.Image").Image.open(image).convert("RGB"))[None]
    start = torch.tensor([[pipe.model.cfg.decoder_start_token_id]])
    with torch.no_grad():
        want = hf_model.eval().generate(pixel_values=pixels, max_new_tokens=8, do_sample=False)
    new = want[0, 1:].tolist()
    eos = pipe.tokenizer.ids["eos"]
    assert pipe.tokenizer.decode(new[:new.index(eos)] if eos in new else new).strip() == caption
    assert start.shape == (1, 1)


def test_server_chat_answers_with_the_caption(captioner_run, world):
    import base64

    from fastapi.testclient import TestClient

    import glimpse
    from glimpse.serve.app import create_app

    pipe = glimpse.load(captioner_run)
    image = sorted((world / "images" / "test").glob("*.png"))[1]
    url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    with TestClient(create_app(pipe, "captioner")) as client:
        r = client.post("/v1/chat/completions", json={"model": "captioner", "max_tokens": 8, "temperature": 0, "messages": [
            {"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                         {"type": "image_url", "image_url": {"url": url}}]}]})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == pipe.caption([image], max_new_tokens=8)[0]
        r = client.post("/v1/chat/completions", json={"model": "captioner", "messages": [
            {"role": "user", "content": "no image here"}]})
        assert r.status_code == 400 and "send an image" in r.json()["error"]["message"]


def test_caption_parser_reads_every_world_caption(world):
    """parse_caption gives each reference caption's scene exactly (the captioner's scene_exact reads
    generated captions the same way), and refuses captions that leave an object incomplete."""
    from glimpse.data.shapes_words import parse_caption, scene_key

    coco = json.loads((world / "annotations" / "captions_test.json").read_text())
    scenes = {im["id"]: scene_key(im["scene"]) for im in coco["images"]}
    assert len(coco["annotations"]) >= 100
    for a in coco["annotations"]:
        assert parse_caption(a["caption"]) == scenes[a["image_id"]], a["caption"]
    assert parse_caption("a red circle on the left") is None  # no size
    assert parse_caption("a small red circle") is None  # no place
    assert parse_caption("a small red circle on the left and a large blue") is None


def test_demo_captioner(world, tmp_path, capsys):
    from glimpse.cli import main

    main(["--quiet", "demo", "captioner", "--out", str(tmp_path / "demo"),
          *[f"--set={o}" for o in tiny_captioner_overrides(world, **{"train.max_steps": 3, "eval.splits": "[test]",
                                                                      "eval.during_train": "[]"})]])
    out = capsys.readouterr().out
    assert "test/cider" in out and "captions of test images" in out and "GFLOP/s" in out
    assert (tmp_path / "demo" / "eval.json").is_file()
