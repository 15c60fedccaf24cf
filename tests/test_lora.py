"""LoRA (glimpse.models.lora, train.lora): a fresh adapter changes nothing, merging changes nothing, only the
adapters train, and a LoRA run's adapters load with PEFT onto its exported transformers model."""

from __future__ import annotations

import json
import subprocess
from types import SimpleNamespace

import pytest
import torch
from conftest import PY, tiny_vlm_overrides
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from torch.testing import assert_close

import glimpse
from glimpse.errors import GlimpseError
from glimpse.models.decoder import DecoderConfig, positions_from_mask
from glimpse.models.lora import (
    LoraLinear,
    apply_lora,
    lora_layers,
    lora_modules,
    lora_state_dict,
    mark_only_lora_trainable,
    merge_lora,
    unload_lora,
)
from glimpse.models.vision import VisionConfig
from glimpse.models.vlm import VisionLanguageModel, VLMConfig

TARGETS = ["qkv", "attn.q", "attn.v", "mlp.down", "linear_1"]


def lora_cfg(r=4, alpha=8.0, dropout=0.0, targets=TARGETS):
    return SimpleNamespace(r=r, alpha=alpha, dropout=dropout, targets=list(targets))


def tiny_vlm(seed=0) -> VisionLanguageModel:
    torch.manual_seed(seed)
    cfg = VLMConfig(vision=VisionConfig(image_size=32, patch_size=8, width=32, layers=2, heads=2, class_token=True,
                                        pool="cls"),
                    lm=DecoderConfig(vocab_size=50, width=32, layers=2, heads=2, kv_heads=1), vision_feature_layer=-1,
                    image_token_id=3)
    return VisionLanguageModel(cfg).eval()


def inputs(model):
    n = VisionLanguageModel.count_image_tokens(model.cfg)
    ids = torch.tensor([[5, 6] + [3] * n + [7, 8, 9], [0, 0] + [3] * n + [10, 11, 12]])
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    px = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return ids, mask, px, positions_from_mask(mask)


def logits(model, ids, mask, px, pos):
    with torch.no_grad():
        return model(ids, mask, px, position_ids=pos)


def randomize_b(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    for _, m in lora_modules(model):
        m.lora_B.weight.data = torch.randn(m.lora_B.weight.shape, generator=g) * 0.05


def test_fresh_adapters_compute_the_base_exactly():
    model = tiny_vlm()
    x = inputs(model)
    base = logits(model, *x)
    names = apply_lora(model, lora_cfg(dropout=0.1))
    assert set(names) == {f"vision.blocks.{i}.attn.qkv" for i in (0, 1)} | {
        f"lm.blocks.{i}.attn.{p}" for i in (0, 1) for p in "qv"} | {f"lm.blocks.{i}.mlp.down" for i in (0, 1)} | {
        "connector.linear_1"}
    assert all(isinstance(model.get_submodule(n), LoraLinear) for n in names)
    assert torch.equal(logits(model, *x), base)
    # the base's tensors keep their names; the adapters add PEFT's suffixes
    assert set(lora_state_dict(model)) == {f"{n}.lora_{ab}.weight" for n in names for ab in "AB"}
    assert {k for k in model.state_dict() if ".lora_" not in k} == set(tiny_vlm().state_dict())


def test_lora_layer_is_peft_layer():
    peft = pytest.importorskip("peft")
    base = nn.Linear(24, 16)
    ours = LoraLinear(base, r=4, alpha=8)
    ref = peft.tuners.lora.Linear(nn.Linear(24, 16), "default", config=peft.LoraConfig(r=4, lora_alpha=8), r=4,
                                  lora_alpha=8)
    assert ref.scaling["default"] == ours.scaling == 2.0
    for seed in (5, 6):  # the same draw: A kaiming_uniform(a=sqrt 5), B zeros
        torch.manual_seed(seed)
        ours.reset_lora_parameters()
        torch.manual_seed(seed)
        ref.reset_lora_parameters("default", True)
        assert torch.equal(ours.lora_A.weight, ref.lora_A["default"].weight)
        assert not ours.lora_B.weight.any()
    # the same function
    ref.base_layer.load_state_dict(base.state_dict())
    ours.lora_B.weight.data.normal_()
    ref.lora_B["default"].weight.data.copy_(ours.lora_B.weight)
    x = torch.randn(3, 5, 24)
    with torch.no_grad():
        assert_close(ours(x), ref(x), atol=1e-6, rtol=1e-6)


def test_merged_equals_unmerged():
    model = tiny_vlm()
    x = inputs(model)
    embed = model.lm.token_embed.weight.clone()
    apply_lora(model, lora_cfg())
    randomize_b(model)
    unmerged = logits(model, *x)
    assert not torch.allclose(unmerged, logits(tiny_vlm(), *x), atol=1e-3)  # the adapters do something
    merge_lora(model)
    assert not lora_modules(model) and not lora_state_dict(model)
    assert_close(logits(model, *x), unmerged, atol=1e-5, rtol=1e-5)
    assert torch.equal(model.lm.token_embed.weight, embed)  # the tied head was not touched
    # unload: the base again, exactly
    m2 = tiny_vlm()
    apply_lora(m2, lora_cfg())
    randomize_b(m2)
    assert torch.equal(logits(unload_lora(m2), *x), logits(tiny_vlm(), *x))


def test_only_adapters_train():
    from glimpse.train.trainer import param_groups

    model = tiny_vlm().train()
    apply_lora(model, lora_cfg(dropout=0.1))
    mark_only_lora_trainable(model)
    lora_params = {id(m.lora_A.weight) for _, m in lora_modules(model)} | {id(m.lora_B.weight)
                                                                          for _, m in lora_modules(model)}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == lora_params
    groups = param_groups(model, 0.1)
    assert {id(p) for g in groups for p in g["params"]} == lora_params
    opt = torch.optim.AdamW(groups, lr=1e-2)
    ids, mask, px, pos = inputs(model)
    model(ids, mask, px, position_ids=pos).logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (id(p) in lora_params), name
    opt.step()
    assert len(opt.state) == len(lora_params)


def test_bad_targets_are_one_line_errors():
    model = tiny_vlm()
    with pytest.raises(GlimpseError, match=r"'q_proj' names no linear layer of the model; its linear layers: "
                                           r"attn\.qkv, attn\.out, mlp\.fc1, mlp\.fc2, attn\.q, .*connector\.linear_2 \(full "
                                           r"names such as vision\.blocks\.0\.attn\.qkv, lm\.blocks\.0\.attn\.q, "
                                           r"connector\.linear_1\)$"):
        apply_lora(model, lora_cfg(targets=["q_proj"]))
    with pytest.raises(GlimpseError, match="names no linear layer"):
        apply_lora(model, lora_cfg(targets=["attn"]))  # a module, not a linear layer
    with pytest.raises(GlimpseError, match="only layers of the frozen part 'vision'"):
        apply_lora(model, lora_cfg(targets=["qkv"]), skip=["vision"])
    with pytest.raises(GlimpseError, match="tied embeddings"):
        apply_lora(model, lora_cfg(targets=["lm_head"]))
    assert not lora_modules(model)
    # a frozen part is left alone, the rest adapted
    assert apply_lora(model, lora_cfg(targets=["q", "lm.blocks.1.mlp.up"]), skip=["vision"]) == [
        "lm.blocks.0.attn.q", "lm.blocks.1.attn.q", "lm.blocks.1.mlp.up"]
    with pytest.raises(GlimpseError, match="already has LoRA adapters"):
        apply_lora(model, lora_cfg(targets=["k"]))


def test_peft_names_of_a_llava_export():
    from glimpse.hub.export import HFFolder
    from glimpse.hub.llava import MODULE_PREFIXES, llava_rules
    from glimpse.hub.peft import adapter_of

    model = tiny_vlm()
    folder = HFFolder({"architectures": ["LlavaForConditionalGeneration"]}, {}, llava_rules(model.cfg), {}, {}, 64,
                      module_prefixes=MODULE_PREFIXES)
    lm_only = lora_cfg(targets=["attn.o", "mlp.down", "linear_1"])  # names the tower's layers do not have
    apply_lora(model, lm_only)
    adapter = adapter_of(folder, lora_layers(model), lm_only, "/x")
    # the last names when they pick exactly the adapted layers, as PEFT matches them
    assert adapter.config["target_modules"] == ["down_proj", "linear_1", "o_proj"]
    assert adapter.config["task_type"] == "CAUSAL_LM" and adapter.config["base_model_name_or_path"] == "/x"

    model = tiny_vlm()
    apply_lora(model, lora_cfg())
    randomize_b(model)
    adapter = adapter_of(folder, lora_layers(model), lora_cfg(), None)
    # q_proj would also take the LM's k_proj, which has no adapter: every full name
    assert "model.language_model.layers.1.self_attn.v_proj" in adapter.config["target_modules"]
    assert "model.vision_tower.encoder.layers.0.self_attn.k_proj" in adapter.config["target_modules"]
    t = adapter.tensors
    assert len(t) == 2 * (2 * 3 + 2 * 2 + 2 + 1)
    # the fused qkv: A shared, B split by rows into q_proj, k_proj, v_proj
    qkv = model.vision.blocks[1].attn.qkv
    pre = "base_model.model.model.vision_tower.encoder.layers.1.self_attn."
    for i, p in enumerate(("q_proj", "k_proj", "v_proj")):
        assert torch.equal(t[pre + p + ".lora_A.weight"], qkv.lora_A.weight)
        assert torch.equal(t[pre + p + ".lora_B.weight"], qkv.lora_B.weight[32 * i:32 * (i + 1)])
    assert "base_model.model.model.language_model.layers.0.mlp.down_proj.lora_B.weight" in t
    assert "base_model.model.model.multi_modal_projector.linear_1.lora_A.weight" in t


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_peft_applies_adapters_to_exported_language_models(arch, tmp_path):
    """GPT-2's Conv1D layers (transposed weights: fan_in_fan_out) and its fused c_attn, Llama's q/k/v and MLP:
    the adapter on the transformers model computes what glimpse's LoRA decoder does."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from glimpse.hub.decoder import decoder_rules, hf_decoder_config
    from glimpse.hub.export import HFFolder
    from glimpse.hub.mapping import to_hf
    from glimpse.hub.peft import adapter_of
    from glimpse.models.decoder import CausalLM

    torch.manual_seed(0)
    model = CausalLM(DecoderConfig(arch=arch, vocab_size=60, width=32, layers=2, heads=2, context_length=32)).eval()
    rules, config = decoder_rules(model.cfg), hf_decoder_config(model.cfg)
    hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config)).eval()
    missing, unexpected = hf.load_state_dict(to_hf(model.state_dict(), rules), strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected  # the head is tied
    targets = ["qkv", "attn.o", "mlp.fc1"] if arch == "gpt2" else ["attn.q", "attn.k", "mlp.gate", "mlp.down"]
    cfg = lora_cfg(targets=targets)
    apply_lora(model, cfg)
    randomize_b(model)
    adapter = adapter_of(HFFolder(config, {}, rules, {}, {}, 32), lora_layers(model), cfg)
    assert adapter.config["fan_in_fan_out"] == (arch == "gpt2")
    # GPT-2: c_proj would also take the MLP's, which has no adapter, so every full name
    assert adapter.config["target_modules"] == ([f"transformer.h.{i}.{m}" for i in (0, 1) for m in (
        "attn.c_attn", "attn.c_proj", "mlp.c_fc")] if arch == "gpt2" else ["down_proj", "gate_proj", "k_proj", "q_proj"])
    adapter.write(tmp_path / "adapter")
    ids = torch.randint(0, 60, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model(ids)
        theirs = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()(input_ids=ids).logits
    assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


# --- a LoRA run end to end: train, resume, load, export, PEFT -------------------------------------------------

EXPORTABLE = {"model.vision.class_token": "true", "model.vision.pool": "cls", "model.pixel_shuffle": 1,
              "model.image_positions": "false", "model.projector_norm": "false", "model.vision_feature_layer": -2,
              "eval.splits": "[]", "eval.during_train": "[]", "freeze": "[]", "train.cache_vision_features": "false",
              # the vision tower's last layer is unused at vision_feature_layer -2: adapt the first only (a full name)
              "train.lora.r": 4, "train.lora.alpha": 8,
              "train.lora.targets": "[vision.blocks.0.attn.qkv, attn.q, attn.v, mlp.down, linear_1]",
              "train.lr": 0.02, "train.warmup_steps": 1, "train.save_every": 2}


def lora_recipe(world, **extra):
    from glimpse.config import load_recipe

    return load_recipe("shapes-llava-stage2", tiny_vlm_overrides(world, **{**EXPORTABLE, **extra}))


@pytest.fixture(scope="module")
def lora_run(world, tmp_path_factory):
    from glimpse.train.trainer import train

    out = tmp_path_factory.mktemp("runs") / "llava-lora"
    train(lora_recipe(world, **{"train.max_steps": 3}), out, progress=False)
    return out


def test_lora_run_trains_only_adapters_and_resumes(lora_run, world, tmp_path):
    from glimpse.train.trainer import train

    two, three = (load_file(str(lora_run / "checkpoints" / f"step_000000{s}" / "model.safetensors")) for s in (2, 3))
    assert two.keys() == three.keys()
    adapters = {k for k in three if ".lora_" in k}
    assert len(adapters) == 2 * (1 + 2 * 2 + 2 + 1)
    for k in three:  # the base weights never move; the adapters do
        assert torch.equal(two[k], three[k]) != (k in adapters), k
    state = json.loads((lora_run / "checkpoints" / "step_0000003" / "state.json").read_text())
    assert sum(len(g["params"]) for g in state["optimizer"]["param_groups"]) == len(adapters)

    # killed after step 2 and resumed: the same weights as the run that went straight through
    out = tmp_path / "resumed"
    train(lora_recipe(world, **{"train.max_steps": 2}), out, progress=False)
    train(lora_recipe(world, **{"train.max_steps": 3}), out, resume=True, progress=False)
    again = load_file(str(out / "checkpoints" / "step_0000003" / "model.safetensors"))
    assert all(torch.equal(again[k], three[k]) for k in three)


def hf_logits(model, ids, mask, px, pos):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, pixel_values=px, position_ids=pos).logits


def test_lora_run_loads_exports_and_peft_applies_its_adapters(lora_run, tmp_path, cli_env):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from glimpse.api import export, load_run

    task, model = load_run(lora_run, merge_lora=False)
    assert len(lora_modules(model)) == 8
    _, merged = load_run(lora_run)
    assert not lora_modules(merged)
    images = [Image.new("RGB", (40, 32), (200, 40, 40)), Image.new("RGB", (32, 32), (30, 60, 220))]
    pipe = task.pipeline(model)
    rows = [pipe.question_prompt("what colour is the shape?", im)[0] for im in images]
    T = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    px = torch.stack([task.transform(im) for im in images])
    pos = positions_from_mask(mask)
    ours = logits(model, ids, mask, px, pos)
    assert_close(logits(merged, ids, mask, px, pos), ours, atol=1e-5, rtol=1e-5)

    dst = tmp_path / "hf"
    export(lora_run, dst)
    cfg = json.loads((dst / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["base_model_name_or_path"] == str(dst.resolve())
    tensors = load_file(str(dst / "adapter" / "adapter_model.safetensors"))
    # only the tower's first layer is adapted: the full names, not q_proj (which would take the second's too)
    assert cfg["target_modules"] == sorted({k[len("base_model.model."):].rsplit(".", 2)[0] for k in tensors})
    assert len(cfg["target_modules"]) == 3 + 2 * 3 + 1
    assert "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight" in tensors
    assert "base_model.model.model.vision_tower.encoder.layers.0.self_attn.k_proj.lora_B.weight" in tensors
    # the run wrote the same adapter itself (no Hugging Face folder to name as its base: it started from scratch)
    own = load_file(str(lora_run / "adapter" / "adapter_model.safetensors"))
    assert own.keys() == tensors.keys() and all(torch.equal(own[k], tensors[k]) for k in own)
    assert json.loads((lora_run / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] is None

    hf, info = transformers.LlavaForConditionalGeneration.from_pretrained(str(dst), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    hf.eval()
    base = hf_logits(hf, ids, mask, px, pos)
    m = mask.bool()
    assert not torch.allclose(base[m], ours[m], atol=1e-3)  # the exported base is not the LoRA model
    with_adapters = peft.PeftModel.from_pretrained(hf, str(dst / "adapter")).eval()
    assert_close(hf_logits(with_adapters, ids, mask, px, pos)[m], ours[m], atol=1e-5, rtol=1e-5)

    # --merge-lora: one plain folder computing the same
    merged_dst = tmp_path / "merged"
    r = subprocess.run([PY, "-m", "glimpse", "convert", str(lora_run), str(merged_dst), "--to", "hf", "--merge-lora"],
                       env=cli_env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not (merged_dst / "adapter").exists()
    hf2, info = transformers.LlavaForConditionalGeneration.from_pretrained(str(merged_dst), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert_close(hf_logits(hf2.eval(), ids, mask, px, pos)[m], ours[m], atol=1e-5, rtol=1e-5)
    q = ["what colour is the shape?", "how many shapes are there?"]
    assert glimpse.load(merged_dst).ask(images, q, max_new_tokens=6) == glimpse.load(lora_run).ask(
        images, q, max_new_tokens=6)


def test_a_lora_run_as_init_says_how(lora_run, world, tmp_path):
    from glimpse.config import load_recipe
    from glimpse.train.trainer import train

    recipe = load_recipe("shapes-llava-stage2", tiny_vlm_overrides(world, **{**EXPORTABLE, "train.lora.r": 0,
                                                                             "init": str(lora_run)}))
    with pytest.raises(GlimpseError, match="it is a LoRA run's .*--merge-lora"):
        train(recipe, tmp_path / "r", progress=False)


def test_merge_lora_refuses_a_plain_run(tiny_run, tmp_path):
    from glimpse.api import export

    with pytest.raises(GlimpseError, match="has no LoRA adapters"):
        export(tiny_run, tmp_path / "x", merge_lora=True)
    assert not (tmp_path / "x").exists()


def test_bad_target_in_a_recipe(world, tmp_path):
    from glimpse.train.trainer import train

    with pytest.raises(GlimpseError, match="train.lora.targets: 'q_proj' names no linear layer"):
        train(lora_recipe(world, **{"train.lora.targets": "[q_proj]", "train.max_steps": 1}), tmp_path / "r",
              progress=False)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_lora_on_two_processes(parallel, lora_run, world, tmp_path, cli_env):
    """Two processes (gloo), the base frozen and only the adapters requiring gradients: DDP, or FSDP sharding
    block by block with the adapters inside the blocks, trains them and leaves the base exactly as the
    one-process run (`lora_run`, the same recipe) does; the adapters are gathered whole for RUN/adapter."""
    sets = tiny_vlm_overrides(world, **{**EXPORTABLE, "train.max_steps": 3, "train.threads": 1,
                                        "train.parallel": parallel})
    two = tmp_path / "two"
    r = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "glimpse",
                        "--quiet", "train", "shapes-llava-stage2", *[x for s in sets for x in ("--set", s)],
                        "--out", str(two)], env=dict(cli_env, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]

    def losses(run):
        return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]

    # the same weights at step 1; the vlm loss is a token mean per process, so close, not equal
    assert_close(losses(two)[0], losses(lora_run)[0], rtol=1e-3, atol=0)
    a, b = (load_file(str(run / "checkpoints" / "step_0000003" / "model.safetensors")) for run in (lora_run, two))
    assert a.keys() == b.keys()
    for k in a:
        if ".lora_" in k:
            assert_close(b[k], a[k], rtol=0, atol=0.15)  # three Adam steps of lr <= 0.02 from the same start
        else:
            assert torch.equal(b[k], a[k]), k
    assert any(b[k].any() for k in b if ".lora_B." in k)
    own = load_file(str(two / "adapter" / "adapter_model.safetensors"))
    assert own.keys() == load_file(str(lora_run / "adapter" / "adapter_model.safetensors")).keys()
