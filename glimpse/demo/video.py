"""`glimpse demo video`: the moving-shapes world, a video dual encoder and a video LLaVA on its tower, at
demo size, with a report that shows each clip's frames beside the questions and the model's answers."""

from __future__ import annotations

import base64
import html
import io
import json
import time
from pathlib import Path

import numpy as np

from glimpse.config import load_recipe
from glimpse.demo import _finish, _start, same_world

N_CLIPS = 8  # test clips the report shows


def _strip(path: str, scale: int = 2) -> str:
    """An inline <img> of a clip's 8 uniform frames side by side."""
    from PIL import Image

    from glimpse.data.video import read_video

    frames = read_video(path, 8)
    strip = np.concatenate(list(frames), axis=1)
    picture = Image.fromarray(strip)
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    picture.save(buf, "PNG")
    return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}" alt="{html.escape(path)}">'


def run_video_demo(out: str | Path = "runs/demo-video", progress: bool = True,
                   overrides: list[str] | None = None) -> dict:
    """Train shapes-video-clip-demo and shapes-video-llava-demo (on the first's tower), evaluate both,
    and write report.html: frames of test clips beside their questions, answers and captions."""
    from glimpse.api import load
    from glimpse.data.shapes_video import read_clips
    from glimpse.train.trainer import data_root, train

    t0, out, gflops = _start(out)
    sets: dict[str, list[str]] = {"clip": [], "llava": []}
    for item in overrides or []:  # --set llava.KEY=V; plain KEY=V goes to the video dual encoder
        head, _, rest = item.partition(".")
        sets["llava"].append(rest) if head == "llava" and rest else sets["clip"].append(item)
    clip_recipe = load_recipe("shapes-video-clip-demo", sets["clip"])
    root = data_root(clip_recipe, progress)
    clip_results = train(clip_recipe, out / "clip", progress=progress)
    print(f"[1/2] trained the video dual encoder ({time.time() - t0:.0f} s)")
    llava_recipe = load_recipe("shapes-video-llava-demo", sets["llava"])
    llava_recipe.data = same_world(llava_recipe.data, clip_recipe.data)
    llava_recipe.init_parts = {"vision": str(out / "clip")}
    llava_recipe.model.vision = clip_recipe.model.vision  # the tower as trained
    results = train(llava_recipe, out / "llava", progress=progress)
    print(f"[2/2] trained the video LLaVA and evaluated ({time.time() - t0:.0f} s)\n")

    pipe = load(out / "llava")
    clips = read_clips(root / "annotations" / "captions_test.json", root / "videos" / "test")[:N_CLIPS]
    qa = json.loads((root / "annotations" / "qa_test.json").read_text())
    asked = {c.video_id: [q for q in qa if q["video_id"] == c.video_id][:3] for c in clips}
    flat = [(c, q) for c in clips for q in asked[c.video_id]]
    answers = pipe.ask([c.path for c, _ in flat], [q["question"] for _, q in flat], max_new_tokens=8)
    captions = pipe.caption([c.path for c in clips])
    got = {id(q): a.strip().rstrip(".").lower() for (_, q), a in zip(flat, answers)}

    clip_keys = ["test/t2v_r1", "test/shuffled_t2v_r1", "test/reversed_t2v_r1", "test/single_frame_t2v_r1",
                 "test/pairs_t2v_r1", "test/pairs_acc"]
    qa_keys = ["test/temporal_acc", "test/chance_temporal", "test/shuffled_temporal_acc",
               "test/single_frame_temporal_acc", "test/static_acc", "test/single_frame_static_acc",
               "test/reversed_flip", "test/cider"]
    for title, r, ks in (("video dual encoder (shapes-video-clip-demo)", clip_results, clip_keys),
                         ("video LLaVA (shapes-video-llava-demo)", results, qa_keys)):
        print(title + ":")
        for k in ks:
            if k in r:
                print(f"  {k:<32} {r[k]:.3f}")
    elapsed = time.time() - t0
    table = "".join(f"<tr><td>{html.escape(k)}</td><td>{r[k]:.3f}</td></tr>"
                    for r, ks in ((clip_results, clip_keys), (results, qa_keys)) for k in ks if k in r)
    rows = []
    for c, caption in zip(clips, captions):
        qs = "".join(
            f"<li class='{'ok' if got[id(q)] == q['answer'] else 'bad'}'>{html.escape(q['question'])} "
            f"<b>{html.escape(got[id(q)])}</b> <span class='truth'>(truth: {html.escape(q['answer'])}, "
            f"{q['answer_type']})</span></li>" for q in asked[c.video_id])
        rows.append(f"<div class='clip'>{_strip(c.path)}<div class='cap'>model: {html.escape(caption)}<br>"
                    f"<span class='truth'>world: {html.escape(c.captions[0])}</span></div><ul>{qs}</ul></div>")
    report = out / "report.html"
    report.write_text(f"""<!doctype html>
<html><head><meta charset="utf-8"><title>glimpse video demo</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; }} td {{ padding: 3px 14px; border-bottom: 1px solid #ddd; }}
img {{ image-rendering: pixelated; border: 1px solid #ccc; }} .clip {{ margin: 18px 0; }}
li.ok b {{ color: #272; }} li.bad b {{ color: #b22; }} .truth {{ color: #777; }} .cap {{ margin: 4px 0; }}
</style></head><body>
<h1>glimpse video demo</h1>
<p>The moving-shapes world's clips (8 frames each, left to right), a video dual encoder (CLIP4Clip's
seqTransf) and a video LLaVA reading its frozen tower, trained from scratch in {elapsed:.0f} s on a machine
whose fp32 matmul runs at {gflops:.0f} GFLOP/s.  Temporal questions need more than one frame; the
controls show what the models get from frame order (shuffled, reversed, one frame) and from chance.</p>
<table>{table}</table>
<h2>Test clips, questions and answers</h2>{''.join(rows)}
</body></html>
""")
    summary = _finish(out, report, elapsed, gflops, results=results, clip_results=clip_results)
    print(f'ask more: glimpse ask {out / "llava"} {clips[0].path} "which way does the circle move first?"')
    return summary
