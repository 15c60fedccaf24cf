"""`glimpse demo captioner`: the encoder-decoder captioner at demo size, with its captions of test images."""

from __future__ import annotations

import time
from pathlib import Path

from glimpse.config import load_recipe
from glimpse.demo import _machine_rate


def run_captioner_demo(out: str | Path = "runs/demo-captioner", progress: bool = True,
                       overrides: list[str] | None = None) -> dict:
    """`glimpse demo captioner`: the encoder-decoder captioner (ViT + GPT-2 with cross-attention) trained
    from scratch on the shapes world at demo size (`shapes-captioner-demo`), its caption figures, and its
    captions of a few test images beside the world's own.  Kept out of `glimpse demo`, whose time it
    would double."""
    from glimpse.api import load
    from glimpse.data.formats import read_coco_captions
    from glimpse.train.trainer import data_root, train

    t0 = time.time()
    out = Path(out)
    gflops = _machine_rate()
    recipe = load_recipe("shapes-captioner-demo", overrides or [])
    root = data_root(recipe, progress)
    results = train(recipe, out, progress=progress)
    print(f"\ntrained the captioner in {out} ({time.time() - t0:.0f} s)")
    for k in ("test/cider", "test/scene_exact", "test/shuffled_cider", "test_novel/cider", "test_novel/scene_exact"):
        if k in results:
            print(f"  {k:<24} {results[k]:.3f}")
    items = read_coco_captions(root / "annotations" / "captions_test.json", root / "images" / "test")[:6]
    captions = load(out).caption([it.image for it in items])
    print("\ncaptions of test images (the world's own in brackets):")
    for it, c in zip(items, captions):
        print(f"  {Path(it.image).name}: {c!r}  ({it.captions[0]!r})")
    elapsed = time.time() - t0
    print(f"\n{elapsed:.0f} s in all, on a machine whose fp32 matmul runs at {gflops:.0f} GFLOP/s")
    return {"results": results, "seconds": elapsed, "matmul_gflops": gflops}
