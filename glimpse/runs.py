"""The run-folder layout, shared by the trainer that writes runs and the loader that reads them.

    RUN/recipe.yaml                 the resolved recipe
    RUN/tokenizer.json              the tokenizer it trained with
    RUN/preprocess.json             image preprocessing (families that read images)
    RUN/metrics.jsonl, loss.png     one record per logged step; the curves
    RUN/eval.json                   the final evaluation
    RUN/run.json                    wall time, steps, and this machine's fp32 matmul rate (what the time is worth)
    RUN/checkpoints/step_NNNNNNN/   model.safetensors (+ optimizer, RNG and trainer state: train/checkpoint.py)
    RUN/adapter/                    a LoRA run's adapters in PEFT's format (glimpse.hub.peft), where its family exports

Weights are read strictly: a missing, unexpected or mis-shaped tensor is an error that names it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from glimpse.errors import GlimpseError

RECIPE, TOKENIZER, PREPROCESS = "recipe.yaml", "tokenizer.json", "preprocess.json"
METRICS, LOSS_PLOT, EVAL, RUN_INFO = "metrics.jsonl", "loss.png", "eval.json", "run.json"
CHECKPOINTS, STEP_PREFIX, WEIGHTS = "checkpoints", "step_", "model.safetensors"
TENSORBOARD = "tensorboard"  # train.log_to: [tensorboard] event files
ADAPTER = "adapter"  # a LoRA run's adapters in PEFT's format (glimpse.hub.peft)


def checkpoint_step(path: Path) -> int | None:
    """The step of a checkpoint folder named step_N, or None for any other name."""
    digits = path.name[len(STEP_PREFIX):]
    return int(digits) if path.name.startswith(STEP_PREFIX) and digits.isascii() and digits.isdigit() else None


def list_checkpoints(run: str | Path) -> list[Path]:
    """A run's checkpoint folders, oldest first by step number (step_10000000 comes after step_9999999)."""
    d = Path(run) / CHECKPOINTS
    if not d.is_dir():
        return []
    return sorted((p for p in d.iterdir() if p.is_dir() and checkpoint_step(p) is not None), key=checkpoint_step)


def latest_checkpoint(run: str | Path) -> Path | None:
    ckpts = list_checkpoints(run)
    return ckpts[-1] if ckpts else None


def run_dir(path: str | Path) -> Path:
    """The run folder of a run or of one of its checkpoints (RUN/checkpoints/step_N)."""
    p = Path(path)
    if not p.exists():
        raise GlimpseError(f"no such run: {p}")
    return p.parent.parent if p.parent.name == CHECKPOINTS else p


def run_weights(path: str | Path) -> Path:
    """The model weights of a run folder (its latest checkpoint) or of one checkpoint folder."""
    p = Path(path)
    if (p / WEIGHTS).is_file():
        return p / WEIGHTS
    latest = latest_checkpoint(p)
    if latest is None:
        raise GlimpseError(f"{p} is not a glimpse run: no checkpoints found")
    if not (latest / WEIGHTS).is_file() and (latest / "sharded").is_dir():  # an FSDP checkpoint
        raise GlimpseError(f"{latest} holds sharded weights only: write them as one file first with "
                           f"`glimpse convert {p} --to safetensors`")
    return latest / WEIGHTS


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise GlimpseError(f"no weights at {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise GlimpseError(f"broken checkpoint {path}: {str(e).splitlines()[0]}") from None


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Strictly load a safetensors file: a missing, unexpected or mis-shaped tensor is an error naming it."""
    load_tensors(model, read_weights(path), Path(path))


def model_part(model: torch.nn.Module, part: str, why: str = "") -> torch.nn.Module:
    """A top-level submodule by name (vision, text, lm, ...), or an error listing the parts."""
    sub = getattr(model, part, None)
    if not isinstance(sub, torch.nn.Module):
        parts = ", ".join(n for n, _ in model.named_children())
        raise GlimpseError(f"{why}the model has no part {part!r}; its parts: {parts}")
    return sub


def part_source(value: str | Path) -> tuple[str, str]:
    """A recipe's `init_parts` value -> (the run or folder, the part of it to take: "" for the default).
    `RUN#name` names a part of a run; a path that exists as given is taken whole, so a folder whose own
    name holds a '#' still loads (the part name is what follows the last '#')."""
    value = str(value)
    head, sep, name = value.rpartition("#")
    if not sep or not head or not name or "/" in name or Path(value).exists():
        return value, ""
    return head, name


def load_part(model: torch.nn.Module, part: str, path: str | Path, source: str = "") -> None:
    """Strictly load one top-level submodule from a run's weights: the tensors under "source." (`source`
    given: a recipe's `init_parts: {second_vision: RUN#vision}`), else under "part." when the file has
    any (the vision tower of a dual encoder), else the whole file (a language-model run)."""
    sub = model_part(model, part, "init_parts: ")
    tensors = read_weights(path)
    prefix = (source or part) + "."
    picked = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if source and not picked:
        raise GlimpseError(f"init_parts: {path} has no part {source!r} (no tensor under {prefix!r})")
    load_tensors(sub, picked or tensors, f"{path} (for {part})",
                 shape_hint=f"; the recipe's settings for {part} must be that run's (its recipe.yaml)")


def load_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor], path, shape_hint: str = "") -> None:
    expected = model.state_dict()
    # tied weights were saved once: fill in their aliases
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if unexpected:
        lora = any(".lora_A." in k or ".lora_B." in k for k in unexpected)
        raise GlimpseError(f"checkpoint {path} has unexpected tensor {unexpected[0]}"
                           + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
                           + ("; it is a LoRA run's (base weights + adapters): glimpse.load and glimpse eval read "
                              "it; to start another run from it, export it merged (glimpse convert RUN DST --to hf "
                              "--merge-lora) and start from DST" if lora else ""))
    for k in missing:
        alias = next((a for a, v in expected.items() if a in tensors and v.data_ptr() == expected[k].data_ptr()), None)
        if alias is None:
            raise GlimpseError(f"checkpoint {path} is missing tensor {k}")
    for k, v in tensors.items():
        if v.shape != expected[k].shape:
            raise GlimpseError(f"checkpoint {path}: tensor {k} has shape {tuple(v.shape)}, "
                               f"the model expects {tuple(expected[k].shape)}{shape_hint}")
    model.load_state_dict(tensors, strict=False)
