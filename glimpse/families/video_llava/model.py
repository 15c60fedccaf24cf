"""The video LLaVA: LLaVA's model (glimpse.families.vlm) with clips where images were.

A clip's frames go through the image tower one by one; each frame's patch grid is pooled before the
projector (LLaVA-NeXT-Video's `LlavaNextVideoPooler`: average or max, stride 2, so a 4x4 grid gives 4
tokens), the projector maps every pooled token, and a learned temporal position is added to all the
tokens of frame t.  The clip's T x tokens-per-frame features fill the `<image>` slots of the text, so
the prompt expansion, the feature cache and generation are LLaVA's own.

With `temporal_tokens`, T more tokens follow: CLIP4Clip's temporal head (a shapes-video-clip run's
`visual_projection` and seqTransf `temporal`, loaded by init_parts) over the frames' pooled embeddings,
one token a frame, through a projector of its own.  A video dual encoder trained against its clips'
reversals reads frame order (docs/results.md); these tokens hand the LM what that model read.

With `temporal_conv: k`, the pooler also sees motion: a Conv3d with a k-frame, (2s-1)-patch square kernel
(3 x 3 at stride s = 2) over the unpooled patch grids of neighbouring frames, strided as the pool, added to
the pooled tokens (VideoLLaMA 2's spatial-temporal convolution connector, simplified: one convolution, no
frame downsampling).  Its weights start at zero, so the model starts as the plain pooler's; the cache
then holds the unpooled grids.

With `slow_frames: k`, k frames spread over the clip (k = 1: the middle one) also come unpooled, every patch a
token, after the pooled tokens of all frames: SlowFast-LLaVA's and LLaVA-Video's slow pathway (few frames,
many tokens) beside the fast one (every frame, pooled).  A pooled 16-px cell mixes the parts of two shapes;
the slow frame keeps which colour belongs to which shape, and the frame positions tie it to the fast tokens.

With `spatial_positions`, a learned embedding per patch of the grid is added to the tokens too, pooled as
the features are (a pooled token gets the mean of its patches' embeddings; a slow frame's patch its own):
where a token lies in its frame, as Qwen2-VL's M-RoPE gives each visual token its row and column beside its
time.  The frozen tower was trained for a mean-pooled image embedding, so its patch features need not say
where they are; to follow "the red circle" from the slow frame to the fast tokens the LM needs to.  Zero at
the start, so the model starts as it was (a trained run continues with it exactly).

With `second_tower`, a second image tower of the same architecture (`second_vision`, frozen, e.g. one tuned
to say what shape each patch holds: experiments/dense_tower.py) reads every frame too, and its patch features
join the first tower's channel by channel: the pooled tokens carry both to a projector twice as wide, the
spatial-temporal convolution reads the first tower's alone.  Tuning the one tower for identity lost the motion
the LM had read from the CLIP tower's tokens (docs/results.md, sessions 29-30); two towers keep both
(Prismatic's and Cambrian's fused towers, here simply by channel).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from glimpse.models.connectors import Projector
from glimpse.models.temporal import TemporalPool
from glimpse.models.vision import VisionTransformer
from glimpse.models.vlm import VisionLanguageModel, VLMConfig

POOLS = ("average", "max", "none")


@dataclass
class VideoLLaVAConfig(VLMConfig):
    num_frames: int = 8  # sampled uniformly from each clip
    spatial_pool: str = "average"  # average | max | none: LLaVA-NeXT-Video's spatial_pool_mode
    spatial_pool_stride: int = 2
    frame_positions: bool = True  # a learned embedding per frame, added to its tokens
    # training on the moving-shapes world: each clip's reversed twin (its frames backwards, its answers as
    # they then are) beside it, so the loss pays for frame order (video_llava/data.py)
    reverse_twins: bool = False
    # ... and each clip asked static questions also as a still (its middle frame held), asked those only:
    # images beside videos, so the model can read one frame (video_llava/data.py)
    still_twins: bool = False
    # ... and each clip's question conversation asking every question the world asks of it, not the 2-3 picked
    all_questions: bool = False
    # answers to direction, bounce and order questions spelt out as a per-frame trace of where the shapes
    # are, then the answer (video_llava/data.py); evaluation reads the answer after the trace
    answer_traces: bool = False
    trace_style: str = "frames"  # frames: every frame's cell; changes: only where a cell changes (shapes_video_traces)
    # CLIP4Clip's temporal head as one more token a frame (module docstring); its sizes are the video dual
    # encoder's (embed_dim, temporal_layers, temporal_heads, max_frames)
    temporal_tokens: bool = False
    temporal_dim: int = 128
    temporal_layers: int = 2
    temporal_heads: int = 2
    temporal_max_frames: int = 16
    temporal_conv: int = 0  # frames in the kernel of the spatial-temporal convolution (module docstring); 0: off
    slow_frames: int = 0  # frames also given unpooled, every patch a token (module docstring); 0: off
    # a learned embedding per grid patch, pooled with the features (module docstring); worse in the recipe (session 28)
    spatial_positions: bool = False
    second_tower: bool = False  # a second tower's patch features beside the first's (module docstring)


class VideoLanguageModel(VisionLanguageModel):
    def __init__(self, cfg: VideoLLaVAConfig):
        super().__init__(cfg)
        self.frame_pos = nn.Parameter(torch.randn(cfg.num_frames, self.lm.cfg.width) * 0.02) \
            if cfg.frame_positions else None
        grid = cfg.vision.image_size // cfg.vision.patch_size
        self.spatial_pos = nn.Parameter(torch.zeros(grid * grid, self.lm.cfg.width)) \
            if cfg.spatial_positions else None
        if cfg.temporal_tokens:  # named as in the video dual encoder, so its run's parts load by init_parts
            self.visual_projection = nn.Linear(cfg.vision.width, cfg.temporal_dim, bias=False)
            self.temporal = TemporalPool(cfg.temporal_dim, "seqTransf", cfg.temporal_layers, cfg.temporal_heads,
                                         cfg.temporal_max_frames)
            self.temporal_connector = Projector("mlp2x_gelu", cfg.temporal_dim, self.lm.cfg.width)
        if cfg.second_tower:  # the projector reads both towers' channels (feature_width)
            self.second_vision = VisionTransformer(cfg.vision)
        if cfg.temporal_conv:
            s = cfg.spatial_pool_stride  # a (2s-1)-patch kernel at stride s: the pool's grid, each token's neighbours
            self.st_conv = nn.Conv3d(cfg.vision.width, cfg.vision.width, (cfg.temporal_conv, 2 * s - 1, 2 * s - 1),
                                     stride=(1, s, s), padding=(cfg.temporal_conv // 2, s - 1, s - 1))
            nn.init.zeros_(self.st_conv.weight)  # starts as the plain pooler
            nn.init.zeros_(self.st_conv.bias)

    @staticmethod
    def feature_width(cfg: VideoLLaVAConfig) -> int:
        return cfg.vision.width * (2 if cfg.second_tower else 1)

    def feature_towers(self) -> list[nn.Module]:
        return [self.vision, self.second_vision] if self.cfg.second_tower else [self.vision]

    @staticmethod
    def tokens_per_frame(cfg: VideoLLaVAConfig) -> int:
        grid = cfg.vision.image_size // cfg.vision.patch_size
        if cfg.spatial_pool != "none":
            grid //= cfg.spatial_pool_stride  # as nn.AvgPool2d / MaxPool2d (LLaVA-NeXT-Video's pooler)
        return grid * grid

    @staticmethod
    def pools_in_project(cfg: VideoLLaVAConfig) -> bool:
        """Whether the tower's features stay unpooled (in the cache too) and `project` pools them: the
        convolution and the slow frames read the whole grid."""
        return cfg.spatial_pool != "none" and bool(cfg.temporal_conv or cfg.slow_frames)

    @staticmethod
    def features_per_frame(cfg: VideoLLaVAConfig) -> int:
        """Tower features a frame keeps (and the cache holds): the pooled grid, or the whole one when the
        pooling happens in `project`."""
        grid = cfg.vision.image_size // cfg.vision.patch_size
        return grid * grid if VideoLanguageModel.pools_in_project(cfg) else VideoLanguageModel.tokens_per_frame(cfg)

    @staticmethod
    def slow_frame_indices(cfg: VideoLLaVAConfig) -> list[int]:
        """The slow frames: the middles of k equal stretches of the clip (k = 1: frame T // 2, the frame the
        single-frame baseline holds)."""
        T, k = cfg.num_frames, cfg.slow_frames
        return [(2 * i + 1) * T // (2 * k) for i in range(k)]

    @staticmethod
    def count_image_tokens(cfg: VideoLLaVAConfig) -> int:
        """How many `<image>` tokens stand for one clip in the text."""
        grid = cfg.vision.image_size // cfg.vision.patch_size
        return cfg.num_frames * (VideoLanguageModel.tokens_per_frame(cfg) + int(cfg.temporal_tokens)) \
            + cfg.slow_frames * grid * grid

    def tower_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Clips [N, T, 3, H, W] -> patch features [N, T x features_per_frame, D] (cacheable; D: the towers'
        widths together, `feature_width`), then (temporal_tokens) each frame's pooled embedding."""
        N, T = pixel_values.shape[:2]
        if T != self.cfg.num_frames:
            raise ValueError(f"clips of {T} frames: this model reads {self.cfg.num_frames}")
        x = super().tower_features(pixel_values.flatten(0, 1))  # [N*T, P, Dv], class token dropped
        if self.cfg.second_tower:  # [N*T, P, 2 Dv]
            x = torch.cat([x, self.patch_features(self.second_vision, pixel_values.flatten(0, 1))], dim=-1)
        if self.cfg.spatial_pool != "none" and not self.pools_in_project(self.cfg):
            x = self._pool(x)
        x = x.reshape(N, -1, x.shape[-1])
        if self.cfg.temporal_tokens:  # then each frame's pooled embedding, for the temporal head
            x = torch.cat([x, self.vision(pixel_values.flatten(0, 1)).view(N, T, -1).to(x.dtype)], dim=1)
        return x

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        """[frames, g*g, Dv] -> [frames, (g/s)^2, Dv]: LLaVA-NeXT-Video's pooler."""
        g = math.isqrt(x.shape[1])
        grid = x.transpose(1, 2).reshape(x.shape[0], -1, g, g)
        s = self.cfg.spatial_pool_stride
        pool = F.avg_pool2d if self.cfg.spatial_pool == "average" else F.max_pool2d
        return pool(grid, s, s).flatten(2).transpose(1, 2)

    def _pool_with_motion(self, patches: torch.Tensor) -> torch.Tensor:
        """[N, T, g*g, D] -> [N, T, tokens, D]: the pooled grid plus the convolution over neighbouring frames
        (over the first tower's Dv channels: with a second tower, D = 2 Dv)."""
        N, T, P, D = patches.shape
        pooled = self._pool(patches.flatten(0, 1)).view(N, T, -1, D)
        g, dv = math.isqrt(P), self.cfg.vision.width
        grid = patches[..., :dv].reshape(N, T, g, g, dv).permute(0, 4, 1, 2, 3)  # [N, Dv, T, g, g]
        motion = self.st_conv(grid).flatten(3).permute(0, 2, 3, 1)  # [N, T, tokens, Dv]
        return torch.cat([pooled[..., :dv] + motion, pooled[..., dv:]], dim=-1)

    def split_features(self, tower_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tower features -> (the patches [N, T, features_per_frame, D], the frames' pooled embeddings [N, T, Dv] or None)."""
        N, T = tower_features.shape[0], self.cfg.num_frames
        patches = T * self.features_per_frame(self.cfg)
        frames = tower_features[:, patches:] if self.cfg.temporal_tokens else None
        return tower_features[:, :patches].reshape(N, T, -1, tower_features.shape[-1]), frames

    def reverse_features(self, tower_features: torch.Tensor) -> torch.Tensor:
        """The tower features of the clips played backwards (the tower reads each frame alone)."""
        patches, frames = self.split_features(tower_features)
        parts = [patches.flip(1).flatten(1, 2)] + ([] if frames is None else [frames.flip(1)])
        return torch.cat(parts, dim=1)

    def project(self, tower_features: torch.Tensor) -> torch.Tensor:
        """[N, features, Dv] -> [N, image tokens, lm width]: each frame's tokens with its position, then
        (slow_frames) the slow frames' unpooled patches with theirs, then (temporal_tokens) the temporal
        head's token of each frame."""
        patches, frames = self.split_features(tower_features)
        N, T, P, D = patches.shape
        at = self.slow_frame_indices(self.cfg)
        slow = patches[:, at] if at else None
        if self.cfg.temporal_conv:
            patches = self._pool_with_motion(patches)
        elif self.pools_in_project(self.cfg):
            patches = self._pool(patches.flatten(0, 1)).view(N, T, -1, D)
        x = self.connector(patches.flatten(1, 2))
        if self.frame_pos is not None:
            x = x + self.frame_pos.repeat_interleave(self.tokens_per_frame(self.cfg), dim=0).to(x.dtype)
        if self.spatial_pos is not None:  # each frame's tokens in the same places
            cells = self._pool(self.spatial_pos[None])[0] if self.cfg.spatial_pool != "none" else self.spatial_pos
            x = x + cells.repeat(T, 1).to(x.dtype)
        if slow is not None:
            s = self.connector(slow.flatten(1, 2))
            if self.frame_pos is not None:
                s = s + self.frame_pos[at].repeat_interleave(P, dim=0).to(s.dtype)
            if self.spatial_pos is not None:
                s = s + self.spatial_pos.repeat(len(at), 1).to(s.dtype)
            x = torch.cat([x, s], dim=1)
        if frames is not None:
            t = self.temporal_connector(self.temporal.per_frame(self.visual_projection(frames)))
            x = torch.cat([x, t + self.frame_pos[:T].to(t.dtype) if self.frame_pos is not None else t], dim=1)
        return x
