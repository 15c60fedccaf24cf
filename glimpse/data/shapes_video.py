"""The moving-shapes world: short video clips of 1 to 3 shapes whose answers need more than one frame.

Each shape appears at some frame (most are there from the start), moves left, right, up or down or
stays still, bounces off the walls, may change colour and may disappear.  Two rules of the world give
time an arrow: a moving shape slows down (friction), and a colour change steps forward along the
rainbow (red, orange, yellow, green, blue, purple, red).  A quarter of the clips are written reversed,
and their annotations describe what plays: what moved left moves right, what disappeared appears.

Every caption and answer is computed from the per-frame tracks as they play (`observe`), so a clip
reversed at evaluation time (`reverse_tracks`) gets its own exact caption: the minimal pairs of
retrieval.  Clips are real H.264 MP4 files (glimpse.data.video); annotations use the formats of
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
from glimpse.data.video import write_video
from glimpse.errors import GlimpseError

SPLITS = ["train", "val", "test", "test_novel"]
DIRECTIONS = ["left", "right", "up", "down"]
RAINBOW = ["red", "orange", "yellow", "green", "blue", "purple"]  # colour changes step forward along it
TEMPORAL_TYPES = ("direction", "bounces", "appear_order", "disappear_order", "before_after", "arrow")
STATIC_TYPES = ("colour", "exists", "count")
FPS = 4
_STEP = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}
_RADIUS = 0.1  # of the frame: a 13-px shape at 64 px
_SPEED = (0.05, 0.08)  # of the frame per frame at the start
_FRICTION = 0.9  # speed kept from one frame to the next
_P_REVERSED = 0.25
_MAX_TRIES = 200
_NUMBERS = {1: "once", 2: "twice", 3: "three times"}
_OPENINGS = ["", "a video of", "a clip in which", "in this video", "we see", "a short clip of", "this video shows"]
_MOVES = ["moves", "goes", "heads", "travels"]
_STILL = ["stays still", "does not move", "stays in place"]
_TURNS = ["turns", "becomes", "changes to"]
_GONE = ["disappears", "vanishes"]
_COMES = ["appears", "shows up"]
_DESCRIBE = ["describe what happens in the video.", "what happens in this clip?", "describe the video briefly.",
             "summarise the video.", "what do you see in the video?"]


@dataclass
class Facts:
    """What a track shows as it plays."""
    shape: str
    colour: str  # at its first visible frame
    appear: int  # first visible frame (0: there from the start)
    disappear: int | None  # first frame it is gone after having been seen, if it goes
    direction: str  # its first motion: left/right/up/down, or still
    bounces: list[int]  # frames at which its motion reverses
    change: tuple[int, str] | None  # (frame, new colour)


MOTION = {("x", False): "left", ("x", True): "right", ("y", False): "up", ("y", True): "down"}  # (axis, forward)


def _horizontal(dx: np.ndarray, dy: np.ndarray) -> bool:
    """Whether steps (dx, dy) move a shape along x more than along y: its axis of motion (a tie is x, as
    `shapes_video_traces.trace_direction` reads a trace)."""
    return bool(np.abs(dx).sum() >= np.abs(dy).sum())


def observe(track: dict) -> Facts:
    """The facts of one track ({shape, colours, xs, ys}, per frame; colour None where not visible)."""
    colours, xs, ys = track["colours"], np.asarray(track["xs"]), np.asarray(track["ys"])
    seen = [t for t, c in enumerate(colours) if c]
    first, last = seen[0], seen[-1]
    dx, dy = np.diff(xs[first:last + 1]), np.diff(ys[first:last + 1])
    moving = np.abs(dx).sum() + np.abs(dy).sum() > 1e-6
    direction, bounces = "still", []
    if moving:
        axis = "x" if _horizontal(dx, dy) else "y"
        signs = np.sign(dx if axis == "x" else dy)
        direction = MOTION[axis, bool(signs[0] > 0)]
        bounces = [first + k for k in range(1, len(signs)) if signs[k] != signs[k - 1]]  # the turning frame
    change = next(((t, colours[t]) for t in seen if colours[t] != colours[first]), None)
    return Facts(track["shape"], colours[first], first, last + 1 if last + 1 < len(colours) else None,
                 direction, bounces, change)


def reverse_tracks(tracks: list[dict]) -> list[dict]:
    """The tracks of the clip played backwards."""
    return [{"shape": t["shape"], "colours": t["colours"][::-1], "xs": t["xs"][::-1], "ys": t["ys"][::-1]}
            for t in tracks]


def video_caption(tracks: list[dict]) -> str:
    """The plain caption of a clip, as it plays: "a red circle moves left and bounces once, then a blue
    square appears and stays still"."""
    return _caption([observe(t) for t in tracks], None)


def _caption(facts: list[Facts], rng) -> str:
    def pick(options):
        return options[0] if rng is None else options[rng.integers(len(options))]

    def clause(f: Facts) -> str:
        parts = [pick(_STILL) if f.direction == "still" else f"{pick(_MOVES)} {f.direction}"]
        if f.bounces:
            parts.append(f"bounces {_NUMBERS[len(f.bounces)] if len(f.bounces) in _NUMBERS else len(f.bounces)}")
        if f.change:
            parts.append(f"{pick(_TURNS)} {f.change[1]}")
        if f.disappear is not None:
            parts.append(pick(_GONE))
        return " and ".join(parts) if len(parts) < 3 else ", ".join(parts[:-1]) + " and " + parts[-1]

    order = sorted(facts, key=lambda f: (f.appear, world.SHAPES.index(f.shape)))
    start = [f"{words._a(f.colour)} {f.shape} {clause(f)}" for f in order if f.appear == 0]
    later = [f"{words._a(f.colour)} {f.shape} {pick(_COMES)} and {clause(f)}" for f in order if f.appear > 0]
    text = " while ".join(start) if len(start) == 2 and rng is not None and rng.random() < 0.5 else " and ".join(start)
    for c in later:
        text = f"{text}, then {c}" if text else c
    return text


def _captions(facts: list[Facts], rng: np.random.Generator) -> list[str]:
    """Five captions: the plain one first, then paraphrases with openings and other verbs."""
    caps = [_caption(facts, None)]
    for opening in rng.choice(len(_OPENINGS) - 1, size=4, replace=False) + 1:
        caps.append(f"{_OPENINGS[opening]} {_caption(facts, rng)}")
    return caps


def _qa(question: str, answer: str, qtype: str, shapes: tuple = ()) -> dict:
    return {"question": question, "answer": answer, "question_type": qtype,
            "answer_type": "temporal" if qtype in TEMPORAL_TYPES else "static", "shapes": list(shapes)}


def answer_of(qtype: str, shapes: list[str], tracks: list[dict], reversed_: bool) -> str | None:
    """The answer to a question of type `qtype` about `shapes` (in the question's order) for a clip's tracks
    (None for types it does not recompute, before_after and exists, and for an order question whose shapes
    tie).  The generator's answers are
    these; evaluation asks them again of a clip played backwards (`reverse_tracks`, `not reversed_`)."""
    facts = {f.shape: f for f in map(observe, tracks)}
    frames = len(tracks[0]["colours"])
    if qtype == "direction":
        return facts[shapes[0]].direction
    if qtype == "bounces":
        return str(len(facts[shapes[0]].bounces))
    if qtype in ("appear_order", "disappear_order"):
        when = {s: facts[s].appear for s in shapes} if qtype == "appear_order" else \
            {s: facts[s].disappear if facts[s].disappear is not None else frames + 1 for s in shapes}
        # a tie (both there from the start, say, as in a reversal) has no answer: the generator never asks it
        return min(shapes, key=when.get) if len(set(when.values())) == len(shapes) else None
    if qtype == "arrow":
        return "reverse" if reversed_ else "forward"
    if qtype == "colour":
        return facts[shapes[0]].colour
    if qtype == "count":
        return str(len(tracks))
    return None


def _questions(facts: list[Facts], frames: int, reversed_: bool, rng: np.random.Generator,
               allow_novel: bool) -> list[dict]:
    """Up to four temporal questions (no single frame answers them), up to two static ones and "is there"."""
    temporal, static = [], []
    for f in facts:
        temporal.append(_qa(f"which way does the {f.shape} move first?", f.direction, "direction", (f.shape,)))
        if f.direction != "still":
            temporal.append(_qa(f"how many times does the {f.shape} bounce?", str(len(f.bounces)), "bounces",
                                (f.shape,)))
    for i, a in enumerate(facts):
        for b in facts[i + 1:]:
            x, y = (a, b) if rng.random() < 0.5 else (b, a)
            if a.appear != b.appear:
                winner = min((a, b), key=lambda f: f.appear).shape
                temporal.append(_qa(f"which appears first, the {x.shape} or the {y.shape}?", winner, "appear_order",
                                    (x.shape, y.shape)))
            ends = [f.disappear if f.disappear is not None else frames + 1 for f in (a, b)]
            if ends[0] != ends[1]:
                winner = (a, b)[int(ends[1] < ends[0])].shape
                temporal.append(_qa(f"which disappears first, the {x.shape} or the {y.shape}?", winner,
                                    "disappear_order", (x.shape, y.shape)))
    events = [(e, f.shape, t) for f in facts for e, t in _events(f)]
    pairs = [(p, q) for p in events for q in events if p[1] != q[1] and p[2] != q[2]]
    if pairs:
        (e1, s1, t1), (e2, s2, t2) = pairs[rng.integers(len(pairs))]
        temporal.append(_qa(f"does the {s1} {e1} before or after the {s2} {e2}?", "before" if t1 < t2 else "after",
                            "before_after", (s1, s2)))
    if any(f.direction != "still" or f.change for f in facts):
        temporal.append(_qa("is the video playing forward or in reverse?", "reverse" if reversed_ else "forward",
                            "arrow"))
    # static questions only where every frame shows the answer
    steady = [f for f in facts if f.appear == 0 and f.disappear is None and f.change is None]
    for f in steady:
        static.append(_qa(f"what colour is the {f.shape}?", f.colour, "colour", (f.shape,)))
    if len(steady) == len(facts):
        static.append(_qa("how many shapes are there?", str(len(facts)), "count"))
    pick_t = rng.choice(len(temporal), size=min(4, len(temporal)), replace=False)
    pick_s = rng.choice(len(static), size=min(2, len(static)), replace=False) if static else []
    exists = [_exists(facts, steady, rng, allow_novel)] if steady else []
    return [temporal[k] for k in sorted(pick_t)] + [static[k] for k in sorted(pick_s)] + exists


def _exists(facts: list[Facts], steady: list[Facts], rng: np.random.Generator, allow_novel: bool) -> dict:
    """"is there a <colour> <shape>?", asked of every clip with a shape in view, unchanged, in every frame.
    "yes" names such a shape; "no" names a pair no frame shows, two times in three one that shares its
    colour or shape with what the clip shows (a shape in another colour, a colour on another shape: the
    binding), and never a shape that comes, goes or changes colour, so the answer is in every frame and
    the shape named does not give it away."""
    if rng.random() < 0.5:
        f = steady[rng.integers(len(steady))]
        return _qa(f"is there {words._a(f.colour)} {f.shape}?", "yes", "exists", (f.shape,))
    shown = {(f.colour, f.shape) for f in facts} | {(f.change[1], f.shape) for f in facts if f.change}
    unsteady = {f.shape for f in facts} - {f.shape for f in steady}
    pool = [c for c in (words._ALL_COMBOS if allow_novel else words._FAMILIAR)
            if c not in shown and c[1] not in unsteady]
    near = [c for c in pool if any(c[0] == a or c[1] == b for a, b in shown)]
    far = [c for c in pool if c not in near]
    pool = near if near and (not far or rng.random() < 2 / 3) else far
    colour, shape = pool[rng.integers(len(pool))]
    return _qa(f"is there {words._a(colour)} {shape}?", "no", "exists", (shape,))


def _events(f: Facts) -> list[tuple[str, int]]:
    out = [("appear", f.appear)] if f.appear > 0 else []
    if f.disappear is not None:
        out.append(("disappear", f.disappear))
    if f.change:
        out.append(("change colour", f.change[0]))
    if len(f.bounces) == 1:
        out.append(("bounce", f.bounces[0]))
    return out


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
                          n_test: int = 500, frames: int = 8, image_size: int = 64, progress: bool = True) -> dict:
    """Write the moving-shapes world into `out` (a new or empty folder) and return its world.json.
    The same arguments always write byte-identical files; world.json, written last, marks it complete."""
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


def _write_clip(path: Path, tracks: list[dict], background: np.ndarray) -> None:
    write_video(render(tracks, background), path, fps=FPS)


def _conversations(stem: str, video: str, caption: str, qas: list[dict], rng) -> list[dict]:
    describe = [{"from": "human", "value": f"<video>\n{_DESCRIBE[rng.integers(len(_DESCRIBE))]}"},
                {"from": "gpt", "value": f"{caption[0].upper()}{caption[1:]}."}]
    turns = []
    for k in rng.choice(len(qas), size=min(len(qas), int(rng.integers(2, 4))), replace=False):
        turns += [{"from": "human", "value": qas[k]["question"]}, {"from": "gpt", "value": qas[k]["answer"]}]
    turns[0]["value"] = f"<video>\n{turns[0]['value']}"
    return [{"id": f"{stem}_describe", "video": video, "conversations": describe},
            {"id": f"{stem}_qa", "video": video, "conversations": turns}]


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


def clip_captions(tracks: list[dict], rng: np.random.Generator) -> list[str]:
    """Five captions of a clip as its tracks play (the plain one first): what a clip reversed in training
    is described by."""
    return _captions([observe(t) for t in tracks], rng)


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
