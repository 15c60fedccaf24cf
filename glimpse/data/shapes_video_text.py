"""What the moving-shapes world says about a clip: the facts its tracks show as they play (`observe`),
and the captions, questions, answers and conversations computed from them.  Every one is computed from
the per-frame tracks, so a clip reversed at evaluation time (`reverse_tracks`) gets its own exact caption
and answers.  The world itself (physics, drawing, files) is glimpse.data.shapes_video."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from glimpse.data import shapes as world
from glimpse.data import shapes_words as words

TEMPORAL_TYPES = ("direction", "bounces", "appear_order", "disappear_order", "before_after", "arrow")
STATIC_TYPES = ("colour", "exists", "count")
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


def clip_captions(tracks: list[dict], rng: np.random.Generator) -> list[str]:
    """Five captions of a clip as its tracks play (the plain one first): what a clip reversed in training
    is described by."""
    return _captions([observe(t) for t in tracks], rng)


def _conversations(stem: str, video: str, caption: str, qas: list[dict], rng) -> list[dict]:
    describe = [{"from": "human", "value": f"<video>\n{_DESCRIBE[rng.integers(len(_DESCRIBE))]}"},
                {"from": "gpt", "value": f"{caption[0].upper()}{caption[1:]}."}]
    turns = []
    for k in rng.choice(len(qas), size=min(len(qas), int(rng.integers(2, 4))), replace=False):
        turns += [{"from": "human", "value": qas[k]["question"]}, {"from": "gpt", "value": qas[k]["answer"]}]
    turns[0]["value"] = f"<video>\n{turns[0]['value']}"
    return [{"id": f"{stem}_describe", "video": video, "conversations": describe},
            {"id": f"{stem}_qa", "video": video, "conversations": turns}]
