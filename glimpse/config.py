"""Recipes: YAML files mapped onto typed dataclasses, with `--set a.b=value` overrides.

A recipe's file name is its name.  Every key is checked: an unknown key is an error that
lists the valid ones, and a value of the wrong type is an error that names the key.  The
`model:` section is the family's own dataclass (glimpse.families), checked by the family.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from glimpse import families
from glimpse.errors import GlimpseError
from glimpse.schema import check, choice, coerce, from_dict

RECIPE_DIR = Path(__file__).parent / "configs"


@dataclass
class DataConfig:
    source: str = "shapes"  # shapes | shapes-video | shapes-shop (generated on first use, cached) |
    # coco | csv | wds | msrvtt | recbole | mmrec | amazon
    root: str | None = None  # shapes: where the world lives (None: the cache); others: base of relative paths
    format: str = "coco"  # which written format training reads: coco | csv | wds captions, or llava conversations
    lm_text: str = "captions"  # language-model text: captions | world (captions with questions answered) |
    # world_binding (and text binding episodes in binding_share of the documents; data/lm_text.py)
    binding_share: float = 0.3
    vqa_mix: bool = False  # conversations: add the training split's VQA questions as short-answer turns (LLaVA-1.5's mix)
    # the shapes world's generator settings (source: shapes)
    seed: int = 0
    train_size: int = 20000
    val_size: int = 500
    test_size: int = 1000
    image_size: int = 64
    frames: int = 8  # the moving-shapes world's clip length (source: shapes-video), 8 to 16
    users: int = 5000  # the shapes shop's buyers and items (source: shapes-shop)
    items: int = 2000
    # real data (source: coco | csv | wds): split -> annotation json / csv file / shard pattern, and COCO image folders
    files: dict[str, str] = field(default_factory=dict)
    images: dict[str, str] = field(default_factory=dict)
    max_pixels: int = 40_000_000
    num_workers: int = 2
    # pixel normalisation; None: CLIP's.  Data sets unlike photos want their own statistics
    # (the shapes world is ~95% plain background, which CLIP's would map to one large constant)
    image_mean: list[float] | None = None
    image_std: list[float] | None = None
    # source wds: read the shards as a stream (split by process and loader worker, shuffled through a
    # buffer, its position saved in checkpoints) instead of indexing them into memory first
    stream: bool = False
    shuffle_buffer: int = 1000  # samples held for shuffling a stream (0: in shard order)


@dataclass
class LoraConfig:
    """Low-rank adapters (Hu et al. 2021) on linear layers: W x + (alpha / r) B A dropout(x), A, B trained,
    W frozen.  Saved in PEFT's format beside the run's weights."""

    r: int = 0  # the rank; 0: no LoRA
    alpha: float = 16.0
    dropout: float = 0.0
    # which linear layers: names or name suffixes under the model (q_proj, lm.layers.0.attn.q_proj, ...)
    targets: list[str] = field(default_factory=list)


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
    # on CPU (Linux, glibc): malloc keeps freed blocks for reuse, so a step's large tensors are not fresh
    # pages every step (glimpse.hardware.keep_freed_cpu_memory; the benchmark's fp32 step 1.2x faster)
    keep_freed_memory: bool = True
    # run the training step's model through torch.compile: pays off on GPUs, and on CPU for long runs
    # (bench/train_throughput.py: 0.87 of the matmul rate compiled, 0.74 eager; compiling takes minutes)
    compile: bool = False
    # a frozen vision tower: compute each training image's tower features once, before the first
    # step, instead of decoding and encoding it again every epoch (families that implement it)
    cache_vision_features: bool = False
    # batches of samples of about the same length (LLaVA's group_by_modality_length): less padding
    group_by_length: bool = False
    # split each batch into this many parts of similar length, each padded to its own longest (the
    # same samples and loss as one part, less padding computed; one process; families that implement it)
    padding_groups: int = 1
    # several processes (torchrun): ddp replicates the model; fsdp shards parameters, gradients and optimizer
    # state block by block (torch FSDP2), with sharded checkpoints (torch.distributed.checkpoint)
    parallel: str = "ddp"
    activation_checkpointing: bool = False  # recompute each block's activations in backward (less memory)
    log_to: list[str] = field(default_factory=list)  # beside metrics.jsonl (always written): tensorboard
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class EvalConfig:
    splits: list[str] = field(default_factory=lambda: ["test", "test_novel"])
    during_train: list[str] = field(default_factory=lambda: ["val"])
    templates: list[str] = field(default_factory=lambda: ["a {}", "a photo of a {}"])
    prompt_ensemble: str = "mean"  # mean (CLIP) | max: how templates combine in zero-shot classification
    batch_size: int = 256
    # generative models: VQA and captions are scored on what the model generates
    max_new_tokens: int = 32
    caption_prompt: str = "<image>\ndescribe the image."
    vqa_limit: int = 0  # score at most this many questions per split (0: all)
    few_shot: list[int] = field(default_factory=list)  # also VQA with k solved examples first (Frozen: [0, 1, 4])


@dataclass
class Recipe:
    name: str = ""
    family: str = ""  # a registered family (glimpse.families): it gives the model section's dataclass
    model: Any = None  # the family's config dataclass
    tokenizer: str | None = None  # a tokenizer.json; None: the shapes world's own
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    init: str | None = None  # start from another run's weights (the whole model)
    # part (a top-level submodule, e.g. vision, lm) -> a run whose weights it starts from: that run's
    # tensors under "part." if it has any (a dual encoder's vision tower), else all of them (an LM run);
    # RUN#name takes that run's part `name` instead (a dual encoder's vision tower as the second_vision; in a
    # YAML file write no space before the '#', or YAML reads the rest as a comment)
    init_parts: dict[str, str] = field(default_factory=dict)
    freeze: list[str] = field(default_factory=list)  # parts kept frozen (e.g. [vision, lm] for LLaVA stage 1)


def recipe_from_dict(data: dict, name: str = "") -> Recipe:
    if not isinstance(data, dict):
        raise GlimpseError("a recipe must be a YAML mapping")
    data = dict(data)
    if not data.get("family"):
        raise GlimpseError(f"a recipe must name its family: family: one of {', '.join(families.names())}")
    family = families.get(data["family"])
    model = from_dict(family.config, data.pop("model", None), "model")
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
    except RecursionError:
        raise GlimpseError(f"malformed recipe {path}: nested too deeply") from None
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
            setattr(obj, part, coerce(value, hint, key))
        else:
            obj = getattr(obj, part)
            if not (dataclasses.is_dataclass(obj) or isinstance(obj, dict)):
                raise GlimpseError(f"recipe key {key}: {'.'.join(parts[: i + 1])} is a value, not a section")


def recipe_to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))


def validate_recipe(r: Recipe) -> None:
    """Choices and ranges, checked before any work starts (types were checked on loading): the family's
    own (its `model:` section), then the sections every family shares."""
    family = families.get(r.family)
    family.validate(r)
    d, t, e = r.data, r.train, r.eval
    choice("data.source", d.source, ("shapes", "shapes-video", "shapes-shop", "coco", "csv", "wds", "msrvtt", "recbole",
                                     "mmrec", "amazon"))
    choice("data.format", d.format, tuple(dict.fromkeys(x for f in families.all_families() for x in f.data_formats)))
    choice("data.lm_text", d.lm_text, ("captions", "world", "world_binding"))
    check(0.0 <= d.binding_share <= 1.0, "data.binding_share", d.binding_share, "must be between 0 and 1")
    check(d.format in family.data_formats, "data.format", d.format,
          f"is not a format the {r.family} family trains on ({', '.join(family.data_formats)})")
    check(8 <= d.frames <= 16, "data.frames", d.frames, "must be from 8 to 16")
    check(d.users >= 10 and d.items >= 250, "data.users/items", (d.users, d.items),
          "must be at least 10 users and 250 items")
    for k in ("train_size", "val_size", "test_size", "image_size", "max_pixels"):
        check(getattr(d, k) >= 1, f"data.{k}", getattr(d, k), "must be at least 1")
    check(d.num_workers >= 0, "data.num_workers", d.num_workers, "must not be negative")
    for k in ("image_mean", "image_std"):
        v = getattr(d, k)
        check(v is None or len(v) == 3, f"data.{k}", v, "must hold 3 values (R, G, B)")
    check(d.image_std is None or min(d.image_std) > 0, "data.image_std", d.image_std, "must be positive")
    choice("train.precision", t.precision, ("fp32", "bf16"))
    choice("train.parallel", t.parallel, ("ddp", "fsdp"))
    for sink in t.log_to:
        choice("train.log_to", sink, ("tensorboard",))
    check(t.lora.r >= 0 and t.lora.alpha > 0 and 0 <= t.lora.dropout < 1, "train.lora", t.lora,
          "needs r >= 0, alpha > 0 and dropout in [0, 1)")
    check(t.lora.r == 0 or bool(t.lora.targets), "train.lora.targets", t.lora.targets,
          "must name the linear layers to adapt (e.g. [q_proj, v_proj])")
    check(d.shuffle_buffer >= 0, "data.shuffle_buffer", d.shuffle_buffer, "must not be negative")
    check(not d.stream or d.source == "wds", "data.stream", d.stream, "streams WebDataset shards (data.source: wds)")
    check(not d.stream or family.streams, "data.stream", d.stream, f"is for the families that read a stream "
          f"({', '.join(f.name for f in families.all_families() if f.streams)}), not {r.family}")
    for k in ("max_steps", "batch_size", "grad_accum", "log_every", "save_every", "keep_checkpoints", "padding_groups"):
        check(getattr(t, k) >= 1, f"train.{k}", getattr(t, k), "must be at least 1")
    for option, off in (("padding_groups", t.padding_groups == 1), ("cache_vision_features", not t.cache_vision_features)):
        able = [f.name for f in families.all_families() if option in f.train_options]
        check(off or option in family.train_options, f"train.{option}", getattr(t, option),
              f"is for the families that implement it ({', '.join(able) or 'none'}), not {r.family}")
    for k in ("eval_every", "warmup_steps", "max_consecutive_failures", "threads"):
        check(getattr(t, k) >= 0, f"train.{k}", getattr(t, k), "must not be negative")
    check(t.lr > 0, "train.lr", t.lr, "must be positive")
    check(all(isinstance(v, (int, float)) and v > 0 for v in t.lr_scale.values()), "train.lr_scale", t.lr_scale,
          "must map parts to positive factors")
    check(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", t.min_lr_ratio, "must be within [0, 1]")
    check(t.grad_clip >= 0 and t.weight_decay >= 0, "train.grad_clip/weight_decay", (t.grad_clip, t.weight_decay),
          "must not be negative")
    check(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "train.betas", t.betas, "must be two values in [0, 1)")
    check(t.batch_size % t.grad_accum == 0, "train.batch_size", t.batch_size,
          f"must be a multiple of train.grad_accum ({t.grad_accum})")
    choice("eval.prompt_ensemble", e.prompt_ensemble, ("mean", "max"))
    check(e.batch_size >= 1, "eval.batch_size", e.batch_size, "must be at least 1")
    check(e.max_new_tokens >= 1 and e.vqa_limit >= 0 and all(k >= 0 for k in e.few_shot),
          "eval.max_new_tokens/vqa_limit/few_shot", (e.max_new_tokens, e.vqa_limit, e.few_shot),
          "must be positive / not negative")
    check(bool(e.templates) and all("{}" in x for x in e.templates), "eval.templates", e.templates,
          "must be a non-empty list of prompts with a {} for the class name")
