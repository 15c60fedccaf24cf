"""`glimpse convert RUN DST --to hf`: transformers loads the folder with no missing or unexpected
keys and computes the same logits / features; glimpse.load of the folder answers as the run does."""

from __future__ import annotations

import subprocess

import pytest
import torch
from conftest import PY, tiny_overrides, tiny_vlm_overrides
from PIL import Image
from torch.testing import assert_close

import glimpse
from glimpse.api import export, load_run
from glimpse.errors import GlimpseError
from glimpse.models.decoder import positions_from_mask

transformers = pytest.importorskip("transformers")


def images():
    return [Image.new("RGB", (40, 32), (200, 40, 40)), Image.new("RGB", (32, 32), (30, 60, 220))]


def hf_load(cls, folder):
    model, info = cls.from_pretrained(str(folder), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


@pytest.fixture(scope="module")
def llava_run(world, tmp_path_factory):
    from glimpse.config import load_recipe
    from glimpse.train.trainer import train

    out = tmp_path_factory.mktemp("runs") / "llava-clip"
    sets = tiny_vlm_overrides(world, **{"model.vision.class_token": "true", "model.vision.pool": "cls",
                                        "model.pixel_shuffle": 1, "model.image_positions": "false",
                                        "model.projector_norm": "false",
                                        "model.vision_feature_layer": -2,
                                        "train.max_steps": 2, "eval.splits": "[]", "eval.during_train": "[]"})
    train(load_recipe("shapes-llava-stage2", sets), out, progress=False)
    return out


def test_llava_export(llava_run, tmp_path, cli_env):
    dst = tmp_path / "hf"
    r = subprocess.run([PY, "-m", "glimpse", "convert", str(llava_run), str(dst), "--to", "hf"], env=cli_env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
              "preprocessor_config.json", "processor_config.json", "generation_config.json"):
        assert (dst / f).is_file(), f
    hf = hf_load(transformers.LlavaForConditionalGeneration, dst)

    task, model = load_run(llava_run)
    pipe = task.pipeline(model)
    prompts = [pipe.question_prompt("what colour is the shape?", im) for im in images()]
    rows = [ids for ids, _ in prompts]
    T = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    px = torch.stack([task.transform(im) for im in images()])
    pos = positions_from_mask(mask)
    with torch.no_grad():
        ours = model(ids, mask, px, position_ids=pos)
        ref = hf(input_ids=ids, attention_mask=mask, pixel_values=px, position_ids=pos).logits
    assert_close(ours[mask.bool()], ref[mask.bool()], atol=1e-4, rtol=1e-4)
    # the processor transformers builds from the folder preprocesses as the run does
    proc = transformers.AutoImageProcessor.from_pretrained(str(dst))
    assert_close(proc(images(), return_tensors="pt")["pixel_values"], px, atol=2e-2, rtol=0)

    # transformers' own processor builds the same prompt from the folder, and its greedy answer is the run's
    proc = transformers.AutoProcessor.from_pretrained(str(dst))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour is the shape?"}]}]
    inputs = proc(images=images()[0], text=proc.apply_chat_template(messages, add_generation_prompt=True),
                  return_tensors="pt")
    ours_ids, _ = pipe.chat_prompt([{"role": "user", "content": [{"type": "image", "image": images()[0]},
                                                                 {"type": "text", "text": "what colour is the shape?"}]}])
    assert inputs["input_ids"][0].tolist() == ours_ids
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=6, do_sample=False)
    answer = proc.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert answer == pipe.ask(images()[:1], ["what colour is the shape?"], max_new_tokens=6)[0]

    again = glimpse.load(dst)
    assert again.template == pipe.template  # the built-in template's name comes back
    q = ["what colour is the shape?", "how many shapes are there?"]
    assert again.ask(images(), q, max_new_tokens=6) == pipe.ask(images(), q, max_new_tokens=6)
    assert again.caption(images(), max_new_tokens=6) == pipe.caption(images(), max_new_tokens=6)


def test_clip_export(world, tmp_path):
    from glimpse.config import load_recipe
    from glimpse.train.trainer import train

    run = tmp_path / "clip"
    sets = tiny_overrides(world, **{"model.vision.class_token": "true", "model.vision.pool": "cls",
                                    "train.max_steps": 2, "eval.splits": "[]", "eval.during_train": "[]"})
    train(load_recipe("shapes-clip", sets), run, progress=False)
    export(run, tmp_path / "hf")
    hf = hf_load(transformers.CLIPModel, tmp_path / "hf")
    pipe = glimpse.load(run)
    texts = ["a red circle", "a small blue square at the top", "a cross"]
    ids, mask = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "hf"))(
        ["<bos>" + t + "<eos>" for t in texts], return_tensors="pt", padding=True).values()
    px = torch.stack([pipe.transform(im) for im in images()])
    with torch.no_grad():
        t = hf.get_text_features(input_ids=ids, attention_mask=mask)
        i = hf.get_image_features(pixel_values=px)
    t = t if torch.is_tensor(t) else t.pooler_output
    i = i if torch.is_tensor(i) else i.pooler_output
    assert_close(torch.nn.functional.normalize(t, dim=-1), pipe.embed_texts(texts), atol=1e-5, rtol=1e-4)
    assert_close(torch.nn.functional.normalize(i, dim=-1), pipe.embed_images(images()), atol=1e-5, rtol=1e-4)
    again = glimpse.load(tmp_path / "hf")
    assert_close(again.embed_texts(texts), pipe.embed_texts(texts))
    labels, one = ["red circle", "blue square", "green cross"], ["a {}"]  # a folder has no recipe's templates
    assert_close(again.classify(images(), labels, one, return_probs=True)[1],
                 pipe.classify(images(), labels, one, return_probs=True)[1])


def test_export_refuses_what_transformers_cannot_compute(tiny_run, tmp_path):
    # shapes-clip's image tower: mean-pooled patches, no class token
    with pytest.raises(GlimpseError, match="no Hugging Face model computes it exactly"):
        export(tiny_run, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_real_recipe_path_siglip_qwen2(world, tmp_path):
    """llava-siglip-qwen2 at tiny sizes: both parts start from Hugging Face folders (init_parts), train
    frozen, and the run exports to a LlavaForConditionalGeneration folder transformers loads."""
    from hf_helpers import randomize

    from glimpse.config import load_recipe
    from glimpse.data.tokenizer import Tokenizer
    from glimpse.families import load_hf
    from glimpse.runs import read_weights
    from glimpse.train.trainer import train

    V = Tokenizer(world / "tokenizer.json").vocab_size
    vis = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
               patch_size=8)
    randomize(transformers.SiglipModel(transformers.SiglipConfig(
        vision_config=vis, text_config=dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=2)))).save_pretrained(tmp_path / "siglip")
    randomize(transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6))).save_pretrained(tmp_path / "qwen2")
    sets = {"init_parts.vision": tmp_path / "siglip", "init_parts.lm": tmp_path / "qwen2",
            "tokenizer": world / "tokenizer.json", "data.source": "shapes", "data.root": world, "data.image_size": 32,
            "data.num_workers": 0, "data.files": "{}", "data.images": "{}",
            "model.vision.image_size": 32, "model.vision.patch_size": 8, "model.vision.width": 32,
            "model.vision.layers": 2, "model.vision.heads": 2, "model.vision.mlp_ratio": 2.0,
            "model.lm.vocab_size": V, "model.lm.width": 32, "model.lm.layers": 2, "model.lm.heads": 4,
            "model.lm.kv_heads": 2, "model.lm.mlp_hidden": 48, "model.lm.context_length": 64,
            "train.batch_size": 4, "train.max_steps": 2, "train.save_every": 2, "train.warmup_steps": 1}
    recipe = load_recipe("llava-siglip-qwen2", [f"{k}={v}" for k, v in sets.items()])
    train(recipe, tmp_path / "run", progress=False)
    saved = read_weights(next((tmp_path / "run" / "checkpoints").iterdir()) / "model.safetensors")
    lm = load_hf(tmp_path / "qwen2").model.state_dict()
    assert torch.equal(saved["lm.blocks.1.attn.q.bias"], lm["blocks.1.attn.q.bias"])  # loaded, and frozen
    export(tmp_path / "run", tmp_path / "hf")
    hf = hf_load(transformers.LlavaForConditionalGeneration, tmp_path / "hf")
    assert hf.config.vision_feature_select_strategy == "full"
    task, model = load_run(tmp_path / "run")
    ids = torch.tensor([[1] + [task.tokenizer.ids["image"]] * model.image_tokens + [5, 6, 7]])
    px = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert_close(model(ids, None, px), hf(input_ids=ids, pixel_values=px).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_language_model_export_and_init_from_a_folder(world, tmp_path, arch):
    from test_lm import lm_overrides

    from glimpse.config import load_recipe
    from glimpse.families import init_from_hf
    from glimpse.train.trainer import train

    run = tmp_path / "lm"
    sets = lm_overrides(world, **{"train.max_steps": 2, "train.save_every": 2, "train.eval_every": 0,
                                  "eval.splits": "[]", "eval.during_train": "[]", "model.arch": arch,
                                  "model.kv_heads": 2 if arch == "llama" else 0, "model.qkv_bias": arch == "llama"})
    train(load_recipe("shapes-lm", sets), run, progress=False)
    export(run, tmp_path / "hf", dtype="fp32")
    cls = transformers.Qwen2ForCausalLM if arch == "llama" else transformers.GPT2LMHeadModel  # qkv bias: Qwen2
    hf = hf_load(cls, tmp_path / "hf")
    task, model = load_run(run)
    ids = torch.randint(3, 100, (2, 12))
    with torch.no_grad():
        assert_close(model(ids), hf(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    prompts = ["a small red", "there is a"]
    assert glimpse.load(tmp_path / "hf").generate(prompts, 6) == task.pipeline(model).generate(prompts, 6)
    fresh = task.build_model()  # a recipe's `init:` may name the folder: the whole model, strictly
    init_from_hf(fresh, tmp_path / "hf")
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


def test_llava_export_refuses_learned_image_positions():
    from glimpse.families.vlm.hf import hf_llava_config
    from glimpse.families.vlm.model import VLMConfig
    from glimpse.models.vision import VisionConfig

    cfg = VLMConfig(vision=VisionConfig(class_token=True, pool="cls"), image_positions=True, image_token_id=3)
    with pytest.raises(GlimpseError, match="learned image positions"):
        hf_llava_config(cfg)
    cfg = VLMConfig(vision=VisionConfig(class_token=True, pool="cls"), projector_norm=True, image_token_id=3)
    with pytest.raises(GlimpseError, match="a projector norm"):
        hf_llava_config(cfg)
