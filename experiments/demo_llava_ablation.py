"""Demo-size LLaVA ablation: retrains the LLaVA stages of `glimpse demo` (stage 1, then stage 2,
at the demo's sizes and step counts) on top of a finished demo folder's dual encoder and LM, with
one change, and prints what the demo prints (test VQA and CIDEr-D; until the demo scored every
test question, add `--set stage2.eval.vqa_limit=400` to compare with older figures) plus VQA
accuracy by question type on every test question and, for "where is the ...?", how the answers
fall by the number of objects in the scene: right, the position of another object, or an empty
position.  That last split tells "reads positions but does not pick the named object" apart
from "does not read positions".

    glimpse demo --out runs/demo
    python experiments/demo_llava_ablation.py runs/demo runs/ablation/base
    python experiments/demo_llava_ablation.py runs/demo runs/ablation/seed1 --set stage2.train.seed=1
    python experiments/demo_llava_ablation.py runs/demo runs/ablation/s900 --set stage2.train.max_steps=900 \
        --set stage2.train.save_every=900
    python experiments/demo_llava_ablation.py runs/demo runs/ablation/lm4 --set lm.model.layers=4
    python experiments/demo_llava_ablation.py runs/demo runs/ablation/vfl1 \\
        --set stage1.model.vision_feature_layer=1 --set stage2.model.vision_feature_layer=1
    python experiments/demo_llava_ablation.py runs/demo runs/ablation/desc3 --describe-repeat 3
    python experiments/demo_llava_ablation.py runs/demo runs/ablation/untrained-lm --lm untrained --describe-repeat 3
    python experiments/demo_llava_ablation.py runs/demo runs/ablation/full-tower --tower runs/shapes-clip \\
        --set stage1.model.pixel_shuffle=2 --set stage2.model.pixel_shuffle=2
    python experiments/demo_llava_ablation.py runs/demo runs/ablation/norm-700 --set stage2.train.max_steps=700 \\
        --set stage1.model.projector_norm=true --set stage2.model.projector_norm=true

(--tower takes any dual-encoder run on 64 px shapes images; its own vision config is used.)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import glimpse.families.vlm as vlm_family
from glimpse.api import load_run
from glimpse.config import load_recipe
from glimpse.data import conversations
from glimpse.data.conversations import vqa_items
from glimpse.demo import train_llava
from glimpse.families.vlm.evaluate import vqa_answers
from glimpse.metrics.vqa import vqa_accuracy
from glimpse.train.trainer import data_root, train


def stage2_records(describe_repeat: int, vqa_per_conversation: int):
    """Stage 2's training records with the describe conversations repeated `describe_repeat`
    times (0 drops them) and the VQA questions grouped `vqa_per_conversation` to a sample;
    stage 1's caption records are left as they are."""

    def records(data_cfg, root, split="train"):
        if data_cfg.format != "llava":
            return conversations.caption_records(data_cfg, root, split)
        llava = conversations.llava_records(data_cfg, root, split)
        describe = [r for r in llava if len(r["messages"]) == 2]  # one turn: "describe the image."
        out = [r for r in llava if len(r["messages"]) > 2] + describe * describe_repeat
        if data_cfg.vqa_mix:
            out += conversations.vqa_records(data_cfg, root, split, per_conversation=vqa_per_conversation)
        return out

    return records


def untrained_lm(demo_dir: Path, out: Path) -> Path:
    """A run holding the demo LM's architecture with its initial (random) weights."""
    lm_recipe = load_recipe(str(demo_dir / "shapes-lm" / "recipe.yaml"), [
        "train.max_steps=1", "train.lr=1e-12", "train.warmup_steps=0", "train.eval_every=0", "train.save_every=1",
        "eval.splits=[]"])
    train(lm_recipe, out, progress=False)
    return out


def train_stages(a) -> tuple[Path, Path]:
    demo_dir, out = Path(a.demo), Path(a.out)
    clip = load_recipe(str(demo_dir / "clip" / "recipe.yaml"), [])
    tower = Path(a.tower) if a.tower else demo_dir / "clip"
    vision = load_recipe(str(tower / "recipe.yaml"), []).model.vision
    sets = {"lm": [], "stage1": [], "stage2": []}
    for item in a.set:
        head, _, rest = item.partition(".")
        if head not in sets or not rest:
            sys.exit(f"--set {item}: expected lm.KEY=V, stage1.KEY=V or stage2.KEY=V")
        sets[head].append(rest)
    if sets["lm"] and a.lm:
        sys.exit("--set lm.KEY=V pretrains a new LM as the demo does; it cannot be combined with --lm")
    lm_run = untrained_lm(demo_dir, out / "untrained-lm") if a.lm == "untrained" else \
        None if sets["lm"] else Path(a.lm or demo_dir / "shapes-lm")
    t0 = time.perf_counter()
    run = train_llava(clip.data, vision, tower, out, sets, not a.quiet, lm_run=lm_run)
    print(f"stage 1 and 2: {time.perf_counter() - t0:.0f} s")
    return run, data_root(clip, False)


def by_question_type(run: Path, root: Path) -> None:
    task, model = load_run(run)
    items = vqa_items(task.recipe.data, root, "test")
    annotations = json.loads((root / "annotations" / "vqa_annotations_test.json").read_text())["annotations"]
    kind = {a["question_id"]: a["question_type"] for a in annotations}
    scenes = {i["file_name"]: i["scene"] for i in
              json.loads((root / "annotations" / "captions_test.json").read_text())["images"]}
    answers, answered = vqa_answers(task.pipeline(model), items, task.recipe.eval.batch_size)
    items = [items[i] for i in answered]
    scores, where = defaultdict(list), Counter()
    for it, answer in zip(items, answers):
        scores[kind[it["question_id"]]].append(vqa_accuracy(answer, it["answers"]))
        if kind[it["question_id"]] == "where is the":
            scene = scenes[Path(it["image"]).name]
            occupied = {o["position"] for o in scene}
            verdict = "right" if answer.strip() == it["answer"] else \
                "another object's position" if answer.strip() in occupied else "an empty position"
            where[(len(scene), verdict)] += 1
    print(f"\nVQA accuracy by question type ({len(items)} test questions)")
    for k, v in sorted(scores.items()):
        print(f"  {k:<22} n={len(v):<5} {sum(v) / len(v):.3f}")
    print('\n"where is the ...?" answers by the number of objects in the scene')
    for n in sorted({n for n, _ in where}):
        row = {v: where[(n, v)] for v in ("right", "another object's position", "an empty position")}
        print(f"  {n} object{'s' if n > 1 else ' '}: " + ", ".join(f"{v} {c}" for v, c in row.items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("demo", help="a `glimpse demo` output folder (its clip and shapes-lm runs are reused)")
    p.add_argument("out", help="where the variant's runs go (a new folder)")
    p.add_argument("--set", action="append", default=[], metavar="lm|stage1|stage2.KEY=V",
                   help="a setting of one stage; any lm.KEY=V pretrains a new LM (as the demo does) with it")
    p.add_argument("--lm", help="the LM run to start from; 'untrained' for its random initial weights "
                   "(default: the demo's shapes-lm)")
    p.add_argument("--tower", help="a dual-encoder run whose vision tower to use (default: the demo's clip)")
    p.add_argument("--describe-repeat", type=int, default=1, help="stage 2's describe conversations, x N (0: none)")
    p.add_argument("--vqa-per-conversation", type=int, default=2, help="VQA questions per stage-2 sample")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args()
    if (a.describe_repeat, a.vqa_per_conversation) != (1, 2):
        # the data mix is the only thing this script changes inside glimpse: stage 2 reads its records here
        vlm_family.training_records = stage2_records(a.describe_repeat, a.vqa_per_conversation)
    run, root = train_stages(a)
    figures = json.loads((run / "eval.json").read_text())
    print(f"\n{run}: " + "  ".join(f"{k} {figures[k]:.3f}" for k in ("test/vqa_acc", "test/cider") if k in figures))
    by_question_type(run, root)


if __name__ == "__main__":
    main()
