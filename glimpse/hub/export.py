"""Writing a Hugging Face model folder (`glimpse convert RUN DST --to hf`).

A family says what its folder holds (`Family.to_hf` -> `HFFolder`: the config, the rules that map
its weights, the tokenizer and its special tokens, the chat template, image preprocessing, extra
processor files); this module writes it: config.json, model.safetensors (the weights through the
same rules as loading, run backwards), tokenizer.json, tokenizer_config.json (with the chat
template), chat_template.jinja, special_tokens_map.json, generation_config.json and
preprocessor_config.json, into a temporary folder that is renamed into place when complete.

Where glimpse's parts compute something no Hugging Face class does, the family's `to_hf` stops
with an error naming the setting: a folder that would compute something else is never written.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from glimpse.data.images import ImageTransform
from glimpse.errors import GlimpseError
from glimpse.hub.mapping import to_hf
from glimpse.schema import torch_dtype

RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
EXPORT_DTYPES = ("fp32", "bf16", "fp16")


@dataclass
class HFFolder:
    config: dict  # config.json, token ids included
    state_dict: dict[str, torch.Tensor]  # glimpse's tensors
    rules: list  # glimpse.hub.mapping rules from them to the folder's names
    tokenizer_json: dict
    specials: dict[str, str]  # special_tokens_map.json: {"bos_token": "<bos>", ...}
    model_max_length: int
    tokenizer_config: dict = field(default_factory=dict)  # extra tokenizer_config.json keys
    chat_template: str | None = None
    generation_config: dict | None = None
    transform: ImageTransform | None = None  # -> preprocessor_config.json
    files: dict[str, dict] = field(default_factory=dict)  # more JSON files by name (processor_config.json)
    # (tensor-name prefix, module-path prefix): where the module a tensor belongs to sits in the transformers
    # class when the files keep other names (LLaVA's); PEFT adapters name modules (glimpse.hub.peft)
    module_prefixes: tuple[tuple[str, str], ...] = ()


def token_names(tokenizer) -> dict[str, str | None]:
    """The token text of each special role the tokenizer has (bos, eos, pad, image, ...)."""
    return {role: (tokenizer.hf.id_to_token(i) if i is not None else None) for role, i in tokenizer.ids.items()}


def special_tokens(tokenizer, roles=("bos", "eos", "pad")) -> dict[str, str]:
    """special_tokens_map.json's entries for `roles`: {"bos_token": "<bos>", ...} (roles it lacks left out)."""
    names = token_names(tokenizer)
    return {f"{k}_token": names[k] for k in roles if names.get(k)}


def token_ids(tokenizer) -> dict[str, int | None]:
    """bos_token_id, eos_token_id and pad_token_id, as config.json and generation_config.json name them."""
    return {f"{key}_token_id": tokenizer.ids[key] for key in ("bos", "eos", "pad")}


def preprocessor_config(transform: ImageTransform) -> dict:
    d = transform.to_dict()
    s = d["image_size"]
    size = {"shortest_edge": s} if d["resize"] == "shortest" else {"height": s, "width": s}
    return {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": size,
            "do_center_crop": d["resize"] == "shortest", "crop_size": {"height": s, "width": s},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": list(d["mean"]), "image_std": list(d["std"]), "resample": RESAMPLE[d["interpolation"]],
            "do_convert_rgb": True}


def check_destination(dst: str | Path, dtype: str) -> Path:
    """Refuse before any work: an unknown dtype, or a folder that holds something."""
    if dtype not in EXPORT_DTYPES:
        raise GlimpseError(f"export dtype {dtype!r} must be one of {', '.join(EXPORT_DTYPES)}")
    dst = Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise GlimpseError(f"{dst} exists and is not empty")
    return dst


def write_folder(folder: HFFolder, dst: str | Path, dtype: str = "fp32", extra=None) -> Path:
    """`folder` is an HFFolder (a transformers folder), or any object with `write(tmp, dtype)` that writes
    its own files (a diffusers folder: no tokenizer); either way into a temporary folder renamed when complete.
    `extra(tmp, dtype)` writes more into it first (a LoRA run's PEFT adapter, `adapter/`)."""
    dst = check_destination(dst, dtype)
    cast = torch_dtype(dtype)
    if not isinstance(folder, HFFolder):
        def fill(tmp: Path) -> None:
            folder.write(tmp, cast)
            if extra is not None:
                extra(tmp, cast)

        return _atomically(dst, fill)
    tensors = {k: v.to(cast) for k, v in to_hf(folder.state_dict, folder.rules).items()}
    config = {**folder.config, "dtype": str(cast).removeprefix("torch.")}  # float32, bfloat16, float16
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": folder.model_max_length,
                        **folder.specials, "add_bos_token": False, "add_eos_token": False,
                        "clean_up_tokenization_spaces": False, **folder.tokenizer_config}
    files = {"config.json": config, "tokenizer_config.json": tokenizer_config,
             "special_tokens_map.json": folder.specials, **folder.files}
    if folder.chat_template:
        tokenizer_config["chat_template"] = folder.chat_template
    if folder.generation_config is not None:
        files["generation_config.json"] = folder.generation_config
    if folder.transform is not None:
        files["preprocessor_config.json"] = preprocessor_config(folder.transform)

    tmp = dst.with_name(f".tmp-{dst.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "tokenizer.json").write_text(json.dumps(folder.tokenizer_json, ensure_ascii=False))
    if folder.chat_template:
        (tmp / "chat_template.jinja").write_text(folder.chat_template)
    for name, content in files.items():
        (tmp / name).write_text(json.dumps(content, indent=2))
    if extra is not None:
        extra(tmp, cast)
    if dst.exists():
        dst.rmdir()
    tmp.rename(dst)
    return dst


def _atomically(dst: Path, fill) -> Path:
    """`fill(tmp)` writes the folder's files into a temporary folder beside `dst`, renamed into place after."""
    tmp = dst.with_name(f".tmp-{dst.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    fill(tmp)
    if dst.exists():
        dst.rmdir()
    tmp.rename(dst)
    return dst
