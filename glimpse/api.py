"""`glimpse.load`: a trained run (or one of its checkpoints), or a local Hugging Face model folder, as a
ready-to-use pipeline; `export`: a run as a Hugging Face model folder (`glimpse convert`)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from glimpse import families, runs
from glimpse.config import apply_override, recipe_from_dict, validate_recipe
from glimpse.data.images import ImageTransform
from glimpse.data.tokenizer import Tokenizer
from glimpse.errors import GlimpseError
from glimpse.hardware import warn_if_slow_dtype
from glimpse.hub import is_hf_folder, resolve
from glimpse.hub.export import check_destination, write_folder
from glimpse.hub.peft import peft_adapter
from glimpse.models import lora
from glimpse.schema import torch_dtype

ADAPTER_DIR = runs.ADAPTER  # DST/adapter: a LoRA run's PEFT adapter beside its exported base model


def load(path: str | Path, device: str = "cpu", dtype=None):
    """Load a glimpse run, or a local Hugging Face model folder (config.json + safetensors); returns the
    family's pipeline: a dual encoder's embed_images, embed_texts, classify; a language model's
    generate, perplexity; a vision-language model's caption, ask, chat.  `dtype` ("fp32", "bf16",
    "fp16" or a torch dtype) casts the weights; a folder loads as float32 by default, whatever
    its own dtype."""
    warn_if_slow_dtype(torch_dtype(dtype), device, 'glimpse.load(..., dtype="fp32")')
    if is_hf_folder(path):
        return families.hf_pipeline(resolve(path), dtype, device)
    family, model = load_run(path, device=device, dtype=dtype)
    return family.pipeline(model)


def load_run(path: str | Path, overrides: list[str] | None = None, device: str = "cpu", dtype=None,
             merge_lora: bool = True):
    """(the run's family, the model in eval mode) of a run; `overrides` change its recipe (`eval.*`
    settings, say) as `--set` does.  The family's `root` is the run folder: evaluation points it at the
    recipe's data (glimpse.train.trainer.data_root, as `glimpse eval` does).  A LoRA run's weights hold the
    base model and the adapters (`train.lora`): they are merged into plain linear layers, or with
    `merge_lora=False` kept as LoRA layers (glimpse.models.lora)."""
    run = runs.run_dir(path)
    try:
        recipe = recipe_from_dict(yaml.safe_load((run / runs.RECIPE).read_text()))
    except FileNotFoundError:
        raise GlimpseError(f"{run} is not a glimpse run: missing {runs.RECIPE}") from None
    except (yaml.YAMLError, RecursionError) as e:
        raise GlimpseError(f"{run} has a broken recipe: {(str(e) or 'nested too deeply').splitlines()[0]}") from None
    for item in overrides or []:
        apply_override(recipe, item)
    validate_recipe(recipe)  # a run folder is input like any other: its recipe is checked before anything is built
    family = families.get(recipe.family)(recipe, run, Tokenizer(run / runs.TOKENIZER))
    if family.transform is not None:  # exactly the preprocessing the run trained with
        try:
            family.transform = ImageTransform.from_dict(json.loads((run / runs.PREPROCESS).read_text()))
        except FileNotFoundError:
            raise GlimpseError(f"{run} is not a glimpse run: missing {runs.PREPROCESS}") from None
        except (json.JSONDecodeError, RecursionError) as e:
            raise GlimpseError(f"{run} has a broken {runs.PREPROCESS}: {e or 'nested too deeply'}") from None
    model = family.build_model()
    if recipe.train.lora.r > 0:  # the same layers as the trainer adapted
        lora.apply_lora(model, recipe.train.lora, skip=recipe.freeze)
    runs.load_weights(model, runs.run_weights(path))
    if merge_lora:
        lora.merge_lora(model)
    dtype = torch_dtype(dtype)
    model.to(device=device, dtype=dtype).eval()
    return family, model


def export(run: str | Path, dst: str | Path, dtype: str = "fp32", merge_lora: bool = False) -> Path:
    """Write the run as a Hugging Face model folder, or say why its family or settings have none.  A LoRA
    run's folder holds the base model and its adapters in PEFT's format in DST/adapter (glimpse.hub.peft),
    or with `merge_lora` the model with the adapters merged into its weights."""
    check_destination(dst, dtype)
    family, model = load_run(run, merge_lora=False)
    layers = lora.lora_layers(model)
    if merge_lora and not layers:
        raise GlimpseError(f"--merge-lora: {run} has no LoRA adapters (its train.lora.r is 0)")
    if merge_lora or not layers:
        return write_folder(family.to_hf(lora.merge_lora(model)), dst, dtype)
    folder = family.to_hf(lora.unload_lora(model))
    cfg = family.recipe.train.lora
    adapter = peft_adapter(folder, layers, cfg.r, cfg.alpha, cfg.dropout, str(Path(dst).resolve()))
    return write_folder(folder, dst, dtype, extra=lambda tmp, cast: adapter.write(tmp / ADAPTER_DIR, cast))
