"""A shapes-clip tower fine-tuned so that each patch token says what it is part of: the hypothesis that the
video LLaVA's binding is limited by a tower whose tokens say their colour (0.98-1.00 by a linear probe) but
their shape only 0.79-0.86 (experiments/video_identity_probe.py, docs/results.md session 28).

Every 8-px patch of every frame of the world's training clips gets two labels from the generator's tracks:
the nearest shape that reaches into the patch (or none), and that shape's colour
in that frame (or none).  Factored heads, one per attribute, so an unseen colour-shape pair (test_novel) is
two seen labels.  The heads read the tokens the video LLaVA reads (`vision_feature_layer` -1: the last
block's output before the post-norm); the tower trains with them, then is written into a copy of the CLIP
run, which a video LLaVA recipe reads through `init_parts`:

    python experiments/dense_tower.py runs/shapes-clip WORLD --out runs/s29/clip-dense [--steps 600] [--where W] [--keep K]
    glimpse train shapes-video-llava --out RUN --set "init_parts={vision: runs/s29/clip-dense}"

Session 29's tower (shape and colour only) lost the motion: its tokens stopped changing as a shape moved within
its cell.  `--where` adds a third head, the shape's offset from the patch's centre, and `--keep` a pull toward
the frozen tower's tokens.

It prints the held-out (val split) accuracy of both heads on the patches holding a shape, before (a linear probe trained
on the frozen tower: the heads alone) and after fine-tuning.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import glimpse
from glimpse.data.shapes import COLOURS, SHAPES
from glimpse.data.shapes_video import _RADIUS, read_clips
from glimpse.data.video import clip_pixels
from glimpse.runs import run_weights


def patch_labels(clip, frames: int, grid: int, patch: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(shape, colour) labels [frames, grid * grid], 0 = none, else 1 + the index in SHAPES / COLOURS, and the
    shape's centre less the patch's centre in patches [frames, grid * grid, 2] (0 where none): where in the
    patch the shape sits, which a token must keep for the motion of 3-5 px a frame to show within a cell.
    A patch takes the nearest visible shape that reaches it: whose centre is within a shape radius plus half a
    patch of the patch's centre."""
    centres = (np.arange(grid) + 0.5) * patch
    cy, cx = np.meshgrid(centres, centres, indexing="ij")
    shape = np.zeros((frames, grid * grid), np.int64)
    colour = np.zeros((frames, grid * grid), np.int64)
    offset = np.zeros((frames, grid * grid, 2), np.float32)
    r = _RADIUS * size + patch / 2
    for t in range(frames):
        best = np.full(grid * grid, np.inf)
        for tr in clip.tracks:
            if not tr["colours"][t]:
                continue
            d = np.hypot(cx - tr["xs"][t], cy - tr["ys"][t]).ravel()
            take = (d <= r) & (d < best)
            best[take] = d[take]
            shape[t, take] = 1 + SHAPES.index(tr["shape"])
            colour[t, take] = 1 + COLOURS.index(tr["colours"][t])
            offset[t, take, 0] = ((tr["xs"][t] - cx).ravel() / patch)[take]
            offset[t, take, 1] = ((tr["ys"][t] - cy).ravel() / patch)[take]
    return shape, colour, offset


def load_split(world: Path, split: str, limit: int, transform, frames: int, grid: int, patch: int, size: int):
    clips = read_clips(world / "annotations" / f"captions_{split}.json", world / "videos" / split)[:limit]
    px, sh, co, off = [], [], [], []
    for c in clips:
        px.append(clip_pixels(c.path, frames, transform))
        s, k, o = patch_labels(c, frames, grid, patch, size)
        sh.append(torch.from_numpy(s))
        co.append(torch.from_numpy(k))
        off.append(torch.from_numpy(o))
    return torch.cat(px), torch.cat(sh), torch.cat(co), torch.cat(off)


def accuracy(tower, heads, data, batch: int = 512) -> tuple[float, float, float, float]:
    """(shape, colour, both) accuracy over the patches that hold a shape, and the offset's mean error in px."""
    px, sh, co, off = data
    hits, errs = [], []
    with torch.no_grad():
        for i in range(0, len(px), batch):
            x = tower.forward_features(px[i:i + batch], layer=-1)
            ps, pc = heads[0](x).argmax(-1), heads[1](x).argmax(-1)
            on = sh[i:i + batch] > 0
            hits.append(torch.stack([(ps == sh[i:i + batch])[on], (pc == co[i:i + batch])[on]], 1))
            errs.append((heads[2](x) - off[i:i + batch])[on].norm(dim=-1))
    h = torch.cat(hits).float()
    return h[:, 0].mean().item(), h[:, 1].mean().item(), h.prod(1).mean().item(), torch.cat(errs).mean().item()


def train(tower, heads, data, steps: int, lr: float, batch: int, background: float, train_tower: bool,
          where: float = 0.0, keep: float = 0.0):
    """The heads' losses, plus `where` x the offset's smooth-L1 on patches with a shape, plus `keep` x the
    tokens' squared distance from the frozen tower's (over their variance): a pull back toward what the
    CLIP tower said, which held the motion the session-29 tower lost."""
    px, sh, co, off = data
    params = list(heads.parameters()) + (list(tower.parameters()) if train_tower else [])
    tower.requires_grad_(train_tower)
    frozen = None
    if keep > 0:
        frozen = copy.deepcopy(tower).eval().requires_grad_(False)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    weight_s = torch.ones(len(SHAPES) + 1)
    weight_c = torch.ones(len(COLOURS) + 1)
    weight_s[0] = weight_c[0] = background  # most patches are background
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        for group in opt.param_groups:  # linear warm-up over 5%, cosine to zero
            w = min(1.0, (step + 1) / max(1, steps // 20))
            group["lr"] = lr * w * 0.5 * (1 + np.cos(np.pi * step / steps))
        idx = torch.randint(0, len(px), (batch,), generator=g)
        x = tower.forward_features(px[idx], layer=-1)
        losses = [F.cross_entropy(heads[0](x).flatten(0, 1), sh[idx].flatten(), weight_s),
                  F.cross_entropy(heads[1](x).flatten(0, 1), co[idx].flatten(), weight_c)]
        if where > 0:
            on = sh[idx] > 0
            losses.append(where * F.smooth_l1_loss(heads[2](x)[on], off[idx][on], beta=0.1))
        if frozen is not None:
            with torch.no_grad():
                x0 = frozen.forward_features(px[idx], layer=-1)
            losses.append(keep * (x - x0).pow(2).mean() / x0.var())
        loss = sum(losses)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"  step {step:5d}  loss {loss.item():.4f}  (" + " ".join(f"{v.item():.3f}" for v in losses) + ")",
                  flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("clip_run")
    ap.add_argument("world")
    ap.add_argument("--out", required=True)
    ap.add_argument("--clips", type=int, default=4000, help="training clips read (their every frame)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--batch", type=int, default=128, help="frames a step")
    ap.add_argument("--background", type=float, default=0.2, help="the loss weight of patches with no shape")
    ap.add_argument("--where", type=float, default=0.0, help="weight of the offset-in-patch loss (0: none)")
    ap.add_argument("--keep", type=float, default=0.0, help="weight of the pull toward the frozen tower's tokens")
    a = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.time()
    pipe = glimpse.load(a.clip_run)
    tower, transform = pipe.model.vision, pipe.transform
    vc = pipe.model.cfg.vision
    grid, frames, world = vc.image_size // vc.patch_size, 8, Path(a.world)
    geometry = (frames, grid, vc.patch_size, vc.image_size)
    data = load_split(world, "train", a.clips, transform, *geometry)
    val = load_split(world, "val", 10_000, transform, *geometry)
    print(f"{len(data[0])} training frames, {len(val[0])} val frames ({time.time() - t0:.0f} s); "
          f"{(data[1] > 0).float().mean():.3f} of patches hold a shape")
    heads = torch.nn.ModuleList([torch.nn.Linear(vc.width, len(SHAPES) + 1),
                                 torch.nn.Linear(vc.width, len(COLOURS) + 1), torch.nn.Linear(vc.width, 2)])
    tower.train()
    print("heads alone on the frozen tower (a linear probe):")
    train(tower, heads, data, max(200, a.steps // 3), 3e-3, a.batch, a.background, train_tower=False, where=1.0)
    before = accuracy(tower.eval(), heads, val)
    report = "shape {:.3f}  colour {:.3f}  both {:.3f}"
    print("val, frozen tower: " + report.format(*before[:3]) + f"  offset error {before[3] * vc.patch_size:.2f} px")
    print("the tower with the heads:")
    train(tower.train(), heads, data, a.steps, a.lr, a.batch, a.background, train_tower=True, where=a.where, keep=a.keep)
    after = accuracy(tower.eval(), heads, val)
    # without --where the offset head is still the probe's, which says nothing of the tuned tower
    where = f"  offset error {after[3] * vc.patch_size:.2f} px" if a.where > 0 else ""
    print("val, tuned tower:  " + report.format(*after[:3]) + where)

    # the CLIP run, copied, its tower's weights replaced (the text tower and the rest as they were)
    src, out = Path(a.clip_run), Path(a.out)
    weights = run_weights(src)
    if out.exists():
        shutil.rmtree(out)
    ckpt = out / weights.parent.relative_to(src)
    ckpt.mkdir(parents=True)
    for name in ("recipe.yaml", "tokenizer.json", "preprocess.json"):
        shutil.copyfile(src / name, out / name)
    if (weights.parent / "state.json").is_file():
        shutil.copyfile(weights.parent / "state.json", ckpt / "state.json")
    state = load_file(weights)
    tuned = {f"vision.{k}": v.detach().contiguous() for k, v in tower.state_dict().items()}
    assert set(tuned) <= set(state), "the tower's weights must replace the run's own"
    save_file({**state, **tuned}, ckpt / weights.name)
    print(f"wrote {out} ({time.time() - t0:.0f} s in all)")


if __name__ == "__main__":
    main()
