"""DDP on 2 CPU processes (gloo): contrastive losses gather negatives across processes."""

import json
import math
import subprocess

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import PY, tiny_overrides

from glimpse.losses import clip_loss, siglip_loss


def _worker(rank, world, store, results):
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(8, 6), dim=-1), F.normalize(torch.randn(8, 6), dim=-1)
    neg = F.normalize(torch.randn(8, 6), dim=-1)  # hard negative texts, split over the processes as the rest
    scale, bias = torch.tensor(7.0), torch.tensor(-3.0)
    losses = {"clip": lambda i, t, n: clip_loss(i, t, scale), "siglip": lambda i, t, n: siglip_loss(i, t, scale, bias),
              "clip+negatives": lambda i, t, n: clip_loss(i, t, scale, n),
              "siglip+negatives": lambda i, t, n: siglip_loss(i, t, scale, bias, n)}
    # the single-process reference on the whole global batch, before joining the group
    refs = {}
    for name, fn in losses.items():
        ref_i, ref_t = img.clone().requires_grad_(), txt.clone().requires_grad_()
        loss = fn(ref_i, ref_t, neg)
        loss.backward()
        refs[name] = (loss.item(), ref_i.grad, ref_t.grad)
    # a file store: the processes meet through a file, so no port can be taken in between
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    out = {}
    for split in ((0, 4, 8), (0, 5, 8)):  # equal shares, and unequal ones (a process dropped bad samples)
        rows = slice(split[rank], split[rank + 1])
        for name, fn in losses.items():
            ref, ref_gi, ref_gt = refs[name]
            loc_i, loc_t = img[rows].clone().requires_grad_(), txt[rows].clone().requires_grad_()
            local = fn(loc_i, loc_t, neg[rows])  # this process's rows against the whole global batch
            local.backward()
            mean = local.detach().clone()
            dist.all_reduce(mean)
            # each process's rows collect world x the gradient of the global mean loss (DDP then divides)
            grads_ok = torch.allclose(loc_i.grad, world * ref_gi[rows], atol=1e-6) and \
                torch.allclose(loc_t.grad, world * ref_gt[rows], atol=1e-6)
            out[(name, split[1])] = (ref, (mean / world).item(), grads_ok)
    results[rank] = out
    dist.destroy_process_group()


def test_gathered_losses_and_gradients_equal_the_single_process_ones(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(2, tmp_path / "store", results), nprocs=2, join=True)
    for rank in range(2):
        for key, (ref, mean, grads_ok) in results[rank].items():
            assert abs(ref - mean) < 1e-5, (key, ref, mean)
            assert grads_ok, key


def test_torchrun_two_processes_train_like_one(world, tmp_path, cli_env):
    sets = tiny_overrides(world, **{"train.max_steps": 3, "train.save_every": 3, "eval.splits": "[]",
                                    "train.threads": 1})
    args = ["--quiet", "train", "shapes-clip"] + [x for s in sets for x in ("--set", s)]
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([PY, "-m", "glimpse", *args, "--out", str(one)], env=cli_env, check=True, capture_output=True)
    env = dict(cli_env, OMP_NUM_THREADS="1")
    # --standalone: torchrun's own store binds a free port and keeps it
    r = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "glimpse", *args, "--out", str(two)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]

    def losses(run):
        return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]

    a, b = losses(one), losses(two)
    assert len(a) == len(b) == 3
    # the same global batch, the same weights: equal up to float summation order
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-4, atol=1e-5)


def test_torchrun_two_processes_read_a_stream_and_save_its_position(world, tmp_path, cli_env):
    """data.stream under DDP: each process reads its own shards; the checkpoint records the position."""
    import io
    import shutil
    import tarfile

    from glimpse.data.formats import iter_webdataset

    root = tmp_path / "data"
    (root / "shards").mkdir(parents=True)
    shutil.copy(world / "tokenizer.json", root / "tokenizer.json")
    samples = list(iter_webdataset(world / "shards" / "train-000000.tar"))
    for s in range(4):
        with tarfile.open(root / "shards" / f"train-{s}.tar", "w") as tar:
            for it in samples[s * 40:(s + 1) * 40]:
                for ext, data in (("png", it.image), ("txt", it.captions[0].encode())):
                    info = tarfile.TarInfo(f"{it.image_id}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    sets = tiny_overrides(world, **{"data.source": "wds", "data.root": str(root), "data.stream": "true",
                                    "data.files": "{train: 'shards/train-*.tar'}", "train.max_steps": 3,
                                    "train.save_every": 3, "eval.splits": "[]", "train.threads": 1})
    args = ["--quiet", "train", "shapes-clip"] + [x for s in sets for x in ("--set", s)]
    run = tmp_path / "two"
    r = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "glimpse", *args, "--out", str(run)], env=dict(cli_env, OMP_NUM_THREADS="1"),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    state = json.loads((run / "checkpoints" / "step_0000003" / "state.json").read_text())
    assert state["stream"]["processes"] == 2 and state["stream"]["batches"] == 3 and state["stream"]["batch_size"] == 8
