"""`glimpse demo`: the main job end to end on the embedded shapes world.

Generates the world (cached), trains the demo dual encoder, evaluates it, runs example
searches and zero-shot classifications, prints a short summary and writes a
self-contained report.html (every image inlined) next to the run.
"""

from __future__ import annotations

import base64
import html
import io
import json
import shutil
import time
from pathlib import Path

from glimpse.config import load_recipe
from glimpse.errors import GlimpseError

MARKER = "demo.json"
# example queries: a caption of these images (split, index in the split's COCO file)
QUERIES = [("test", 0), ("test", 1), ("test", 2), ("test", 3), ("test_novel", 0), ("test_novel", 1)]


def _prepare_out(out: Path) -> None:
    """The demo owns its folder: it may replace an earlier demo's, never anything else."""
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise GlimpseError(f"{out} exists and is not a glimpse demo folder; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _img_tag(path, size: int = 96, title: str = "", cls: str = "") -> str:
    from PIL import Image

    from glimpse.data.images import load_image

    buf = io.BytesIO()
    load_image(path).resize((size, size), Image.NEAREST).save(buf, "PNG")
    data = base64.b64encode(buf.getvalue()).decode()
    return (f'<img class="{cls}" src="data:image/png;base64,{data}" width="{size}" height="{size}" '
            f'title="{html.escape(title)}">')


def run_demo(out: str | Path = "runs/demo", progress: bool = True, overrides: list[str] | None = None) -> dict:
    from glimpse.data.formats import read_coco_captions, read_labels
    from glimpse.infer.index import ImageIndex, build_index
    from glimpse.train.trainer import data_root, train

    t0 = time.time()
    out = Path(out)
    _prepare_out(out)
    (out / MARKER).write_text(json.dumps({"started": t0}))

    recipe = load_recipe("shapes-clip-demo", overrides)
    root = data_root(recipe, progress)
    print(f"[1/3] shapes world ready at {root} ({time.time() - t0:.0f} s)")
    run = out / "clip"
    results = train(recipe, run, progress=progress)
    print(f"[2/3] trained the dual encoder in {run} ({time.time() - t0:.0f} s)")

    build_index(run, [root / "images" / "test", root / "images" / "test_novel"], out / "index", progress=False)
    index = ImageIndex(out / "index")
    searches = []
    for split, i in QUERIES:
        item = read_coco_captions(root / "annotations" / f"captions_{split}.json", root / "images" / split)[i]
        query = item.captions[0]
        searches.append((query, split, str(Path(item.image).resolve()), index.search_text(query, 5)))
    paths, labels, classes = read_labels(root / "labels" / "test.csv", root)
    shown = list(range(0, len(paths), max(1, len(paths) // 8)))[:8]
    preds = index.pipe.classify([paths[i] for i in shown], classes)
    zeroshot = [(paths[i], classes[labels[i]], p) for i, p in zip(shown, preds)]
    print(f"[3/3] evaluated ({time.time() - t0:.0f} s)\n")

    keys = ["test/t2i_r1", "test/t2i_r5", "test/i2t_r1", "test/zeroshot_acc",
            "test_novel/t2i_r1", "test_novel/i2t_r1", "test_novel/zeroshot_acc"]
    print("dual encoder (shapes-clip-demo)")
    for k in keys:
        if k in results:
            print(f"  {k:<24} {results[k]:.3f}")
    print("\nexample searches over the test and test_novel images (top 3; * = the image the caption describes):")
    for q, _, truth, hits in searches:
        print(f"  {q!r}")
        for path, score in hits[:3]:
            print(f"    {'*' if path == truth else ' '} {score:.3f}  {Path(path).name}")
    elapsed = time.time() - t0
    report = out / "report.html"
    report.write_text(render_report(results, keys, run / "loss.png", searches, zeroshot, elapsed))
    summary = {"results": results, "seconds": elapsed, "report": str(report)}
    (out / MARKER).write_text(json.dumps(summary, indent=2))
    print(f"\nreport: {report}   ({elapsed:.0f} s in all)")
    return summary


def render_report(results, keys, loss_png, searches, zeroshot, elapsed) -> str:
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{results[k]:.3f}</td></tr>" for k in keys if k in results)
    loss = base64.b64encode(Path(loss_png).read_bytes()).decode() if Path(loss_png).is_file() else ""
    search_html = "".join(
        f"<div class='q'><div class='qt'>“{html.escape(q)}”{' <em>(holds a novel combination)</em>' if split == 'test_novel' else ''}"
        "</div>" + "".join(f"<figure>{_img_tag(p, title=p, cls='ok' if p == truth else '')}<figcaption>{s:.3f}"
                           "</figcaption></figure>" for p, s in hits)
        + "</div>" for q, split, truth, hits in searches)
    zs_html = "".join(
        f"<figure>{_img_tag(p, cls='ok' if truth == pred else 'bad')}<figcaption>{html.escape(pred)}"
        f"{'' if truth == pred else ' (truth: ' + html.escape(truth) + ')'}</figcaption></figure>"
        for p, truth, pred in zeroshot)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>glimpse demo report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 980px; color: #222; }}
table {{ border-collapse: collapse; }} td {{ padding: 3px 14px; border-bottom: 1px solid #ddd; }}
td:last-child {{ text-align: right; font-variant-numeric: tabular-nums; }}
figure {{ display: inline-block; margin: 4px; text-align: center; font-size: 12px; }}
img {{ image-rendering: pixelated; border: 2px solid #ccc; }} img.ok {{ border-color: #3a3; }} img.bad {{ border-color: #c33; }}
.q {{ margin: 10px 0; }} .qt {{ font-weight: 600; margin-bottom: 2px; }}
</style></head><body>
<h1>glimpse demo</h1>
<p>A CLIP-style dual encoder trained from scratch on the procedural shapes world
(recipe <code>shapes-clip-demo</code>), end to end in {elapsed:.0f} s.
<code>test_novel</code> holds colour–shape combinations never seen in training.</p>
<h2>Figures</h2><table>{rows}</table>
<h2>Training</h2><img src="data:image/png;base64,{loss}" style="border:none">
<h2>Text → image search over the test and test_novel images (top 5, cosine score; green: the image the caption was written for)</h2>{search_html}
<h2>Zero-shot classification (green: right, red: wrong)</h2>{zs_html}
</body></html>
"""
