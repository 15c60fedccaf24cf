"""The procedural "shapes world": a small, fully controlled vision-language dataset.

Images hold 1 to 3 coloured shapes.  Each image comes with captions, VQA questions, LLaVA
conversations and (for single-object images) a class label, all written in the real COCO / VQAv2 /
LLaVA / open_clip / WebDataset formats, so the same readers and training code run on it and on real
data.  Four colour-shape combinations never appear in train, val or test; ``test_novel`` is built
around them to measure compositional generalisation.
"""

from __future__ import annotations

import csv
import io
import json
import tarfile
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from glimpse.errors import GlimpseError

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle", "cross"]
SIZES = ["small", "large"]
POSITIONS = ["left", "right", "top", "bottom", "centre"]
NOVEL_COMBOS = [("red", "cross"), ("green", "circle"), ("blue", "triangle"), ("yellow", "square")]
CLASSES = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]
SPLITS = ["train", "val", "test", "test_novel"]

_FIELDS = ("size", "colour", "shape", "position")
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
_FAMILIAR = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in NOVEL_COMBOS]
_ALL_COMBOS = [(c, s) for c in COLOURS for s in SHAPES]

_WHERE = {
    "left": ("on the left", "at the left"),
    "right": ("on the right", "at the right"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
    "centre": ("in the centre", "in the middle"),
}
_OPENINGS = ["", "a picture of", "an image showing", "there is", "this image contains", "a photo of",
             "an image of", "the picture shows", "a drawing of", "we can see"]
_CONNECTORS = ["and", "with", ","]
_DESCRIBE = ["describe the image.", "what is in this picture?", "describe this image briefly.",
             "give a short description of the image.", "what do you see in the image?"]
_NUMBER_WORDS = {"1": "one", "2": "two", "3": "three"}
# Other ways people answer; the official VQA normalisation maps some of them ("two", "Yes", "red.",
# "the left") to the canonical answer and not others ("center", "big"), as with real annotators.
_SYNONYMS = {"centre": ["center", "middle"], "large": ["big"], "cross": ["plus"]}


def scene_key(objects: Sequence) -> tuple:
    """The identity of a scene: its objects as sorted (size, colour, shape, position) tuples.

    Objects may be mappings with those keys (as stored in the annotations) or 4-tuples.
    """
    return tuple(sorted(tuple(o[f] for f in _FIELDS) if isinstance(o, Mapping) else tuple(o) for o in objects))


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
    world = {"version": 1, "seed": seed, "image_size": image_size, "splits": counts, "colours": list(COLOURS),
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
    images, captions, llava, questions, answers, labels, clip_rows = [], [], [], [], [], [], []
    writer = _ShardWriter(out / "shards", split) if shards else None
    pending: list = []  # (stem, captions, scene, PNG future) in image order

    def flush(keep: int) -> None:
        while len(pending) > keep:
            stem, caps, objects, png = pending.pop(0)
            png = png.result()
            (image_dir / f"{stem}.png").write_bytes(png)
            if writer:
                writer.add(stem, {"png": png, "txt": caps[0].encode("utf-8"),
                                  "json": _dumps({"captions": caps, "scene": objects}).encode("utf-8")})

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
            png = pool.submit(_png, _draw(objects, rng, size), size)

            caps = _captions(objects, rng)
            qas = _questions(objects, rng, allow_novel=novel)
            images.append({"id": i, "file_name": file_name, "width": size, "height": size, "scene": objects})
            captions += [{"id": i * 5 + k, "image_id": i, "caption": c} for k, c in enumerate(caps)]
            clip_rows += [(f"images/{split}/{file_name}", c) for c in caps]
            for k, qa in enumerate(qas):
                question_id = i * 10 + k
                questions.append({"image_id": i, "question": qa["question"], "question_id": question_id})
                answers.append({"question_id": question_id, "image_id": i, "question_type": qa["question_type"],
                                "answer_type": qa["answer_type"], "multiple_choice_answer": qa["answer"],
                                "answers": _human_answers(qa["answer"], rng), "answer_sentence": qa["sentence"]})
            llava += _conversations(stem, f"{split}/{file_name}", caps, qas, rng)
            if len(objects) == 1:
                labels.append((f"images/{split}/{file_name}", f"{objects[0]['colour']} {objects[0]['shape']}"))
            pending.append((stem, caps, objects, png))
            flush(keep=64)
        flush(keep=0)
    finally:
        pool.shutdown(cancel_futures=True)
        if writer:
            writer.close()

    info = {"description": f"glimpse shapes world, {split} split", "version": "1", "seed": seed}
    licence = {"name": "CC0 1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}
    ann = out / "annotations"
    _write_json(ann / f"captions_{split}.json",
                {"info": info, "licenses": [], "images": images, "annotations": captions})
    _write_json(ann / f"llava_{split}.json", llava)
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


def _draw(objects: list[dict], rng: np.random.Generator, size: int) -> Image.Image:
    """The scene drawn at _SUPERSAMPLE times the size (`_png` downsamples it)."""
    big = size * _SUPERSAMPLE
    canvas = Image.fromarray(_background(rng, size), "RGB").resize((big, big), Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    for o in objects:
        ax, ay = _ANCHORS[o["position"]]
        dx, dy = rng.uniform(-_JITTER, _JITTER, size=2)
        cx, cy, r = (ax + dx) * big, (ay + dy) * big, _RADIUS[o["size"]] * big
        fill = _RGB[o["colour"]]
        if o["shape"] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif o["shape"] == "square":
            h = 0.9 * r  # a full-box square looks much bigger than a circle of the same radius
            draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
        elif o["shape"] == "triangle":
            draw.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=fill)
        else:  # cross: a plus sign
            w = 0.32 * r
            draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
            draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    return canvas


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


def _phrase(o: dict, rng: np.random.Generator) -> str:
    where = _WHERE[o["position"]][rng.integers(2)]
    return f"a {o['size']} {o['colour']} {o['shape']} {where}"


def _captions(objects: list[dict], rng: np.random.Generator) -> list[str]:
    """Five paraphrases, each naming every object fully; distinct openings keep them distinct."""
    captions = []
    for opening in rng.choice(len(_OPENINGS), size=5, replace=False):
        phrases = [_phrase(objects[k], rng) for k in rng.permutation(len(objects))]
        connector = _CONNECTORS[rng.integers(len(_CONNECTORS))]
        if len(phrases) == 1:
            body = phrases[0]
        elif connector == "with":
            body = f"{phrases[0]} with " + " and ".join(phrases[1:])
        elif connector == ",":
            body = ", ".join(phrases)
        else:
            body = " and ".join(phrases)
        captions.append(f"{_OPENINGS[opening]} {body}".strip())
    return captions


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _qa(question: str, question_type: str, answer_type: str, answer: str, sentence: str) -> dict:
    return {"question": question, "question_type": question_type, "answer_type": answer_type,
            "answer": answer, "sentence": sentence}


def _questions(objects: list[dict], rng: np.random.Generator, allow_novel: bool) -> list[dict]:
    """3 to 5 distinct questions about the image, each with its canonical answer and a sentence answer."""
    n = len(objects)
    shapes = [o["shape"] for o in objects]
    combos = [(o["colour"], o["shape"]) for o in objects]
    candidates = [_qa("how many shapes are there?", "how many", "number", str(n),
                      f"there {'is 1 shape' if n == 1 else f'are {n} shapes'}.")]
    for o in objects:
        colour, shape, where = o["colour"], o["shape"], _WHERE[o["position"]][0]
        candidates.append(_qa(f"what shape is {where}?", "what shape is", "other", shape, f"it is {_a(shape)}."))
        # "the X" only makes sense when X is unique in the image.
        if shapes.count(shape) == 1:
            candidates.append(_qa(f"what colour is the {shape}?", "what colour is the", "other", colour,
                                  f"the {shape} is {colour}."))
        if combos.count((colour, shape)) == 1:
            candidates.append(_qa(f"where is the {colour} {shape}?", "where is the", "other", o["position"],
                                  f"it is {where}."))
            candidates.append(_qa(f"what size is the {colour} {shape}?", "what size is the", "other", o["size"],
                                  f"it is {o['size']}."))
    # One yes/no candidate per image, its answer a fair coin, keeps yes and no balanced.
    if rng.random() < 0.5:
        colour, shape = combos[rng.integers(n)]
        answer, sentence = "yes", f"yes, there is {_a(colour)} {shape}."
    else:
        # Outside test_novel even a "no" question must not mention a novel combination.
        absent = [c for c in (_ALL_COMBOS if allow_novel else _FAMILIAR) if c not in combos]
        colour, shape = absent[rng.integers(len(absent))]
        answer, sentence = "no", f"no, there is no {colour} {shape}."
    candidates.append(_qa(f"is there {_a(colour)} {shape}?", "is there a", "yes/no", answer, sentence))
    # Two objects of the same colour and shape leave only four candidates.
    picks = rng.choice(len(candidates), size=min(int(rng.integers(3, 6)), len(candidates)), replace=False)
    return [candidates[k] for k in picks]


def _human_answers(answer: str, rng: np.random.Generator) -> list[dict]:
    """Ten annotators: at least six give the canonical answer, the rest a realistic variant."""
    if answer in _NUMBER_WORDS:
        variants = [_NUMBER_WORDS[answer], _NUMBER_WORDS[answer].capitalize()]
    else:
        variants = [answer.capitalize(), f"{answer}."] + ([f"the {answer}"] if answer in POSITIONS else [])
    variants += _SYNONYMS.get(answer, [])
    given = [answer] * 10
    for slot in rng.choice(10, size=int(rng.integers(0, 5)), replace=False):
        given[slot] = variants[rng.integers(len(variants))]
    return [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(given)]


def _conversations(stem: str, image: str, captions: list[str], qas: list[dict],
                   rng: np.random.Generator) -> list[dict]:
    """A one-turn description request and a 2-3 turn question conversation, LLaVA style."""
    caption = captions[rng.integers(len(captions))]
    describe = [{"from": "human", "value": f"<image>\n{_DESCRIBE[rng.integers(len(_DESCRIBE))]}"},
                {"from": "gpt", "value": f"{caption[0].upper()}{caption[1:]}."}]
    turns = []
    for k in rng.choice(len(qas), size=int(rng.integers(2, 4)), replace=False):
        qa = qas[k]
        answer = qa["sentence"] if rng.random() < 0.5 else qa["answer"]
        turns += [{"from": "human", "value": qa["question"]}, {"from": "gpt", "value": answer}]
    turns[0]["value"] = f"<image>\n{turns[0]['value']}"
    return [{"id": f"{stem}_describe", "image": image, "conversations": describe},
            {"id": f"{stem}_qa", "image": image, "conversations": turns}]


class _ShardWriter:
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
