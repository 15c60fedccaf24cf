"""Traced answers of the moving-shapes world: an answer to a direction, bounce or order question spelt out
first as a per-frame trace of where its shapes are ("the circle 1:-- 2:25 3:35, so right"), computed from
the world's tracks as the clip plays.  A video LLaVA trained on them (`model.answer_traces`) must locate
the shapes frame by frame and then read the answer off its own trace; evaluation reads what follows the
trace (`final_answer`).  Why and what it showed: docs/design.md, docs/results.md (sessions 18-20).
"""

from __future__ import annotations

from glimpse.data.shapes_video_text import MOTION

TRACE_CELLS = 8  # a trace's cells along an axis: 8 px at 64 px
TRACED_TYPES = ("direction", "bounces", "appear_order", "disappear_order", "before_after")
TRACE_STYLES = ("frames", "changes")  # every frame, or only the frames where a shape's cell changes
SO = ", so "  # between a traced answer's trace and its answer


def answer_trace(qtype: str, shapes: list[str], tracks: list[dict], size: int, style: str = "frames") -> str | None:
    """Where the question's shapes are in each frame, as a traced answer spells it out before the answer
    ("the circle 1:-- 2:25 3:35 4:45"): per frame its number, then the shape's cell along x and along y on a
    grid of TRACE_CELLS, "--" where it is not visible.  A direction, bounces or an order is then read off
    the trace (`trace_direction`), a step the LM cannot skip (chain-of-thought supervision).  Both axes, so
    the axis of motion is read off the trace, not chosen before it (session 20); the frame's number, so the
    LM finds the frame a cell is for by its number rather than by counting the cells it has written
    (docs/results.md, session 20).  None for a type with no shapes to trace (the arrow of time, static
    questions).

    style "changes" keeps only a shape's first visible frame, each frame where its cell differs from the
    frame before, and its last visible frame ("the circle 2:25 4:35 6:45 8:45"): the same first motion,
    bounces and order, but no entry that copies the one before it.  Every frame's trace repeats the
    previous cell in 2 of 3 entries (8-px cells, 2-5 px a frame), which an LM trained by teacher forcing
    can learn instead of looking (session 21)."""
    if qtype not in TRACED_TYPES:
        return None

    def cell(v: float) -> str:
        return str(min(TRACE_CELLS - 1, max(0, int(v * TRACE_CELLS / size))))

    if style not in TRACE_STYLES:
        raise ValueError(f"trace style {style!r}: one of {TRACE_STYLES}")
    by_shape = {t["shape"]: t for t in tracks}
    parts = []
    for shape in shapes:
        t = by_shape[shape]
        cells = [cell(x) + cell(y) if c else None for c, x, y in zip(t["colours"], t["xs"], t["ys"])]
        if style == "frames":
            entries = [f"{k + 1}:{c or '--'}" for k, c in enumerate(cells)]
        else:
            seen = [k for k, c in enumerate(cells) if c]
            keep = [k for i, k in enumerate(seen) if i == 0 or k == seen[-1] or cells[k] != cells[seen[i - 1]]]
            entries = [f"{k + 1}:{cells[k]}" for k in keep]
        parts.append(f"the {shape} {' '.join(entries)}")
    return ", ".join(parts)


def trace_direction(part: str) -> str:
    """The first motion a one-shape trace ("the circle 1:-- 2:25 ...", either style) shows: along the axis
    whose cell changes most, the sign of its first change; "still" where no cell changes."""
    seen = [w.split(":")[1] for w in part.split()[2:] if not w.endswith("--")]
    moves = {axis: [int(b[i]) - int(a[i]) for a, b in zip(seen, seen[1:]) if b[i] != a[i]]
             for i, axis in enumerate(("x", "y"))}
    axis = max(("x", "y"), key=lambda a: sum(map(abs, moves[a])))  # a tie goes to x, as in _horizontal
    return MOTION[axis, moves[axis][0] > 0] if moves[axis] else "still"


def traced_answer_tokens(frames: int) -> int:
    """Room for the longest traced answer: two shapes' traces of up to five tokens a frame ("4:25" is five
    where "4" is not one token), the separators and the answer."""
    return 2 * (4 + 5 * frames) + 16


def traced(answer: str, trace: str | None) -> str:
    return answer if trace is None else f"{trace}{SO}{answer}"


def final_answer(text: str) -> str:
    """The answer of a generated text, traced or not: what follows the trace's ", so "."""
    return text.rsplit(SO.strip(), 1)[-1].strip() if SO.strip() in text else text
