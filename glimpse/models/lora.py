"""Low-rank adapters (LoRA, Hu et al. 2021) on a model's linear layers, as PEFT computes them.

    y = W x + b + (alpha / r) * B(A(dropout(x)))          A: [r, in], B: [out, r]

A starts Kaiming-uniform (a = sqrt(5), nn.Linear's own init, as PEFT's default) and B at zero, so a
model with fresh adapters computes exactly what its base does.  W and b stay frozen.

`apply_lora` replaces the matching `nn.Linear` modules in place by `LoraLinear`s: ordinary modules
with parameters, inside the same blocks, so DDP, FSDP's block-by-block sharding, `torch.compile` and
the checkpoints see them as any other layer.  A `LoraLinear` keeps its base's `weight` and `bias`
under the same names, so a model's state dict is its base's plus `<layer>.lora_A.weight` and
`<layer>.lora_B.weight` per adapted layer (PEFT's suffixes), and every weight map written for the
base model still applies.  `merge_lora` folds W += (alpha / r) B A and gives plain `nn.Linear`s
back; `unload_lora` drops the adapters and keeps W as it is.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from glimpse.errors import GlimpseError


class LoraLinear(nn.Linear):
    """A linear layer W x + b plus (alpha / r) B A dropout(x); W and b are the base layer's own parameters."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)
        if r <= 0:
            raise ValueError(f"LoRA rank must be positive, not {r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.r, self.alpha = r, float(alpha)
        self.scaling = self.alpha / r
        w = base.weight
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=w.device, dtype=w.dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's init_lora_weights=True
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = nn.functional.linear(x, self.weight, self.bias)
        dtype = result.dtype
        x = x.to(self.lora_A.weight.dtype)
        return (result + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling).to(dtype)

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) B A, [out, in], in float32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def base_linear(self, merge: bool) -> nn.Linear:
        """A plain nn.Linear: the base weight, with the adapters folded in when `merge`.  A merged weight is a
        new tensor, so a weight this layer shares with another (a tied one) is never changed."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        if merge:
            w = self.weight
            lin.weight = nn.Parameter((w.detach().float() + self.delta_weight().to(w.device)).to(w.dtype),
                                      requires_grad=w.requires_grad)
        else:
            lin.weight = self.weight
        lin.bias = self.bias
        return lin

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha:g}"


@dataclass
class LoraLayer:
    """One adapted layer's adapters, detached: what a PEFT export needs."""

    name: str  # the layer's module name under the model
    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _in_parts(name: str, parts: Iterable[str]) -> str | None:
    return next((p for p in parts if name == p or name.startswith(p + ".")), None)


def _examples(names: list[str], limit: int = 16) -> str:
    """Some of the linear layers' names: their distinct endings (the last two parts), then the first full name
    of each part."""
    ends = list(dict.fromkeys(".".join(n.split(".")[-2:]) for n in names))
    firsts = list({n.split(".", 1)[0]: n for n in reversed(names)}.values())[::-1]
    shown = ", ".join(ends[:limit]) + (", ..." if len(ends) > limit else "")
    return f"{shown} (full names such as {', '.join(firsts)})" if names else "none"


def apply_lora(model: nn.Module, cfg, skip: Iterable[str] = ()) -> list[str]:
    """Wrap every `nn.Linear` whose name is one of `cfg.targets` or ends in "." + one of them by a
    `LoraLinear` of rank `cfg.r`, `cfg.alpha`, `cfg.dropout` (a recipe's `train.lora`), in place; layers
    under the parts in `skip` (a recipe's frozen parts) are left alone.  Returns the adapted layers'
    names.  A target that names no linear layer is a GlimpseError listing some that exist."""
    if cfg.r <= 0:
        return []
    skip = tuple(skip)
    linears = [(n, m) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and not isinstance(m, LoraLinear) and not n.endswith((".lora_A", ".lora_B"))]
    if any(isinstance(m, LoraLinear) for m in model.modules()):
        raise GlimpseError("train.lora: the model already has LoRA adapters")
    names = [n for n, _ in linears]
    chosen: dict[str, nn.Linear] = {}
    for target in cfg.targets:
        hits = [(n, m) for n, m in linears if _matches(n, target)]
        if not hits:
            raise GlimpseError(f"train.lora.targets: {target!r} names no linear layer of the model; its linear "
                               f"layers: {_examples(names)}")
        kept = [(n, m) for n, m in hits if _in_parts(n, skip) is None]
        if not kept:
            part = _in_parts(hits[0][0], skip)
            raise GlimpseError(f"train.lora.targets: {target!r} names only layers of the frozen part {part!r} "
                               f"(freeze: {list(skip)}), which stays as it is")
        chosen.update(kept)
    shared = _shared_weights(model)
    for name, lin in chosen.items():
        if shared.get(lin.weight.data_ptr(), 0) > 1:
            raise GlimpseError(f"train.lora.targets: {name} shares its weight with another layer (tied "
                               "embeddings); LoRA on a tied layer is not supported")
    for name, lin in chosen.items():
        _set(model, name, LoraLinear(lin, cfg.r, cfg.alpha, cfg.dropout))
    return list(chosen)


def _shared_weights(model: nn.Module) -> dict[int, int]:
    count: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        count[p.data_ptr()] = count.get(p.data_ptr(), 0) + 1
    return count


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def lora_modules(model: nn.Module) -> list[tuple[str, LoraLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear)]


def mark_only_lora_trainable(model: nn.Module) -> None:
    """PEFT's default: the adapters train, every other parameter (the base model's) is frozen."""
    model.requires_grad_(False)
    for _, m in lora_modules(model):
        m.lora_A.weight.requires_grad_(True)
        m.lora_B.weight.requires_grad_(True)


def _whole(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).float().cpu()  # an FSDP shard: gathered


def lora_layers(model: nn.Module) -> list[LoraLayer]:
    """Every adapted layer's A and B (detached, whole, on the CPU, float32).  Under FSDP the adapters are
    sharded: call it on every process (each gathers every adapter, in the same order)."""
    return [LoraLayer(n, _whole(m.lora_A.weight), _whole(m.lora_B.weight)) for n, m in lora_modules(model)]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors under their names in the model's state dict (`<layer>.lora_A.weight`, ...)."""
    return {k: v for k, v in model.state_dict().items() if ".lora_A." in k or ".lora_B." in k}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W + (alpha / r) B A) and put plain nn.Linears back; in place."""
    for name, m in lora_modules(model):
        _set(model, name, m.base_linear(merge=True))
    return model


def unload_lora(model: nn.Module) -> nn.Module:
    """Drop every adapter, keeping the base weights as they are; in place."""
    for name, m in lora_modules(model):
        _set(model, name, m.base_linear(merge=False))
    return model
