"""diffusers `VQModel` folders <-> glimpse's VQ-VAE (glimpse/models/vq.py), in and out.

A diffusers folder is config.json (`"_class_name": "VQModel"`, no `model_type`) and
diffusion_pytorch_model.safetensors.  glimpse's VQModel has diffusers' module and tensor names, so every
rule is the identity (`encoder.down_blocks.{i}.resnets.{j}.conv1.weight` both sides); the rules still
go through glimpse.hub.mapping, so loading is strict (a tensor missing or extra is an error naming it)
and shapes are checked against the config before any memory is spent.  A run's training buffers
(`idle_steps`, `initialised`, `restarts`) are not part of the model and stay out of an exported folder.

What glimpse computes is the VQGAN layout: GroupNorm + SiLU, DownEncoderBlock2D / UpDecoderBlock2D,
as many up blocks as down blocks.  A folder asking for anything else (MoVQ's `norm_type: "spatial"`,
another activation, other block types) is refused, naming the setting.  `scaling_factor`,
`force_upcast` and `lookup_from_codebook` change nothing glimpse computes (codes and their decoding);
an exported folder sets `lookup_from_codebook` so that diffusers' `decode(codes, force_not_quantize=True,
shape=...)` looks the codes up, and keeps diffusers' default `scaling_factor` (latent diffusion's
figure; a VQ tokenizer's codes do not use it).  Pixels are in [-1, 1] at `sample_size` (no
preprocessor_config.json: diffusers' autoencoders take that range by convention).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from glimpse.errors import GlimpseError
from glimpse.families.base import HFBuild
from glimpse.hub import folder as hf
from glimpse.hub.mapping import rule, to_hf
from glimpse.models.vq import VQConfig, VQModel

CLASS_NAMES = ("VQModel",)
WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_VERSION = "0.42.1"  # the diffusers the exported format was checked against (tests/test_vq.py)
DOWN, UP = "DownEncoderBlock2D", "UpDecoderBlock2D"
SCALING_FACTOR = 0.18215  # diffusers' default
# diffusers' VQModel defaults, for keys a config.json leaves out (diffusers fills them the same way)
DEFAULTS = {"in_channels": 3, "out_channels": 3, "down_block_types": [DOWN], "up_block_types": [UP],
            "block_out_channels": [64], "layers_per_block": 1, "act_fn": "silu", "latent_channels": 3,
            "sample_size": 32, "num_vq_embeddings": 256, "norm_num_groups": 32, "vq_embed_dim": None,
            "norm_type": "group", "mid_block_add_attention": True}


def _count(c: dict, key: str, where: str) -> int:
    v = c[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise GlimpseError(f"{where}: config.json's {key} is {v!r}, not a whole number of at least 1")
    return v


def vq_config(config: dict, where: str) -> VQConfig:
    """glimpse's VQConfig of a diffusers VQModel config.json, or a one-line error naming what glimpse
    does not compute."""
    c = {**DEFAULTS, **config}
    if c["norm_type"] != "group":
        raise GlimpseError(f"{where}: norm_type {c['norm_type']!r} is not one glimpse computes (only 'group')")
    if c["act_fn"] != "silu":
        raise GlimpseError(f"{where}: act_fn {c['act_fn']!r} is not one glimpse computes (only 'silu')")
    channels = c["block_out_channels"]
    if not isinstance(channels, list | tuple) or not channels or any(
            isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in channels):
        raise GlimpseError(f"{where}: config.json's block_out_channels is {channels!r}, not a list of widths")
    for key, block in (("down_block_types", DOWN), ("up_block_types", UP)):
        types = c[key]
        if not isinstance(types, list | tuple):
            raise GlimpseError(f"{where}: config.json's {key} is {types!r}, not a list")
        other = next((t for t in types if t != block), None)
        if other is not None:
            raise GlimpseError(f"{where}: {key} holds {other!r}; glimpse computes only {block}")
    n_down, n_up = len(c["down_block_types"]), len(c["up_block_types"])
    if not n_down == n_up == len(channels):
        raise GlimpseError(f"{where}: {n_down} down blocks, {n_up} up blocks and {len(channels)} "
                           "block_out_channels; glimpse computes as many of each")
    counts = {k: _count(c, k, where) for k in ("in_channels", "out_channels", "layers_per_block", "latent_channels",
                                               "sample_size", "num_vq_embeddings", "norm_num_groups")}
    embed = c["vq_embed_dim"]
    if embed is not None:
        embed = _count(c, "vq_embed_dim", where)
    if not isinstance(c["mid_block_add_attention"], bool):
        raise GlimpseError(f"{where}: config.json's mid_block_add_attention is {c['mid_block_add_attention']!r}, "
                           "not true or false")
    bad = next((w for w in channels if w % counts["norm_num_groups"]), None)
    if bad is not None:
        raise GlimpseError(f"{where}: block width {bad} is not divisible by norm_num_groups {counts['norm_num_groups']}")
    return VQConfig(block_out_channels=list(channels), vq_embed_dim=embed or 0,
                    mid_block_add_attention=c["mid_block_add_attention"], **counts)


def rules(model: VQModel) -> list:
    """The identity rules of every tensor of the model (the names are diffusers')."""
    return [rule(k, k) for k in model.state_dict()]


def build(folder: Path, config: dict) -> HFBuild:
    model = VQModel(vq_config(config, str(folder)))
    return HFBuild(model, rules(model), hf.read_safetensors(folder))


def part(folder: Path, config: dict, target) -> tuple[list, dict, tuple]:
    """(rules, tensors, unused) that fill a VQModel part of another model (text_to_image's `vq`) from a
    diffusers folder, whose settings must be the part's."""
    if not isinstance(target, VQModel):
        raise GlimpseError(f"{folder} holds a VQModel, not a {type(target).__name__}")
    got = vq_config(config, str(folder))
    if got != target.cfg:
        raise GlimpseError(f"{folder}: its VQModel settings differ from the recipe's model.vq ({got} vs {target.cfg})")
    return rules(target), hf.read_safetensors(folder), ()


def diffusers_config(cfg: VQConfig) -> dict:
    """A diffusers VQModel config.json: every key of VQModel's __init__."""
    n = len(cfg.block_out_channels)
    return {"_class_name": CLASS_NAMES[0], "_diffusers_version": DIFFUSERS_VERSION,
            "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
            "down_block_types": [DOWN] * n, "up_block_types": [UP] * n,
            "block_out_channels": list(cfg.block_out_channels), "layers_per_block": cfg.layers_per_block,
            "act_fn": "silu", "latent_channels": cfg.latent_channels, "sample_size": cfg.sample_size,
            "num_vq_embeddings": cfg.num_vq_embeddings, "norm_num_groups": cfg.norm_num_groups,
            "vq_embed_dim": cfg.embed_dim, "scaling_factor": SCALING_FACTOR, "norm_type": "group",
            "mid_block_add_attention": cfg.mid_block_add_attention, "lookup_from_codebook": True,
            "force_upcast": False}


@dataclass
class DiffusersFolder:
    """What `glimpse convert` writes for a VQ-VAE: config.json and the weights, no tokenizer files
    (glimpse.hub.export.write_folder calls `write` on a temporary folder, renamed when complete)."""
    config: dict
    state_dict: dict[str, torch.Tensor]
    rules: list

    def write(self, tmp: Path, dtype: torch.dtype) -> None:
        tensors = {k: v.to(dtype) for k, v in to_hf(self.state_dict, self.rules).items()}
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(self.config, indent=2))


def to_hf_folder(vq: VQModel) -> DiffusersFolder:
    """The diffusers VQModel folder of glimpse's VQ-VAE (the run's `.vq`; training buffers left out)."""
    if vq.cfg.codebook_groups > 1:
        raise GlimpseError(f"a tokenizer with codebook_groups {vq.cfg.codebook_groups} (product quantisation) has "
                           "no diffusers VQModel form: diffusers quantises each position with one codebook")
    return DiffusersFolder(diffusers_config(vq.cfg), dict(vq.state_dict()), rules(vq))
