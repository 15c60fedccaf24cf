"""`glimpse convert RUN DST --to hf`: a glimpse run as a Hugging Face model folder.

    vlm (LLaVA-style)   -> LlavaForConditionalGeneration (+ processor files: vLLM and transformers serve it)
    dual_encoder (CLIP) -> CLIPModel
    causal_lm           -> LlamaForCausalLM / Qwen2ForCausalLM / GPT2LMHeadModel

The folder holds config.json, model.safetensors, tokenizer.json, tokenizer_config.json (with the
chat template), chat_template.jinja, special_tokens_map.json, generation_config.json and, for image
models, preprocessor_config.json (+ processor_config.json for LLaVA).  The weights go through the
same rules as loading (glimpse.hub), run backwards.

Where glimpse's parts compute something no Hugging Face class does (a ViT without a class token
but with a pre-norm, mean pooling, a prefix or pixel-shuffle connector), export stops with an
error naming the setting; it never writes a folder that would compute something else.

transformers' CLIP text model pools with a legacy rule when the eos id is 2 (the highest token id
instead of the eos): glimpse's own tokenizers put the eos at 2, so the CLIP export swaps ids 2 and
V-1 in the tokenizer and the embedding table together, which changes no output.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from glimpse.errors import GlimpseError
from glimpse.hub.decoder import decoder_rules, hf_decoder_config
from glimpse.hub.llava import PARTS_PREFIX, hf_llava_config, llava_rules
from glimpse.hub.mapping import to_hf
from glimpse.hub.towers import dual_rules, hf_dual_config

RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


def _preprocessor(transform) -> dict:
    d = transform.to_dict()
    s = d["image_size"]
    size = {"shortest_edge": s} if d["resize"] == "shortest" else {"height": s, "width": s}
    return {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": size,
            "do_center_crop": d["resize"] == "shortest", "crop_size": {"height": s, "width": s},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": list(d["mean"]), "image_std": list(d["std"]), "resample": RESAMPLE[d["interpolation"]],
            "do_convert_rgb": True}


def _swap_ids(tok: dict, a: int, b: int) -> dict:
    """tokenizer.json with token ids a and b exchanged (vocabulary, added tokens, post-processor)."""
    swap = {a: b, b: a}
    vocab = tok["model"].get("vocab")
    if not isinstance(vocab, dict):
        raise GlimpseError("export: cannot renumber this tokenizer's vocabulary (not a BPE / word-level vocab)")
    tok["model"]["vocab"] = {t: swap.get(i, i) for t, i in vocab.items()}
    for t in tok.get("added_tokens") or []:
        t["id"] = swap.get(t["id"], t["id"])
    post = tok.get("post_processor") or {}
    for st in (post.get("special_tokens") or {}).values():
        st["ids"] = [swap.get(i, i) for i in st.get("ids", [])]
    return tok


def export(run: str | Path, dst: str | Path, dtype: str = "fp32") -> Path:
    from glimpse.api import load_run
    from glimpse.data.chat import TEMPLATES

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if dtype not in dtypes:
        raise GlimpseError(f"export dtype {dtype!r} must be one of {', '.join(dtypes)}")
    task, model = load_run(run)
    family, tok = task.recipe.family, task.tokenizer
    dst = Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise GlimpseError(f"{dst} exists and is not empty")
    sd = {k: v for k, v in model.state_dict().items()}
    tok_json = json.loads(Path(tok.path).read_text())
    template = None
    if family == "vlm":
        config, rules = hf_llava_config(model.cfg), llava_rules(model.cfg)
        t = model.cfg.chat_template
        template = PARTS_PREFIX + TEMPLATES.get(t, t)
    elif family == "dual_encoder":
        config, rules = hf_dual_config(model.cfg), dual_rules(model.cfg)
        eos, V = tok.ids["eos"], model.cfg.text.vocab_size
        if eos is None:
            raise GlimpseError("export: CLIP pools the eos token, and this tokenizer has none")
        if eos == 2:  # transformers' legacy CLIP pooling (see the module docstring)
            swap = torch.arange(V)
            swap[2], swap[V - 1] = V - 1, 2
            sd["text.token_embed.weight"] = sd["text.token_embed.weight"][swap]
            tok_json, eos = _swap_ids(tok_json, 2, V - 1), V - 1
        config["text_config"].update(eos_token_id=eos, bos_token_id=tok.ids["bos"], pad_token_id=tok.pad_id)
    elif family == "causal_lm":
        config, rules = hf_decoder_config(model.cfg), decoder_rules(model.cfg)
    else:
        raise GlimpseError(f"export: family {family!r} has no Hugging Face counterpart")
    tensors = {k: v.to(dtypes[dtype]) for k, v in to_hf(sd, rules).items()}
    names = {r: (tok.hf.id_to_token(i) if i is not None else None) for r, i in tok.ids.items()}
    config["dtype"] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]
    if family != "dual_encoder":
        for key in ("bos", "eos", "pad"):
            config[f"{key}_token_id"] = tok.ids[key]
            if family == "vlm":
                config["text_config"][f"{key}_token_id"] = tok.ids[key]

    tmp = dst.with_name(f".tmp-{dst.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    (tmp / "tokenizer.json").write_text(json.dumps(tok_json, ensure_ascii=False))
    specials = {f"{k}_token": v for k, v in names.items() if k in ("bos", "eos", "pad") and v}
    if family == "vlm":
        specials["image_token"] = names.get("image")
    max_len = {"vlm": lambda c: c.lm.context_length, "dual_encoder": lambda c: c.text.context_length,
               "causal_lm": lambda c: c.context_length}[family](model.cfg)
    tc = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len, **specials,
          "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False}
    if family == "vlm":
        tc["extra_special_tokens"] = {"image_token": names["image"]}
    if template:
        tc["chat_template"] = template
        (tmp / "chat_template.jinja").write_text(template)
    (tmp / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
    (tmp / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    if family != "dual_encoder":
        gen = {k: config.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
    if task.transform is not None:
        (tmp / "preprocessor_config.json").write_text(json.dumps(_preprocessor(task.transform), indent=2))
    if family == "vlm":
        v = model.cfg.vision
        (tmp / "processor_config.json").write_text(json.dumps({
            "processor_class": "LlavaProcessor", "patch_size": v.patch_size, "image_token": names["image"],
            "vision_feature_select_strategy": config["vision_feature_select_strategy"],
            "num_additional_image_tokens": int(v.class_token)}, indent=2))
    if dst.exists():
        dst.rmdir()
    tmp.rename(dst)
    return dst
