"""Tokenizers: any Hugging Face `tokenizer.json`, through the `tokenizers` library.

glimpse trains a small byte-level BPE tokenizer for the shapes world and saves it in the
same format, so a real tokenizer.json and ours are used by the same code.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from glimpse.errors import GlimpseError

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<image>", "<unk>"]
# Names other tokenizer families use for the same roles, tried in order.
ROLE_NAMES = {
    "pad": ["<pad>", "[PAD]", "<|endoftext|>", "<|finetune_right_pad_id|>"],
    "bos": ["<bos>", "<s>", "[CLS]", "<|startoftext|>", "<|begin_of_text|>", "<|im_start|>"],
    "eos": ["<eos>", "</s>", "[SEP]", "<|endoftext|>", "<|end_of_text|>", "<|im_end|>"],
    "image": ["<image>"],
}


def train_tokenizer(texts: Iterable[str], path: str | Path, vocab_size: int = 1024) -> Tokenizer:
    """Train a lowercase byte-level BPE on `texts` and save it as tokenizer.json."""
    tok = HFTokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return Tokenizer(path)


class Tokenizer:
    """A tokenizer.json plus the ids of its special roles and batch encoding to tensors."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise GlimpseError(f"no tokenizer at {path}")
        try:
            self.hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises plain Exceptions with long texts
            raise GlimpseError(f"cannot read tokenizer {path}: {str(e).splitlines()[0]}") from None
        self.path = path
        self.hf.no_padding()
        self.hf.no_truncation()
        vocab = self.hf.get_vocab()
        self.ids = {role: next((vocab[n] for n in names if n in vocab), None) for role, names in ROLE_NAMES.items()}
        if self.ids["pad"] is None:
            self.ids["pad"] = self.ids["eos"] if self.ids["eos"] is not None else 0

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    @property
    def pad_id(self) -> int:
        return self.ids["pad"]

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self.hf.encode(text, add_special_tokens=False).ids
        if add_bos and self.ids["bos"] is not None:
            ids = [self.ids["bos"], *ids]
        if add_eos and self.ids["eos"] is not None:
            ids = [*ids, self.ids["eos"]]
        return ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special)

    def pieces(self, ids: list[int]) -> list[str]:
        """Each token's own text, special tokens included (what an explanation shades word by word)."""
        out = []
        for i in ids:
            text = self.hf.decode([i], skip_special_tokens=False)
            out.append(text.strip() or text.replace("\n", "\\n").replace(" ", "·") or (self.hf.id_to_token(i) or ""))
        return out

    def batch(self, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded [B, T] input_ids and attention_mask for a text tower: bos + text + eos,
        truncated to `max_length` with the eos kept (the EOS-pooling towers read it)."""
        return self.pad([self.tower_ids(t, max_length) for t in texts])

    def tower_ids(self, text: str, max_length: int) -> list[int]:
        """One row of `batch`: bos + text + eos, truncated to `max_length` with the eos kept."""
        ids = self.encode(text, add_bos=True, add_eos=True)
        return ids[: max_length - 1] + ids[-1:] if len(ids) > max_length else ids

    def pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of ids -> right-padded [B, T] input_ids and attention_mask."""
        T = max(len(r) for r in rows)
        input_ids = torch.tensor([r + [self.pad_id] * (T - len(r)) for r in rows], dtype=torch.long)
        mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows], dtype=torch.long)
        return input_ids, mask


class NoTokenizer:
    """Stands in for the tokenizer of a model loaded without one (a Hugging Face folder with no
    tokenizer.json): the model's modules work, and anything that needs text fails with one line."""

    def __init__(self, why: str):
        self.why = why

    def __bool__(self) -> bool:
        return False

    def __getattr__(self, name: str):
        if name.startswith("__"):  # copy and pickle probe dunders: answer as a plain object would
            raise AttributeError(name)
        raise GlimpseError(f"{self.why}: this model reads and writes no text without its tokenizer "
                           "(its modules still work: forward, get_image_features)")
