"""Fusion ablation: which way should the image enter the text?  Trains the fusion encoder once per
fusion operator (cross_attention, concat, weighted_sum, product) for the same budget -- the
`shapes-fusion-pretrain` recipe for --pretrain-steps, then `shapes-fusion-vqa` from that run for
--vqa-steps -- and prints a table of VQA accuracy (test) and text->image R@1 (test_novel), by
ITC alone and after ITM re-ranks ITC's top k.  Everything else (sizes, data, schedule, seed) is
the recipes' and the same for every operator.

    python experiments/fusion_ablation.py --pretrain-steps 300 --vqa-steps 300 --out runs/fusion-ablation
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from glimpse.api import load_run
from glimpse.config import load_recipe
from glimpse.models.fusion import FUSIONS
from glimpse.train.trainer import data_root, train


def run_operator(op: str, a) -> dict:
    out = Path(a.out) / op
    common = [f"model.fusion={op}", f"train.batch_size={a.batch_size}", *a.set]
    t0 = time.perf_counter()
    pre = out / "pretrain"
    if not (pre / "eval.json").is_file():
        recipe = load_recipe("shapes-fusion-pretrain", [*common, f"train.max_steps={a.pretrain_steps}",
                                                         f"train.save_every={a.pretrain_steps}", "train.eval_every=0",
                                                         "eval.splits=[test_novel]"])
        train(recipe, pre, progress=not a.quiet)
    retrieval = json.loads((pre / "eval.json").read_text())
    if "test_novel/t2i_r1_itm" not in retrieval:  # a run evaluated by an older glimpse: evaluate it again
        task, model = load_run(pre)
        task.root = data_root(task.recipe, False)
        retrieval = task.evaluate(model, ["test_novel"])
        (pre / "eval.json").write_text(json.dumps(retrieval, indent=2) + "\n")
    vqa_run = out / "vqa"
    if not (vqa_run / "eval.json").is_file():
        recipe = load_recipe("shapes-fusion-vqa", [*common, f"init={pre}", f"train.max_steps={a.vqa_steps}",
                                                    f"train.save_every={a.vqa_steps}", "train.eval_every=0",
                                                    "eval.splits=[test]"])
        train(recipe, vqa_run, progress=not a.quiet)
    vqa = json.loads((vqa_run / "eval.json").read_text())
    return {"fusion": op, "vqa_acc": vqa["test/vqa_acc"], "t2i_r1": retrieval["test_novel/t2i_r1"],
            "t2i_r1_rerank": retrieval["test_novel/t2i_r1_rerank"], "t2i_r1_itm": retrieval["test_novel/t2i_r1_itm"],
            "minutes": (time.perf_counter() - t0) / 60}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--vqa-steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--ops", nargs="+", default=list(FUSIONS), choices=FUSIONS)
    p.add_argument("--out", default="runs/fusion-ablation", help="one run folder per operator and stage (reused)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override both recipes")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    rows = []
    for op in a.ops:
        rows.append(run_operator(op, a))
        print(json.dumps(rows[-1]), file=sys.stderr)
    print(f"\nfusion ablation: {a.pretrain_steps} pretraining + {a.vqa_steps} VQA steps of {a.batch_size} per operator\n")
    print("| fusion | test VQA acc | test_novel t2i R@1: ITC | ITC top k re-ranked by ITM x ITC | by ITM alone |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['fusion']} | {r['vqa_acc']:.3f} | {r['t2i_r1']:.3f} | {r['t2i_r1_rerank']:.3f} | {r['t2i_r1_itm']:.3f} |")


if __name__ == "__main__":
    main()
