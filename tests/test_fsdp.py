"""FSDP2 on 2 CPU processes (gloo, through torchrun): the same losses as one process, sharded checkpoints that
survive SIGKILL and resume bit-identically, frozen parts, and the sharded checkpoint as one safetensors file."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
import torch
from conftest import PY, tiny_overrides, tiny_vlm_overrides

import glimpse
from glimpse import runs
from glimpse.distributed import shutdown_distributed
from glimpse.errors import GlimpseError

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without torch.distributed")


def _sets(items: list[str]) -> list[str]:
    return [x for s in items for x in ("--set", s)]


def _clip_args(world, **extra) -> list[str]:
    # a CLIP-shaped tower (class token, cls pooling), so the sharded checkpoint exports as a transformers CLIPModel
    sets = tiny_overrides(world, **{"train.max_steps": 6, "train.save_every": 3, "eval.splits": "[test]",
                                    "train.threads": 1, "model.vision.class_token": True, "model.vision.pool": "cls",
                                    **extra})
    return ["--quiet", "train", "shapes-clip", *_sets(sets)]


def _torchrun(args: list[str], out) -> list[str]:
    return [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "glimpse", *args,
            "--out", str(out)]


def _losses(run) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / runs.METRICS).read_text().splitlines())
            if "loss" in r]


@pytest.fixture(scope="module")
def fsdp_env(tmp_path_factory):
    import os

    from conftest import ROOT

    env = dict(os.environ, OMP_NUM_THREADS="1", GLIMPSE_CACHE=str(tmp_path_factory.mktemp("cache")))
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("GLIMPSE_DEBUG", None)
    return env


@pytest.fixture(scope="module")
def fsdp_run(world, tmp_path_factory, fsdp_env):
    """A tiny dual encoder trained by 2 FSDP processes, with TensorBoard logging."""
    out = tmp_path_factory.mktemp("fsdp") / "run"
    args = _clip_args(world, **{"train.parallel": "fsdp", "train.log_to": "[tensorboard]"})
    r = subprocess.run(_torchrun(args, out), env=fsdp_env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_fsdp_losses_and_weights_equal_one_process(world, tmp_path, fsdp_env, fsdp_run):
    one = tmp_path / "one"
    subprocess.run([PY, "-m", "glimpse", *_clip_args(world), "--out", str(one)], env=fsdp_env, check=True,
                   capture_output=True)
    a, b = _losses(one), _losses(fsdp_run)
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 7))
    # the same global batch, the same weights: equal up to float summation order
    torch.testing.assert_close(torch.tensor([x for _, x in b]), torch.tensor([x for _, x in a]), rtol=1e-5, atol=1e-6)
    # the sharded checkpoints: every process's shards and RNG, and the whole model in the last one only
    last, first = runs.list_checkpoints(fsdp_run)[-1], runs.list_checkpoints(fsdp_run)[0]
    assert {"sharded", "state.json", "rng-0.safetensors", "rng-1.safetensors"} <= {p.name for p in first.iterdir()}
    assert not (first / runs.WEIGHTS).exists() and (last / runs.WEIGHTS).is_file()
    mine, theirs = runs.read_weights(last / runs.WEIGHTS), runs.read_weights(one / "checkpoints" / last.name / runs.WEIGHTS)
    assert mine.keys() == theirs.keys()
    assert all(torch.allclose(mine[k], theirs[k], atol=1e-3) for k in mine)
    # the final evaluation ran on the whole model
    assert json.loads((fsdp_run / runs.EVAL).read_text())["test/n"] == 40


def test_sharded_checkpoint_converts_to_one_file_that_glimpse_loads(fsdp_run, fsdp_env, tmp_path):
    first = runs.list_checkpoints(fsdp_run)[0]
    # the step-3 checkpoint has shards only: loading it says what to do
    with pytest.raises(GlimpseError, match="convert"):
        runs.run_weights(_only(first, tmp_path))
    r = subprocess.run([PY, "-m", "glimpse", "convert", str(fsdp_run), str(tmp_path / "whole.safetensors"),
                        "--to", "safetensors"], env=fsdp_env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    whole = runs.read_weights(tmp_path / "whole.safetensors")
    written = runs.read_weights(runs.list_checkpoints(fsdp_run)[-1] / runs.WEIGHTS)
    assert whole.keys() == written.keys() and all(torch.equal(whole[k], written[k]) for k in whole)
    r = subprocess.run([PY, "-m", "glimpse", "convert", str(first), "--to", "safetensors"], env=fsdp_env,
                       capture_output=True, text=True)
    assert r.returncode == 0 and (first / runs.WEIGHTS).is_file(), r.stderr
    emb = glimpse.load(first).embed_texts(["a red circle"])
    assert emb.shape[0] == 1 and torch.isfinite(torch.as_tensor(emb)).all()
    # and the HF export reads it: a CLIP folder that transformers loads whole, embedding as glimpse does
    r = subprocess.run([PY, "-m", "glimpse", "convert", str(first), str(tmp_path / "hf"), "--to", "hf"], env=fsdp_env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    from transformers import CLIPModel, PreTrainedTokenizerFast

    hf_model, info = CLIPModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ids = PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "hf"))(["<bos>a red circle<eos>"],
                                                                           return_tensors="pt").input_ids
    with torch.no_grad():
        theirs = hf_model.get_text_features(input_ids=ids)
    theirs = theirs if torch.is_tensor(theirs) else theirs.pooler_output  # transformers 5 returns an output object
    theirs = torch.nn.functional.normalize(theirs, dim=-1)
    torch.testing.assert_close(theirs, torch.as_tensor(emb), atol=1e-5, rtol=1e-4)
    # a broken shard is one line naming the checkpoint
    shard = next((first / "sharded").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:50])
    r = subprocess.run([PY, "-m", "glimpse", "convert", str(first), str(tmp_path / "x.safetensors"),
                        "--to", "safetensors"], env=fsdp_env, capture_output=True, text=True)
    assert r.returncode == 2 and "broken checkpoint" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def _only(ckpt, tmp_path):
    """A copy of the run holding only the sharded checkpoint `ckpt`."""
    import shutil

    run = tmp_path / "only"
    shutil.copytree(ckpt, run / runs.CHECKPOINTS / ckpt.name)
    return run


def test_fsdp_in_bf16_computes_in_bf16_and_keeps_fp32_weights(world, tmp_path, fsdp_env, fsdp_run):
    """Mixed precision under FSDP: blocks gathered in bf16 for the forward and backward, gradients reduced and
    the shards (so the checkpoint) kept in fp32.  Its losses follow the fp32 run's to bf16's precision."""
    out = tmp_path / "bf16"
    args = _clip_args(world, **{"train.parallel": "fsdp", "train.precision": "bf16", "eval.splits": "[]"})
    r = subprocess.run(_torchrun(args, out), env=fsdp_env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    low, full = [x for _, x in _losses(out)], [x for _, x in _losses(fsdp_run)]
    # the first step's loss comes from the same weights and batch: FSDP in fp32 gives one process's loss to 1e-5
    # (test above), so a larger gap is bf16 arithmetic; and the losses follow the fp32 run's to bf16's precision
    assert len(low) == len(full) == 6 and abs(low[0] - full[0]) > 1e-4
    torch.testing.assert_close(torch.tensor(low), torch.tensor(full), rtol=0.02, atol=0.01)
    weights = runs.read_weights(runs.list_checkpoints(out)[-1] / runs.WEIGHTS)
    assert {w.dtype for w in weights.values() if w.is_floating_point()} == {torch.float32}


def test_tensorboard_logs_the_metrics(fsdp_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(fsdp_run / runs.TENSORBOARD))
    events.Reload()
    loss = [(e.step, e.value) for e in events.Scalars("loss")]
    assert [s for s, _ in loss] == list(range(1, 7))
    assert [v for _, v in loss] == pytest.approx([x for _, x in _losses(fsdp_run)])
    assert "test/t2i_r1" in events.Tags()["scalars"]


def test_fsdp_run_killed_after_a_checkpoint_resumes_bit_identically(world, tmp_path, fsdp_env, fsdp_run):
    crashed = tmp_path / "crashed"
    args = _clip_args(world, **{"train.parallel": "fsdp"})
    proc = subprocess.Popen(_torchrun(args, crashed), env=fsdp_env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while runs.latest_checkpoint(crashed) is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    import os

    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers, at once
    proc.wait()
    assert [p.name for p in runs.list_checkpoints(crashed)] == ["step_0000003"]
    r = subprocess.run(_torchrun([*args, "--resume"], crashed), env=fsdp_env, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming" in r.stdout
    assert _losses(crashed) == _losses(fsdp_run)  # bit-identical, not merely close
    a = runs.read_weights(runs.list_checkpoints(crashed)[-1] / runs.WEIGHTS)
    b = runs.read_weights(runs.list_checkpoints(fsdp_run)[-1] / runs.WEIGHTS)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_frozen_tower_and_lm_under_fsdp(world, tmp_path, fsdp_env):
    """LLaVA stage 1 (vision tower and LM frozen, the connector trained through LoRA adapters on its first layer)
    with activation checkpointing: 2 FSDP processes train as 2 DDP ones.  (Not as one process: the loss is a mean over each process's answer tokens,
    so the processes' mean differs from one process's mean over all tokens, under DDP as under FSDP.)"""
    sets = tiny_vlm_overrides(world, **{"eval.splits": "[]", "train.threads": 1, "train.save_every": 4,
                                        "train.lora.r": 4, "train.lora.targets": "[connector.linear_1]"})
    args = ["--quiet", "train", "shapes-llava-stage1", *_sets(sets)]
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    for out, extra in ((ddp, []), (fsdp, ["--set", "train.parallel=fsdp", "--set", "train.activation_checkpointing=true"])):
        r = subprocess.run(_torchrun([*args, *extra], out), env=fsdp_env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
    torch.testing.assert_close(torch.tensor([x for _, x in _losses(fsdp)]), torch.tensor([x for _, x in _losses(ddp)]),
                               rtol=1e-5, atol=1e-6)
    a = runs.read_weights(ddp / "checkpoints" / "step_0000004" / runs.WEIGHTS)
    b = runs.read_weights(fsdp / "checkpoints" / "step_0000004" / runs.WEIGHTS)
    assert a.keys() == b.keys()
    assert any(".lora_A." in k for k in a)
    for k in a:  # the frozen parts as they started (the same seed), the adapters trained alike
        trained = ".lora_" in k or k.startswith("connector.linear_2")
        assert torch.allclose(a[k], b[k], atol=1e-5) if trained else torch.equal(a[k], b[k]), k


def _gathered_worker(rank, world, store, results):
    import torch.distributed as dist

    from glimpse.train import parallel

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ModuleList([torch.nn.Linear(16, 16)]),
                                torch.nn.Linear(16, 4))
    parallel.shard(model, "bf16")  # gathered copies are bf16: a careless writeback would round every weight
    before = parallel.full_state(model)
    with parallel.gathered(model, writeback=True):
        pass
    untouched = parallel.full_state(model)
    with parallel.gathered(model, writeback=True):
        with torch.no_grad():
            model[1][0].weight.fill_(0.5)  # as a k-means initialisation writes a codebook
    changed = parallel.full_state(model)
    if rank == 0:
        results["untouched"] = all(torch.equal(before[k], untouched[k]) for k in before)
        results["changed"] = torch.equal(changed["1.0.weight"], torch.full((16, 16), 0.5))
        results["others"] = all(torch.equal(before[k], changed[k]) for k in before if k != "1.0.weight")
    shutdown_distributed()  # a barrier first: gloo can abort if one rank leaves while the other still talks


def test_gathered_writes_back_only_what_changed_and_keeps_fp32_shards(tmp_path):
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_gathered_worker, args=(2, tmp_path / "store", results), nprocs=2, join=True)
    assert dict(results) == {"untouched": True, "changed": True, "others": True}
