"""The video LLaVA: LLaVA's model (glimpse/models/vlm.py) reading clips.  Frames go through the image
tower, each frame's patch grid is pooled before the projector (LLaVA-NeXT-Video's average or max), and
each frame's tokens get a temporal position; it answers questions about clips and captions them.

    model.py      VideoLanguageModel: VisionLanguageModel with clips, pooling and frame positions
    data.py       LLaVA-Video conversations (`<video>`) as LLaVA's records
    pipeline.py   what glimpse.load returns: ask, caption, chat with clips
    evaluate.py   question answering by type, the frame-order controls, CIDEr
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from glimpse import runs
from glimpse.data.conversations import ConversationCollate, ConversationDataset
from glimpse.data.shapes_video_traces import TRACE_STYLES, traced_answer_tokens
from glimpse.data.video import clip_pixels
from glimpse.errors import GlimpseError
from glimpse.families import checks
from glimpse.families.base import Family, HFBuild, Loaded, recipe_transform
from glimpse.families.feature_cache import cache_tower_features
from glimpse.families.registry import register
from glimpse.families.video_llava import hf
from glimpse.families.video_llava.data import (
    hold_middle,
    reversed_source,
    still_source,
    stream_video_conversations,
    video_records,
)
from glimpse.families.video_llava.evaluate import evaluate
from glimpse.families.video_llava.model import POOLS, VideoLanguageModel, VideoLLaVAConfig
from glimpse.families.video_llava.pipeline import VideoLanguagePipeline
from glimpse.hub import folder as hf_folder
from glimpse.losses import lm_loss_at_targets
from glimpse.schema import check, choice


@register
class VideoLLaVAFamily(Family):
    name = "video_llava"
    config = VideoLLaVAConfig
    train_options = frozenset({"cache_vision_features"})
    data_formats = ("llava",)
    hf_model_types = hf.MODEL_TYPES
    streams = True  # shards of LLaVA-Video records (data.source wds); evaluation needs the moving-shapes world

    @classmethod
    def validate(cls, recipe) -> None:
        m = recipe.model
        checks.check_llava(recipe)
        choice("data.source", recipe.data.source, ("shapes-video", "msrvtt", "wds"))
        if recipe.data.source == "wds":
            check(recipe.data.stream, "data.source", "wds", "LLaVA-Video shards are read as a stream: set data.stream true")
            check(not m.reverse_twins, "model.reverse_twins", True, "needs the moving-shapes world's tracks, not shards")
            check(not recipe.train.cache_vision_features, "train.cache_vision_features", True,
                  "caches the features of a set read whole: not with data.stream")
            check(not recipe.eval.splits and not recipe.eval.during_train, "eval.splits/during_train",
                  [*recipe.eval.splits, *recipe.eval.during_train],
                  "the video LLaVA evaluates on the moving-shapes world: set eval.splits=[] and eval.during_train=[]")
        choice("model.connector", m.connector, ("linear", "mlp2x_gelu"))
        choice("model.vision_feature_select", m.vision_feature_select, ("patch",))
        choice("model.spatial_pool", m.spatial_pool, POOLS)
        v = m.vision
        check(m.pixel_shuffle == 1, "model.pixel_shuffle", m.pixel_shuffle, "must be 1: frames are pooled instead")
        grid = v.image_size // max(v.patch_size, 1)
        check(1 <= m.spatial_pool_stride <= grid, "model.spatial_pool_stride", m.spatial_pool_stride,
              f"must be from 1 to the {grid}x{grid} patch grid's side")
        check(m.temporal_conv == 0 or (m.temporal_conv % 2 == 1 and m.spatial_pool != "none"
                                       and grid % m.spatial_pool_stride == 0),
              "model.temporal_conv", m.temporal_conv,
              "must be 0 (off) or an odd number of frames, beside a spatial_pool whose stride divides the grid")
        check(m.num_frames >= 1, "model.num_frames", m.num_frames, "must be at least 1")
        check(m.slow_frames == 0 or (m.spatial_pool != "none" and 1 <= m.slow_frames <= m.num_frames),
              "model.slow_frames", m.slow_frames,
              "must be 0 (off) or from 1 to model.num_frames, beside a spatial_pool (the fast frames' tokens)")
        check(not m.second_tower or not m.temporal_tokens, "model.second_tower", m.second_tower,
              "cannot go with model.temporal_tokens (the temporal head reads one tower's embeddings)")
        check(not m.second_tower or "second_vision" in recipe.freeze, "model.second_tower", True,
              "needs the second tower in the freeze list (freeze: [vision, second_vision]): it is a frozen tower")
        for key in ("answer_traces", "still_twins", "all_questions"):
            check(not getattr(m, key) or recipe.data.source == "shapes-video", f"model.{key}", getattr(m, key),
                  "needs the moving-shapes world's annotations (data.source: shapes-video)")
        choice("model.trace_style", m.trace_style, TRACE_STYLES)
        # the clip's tokens, a question (~32 tokens) and, traced, the longest traced answer
        need = VideoLanguageModel.count_image_tokens(m) + 32 \
            + (traced_answer_tokens(m.num_frames) if m.answer_traces else 0)
        check(m.lm.context_length >= need, "model.lm.context_length", m.lm.context_length,
              f"must be at least {need} for a question{' and its traced answer' if m.answer_traces else ''} "
              f"after the clip's {VideoLanguageModel.count_image_tokens(m)} tokens")

    def __init__(self, recipe, root: Path, tokenizer):
        super().__init__(recipe, root, tokenizer)
        m = recipe.model
        m.lm.vocab_size = m.lm.vocab_size or tokenizer.vocab_size
        if tokenizer.ids.get("image") is None:
            raise GlimpseError(f"the tokenizer {tokenizer.path} has no <image> token (a clip's slot)")
        m.image_token_id = tokenizer.ids["image"]
        self.transform = recipe_transform(recipe)
        self.records, self.image_rows, self.feature_cache = None, None, None  # see prepare()

    def load_clip(self, src, name=None) -> torch.Tensor:
        src, still = still_source(src)
        src, backwards = reversed_source(src)
        pixels = clip_pixels(src, self.recipe.model.num_frames, self.transform)
        return hold_middle(pixels) if still else pixels.flip(0) if backwards else pixels

    def _records(self) -> list[dict]:
        m = self.recipe.model
        return video_records(self.recipe.data, self.root, "train", twins=m.reverse_twins, traces=m.answer_traces,
                             trace_style=m.trace_style, stills=m.still_twins, all_questions=m.all_questions)

    def build_model(self) -> nn.Module:
        return VideoLanguageModel(self.recipe.model)

    def load_init(self, model: VideoLanguageModel, weights: Path) -> None:
        """`init: RUN`, strictly; a one-tower run continues with a second tower exactly as it was: the
        projector's first layer gets zero weights for the new channels, and the second tower comes from
        `init_parts` (loaded after this)."""
        tensors = runs.read_weights(weights)
        if not model.cfg.second_tower or any(k.startswith("second_vision.") for k in tensors):
            return runs.load_tensors(model, tensors, weights)
        if "connector.norm.weight" in tensors:
            raise GlimpseError(f"init: {weights} normalises its tower's features before the projector "
                               "(projector_norm); it cannot continue with a second tower")
        key, dv = "connector.linear_1.weight", model.cfg.vision.width
        if key in tensors and tensors[key].shape[1] == dv:
            tensors[key] = torch.cat([tensors[key], tensors[key].new_zeros(tensors[key].shape[0], dv)], dim=1)
        own = {f"second_vision.{k}": v for k, v in model.second_vision.state_dict().items()}
        runs.load_tensors(model, {**tensors, **own}, weights)

    def prepare(self, model: VideoLanguageModel, device: torch.device, progress: bool = True) -> None:
        """A frozen tower's pooled features of every training clip, computed once (train.cache_vision_features)."""
        if self.recipe.train.cache_vision_features:
            self.records = self._records()
            c = model.cfg
            clips = [clip for r in self.records for clip in r["images"]]
            rows, cache = cache_tower_features(
                model, [clip for clip in clips if not reversed_source(clip)[1]], self.transform,
                self.recipe.data.max_pixels, device, self.recipe.eval.batch_size, progress,
                settings=(c.vision_feature_layer, c.num_frames, c.spatial_pool, c.spatial_pool_stride,
                          c.temporal_tokens, VideoLanguageModel.pools_in_project(c), c.second_tower),
                loader=self.load_clip)
            self.image_rows, self.feature_cache = _with_twins(rows, cache, clips, model.reverse_features)

    def train_data(self):
        m = self.recipe.model
        if self.recipe.data.stream:
            return stream_video_conversations(
                self.recipe.data, self.root, self.tokenizer, m.chat_template, self.transform, m.num_frames,
                VideoLanguageModel.count_image_tokens(m), m.lm.context_length, self.recipe.train.seed), \
                ConversationCollate(self.tokenizer.pad_id)
        records = self.records if self.records is not None else self._records()
        dataset = ConversationDataset(records, self.tokenizer, m.chat_template, self.transform,
                                      self.recipe.data.max_pixels, VideoLanguageModel.count_image_tokens(m),
                                      m.lm.context_length, self.image_rows, loader=self.load_clip)
        return dataset, ConversationCollate(self.tokenizer.pad_id)

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        lm = model.module.lm if hasattr(model, "module") else model.lm  # DDP wraps the model
        clips = {"tower_features": self.feature_cache[batch["image_rows"]]} if "image_rows" in batch \
            else {"pixel_values": batch["pixel_values"]}
        hidden = model(batch["input_ids"], batch["attention_mask"], return_hidden=True, **clips)
        return lm_loss_at_targets(hidden, lm.lm_head, batch["labels"])

    def pipeline(self, model: VideoLanguageModel) -> VideoLanguagePipeline:
        return VideoLanguagePipeline(model, self.tokenizer, self.transform)

    def evaluate(self, model: VideoLanguageModel, splits: list[str]) -> dict[str, float]:
        if self.recipe.data.source != "shapes-video":
            raise GlimpseError("video_llava evaluates on the moving-shapes world's questions (data.source: shapes-video)")
        e = self.recipe.eval
        return evaluate(self.pipeline(model), self.root, splits, e.batch_size, e.vqa_limit)

    @classmethod
    def hf_build(cls, folder: Path, config: dict) -> HFBuild:
        return hf.build(folder, config)

    @classmethod
    def hf_inputs(cls, folder: Path, model: VideoLanguageModel, tokenizer):
        if tokenizer:
            tokenizer.ids["image"] = model.cfg.image_token_id  # the video token: a clip's slot
        for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
            if (folder / name).is_file():
                return tokenizer, hf_folder.image_transform(folder, model.cfg.vision.image_size, name)
        return tokenizer, hf_folder.image_transform(folder, model.cfg.vision.image_size)

    @classmethod
    def hf_pipeline(cls, loaded: Loaded) -> VideoLanguagePipeline:
        return VideoLanguagePipeline(loaded.model, loaded.tokenizer, loaded.transform)


def _with_twins(rows: dict, cache: torch.Tensor, clips: list, reverse) -> tuple[dict, torch.Tensor]:
    """The feature cache with a row for each reversed twin: its clip's row with the frames in reverse order
    (`reverse`: the model's `reverse_features`; the tower reads each frame alone, so that is exactly the
    reversed clip's features)."""
    twins = [c for c in dict.fromkeys(clips) if reversed_source(c)[1]]
    own = [rows[reversed_source(c)[0]] for c in twins]
    good = [(c, r) for c, r in zip(twins, own) if isinstance(r, int)]
    rows = {**rows, **{c: r for c, r in zip(twins, own) if not isinstance(r, int)}}  # a bad clip's reason
    if not good:
        return rows, cache
    flipped = reverse(cache[[r for _, r in good]])
    rows.update({c: len(cache) + i for i, (c, _) in enumerate(good)})
    return rows, torch.cat([cache, flipped])


__all__ = ["VideoLLaVAFamily", "VideoLanguageModel", "VideoLLaVAConfig", "VideoLanguagePipeline"]
