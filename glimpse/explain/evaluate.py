"""`glimpse eval RUN --explain`: explanations checked against the shapes world's object boxes.

Cases are test scenes of 2 or 3 objects in which the text or the question names one object:
- a text ("a small red triangle") whose colour and shape only that object has (dual encoders, fusion ITM);
- "what colour is the triangle?" where only that object is a triangle, and "what shape is on the
  right?" (vision-language models, fusion VQA), half each.

Each method is scored on every case by the pointing game and the energy in the box (glimpse.metrics.explain),
beside the random baseline (the box's share of the image); on the first `deletion_n` cases by RISE's
deletion AUC (painting patches over, most relevant first: lower is better) beside the same deletion in a
random order; and on the first `sanity_n` cases by the model-randomisation check: Spearman's rho between
the trained model's map and the map of the same model with every weight tensor redrawn at random
(Adebayo et al. 2018; a map that survives randomisation does not explain the model).
"""

from __future__ import annotations

import copy
import json
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from glimpse.data.shapes_words import position_phrase
from glimpse.errors import GlimpseError
from glimpse.explain.core import METHODS, Explanation, auc, deletion_curve, explain, patch_order
from glimpse.metrics.explain import box_mask, box_share, energy_in_box, pointing_hit, spearman


@dataclass
class Case:
    image: str
    kind: str  # "name" (a text naming the object), "colour" or "shape" (a question about it)
    text: str
    answer: str  # the true answer of a question ("" for a text)
    box: list[float]  # the named object's [x, y, w, h] in pixels
    height: int
    width: int


def explain_cases(root: str | Path, split: str = "test", n: int = 200, asks: str = "texts", seed: int = 0) -> list[Case]:
    """Up to `n` cases from a shapes world's `instances_{split}.json` (see the module docstring)."""
    path = Path(root) / "annotations" / f"instances_{split}.json"
    try:
        coco = json.loads(path.read_text(encoding="utf-8"))
        objects = defaultdict(list)
        for a in coco["annotations"]:
            objects[a["image_id"]].append(a)
        images = [im for im in coco["images"] if len(objects[im["id"]]) in (2, 3)]
    except FileNotFoundError:
        raise GlimpseError(f"{path} is missing: explanations are checked against the object boxes that shapes "
                           "worlds write from glimpse 0.x on (regenerate the world)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise GlimpseError(f"cannot read the object boxes of {path}: {e!r}") from None
    rng = random.Random(seed)
    rng.shuffle(images)
    cases = []
    for im in images:
        objs = objects[im["id"]]
        picture = str(Path(root) / "images" / split / im["file_name"])
        kind = "name" if asks == "texts" else ("colour", "shape")[len(cases) % 2]
        if kind == "name":
            pool = [o for o in objs if sum((p["colour"], p["shape"]) == (o["colour"], o["shape"]) for p in objs) == 1]
        elif kind == "colour":
            pool = [o for o in objs if sum(p["shape"] == o["shape"] for p in objs) == 1]
        else:
            pool = list(objs)
        if not pool:
            continue
        o = pool[rng.randrange(len(pool))]
        text, answer = {"name": (f"a {o['size']} {o['colour']} {o['shape']}", ""),
                        "colour": (f"what colour is the {o['shape']}?", o["colour"]),
                        "shape": (f"what shape is {position_phrase(o['position'])}?", o["shape"])}[kind]
        cases.append(Case(picture, kind, text, answer, o["bbox"], im["height"], im["width"]))
        if len(cases) == n:
            break
    return cases


def ideal_energy(case: Case, grid_shape: tuple[int, int]) -> float:
    """The energy in the box of the best a patch map can say: each patch's relevance the share of it that
    the box covers (a ceiling for maps at this patch size, shown through the same upsampling)."""
    inside = box_mask(case.box, case.height, case.width).float()
    gh, gw = grid_shape
    cover = torch.nn.functional.adaptive_avg_pool2d(inside[None, None], (gh, gw))[0, 0]
    return energy_in_box(Explanation("ideal", "", 0.0, cover).pixel_map(case.height, case.width), case.box)


def make_explainer(pipeline, case: Case, answer: str | None = None):
    if pipeline.explains == "texts":
        return pipeline.explainer(case.image, case.text)
    return pipeline.explainer(case.image, question=case.text, answer=answer)


def randomised(pipeline, seed: int = 0):
    """The pipeline with a copy of its model whose every weight tensor is redrawn from a normal of the
    tensor's own mean and spread: the scale of each layer stays, what training wrote is gone.  (Only for
    explaining given answers: the copy shares the pipeline's other state, a chat model's feature cache too.)"""
    other = copy.copy(pipeline)
    other.model = copy.deepcopy(pipeline.model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.model.parameters():
            if p.numel() > 1:
                p.copy_(torch.randn(p.shape, generator=g).to(p.device) * p.float().std() + p.float().mean())
    return other


def evaluate_explanations(pipeline, cases: list[Case], methods=METHODS, deletion_n: int = 50, sanity_n: int = 50,
                          steps: int = 16, seed: int = 0, progress=None) -> dict[str, float]:
    """Flat figures `explain/{method}/{pointing,energy,deletion_auc,randomised_rho,ms}`, the random baselines
    `explain/random/{pointing,energy,deletion_auc}`, the ceiling of a patch map's energy (`explain/ideal/energy`,
    see `ideal_energy`), and per question kind where there are several."""
    if not cases:
        raise GlimpseError("no explanation cases: the split holds no scenes of 2-3 objects with one named")
    g = torch.Generator().manual_seed(seed)
    sums: dict[str, list[float]] = defaultdict(list)
    kinds = sorted({c.kind for c in cases})
    grids: list[dict] = []  # the trained model's grids and its answer, for the sanity check
    for i, case in enumerate(cases):
        explainer = make_explainer(pipeline, case)
        answer = getattr(explainer, "answer", None)
        if case.answer:
            sums["answer_accuracy"].append(float((answer or "").strip().lower() == case.answer))
        tol = case.height / explainer.grid_shape[0] / 2  # half a patch, the pointing game's tolerance
        sums["random/pointing"].append(box_share(case.box, case.height, case.width, tol))
        sums["random/energy"].append(box_share(case.box, case.height, case.width))
        sums["ideal/energy"].append(ideal_energy(case, explainer.grid_shape))
        kept = {"answer": answer}
        for method in methods:
            e = explain(explainer, method)
            pm = e.pixel_map(case.height, case.width)
            for key in (method, f"{case.kind}/{method}") if len(kinds) > 1 else (method,):
                sums[f"{key}/pointing"].append(float(pointing_hit(pm, case.box, tol)))
                sums[f"{key}/energy"].append(energy_in_box(pm, case.box))
            sums[f"{method}/ms"].append(1000 * e.seconds)
            if i < deletion_n:
                order = patch_order(e.grid, explainer.grid_shape)
                curve = deletion_curve(explainer.score, explainer.pixels, order, explainer.grid_shape, steps)
                sums[f"{method}/deletion_auc"].append(auc(curve))
            if i < sanity_n:
                kept[method] = e.grid
        if i < deletion_n:
            order = torch.randperm(explainer.grid_shape[0] * explainer.grid_shape[1], generator=g)
            curve = deletion_curve(explainer.score, explainer.pixels, order, explainer.grid_shape, steps)
            sums["random/deletion_auc"].append(auc(curve))
        if i < sanity_n:
            grids.append(kept)
        if progress is not None:
            progress.update(1)
    if grids:
        other = randomised(pipeline, seed)
        for case, kept in zip(cases, grids):
            explainer = make_explainer(other, case, kept["answer"])
            for method in methods:
                rho = spearman(kept[method], explain(explainer, method).grid)
                if rho == rho:  # a constant map has no rank correlation
                    sums[f"{method}/randomised_rho"].append(rho)
    out = {f"explain/{k}": sum(v) / len(v) for k, v in sorted(sums.items()) if v}
    out["explain/n"] = len(cases)
    return out
