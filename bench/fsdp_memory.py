"""Parameter + gradient + optimizer bytes per process: FSDP against DDP on the same model, 2 CPU processes.

    python bench/fsdp_memory.py [--recipe shapes-llava-stage2] [--processes 2]

Each setting trains the recipe for 2 steps under torchrun (gloo) on a small shapes world; the trainer records
in run.json what the largest process holds after its first step (its shards under FSDP: parameters, their
gradients, AdamW's two moments).  Target (issue 25): FSDP <= 0.6x DDP with 2 processes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="shapes-llava-stage2")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more recipe overrides")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="glimpse-fsdp-mem-"))
    env = dict(os.environ, OMP_NUM_THREADS="1", GLIMPSE_CACHE=str(tmp / "cache"))
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    sets = ["data.train_size=64", "data.val_size=8", "data.test_size=8", "train.batch_size=8", "train.max_steps=2",
            "train.save_every=2", "eval.splits=[]", "eval.during_train=[]", "init=null", "init_parts={}",
            "train.threads=1", "data.num_workers=0", *a.set]
    held = {}
    for mode in ("ddp", "fsdp"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.processes}",
               "-m", "glimpse", "--quiet", "train", a.recipe, "--out", str(tmp / mode),
               *[x for s in [*sets, f"train.parallel={mode}"] for x in ("--set", s)]]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"{mode} failed:\n{r.stderr[-3000:]}")
        held[mode] = json.loads((tmp / mode / "run.json").read_text())["bytes_per_process"]
    print(f"{a.recipe}, {a.processes} processes (bytes per process, the largest one)")
    print(f"{'':<10}{'params':>14}{'grads':>14}{'optimizer':>14}{'total':>14}")
    for mode, b in held.items():
        print(f"{mode:<10}{b['params']:>14,}{b['grads']:>14,}{b['optimizer']:>14,}{sum(b.values()):>14,}")
    ratio = sum(held["fsdp"].values()) / sum(held["ddp"].values())
    print(f"fsdp / ddp: {ratio:.3f}  (target <= 0.6)")


if __name__ == "__main__":
    main()
