"""Linear layers with oneDNN-packed weights, for decoding on a CPU.

A decode step multiplies a few rows (one per sequence) by every weight matrix of the LM.  On a CPU,
`F.linear` on PyTorch's [out, in] weight runs such products well below the memory bandwidth they are
bound by: a [16, 768] x [768, 32000] LM head at 34 GFLOP/s, where the same weight reordered once into
oneDNN's blocked layout runs it about 2x faster (bench/RESULTS.md, "CPU decoding").  `pack_linears`
gives each `nn.Linear` of a model such a copy, used only where it helps: autograd off, fp32 input on
the CPU, at most `MAX_ROWS` rows (beyond, the packed weight gains little).

The parameters are untouched: state dicts, training, explanations and every other path see the same
module.  A copy is made at first use and re-made when its weight has changed since (an optimizer
step or `load_state_dict` bumps the tensor's version), so it is never stale.  The copies cost the
LM's linear weights' memory once more.  The packed product is oneDNN's, so it may differ from
`F.linear` in the last bits (tests compare greedy tokens and logits within float tolerance).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

MAX_ROWS = 128  # above this (a long prefill), F.linear is about as fast
_HINT = 16  # the row count oneDNN chooses its blocking for; 1-16 is what decoding runs


def available() -> bool:
    """Whether this torch build has the oneDNN ops (every x86 and arm64 CPU wheel does)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class PackedLinear(nn.Linear):
    """An nn.Linear (same parameters, same state dict) that multiplies small fp32 CPU batches with a
    oneDNN-packed copy of its weight when no gradient is wanted (one row: only where that was timed
    faster, see the module docstring).  Made by `pack_linears`."""

    _packed: torch.Tensor | None = None
    _packed_of: tuple[int, int] = (-1, -1)  # (data_ptr, version) of the weight it was made from
    _one_row_packed: bool | None = None  # whether one row runs faster packed (timed at first use)

    def __getstate__(self) -> dict:
        """Copies and pickles leave the packed weight behind (oneDNN's opaque tensor has no storage to copy):
        a copy packs its own at first use."""
        state = super().__getstate__()
        state.pop("_packed", None)
        state.pop("_packed_of", None)
        state.pop("_one_row_packed", None)  # timed on this machine: a copy elsewhere times its own
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (torch.is_grad_enabled() or x.dtype != torch.float32 or w.dtype != torch.float32
                or x.device.type != "cpu" or w.device.type != "cpu" or x.numel() > MAX_ROWS * self.in_features
                or torch.compiler.is_compiling()):
            return F.linear(x, w, self.bias)
        key = (w.data_ptr(), w._version)
        if self._packed is None or self._packed_of != key:
            self._packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), _HINT)
            self._packed_of = key
        bias = None if self.bias is None else self.bias.detach()
        rows = x.reshape(-1, self.in_features).contiguous()  # a no-op unless x is a strided view
        if rows.shape[0] == 1:
            if self._one_row_packed is None:
                self._one_row_packed = _packed_is_faster(rows, w.detach(), self._packed, bias)
            if not self._one_row_packed:
                return F.linear(x, w, self.bias)
        y = torch.ops.mkldnn._linear_pointwise(rows, self._packed, bias, "none", [], "")
        return y.view(*x.shape[:-1], self.out_features)


def _packed_is_faster(rows: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor, bias, reps: int = 5) -> bool:
    """Whether the packed product of `rows` beats F.linear on this machine: each run `reps` times, in
    turns, the best of each compared."""
    best = {True: float("inf"), False: float("inf")}
    for _ in range(reps):
        for use_packed in (True, False):
            t = time.perf_counter()
            if use_packed:
                torch.ops.mkldnn._linear_pointwise(rows, packed, bias, "none", [], "")
            else:
                F.linear(rows, weight, bias)
            best[use_packed] = min(best[use_packed], time.perf_counter() - t)
    return best[True] < best[False]


def pack_linears(model: nn.Module) -> int:
    """Turn each plain nn.Linear of `model` into a PackedLinear in place (its class only: parameters,
    hooks and state dict stay); -> how many.  Once per model; a no-op where oneDNN is missing or the
    model is distributed (FSDP and DDP own their parameters' storage)."""
    if getattr(model, "_glimpse_packed", False):
        return 0
    model._glimpse_packed = True
    if not available() or (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 0
    n = 0
    for m in model.modules():
        if type(m) is nn.Linear:  # exactly: LoRA and FSDP subclasses keep their own forward
            m.__class__ = PackedLinear
            n += 1
    return n
