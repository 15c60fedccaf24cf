"""Helpers for the Hugging Face parity tests: randomised tiny transformers models saved to folders."""

from __future__ import annotations

import torch


def randomize(model, seed: int = 1, scale: float = 0.2):
    """Spread the weights out (HF's init leaves outputs nearly constant) so comparisons bite."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm = "norm" in name or "ln_" in name or "LayerNorm" in name or "layrnorm" in name
            if is_norm and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif "logit_scale" in name:
                p.fill_(2.0)
            else:
                p.copy_(scale * torch.randn_like(p))
    return model.eval()


def save(model, path, dtype=None):
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path)
    return path


def write_tokenizer(path, vocab: list[str], specials: list[str]) -> None:
    """A word-level tokenizer.json over `vocab` (specials first), for folders that need one."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = specials + [w for w in vocab if w not in specials]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=specials[-1]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(specials)
    tok.save(str(path / "tokenizer.json"))
