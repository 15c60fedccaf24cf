"""Recipes: YAML files mapped onto typed dataclasses, with `--set a.b=value` overrides.

A recipe's file name is its name.  Every key is checked: an unknown key is an error that
lists the valid ones, and a value of the wrong type is an error that names the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from glimpse.errors import GlimpseError
from glimpse.models.decoder import DecoderConfig
from glimpse.models.dual_encoder import DualEncoderConfig
from glimpse.models.fusion import FusionConfig
from glimpse.models.vlm import VLMConfig

RECIPE_DIR = Path(__file__).parent / "configs"

# family -> the dataclass its `model:` section maps onto
MODEL_CONFIGS: dict[str, type] = {"dual_encoder": DualEncoderConfig, "causal_lm": DecoderConfig, "vlm": VLMConfig,
                                  "fusion": FusionConfig}


@dataclass
class DataConfig:
    source: str = "shapes"  # shapes (generated on first use, cached) | coco | csv | wds
    root: str | None = None  # shapes: where the world lives (None: the cache); others: base of relative paths
    format: str = "coco"  # which written format training reads: coco | csv | wds captions, or llava conversations
    lm_text: str = "captions"  # causal_lm: captions | world (captions with questions answered; data/lm_text.py)
    vqa_mix: bool = False  # vlm: add the training split's VQA questions as short-answer turns (LLaVA-1.5's mix)
    # the shapes world's generator settings (source: shapes)
    seed: int = 0
    train_size: int = 20000
    val_size: int = 500
    test_size: int = 1000
    image_size: int = 64
    # real data (source: coco | csv | wds): split -> annotation json / csv file / shard pattern, and COCO image folders
    files: dict[str, str] = field(default_factory=dict)
    images: dict[str, str] = field(default_factory=dict)
    max_pixels: int = 40_000_000
    num_workers: int = 2
    # pixel normalisation; None: CLIP's.  Data sets unlike photos want their own statistics
    # (the shapes world is ~95% plain background, which CLIP's would map to one large constant)
    image_mean: list[float] | None = None
    image_std: list[float] | None = None


@dataclass
class TrainConfig:
    max_steps: int = 1000
    batch_size: int = 128  # global batch per optimizer step, over all processes and accumulation steps
    grad_accum: int = 1
    lr: float = 5e-4
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0  # the cosine ends at lr * min_lr_ratio
    lr_scale: dict[str, float] = field(default_factory=dict)  # part -> factor on lr, e.g. {vision: 0.1}
    grad_clip: float = 1.0  # 0 disables clipping
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    save_every: int = 500
    keep_checkpoints: int = 2
    max_consecutive_failures: int = 50  # bad samples in a row before the run stops
    threads: int = 0  # torch intra-op threads; 0: torch's default
    compile: bool = False  # run the training step's model through torch.compile (pays off on GPUs)
    # vlm with a frozen vision tower: compute each training image's tower features once, before
    # the first step, instead of decoding and encoding it again every epoch
    cache_vision_features: bool = False
    # batches of samples of about the same length (LLaVA's group_by_modality_length): less padding
    group_by_length: bool = False
    # vlm: split each batch into this many parts of similar length, each padded to its own longest
    # (the same samples and loss as one part, less padding computed; one process only)
    padding_groups: int = 1


@dataclass
class EvalConfig:
    splits: list[str] = field(default_factory=lambda: ["test", "test_novel"])
    during_train: list[str] = field(default_factory=lambda: ["val"])
    templates: list[str] = field(default_factory=lambda: ["a {}", "a photo of a {}"])
    prompt_ensemble: str = "mean"  # mean (CLIP) | max: how templates combine in zero-shot classification
    batch_size: int = 256
    # generative models (vlm): VQA and captions are scored on what the model generates
    max_new_tokens: int = 32
    caption_prompt: str = "<image>\ndescribe the image."
    vqa_limit: int = 0  # score at most this many questions per split (0: all)
    few_shot: list[int] = field(default_factory=list)  # also VQA with k solved examples first (Frozen: [0, 1, 4])


@dataclass
class Recipe:
    name: str = ""
    family: str = "dual_encoder"
    model: Any = None  # the family's config dataclass
    tokenizer: str | None = None  # a tokenizer.json; None: the shapes world's own
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    init: str | None = None  # start from another run's weights (the whole model)
    # part (a top-level submodule, e.g. vision, lm) -> a run whose weights it starts from: that run's
    # tensors under "part." if it has any (a dual encoder's vision tower), else all of them (an LM run)
    init_parts: dict[str, str] = field(default_factory=dict)
    freeze: list[str] = field(default_factory=list)  # parts kept frozen (e.g. [vision, lm] for LLaVA stage 1)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting only where it is lossless (int -> float)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except GlimpseError:
                pass
        raise GlimpseError(f"recipe key {key}: expected {tp}, got {value!r}".replace("typing.", ""))
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise GlimpseError(f"recipe key {key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise GlimpseError(f"recipe key {key}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is Any or (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        return value
    raise GlimpseError(f"recipe key {key}: expected {_type_name(tp)}, got {value!r}")


def from_dict(cls, data: Any, prefix: str = ""):
    """Build dataclass `cls` from a mapping, refusing unknown keys."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise GlimpseError(f"recipe section {prefix or '(top)'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise GlimpseError(f"unknown recipe key {key}; valid keys{' in ' + prefix if prefix else ''}: {', '.join(names)}")
        kwargs[k] = _coerce(v, hints[k], key)
    return cls(**kwargs)


def recipe_from_dict(data: dict, name: str = "") -> Recipe:
    if not isinstance(data, dict):
        raise GlimpseError("a recipe must be a YAML mapping")
    data = dict(data)
    family = data.get("family", "dual_encoder")
    if family not in MODEL_CONFIGS:
        raise GlimpseError(f"unknown family {family!r}; known: {', '.join(MODEL_CONFIGS)}")
    model = from_dict(MODEL_CONFIGS[family], data.pop("model", None), "model")
    recipe = from_dict(Recipe, data)
    recipe.model = model
    recipe.name = recipe.name or name
    return recipe


def resolve_recipe_path(spec: str) -> Path:
    """A path to a YAML file, or the name of a shipped recipe (`shapes-clip`)."""
    p = Path(spec)
    if p.is_file():
        return p
    shipped = RECIPE_DIR / (spec if spec.endswith(".yaml") else spec + ".yaml")
    if shipped.is_file():
        return shipped
    known = ", ".join(sorted(q.stem for q in RECIPE_DIR.glob("*.yaml")))
    raise GlimpseError(f"no recipe {spec!r}: not a file, nor a shipped recipe ({known})")


def load_recipe(spec: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = resolve_recipe_path(str(spec))
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise GlimpseError(f"malformed recipe {path}{where}: {getattr(e, 'problem', e)}") from None
    recipe = recipe_from_dict(data or {}, path.stem)
    for item in overrides or []:
        apply_override(recipe, item)
    validate_recipe(recipe)
    return recipe


def apply_override(recipe: Recipe, item: str) -> None:
    """Apply one `a.b=value` (value in YAML syntax) with the same checks as the file."""
    if "=" not in item:
        raise GlimpseError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    parts = key.strip().split(".")
    obj = recipe
    for i, part in enumerate(parts):
        prefix = ".".join(parts[:i])
        if isinstance(obj, dict):  # a free mapping such as data.files: any key is allowed
            if i != len(parts) - 1:
                raise GlimpseError(f"recipe key {key}: {prefix} holds plain values")
            obj[part] = str(value)
            return
        names = [f.name for f in dataclasses.fields(obj)]
        if part not in names:
            raise GlimpseError(f"unknown recipe key {key}; valid keys{' in ' + prefix if prefix else ''}: {', '.join(names)}")
        if i == len(parts) - 1:
            hint = typing.get_type_hints(type(obj))[part]
            if hint is Any and dataclasses.is_dataclass(getattr(obj, part)):
                raise GlimpseError(f"recipe key {key} is a section; set one of its keys")
            setattr(obj, part, _coerce(value, hint, key))
        else:
            obj = getattr(obj, part)
            if not (dataclasses.is_dataclass(obj) or isinstance(obj, dict)):
                raise GlimpseError(f"recipe key {key}: {'.'.join(parts[: i + 1])} is a value, not a section")


def recipe_to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))


def _check(ok: bool, key: str, value, what: str) -> None:
    if not ok:
        raise GlimpseError(f"recipe key {key}: {value!r} {what}")


def _choice(key: str, value, options: tuple) -> None:
    _check(value in options, key, value, f"is not one of {', '.join(options)}")


def _validate_dual_encoder(m: DualEncoderConfig) -> None:
    _choice("model.loss", m.loss, ("clip", "siglip"))
    _choice("model.text.pool", m.text.pool, ("eos", "cls", "mean", "last"))
    _choice("model.text.norm", m.text.norm, ("pre", "post"))
    _validate_towers(m)
    _check(m.embed_dim >= 1, "model.embed_dim", m.embed_dim, "must be at least 1")


def _validate_towers(m) -> None:
    """The image and text towers of a dual or fusion encoder."""
    from glimpse.models.layers import ACTIVATIONS

    _choice("model.vision.pool", m.vision.pool, ("cls", "mean", "map"))
    _check(m.vision.pool != "cls" or m.vision.class_token, "model.vision.pool", "cls", "needs model.vision.class_token")
    for tower in ("vision", "text"):
        t = getattr(m, tower)
        _choice(f"model.{tower}.act", t.act, tuple(ACTIVATIONS))
        for k in ("width", "layers", "heads"):
            _check(getattr(t, k) >= 1, f"model.{tower}.{k}", getattr(t, k), "must be at least 1")
        _check(t.width % t.heads == 0, f"model.{tower}.width", t.width, f"is not divisible by {t.heads} heads")
    _check(m.vision.patch_size >= 1 and m.vision.image_size % m.vision.patch_size == 0, "model.vision.patch_size",
           m.vision.patch_size, f"must divide image_size {m.vision.image_size}")
    _check(m.text.context_length >= 3, "model.text.context_length", m.text.context_length, "must be at least 3")


def _validate_causal_lm(m: DecoderConfig) -> None:
    try:  # the vocabulary comes from the tokenizer later; everything else is checked now
        dataclasses.replace(m, vocab_size=m.vocab_size or 1).resolved()
    except ValueError as e:
        raise GlimpseError(f"recipe section model: {e}") from None
    _check(m.layers >= 1, "model.layers", m.layers, "must be at least 1")
    _check(m.context_length >= 3, "model.context_length", m.context_length, "must be at least 3")


def _validate_vlm(m: VLMConfig) -> None:
    from glimpse.data.chat import TEMPLATES

    _validate_causal_lm(m.lm)
    v = m.vision
    _check(v.patch_size >= 1 and v.image_size % v.patch_size == 0, "model.vision.patch_size", v.patch_size,
           f"must divide image_size {v.image_size}")
    _check(v.width % v.heads == 0, "model.vision.width", v.width, f"is not divisible by {v.heads} heads")
    _choice("model.connector", m.connector, ("linear", "mlp2x_gelu", "prefix"))
    _choice("model.prefix_source", m.prefix_source, ("pooled", "patches"))
    _choice("model.vision_feature_select", m.vision_feature_select, ("patch", "full"))
    _check(-v.layers <= m.vision_feature_layer < v.layers, "model.vision_feature_layer", m.vision_feature_layer,
           f"is not a layer of a {v.layers}-layer tower")
    _check(m.prefix_tokens >= 1 and m.pixel_shuffle >= 1, "model.prefix_tokens/pixel_shuffle",
           (m.prefix_tokens, m.pixel_shuffle), "must be at least 1")
    grid = v.image_size // max(v.patch_size, 1)
    _check(m.connector == "prefix" or grid % m.pixel_shuffle == 0, "model.pixel_shuffle", m.pixel_shuffle,
           f"must divide the {grid}x{grid} patch grid")
    for key in ("image_positions", "projector_norm"):  # parts of the projectors
        on = getattr(m, key)
        _check(not on or m.connector != "prefix", f"model.{key}", on,
               "is for the linear and mlp2x_gelu projectors (the prefix mapper makes its own tokens)")
    _check(m.chat_template in TEMPLATES or "{" in m.chat_template, "model.chat_template", m.chat_template,
           f"is neither a Jinja template nor one of {', '.join(TEMPLATES)}")


def _validate_fusion(m: FusionConfig) -> None:
    from glimpse.models.fusion import FUSIONS, OBJECTIVES

    _choice("model.fusion", m.fusion, FUSIONS)
    _choice("model.objective", m.objective, OBJECTIVES)
    _check(not m.text.causal, "model.text.causal", m.text.causal, "must be false: MLM and fusion read both sides")
    _validate_towers(m)
    for k in ("fusion_layers", "embed_dim", "rerank_k"):
        _check(getattr(m, k) >= 1, f"model.{k}", getattr(m, k), "must be at least 1")
    for k in ("mlm_weight", "itm_weight", "itc_weight", "max_answers"):
        _check(getattr(m, k) >= 0, f"model.{k}", getattr(m, k), "must not be negative")
    _check(0 < m.mlm_probability < 1, "model.mlm_probability", m.mlm_probability, "must be within (0, 1)")
    _check(0 < m.init_temperature <= 1, "model.init_temperature", m.init_temperature, "must be within (0, 1]")
    _check(0 <= m.momentum < 1, "model.momentum", m.momentum, "must be within [0, 1)")
    _check(0 <= m.distill_alpha <= 1, "model.distill_alpha", m.distill_alpha, "must be within [0, 1]")
    _check(m.objective == "vqa" or m.itc_weight + m.itm_weight + (m.mlm_weight if m.objective == "pretrain" else 0) > 0,
           "model.*_weight", (m.mlm_weight, m.itm_weight, m.itc_weight), "are all zero: nothing to learn")


MODEL_VALIDATORS = {"dual_encoder": _validate_dual_encoder, "causal_lm": _validate_causal_lm, "vlm": _validate_vlm,
                    "fusion": _validate_fusion}


def validate_recipe(r: Recipe) -> None:
    """Choices and ranges, checked before any work starts (types were checked on loading)."""
    MODEL_VALIDATORS[r.family](r.model)
    d, t, e = r.data, r.train, r.eval
    _choice("data.source", d.source, ("shapes", "coco", "csv", "wds"))
    _choice("data.format", d.format, ("coco", "csv", "wds", "llava"))
    _choice("data.lm_text", d.lm_text, ("captions", "world"))
    _check(d.format != "llava" or r.family == "vlm", "data.format", d.format, "is for vlm recipes")
    for k in ("train_size", "val_size", "test_size", "image_size", "max_pixels"):
        _check(getattr(d, k) >= 1, f"data.{k}", getattr(d, k), "must be at least 1")
    _check(d.num_workers >= 0, "data.num_workers", d.num_workers, "must not be negative")
    for k in ("image_mean", "image_std"):
        v = getattr(d, k)
        _check(v is None or len(v) == 3, f"data.{k}", v, "must hold 3 values (R, G, B)")
    _check(d.image_std is None or min(d.image_std) > 0, "data.image_std", d.image_std, "must be positive")
    _choice("train.precision", t.precision, ("fp32", "bf16"))
    for k in ("max_steps", "batch_size", "grad_accum", "log_every", "save_every", "keep_checkpoints", "padding_groups"):
        _check(getattr(t, k) >= 1, f"train.{k}", getattr(t, k), "must be at least 1")
    _check(t.padding_groups == 1 or r.family == "vlm", "train.padding_groups", t.padding_groups,
           "splits the batches of vlm runs only")
    for k in ("eval_every", "warmup_steps", "max_consecutive_failures", "threads"):
        _check(getattr(t, k) >= 0, f"train.{k}", getattr(t, k), "must not be negative")
    _check(t.lr > 0, "train.lr", t.lr, "must be positive")
    _check(all(isinstance(v, (int, float)) and v > 0 for v in t.lr_scale.values()), "train.lr_scale", t.lr_scale,
           "must map parts to positive factors")
    _check(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", t.min_lr_ratio, "must be within [0, 1]")
    _check(t.grad_clip >= 0 and t.weight_decay >= 0, "train.grad_clip/weight_decay", (t.grad_clip, t.weight_decay),
           "must not be negative")
    _check(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "train.betas", t.betas, "must be two values in [0, 1)")
    _check(t.batch_size % t.grad_accum == 0, "train.batch_size", t.batch_size,
           f"must be a multiple of train.grad_accum ({t.grad_accum})")
    _check(not t.cache_vision_features or (r.family == "vlm" and "vision" in r.freeze), "train.cache_vision_features",
           t.cache_vision_features, "needs a vlm recipe whose freeze list holds vision (a training tower changes them)")
    _choice("eval.prompt_ensemble", e.prompt_ensemble, ("mean", "max"))
    _check(e.batch_size >= 1, "eval.batch_size", e.batch_size, "must be at least 1")
    _check(e.max_new_tokens >= 1 and e.vqa_limit >= 0 and all(k >= 0 for k in e.few_shot),
           "eval.max_new_tokens/vqa_limit/few_shot", (e.max_new_tokens, e.vqa_limit, e.few_shot),
           "must be positive / not negative")
    _check(bool(e.templates) and all("{}" in x for x in e.templates), "eval.templates", e.templates,
           "must be a non-empty list of prompts with a {} for the class name")
