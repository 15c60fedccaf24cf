"""One decoding step over a static KV cache, replayed as a CUDA graph or run as a compiled program.

At small batch sizes a decode step is dozens of small operations around a few matrix products.  On
a GPU, launching them from Python costs more than running them: a 1B model on an H100 spends most
of each token waiting on the CPU, and a CUDA graph, recorded once and replayed with one launch,
takes that away.  On a CPU the cost is in the products themselves (rows x weights at 1-16 rows,
far from both the matmul rate and the memory bandwidth) and in the small operations between them;
`torch.compile` (inductor, `max-autotune`, weights frozen as constants) fuses the small operations
and picks its own micro-GEMM per product where that is faster (bench/RESULTS.md, "compiled CPU
decoding").  It costs about a minute of compiling per batch shape on 2 cores, so it is opt-in
(`GenerationConfig.compile`).  On a GPU the two combine: the compiled step (inductor's default mode,
which fuses the small operations into fewer kernels and leaves the products to cuBLAS) is recorded
into the CUDA graph, since even replayed, each of a step's hundreds of kernels costs microseconds.

Either way the step needs fixed shapes and addresses, so it works on static buffers: the new tokens
[B, 1], their positions [B, 1], the KV cache slot they write (`KVCache.slot`, a device tensor), and
a bool mask over all `max_len` cache positions [B, 1, 1, S] (the prompt's real tokens, then each
generated one).  Attention therefore reads the whole preallocated cache, masked; the arithmetic per
real position is the same as the eager step's.

Frozen weights are constants of the compiled program, so a model whose weights changed in place
since (an optimizer step, `load_state_dict`), or another model, would run on stale ones; the
compiled step is therefore tied to one model and its weights' versions, and torch's compile caches
are reset when either changes (`_fresh_compile`).  Consequences: compiled decoding serves one model
per process at a time (alternating models recompile each time, and the reset also drops other
compiled functions, such as a `train.compile` step, which then retrace); and writes through `.data`,
which bump no version, go unseen (as by `PackedLinear`'s packed copies): call `invalidate()` after them.

On a CPU the prompts' pass (the prefill) is compiled too (`compiled_prefill`, dynamic shapes, so one
program serves every prompt length): with the products at the matmul rate already, the norms, RoPE
and the MLP's gating around them are what a compiled prefill saves (a fifth of a batch-16 prefill).
Both are tied to the same weights and reset together.  A step's shapes are compiled once and run once
before the first token (a machine that cannot compile fails early); later generations of the same
shapes skip that run (after a `torch._dynamo.reset()` other than `invalidate`'s, their first token
compiles).
"""

from __future__ import annotations

import threading
import weakref

import torch

from glimpse.models.decoder import attention_mask_for

# A compiled step is specialised to its batch's shapes; cache lengths are rounded up to this, so
# that prompts of similar lengths share one compiled program.
COMPILE_LENGTH_BUCKET = 64

_compiled: dict[str, object] = {}  # "step-<mode>" / "prefill": the compiled functions
_compiled_for: tuple | None = None  # (weakref to the model, its weights' (data_ptr, version)s)
_warm_steps: set[tuple] = set()  # the step shapes compiled (and run once) since the last reset
_lock = threading.Lock()


def invalidate() -> None:
    """Forget the compiled programs: the next compiled decoding compiles afresh (after weights were
    changed in a way their versions do not show, such as writes through `.data`)."""
    global _compiled_for
    with _lock:
        if _compiled_for is not None:
            torch._dynamo.reset()
        _compiled.clear()
        _warm_steps.clear()
        _compiled_for = None


def _weights_signature(model) -> tuple:
    return tuple((t.data_ptr(), t._version) for t in (*model.parameters(), *model.buffers()))


def _fresh_compile(model, what: str):
    """The compiled function `what` ("step-<mode>" or "prefill"), after a reset of torch's compile caches
    if they may hold another model's (or older) weights as constants."""
    global _compiled_for
    sig = _weights_signature(model)
    with _lock:
        if _compiled_for is not None and (_compiled_for[0]() is not model or _compiled_for[1] != sig):
            torch._dynamo.reset()
            _compiled.clear()
            _warm_steps.clear()
        if what not in _compiled:
            if what == "prefill":  # any batch and prompt length: one program (batch 1 and prompts of one
                # token are specialised apart), about half a minute of compiling on 2 cores
                _compiled[what] = torch.compile(_prefill_forward, dynamic=True)
            else:
                _compiled[what] = torch.compile(_forward, dynamic=False, mode=what.removeprefix("step-"))
        _compiled_for = (weakref.ref(model), sig)
        return _compiled[what]


def _forward(d: StaticDecoder) -> torch.Tensor:
    mask = d.valid | (d.columns == d.slot)  # the new token also sees itself
    return d.model(d.tokens, mask, position_ids=d.pos + 1, cache=d.cache)[:, -1]


def _prefill_forward(model, x, mask, pos, cache) -> torch.Tensor:
    return model(inputs_embeds=x, attention_mask=mask, position_ids=pos, cache=cache, return_hidden=True)


def compiled_prefill(model, x: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache) -> torch.Tensor:
    """The prompts' final hidden states [B, T, D] (`model(..., return_hidden=True)`), compiled: inductor
    fuses the norms, RoPE and the MLP's gating around the products, which in eager mode cost a fifth
    of a batch-16 prefill on a CPU (bench/RESULTS.md).  `mask` [B, T] as `_prefill`'s; compiled with
    the weights as constants on a CPU, so tied to the model's weights as the step is."""
    # no padding: SDPA's causal path; else the ready mask, and no data-dependent check in the program
    ready = None if bool(mask.all()) else attention_mask_for(mask, x.shape[1], 0, x.device)[0]
    fn = _fresh_compile(model, "prefill")
    with torch._inductor.config.patch(freezing=x.device.type == "cpu"):
        return fn(model, x, ready, pos, cache)


class StaticDecoder:
    def __init__(self, model, cache, mask: torch.Tensor, pos: torch.Tensor, *, compiled: bool = False,
                 graph: bool | None = None):
        """`mask` [B, L] and `pos` [B, 1]: the prefilled cache's padding mask and last positions.
        `compiled`: run the step compiled; `graph` (default: on CUDA) replay it as a CUDA graph, the
        compiled step inside the graph when both."""
        B, L = mask.shape
        S, device = cache.max_len, mask.device
        self.model, self.cache = model, cache
        self.tokens = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.pos = pos.clone()
        self.slot = torch.tensor([L], device=device)
        self.valid = torch.zeros(B, 1, 1, S, dtype=torch.bool, device=device)
        self.valid[:, 0, 0, :L] = mask.bool()
        self.columns = torch.arange(S, device=device)
        self.graph = self.compiled = None
        # a learned-position model cannot go past its context: checked here, once a step (see decoder.py)
        self._last_position = model.cfg.context_length if getattr(model, "pos_embed", None) is not None else None
        self._next_slot = L
        cache.slot = self.slot
        self._cpu = device.type == "cpu"
        graph = not self._cpu if graph is None else graph
        if not (compiled or graph):
            raise ValueError("a static step is compiled, replayed as a CUDA graph, or both")
        try:
            if compiled:
                self.compiled = _fresh_compile(model, "step-" + ("max-autotune" if self._cpu else "default"))
            if graph:
                self._capture()
            else:
                # the first time for these shapes, compile now (one step, into the slot the first real
                # step overwrites), so that a machine that cannot compile fails before any token
                memory = tuple(t.shape for v in cache.memory.values() for t in (v if isinstance(v, tuple) else (v,)))
                shapes = (B, S, cache.k[0].dtype, device, memory)  # a cross-attention memory's too
                if shapes not in _warm_steps:
                    self._run_compiled()
                    _warm_steps.add(shapes)
        except Exception:
            cache.slot = None
            raise

    def _capture(self) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up (compiling, kernel selection, workspace) off the main stream
            for _ in range(2):
                self._run_compiled() if self.compiled else _forward(self)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            if self.compiled:
                self._run_compiled()
            else:
                self.logits = _forward(self)

    def _run_compiled(self) -> None:
        # on a CPU, weights as constants: prepacked, folded (on CUDA cuBLAS takes them as they are)
        with torch._inductor.config.patch(freezing=self._cpu):
            self.logits = self.compiled(self)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row [B]; -> the next logits [B, V] (with a CUDA graph, a buffer the next
        step overwrites)."""
        if self._last_position is not None and self._next_slot >= self._last_position:
            raise ValueError(f"{self._next_slot + 1} positions exceed the context length {self._last_position}")
        self.tokens.copy_(tokens[:, None])
        if self.graph is not None:
            self.graph.replay()
        else:
            self._run_compiled()
        self._next_slot += 1
        self.valid.index_fill_(3, self.slot, True)
        self.slot += 1
        self.pos += 1
        return self.logits

    def close(self) -> None:
        self.cache.slot = None
        self.cache.length = int(self.slot.item())
