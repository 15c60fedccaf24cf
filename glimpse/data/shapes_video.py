"""The moving-shapes world: short video clips of 1 to 3 shapes whose answers need more than one frame.

Each shape appears at some frame (most are there from the start), moves left, right, up or down or
stays still, bounces off the walls, may change colour and may disappear.  Two rules of the world give
time an arrow: a moving shape slows down (friction), and a colour change steps forward along the
rainbow (red, orange, yellow, green, blue, purple, red).  A quarter of the clips are written reversed,
and their annotations describe what plays: what moved left moves right, what disappeared appears.

Every caption and answer is computed from the per-frame tracks as they play
(glimpse.data.shapes_video_text), so a clip reversed at evaluation time gets its own exact caption: the
minimal pairs of retrieval.  Clips are real H.264 MP4 files (glimpse.data.video); annotations use the formats of
real video sets: MSR-VTT's captions (`videos` + `sentences`), MSVD-QA/MSRVTT-QA's question lists and
LLaVA-Video's conversations with a `<video>` placeholder.  `test_novel` holds colour-shape pairs that
never appear in training.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from glimpse.data import shapes as world
from glimpse.data import shapes_words as words
from glimpse.data.shapes_video_text import _captions, _conversations, _questions, observe, reverse_tracks
from glimpse.data.video import write_video
from glimpse.errors import GlimpseError

SPLITS = ["train", "val", "test", "test_novel"]
DIRECTIONS = ["left", "right", "up", "down"]
RAINBOW = ["red", "orange", "yellow", "green", "blue", "purple"]  # colour changes step forward along it
FPS = 4
_STEP = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}
_RADIUS = 0.1  # of the frame: a 13-px shape at 64 px
_SPEED = (0.05, 0.08)  # of the frame per frame at the start
_FRICTION = 0.9  # speed kept from one frame to the next
_P_REVERSED = 0.25
_MAX_TRIES = 200


def _sample_clip(rng: np.random.Generator, frames: int, size: int, novel: bool) -> list[dict]:
    """Tracks of 1-3 distinct shapes that never overlap, as the world's physics moves them."""
    r = _RADIUS * size
    for _ in range(_MAX_TRIES):
        n = int(rng.choice(3, p=world._N_OBJECTS_P)) + 1
        shapes = [world.SHAPES[k] for k in rng.choice(len(world.SHAPES), size=n, replace=False)]
        novel_slot = int(rng.integers(n)) if novel else -1
        tracks = [_sample_track(rng, shape, frames, size, r, slot == novel_slot, novel)
                  for slot, shape in enumerate(shapes)]
        if None not in tracks and not _overlap(tracks, r):
            return tracks
    raise GlimpseError(f"could not place the shapes of a clip without overlap in {_MAX_TRIES} tries")


def _sample_track(rng, shape: str, frames: int, size: int, r: float, novel_slot: bool, novel: bool) -> dict | None:
    pool = words.NOVEL_COMBOS if novel_slot else words._ALL_COMBOS if novel else words._FAMILIAR
    pool = [c for c in pool if c[1] == shape]
    if not pool:
        return None
    colour = pool[rng.integers(len(pool))][0]
    appear = 0 if rng.random() < 0.6 else int(rng.integers(1, frames // 2 + 1))
    gone = frames if rng.random() < 0.6 or appear + 3 > frames - 1 else int(rng.integers(appear + 3, frames))
    colours = [colour] * frames
    if rng.random() < 0.3 and not novel_slot and gone - appear >= 3:
        new = RAINBOW[(RAINBOW.index(colour) + 1) % len(RAINBOW)]
        allowed = words._ALL_COMBOS if novel else words._FAMILIAR
        if (new, shape) not in allowed:
            return None
        at = int(rng.integers(appear + 1, gone - 1))
        colours[at:] = [new] * (frames - at)
    direction = ["left", "right", "up", "down", "still"][rng.integers(5)]
    speed = rng.uniform(*_SPEED) * size if direction != "still" else 0.0
    v = np.array(_STEP[direction], float) * speed
    p = rng.uniform(r, size - r, size=2)
    xs, ys = [], []
    for _ in range(frames):
        xs.append(round(float(p[0]), 3))
        ys.append(round(float(p[1]), 3))
        p = p + v
        for k in range(2):  # a wall reflects the shape and its motion
            if p[k] < r:
                p[k], v[k] = 2 * r - p[k], -v[k]
            elif p[k] > size - r:
                p[k], v[k] = 2 * (size - r) - p[k], -v[k]
        v = v * _FRICTION
    return {"shape": shape, "colours": [c if appear <= t < gone else None for t, c in enumerate(colours)],
            "xs": xs, "ys": ys}


def _overlap(tracks: list[dict], r: float) -> bool:
    gap = 2 * r + 1
    for t in range(len(tracks[0]["xs"])):
        shown = [(tr["xs"][t], tr["ys"][t]) for tr in tracks if tr["colours"][t]]
        for i, (x1, y1) in enumerate(shown):
            if any(abs(x1 - x2) < gap and abs(y1 - y2) < gap for x2, y2 in shown[i + 1:]):
                return True
    return False


def render(tracks: list[dict], background: np.ndarray) -> np.ndarray:
    """The clip's frames, uint8 [T, H, W, 3]: each drawn at 4x and downsampled, as the image world is."""
    size = background.shape[0]
    big = size * world._SUPERSAMPLE
    base = Image.fromarray(background, "RGB").resize((big, big), Image.NEAREST)
    out = []
    for t in range(len(tracks[0]["xs"])):
        canvas = base.copy()
        draw = ImageDraw.Draw(canvas)
        for tr in tracks:
            if tr["colours"][t]:
                s = world._SUPERSAMPLE
                world.draw_shape(draw, tr["shape"], tr["xs"][t] * s, tr["ys"][t] * s, _RADIUS * big,
                                 world._RGB[tr["colours"][t]])
        out.append(np.asarray(canvas.resize((size, size), Image.LANCZOS)))
    return np.stack(out)


def generate_shapes_video(out: str | Path, *, seed: int = 0, n_train: int = 4000, n_val: int = 200,
                          n_test: int = 500, frames: int = 8, image_size: int = 64, shards: bool = False,
                          progress: bool = True) -> dict:
    """Write the moving-shapes world into `out` (a new or empty folder) and return its world.json; with `shards`,
    also each split's clips and captions as WebDataset shards (`shards/SPLIT-*.tar`: KEY.mp4 and KEY.json with
    its "captions", as WebVid-style sets hold them) and its LLaVA-Video records (`shards/llava_video_SPLIT-*.tar`:
    the clip and the record).  The same arguments always write byte-identical files;
    world.json, written last, marks it complete."""
    out = Path(out)
    counts = {"train": n_train, "val": n_val, "test": n_test, "test_novel": n_test}
    for split, n in counts.items():
        if not isinstance(n, int) or n < 0:
            raise GlimpseError(f"{out}: the number of {split} clips must be a non-negative integer, not {n!r}")
    if not isinstance(frames, int) or not 8 <= frames <= 16:
        raise GlimpseError(f"{out}: frames must be an integer from 8 to 16, not {frames!r}")
    if not isinstance(image_size, int) or image_size < 32 or image_size % 2:
        raise GlimpseError(f"{out}: image_size must be an even integer of at least 32, not {image_size!r}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise GlimpseError(f"{out}: already exists and is not an empty folder; choose a new one")
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    for index, split in enumerate(SPLITS):
        _write_split(out, split, index, counts[split], seed, frames, image_size, progress)
        if shards:
            _write_shards(out, split)
    info = {"kind": "shapes-video", "version": 1, "seed": seed, "frames": frames, "fps": FPS,
            "image_size": image_size, "splits": counts, "colours": list(world.COLOURS),
            "shapes": list(world.SHAPES), "directions": DIRECTIONS + ["still"],
            "novel_combos": [list(c) for c in words.NOVEL_COMBOS]}
    (out / "world.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info


def _write_split(out: Path, split: str, index: int, n: int, seed: int, frames: int, size: int,
                 progress: bool) -> None:
    rng = np.random.default_rng(np.random.SeedSequence([seed, 100 + index]))
    folder = out / "videos" / split
    folder.mkdir(parents=True, exist_ok=True)
    videos, sentences, qa, llava = [], [], [], []
    # drawing and encoding (most of the time; Pillow and FFmpeg release the GIL) on two threads,
    # while the seeded sampling stays in order here
    with ThreadPoolExecutor(2) as pool:
        jobs = []
        for i in tqdm(range(n), desc=f"shapes-video {split}", unit="clip", disable=not progress):
            tracks = _sample_clip(rng, frames, size, split == "test_novel")
            reversed_ = bool(rng.random() < _P_REVERSED)
            if reversed_:
                tracks = reverse_tracks(tracks)
            background = world._background(rng, size)
            stem = f"{split}_{i:06d}"
            jobs.append(pool.submit(_write_clip, folder / f"{stem}.mp4", tracks, background))
            facts = [observe(t) for t in tracks]
            caps = _captions(facts, rng)
            qas = _questions(facts, frames, reversed_, rng, split == "test_novel")
            video = f"videos/{split}/{stem}.mp4"
            videos.append({"video_id": stem, "id": i, "file_name": f"{stem}.mp4", "split": split, "start time": 0.0,
                           "end time": frames / FPS, "frames": frames, "fps": FPS, "width": size, "height": size,
                           "reversed": reversed_, "tracks": tracks})
            sentences += [{"caption": c, "video_id": stem, "sen_id": i * 5 + k} for k, c in enumerate(caps)]
            qa += [{"id": i * 10 + k, "video_id": stem, "video": video, **q} for k, q in enumerate(qas)]
            llava += _conversations(stem, video, caps[0], qas, rng)
        for job in jobs:
            job.result()
    info = {"description": f"glimpse moving-shapes world, {split} split", "version": "1", "seed": seed}
    ann = out / "annotations"
    _write_json(ann / f"captions_{split}.json", {"info": info, "videos": videos, "sentences": sentences})
    _write_json(ann / f"qa_{split}.json", qa)
    _write_json(ann / f"llava_video_{split}.json", llava)


def _write_shards(out: Path, split: str) -> None:
    from glimpse.data.shapes import ShardWriter

    data = json.loads((out / "annotations" / f"captions_{split}.json").read_text(encoding="utf-8"))
    captions: dict[str, list[str]] = {}
    for s in data["sentences"]:
        captions.setdefault(s["video_id"], []).append(s["caption"])
    records: dict[str, list[dict]] = {}
    for r in json.loads((out / "annotations" / f"llava_video_{split}.json").read_text(encoding="utf-8")):
        records.setdefault(r["id"].rsplit("_", 1)[0], []).append(r)
    (out / "shards").mkdir(exist_ok=True)
    writer, llava = ShardWriter(out / "shards", split), ShardWriter(out / "shards", f"llava_video_{split}")
    try:
        for v in data["videos"]:
            clip = (out / "videos" / split / v["file_name"]).read_bytes()
            writer.add(v["video_id"], {"mp4": clip, "json": _dumps({"captions": captions[v["video_id"]]})})
            for r in records.get(v["video_id"], []):
                llava.add(r["id"], {"mp4": clip, "json": _dumps(r)})
    finally:
        try:
            writer.close()
        finally:
            llava.close()


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _write_clip(path: Path, tracks: list[dict], background: np.ndarray) -> None:
    write_video(render(tracks, background), path, fps=FPS)


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n", encoding="utf-8")


@dataclass
class Clip:
    path: str
    video_id: str
    captions: list[str]
    tracks: list[dict] | None = None  # the moving-shapes world's record; None for real videos
    reversed: bool = False
    width: int | None = None  # pixels, where the annotation says


def read_clips(annotation_file: str | Path, video_root: str | Path, split: str | None = None) -> list[Clip]:
    """The clips of an MSR-VTT-style captions file (`videos` + `sentences`) with their captions, in the
    order of its `videos` list: the moving-shapes world's `captions_{split}.json`, or MSR-VTT's own
    `train_val_videodatainfo.json` (one file for every split: pass `split` to keep one; a video's file is
    its `file_name`, or `{video_id}.mp4`).  Videos without a caption are left out."""
    path = Path(annotation_file)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        caps: dict[str, list[str]] = {}
        for s in data["sentences"]:
            caps.setdefault(str(s["video_id"]), []).append(str(s["caption"]).strip())
        out = []
        for v in data["videos"]:
            vid = str(v["video_id"])
            if vid in caps and (split is None or v.get("split", split) == split):
                out.append(Clip(str(Path(video_root) / v.get("file_name", f"{vid}.mp4")), vid, caps[vid],
                                v.get("tracks"), bool(v.get("reversed", False)), v.get("width")))
        return out
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise GlimpseError(f"cannot read the video captions of {path}: {e!r}") from None


def world_texts(root: Path):
    """Every text a model of the world reads: captions, questions, answers and the conversation turns."""
    from glimpse.data.chat import PROMPT_WORDS

    ann = Path(root) / "annotations"
    for s in json.loads((ann / "captions_train.json").read_text())["sentences"]:
        yield s["caption"]
    for q in json.loads((ann / "qa_train.json").read_text()):
        yield q["question"]
        yield q["answer"]
    for record in json.loads((ann / "llava_video_train.json").read_text()):
        for turn in record["conversations"]:
            yield turn["value"].replace("<video>", "")
    yield from PROMPT_WORDS
