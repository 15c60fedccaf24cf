"""The video LLaVA: pooling and frame positions, training on clips (with and without a feature cache),
asking and captioning clips from Python and the CLI, and video_url parts in the OpenAI-compatible server.
Its training records are tested in test_video_llava_data.py."""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import LiveServer

import glimpse
from glimpse.config import load_recipe
from glimpse.data.video import write_video
from glimpse.train.trainer import train

pytest.importorskip("av")

MODEL = "tiny-video-llava"


def overrides(world, **extra) -> list[str]:
    sets = {"data.root": str(world), "data.image_size": 32, "data.train_size": 48, "data.val_size": 8,
            "data.test_size": 16, "init_parts": "{}", "freeze": "[]", "train.cache_vision_features": False,
            "model.vision.image_size": 32, "model.vision.patch_size": 8, "model.vision.width": 32,
            "model.vision.layers": 1, "model.lm.width": 32, "model.lm.layers": 1, "model.lm.heads": 2,
            "model.lm.kv_heads": 1, "model.lm.context_length": 96, "train.batch_size": 8, "train.max_steps": 3,
            "train.warmup_steps": 1, "train.log_every": 1, "train.save_every": 3, "eval.batch_size": 16,
            "eval.vqa_limit": 12}
    sets.update(extra)
    return [f"{k}={v}" for k, v in sets.items()]


@pytest.fixture(scope="module")
def run(video_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "video-llava"
    train(load_recipe("shapes-video-llava", overrides(video_world)), out, progress=False)
    return out


@pytest.fixture(scope="module")
def pipe(run):
    return glimpse.load(run)


def clips(world, n=2):
    return [str(p) for p in sorted((world / "videos" / "test").glob("*.mp4"))[:n]]


def test_frames_are_pooled_before_the_projector_and_get_a_position_each():
    from glimpse.families.video_llava.model import VideoLanguageModel, VideoLLaVAConfig
    from glimpse.models.decoder import DecoderConfig
    from glimpse.models.vision import VisionConfig

    torch.manual_seed(0)
    for pool, reduce in (("average", F.avg_pool2d), ("max", F.max_pool2d)):
        cfg = VideoLLaVAConfig(vision=VisionConfig(image_size=32, patch_size=8, width=16, layers=1, heads=2,
                                                   class_token=False, pool="mean"),
                               lm=DecoderConfig(vocab_size=40, width=16, layers=1, heads=2, context_length=80),
                               num_frames=3, spatial_pool=pool, image_token_id=3)
        model = VideoLanguageModel(cfg).eval()
        assert model.image_tokens == 3 * 4  # a 4x4 grid pooled with stride 2
        clip = torch.randn(2, 3, 3, 32, 32)
        feats = model.tower_features(clip)
        grid = model.vision.forward_features(clip.flatten(0, 1), layer=-1)  # [6, 16, D]
        expected = reduce(grid.transpose(1, 2).reshape(6, 16, 4, 4), 2, 2).flatten(2).transpose(1, 2)
        torch.testing.assert_close(feats, expected.reshape(2, 12, 16))
        # the same frames in another order are other tokens: the temporal positions differ
        projected = model.project(feats)
        swapped = model.project(model.tower_features(clip[:, [1, 0, 2]]))
        assert not torch.allclose(projected[:, :4], swapped[:, 4:8])
        torch.testing.assert_close(projected[:, :4] - model.frame_pos[0], swapped[:, 4:8] - model.frame_pos[1])


def test_temporal_tokens_are_the_video_dual_encoders_temporal_head_and_reverse_with_the_clip():
    from glimpse.families.video_clip.model import VideoClipConfig, VideoDualEncoder
    from glimpse.families.video_llava.model import VideoLanguageModel, VideoLLaVAConfig
    from glimpse.models.decoder import DecoderConfig
    from glimpse.models.text import TextConfig
    from glimpse.models.vision import VisionConfig

    torch.manual_seed(0)
    vision = VisionConfig(image_size=32, patch_size=8, width=16, layers=1, heads=2, class_token=False, pool="mean")
    clip_model = VideoDualEncoder(VideoClipConfig(vision=vision, text=TextConfig(vocab_size=40, width=16, layers=1,
                                                                                 heads=2, context_length=8),
                                                  embed_dim=24, num_frames=3)).eval()
    cfg = VideoLLaVAConfig(vision=vision, lm=DecoderConfig(vocab_size=40, width=16, layers=1, heads=2, context_length=80),
                           num_frames=3, image_token_id=3, temporal_tokens=True, temporal_dim=24)
    model = VideoLanguageModel(cfg).eval()
    for part in ("vision", "visual_projection", "temporal"):  # as init_parts loads them from a video_clip run
        getattr(model, part).load_state_dict(getattr(clip_model, part).state_dict())
    assert model.image_tokens == 3 * (4 + 1)
    clip = torch.randn(2, 3, 3, 32, 32)
    with torch.no_grad():
        feats = model.tower_features(clip)
        tokens = model.project(feats)
        per_frame = clip_model.temporal.per_frame(clip_model.get_image_features(clip.flatten(0, 1)).view(2, 3, -1))
        torch.testing.assert_close(per_frame.mean(1), clip_model.get_video_features(clip))
        torch.testing.assert_close(tokens[:, 12:], model.temporal_connector(per_frame) + model.frame_pos)
        # the cache's reversed twin is exactly the reversed clip's features
        torch.testing.assert_close(model.reverse_features(feats), model.tower_features(clip.flip(1)))
        assert not torch.allclose(model.project(model.reverse_features(feats))[:, 12:], tokens[:, 12:].flip(1))


def test_the_spatial_temporal_conv_starts_as_the_pooler_and_sees_only_its_neighbouring_frames():
    from glimpse.families.video_llava.model import VideoLanguageModel, VideoLLaVAConfig
    from glimpse.models.decoder import DecoderConfig
    from glimpse.models.vision import VisionConfig

    torch.manual_seed(0)
    vision = VisionConfig(image_size=32, patch_size=8, width=16, layers=1, heads=2, class_token=False, pool="mean")
    lm = DecoderConfig(vocab_size=40, width=16, layers=1, heads=2, context_length=80)
    plain = VideoLanguageModel(VideoLLaVAConfig(vision=vision, lm=lm, num_frames=5, image_token_id=3)).eval()
    model = VideoLanguageModel(VideoLLaVAConfig(vision=vision, lm=lm, num_frames=5, image_token_id=3,
                                                temporal_conv=3)).eval()
    model.load_state_dict(plain.state_dict(), strict=False)  # all but the convolution, which starts at zero
    assert model.image_tokens == plain.image_tokens == 5 * 4
    clip = torch.randn(2, 5, 3, 32, 32)
    with torch.no_grad():
        feats = model.tower_features(clip)
        assert feats.shape == (2, 5 * 16, 16)  # the cache keeps each frame's unpooled 4x4 grid
        torch.testing.assert_close(model.project(feats), plain.project(plain.tower_features(clip)))
        torch.testing.assert_close(model.reverse_features(feats), model.tower_features(clip.flip(1)))
        torch.nn.init.normal_(model.st_conv.weight, std=0.1)
        tokens = model.project(feats)
        changed = clip.clone()
        changed[:, 3] = torch.randn(2, 3, 32, 32)  # frame 3 seen by the tokens of frames 2, 3 and 4 only
        moved = model.project(model.tower_features(changed)).view(2, 5, 4, -1)
        same = [torch.allclose(moved[:, t], tokens.view(2, 5, 4, -1)[:, t]) for t in range(5)]
        assert same == [True, True, False, False, False]


@pytest.mark.parametrize("temporal_conv", [0, 3])
def test_slow_frames_add_their_unpooled_patches_after_every_frames_pooled_tokens(temporal_conv):
    from glimpse.families.video_llava.model import VideoLanguageModel, VideoLLaVAConfig
    from glimpse.models.decoder import DecoderConfig
    from glimpse.models.vision import VisionConfig

    torch.manual_seed(0)
    vision = VisionConfig(image_size=32, patch_size=8, width=16, layers=1, heads=2, class_token=False, pool="mean")
    lm = DecoderConfig(vocab_size=40, width=16, layers=1, heads=2, context_length=80)
    fast = VideoLanguageModel(VideoLLaVAConfig(vision=vision, lm=lm, num_frames=5, image_token_id=3,
                                               temporal_conv=temporal_conv)).eval()
    model = VideoLanguageModel(VideoLLaVAConfig(vision=vision, lm=lm, num_frames=5, image_token_id=3,
                                                temporal_conv=temporal_conv, slow_frames=2)).eval()
    model.load_state_dict(fast.state_dict())  # the slow pathway has no weights of its own
    if temporal_conv:
        torch.nn.init.normal_(model.st_conv.weight, std=0.1)
        fast.st_conv.load_state_dict(model.st_conv.state_dict())
    assert VideoLanguageModel.slow_frame_indices(model.cfg) == [1, 3]
    assert VideoLanguageModel.slow_frame_indices(VideoLLaVAConfig(num_frames=8, slow_frames=1)) == [4]  # hold_middle's
    assert model.image_tokens == 5 * 4 + 2 * 16
    clip = torch.randn(2, 5, 3, 32, 32)
    with torch.no_grad():
        feats = model.tower_features(clip)
        assert feats.shape == (2, 5 * 16, 16)  # unpooled grids, so the cache can serve both pathways
        tokens = model.project(feats)
        torch.testing.assert_close(tokens[:, :20], fast.project(fast.tower_features(clip)))
        grid = model.vision.forward_features(clip[:, [1, 3]].flatten(0, 1), layer=-1).view(2, 32, 16)
        slow = model.connector(grid) + model.frame_pos[[1, 3]].repeat_interleave(16, dim=0)
        torch.testing.assert_close(tokens[:, 20:], slow)
        torch.testing.assert_close(model.reverse_features(feats), model.tower_features(clip.flip(1)))


def test_a_second_tower_joins_the_first_by_channel_and_the_convolution_reads_the_first_alone():
    from glimpse.families.video_llava.model import VideoLanguageModel, VideoLLaVAConfig
    from glimpse.models.decoder import DecoderConfig
    from glimpse.models.vision import VisionConfig

    torch.manual_seed(0)
    vision = VisionConfig(image_size=32, patch_size=8, width=16, layers=1, heads=2, class_token=False, pool="mean")
    lm = DecoderConfig(vocab_size=40, width=16, layers=1, heads=2, context_length=96)
    settings = dict(vision=vision, lm=lm, num_frames=5, image_token_id=3, temporal_conv=3, slow_frames=1)
    one = VideoLanguageModel(VideoLLaVAConfig(**settings)).eval()
    two = VideoLanguageModel(VideoLLaVAConfig(**settings, second_tower=True)).eval()
    torch.nn.init.normal_(one.st_conv.weight, std=0.1)
    shapes = {k: v.shape for k, v in two.state_dict().items()}
    assert shapes["connector.linear_1.weight"] == (16, 32)  # both towers' channels
    assert two.image_tokens == one.image_tokens == 5 * 4 + 16  # the tokens are as many as with one tower
    # the first tower's weights, the second's columns of the projector at zero: the one-tower model exactly
    state = one.state_dict()
    state["connector.linear_1.weight"] = torch.cat([state["connector.linear_1.weight"], torch.zeros(16, 16)], 1)
    missing = two.load_state_dict(state, strict=False).missing_keys
    assert missing and all(k.startswith("second_vision.") for k in missing)
    clip = torch.randn(2, 5, 3, 32, 32)
    with torch.no_grad():
        feats = two.tower_features(clip)
        assert feats.shape == (2, 5 * 16, 32)  # unpooled grids (convolution, slow frame) of both towers
        torch.testing.assert_close(feats[..., :16], one.tower_features(clip))
        torch.testing.assert_close(feats[..., 16:], two.second_vision.forward_features(
            clip.flatten(0, 1), layer=-1).view(2, 80, 16))
        torch.testing.assert_close(two.project(feats), one.project(one.tower_features(clip)))
        torch.testing.assert_close(two.reverse_features(feats), two.tower_features(clip.flip(1)))
        torch.nn.init.normal_(two.connector.linear_1.weight)  # now the second tower's channels count
        tokens = two.project(feats)
        seen = feats.clone()
        seen[..., 16:] = 0
        assert not torch.allclose(two.project(seen), tokens)
        # the convolution reads the first tower's channels only: with them alike in every frame, changing the
        # second tower's in frame 3 changes frame 3's pooled tokens alone
        flat = feats.view(2, 5, 16, 32).clone()
        flat[..., :16] = flat[:, :1, :, :16]
        other = flat.clone()
        other[:, 3, :, 16:] = torch.randn(2, 16, 16)
        a, b = (two.project(f.view(2, 80, 32))[:, :20].view(2, 5, 4, -1) for f in (flat, other))
        assert [torch.allclose(a[:, t], b[:, t]) for t in range(5)] == [True, True, True, False, True]
    # a feature cache recognises the second tower: changing its weights alone gives another fingerprint
    from glimpse.data.images import ImageTransform
    from glimpse.families.feature_cache import tower_fingerprint

    before = tower_fingerprint(two, (), ImageTransform(32), 10**6)
    assert tower_fingerprint(two, (), ImageTransform(32), 10**6) == before
    with torch.no_grad():
        next(two.second_vision.parameters()).add_(1e-3)
    assert tower_fingerprint(two, (), ImageTransform(32), 10**6) != before


def test_a_one_tower_run_continues_with_a_second_tower_exactly_as_it_was(run, video_world, tmp_path):
    out = tmp_path / "two"
    sets = {"init": str(run), "init_parts": f"{{second_vision: {run}#vision}}", "model.second_tower": True,
            "freeze": "[vision, second_vision]", "train.lr": 1e-12, "train.max_steps": 1, "train.save_every": 1,
            "eval.splits": "[]", "tokenizer": str(run / "tokenizer.json")}
    train(load_recipe("shapes-video-llava", overrides(video_world, **sets)), out, progress=False)
    one, two = glimpse.load(run), glimpse.load(out)
    assert two.model.cfg.second_tower and two.model.connector.linear_1.weight.shape[1] == 64
    clip = torch.stack([one.load_video(clips(video_world, 1)[0])])
    with torch.no_grad():
        a, b = (p.model.get_image_features(clip) for p in (one, two))
        second = two.model.tower_features(clip)[..., 32:]
        alone = two.model.patch_features(two.model.second_vision, clip[0]).reshape(1, -1, 32)
    torch.testing.assert_close(b, a)  # the new channels enter through zero weights (one step at lr 1e-12)
    torch.testing.assert_close(second, alone)
    assert second.abs().sum() > 0  # though they are there
    question = ["what colour is the square?"]
    assert two.ask([clip[0]], question, max_new_tokens=4) == one.ask([clip[0]], question, max_new_tokens=4)


def test_spatial_positions_start_at_zero_and_follow_the_pool_and_the_slow_patches():
    from glimpse.families.video_llava.model import VideoLanguageModel, VideoLLaVAConfig
    from glimpse.models.decoder import DecoderConfig
    from glimpse.models.vision import VisionConfig

    torch.manual_seed(0)
    vision = VisionConfig(image_size=32, patch_size=8, width=16, layers=1, heads=2, class_token=False, pool="mean")
    lm = DecoderConfig(vocab_size=40, width=16, layers=1, heads=2, context_length=80)
    plain = VideoLanguageModel(VideoLLaVAConfig(vision=vision, lm=lm, num_frames=3, image_token_id=3,
                                                slow_frames=1)).eval()
    model = VideoLanguageModel(VideoLLaVAConfig(vision=vision, lm=lm, num_frames=3, image_token_id=3,
                                                slow_frames=1, spatial_positions=True)).eval()
    missing = model.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing == ["spatial_pos"]  # a run without them continues with them
    clip = torch.randn(2, 3, 3, 32, 32)
    with torch.no_grad():
        feats = model.tower_features(clip)
        torch.testing.assert_close(model.project(feats), plain.project(feats))  # zero at the start
        torch.nn.init.normal_(model.spatial_pos)
        moved = model.project(feats) - plain.project(feats)
    table = model.spatial_pos.detach()  # [16 patches of the 4x4 grid, width]
    cells = F.avg_pool2d(table.T.reshape(1, 16, 4, 4), 2, 2).flatten(2)[0].T  # the 2x2 pooled cells
    torch.testing.assert_close(moved[:, :12], cells.repeat(3, 1).expand(2, -1, -1))  # every frame's cells alike
    torch.testing.assert_close(moved[:, 12:], table.expand(2, -1, -1))  # the slow frame's patches their own
    assert not torch.allclose(moved[0, 0], moved[0, 1])  # cells differ: where a token lies is told


def test_a_run_answers_and_captions_clips_and_reports_the_controls(run, pipe, video_world):
    results = json.loads((run / "eval.json").read_text())
    for key in ("temporal_acc", "chance_temporal", "shuffled_temporal_acc", "single_frame_temporal_acc",
                "single_frame_static_acc", "cider", "reversed_flip"):
        assert f"test/{key}" in results, key
    assert 0 <= results["test/reversed_flip"] <= 1
    from glimpse.data.shapes_video_text import TEMPORAL_TYPES
    shuffled = {k.split("shuffled_acc_")[1] for k in results if k.startswith("test/shuffled_acc_")}
    assert shuffled and shuffled <= set(TEMPORAL_TYPES)  # per temporal type, beside its chance
    assert all(0 <= results[f"test/chance_{t}"] <= 1 for t in shuffled)
    videos = clips(video_world)
    answers = pipe.ask(videos, ["which way does the circle move first?"] * 2, max_new_tokens=4)
    captions = pipe.caption(videos, max_new_tokens=6)
    assert len(answers) == len(captions) == 2 and all(isinstance(a, str) for a in answers + captions)
    # decoded frames and the file give the same answer
    frames = pipe.load_video(videos[0])
    assert frames.shape == (8, 3, 32, 32)
    assert pipe.ask([frames], ["what colour is the square?"], max_new_tokens=4) == \
        pipe.ask([videos[0]], ["what colour is the square?"], max_new_tokens=4)


@pytest.mark.parametrize("temporal_tokens,temporal_conv,slow_frames,second_tower",
                         [(False, 0, 0, False), (True, 0, 0, False), (False, 3, 1, False), (False, 3, 0, True)])
def test_the_feature_cache_gives_the_losses_of_the_tower_and_both_skip_a_bad_clip(video_world, tmp_path, capsys, run,
                                                                                   temporal_tokens, temporal_conv,
                                                                                   slow_frames, second_tower):
    import shutil

    world = tmp_path / "world"
    shutil.copytree(video_world, world)
    for bad in sorted((world / "videos" / "train").glob("*.mp4"))[::3]:  # a third of the clips, cut short
        bad.write_bytes(bad.read_bytes()[:500])
    # with reversed twins: the cache's twin rows are its clips' rows with the frames reversed, as decoded
    # and with still twins (their rows: the held middle frame's features, encoded as the loader reads them) and
    # every question of each clip asked
    common = {"train.max_steps": 2, "freeze": "[vision, second_vision]" if second_tower else "[vision]",
              "model.second_tower": second_tower, "data.root": str(world), "model.reverse_twins": True,
              "model.still_twins": True, "model.all_questions": True,
              "model.temporal_tokens": temporal_tokens, "model.answer_traces": temporal_tokens,
              "model.temporal_conv": temporal_conv, "model.slow_frames": slow_frames,
              "model.lm.context_length": 192 if temporal_tokens or slow_frames else 128}  # traced answers need the room
    if second_tower:  # another run's vision tower as the second one (RUN#name)
        common["init_parts"] = f"{{second_vision: {run}#vision}}"
    a, b = tmp_path / "cached", tmp_path / "plain"
    train(load_recipe("shapes-video-llava", overrides(world, **common, **{"train.cache_vision_features": True})),
          a, progress=False)
    train(load_recipe("shapes-video-llava", overrides(world, **common)), b, progress=False)
    assert capsys.readouterr().out.count("skipped bad samples") >= 2

    def losses(out):
        return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
                if '"loss"' in line]

    assert losses(a) == pytest.approx(losses(b), rel=1e-5)
    if second_tower:
        from safetensors.torch import load_file

        from glimpse.runs import run_weights

        src, got = load_file(str(run_weights(run))), load_file(str(run_weights(a)))
        tower = [k for k in got if k.startswith("second_vision.")]
        assert tower and all(torch.equal(got[k], src[k.removeprefix("second_")]) for k in tower)


def test_the_cli_asks_and_captions_a_clip_file(run, video_world, cli_env):
    video = clips(video_world, 1)[0]
    for args in (["ask", str(run), video, "which way does the circle move first?"], ["caption", str(run), video]):
        r = subprocess.run([sys.executable, "-m", "glimpse", *args, "--max-new-tokens", "4"], env=cli_env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
    bad = video_world.parent / "bad.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypisom" + b"\x00" * 100)
    r = subprocess.run([sys.executable, "-m", "glimpse", "ask", str(run), str(bad), "q?"], env=cli_env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "bad.mp4" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def _video_url(path) -> str:
    return "data:video/mp4;base64," + base64.b64encode(open(path, "rb").read()).decode()


def test_the_server_takes_video_url_parts_and_refuses_bad_ones_with_4xx(pipe, video_world, tmp_path):
    import httpx

    from glimpse.serve import ServerLimits, create_app

    video = clips(video_world, 1)[0]
    with LiveServer(create_app(pipe, MODEL, ServerLimits(max_video_bytes=200_000, max_video_frames=30,
                                                       max_video_seconds=5))) as s:
        def chat(parts):
            return httpx.post(f"{s.url}/v1/chat/completions", timeout=60, json={
                "model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": parts}]})

        ok = chat([{"type": "video_url", "video_url": {"url": _video_url(video)}},
                   {"type": "text", "text": "which way does the circle move first?"}])
        assert ok.status_code == 200, ok.text
        assert isinstance(ok.json()["choices"][0]["message"]["content"], str)
        png = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n").decode()
        truncated = tmp_path / "cut.mp4"
        truncated.write_bytes(open(video, "rb").read()[:400])
        big = tmp_path / "big.mp4"
        big.write_bytes(open(video, "rb").read() + b"\x00" * 300_000)
        still = np.full((40, 32, 32, 3), 200, np.uint8)
        long, many = tmp_path / "long.mp4", tmp_path / "many.mp4"
        write_video(still[:24], long, fps=4)  # 6 s, 24 frames: over the seconds limit only
        write_video(still, many, fps=40)  # 1 s, 40 frames: over the frame limit only
        for parts, words in (([{"type": "image_url", "image_url": {"url": png}}], "video_url"),
                             ([{"type": "video_url", "video_url": {"url": _video_url(truncated)}}], "truncated"),
                             ([{"type": "video_url", "video_url": {"url": _video_url(big)}}], "byte limit"),
                             ([{"type": "video_url", "video_url": {"url": _video_url(long)}}], "6 s > 5 s"),
                             ([{"type": "video_url", "video_url": {"url": _video_url(many)}}], "frames > 30"),
                             ([{"type": "video_url", "video_url": {"url": "https://example.com/a.mp4"}}], "data:")):
            r = chat(parts + [{"type": "text", "text": "what happens?"}])
            assert 400 <= r.status_code < 500 and words in r.json()["error"]["message"], (r.status_code, r.text)
        # explanations trace one image: a video model neither offers nor answers /v1/explain
        assert "explain" not in httpx.get(f"{s.url}/v1/models").json()["data"][0]["capabilities"]
        r = httpx.post(f"{s.url}/v1/explain", timeout=60, json={"model": MODEL, "messages": [
            {"role": "user", "content": [{"type": "video_url", "video_url": {"url": _video_url(video)}},
                                         {"type": "text", "text": "what happens?"}]}]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_model", r.text


def test_an_image_model_refuses_video_parts(tiny_vlm_run, video_world):
    import httpx

    from glimpse.serve import create_app

    with LiveServer(create_app(glimpse.load(tiny_vlm_run), "tiny-vlm")) as s:
        r = httpx.post(f"{s.url}/v1/chat/completions", timeout=60, json={
            "model": "tiny-vlm", "max_tokens": 4, "messages": [{"role": "user", "content": [
                {"type": "video_url", "video_url": {"url": _video_url(clips(video_world, 1)[0])}},
                {"type": "text", "text": "what happens?"}]}]})
        assert r.status_code == 400 and "image_url" in r.json()["error"]["message"]


def test_the_context_must_hold_the_clip_a_question_and_a_traced_answer():
    from glimpse.errors import GlimpseError

    # the recipe's 8 frames of 16 tokens: 128 + 104 for the longest traced answer + 32 for the question
    with pytest.raises(GlimpseError, match="model.lm.context_length: 256 must be at least 264"):
        load_recipe("shapes-video-llava", ["model.answer_traces=true"])
    assert load_recipe("shapes-video-llava", ["model.answer_traces=true", "model.lm.context_length=264"]).model.answer_traces
    # 128 pooled tokens and a whole 8x8 grid for each of 2 slow frames: 256, and no room for a question
    with pytest.raises(GlimpseError, match="model.lm.context_length: 256 must be at least 288 for a question after"):
        load_recipe("shapes-video-llava", ["model.slow_frames=2"])
    with pytest.raises(GlimpseError, match="model.slow_frames: 9 must be 0 .off. or from 1 to model.num_frames"):
        load_recipe("shapes-video-llava", ["model.slow_frames=9"])
    with pytest.raises(GlimpseError, match="model.trace_style"):
        load_recipe("shapes-video-llava", ["model.answer_traces=true", "model.lm.context_length=264",
                                           "model.trace_style=sparse"])


def test_demo_video_writes_a_report(video_world, tmp_path, capsys):
    from glimpse.cli import main

    clip = {"data.root": str(video_world), "data.image_size": 32, "data.train_size": 48, "data.val_size": 8,
            "data.test_size": 16, "model.vision.image_size": 32, "model.vision.patch_size": 8,
            "model.vision.width": 32, "model.vision.layers": 1, "model.text.width": 32, "model.text.layers": 1,
            "model.embed_dim": 32, "model.temporal_layers": 1, "train.batch_size": 8, "train.max_steps": 2,
            "train.warmup_steps": 1, "train.save_every": 2, "eval.batch_size": 8}
    llava = {"model.lm.width": 32, "model.lm.layers": 1, "model.lm.heads": 2, "model.lm.kv_heads": 1,
             "model.lm.context_length": 96, "train.batch_size": 8, "train.max_steps": 2, "train.warmup_steps": 1,
             "train.save_every": 2, "eval.batch_size": 16, "eval.vqa_limit": 12}
    main(["--quiet", "demo", "video", "--out", str(tmp_path / "demo"), *[f"--set={k}={v}" for k, v in clip.items()],
          *[f"--set=llava.{k}={v}" for k, v in llava.items()]])
    out = capsys.readouterr().out
    assert "test/temporal_acc" in out and "test/pairs_t2v_r1" in out and "GFLOP/s" in out and "glimpse ask" in out
    report = (tmp_path / "demo" / "report.html").read_text()
    # each shown clip: its frames as one inline strip, its caption, and up to three questions marked right or wrong
    assert report.count("<div class='clip'>") == 8 and report.count('<img src="data:image/png;base64,') == 8
    assert report.count("<li class=") >= 8 and "src=\"http" not in report
