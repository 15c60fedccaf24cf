"""Weight mapping between glimpse state dicts and Hugging Face ones, one template rule at a time.

A `Rule` ties glimpse tensors to Hugging Face tensors: the glimpse side concatenated along
dim 0 equals the Hugging Face side concatenated along dim 0, after `to_ours` / `to_hf`
(transpose, reshape).  Most rules are one tensor to one tensor; q, k, v -> our fused qkv is
three to one, SigLIP's fused in_proj -> our q and kv is one to two.  Templates carry `{i}`
(the layer) and are expanded per tower (`expand`).

Loading is strict (`from_hf`): a Hugging Face tensor no rule takes (and not declared unused),
a tensor a rule needs but the checkpoint lacks, or a tensor of the wrong shape is a
GlimpseError naming it.  `to_hf` is the same rules run backwards (export).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from glimpse.errors import GlimpseError


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


@dataclass(frozen=True)
class Rule:
    ours: tuple[str, ...]
    hf: tuple[str, ...]
    to_ours: Callable[[torch.Tensor], torch.Tensor] = _same
    to_hf: Callable[[torch.Tensor], torch.Tensor] = _same


def rule(ours: str | tuple[str, ...], hf: str | tuple[str, ...], to_ours=_same, to_hf=_same) -> Rule:
    return Rule(ours if isinstance(ours, tuple) else (ours,), hf if isinstance(hf, tuple) else (hf,), to_ours, to_hf)


# common shape adapters: (HF -> ours, ours -> HF)
TRANSPOSE = (lambda t: t.t(), lambda t: t.t())  # GPT-2's Conv1D stores [in, out]
UNSQUEEZE = (lambda t: t[None], lambda t: t[0])  # an nn.Embedding table [T, D] <-> our parameter [1, T, D]
TOKEN = (lambda t: t.reshape(1, 1, -1), lambda t: t.reshape(-1))  # CLIP's class_embedding [D] <-> [1, 1, D]
SCALAR = (lambda t: t.reshape(()), lambda t: t.reshape(1))  # SigLIP's logit_scale/bias [1] <-> []


def expand(rules: list[Rule], layers: int, ours_prefix: str = "", hf_prefix: str = "") -> list[Rule]:
    """Concrete rules: `{i}` templates once per layer, both sides prefixed."""
    out = []
    for r in rules:
        n = layers if any("{i}" in k for k in r.ours + r.hf) else 1
        for i in range(n):
            out.append(Rule(tuple(ours_prefix + k.format(i=i) for k in r.ours),
                            tuple(hf_prefix + k.format(i=i) for k in r.hf), r.to_ours, r.to_hf))
    return out


def params(rules: list[Rule], bias: bool = True) -> list[Rule]:
    """`{p}` templates as a weight rule and (with bias) a bias rule."""
    out = []
    for r in rules:
        if any("{p}" in k for k in r.ours + r.hf):
            for p in ("weight", "bias") if bias else ("weight",):
                out.append(Rule(tuple(k.replace("{p}", p) for k in r.ours), tuple(k.replace("{p}", p) for k in r.hf),
                                r.to_ours, r.to_hf))
        else:
            out.append(r)
    return out


def _split(t: torch.Tensor, sizes: list[int] | None, n: int) -> list[torch.Tensor]:
    if n == 1:
        return [t]
    if sizes is None:
        if t.shape[0] % n:
            raise GlimpseError(f"cannot split a tensor of {t.shape[0]} rows into {n} equal parts")
        sizes = [t.shape[0] // n] * n
    return list(torch.split(t, sizes, dim=0))


def from_hf(hf: dict[str, torch.Tensor], rules: list[Rule], expected: dict[str, torch.Tensor], where: str,
            unused: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """A glimpse state dict from a Hugging Face one, cast to the expected tensors' dtypes.
    `unused`: regular expressions of Hugging Face tensors the glimpse part does not use (BERT's
    pooler under a mean-pooled tower, old buffers); everything else must be taken by a rule."""
    out, taken = {}, set()
    for r in rules:
        for k in r.hf:
            if k not in hf:
                raise GlimpseError(f"{where} is missing tensor {k}")
        src = [hf[k] for k in r.hf]
        try:
            t = r.to_ours(src[0] if len(src) == 1 else torch.cat(src, 0))
        except RuntimeError as e:
            raise GlimpseError(f"{where}: tensor {r.hf[0]} of shape {tuple(src[0].shape)} does not fit "
                               f"({str(e).splitlines()[0]})") from None
        for k in r.ours:
            if k not in expected:
                raise GlimpseError(f"{where}: no glimpse tensor {k} for {r.hf[0]}")
        sizes = [expected[k].shape[0] if expected[k].ndim else 1 for k in r.ours]
        if sum(sizes) != (t.shape[0] if t.ndim else 1):
            raise GlimpseError(f"{where}: tensor {r.hf[0]} has shape {tuple(src[0].shape)}, which does not "
                               f"fit glimpse's {', '.join(r.ours)} {[tuple(expected[k].shape) for k in r.ours]}")
        for k, part in zip(r.ours, _split(t, sizes, len(r.ours))):
            if part.shape != expected[k].shape:
                raise GlimpseError(f"{where}: tensor {r.hf[0]} has shape {tuple(src[0].shape)}, the model expects "
                                   f"{tuple(expected[k].shape)} (glimpse {k})")
            out[k] = part.to(expected[k].dtype).contiguous()
        taken.update(r.hf)
    pattern = re.compile("|".join(f"(?:{u})" for u in unused)) if unused else None
    extra = sorted(k for k in hf if k not in taken and not (pattern and pattern.fullmatch(k)))
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise GlimpseError(f"{where} has unexpected tensor {extra[0]}{more}")
    return out


def to_hf(ours: dict[str, torch.Tensor], rules: list[Rule]) -> dict[str, torch.Tensor]:
    """The Hugging Face state dict of a glimpse one (rules backwards)."""
    out = {}
    for r in rules:
        src = [ours[k] for k in r.ours]
        t = r.to_hf(src[0] if len(src) == 1 else torch.cat(src, 0))
        for k, part in zip(r.hf, _split(t, None, len(r.hf))):
            out[k] = part.detach().cpu().contiguous()
    return out
