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

    @property
    def embed_dim(self) -> int:
        return self.vq_embed_dim or self.latent_channels

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def check(self) -> None:
        if not self.block_out_channels:
            raise ValueError("block_out_channels must name at least one block")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"block width {c} is not divisible by norm_num_groups {self.norm_num_groups}")


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
    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(num_embeddings, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / num_embeddings, 1.0 / num_embeddings)  # taming's init

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest code of each position: z [B, C, H, W] -> [B, H, W]."""
        B, C, H, W = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, C)
        return torch.cdist(flat, self.embedding.weight).argmin(1).view(B, H, W)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes of indices [B, H, W] -> [B, C, H, W] (diffusers' get_codebook_entry)."""
        return self.embedding(indices).permute(0, 3, 1, 2).contiguous()


class VQModel(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        cfg.check()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.latent_channels, cfg.embed_dim, 1)
        self.quantize = VectorQuantizer(cfg.num_vq_embeddings, cfg.embed_dim)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.latent_channels, 1)
        self.decoder = Decoder(cfg)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Latents before quantisation [B, embed_dim, h, w] (diffusers' `encode(x).latents`); pixels in [-1, 1]."""
        return self.quant_conv(self.encoder(pixels))

    def decode_latents(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z_q))

    @torch.no_grad()
    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """The code grid [B, h, w] of images in [-1, 1]."""
        return self.quantize.indices(self.encode(pixels))

    def decode_tokens(self, indices: torch.Tensor) -> torch.Tensor:
        """Images in about [-1, 1] from code grids [B, h, w] (or flat [B, h * w] for a square grid)."""
        if indices.ndim == 2:
            side = int(round(indices.shape[1] ** 0.5))
            indices = indices.view(-1, side, side)
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
