"""A convolutional VQ-VAE: an image into a grid of codebook indices and back (VQGAN without the GAN).

The modules and their tensor names are diffusers' `VQModel` (`encoder.down_blocks.{i}.resnets.{j}.conv1`,
`quantize.embedding.weight`, ...), so a diffusers folder's weights load by name and glimpse's export
writes them unchanged; the layout is taming's VQGAN with diffusers' names.  With f = 2^(blocks - 1),
a 64 px image becomes (64/f)^2 codes.

Quantisation is plain nearest neighbour (what diffusers' `VectorQuantizer` computes), so exported
models give the same codes.  The VQ loss is taming's with `legacy=False`: beta weighs the commitment
term that pulls the encoder towards its code, not the codebook term (taming-transformers#46, PR#58).
Training-only tricks (k-means initialisation, restarting dead codes) are the family's
(glimpse/families/vq), not this part's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from glimpse.models.attention import attend


@dataclass
class VQConfig:
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 128, 128])  # f = 2^(len - 1)
    layers_per_block: int = 1  # the decoder's blocks have one more, as diffusers' and taming's do
    latent_channels: int = 64
    num_vq_embeddings: int = 256
    vq_embed_dim: int = 0  # 0: latent_channels; smaller codes (a 1x1 quant_conv between) are used more evenly
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    sample_size: int = 64
    beta: float = 0.25  # the commitment weight
    # product quantisation: a position's code vector is cut into this many slices, each its own code
    # from its own codebook of num_vq_embeddings (so G codes a position, K^G combinations); 1: plain VQ
    codebook_groups: int = 1

    @property
    def embed_dim(self) -> int:
        return self.vq_embed_dim or self.latent_channels

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def tokens_per_image(self) -> int:
        """Codes of one image at sample_size: (sample_size / f)^2 positions, G codes each."""
        return (self.sample_size // self.downsample) ** 2 * self.codebook_groups

    def check(self) -> None:
        if not self.block_out_channels:
            raise ValueError("block_out_channels must name at least one block")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"block width {c} is not divisible by norm_num_groups {self.norm_num_groups}")
        if self.codebook_groups < 1 or self.embed_dim % self.codebook_groups:
            raise ValueError(f"codebook_groups {self.codebook_groups} must be at least 1 and divide the code width "
                             f"{self.embed_dim}")


class ResnetBlock2D(nn.Module):
    """GroupNorm, SiLU, conv, twice, with a 1x1 conv on the skip path when the width changes."""

    def __init__(self, cin: int, cout: int, groups: int, eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Downsample2D(nn.Module):
    """A stride-2 conv after padding right and bottom by one (taming's and diffusers' padding=0 case)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class SpatialSelfAttention(nn.Module):
    """One-head self-attention over the positions of a feature map, with a residual (the mid block's)."""

    def __init__(self, channels: int, groups: int, eps: float = 1e-6):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x).view(B, C, H * W).transpose(1, 2)  # [B, HW, C]
        y = attend(self, self.to_q(h)[:, None], self.to_k(h)[:, None], self.to_v(h)[:, None])
        y = self.to_out[0](y[:, 0])
        return x + y.transpose(1, 2).reshape(B, C, H, W)


class MidBlock2D(nn.Module):
    """resnet, attention, resnet at the lowest resolution (diffusers' UNetMidBlock2D)."""

    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([SpatialSelfAttention(channels, groups) if attention else None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if self.attentions[0] is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class EncoderBlock(nn.Module):
    """diffusers' DownEncoderBlock2D: resnets, then (all but the last block) a downsampler."""

    def __init__(self, cin: int, cout: int, layers: int, groups: int, down: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(cin if j == 0 else cout, cout, groups) for j in range(layers)])
        self.downsamplers = nn.ModuleList([Downsample2D(cout)]) if down else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for r in self.resnets:
            x = r(x)
        return x if self.downsamplers is None else self.downsamplers[0](x)


class DecoderBlock(nn.Module):
    """diffusers' UpDecoderBlock2D: resnets, then (all but the last block) an upsampler."""

    def __init__(self, cin: int, cout: int, layers: int, groups: int, up: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(cin if j == 0 else cout, cout, groups) for j in range(layers)])
        self.upsamplers = nn.ModuleList([Upsample2D(cout)]) if up else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for r in self.resnets:
            x = r(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            EncoderBlock(ch[max(i - 1, 0)], c, cfg.layers_per_block, g, down=i < len(ch) - 1) for i, c in enumerate(ch))
        self.mid_block = MidBlock2D(ch[-1], g, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        ch, g = list(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock2D(ch[0], g, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            DecoderBlock(ch[max(i - 1, 0)], c, cfg.layers_per_block + 1, g, up=i < len(ch) - 1) for i, c in enumerate(ch))
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class VectorQuantizer(nn.Module):
    """Nearest-neighbour quantisation.  With `groups` G > 1 it is product quantisation (Jegou et al. 2011):
    a code vector is cut into G slices, slice g quantised by codebook g (rows g*K .. (g+1)*K of one
    embedding), and indices are the local ids 0..K-1 of each slice, [B, H, W, G]; G = 1 is diffusers'
    `VectorQuantizer` and its indices [B, H, W]."""

    def __init__(self, num_embeddings: int, dim: int, groups: int = 1):
        super().__init__()
        self.num_embeddings, self.groups = num_embeddings, groups
        self.embedding = nn.Embedding(num_embeddings * groups, dim // groups)
        nn.init.uniform_(self.embedding.weight, -1.0 / num_embeddings, 1.0 / num_embeddings)  # taming's init

    def codebook(self, g: int) -> torch.Tensor:
        """Group g's codes [K, dim / G] (a view: writes reach the embedding)."""
        K = self.num_embeddings
        return self.embedding.weight[g * K:(g + 1) * K]

    def slices(self, z: torch.Tensor) -> torch.Tensor:
        """Latents z [B, C, H, W] as [B * H * W, G, C / G]."""
        return z.permute(0, 2, 3, 1).reshape(-1, self.groups, z.shape[1] // self.groups)

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest code of each position (and slice): z [B, C, H, W] -> [B, H, W] (G = 1) or [B, H, W, G]."""
        B, C, H, W = z.shape
        flat = self.slices(z)
        ids = torch.stack([torch.cdist(flat[:, g], self.codebook(g)).argmin(1) for g in range(self.groups)], 1)
        return ids.view(B, H, W) if self.groups == 1 else ids.view(B, H, W, self.groups)

    def global_ids(self, indices: torch.Tensor) -> torch.Tensor:
        """Rows of the embedding of local indices ([B, H, W] or [B, H, W, G])."""
        if self.groups == 1:
            return indices
        return indices + torch.arange(self.groups, device=indices.device) * self.num_embeddings

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes of indices [B, H, W] (or [B, H, W, G]) -> [B, C, H, W] (diffusers' get_codebook_entry)."""
        if self.groups > 1 and (indices.ndim != 4 or indices.shape[-1] != self.groups):
            raise ValueError(f"codes of a tokenizer with {self.groups} codebook groups come as [B, h, w, {self.groups}] "
                             f"(or flat, a position's {self.groups} together), not {tuple(indices.shape)}")
        codes = self.embedding(self.global_ids(indices))
        if self.groups > 1:
            codes = codes.flatten(-2)  # the slices side by side
        return codes.permute(0, 3, 1, 2).contiguous()


class VQModel(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        cfg.check()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.latent_channels, cfg.embed_dim, 1)
        self.quantize = VectorQuantizer(cfg.num_vq_embeddings, cfg.embed_dim, cfg.codebook_groups)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.latent_channels, 1)
        self.decoder = Decoder(cfg)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Latents before quantisation [B, embed_dim, h, w] (diffusers' `encode(x).latents`); pixels in [-1, 1]."""
        return self.quant_conv(self.encoder(pixels))

    def decode_latents(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z_q))

    @torch.no_grad()
    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """The code grid [B, h, w] of images in [-1, 1] ([B, h, w, G] with codebook groups)."""
        return self.quantize.indices(self.encode(pixels))

    def decode_tokens(self, indices: torch.Tensor) -> torch.Tensor:
        """Images in about [-1, 1] from code grids [B, h, w] ([B, h, w, G] with codebook groups), or flat
        [B, h * w * G] for a square grid (`tokens(...).flatten(1)`: a position's G codes side by side)."""
        G = self.cfg.codebook_groups
        if indices.ndim == 2:
            side = int(round((indices.shape[1] // G) ** 0.5))
            indices = indices.view(-1, side, side) if G == 1 else indices.view(-1, side, side, G)
        return self.decode_latents(self.quantize.lookup(indices))

    def quantize_latents(self, z: torch.Tensor, indices: torch.Tensor | None = None):
        """(codes with the straight-through gradient, the VQ loss, the indices) of latents z.  The loss
        is taming's legacy=False: beta * |z - sg(e)|^2 (commitment, on the encoder) + |sg(z) - e|^2."""
        if indices is None:
            indices = self.quantize.indices(z.detach())
        z_q = self.quantize.lookup(indices)
        vq_loss = self.cfg.beta * F.mse_loss(z, z_q.detach()) + F.mse_loss(z_q, z.detach())
        return z + (z_q - z).detach(), vq_loss, indices

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The reconstruction, with what the loss needs: the VQ loss and the indices."""
        z = self.encode(pixels)
        z_q, vq_loss, indices = self.quantize_latents(z)
        return {"reconstruction": self.decode_latents(z_q), "vq_loss": vq_loss, "indices": indices, "latents": z}
