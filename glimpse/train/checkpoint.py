"""Checkpoints in safetensors + JSON, written atomically.

A checkpoint is a folder `checkpoints/step_0000100/` (glimpse.runs) holding the model, the optimizer
(tensors in safetensors, the rest in JSON), the RNG states and the trainer state.  It is
written under a temporary name (.tmp-step_N), flushed to disk and renamed into place, so a run killed
mid-write leaves the previous checkpoints intact and never a half one.  A step saved again (one whose
folder failed to load) is replaced in three moves: the old folder renamed aside (.old-step_N), the new
one renamed in, the old one deleted; `tidy` finishes whichever of these a crash interrupted.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from glimpse import runs
from glimpse.errors import GlimpseError


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    ckdir = Path(run) / runs.CHECKPOINTS
    ckdir.mkdir(parents=True, exist_ok=True)
    final = ckdir / f"{runs.STEP_PREFIX}{step:07d}"
    tmp = ckdir / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(_state_tensors(model), str(tmp / runs.WEIGHTS))
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
    _fsync_dir(tmp)
    aside = ckdir / f".old-{final.name}"
    if final.exists():  # a step saved again: the old folder goes aside, so a crash never leaves none
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(final, aside)
    _pause_for_tests(ckdir)
    os.rename(tmp, final)
    _fsync_dir(ckdir)
    shutil.rmtree(aside, ignore_errors=True)
    for old in runs.list_checkpoints(run)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def tidy(run: str | Path) -> None:
    """Finish what a crash inside save_checkpoint left: a complete new folder whose old one was set aside
    is renamed in (it was flushed before the old one moved); an old one set aside and not replaced comes
    back; a temporary folder written no further is deleted."""
    ckdir = Path(run) / runs.CHECKPOINTS
    for aside in ckdir.glob(".old-*") if ckdir.is_dir() else []:
        final, tmp = ckdir / aside.name[len(".old-"):], ckdir / f".tmp-{aside.name[len('.old-'):]}"
        if not final.exists():
            os.rename(tmp if tmp.is_dir() else aside, final)
        shutil.rmtree(aside, ignore_errors=True)
    for tmp in ckdir.glob(".tmp-*") if ckdir.is_dir() else []:
        shutil.rmtree(tmp, ignore_errors=True)


def _pause_for_tests(ckdir: Path) -> None:
    """GLIMPSE_TEST_PAUSE_IN_SAVE=FILE: say so in FILE and wait there, the new checkpoint written and not yet
    renamed in (the old one, if any, set aside), for a test to kill the process at the worst moment."""
    flag = os.environ.get("GLIMPSE_TEST_PAUSE_IN_SAVE")
    if flag:
        Path(flag).write_text(str(ckdir))
        while True:
            time.sleep(1)


def load_checkpoint(ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore model, optimizer and RNG states; returns the trainer state."""
    try:
        state = json.loads((ckpt / "state.json").read_text())
        runs.load_weights(model, ckpt / runs.WEIGHTS)
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
