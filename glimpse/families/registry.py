"""The family registry: families by name, and Hugging Face folders by the family that reads their
`model_type` (diffusers' folders: their `_class_name`).  Loading a folder (a whole model, or one part
for a recipe's `init_parts`) goes through here, so the loader, the trainer and the CLI hold no list
of families."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from glimpse import runs
from glimpse.errors import GlimpseError
from glimpse.families.base import Family, HFBuild, Loaded
from glimpse.hub import folder as hf_folder
from glimpse.hub.mapping import from_hf
from glimpse.hub.parts import load_strict, materialize, same_config
from glimpse.schema import torch_dtype

_FAMILIES: dict[str, type[Family]] = {}


def register(cls: type[Family]) -> type[Family]:
    """Class decorator: make `cls` the family named `cls.name` (a later registration replaces it)."""
    _FAMILIES[cls.name] = cls
    return cls


def get(name: str) -> type[Family]:
    if name not in _FAMILIES:
        raise GlimpseError(f"unknown family {name!r}; known: {', '.join(_FAMILIES)}")
    return _FAMILIES[name]


def names() -> list[str]:
    return list(_FAMILIES)


def all_families() -> list[type[Family]]:
    return list(_FAMILIES.values())


# -- Hugging Face folders -----------------------------------------------------------------------------

def hf_family(folder: Path, config: dict) -> type[Family]:
    mt = config.get("model_type", "")
    # a diffusers folder has no model_type: its config.json names the class (a family's `hf_class_names`)
    cls_name = "" if mt else config.get("_class_name", "")
    for fam in _FAMILIES.values():
        if mt in fam.hf_model_types or (cls_name and cls_name in fam.hf_class_names):
            return fam
    if cls_name:
        known = ", ".join(c for fam in _FAMILIES.values() for c in fam.hf_class_names)
        raise GlimpseError(f"{folder}: _class_name {cls_name!r} is not one glimpse loads ({known})")
    known = ", ".join(t for fam in _FAMILIES.values() for t in fam.hf_model_types)
    raise GlimpseError(f"{folder}: model_type {mt!r} is not one glimpse loads ({known})")


@contextlib.contextmanager
def _reading(folder: Path):
    """A folder's config that lacks a key, or holds a value no model can be built from, is one line naming it."""
    try:
        yield
    except KeyError as e:
        raise GlimpseError(f"{folder}: config.json has no {e.args[0]!r}") from None
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise GlimpseError(f"{folder}: config.json describes no model glimpse can build ({e})") from None


def _config(folder: Path) -> dict:
    config = hf_folder.read_json(folder / "config.json")
    hf_folder.check_sizes(config, str(folder))
    return config


def _build(fam: type[Family], folder: Path, config: dict) -> HFBuild:
    """The family's build of a folder, checked before any memory is spent on it: the model is built on the
    meta device and its tensors' shapes are checked against the files' headers (a config that asks for a
    model larger than its checkpoint is refused, naming the first tensor that differs); then the tensors
    are read and the model gets real storage, without random initialisation."""
    where = str(folder)
    with _reading(folder):
        with torch.device("meta"), hf_folder.shapes_only():
            shapes = fam.hf_build(folder, config)
        from_hf(shapes.tensors, shapes.rules, shapes.model.state_dict(), where, shapes.unused)
        with torch.device("meta"):
            built = fam.hf_build(folder, config)
    return built


def load_hf(folder: str | Path, dtype=None, device: str = "cpu") -> Loaded:
    """The glimpse module of a Hugging Face folder with its weights, strictly mapped, cast to `dtype`
    (default float32, whatever the checkpoint's own dtype), with its tokenizer and preprocessing."""
    folder = hf_folder.resolve(folder)
    config = _config(folder)
    fam = hf_family(folder, config)
    built = _build(fam, folder, config)
    model = materialize(built.model, torch_dtype(dtype))
    load_strict(model, built.tensors, built.rules, built.unused, str(folder))
    model.to(device).eval()
    tokenizer, transform = fam.hf_inputs(folder, model, hf_folder.tokenizer(folder))
    return Loaded(fam.name, model, config, folder, tokenizer, transform)


def hf_pipeline(folder: str | Path, dtype=None, device: str = "cpu"):
    """What `glimpse.load(folder)` returns: the family's pipeline around the loaded module."""
    loaded = load_hf(folder, dtype, device)
    return get(loaded.family).hf_pipeline(loaded)


def init_from_hf(model: nn.Module, folder: str | Path) -> None:
    """A recipe's `init:` naming a Hugging Face folder: the whole glimpse model (which must have the
    folder's architecture) from it, strictly."""
    folder = hf_folder.resolve(folder)
    config = _config(folder)
    built = _build(hf_family(folder, config), folder, config)  # on the meta device: costs no memory
    if type(built.model) is not type(model):
        raise GlimpseError(f"{folder} holds a {type(built.model).__name__}, the recipe builds a {type(model).__name__}")
    same_config(built.model.cfg, model.cfg, str(folder), "model")
    load_strict(model, built.tensors, built.rules, built.unused, f"{folder} (init)")


def init_part_from_hf(model: nn.Module, part: str, folder: str | Path) -> None:
    """Fill the top-level part `part` (vision, text, lm) of a glimpse model from a Hugging Face folder,
    strictly, cast to the part's dtype."""
    folder = hf_folder.resolve(folder)
    target = runs.model_part(model, part, "init_parts: ")
    config = _config(folder)
    with _reading(folder):
        rules, tensors, unused = hf_family(folder, config).hf_part(folder, config, target)
    load_strict(target, tensors, rules, unused, f"{folder} (for {part})")
