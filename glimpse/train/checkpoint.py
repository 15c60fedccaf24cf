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
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.api import CheckpointException

from glimpse import runs
from glimpse.errors import GlimpseError


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointMismatch(GlimpseError):
    """A sound checkpoint that this run cannot resume as set up (another parallel mode or process count)."""


SHARDED = "sharded"  # a checkpoint's torch.distributed.checkpoint folder (FSDP runs)


def _state_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return _dedup(model.state_dict())


def _dedup(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage (tied weights): save each tensor once, contiguous
    out, seen = {}, {}
    for k, v in tensors.items():
        ptr = (v.data_ptr(), v.shape, v.stride())
        if ptr in seen:
            continue
        seen[ptr] = k
        out[k] = v.detach().cpu().contiguous()
    return out


def _write_rng(path: Path) -> None:
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(path))


def _trainer_state(state: dict, step: int, optimizer_json: dict | None) -> str:
    py_state = random.getstate()
    np_state = np.random.get_state()
    return json.dumps({
        **state,
        "step": step,
        **({"optimizer": optimizer_json} if optimizer_json is not None else {}),
        "python_rng": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    })


def save_checkpoint(run: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict, keep: int = 2) -> Path:
    """One process's model (DDP replicas are equal: the main process saves)."""
    ckdir = Path(run) / runs.CHECKPOINTS
    final, tmp = _fresh_tmp(ckdir, step)
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
    _write_rng(tmp / "rng.safetensors")
    (tmp / "state.json").write_text(_trainer_state(state, step, {"param_groups": opt["param_groups"],
                                                                 "scalars": meta}))
    return _commit(run, tmp, final, keep)


def save_sharded_checkpoint(run: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                            state: dict, keep: int = 2, full_weights: dict[str, torch.Tensor] | None = None) -> Path:
    """FSDP: every process writes its shards of the model and optimizer (torch.distributed.checkpoint, under
    `sharded/`) and its own RNG state; the main process then writes the trainer state and renames the folder
    into place as `save_checkpoint` does.  `full_weights` (the main process's gathered model, at the end of
    a run) is written beside as model.safetensors, so glimpse.load reads the run at once.  Called on every
    process."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    rank = dist.get_rank()
    ckdir = Path(run) / runs.CHECKPOINTS
    final = ckdir / f"{runs.STEP_PREFIX}{step:07d}"
    tmp = _fresh_tmp(ckdir, step)[1] if rank == 0 else ckdir / f".tmp-{final.name}"
    dist.barrier()  # the main process made the empty folder
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp / SHARDED))
    _write_rng(tmp / f"rng-{rank}.safetensors")
    if rank == 0 and full_weights is not None:
        save_file(_dedup(full_weights), str(tmp / runs.WEIGHTS))
    dist.barrier()  # every shard is on disk before the folder is renamed into place
    if rank == 0:
        (tmp / "state.json").write_text(_trainer_state({**state, "processes": dist.get_world_size()}, step, None))
        _commit(run, tmp, final, keep)
    dist.barrier()
    return final


def _fresh_tmp(ckdir: Path, step: int) -> tuple[Path, Path]:
    ckdir.mkdir(parents=True, exist_ok=True)
    final = ckdir / f"{runs.STEP_PREFIX}{step:07d}"
    tmp = ckdir / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return final, tmp


def _commit(run: str | Path, tmp: Path, final: Path, keep: int) -> Path:
    """Flush the temporary folder, rename it into place (an old folder of the same step set aside first),
    and drop all but the newest `keep` checkpoints."""
    ckdir = final.parent
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    for d in [*(d for d in tmp.rglob("*") if d.is_dir()), tmp]:
        _fsync_dir(d)
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


def is_sharded(ckpt: Path) -> bool:
    return (Path(ckpt) / SHARDED).is_dir()


def load_checkpoint(ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    sharded: bool = False) -> dict:
    """Restore model, optimizer and RNG states; returns the trainer state.  `sharded`: the model is FSDP's
    and every process reads its own shards (called on every process)."""
    if is_sharded(ckpt) and not sharded and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        try:
            n = json.loads((ckpt / "state.json").read_text()).get("processes")
        except (OSError, json.JSONDecodeError, AttributeError):
            n = None
        raise CheckpointMismatch(f"{ckpt} is sharded over {n or 'several'} processes: resume it under torchrun "
                                 f"--nproc_per_node={n or 'N'} with train.parallel: fsdp")
    if is_sharded(ckpt) != sharded:
        was = "fsdp" if is_sharded(ckpt) else "ddp"
        raise CheckpointMismatch(f"{ckpt} was written with train.parallel: {was}; resume it the same way, or start "
                                 f"a new run from its weights (init: {ckpt}"
                                 + (f", after `glimpse convert {ckpt} --to safetensors`)" if was == "fsdp" else ")"))
    try:
        state = json.loads((ckpt / "state.json").read_text())
        if sharded:
            rng = _load_shards(ckpt, model, optimizer)  # may raise CheckpointMismatch: not caught below
        else:
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
    except (OSError, json.JSONDecodeError, SafetensorError, KeyError, ValueError, TypeError, RuntimeError,
            CheckpointException) as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GlimpseError(f"broken checkpoint {ckpt}: {detail}") from None
    return state


def _load_shards(ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    saved = json.loads((ckpt / "state.json").read_text()).get("processes")
    if saved != dist.get_world_size():
        raise CheckpointMismatch(f"{ckpt} was written by {saved} processes; resume it with as many (--nproc_per_node)")
    model_state, optim_state = get_state_dict(model, optimizer)
    both = {"model": model_state, "optimizer": optim_state}
    dcp.load(both, checkpoint_id=str(ckpt / SHARDED))
    set_state_dict(model, optimizer, model_state_dict=both["model"], optim_state_dict=both["optimizer"])
    return load_file(str(ckpt / f"rng-{dist.get_rank()}.safetensors"))


def write_consolidated(src: str | Path, dst: str | Path | None = None) -> Path:
    """`glimpse convert RUN --to safetensors`: the whole model of a run's latest (or the given) sharded
    checkpoint written as one safetensors file, by default model.safetensors inside the checkpoint, where
    glimpse.load, `glimpse eval` and the Hugging Face export read a run's weights.  Written atomically."""
    src = Path(src)
    ck = src if runs.checkpoint_step(src) is not None else runs.latest_checkpoint(src)
    if ck is None or not ck.is_dir():
        raise GlimpseError(f"{src} is not a glimpse run or checkpoint: no checkpoints found")
    if not is_sharded(ck):
        raise GlimpseError(f"{ck} is not sharded: its weights are {ck / runs.WEIGHTS} already")
    out = Path(dst) if dst is not None else ck / runs.WEIGHTS
    if not out.parent.is_dir():
        raise GlimpseError(f"{out.parent} is not a folder: create it first, or write elsewhere")
    tmp = out.with_name(f".tmp-{out.name}")
    try:
        save_file(_dedup(consolidate(ck)), str(tmp))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise GlimpseError(f"could not write {out}: {e.strerror or e}") from None
    return out


def consolidate(ckpt: Path) -> dict[str, torch.Tensor]:
    """The full model of a sharded checkpoint, read on one process (no process group): what
    `glimpse convert RUN --to safetensors` writes as model.safetensors."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        meta = dcp.FileSystemReader(str(ckpt / SHARDED)).read_metadata()
        model = {k: torch.empty(m.size, dtype=m.properties.dtype)
                 for k, m in meta.state_dict_metadata.items()
                 if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(model, checkpoint_id=str(ckpt / SHARDED), no_dist=True)
    except (OSError, ValueError, RuntimeError, CheckpointException) as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GlimpseError(f"broken checkpoint {ckpt}: {detail}") from None
    return {k[len("model."):]: v for k, v in model.items()}

