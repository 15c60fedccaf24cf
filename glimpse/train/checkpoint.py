"""Checkpoints in safetensors + JSON, written atomically.

A checkpoint is a folder `checkpoints/step_0000100/` holding the model, the optimizer
(tensors in safetensors, the rest in JSON), the RNG states and the trainer state.  It is
written under a temporary name and renamed into place, so a run killed mid-write leaves
the previous checkpoint intact and never a half one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from glimpse.errors import GlimpseError

PREFIX = "step_"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(run: str | Path) -> list[Path]:
    d = Path(run) / "checkpoints"
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def latest_checkpoint(run: str | Path) -> Path | None:
    ckpts = list_checkpoints(run)
    return ckpts[-1] if ckpts else None


def _state_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage (tied weights): save each tensor once, contiguous
    out, seen = {}, {}
    for k, v in model.state_dict().items():
        ptr = (v.data_ptr(), v.shape, v.stride())
        if ptr in seen:
            continue
        seen[ptr] = k
        out[k] = v.detach().cpu().contiguous()
    return out


def save_checkpoint(run: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict, keep: int = 2) -> Path:
    ckdir = Path(run) / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    final = ckdir / f"{PREFIX}{step:07d}"
    tmp = ckdir / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(_state_tensors(model), str(tmp / "model.safetensors"))
    opt = optimizer.state_dict()
    tensors, meta = {}, {}
    for pid, st in opt["state"].items():
        for name, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{name}"] = v.detach().cpu().contiguous()
            else:
                meta[f"{pid}.{name}"] = v
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(tmp / "rng.safetensors"))
    py_state = random.getstate()
    np_state = np.random.get_state()
    (tmp / "state.json").write_text(json.dumps({
        **state,
        "step": step,
        "optimizer": {"param_groups": opt["param_groups"], "scalars": meta},
        "python_rng": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():  # re-saving the same step (e.g. the end of an extended run)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(ckdir)
    for old in list_checkpoints(run)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


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


def load_part(model: torch.nn.Module, part: str, path: str | Path) -> None:
    """Strictly load one top-level submodule from a run's weights: the tensors under "part." when the
    file has any (the vision tower of a dual encoder), else the whole file (a language-model run)."""
    sub = model_part(model, part, "init_parts: ")
    tensors = read_weights(path)
    prefix = part + "."
    picked = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)} or tensors
    load_tensors(sub, picked, f"{path} (for {part})")


def load_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor], path) -> None:
    expected = model.state_dict()
    # tied weights were saved once: fill in their aliases
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if unexpected:
        raise GlimpseError(f"checkpoint {path} has unexpected tensor {unexpected[0]}"
                           + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    for k in missing:
        alias = next((a for a, v in expected.items() if a in tensors and v.data_ptr() == expected[k].data_ptr()), None)
        if alias is None:
            raise GlimpseError(f"checkpoint {path} is missing tensor {k}")
    for k, v in tensors.items():
        if v.shape != expected[k].shape:
            raise GlimpseError(f"checkpoint {path}: tensor {k} has shape {tuple(v.shape)}, "
                               f"the model expects {tuple(expected[k].shape)}")
    model.load_state_dict(tensors, strict=False)


def load_checkpoint(ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore model, optimizer and RNG states; returns the trainer state."""
    try:
        state = json.loads((ckpt / "state.json").read_text())
        load_weights(model, ckpt / "model.safetensors")
        tensors = load_file(str(ckpt / "optimizer.safetensors"))
        rng = load_file(str(ckpt / "rng.safetensors"))
        opt_state: dict = {}
        for key, v in [*tensors.items(), *state["optimizer"]["scalars"].items()]:
            pid, name = key.split(".", 1)
            opt_state.setdefault(int(pid), {})[name] = v
        optimizer.load_state_dict({"state": opt_state, "param_groups": state["optimizer"]["param_groups"]})
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        py = state["python_rng"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        np_state = state["numpy_rng"]
        np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
        int(state["step"])
    except (OSError, json.JSONDecodeError, SafetensorError, KeyError, ValueError, TypeError, RuntimeError) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise GlimpseError(f"broken checkpoint {ckpt}: {detail}") from None
    return state
