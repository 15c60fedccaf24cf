"""Loading the weights of one of glimpse's parts (a vision tower, a text tower, a causal decoder) from
a Hugging Face state dict, strictly, and checking that a recipe's part has a checkpoint's shape."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from glimpse.errors import GlimpseError
from glimpse.hub.mapping import from_hf

BERT_UNUSED = (r"pooler\..*", r"cls\..*", r"embeddings\.position_ids")
TOWER_UNUSED = (r".*embeddings\.position_ids",)  # a buffer older files saved


def strip(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}


def prefix_of(sd: dict, prefix: str) -> str:
    """Single-tower files name their tensors `vision_model.*` / `text_model.*`, or (CLIPVisionModel,
    SiglipTextModel... saved by transformers 5) without the prefix."""
    return prefix if any(k.startswith(prefix) for k in sd) else ""


def load_strict(model: nn.Module, hf: dict, rules: list, unused: tuple, where: str) -> None:
    """Fill every tensor of `model` from the Hugging Face tensors `hf` through `rules` (glimpse.hub.mapping):
    a tensor no rule fills, a Hugging Face tensor no rule takes (and not `unused`), or a shape that
    differs is an error naming it.  Tied tensors are filled through their alias."""
    expected = model.state_dict()
    tensors = from_hf(hf, rules, expected, where, unused)
    missing = [k for k in expected if k not in tensors
               and not any(v.data_ptr() == expected[k].data_ptr() for a, v in expected.items() if a in tensors)]
    if missing:
        raise GlimpseError(f"{where}: nothing in the checkpoint fills glimpse tensor {missing[0]}")
    model.load_state_dict(tensors, strict=False)


def materialize(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A model built on the meta device, given real (uninitialised) storage on the CPU, its tied parameters
    tied again, cast to `dtype`: ready to be filled by load_strict, with no random init spent on it."""
    shared: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                shared.setdefault(id(p), []).append((module, name))
    model.to_empty(device="cpu")
    for places in shared.values():  # to_empty gives every registration its own tensor: tie them again
        first = getattr(places[0][0], places[0][1])
        for module, name in places[1:]:
            setattr(module, name, first)
    return model.to(dtype) if dtype is not None else model


# settings that say how a model is used, not what it computes from its weights
NOT_ARCHITECTURE = ("chat_template",)


def same_config(theirs, ours, where: str, part: str) -> None:
    """The recipe's part (or whole model) must have the checkpoint's architecture: name the first setting
    that differs, nested sections included (model.vision.width)."""
    for f in dataclasses.fields(ours):
        a, b = getattr(theirs, f.name), getattr(ours, f.name)
        if dataclasses.is_dataclass(b):
            same_config(a, b, where, f"{part}.{f.name}")
            continue
        if f.name in NOT_ARCHITECTURE:
            continue
        if f.name == "mlp_ratio":
            a, b = int(theirs.width * a), int(ours.width * b)
        elif f.name == "vocab_size" and not b:
            continue
        elif f.name == "context_length" and getattr(ours, "arch", None) == "llama":
            continue  # RoPE: a recipe may use a shorter context
        if a != b:
            raise GlimpseError(f"{where}: the recipe's {part}.{f.name} is {b!r}, the checkpoint's is {a!r}")
