"""`glimpse.load`: a trained run (or one of its checkpoints) as a ready-to-use pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from glimpse.config import recipe_from_dict
from glimpse.data.images import ImageTransform
from glimpse.data.tokenizer import Tokenizer
from glimpse.errors import GlimpseError
from glimpse.train import checkpoint as ckpt


def run_weights(path: str | Path) -> Path:
    """The model weights of a run folder (its latest checkpoint) or of one checkpoint folder."""
    p = Path(path)
    if (p / "model.safetensors").is_file():
        return p / "model.safetensors"
    latest = ckpt.latest_checkpoint(p)
    if latest is None:
        raise GlimpseError(f"{p} is not a glimpse run: no checkpoints found")
    return latest / "model.safetensors"


def run_dir(path: str | Path) -> Path:
    p = Path(path)
    if not p.exists():
        raise GlimpseError(f"no such run: {p}")
    # a checkpoint folder lives at RUN/checkpoints/step_N
    return p.parent.parent if p.parent.name == "checkpoints" else p


def load(path: str | Path, device: str = "cpu", dtype=None):
    """Load a glimpse run; returns the family's pipeline (a dual encoder's: embed_images,
    embed_texts, classify; a language model's: generate, perplexity; a vision-language
    model's: caption, ask, chat).  A local Hugging Face model folder (config.json + safetensors)
    loads the same way, through glimpse.hub, cast to `dtype` (default float32)."""
    from glimpse import hub

    if hub.is_hf_folder(path):
        return hub.load_pipeline(hub.resolve(path), device, dtype)
    task, model = load_run(path, device=device)
    return task.pipeline(model)


def load_run(path: str | Path, overrides: list[str] | None = None, device: str = "cpu"):
    """(the family's task, the model in eval mode) of a run; `overrides` change its recipe
    (`eval.*` settings, say) as `--set` does."""
    from glimpse.config import apply_override
    from glimpse.train.tasks import TASKS

    run = run_dir(path)
    try:
        recipe = recipe_from_dict(yaml.safe_load((run / "recipe.yaml").read_text()))
        for item in overrides or []:
            apply_override(recipe, item)
        has_images = recipe.family != "causal_lm"
        preprocess = json.loads((run / "preprocess.json").read_text()) if has_images else None
    except FileNotFoundError as e:
        raise GlimpseError(f"{run} is not a glimpse run: missing {Path(e.filename).name}") from None
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise GlimpseError(f"{run} has a broken recipe or preprocess file: {str(e).splitlines()[0]}") from None
    tokenizer = Tokenizer(run / "tokenizer.json")
    task = TASKS[recipe.family](recipe, run, tokenizer)
    if preprocess is not None:
        task.transform = ImageTransform.from_dict(preprocess)  # exactly the preprocessing the run trained with
    model = task.build_model()
    ckpt.load_weights(model, run_weights(path))
    model.to(device).eval()
    return task, model
