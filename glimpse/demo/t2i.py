"""`glimpse demo t2i`: text-to-image at demo size on a 32-px world, with a report of prompts and their images
marked by the scene parser."""

from __future__ import annotations

import html
import time
from pathlib import Path

from glimpse.config import load_recipe
from glimpse.demo import _finish, _img_tag, _start, same_world

T2I_PROMPTS = 6  # prompts per split in the text-to-image demo's grid
T2I_SAMPLES = 4  # images per prompt
# The text-to-image demo's world is drawn at 32 px: a quarter of the pixels, so its tokenizer (f = 4, still
# 8 x 8 codes) trains four times the steps in the same time; at 64 px, 300 steps drew blobs (docs/results.md,
# 2026-11-27, session 14).  The scene parser reads 32-px images as exactly as 64-px ones.
T2I_DEMO_WORLD = ["data.image_size=32", "model.vision.image_size=32", "model.vision.patch_size=8"]
# the dual encoder here only reads prompts for the prior and re-ranks: fewer steps, and its own retrieval
# figures (not shown by this demo) are not computed
T2I_DEMO_CLIP = T2I_DEMO_WORLD + ["train.max_steps=260", "eval.splits=[]", "eval.during_train=[]"]


def run_t2i_demo(out: str | Path = "runs/demo-t2i", progress: bool = True, overrides: list[str] | None = None) -> dict:
    """`glimpse demo t2i`: text-to-image at demo size, on a 32-px world: the demo dual encoder
    (shapes-clip-demo), an image tokenizer (shapes-vq-demo) and a MaskGIT prior reading the CLIP's text
    states (shapes-t2i-demo), each trained from scratch; a report with a grid of test and test_novel prompts and their images,
    each marked by the world's scene parser (green: the scene exactly as asked)."""
    from glimpse.api import load
    from glimpse.data.scene_parser import parse_scene
    from glimpse.data.shapes import scene_key
    from glimpse.data.world import read_scenes
    from glimpse.train.trainer import data_root, train

    t0, out, gflops = _start(out)
    sets: dict[str, list[str]] = {"clip": [], "vq": [], "t2i": []}
    for item in overrides or []:  # --set vq.KEY=V, t2i.KEY=V; plain KEY=V goes to the dual encoder
        head, _, rest = item.partition(".")
        sets[head if head in ("vq", "t2i") and rest else "clip"].append(rest if head in ("vq", "t2i") else item)
    clip_recipe = load_recipe("shapes-clip-demo", T2I_DEMO_CLIP + sets["clip"])
    root = data_root(clip_recipe, progress)
    train(clip_recipe, out / "clip", progress=progress)
    print(f"[1/3] trained the dual encoder ({time.time() - t0:.0f} s)")
    vq_recipe = load_recipe("shapes-vq-demo", sets["vq"])
    vq_recipe.data = same_world(vq_recipe.data, clip_recipe.data)
    vq_results = train(vq_recipe, out / "vq", progress=progress)
    print(f"[2/3] trained the image tokenizer ({time.time() - t0:.0f} s)")
    t2i_recipe = load_recipe("shapes-t2i-demo", sets["t2i"])
    t2i_recipe.data = same_world(t2i_recipe.data, clip_recipe.data)
    t2i_recipe.init_parts = {"clip": str(out / "clip"), "vq": str(out / "vq")}
    t2i_recipe.model.clip, t2i_recipe.model.vq = clip_recipe.model, vq_recipe.model.vq  # the parts as trained
    results = train(t2i_recipe, out / "t2i", progress=progress)
    print(f"[3/3] trained the prior and evaluated ({time.time() - t0:.0f} s)\n")

    pipe = load(out / "t2i")
    grid = []
    for split in ("test", "test_novel"):
        scenes = read_scenes(root, split)[:T2I_PROMPTS]
        arrays = pipe.generate_arrays([s.captions[0] for s in scenes], T2I_SAMPLES, seed=0)
        for s, row in zip(scenes, arrays):
            marks = [(a, parse_scene(a)) for a in row]
            grid.append((split, s, [(a, not p.extra and p.key == scene_key(s.scene)) for a, p in marks]))
    keys = [f"{split}/{k}" for split in ("test", "test_novel") for k in ("exact_1", "exact_rerank", "clip_rprec_1")]
    print("tokenizer (shapes-vq-demo): " + "  ".join(f"{k} {vq_results[k]:.3f}" for k in
                                                      ("test/recon_exact", "test/codebook_usage") if k in vq_results))
    print("text to image (shapes-t2i-demo):")
    for k in keys:
        if k in results:
            print(f"  {k:<26} {results[k]:.3f}")
    elapsed = time.time() - t0
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{r[k]:.3f}</td></tr>" for r, ks in
                   ((vq_results, ("test/recon_exact", "test_novel/recon_exact", "test/codebook_usage")), (results, keys))
                   for k in ks if k in r)
    grid_html = "".join(
        f"<div class='q'><div class='qt'>“{html.escape(s.captions[0])}”"
        f"{' <em>(a novel combination)</em>' if split == 'test_novel' else ''}</div>"
        + _img_tag(s.path, title="the world's image", cls="real")
        + "".join(_img_tag(a, cls="ok" if ok else "bad") for a, ok in row) + "</div>" for split, s, row in grid)
    px = vq_recipe.model.vq.sample_size
    codes = px // vq_recipe.model.vq.downsample
    groups = vq_recipe.model.vq.codebook_groups
    layout = f"{codes} x {codes}" + (f" x {groups}" if groups > 1 else "")
    report = out / "report.html"
    report.write_text(f"""<!doctype html>
<html><head><meta charset="utf-8"><title>glimpse text-to-image demo</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 980px; color: #222; }}
table {{ border-collapse: collapse; }} td {{ padding: 3px 14px; border-bottom: 1px solid #ddd; }}
img {{ image-rendering: pixelated; border: 3px solid #ccc; margin: 3px; }} img.ok {{ border-color: #3a3; }}
img.bad {{ border-color: #c33; }} img.real {{ border-color: #888; margin-right: 16px; }} .q {{ margin: 12px 0; }}
.qt {{ font-weight: 600; }}
</style></head><body>
<h1>glimpse text-to-image demo</h1>
<p>A VQ-VAE tokenizer ({px} px to {layout} codes) and a MaskGIT prior reading a CLIP text tower, all trained from
scratch on the shapes world in {elapsed:.0f} s on a machine whose fp32 matmul runs at {gflops:.0f} GFLOP/s.
Each row: the world's own image for the caption (grey), then {T2I_SAMPLES} generated images, green where the
scene parser reads back exactly the scene asked for, red otherwise.  <code>test_novel</code> prompts hold a
colour-shape combination never seen in training.</p>
<table>{rows}</table>
<h2>Prompts and their images</h2>{grid_html}
</body></html>
""")
    summary = _finish(out, report, elapsed, gflops, results=results, vq_results=vq_results)
    print(f'generate more: glimpse generate {out / "t2i"} "a large red circle on the left" --n 4')
    return summary
