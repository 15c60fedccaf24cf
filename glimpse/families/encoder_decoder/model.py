"""The encoder-decoder captioner: a ViT encoder, and a causal decoder that reads the encoder's token
states through cross-attention in every block (transformers' VisionEncoderDecoderModel with a ViT
and a GPT-2 `add_cross_attention`, as nlpconnect/vit-gpt2-image-captioning is).

    vision    VisionTransformer; the memory is every token's state after the final norm (ViTModel's
              last_hidden_state, class token included)
    proj      a Linear from the encoder's width to the decoder's, only when they differ (enc_to_dec_proj)
    decoder   CausalLM with `cross_attention`: self-attention, then cross-attention, then the MLP

Training is teacher forcing as transformers does it: `decoder_input_ids = shift_tokens_right(labels)`
(the decoder start token first, -100 turned into padding) and a cross-entropy on `labels` with no
second shift.  Generation starts from `[decoder_start_token_id]` and runs glimpse's engine
(glimpse.infer.generate) with the image states as its memory: their cross-attention keys and values
are computed once per layer, at the prefill, and kept in the KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from glimpse.models.decoder import CausalLM, DecoderConfig
from glimpse.models.vision import VisionConfig, VisionTransformer

IGNORE = -100


@dataclass
class EncoderDecoderConfig:
    # ViT's shape by default (class token, patch bias, no pre-norm), so the model exports to a HF ViT
    vision: VisionConfig = field(default_factory=lambda: VisionConfig(pre_norm=False, patch_bias=True, eps=1e-12))
    decoder: DecoderConfig = field(default_factory=lambda: DecoderConfig(arch="gpt2"))
    decoder_start_token_id: int = -1  # set from the tokenizer's bos when the model is built


def shift_tokens_right(labels: torch.Tensor, pad_id: int, start_id: int) -> torch.Tensor:
    """transformers' shift for encoder-decoders: [start, labels[:-1]], ignored labels as padding."""
    ids = labels.new_full(labels.shape, pad_id)
    ids[:, 1:] = labels[:, :-1]
    ids[:, 0] = start_id
    return ids.masked_fill(ids == IGNORE, pad_id)


class EncoderDecoderCaptioner(nn.Module):
    def __init__(self, cfg: EncoderDecoderConfig):
        super().__init__()
        if cfg.decoder_start_token_id < 0:
            raise ValueError("decoder_start_token_id must be set (the tokenizer's bos)")
        self.cfg = cfg
        self.vision = VisionTransformer(cfg.vision)
        self.decoder = CausalLM(replace(cfg.decoder, cross_attention=True))
        width = self.decoder.cfg.width
        self.proj = nn.Linear(cfg.vision.width, width) if cfg.vision.width != width else None

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] -> the memory the decoder reads [B, tokens, decoder width]."""
        x = self.vision.forward_features(pixel_values)
        return x if self.proj is None else self.proj(x)

    def forward(self, pixel_values: torch.Tensor | None, decoder_input_ids: torch.Tensor,
                decoder_attention_mask: torch.Tensor | None = None, *, memory: torch.Tensor | None = None,
                return_hidden: bool = False) -> torch.Tensor:
        """Logits [B, T, V] (or the decoder's final hidden states) of `decoder_input_ids` given the
        images, or their `memory` from `encode`."""
        if memory is None:
            memory = self.encode(pixel_values)
        return self.decoder(decoder_input_ids, decoder_attention_mask, memory=memory.to(self.decoder.lm_head.weight.dtype),
                            return_hidden=return_hidden)
