"""The video LLaVA's training records from the moving-shapes world: reversed and still twins, every
question of a clip, and answers traced frame by frame; and the same records streamed from shards."""

from __future__ import annotations

import json
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("av")

from glimpse.data import shapes_video as sv  # noqa: E402
from glimpse.data import shapes_video_text as svt  # noqa: E402
from glimpse.data import shapes_video_traces as tr  # noqa: E402
from glimpse.data.shapes import SHAPES  # noqa: E402
from glimpse.families.video_llava import data as records  # noqa: E402


def test_reversed_twins_answer_as_the_clip_played_backwards(video_world):
    cfg = SimpleNamespace(source="shapes-video")
    plain, both = records.video_records(cfg, video_world, "train"), records.video_records(cfg, video_world, "train", twins=True)
    twins = [r for r in both if r["images"][0].endswith(records.REVERSED)]
    assert [r for r in both if not r["images"][0].endswith(records.REVERSED)] == plain and twins
    videos = {v["video_id"]: v for v in
              json.loads((video_world / "annotations" / "captions_train.json").read_text())["videos"]}
    qa = {(q["video_id"], q["question"]): q for q in json.loads((video_world / "annotations" / "qa_train.json").read_text())}
    flipped = 0
    for twin in twins:
        path, backwards = records.reversed_source(twin["images"][0])
        assert backwards and twin["messages"][0]["content"].startswith("<image>\n")
        v = videos[path.rsplit("/", 1)[1].removesuffix(".mp4")]
        back = svt.reverse_tracks(v["tracks"])
        turns = twin["messages"]
        for ask, answer in zip(turns[::2], turns[1::2]):
            question = ask["content"].removeprefix("<image>\n")
            q = qa.get((v["video_id"], question))
            if q is None:  # the description
                assert answer["content"].lower().rstrip(".") == svt.video_caption(back)
                continue
            expected = svt.answer_of(q["question_type"], q["shapes"], back, not v["reversed"])
            assert answer["content"] == (q["answer"] if expected is None else expected), (q, answer)
            assert q["question_type"] != "before_after"
            flipped += answer["content"] != q["answer"]
    assert flipped > len(twins) // 4


def test_still_twins_ask_only_static_questions_of_the_held_middle_frame(video_world):
    cfg = SimpleNamespace(source="shapes-video")
    plain, both = records.video_records(cfg, video_world, "train"), records.video_records(cfg, video_world, "train", stills=True)
    stills = [r for r in both if r["images"][0].endswith(records.STILL)]
    assert [r for r in both if not r["images"][0].endswith(records.STILL)] == plain
    qa = {(q["video_id"], q["question"]): q for q in json.loads((video_world / "annotations" / "qa_train.json").read_text())}
    static = {k for k, q in qa.items() if q["answer_type"] == "static"}
    asked = set()
    for still in stills:
        path, held = records.still_source(still["images"][0])
        assert held and path.endswith(".mp4") and still["messages"][0]["content"].startswith("<image>\n")
        vid = path.rsplit("/", 1)[1].removesuffix(".mp4")
        turns = still["messages"]
        for ask, answer in zip(turns[::2], turns[1::2]):
            q = qa[(vid, ask["content"].removeprefix("<image>\n"))]
            assert q["answer_type"] == "static" and answer["content"] == q["answer"]
            asked.add((vid, q["question"]))
    assert asked == static and static  # every static question of the split, once, and nothing else

    clip = torch.arange(8 * 3.0).reshape(8, 3, 1, 1)
    held = records.hold_middle(clip)
    assert held.shape == clip.shape and (held == clip[4]).all()


def test_all_questions_asks_every_question_of_each_clip_in_its_conversation(video_world):
    cfg = SimpleNamespace(source="shapes-video")
    plain, full = records.video_records(cfg, video_world, "train"), records.video_records(cfg, video_world, "train", all_questions=True)
    assert len(plain) == len(full)
    world = defaultdict(set)
    for q in json.loads((video_world / "annotations" / "qa_train.json").read_text()):
        world[q["video_id"]].add((q["question"], q["answer"]))
    more = 0
    for a, b in zip(plain, full):
        assert a["images"] == b["images"]
        vid = b["images"][0].rsplit("/", 1)[1].removesuffix(".mp4")
        turns = b["messages"]
        assert turns[0]["content"].startswith("<image>\n")
        pairs = {(x["content"].removeprefix("<image>\n"), y["content"]) for x, y in zip(turns[::2], turns[1::2])}
        if a["messages"][1]["content"][0].isupper():  # the description stays as it was
            assert a == b
            continue
        assert pairs == world[vid] and len(turns) == 2 * len(world[vid])
        more += len(turns) > len(a["messages"])
    assert more > len(plain) // 4  # most clips' conversations picked only some of their questions
    # reversed twins are made from the full records
    both = records.video_records(cfg, video_world, "train", all_questions=True, twins=True)
    assert [r for r in both if not r["images"][0].endswith(records.REVERSED)] == full


def test_answer_trace_spells_out_each_frame_of_the_shapes_by_its_number_on_both_axes():
    right = {"shape": "circle", "colours": [None, "red", "red", "red", "red", None],
             "xs": [10.0, 10.0, 19.0, 27.0, 30.0, 30.0], "ys": [40.0] * 6}
    down = {"shape": "square", "colours": ["blue"] * 6, "xs": [50.0] * 6, "ys": [5.0, 12.0, 18.0, 23.0, 20.0, 63.9]}
    tracks = [right, down]
    assert tr.answer_trace("direction", ["circle"], tracks, 64) == "the circle 1:-- 2:15 3:25 4:35 5:35 6:--"
    assert tr.answer_trace("appear_order", ["square", "circle"], tracks, 64) == \
        "the square 1:60 2:61 3:62 4:62 5:62 6:67, the circle 1:-- 2:15 3:25 4:35 5:35 6:--"
    assert tr.answer_trace("arrow", [], tracks, 64) is None and tr.answer_trace("colour", ["circle"], tracks, 64) is None
    text = tr.traced("right", tr.answer_trace("direction", ["circle"], tracks, 64))
    assert text == "the circle 1:-- 2:15 3:25 4:35 5:35 6:--, so right"
    assert tr.final_answer(text) == "right" and tr.final_answer("left") == "left"
    # the direction is read off the trace: the axis whose cells change most, the sign of its first change
    assert tr.trace_direction("the circle 1:-- 2:15 3:25 4:35 5:35 6:--") == "right" == svt.observe(right).direction
    assert tr.trace_direction("the square 1:60 2:61 3:62 4:62 5:62 6:67") == "down" == svt.observe(down).direction
    assert tr.trace_direction("the star 1:42 2:41 3:--") == "up"
    assert tr.trace_direction("the star 1:42 2:42 3:42") == "still"
    # only where a cell changes, and the first and last frames seen: no entry copies the one before it
    assert tr.answer_trace("direction", ["circle"], tracks, 64, "changes") == "the circle 2:15 3:25 4:35 5:35"
    assert tr.answer_trace("appear_order", ["square", "circle"], tracks, 64, "changes") == \
        "the square 1:60 2:61 3:62 6:67, the circle 2:15 3:25 4:35 5:35"
    still = {"shape": "star", "colours": ["red"] * 3 + [None], "xs": [33.0] * 4, "ys": [17.0] * 4}
    assert tr.answer_trace("direction", ["star"], [still], 64, "changes") == "the star 1:42 3:42"
    assert tr.trace_direction("the star 1:42 3:42") == "still" == svt.observe(still).direction
    with pytest.raises(ValueError, match="trace style"):
        tr.answer_trace("direction", ["star"], [still], 64, "sparse")


@pytest.mark.parametrize("style", ["frames", "changes"])
def test_the_worlds_traces_imply_its_direction_answers(video_world, style):
    """The answer a trace implies (`trace_direction`) is the world's for nearly every direction question:
    the trace's 8-px cells miss a shape that moves less than one cell while visible, or whose first motion
    before a bounce is shorter than a cell (0.96 of the full world's questions agree)."""

    clips = {c.video_id: c for c in sv.read_clips(video_world / "annotations/captions_train.json",
                                                  video_world / "videos/train")}
    qa = [q for q in json.loads((video_world / "annotations/qa_train.json").read_text())
          if q["question_type"] == "direction"]
    agree = [tr.trace_direction(tr.answer_trace("direction", q["shapes"], clips[q["video_id"]].tracks,
                                                clips[q["video_id"]].width, style)) == q["answer"] for q in qa]
    assert len(agree) >= 10 and sum(agree) >= 0.9 * len(agree), (sum(agree), len(agree))


@pytest.mark.parametrize("twins,style", [(False, "frames"), (True, "frames"), (True, "changes")])
def test_traced_answers_trace_the_asked_shapes_and_end_in_the_worlds_answer(video_world, twins, style):
    cfg = SimpleNamespace(source="shapes-video")
    plain = records.video_records(cfg, video_world, "train", twins=twins)
    traced = records.video_records(cfg, video_world, "train", twins=twins, traces=True, trace_style=style)
    assert [r["images"] for r in plain] == [r["images"] for r in traced]
    spelt = 0
    for a, b in zip(plain, traced):
        for m, n in zip(a["messages"], b["messages"]):
            if m["role"] == "user" or m == n:
                assert m == n
                continue
            spelt += 1
            trace, answer = n["content"].rsplit(tr.SO, 1)
            assert answer == m["content"] == tr.final_answer(n["content"])
            for part in trace.split(", "):  # "the circle 1:-- 2:25 ...": a frame's number, then its cells or "--"
                words = part.split()
                assert words[0] == "the" and words[1] in SHAPES, part
                entries = [w.split(":") for w in words[2:]]
                if style == "frames":  # every frame, in order
                    assert [f for f, _ in entries] == [str(k + 1) for k in range(8)], part
                else:  # frames seen, in order, each cell but the last different from the one before it
                    assert [int(f) for f, _ in entries] == sorted({int(f) for f, _ in entries}), part
                    cells_seen = [c for _, c in entries]
                    assert "--" not in cells_seen and all(a != b for a, b in zip(cells_seen[:-2], cells_seen[1:-1])), part
                for _, cells in entries:
                    assert cells == "--" or (len(cells) == 2 and cells.isdigit() and max(cells) < "8"), part
    assert spelt > len(plain) // 4


def test_llava_video_shards_stream_the_items_the_json_file_gives(video_world, tmp_path, capsys):
    """The video LLaVA from streamed shards of LLaVA-Video records (each sample the clip and its record): every
    record streams to the item the JSON file's reading gives (`video_records`); bad records are counted; a run
    trains on the stream; and the recipe check says what a stream cannot do."""
    import tarfile

    from conftest import tar_add
    from test_video_llava import overrides

    from glimpse.config import load_recipe
    from glimpse.data.conversations import ConversationDataset
    from glimpse.data.images import ImageTransform
    from glimpse.data.stream import ShardSample, read_shard
    from glimpse.data.tokenizer import Tokenizer
    from glimpse.data.video import clip_pixels, video_usable
    from glimpse.errors import GlimpseError
    from glimpse.families.video_llava.data import stream_video_conversations, video_records
    from glimpse.families.video_llava.model import VideoLanguageModel
    from glimpse.train.trainer import train

    records = json.loads((video_world / "annotations" / "llava_video_train.json").read_text())
    root = tmp_path / "data"
    (root / "shards").mkdir(parents=True)
    (root / "tokenizer.json").write_bytes((video_world / "tokenizer.json").read_bytes())

    half = len(records) // 2
    for k, part in enumerate((records[:half], records[half:])):
        with tarfile.open(root / "shards" / f"train-{k}.tar", "w") as tar:
            for r in part:
                tar_add(tar, f"{r['id']}.mp4", (video_world / r["video"]).read_bytes())
                tar_add(tar, f"{r['id']}.json", json.dumps(r).encode())
            if k == 1:  # a clip cut short, a record naming two videos, a record with no turns, a caption sample
                clip = (video_world / records[0]["video"]).read_bytes()
                for key, video, body in (("cut", clip[:400], records[0]), ("two", clip, {**records[0], "video": ["a", "b"]}),
                                         ("none", clip, {"id": "none"})):
                    tar_add(tar, f"{key}.mp4", video)
                    tar_add(tar, f"{key}.json", json.dumps(body).encode())
                tar_add(tar, "caption.mp4", clip)
                tar_add(tar, "caption.txt", b"a red circle moves left")
    sets = {"data.source": "wds", "data.stream": "true", "data.root": str(root), "model.reverse_twins": "false",
            "data.files": "{train: 'shards/train-{0..1}.tar'}", "data.shuffle_buffer": 8, "eval.splits": "[]",
            "eval.during_train": "[]", "data.num_workers": 0, "train.threads": 1}
    steps = (len(records) + 4) // 8 + 1  # past the end of the first epoch: the bad samples come by
    sets.update({"train.max_steps": steps, "train.save_every": steps})
    recipe = load_recipe("shapes-video-llava", overrides(video_world, **sets))
    m, tok = recipe.model, Tokenizer(video_world / "tokenizer.json")
    transform = ImageTransform(32, recipe.data.image_mean, recipe.data.image_std)
    tokens = VideoLanguageModel.count_image_tokens(m)
    stream = stream_video_conversations(recipe.data, root, tok, m.chat_template, transform, m.num_frames, tokens,
                                        m.lm.context_length, seed=0)
    whole = ConversationDataset(video_records(recipe.data.__class__(source="shapes-video"), video_world, "train"), tok,
                                m.chat_template, transform, 10**8, tokens, m.lm.context_length,
                                loader=lambda src, name=None: clip_pixels(src, m.num_frames, transform))
    got = {key: stream.decode(ShardSample(p, key, files, 0)) for p in stream.paths
           for key, files in read_shard(p, video_usable)}
    assert len(got) == len(records) + 4
    for i, r in enumerate(records):
        want = whole[(i, 0)]
        assert got[r["id"]]["input_ids"] == want["input_ids"] and got[r["id"]]["labels"] == want["labels"], r["id"]
        assert torch.equal(got[r["id"]]["pixel_values"][0], want["pixel_values"][0]), r["id"]
    assert [got[k]["error"] for k in ("cut", "two", "none", "caption")] == ["truncated", "format", "format", "format"]
    assert "train-1.tar:caption: no .json record" in got["caption"]["message"]
    assert "names 2 videos" in got["two"]["message"] and "train-1.tar:none" in got["none"]["message"]

    train(recipe, tmp_path / "run", progress=False)
    assert "skipped bad samples" in capsys.readouterr().out
    assert len([r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
                if "loss" in r]) == steps
    for key, value, words in (("data.stream", "false", "set data.stream true"), ("model.reverse_twins", "true", "tracks"),
                              ("eval.splits", "[test]", "eval.splits=")):
        with pytest.raises(GlimpseError, match=words):
            load_recipe("shapes-video-llava", overrides(video_world, **{**sets, key: value}))
