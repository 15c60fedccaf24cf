"""`glimpse.load` as the README shows it: a run or a Hugging Face folder, a dtype, a folder without its
tokenizer, and a word of warning when bf16 is asked for on a CPU that emulates it."""

from __future__ import annotations

import pytest
import torch
from hf_helpers import randomize, save
from test_hf_llava import llava
from test_hf_towers import TEXT, VISION, pixels

import glimpse
import glimpse.api
from glimpse import hardware
from glimpse.errors import GlimpseError

transformers = pytest.importorskip("transformers")


def test_glimpse_load_is_the_api_load():
    assert glimpse.load is glimpse.api.load


def test_load_a_run_in_bf16(tiny_run, tiny_vlm_run, world):
    image = str(world / "images" / "test" / "test_000000.png")
    pipe = glimpse.load(tiny_run, dtype="bf16")
    assert all(p.dtype == torch.bfloat16 for p in pipe.model.parameters())
    for emb in (pipe.embed_texts(["a small red circle"]), pipe.embed_images([image])):
        assert emb.dtype == torch.float32 and torch.isfinite(emb).all()  # embeddings come back as float32
    fp32 = glimpse.load(tiny_run).embed_images([image])
    assert torch.nn.functional.cosine_similarity(fp32, pipe.embed_images([image])).item() > 0.99
    vlm = glimpse.load(tiny_vlm_run, dtype="bf16")  # pixels meet a bf16 tower, features a bf16 LM
    assert isinstance(vlm.ask([image], ["how many shapes are there?"], max_new_tokens=4)[0], str)
    with pytest.raises(GlimpseError, match="unknown dtype 'bf17'"):
        glimpse.load(tiny_run, dtype="bf17")


def test_bf16_on_a_cpu_without_it_is_said_once(tiny_run, capsys, monkeypatch):
    monkeypatch.setattr(hardware, "_warned", set())
    monkeypatch.setattr(hardware, "cpu_bf16_is_slow", lambda: True)
    glimpse.load(tiny_run, dtype="bf16")
    glimpse.load(tiny_run, dtype=torch.bfloat16)
    err = capsys.readouterr().err
    assert err.count("no native bf16") == 1 and 'dtype="fp32"' in err and len(err.strip().splitlines()) == 1
    monkeypatch.setattr(hardware, "_warned", set())
    monkeypatch.setattr(hardware, "cpu_bf16_is_slow", lambda: False)
    glimpse.load(tiny_run, dtype="bf16")
    assert capsys.readouterr().err == ""


def test_the_bf16_probe_measures_this_machine():
    slow = hardware.cpu_bf16_is_slow()
    assert isinstance(slow, bool) and hardware.matmul_gflops(n=256, repeats=1) > 0
    assert hardware.memory_read_gbps(mib=8, repeats=1) > 0


def test_a_folder_without_a_tokenizer_loads_for_its_modules(tmp_path):
    hf = randomize(transformers.CLIPModel(transformers.CLIPConfig(vision_config=VISION, text_config=TEXT,
                                                                  projection_dim=16)))
    save(hf, tmp_path / "clip")
    assert not (tmp_path / "clip" / "tokenizer.json").exists()
    pipe = glimpse.load(tmp_path / "clip")
    with torch.no_grad():
        feats = pipe.model.get_image_features(pixels())
    assert feats.shape == (3, 16)
    with pytest.raises(GlimpseError) as e:
        pipe.embed_texts(["a red circle"])
    assert "has no tokenizer.json" in str(e.value) and "\n" not in str(e.value)


def test_a_llava_folder_without_a_tokenizer_loads_and_runs_forward(tmp_path):
    save(llava("clip_llama"), tmp_path / "llava")
    pipe = glimpse.load(tmp_path / "llava")
    ids = torch.tensor([[1] + [63] * pipe.model.image_tokens + [5, 6]])
    with torch.no_grad():
        logits = pipe.model(ids, pixel_values=pixels(1))
    assert logits.shape == (1, ids.shape[1], 64)
    with pytest.raises(GlimpseError, match="has no tokenizer.json"):
        pipe.ask([torch.zeros(3, 16, 16)], ["what is it?"])


def test_bf16_training_on_a_cpu_without_it_is_said_once(world, tmp_path, capsys, monkeypatch):
    from conftest import tiny_overrides

    from glimpse.config import load_recipe
    from glimpse.train.trainer import train

    monkeypatch.setattr(hardware, "_warned", set())
    monkeypatch.setattr(hardware, "cpu_bf16_is_slow", lambda: True)
    recipe = load_recipe("shapes-clip", tiny_overrides(world, **{"train.max_steps": 1, "train.precision": "bf16",
                                                                 "eval.splits": "[]"}))
    train(recipe, tmp_path / "run", progress=False)
    err = capsys.readouterr().err
    assert err.count("no native bf16") == 1 and "train.precision: fp32" in err
