"""`glimpse demo`: the main job end to end on the embedded shapes world.

Generates the world (cached), trains the demo dual encoder (recipe shapes-clip-demo), evaluates
it and runs example searches and zero-shot classifications; then trains a small LLaVA on its
vision tower (recipes shapes-lm-demo, shapes-llava-stage1-demo, shapes-llava-stage2-demo), scores
it and asks it questions; prints a short summary with the machine's matmul rate and writes a
self-contained report.html (every image inlined) next to the runs.
"""

from __future__ import annotations

import base64
import html
import io
import json
import shutil
import time
from pathlib import Path

import torch

from glimpse.config import load_recipe
from glimpse.errors import GlimpseError
from glimpse.hardware import matmul_gflops

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


def _start(out) -> tuple[float, Path, float]:
    """(start time, the demo's folder made ready, the machine's matmul rate, printed: times hold only for
    the machine they were measured on)."""
    t0 = time.time()
    out = Path(out)
    _prepare_out(out)
    (out / MARKER).write_text(json.dumps({"started": t0}))
    return t0, out, _machine_rate()


def _machine_rate() -> float:
    """The machine's fp32 matmul rate, measured and printed: every demo's times hold only for it."""
    gflops = matmul_gflops()
    print(f"this machine: fp32 matmul {gflops:.0f} GFLOP/s (2048 x 2048, best of 3), {torch.get_num_threads()} threads")
    return gflops


def _finish(out: Path, report: Path, elapsed: float, gflops: float, **results) -> dict:
    """The demo's summary (its figures, time and the machine's rate) written as its marker, and the report's
    place printed: the end every demo shares."""
    summary = {**results, "seconds": elapsed, "matmul_gflops": gflops, "report": str(report)}
    (out / MARKER).write_text(json.dumps(summary, indent=2))
    print(f"\nreport: {report}   ({elapsed:.0f} s in all, on a machine whose fp32 matmul runs at {gflops:.0f} GFLOP/s)")
    return summary


def _img_tag(image, size: int = 96, title: str = "", cls: str = "") -> str:
    """An inline <img> of an image file (a path) or of uint8 pixels [H, W, 3] (a generated image)."""
    import numpy as np
    from PIL import Image

    from glimpse.data.images import load_image

    buf = io.BytesIO()
    picture = Image.fromarray(image) if isinstance(image, np.ndarray) else load_image(image)
    picture.resize((size, size), Image.NEAREST).save(buf, "PNG")
    data = base64.b64encode(buf.getvalue()).decode()
    return (f'<img class="{cls}" src="data:image/png;base64,{data}" width="{size}" height="{size}" '
            f'title="{html.escape(title)}">')


# The LLaVA part: LM pretraining, stage 1, stage 2, each a recipe of configs/ (the *-demo ones, where
# their settings and the reasons for them are), trained into the run folder named here.
STAGES = {"lm": ("shapes-lm-demo", "shapes-lm"), "stage1": ("shapes-llava-stage1-demo", "shapes-llava-stage1"),
          "stage2": ("shapes-llava-stage2-demo", "shapes-llava-stage2")}
N_ASKED = 6  # test images the demo asks its LLaVA about (each image's first VQA question)


def _split_overrides(overrides: list[str]) -> dict[str, list[str]]:
    """`--set KEY=V` goes to the dual encoder; `--set lm.KEY=V`, `stage1.KEY=V`, `stage2.KEY=V` to the LLaVA part."""
    out: dict[str, list[str]] = {"clip": [], **{k: [] for k in STAGES}}
    for item in overrides:
        head, _, rest = item.partition(".")
        out[head if head in STAGES and rest else "clip"].append(rest if head in STAGES else item)
    return out


def same_world(data, world):
    """A stage's data section on the world `world` (a DataConfig) describes: the world's generator
    settings and pixel statistics, the stage's own reading of it (format, vqa_mix, lm_text, workers)."""
    import dataclasses

    return dataclasses.replace(world, format=data.format, vqa_mix=data.vqa_mix, lm_text=data.lm_text,
                               num_workers=data.num_workers)


def train_llava(world, vision, tower_run: Path, out: Path, overrides: dict[str, list[str]], progress: bool,
                lm_run: Path | None = None) -> Path:
    """LM pretraining (unless `lm_run` gives the LM) -> LLaVA stage 1 (projector) -> stage 2 (projector
    + LM), each its recipe trained into `out`.  The stages share what the demo wires: the world (`world`,
    the dual encoder's data section), the dual encoder's vision tower (config `vision`, weights from
    `tower_run`) and the LM stage's language model."""
    import dataclasses

    from glimpse.train.trainer import train

    runs = {"lm": lm_run}
    lm_cfg = None if lm_run is None else load_recipe(str(Path(lm_run) / "recipe.yaml"), []).model
    for stage, (recipe_name, folder) in STAGES.items():
        if stage == "lm" and lm_run is not None:
            continue
        recipe = load_recipe(recipe_name, overrides.get(stage, []))
        recipe.data = same_world(recipe.data, world)
        if stage == "lm":
            lm_cfg = recipe.model
        else:
            recipe.model.vision = dataclasses.replace(vision)
            recipe.model.lm = dataclasses.replace(lm_cfg, vocab_size=0, context_length=recipe.model.lm.context_length)
            if stage == "stage1":
                recipe.init_parts = {"vision": str(tower_run), "lm": str(runs["lm"])}
            else:
                recipe.init = str(runs["stage1"])
        runs[stage] = out / folder
        train(recipe, runs[stage], progress=progress)
    return runs["stage2"]


def run_demo(out: str | Path = "runs/demo", progress: bool = True, overrides: list[str] | None = None) -> dict:
    from glimpse.data.formats import read_coco_captions, read_labels
    from glimpse.index import ImageIndex, build_index
    from glimpse.train.trainer import data_root, train

    t0, out, gflops = _start(out)

    sets = _split_overrides(overrides or [])
    recipe = load_recipe("shapes-clip-demo", sets["clip"])
    root = data_root(recipe, progress)
    print(f"[1/4] shapes world ready at {root} ({time.time() - t0:.0f} s)")
    run = out / "clip"
    results = train(recipe, run, progress=progress)
    print(f"[2/4] trained the dual encoder in {run} ({time.time() - t0:.0f} s)")
    llava_run = train_llava(recipe.data, recipe.model.vision, run, out, sets, progress)
    print(f"[3/4] trained LLaVA (LM pretraining, stage 1, stage 2) in {llava_run.parent} ({time.time() - t0:.0f} s)")

    build_index(run, [root / "images" / "test", root / "images" / "test_novel"], out / "index", progress=False)
    index = ImageIndex(out / "index")
    searches = []
    for split, i in QUERIES:
        item = read_coco_captions(root / "annotations" / f"captions_{split}.json", root / "images" / split)[i]
        query = item.captions[0]
        hits = index.search_text(query, 5)
        searches.append((query, split, str(Path(item.image).resolve()), hits, _heatmap(index.pipe, hits[0][0], text=query)))
    paths, labels, classes = read_labels(root / "labels" / "test.csv", root)
    shown = list(range(0, len(paths), max(1, len(paths) // 8)))[:8]
    preds = index.pipe.classify([paths[i] for i in shown], classes)
    zeroshot = [(paths[i], classes[labels[i]], p) for i, p in zip(shown, preds)]
    llava_results = json.loads((llava_run / "eval.json").read_text())
    answers = _ask_llava(llava_run, recipe.data, root)
    print(f"[4/4] evaluated ({time.time() - t0:.0f} s)\n")

    keys = ["test/t2i_r1", "test/t2i_r5", "test/i2t_r1", "test/zeroshot_acc",
            "test_novel/t2i_r1", "test_novel/i2t_r1", "test_novel/zeroshot_acc"]
    print("dual encoder (shapes-clip-demo)")
    for k in keys:
        if k in results:
            print(f"  {k:<24} {results[k]:.3f}")
    print("\nexample searches over the test and test_novel images (top 3; * = the image the caption describes):")
    for q, _, truth, hits, _ in searches:
        print(f"  {q!r}")
        for path, score in hits[:3]:
            print(f"    {'*' if path == truth else ' '} {score:.3f}  {Path(path).name}")
    print("\nLLaVA (shapes-llava-stage2 at demo size)")
    for k in ("test/vqa_acc", "test/cider", "test/bleu_4"):
        if k in llava_results:
            print(f"  {k:<24} {llava_results[k]:.3f}")
    print("\nanswers about test images:")
    for path, q, a, truth, _ in answers:
        print(f"  {Path(path).name}: {q!r} -> {a!r}  (annotators: {truth!r})")
    elapsed = time.time() - t0
    report = out / "report.html"
    report.write_text(render_report(results, keys, run / "loss.png", searches, zeroshot, elapsed, gflops,
                                    llava_results, answers, llava_run / "loss.png"))
    summary = _finish(out, report, elapsed, gflops, results=results, llava_results=llava_results)
    print(f"chat with it in a browser or through the OpenAI API: glimpse serve {llava_run}")
    return summary


def _ask_llava(run: Path, data_cfg, root: Path) -> list[tuple]:
    """(image, question, answer, the annotators' answer, where it looked) for the first test images' first
    questions."""
    from glimpse.api import load
    from glimpse.data.conversations import vqa_items

    m = load(run)
    picked, seen = [], set()
    for item in vqa_items(data_cfg, root, "test"):
        if item["image"] not in seen and len(picked) < N_ASKED:
            seen.add(item["image"])
            picked.append(item)
    replies = m.ask([it["image"] for it in picked], [it["question"] for it in picked], max_new_tokens=32)
    return [(it["image"], it["question"], a, it["answer"], _heatmap(m, it["image"], question=it["question"], answer=a))
            for it, a in zip(picked, replies)]


def _heatmap(pipe, image, text: str | None = None, question: str | None = None, answer: str | None = None,
             size: int = 128):
    """Where the model looked (glimpse.explain, Chefer's relevance) as pixels [size, size, 3] over the image,
    or None when there is nothing to explain (an empty answer)."""
    import numpy as np

    from glimpse.data.images import load_image
    from glimpse.explain import explain
    from glimpse.explain.render import overlay

    try:
        explainer = (pipe.explainer(image, text) if text is not None
                     else pipe.explainer(image, question=question, answer=answer, short=False))
    except GlimpseError:
        return None
    return np.asarray(overlay(load_image(image), explain(explainer, "chefer").grid, size))


def _loss_img(path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode() if Path(path).is_file() else ""
    return f'<img src="data:image/png;base64,{data}" style="border:none">'


def render_report(results, keys, loss_png, searches, zeroshot, elapsed, gflops, llava_results, answers,
                  llava_loss) -> str:
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{results[k]:.3f}</td></tr>" for k in keys if k in results)
    llava_rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.3f}</td></tr>" for k, v in llava_results.items()
                         if k in ("test/vqa_acc", "test/vqa_acc_yes_no", "test/vqa_acc_other", "test/cider", "test/bleu_4"))
    def looked(heat, what: str) -> str:
        return "" if heat is None else f"<figure>{_img_tag(heat, size=128, title=what)}<figcaption>where it looked</figcaption></figure>"

    qa_html = "".join(f"<div class='pair'><figure>{_img_tag(p, size=128)}<figcaption><b>{html.escape(q)}</b><br>{html.escape(a)}"
                      f"<br><small>annotators: {html.escape(t)}</small></figcaption></figure>{looked(h, a)}</div>"
                      for p, q, a, t, h in answers)
    search_html = "".join(
        f"<div class='q'><div class='qt'>“{html.escape(q)}”{' <em>(holds a novel combination)</em>' if split == 'test_novel' else ''}"
        "</div>" + "".join(f"<figure>{_img_tag(p, title=p, cls='ok' if p == truth else '')}<figcaption>{s:.3f}"
                           "</figcaption></figure>" for p, s in hits) + looked(heat, "the top image")
        + "</div>" for q, split, truth, hits, heat in searches)
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
.q {{ margin: 10px 0; }} .qa figure {{ width: 150px; vertical-align: top; }} .pair {{ display: inline-block; }} .qt {{ font-weight: 600; margin-bottom: 2px; }}
</style></head><body>
<h1>glimpse demo</h1>
<p>A CLIP-style dual encoder trained from scratch on the procedural shapes world
(recipe <code>shapes-clip-demo</code>), end to end in {elapsed:.0f} s on a machine whose fp32 matmul runs at
{gflops:.0f} GFLOP/s.
<code>test_novel</code> holds colour–shape combinations never seen in training.</p>
<h2>Figures</h2><table>{rows}</table>
<h2>Training</h2>{_loss_img(loss_png)}
<h2>Text → image search over the test and test_novel images (top 5, cosine score; green: the image the caption was written for; last: where the model looked in the top image, Chefer et al.'s relevance)</h2>{search_html}
<h2>Zero-shot classification (green: right, red: wrong)</h2>{zs_html}
<h2>LLaVA: questions about test images</h2>
<p>The demo's vision tower, a language model pretrained on the world's text (captions, questions answered), an MLP projector
aligned on captions (stage 1), then projector and LM tuned on conversations (stage 2).
Answers are greedy, generated by <code>m.ask</code>; beside each, where the model looked for it
(<code>m.explain</code>: the answer's relevance through the language model and on through the vision tower).</p>
<table>{llava_rows}</table>
<div class="qa">{qa_html}</div>
<h3>Stage 2 training</h3>{_loss_img(llava_loss)}
</body></html>
"""
