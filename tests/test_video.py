"""The moving-shapes world, safe video decoding, the temporal head and the video dual encoder family."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("av")

from glimpse.data import shapes_video as sv  # noqa: E402
from glimpse.data import shapes_video_text as svt  # noqa: E402
from glimpse.data.stream import ShardSample, read_shard  # noqa: E402
from glimpse.data.video import VideoError, VideoLimits, read_video, video_usable, write_video  # noqa: E402
from glimpse.errors import GlimpseError  # noqa: E402
from glimpse.metrics.retrieval import expected_recall  # noqa: E402
from glimpse.models.temporal import TemporalPool  # noqa: E402


def _moving_square(T: int = 12, size: int = 32) -> np.ndarray:
    frames = np.full((T, size, size, 3), 240, np.uint8)
    for t in range(T):
        frames[t, 8:16, 2 * t:2 * t + 8] = (215, 35, 35)
    return frames


# --- decoding ---------------------------------------------------------------------------------------

def test_written_clips_read_back_with_uniform_and_fps_sampling(tmp_path):
    path = tmp_path / "clip.mp4"
    write_video(_moving_square(), path, fps=4)
    frames = read_video(path, 4)
    assert frames.shape == (4, 32, 32, 3) and frames.dtype == np.uint8
    # uniform: frames 0, 4, 7, 11 of 12 (first to last); the square's left edge moves 2 px a frame
    red = [np.flatnonzero(f[12, :, 0].astype(int) - f[12, :, 1] > 100) for f in frames]
    assert [int(r[0]) for r in red] == pytest.approx([0, 8, 14, 22], abs=1)
    assert read_video(path, 0, sampling="fps", fps=2).shape[0] == 6  # 3 s at 2 frames a second
    assert read_video(path, 20).shape[0] == 20  # a short clip repeats frames


def test_bad_videos_are_one_line_errors_naming_the_file(tmp_path):
    path = tmp_path / "clip.mp4"
    write_video(_moving_square(), path)
    data = path.read_bytes()
    cases = {"truncated": data[: len(data) // 2], "format": b"not a video at all" * 10}
    for reason, blob in cases.items():
        bad = tmp_path / f"{reason}.mp4"
        bad.write_bytes(blob)
        with pytest.raises(VideoError) as e:
            read_video(bad, 4)
        assert e.value.reason == reason and str(bad) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(VideoError, match="missing"):
        read_video(tmp_path / "nope.mp4")
    with pytest.raises(VideoError, match="too large"):
        read_video(path, 4, limits=VideoLimits(max_pixels=16 * 16))
    with pytest.raises(VideoError, match="too large"):
        read_video(path, 4, limits=VideoLimits(max_decoded=5))
    with pytest.raises(VideoError, match="too large"):
        read_video(path, 4, limits=VideoLimits(max_bytes=100))
    with pytest.raises(VideoError, match=r"3 s > 1 s"):  # 12 frames at 4 a second, against a 1 s limit
        read_video(path, 4, limits=VideoLimits(max_duration=1))
    # an MP4 signature over data that is not a container
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00\x00\x00\x18ftypisom" + b"\x00" * 100)
    with pytest.raises(VideoError) as e:
        read_video(garbage, 4)
    assert e.value.reason == "corrupt" and "garbage.mp4" in str(e.value)


def test_a_codec_off_the_allowlist_is_refused_in_an_allowed_container(tmp_path):
    import av

    path = tmp_path / "png.mov"  # QuickTime (allowed) holding PNG frames (not on the codec allowlist)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("png", rate=4)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "rgb24"
        for frame in _moving_square(4):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    with pytest.raises(VideoError) as e:
        read_video(path, 4)
    assert e.value.reason == "format" and "'png' is not allowed" in str(e.value)


# --- the world --------------------------------------------------------------------------------------

def test_the_world_is_deterministic_in_its_seed(video_world, tmp_path):
    from glimpse.data.shapes_video import generate_shapes_video

    again = tmp_path / "again"
    generate_shapes_video(again, seed=3, n_train=48, n_val=8, n_test=16, frames=8, image_size=32, progress=False)
    for f in sorted(again.rglob("*")):
        if f.is_file():
            rel = f.relative_to(again)
            assert hashlib.sha256(f.read_bytes()).digest() == hashlib.sha256((video_world / rel).read_bytes()).digest(), rel


def test_the_cli_writes_a_world_of_longer_clips(tmp_path, capsys):
    from glimpse.cli import main

    out = tmp_path / "world12"
    main(["--quiet", "data", "shapes-video", "--out", str(out), "--train", "6", "--val", "2", "--test", "2",
          "--frames", "12", "--image-size", "32", "--seed", "5", "--shards"])
    for split, n in (("train", 6), ("val", 2), ("test", 2), ("test_novel", 2)):
        videos = sorted((out / "videos" / split).glob("*.mp4"))
        assert len(videos) == n, split
        # and as WebDataset shards: each clip's file, byte for byte, beside its captions
        captions = json.loads((out / "annotations" / f"captions_{split}.json").read_text())["sentences"]
        samples = dict(read_shard(str(out / "shards" / f"{split}-000000.tar"), video_usable))
        assert sorted(samples) == [v.stem for v in videos]
        for v in videos:
            assert samples[v.stem]["mp4"] == v.read_bytes()
            assert json.loads(samples[v.stem]["json"])["captions"] == \
                [c["caption"] for c in captions if c["video_id"] == v.stem]
        records = json.loads((out / "annotations" / f"llava_video_{split}.json").read_text())
        llava = dict(read_shard(str(out / "shards" / f"llava_video_{split}-000000.tar"), video_usable))
        assert sorted(llava) == sorted(r["id"] for r in records)
        assert all(json.loads(llava[r["id"]]["json"]) == r and llava[r["id"]]["mp4"] == (out / r["video"]).read_bytes()
                   for r in records)
    clip = read_video(videos[0], 0, sampling="fps", fps=1000)  # every frame the file holds
    assert clip.shape == (12, 32, 32, 3)
    qa = json.loads((out / "annotations" / "qa_test.json").read_text())
    assert qa and {"video_id", "question", "answer", "answer_type"} <= set(qa[0])
    with pytest.raises(SystemExit) as e:  # clips are 8 to 16 frames
        main(["--quiet", "data", "shapes-video", "--out", str(tmp_path / "w"), "--frames", "40"])
    assert e.value.code == 2 and "frames must be an integer from 8 to 16, not 40" in capsys.readouterr().err


def test_annotations_use_real_video_formats(video_world):
    ann = video_world / "annotations"
    caps = json.loads((ann / "captions_train.json").read_text())
    assert {"video_id", "file_name", "split", "start time", "end time"} <= set(caps["videos"][0])
    assert {"caption", "video_id", "sen_id"} == set(caps["sentences"][0])
    qa = json.loads((ann / "qa_test.json").read_text())
    assert {"id", "video_id", "video", "question", "answer", "question_type", "answer_type"} <= set(qa[0])
    assert {q["answer_type"] for q in qa} == {"temporal", "static"}
    conv = json.loads((ann / "llava_video_val.json").read_text())
    assert conv[0]["conversations"][0]["value"].startswith("<video>\n") and conv[0]["video"].endswith(".mp4")
    clips = sv.read_clips(ann / "captions_test.json", video_world / "videos" / "test")
    assert len(clips) == 16 and all(Path(c.path).is_file() and len(c.captions) == 5 for c in clips)
    assert read_video(clips[0].path, 8).shape == (8, 32, 32, 3)


def test_test_novel_alone_holds_the_novel_colour_shape_pairs(video_world):
    def combos(split):
        videos = json.loads((video_world / "annotations" / f"captions_{split}.json").read_text())["videos"]
        return {(c, t["shape"]) for v in videos for t in v["tracks"] for c in t["colours"] if c}

    novel = {tuple(c) for c in json.loads((video_world / "world.json").read_text())["novel_combos"]}
    for split in ("train", "val", "test"):
        assert not combos(split) & novel
    assert combos("test_novel") & novel


def test_is_there_is_answered_by_every_frame_and_its_shape_gives_nothing_away():
    rng, answers = np.random.default_rng(0), []
    for i in range(600):  # the world's own sampling, without drawing or encoding the clips
        tracks = sv._sample_clip(rng, 8, 64, novel=i % 2 == 1)
        for q in svt._questions([svt.observe(t) for t in tracks], 8, False, rng, allow_novel=i % 2 == 1):
            if q["question_type"] != "exists":
                continue
            colour, shape = q["question"].removesuffix("?").split()[-2:]
            shown = [any(t["shape"] == shape and t["colours"][k] == colour for t in tracks) for k in range(8)]
            assert shown == [q["answer"] == "yes"] * 8, q  # every frame says yes, or none does
            named = [t for t in tracks if t["shape"] == shape]
            assert not named or len(set(named[0]["colours"])) == 1 and None not in named[0]["colours"], q
            answers.append((q["answer"], bool(named)))
    # both answers about as often, and "no" also of a shape the clip shows in another colour (the binding)
    assert {("yes", True), ("no", True), ("no", False)} <= set(answers)
    assert 0.4 < sum(a == "yes" for a, _ in answers) / len(answers) < 0.6 and len(answers) > 150


def test_observed_facts_follow_the_frames_and_flip_when_reversed():
    # a square moving right, reflected by the wall at x = 10 between frames 2 and 3, then gone at frame 5
    track = {"shape": "square", "colours": ["red", "red", "red", "orange", "orange", None],
             "xs": [4.0, 6.0, 8.0, 9.0, 7.0, 5.0], "ys": [5.0] * 6}
    f = svt.observe(track)
    assert (f.direction, f.bounces, f.appear, f.disappear, f.change) == ("right", [3], 0, 5, (3, "orange"))
    back = svt.observe(svt.reverse_tracks([track])[0])
    assert (back.direction, back.appear, back.disappear, back.change) == ("right", 1, None, (3, "red"))
    assert svt.reverse_tracks(svt.reverse_tracks([track])) == [track]
    assert svt.video_caption([track]) == "a red square moves right, bounces once, turns orange and disappears"


def test_answers_agree_with_the_tracks(video_world):
    videos = {v["video_id"]: v for v in
              json.loads((video_world / "annotations" / "captions_train.json").read_text())["videos"]}
    qa = json.loads((video_world / "annotations" / "qa_train.json").read_text())
    checked = 0
    for q in qa:
        v = videos[q["video_id"]]
        expected = svt.answer_of(q["question_type"], q["shapes"], v["tracks"], v["reversed"])
        assert expected is not None or q["question_type"] in ("before_after", "exists"), q  # asked: never a tie
        if expected is not None:
            assert q["answer"] == expected, q
            checked += 1
        assert all(s in q["question"] for s in q["shapes"])
    assert checked > 50
    # played backwards, what moved left moves right and what appeared first disappears last
    v = next(v for v in videos.values() if any(svt.observe(t).direction in ("left", "right") for t in v["tracks"]))
    t = next(t for t in v["tracks"] if svt.observe(t).direction in ("left", "right"))
    back = svt.answer_of("direction", [t["shape"]], svt.reverse_tracks(v["tracks"]), not v["reversed"])
    forward = svt.answer_of("direction", [t["shape"]], v["tracks"], v["reversed"])
    assert {back, forward} == {"left", "right"} or svt.observe(t).bounces


# --- the temporal head and the metric ---------------------------------------------------------------

def test_meanp_is_bit_identical_under_frame_permutation_and_seqtransf_is_not():
    torch.manual_seed(0)
    frames = torch.randn(3, 8, 16)
    perm = torch.randperm(8)
    mean_pool = TemporalPool(16, "meanP")
    assert torch.equal(mean_pool(frames), mean_pool(frames[:, perm]))
    seq = TemporalPool(16, "seqTransf", layers=1, heads=2)
    assert not torch.allclose(seq(frames), seq(frames[:, perm]), atol=1e-4)


def test_meanp_video_logits_are_identical_under_frame_permutation():
    from glimpse.families.video_clip.model import VideoClipConfig, VideoDualEncoder
    from glimpse.models.text import TextConfig
    from glimpse.models.vision import VisionConfig

    torch.manual_seed(0)
    cfg = VideoClipConfig(vision=VisionConfig(image_size=16, patch_size=8, width=16, layers=1, heads=2),
                          text=TextConfig(vocab_size=50, context_length=8, width=16, layers=1, heads=2),
                          embed_dim=16, temporal="meanP")
    model = VideoDualEncoder(cfg).eval()
    clips, ids = torch.randn(2, 8, 3, 16, 16), torch.randint(0, 50, (2, 8))
    out = model(clips, ids)
    shuffled = model(clips[:, torch.randperm(8)], ids)
    assert torch.equal(out["image_embeds"] @ out["text_embeds"].T, shuffled["image_embeds"] @ shuffled["text_embeds"].T)


def test_expected_recall_breaks_ties_at_random():
    sim = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0], [0.0, 0.0, 3.0]])
    # query 0 ties with one other (1/2), query 1 ties with one (1/2), query 2 is alone at the top (1)
    assert expected_recall(sim, torch.tensor([0, 1, 2]), 1) == pytest.approx(2 / 3)
    assert expected_recall(sim, torch.tensor([0, 1, 2]), 2) == pytest.approx(1.0)
    assert expected_recall(torch.tensor([[0.0, 1.0, 1.0, 1.0]]), torch.tensor([1]), 2) == pytest.approx(2 / 3)


# --- the family, end to end -------------------------------------------------------------------------

def test_video_clip_trains_skips_bad_clips_and_evaluates_the_controls(video_world, tmp_path, capsys):
    import shutil

    import glimpse
    from glimpse.config import load_recipe
    from glimpse.train.trainer import train

    world = tmp_path / "world"
    shutil.copytree(video_world, world)
    for cut in sorted((world / "videos" / "train").glob("*.mp4"))[3::4]:  # a quarter of the clips, cut short
        cut.write_bytes(cut.read_bytes()[:300])
    bad = world / "videos" / "train" / "train_000003.mp4"
    sets = {"data.root": str(world), "data.image_size": 32, "data.num_workers": 0, "data.train_size": 48,
            "data.val_size": 8, "data.test_size": 16, "model.vision.image_size": 32, "model.vision.width": 32,
            "model.vision.layers": 1, "model.text.width": 32, "model.text.layers": 1, "model.embed_dim": 32,
            "model.temporal_layers": 1, "train.batch_size": 8, "train.max_steps": 4, "train.warmup_steps": 1,
            "train.log_every": 1, "train.save_every": 4, "eval.batch_size": 8}
    out = tmp_path / "run"
    train(load_recipe("shapes-video-clip", [f"{k}={v}" for k, v in sets.items()]), out, progress=False)
    assert "skipped bad samples" in capsys.readouterr().out
    results = json.loads((out / "eval.json").read_text())
    for key in ("t2v_r1", "v2t_r5", "shuffled_t2v_r1", "reversed_t2v_r1", "single_frame_t2v_r1", "pairs_t2v_r1",
                "pairs_acc"):
        assert 0.0 <= results[f"test/{key}"] <= 1.0, key
    assert results["test/n"] == 16 and results["test_novel/skipped"] == 0

    pipe = glimpse.load(out)
    clips = sorted((world / "videos" / "test").glob("*.mp4"))[:3]
    emb = pipe.embed_videos([str(c) for c in clips])
    assert emb.shape == (3, 32) and torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert sorted(i for i, _ in pipe.rank("a red circle moves left", [str(c) for c in clips])) == [0, 1, 2]
    with pytest.raises(VideoError, match="train_000003"):
        pipe.embed_videos([str(bad)])


def test_video_text_shards_stream_the_clips_the_files_give_and_train(video_world, tmp_path, capsys):
    """The video dual encoder from streamed shards (WebVid-style: KEY.mp4 and its captions): each sample is the
    clip VideoDataset decodes from the file, with one of its captions; a cut clip or a caption-less sample is a bad
    sample, counted; a run trains on the stream and evaluates on MSR-VTT-style files."""
    import tarfile

    from conftest import tar_add

    from glimpse.config import load_recipe
    from glimpse.data.images import ImageTransform
    from glimpse.data.shapes_video import read_clips
    from glimpse.families.video_clip.data import StreamClips, VideoDataset
    from glimpse.train.trainer import train

    clips = read_clips(video_world / "annotations" / "captions_train.json", video_world / "videos" / "train")
    root = tmp_path / "data"
    (root / "shards").mkdir(parents=True)
    shutil.copy(video_world / "tokenizer.json", root / "tokenizer.json")
    for k in range(4):
        with tarfile.open(root / "shards" / f"train-{k}.tar", "w") as tar:
            for c in clips[k * 12:(k + 1) * 12]:
                tar_add(tar, f"{c.video_id}.mp4", Path(c.path).read_bytes())
                tar_add(tar, f"{c.video_id}.json", json.dumps({"captions": c.captions}).encode())
            if k == 3:  # a clip cut short, and a clip without a caption
                for name, data in (("cut.mp4", Path(clips[0].path).read_bytes()[:400]), ("cut.txt", b"a clip"),
                                   ("mute.mp4", Path(clips[0].path).read_bytes()), ("mute.json", b"{}")):
                    tar_add(tar, name, data)
    transform = ImageTransform(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    decode = StreamClips(8, transform, seed=0)
    whole = VideoDataset(clips, 8, transform)
    got = {key: decode(ShardSample(str(p), key, files, 0)) for p in sorted((root / "shards").glob("*.tar"))
           for key, files in read_shard(str(p), video_usable)}
    assert len(got) == len(clips) + 2
    for i, c in enumerate(clips):
        want = whole[(i, 0)]
        assert torch.equal(got[c.video_id]["pixel_values"], want["pixel_values"]), c.video_id
        assert got[c.video_id]["captions"][0] in c.captions
    assert (got["cut"]["error"], got["mute"]["error"]) == ("truncated", "format")
    assert "train-3.tar:cut" in got["cut"]["message"] and "train-3.tar:mute" in got["mute"]["message"]

    sets = {"data.source": "wds", "data.stream": "true", "data.root": str(root), "data.image_size": 32,
            "data.files": f"{{train: 'shards/train-{{0..3}}.tar', test: '{video_world}/annotations/captions_test.json'}}",
            "data.images": f"{{test: '{video_world}/videos/test'}}", "data.shuffle_buffer": 8, "data.num_workers": 0,
            "eval.splits": "[test]", "eval.during_train": "[]", "model.reverse_twins": "false", "model.vision.image_size": 32, "model.vision.width": 32, "model.vision.layers": 1,
            "model.text.width": 32, "model.text.layers": 1, "model.embed_dim": 32, "model.temporal_layers": 1,
            "train.batch_size": 8, "train.max_steps": 8, "train.warmup_steps": 1, "train.log_every": 1,
            "train.save_every": 4, "train.threads": 1, "eval.batch_size": 8}
    recipe = [f"{k}={v}" for k, v in sets.items()]
    out = tmp_path / "run"
    train(load_recipe("shapes-video-clip", recipe), out, progress=False)
    assert "skipped bad samples" in capsys.readouterr().out  # 50 samples, 64 read: the bad two came by
    results = json.loads((out / "eval.json").read_text())
    assert results["test/n"] == 16 and 0 <= results["test/t2v_r1"] <= 1
    state = json.loads((out / "checkpoints" / "step_0000008" / "state.json").read_text())
    assert state["stream"]["batches"] == 8
    # resumed from step 4 (as if killed after it), the stream reads on where it was: the same losses
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_0000008")
    train(load_recipe("shapes-video-clip", recipe + ["eval.splits=[]"]), resumed, resume=True, progress=False)

    def losses(run):
        return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                if "loss" in r]

    assert len(losses(out)) == 8 and losses(resumed) == losses(out)
    with pytest.raises(GlimpseError, match="set data.stream true"):
        load_recipe("shapes-video-clip", ["data.source=wds"])
    with pytest.raises(GlimpseError, match="reverse_twins.*set it false"):
        load_recipe("shapes-video-clip", recipe + ["model.reverse_twins=true"])
    with pytest.raises(GlimpseError, match="set data.files.val"):  # evaluated during training: its file is needed
        load_recipe("shapes-video-clip", recipe + ["eval.during_train=[val]", "train.eval_every=4"])


def test_meanp_cannot_tell_a_minimal_pair_apart(video_world):
    """Evaluated on minimal pairs (a clip and its reversal), an order-blind model ties every pair: its
    two-way accuracy is exactly 1/2 and its pair R@1 at most 1/2."""
    from types import SimpleNamespace

    from glimpse.data.images import ImageTransform
    from glimpse.data.tokenizer import Tokenizer
    from glimpse.families.video_clip.evaluate import evaluate_split
    from glimpse.families.video_clip.model import VideoClipConfig, VideoDualEncoder
    from glimpse.families.video_clip.pipeline import VideoClipPipeline
    from glimpse.models.text import TextConfig
    from glimpse.models.vision import VisionConfig

    tok = Tokenizer(video_world / "tokenizer.json")
    torch.manual_seed(0)
    cfg = VideoClipConfig(vision=VisionConfig(image_size=32, patch_size=8, width=16, layers=1, heads=2),
                          text=TextConfig(vocab_size=tok.vocab_size, context_length=64, width=16, layers=1, heads=2),
                          embed_dim=16, temporal="meanP")
    pipe = VideoClipPipeline(VideoDualEncoder(cfg), tok, ImageTransform(32))
    out = evaluate_split(pipe, SimpleNamespace(source="shapes-video"), video_world, "test")
    assert out["test/pairs_n"] > 0
    assert out["test/pairs_acc"] == 0.5 and out["test/pairs_t2v_r1"] <= 0.5
    assert out["test/reversed_t2v_r1"] == out["test/t2v_r1"] == out["test/shuffled_t2v_r1"]


def test_a_container_without_a_frame_count_is_sampled_over_all_its_frames(tmp_path):
    """Matroska declares no frame count: uniform sampling decodes the clip once and picks from it."""
    import av

    frames = _moving_square(T=12)
    path = tmp_path / "clip.mkv"
    with av.open(str(path), "w", format="matroska") as c:
        s = c.add_stream("ffv1", rate=4)
        s.width, s.height, s.pix_fmt = 32, 32, "yuv444p"
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    with av.open(str(path)) as c:
        assert c.streams.video[0].frames == 0
    got = read_video(path, 4)
    assert got.shape == (4, 32, 32, 3)
    np.testing.assert_allclose(got[-1].astype(int), frames[-1].astype(int), atol=3)  # ffv1 is lossless
    np.testing.assert_allclose(got[0].astype(int), frames[0].astype(int), atol=3)
