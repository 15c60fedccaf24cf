"""Training end to end: the run folder, exact resume after SIGKILL, stopping on non-finite losses."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import PY, tiny_overrides

import glimpse
from glimpse.config import load_recipe
from glimpse.errors import GlimpseError
from glimpse.train.trainer import lr_at, train


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_run_folder_has_metrics_checkpoints_eval_and_plot(tiny_run):
    recs = records(tiny_run)
    steps = [r for r in recs if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert all({"loss", "lr", "samples_per_s"} <= set(r) for r in steps)
    assert any("val/t2i_r1" in r for r in recs)  # periodic evaluation shows in the log
    ev = json.loads((tiny_run / "eval.json").read_text())
    for key in ("test/t2i_r1", "test/i2t_r5", "test_novel/t2i_r1", "test/zeroshot_acc", "test_novel/zeroshot_acc"):
        assert 0.0 <= ev[key] <= 1.0
    assert (tiny_run / "loss.png").stat().st_size > 1000
    ckpts = sorted(p.name for p in (tiny_run / "checkpoints").iterdir())
    assert ckpts == ["step_0000006", "step_0000008"]  # keep_checkpoints=2, no temporary folders left
    assert {"model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"} <= {
        p.name for p in (tiny_run / "checkpoints" / "step_0000008").iterdir()}
    info = json.loads((tiny_run / "run.json").read_text())  # what the wall time is worth on this machine
    assert info["seconds"] > 0 and info["matmul_gflops"] > 0 and info["steps"] == [0, 8] and info["threads"] >= 1


def test_load_embeds_and_classifies(tiny_run, world):
    m = glimpse.load(tiny_run)
    img = world / "images" / "test" / "test_000000.png"
    e = m.embed_images([img, img.read_bytes()])
    assert e.shape == (2, 16)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(e[0], e[1])  # path and bytes decode the same
    t = m.embed_texts(["a small red circle on the left", "a large blue cross"])
    assert t.shape == (2, 16)
    labels = ["red circle", "blue cross", "green square"]
    best, probs = m.classify([img], labels, return_probs=True)
    assert best[0] in labels and probs.shape == (1, 3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(1))


def test_lr_schedule_warms_up_then_decays():
    cfg = load_recipe("shapes-clip", ["train.lr=1.0", "train.warmup_steps=10", "train.max_steps=110",
                                      "train.min_lr_ratio=0.1"]).train
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55) and lr_at(110, cfg) == pytest.approx(0.1)


def test_existing_run_needs_resume(tiny_run):
    with pytest.raises(GlimpseError, match="already holds a run"):
        train(load_recipe("shapes-clip", ["data.num_workers=0"]), tiny_run, progress=False)


def test_non_finite_loss_stops_before_the_optimizer_step(world, tmp_path):
    # a huge learning rate blows the weights up after the first update
    recipe = load_recipe("shapes-clip", tiny_overrides(world, **{"train.lr": 1e30, "train.warmup_steps": 1,
                                                                 "train.grad_clip": 0, "train.save_every": 1}))
    with pytest.raises(GlimpseError, match="non-finite (loss|gradient) at step"):
        train(recipe, tmp_path / "run", progress=False)
    # the checkpoints written before the stop hold finite weights: no non-finite update was applied
    from safetensors.torch import load_file

    ckpts = sorted((tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts, "the first step should have been checkpointed"
    assert all(bool(torch.isfinite(t).all()) for t in load_file(str(ckpts[-1] / "model.safetensors")).values())


def _train_cmd(world, out, steps, *extra):
    sets = tiny_overrides(world, **{"train.max_steps": steps, "train.save_every": 4, "train.threads": 1,
                                    "eval.splits": "[test]"})
    cmd = [PY, "-m", "glimpse", "--quiet", "train", "shapes-clip", "--out", str(out)]
    for s in sets:
        cmd += ["--set", s]
    return cmd + list(extra)


def test_resume_after_sigkill_logs_bit_identical_losses(world, tmp_path, cli_env):
    steps = 40
    straight = tmp_path / "straight"
    subprocess.run(_train_cmd(world, straight, steps), env=cli_env, check=True, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(world, killed, steps), env=cli_env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    # kill once a checkpoint exists and the log has moved past it, so the resume must drop records
    while time.time() < deadline and proc.poll() is None:
        log = killed / "metrics.jsonl"
        if (killed / "checkpoints" / "step_0000008").is_dir() and log.exists() and \
                any(json.loads(x).get("step", 0) >= 10 for x in log.read_text().splitlines() if x.strip()):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"

    resumed = subprocess.run(_train_cmd(world, killed, steps, "--resume"), env=cli_env, capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    a = [(r["step"], r["loss"]) for r in records(straight) if "loss" in r]
    b = [(r["step"], r["loss"]) for r in records(killed) if "loss" in r]
    assert a == b and len(a) == steps
    assert json.loads((straight / "eval.json").read_text()) == json.loads((killed / "eval.json").read_text())


def _damaged_world(world, tmp_path, n_bad):
    import shutil

    copy = tmp_path / "world"
    shutil.copytree(world, copy)
    train_images = sorted((copy / "images" / "train").glob("*.png"))
    for i, p in enumerate(train_images[:n_bad]):
        if i % 2:
            p.write_bytes(p.read_bytes()[:60])  # truncated
        else:
            p.write_text("this is not a png")  # not an image
    return copy


def test_bad_training_samples_are_skipped_and_counted(world, tmp_path, capsys):
    copy = _damaged_world(world, tmp_path, 6)
    recipe = load_recipe("shapes-clip", tiny_overrides(copy, **{"train.max_steps": 20, "eval.splits": "[test]"}))
    train(recipe, tmp_path / "run", progress=False)
    final = records(tmp_path / "run")[-1]
    # 20 steps x 16 samples = 2 epochs of 160: each bad image is met twice
    assert sum(final["bad_samples"].values()) == 12
    assert set(final["bad_samples"]) <= {"truncated", "format", "corrupt"}
    assert "skipped bad samples" in capsys.readouterr().out


def test_too_many_bad_samples_in_a_row_stop_the_run(world, tmp_path):
    copy = _damaged_world(world, tmp_path, 160)
    recipe = load_recipe("shapes-clip", tiny_overrides(copy, **{"train.max_consecutive_failures": 5}))
    with pytest.raises(GlimpseError, match="bad samples in a row .*bad image"):
        train(recipe, tmp_path / "run", progress=False)


@pytest.mark.parametrize("fmt", ["csv", "wds"])
def test_training_reads_csv_and_webdataset(world, tmp_path, fmt):
    recipe = load_recipe("shapes-clip", tiny_overrides(world, **{"data.format": fmt, "train.max_steps": 2,
                                                                 "eval.splits": "[test]"}))
    results = train(recipe, tmp_path / "run", progress=False)
    assert "test/t2i_r1" in results


@pytest.mark.parametrize("extra", [
    {"model.loss": "siglip"},
    {"train.precision": "bf16"},
    {"train.grad_accum": 2},
    {"data.num_workers": 1},
])
def test_training_variants_run_and_learn(world, tmp_path, extra):
    recipe = load_recipe("shapes-clip", tiny_overrides(world, **{"train.max_steps": 12, "train.lr": 2e-3,
                                                                 "eval.splits": "[]", **extra}))
    train(recipe, tmp_path / "run", progress=False)
    losses = [r["loss"] for r in records(tmp_path / "run") if "loss" in r]
    assert len(losses) == 12 and all(x == x for x in losses)
    assert sum(losses[-3:]) < sum(losses[:3])  # it learns something


def test_init_parts_and_freeze(tiny_run, world, tmp_path):
    from safetensors.torch import load_file

    from glimpse.runs import run_weights

    run = tmp_path / "run"
    recipe = load_recipe("shapes-clip", tiny_overrides(world, **{"train.max_steps": 3, "eval.splits": "[]"}))
    recipe.init_parts = {"vision": str(tiny_run)}
    recipe.freeze = ["vision"]
    train(recipe, run, progress=False)
    src, out = load_file(str(run_weights(tiny_run))), load_file(str(run_weights(run)))
    vision = [k for k in out if k.startswith("vision.")]
    assert vision and all(torch.equal(out[k], src[k]) for k in vision)  # started from the run, never moved
    assert not torch.equal(out["text_projection.weight"], src["text_projection.weight"])  # the rest trained

    recipe.freeze = ["eyes"]
    with pytest.raises(GlimpseError, match="no part 'eyes'; its parts: vision, text"):
        train(recipe, tmp_path / "other", progress=False)


def test_init_parts_takes_a_named_part_of_a_run(tiny_run, tmp_path):
    """RUN#name: a part filled from another part of a run (a dual encoder's vision tower as a video LLaVA's
    second tower); a name the run lacks is refused by name; a folder whose name holds a '#' is still a run."""
    import copy
    import shutil

    from safetensors.torch import load_file

    from glimpse.runs import load_part, part_source, run_weights

    odd = tmp_path / "exp#2"
    shutil.copytree(tiny_run, odd)
    assert part_source(f"{tiny_run}#vision") == (str(tiny_run), "vision")
    assert part_source(str(tiny_run)) == (str(tiny_run), "")
    assert part_source(str(odd)) == (str(odd), "")  # exists as given: taken whole
    assert part_source(f"{odd}#vision") == (str(odd), "vision")  # the part name follows the last '#'
    assert part_source("pkg:some-package/folder") == ("pkg:some-package/folder", "")

    src = load_file(str(run_weights(tiny_run)))
    holder = torch.nn.Module()
    holder.second_vision = copy.deepcopy(glimpse.load(tiny_run).model.vision)
    for p in holder.second_vision.parameters():
        torch.nn.init.normal_(p.data)
    load_part(holder, "second_vision", run_weights(tiny_run), source="vision")
    tensors = holder.second_vision.state_dict()
    assert tensors and all(torch.equal(v, src["vision." + k]) for k, v in tensors.items())
    with pytest.raises(GlimpseError, match="has no part 'eyes'"):
        load_part(holder, "second_vision", run_weights(tiny_run), source="eyes")


def test_lr_scale_gives_a_part_its_own_learning_rate(world, tiny_run, tmp_path):
    """train.lr_scale: a part fine-tuned at a fraction of the lr (here nearly frozen) while the
    rest trains at the full rate; an unknown part is refused by name."""
    from glimpse import runs as ckpt_mod
    from glimpse.runs import run_weights

    start = ckpt_mod.read_weights(run_weights(tiny_run))
    run = tmp_path / "scaled"
    recipe = load_recipe("shapes-clip", tiny_overrides(world, **{"init": str(tiny_run), "train.max_steps": 3,
                                                                  "train.warmup_steps": 0, "train.lr": 1e-2,
                                                                  "train.lr_scale": "{vision: 1.0e-9}"}))
    train(recipe, run, progress=False)
    end = ckpt_mod.read_weights(run_weights(run))
    moved = {part: max((end[k] - start[k]).abs().max().item() for k in start if k.startswith(part + "."))
             for part in ("vision", "text")}
    assert moved["vision"] < 1e-6 < 1e-3 < moved["text"], moved
    bad = load_recipe("shapes-clip", tiny_overrides(world, **{"train.lr_scale": "{towers: 0.1}"}))
    with pytest.raises(GlimpseError, match="train.lr_scale: the model has no part 'towers'"):
        train(bad, tmp_path / "bad", progress=False)
    with pytest.raises(GlimpseError, match="train.lr_scale"):
        load_recipe("shapes-clip", ["train.lr_scale={vision: -1}"])


KEEP_FREED_PROBE = """
import resource, sys, torch
from glimpse.hardware import keep_freed_cpu_memory

def faults():  # minor page faults of 5 rounds of a fresh 48 MB tensor, filled, then freed
    torch.empty(12 << 20).fill_(1.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        torch.empty(12 << 20).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

fresh = faults()
applied = keep_freed_cpu_memory()
faults(), faults()  # the heap grows to hold the blocks first
print(fresh, faults(), applied)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_keeping_freed_memory_stops_a_large_tensors_pages_being_faulted_in_again():
    # its own process: the setting is process-wide and the "before" needs malloc as it comes
    fresh, kept, applied = subprocess.run([PY, "-c", KEEP_FREED_PROBE], capture_output=True, text=True,
                                          check=True, timeout=120).stdout.split()
    if applied != "True":
        pytest.skip("not glibc")
    assert int(fresh) > 5 * 10_000  # 48 MB is about 12,000 pages a round, mapped afresh each time
    assert int(kept) < int(fresh) // 10  # then the heap's pages are reused
