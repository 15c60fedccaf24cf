"""Evaluating a language model on a split's captions: mean next-token loss and perplexity, over `n` captions."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from glimpse.data.pairs import TextCollate, load_pairs
from glimpse.losses import lm_loss


@torch.no_grad()
def evaluate_lm(model, tokenizer, data_cfg, root: Path, splits: list[str], context_length: int,
                batch_size: int = 256) -> dict[str, float]:
    model.eval()
    collate = TextCollate(tokenizer, context_length)
    device = next(model.parameters()).device
    out = {}
    for split in splits:
        texts = [c for it in load_pairs(data_cfg, root, split) for c in it.captions]
        total, tokens = 0.0, 0
        for i in range(0, len(texts), batch_size):
            b = collate([{"text": t} for t in texts[i : i + batch_size]])
            logits = model(b["input_ids"].to(device), b["attention_mask"].to(device))
            n = int((b["labels"][:, 1:] != -100).sum())
            total += lm_loss(logits, b["labels"].to(device)).item() * n  # token-weighted over batches
            tokens += n
        loss = total / max(tokens, 1)
        out[f"{split}/lm_loss"] = loss
        out[f"{split}/perplexity"] = math.exp(loss)
        out[f"{split}/n"] = len(texts)
    return out
