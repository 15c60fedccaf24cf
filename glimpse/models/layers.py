"""Transformer building blocks shared by every tower: attention, MLP, pre-norm block, pooling heads.

Attention always goes through `scaled_dot_product_attention`. Linear layers keep the
shapes of Hugging Face's CLIP/SigLIP so that their checkpoints map in without reshaping,
except that q, k and v are fused into one `qkv` projection (one matmul instead of three);
the checkpoint mapper concatenates them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glimpse.models.attention import attend

ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    # OpenAI CLIP's sigmoid approximation of GELU
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


class Attention(nn.Module):
    """Multi-head self-attention (or cross-attention when `context` is given)."""

    def __init__(self, dim: int, heads: int, bias: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.out = nn.Linear(dim, dim, bias=bias)

    def forward(
        self,
        x: torch.Tensor,  # [B, T, D]
        mask: torch.Tensor | None = None,  # bool [B, 1, T|1, S], True = attend
        causal: bool = False,
    ) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x [B, H, T, hd]
        y = attend(self, q, k, v, attn_mask=mask, is_causal=causal and mask is None)
        return self.out(y.transpose(1, 2).reshape(B, T, D))


class RMSNorm(nn.Module):
    """Llama's norm (computed in fp32); also over each head's queries and keys (IDEFICS' qk norms)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str = "gelu"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Transformer block: pre-norm as in CLIP and SigLIP (norm="pre"), or post-norm as in BERT
    (norm="post": each residual sum is normalised, ln1 after attention, ln2 after the MLP)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, act: str = "gelu", eps: float = 1e-5,
                 norm: str = "pre"):
        super().__init__()
        if norm not in ("pre", "post"):
            raise ValueError(f"block norm {norm!r} must be pre or post")
        self.post = norm == "post"
        self.ln1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads)
        self.ln2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio), act)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        if self.post:
            x = self.ln1(x + self.attn(x, mask, causal))
            return self.ln2(x + self.mlp(x))
        x = x + self.attn(self.ln1(x), mask, causal)
        return x + self.mlp(self.ln2(x))


class AttentionPool(nn.Module):
    """SigLIP's multihead attention pooling ("MAP") head: one learned probe attends over all tokens."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, act: str = "gelu_tanh", eps: float = 1e-6):
        super().__init__()
        self.heads = heads
        self.probe = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.ln = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio), act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, D]
        B, T, D = x.shape
        hd = D // self.heads
        q = self.q(self.probe.expand(B, -1, -1)).view(B, 1, self.heads, hd).transpose(1, 2)
        k, v = self.kv(x).view(B, T, 2, self.heads, hd).permute(2, 0, 3, 1, 4)
        y = attend(self, q, k, v).transpose(1, 2).reshape(B, 1, D)
        y = self.out(y)
        y = y + self.mlp(self.ln(y))
        return y[:, 0]


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """Truncated-normal linear/embedding weights and zero biases: the usual ViT/CLIP start."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def clip_init(blocks: nn.ModuleList, width: int) -> None:
    """CLIP's initialisation of the transformer blocks (as transformers' CLIPPreTrainedModel):
    std width^-0.5 scaled down by sqrt(2·layers) on the inputs to each residual branch's end.
    Small fixed stds (0.02) at these widths leave every image's pooled token nearly the same."""
    layers = max(len(blocks), 1)
    in_std = width**-0.5 * (2 * layers) ** -0.5
    for b in blocks:
        nn.init.normal_(b.attn.qkv.weight, std=in_std)
        nn.init.normal_(b.attn.out.weight, std=width**-0.5)
        nn.init.normal_(b.mlp.fc1.weight, std=(2 * width) ** -0.5)
        nn.init.normal_(b.mlp.fc2.weight, std=in_std)
