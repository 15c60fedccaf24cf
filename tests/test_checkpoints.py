"""Checkpoints survive crashes where they are replaced: a step saved again goes through an aside folder,
a run killed inside save_checkpoint resumes bit-identically, a broken checkpoint is passed over, and
checkpoints sort by step number."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time

import torch
from test_train import _train_cmd, records

from glimpse import runs
from glimpse.train import checkpoint as ckpt


def test_checkpoints_sort_by_step_number(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    for step in (9_999_999, 10_000_000, 10_000_001):
        ckpt.save_checkpoint(tmp_path, step, model, opt, {}, keep=2)
    names = [p.name for p in runs.list_checkpoints(tmp_path)]
    assert names == ["step_10000000", "step_10000001"]  # rotation deleted the oldest, not the newest
    assert runs.latest_checkpoint(tmp_path).name == "step_10000001"
    (tmp_path / "checkpoints" / "step_²").mkdir()  # a name that is not a step is no checkpoint
    assert [p.name for p in runs.list_checkpoints(tmp_path)] == names


def test_a_step_saved_again_replaces_the_old_folder_whole(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    ckpt.save_checkpoint(tmp_path, 5, model, opt, {"n": 1})
    ckpt.save_checkpoint(tmp_path, 5, model, opt, {"n": 2})
    ckdir = tmp_path / "checkpoints"
    assert [p.name for p in ckdir.iterdir()] == ["step_0000005"]  # no aside or temporary folder left
    assert json.loads((ckdir / "step_0000005" / "state.json").read_text())["n"] == 2


def test_killed_inside_save_checkpoint_while_replacing_a_broken_one(world, tmp_path, cli_env):
    steps = 6
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    subprocess.run(_train_cmd(world, straight, steps, "--set", "train.save_every=3"), env=cli_env, check=True,
                   capture_output=True)
    shutil.copytree(straight, crashed)
    weights = crashed / "checkpoints" / "step_0000006" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # the newest checkpoint is broken

    # resume: the broken step 6 is passed over, steps 4-6 are trained again, and the process is killed
    # inside the save that replaces it: the broken folder set aside, the new one written, not renamed in
    flag = tmp_path / "paused"
    env = {**cli_env, "GLIMPSE_TEST_PAUSE_IN_SAVE": str(flag)}
    proc = subprocess.Popen(_train_cmd(world, crashed, steps, "--set", "train.save_every=3", "--resume"), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not flag.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL and flag.exists()
    assert "broken checkpoint" in err and "resuming from the checkpoint before it" in err
    ckdir = crashed / "checkpoints"
    assert sorted(p.name for p in ckdir.iterdir()) == [".old-step_0000006", ".tmp-step_0000006", "step_0000003"]

    # resume again: the save is finished (the complete new folder renamed in), nothing is trained twice
    resumed = subprocess.run(_train_cmd(world, crashed, steps, "--set", "train.save_every=3", "--resume"),
                             env=cli_env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout and "broken" not in resumed.stderr
    assert sorted(p.name for p in ckdir.iterdir()) == ["step_0000003", "step_0000006"]
    a = [(r["step"], r["loss"]) for r in records(straight) if "loss" in r]
    b = [(r["step"], r["loss"]) for r in records(crashed) if "loss" in r]
    assert a == b and len(a) == steps
    same = runs.read_weights(straight / "checkpoints" / "step_0000006" / "model.safetensors")
    again = runs.read_weights(ckdir / "step_0000006" / "model.safetensors")
    assert all(torch.equal(same[k], again[k]) for k in same)
