"""The procedural "shapes world": a small, fully controlled vision-language dataset.

Images hold 1 to 3 coloured shapes.  Each image comes with captions, VQA questions, LLaVA
conversations and (for single-object images) a class label, all written in the real COCO / VQAv2 /
LLaVA / open_clip / WebDataset formats, so the same readers and training code run on it and on real
data.  Four colour-shape combinations never appear in train, val or test; ``test_novel`` is built
around them to measure compositional generalisation.  What the world says about a scene (its words,
captions, questions and the caption parser) is `glimpse.data.shapes_words`; this module draws scenes
and writes the files.
"""

from __future__ import annotations

import csv
import io
import json
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from glimpse.data.shapes_words import (  # the world's words, also read from here by older imports
    _ALL_COMBOS,
    _FAMILIAR,
    COLOURS,
    NOVEL_COMBOS,
    POSITIONS,
    SHAPES,
    SIZES,
    _captions,
    _conversations,
    _human_answers,
    _questions,
    scene_key,
)
from glimpse.errors import GlimpseError

CLASSES = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]
SPLITS = ["train", "val", "test", "test_novel"]

_RGB = {
    "red": (215, 35, 35),
    "green": (35, 160, 60),
    "blue": (35, 75, 215),
    "yellow": (240, 200, 20),
    "purple": (135, 50, 175),
    "orange": (245, 125, 20),
}
# Light, nearly grey backgrounds: far from every saturated shape colour above.
_BACKGROUNDS = [(236, 236, 236), (242, 234, 218), (248, 248, 245), (230, 233, 238)]
_ANCHORS = {"left": (0.2, 0.5), "right": (0.8, 0.5), "top": (0.5, 0.2), "bottom": (0.5, 0.8), "centre": (0.5, 0.5)}
_JITTER = 0.02
# Half-width of the box a shape fills.  Neighbouring anchors are 0.3 apart, so with the jitter two
# large shapes need 2 * r + 2 * _JITTER < 0.3: 0.12 leaves a gap, the "about 0.14" of the design would not.
_RADIUS = {"small": 0.08, "large": 0.12}
_SUPERSAMPLE = 4
_N_OBJECTS_P = (0.4, 0.3, 0.3)
_SHARD_SIZE = 1000
# Consecutive duplicate scenes drawn before a split is declared to have run out of distinct scenes.
_MAX_REJECTIONS = 10_000

def generate_shapes(out: str | Path, *, seed: int = 0, n_train: int = 2000, n_val: int = 200, n_test: int = 500,
                    n_test_novel: int | None = None, image_size: int = 64, shards: bool = False,
                    progress: bool = True) -> dict:
    """Write the shapes world into ``out`` (a new or empty folder) and return its ``world.json``.

    The same arguments always write byte-identical files.  ``world.json`` is written last, so its
    presence marks a complete world.
    """
    out = Path(out)
    counts = {"train": n_train, "val": n_val, "test": n_test,
              "test_novel": n_test if n_test_novel is None else n_test_novel}
    for split, n in counts.items():
        if not isinstance(n, int) or n < 0:
            raise GlimpseError(f"{out}: the number of {split} images must be a non-negative integer, not {n!r}")
    # Below 16 px a small shape is a couple of pixels wide and no longer recognisable.
    if not isinstance(image_size, int) or image_size < 16:
        raise GlimpseError(f"{out}: image_size must be an integer of at least 16, not {image_size!r}")
    # Refusing a used folder keeps stale images or shards of an earlier, larger world out of this one.
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise GlimpseError(f"{out}: already exists and is not an empty folder; choose a new one")
    for sub in ("annotations", "labels") + (("shards",) if shards else ()):
        (out / sub).mkdir(parents=True, exist_ok=True)

    for index, split in enumerate(SPLITS):
        _write_split(out, split, index, counts[split], seed, image_size, shards, progress)

    (out / "labels" / "classes.txt").write_text("".join(f"{name}\n" for name in CLASSES), encoding="utf-8")
    world = {"version": 2, "seed": seed, "image_size": image_size, "splits": counts, "colours": list(COLOURS),
             "shapes": list(SHAPES), "sizes": list(SIZES), "positions": list(POSITIONS),
             "novel_combos": [list(combo) for combo in NOVEL_COMBOS], "classes": list(CLASSES)}
    (out / "world.json").write_text(json.dumps(world, indent=2) + "\n", encoding="utf-8")
    return world


def _write_split(out: Path, split: str, index: int, n: int, seed: int, size: int, shards: bool,
                 progress: bool) -> None:
    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
    novel = split == "test_novel"
    # train may repeat scenes; in the evaluation splits a caption must identify its image.
    seen: set | None = None if split == "train" else set()
    image_dir = out / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, captions, llava, questions, answers, labels, clip_rows, instances = [], [], [], [], [], [], [], []
    # WebDataset shards: image-caption samples, and LLaVA's records (an image and its record) for stage 2
    writer, llava_writer = (ShardWriter(out / "shards", split), ShardWriter(out / "shards", f"llava_{split}")) \
        if shards else (None, None)
    pending: list = []  # (stem, captions, scene, LLaVA records, PNG future) in image order

    def flush(keep: int) -> None:
        while len(pending) > keep:
            stem, caps, objects, records, png = pending.pop(0)
            png = png.result()
            (image_dir / f"{stem}.png").write_bytes(png)
            if writer:
                writer.add(stem, {"png": png, "txt": caps[0].encode("utf-8"),
                                  "json": _dumps({"captions": caps, "scene": objects}).encode("utf-8")})
                for r in records:
                    llava_writer.add(r["id"], {"png": png, "json": _dumps(r).encode("utf-8")})

    # Drawing draws from the seeded rng, so it stays in order; the downsampling and PNG encoding
    # (most of the time, and Pillow releases the GIL for both) run on two threads.
    pool = ThreadPoolExecutor(2)
    try:
        for i in tqdm(range(n), desc=f"shapes {split}", unit="img", disable=not progress):
            objects = _draw_scene(rng, novel, seen)
            if objects is None:
                raise GlimpseError(f"{out}: ran out of distinct {split} scenes after {i} images; "
                                   f"ask for fewer than {n}")
            stem = f"{split}_{i:06d}"
            file_name = f"{stem}.png"
            canvas, boxes = _draw(objects, rng, size)
            png = pool.submit(_png, canvas, size)

            caps = _captions(objects, rng)
            qas = _questions(objects, rng, allow_novel=novel)
            images.append({"id": i, "file_name": file_name, "width": size, "height": size, "scene": objects})
            instances += [{"id": i * 3 + k, "image_id": i, "category_id": CLASSES.index(f"{o['colour']} {o['shape']}") + 1,
                           "bbox": box, "area": round(box[2] * box[3], 2), "iscrowd": 0, **o}
                          for k, (o, box) in enumerate(zip(objects, boxes))]
            captions += [{"id": i * 5 + k, "image_id": i, "caption": c} for k, c in enumerate(caps)]
            clip_rows += [(f"images/{split}/{file_name}", c) for c in caps]
            for k, qa in enumerate(qas):
                question_id = i * 10 + k
                questions.append({"image_id": i, "question": qa["question"], "question_id": question_id})
                answers.append({"question_id": question_id, "image_id": i, "question_type": qa["question_type"],
                                "answer_type": qa["answer_type"], "multiple_choice_answer": qa["answer"],
                                "answers": _human_answers(qa["answer"], rng), "answer_sentence": qa["sentence"]})
            records = _conversations(stem, f"{split}/{file_name}", caps, qas, rng)
            llava += records
            if len(objects) == 1:
                labels.append((f"images/{split}/{file_name}", f"{objects[0]['colour']} {objects[0]['shape']}"))
            pending.append((stem, caps, objects, records, png))
            flush(keep=64)
        flush(keep=0)
    finally:
        pool.shutdown(cancel_futures=True)
        if writer:
            try:
                writer.close()
            finally:
                llava_writer.close()

    info = {"description": f"glimpse shapes world, {split} split", "version": "1", "seed": seed}
    licence = {"name": "CC0 1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}
    ann = out / "annotations"
    _write_json(ann / f"captions_{split}.json",
                {"info": info, "licenses": [], "images": images, "annotations": captions})
    _write_json(ann / f"llava_{split}.json", llava)
    # COCO detection annotations: each object's box [x, y, w, h] in pixels, its class (colour + shape), and
    # the world's own words for it (what explanations are checked against, glimpse.explain)
    categories = [{"id": k + 1, "name": name, "supercategory": name.split()[1]} for k, name in enumerate(CLASSES)]
    _write_json(ann / f"instances_{split}.json",
                {"info": info, "licenses": [], "images": [{k: v for k, v in im.items() if k != "scene"} for im in images],
                 "annotations": instances, "categories": categories})
    _write_json(ann / f"vqa_questions_{split}.json",
                {"info": info, "task_type": "Open-Ended", "data_type": "shapes", "data_subtype": split,
                 "license": licence, "questions": questions})
    _write_json(ann / f"vqa_annotations_{split}.json",
                {"info": info, "data_type": "shapes", "data_subtype": split, "license": licence,
                 "annotations": answers})
    _write_csv(out / "labels" / f"{split}.csv", ("filepath", "label"), labels)
    _write_csv(out / f"{split}.csv", ("filepath", "caption"), clip_rows)


def _draw_scene(rng: np.random.Generator, novel: bool, seen: set | None) -> list[dict] | None:
    """A random scene not in ``seen`` (which it joins), or None once duplicates keep coming."""
    for _ in range(_MAX_REJECTIONS):
        objects = _sample_scene(rng, novel)
        if seen is None:
            return objects
        key = scene_key(objects)
        if key not in seen:
            seen.add(key)
            return objects
    return None


def _sample_scene(rng: np.random.Generator, novel: bool) -> list[dict]:
    n = int(rng.choice(3, p=_N_OBJECTS_P)) + 1
    positions = rng.choice(len(POSITIONS), size=n, replace=False)
    # A novel scene has one object with a novel combination; the others may be anything.
    novel_slot = int(rng.integers(n)) if novel else -1
    objects = []
    for slot, position in enumerate(positions):
        pool = NOVEL_COMBOS if slot == novel_slot else _ALL_COMBOS if novel else _FAMILIAR
        colour, shape = pool[rng.integers(len(pool))]
        objects.append({"size": SIZES[rng.integers(len(SIZES))], "colour": colour, "shape": shape,
                        "position": POSITIONS[position]})
    return sorted(objects, key=lambda o: POSITIONS.index(o["position"]))


def _png(canvas: Image.Image, size: int) -> bytes:
    """A drawn canvas downsampled to the image size (which anti-aliases the edges), as PNG bytes."""
    buffer = io.BytesIO()
    canvas.resize((size, size), Image.LANCZOS).save(buffer, format="PNG")
    return buffer.getvalue()


def _draw(objects: list[dict], rng: np.random.Generator, size: int) -> tuple[Image.Image, list[list[float]]]:
    """The scene drawn at _SUPERSAMPLE times the size (`_png` downsamples it), and each object's box
    [x, y, w, h] in the output image's pixels."""
    big = size * _SUPERSAMPLE
    canvas = Image.fromarray(_background(rng, size), "RGB").resize((big, big), Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    boxes = []
    for o in objects:
        ax, ay = _ANCHORS[o["position"]]
        dx, dy = rng.uniform(-_JITTER, _JITTER, size=2)
        cx, cy, r = (ax + dx) * big, (ay + dy) * big, _RADIUS[o["size"]] * big
        draw_shape(draw, o["shape"], cx, cy, r, _RGB[o["colour"]])
        x0, y0, x1, y1 = (v / _SUPERSAMPLE for v in shape_box(o["shape"], cx, cy, r))
        boxes.append([round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)])
    return canvas, boxes


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    """Draw one shape centred on its anchor point (cx, cy) with half-width r, in the canvas' pixels.

    The world's one definition of each shape's geometry: `_draw` and the scene parser
    (glimpse.data.scene_parser, which renders templates with it) both use it."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        h = 0.9 * r  # a full-box square looks much bigger than a circle of the same radius
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=fill)
    else:  # cross: a plus sign
        w = 0.32 * r
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)


def shape_box(shape: str, cx: float, cy: float, r: float) -> tuple[float, float, float, float]:
    """The box (x0, y0, x1, y1) of what `draw_shape` draws."""
    h = 0.9 * r if shape == "square" else r
    return cx - h, cy - h, cx + h, cy + (0.8 * r if shape == "triangle" else h)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A plain light background, or (half the time) one with faint grey noise or a gradient.

    Made at the output resolution, so the downsampling does not average the noise away (and it is cheap).
    """
    base = np.array(_BACKGROUNDS[rng.integers(len(_BACKGROUNDS))], dtype=float) + rng.uniform(-5, 5, size=3)
    pixels = np.broadcast_to(base, (size, size, 3))
    texture = rng.integers(4)  # 0 and 1: plain
    if texture == 2:
        pixels = pixels + rng.normal(0.0, 4.0, size=(size, size, 1))
    elif texture == 3:
        angle = rng.uniform(0, 2 * np.pi)
        ramp = np.linspace(-0.5, 0.5, size)
        pixels = pixels + 14 * (np.cos(angle) * ramp[None, :, None] + np.sin(angle) * ramp[:, None, None])
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


class ShardWriter:
    """Streams samples into WebDataset tar shards of at most _SHARD_SIZE samples, reproducibly."""

    def __init__(self, folder: Path, split: str):
        self.folder, self.split, self.count, self.tar = folder, split, 0, None

    def add(self, key: str, members: dict[str, bytes]) -> None:
        if self.count % _SHARD_SIZE == 0:
            self.close()
            path = self.folder / f"{self.split}-{self.count // _SHARD_SIZE:06d}.tar"
            self.tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)
        for ext in sorted(members):
            data = members[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            # A fixed time and mode; TarInfo already defaults uid/gid to 0 and uname/gname to "".
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self.tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.tar = None


def _dumps(obj: object) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _write_json(path: Path, obj: object) -> None:
    path.write_text(_dumps(obj) + "\n", encoding="utf-8")


def _write_csv(path: Path, header: tuple[str, str], rows: list[tuple[str, str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
