"""How the training step runs on several processes: DDP replicas or FSDP2 shards, and activation checkpointing.

FSDP2 (`torch.distributed.fsdp.fully_shard`) is applied block by block: every child of every outermost
`nn.ModuleList` (a transformer's layers, a tower's blocks) is one group whose parameters are gathered just
before its forward and freed after it; the rest of the model (embeddings, norms, heads, projectors) is the root
group.  Parameters, gradients and AdamW's moments then live 1/world_size per process.  Frozen parts (a frozen
tower or LM) are sharded the same way; their gradients are never computed.  Module and parameter names are
unchanged, so checkpoints, LoRA and the Hugging Face mapping see the same names as on one process.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from glimpse.errors import GlimpseError


def blocks(model: nn.Module) -> list[nn.Module]:
    """The children of the outermost ModuleLists (a ModuleList inside a block stays inside its block)."""
    found: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, nn.ModuleList):
                found.extend(b for b in child if any(True for _ in b.parameters()))
            else:
                visit(child)

    visit(model)
    return found


def checkpoint_blocks(model: nn.Module) -> int:
    """Recompute each block's activations in backward instead of keeping them (torch.utils.checkpoint,
    non-reentrant).  The block's forward is wrapped in place, so parameter names do not change."""
    n = 0
    for block in blocks(model):
        forward = block.forward

        @functools.wraps(forward)
        def run(*args, _forward=forward, **kwargs):
            if not torch.is_grad_enabled():  # evaluation and generation: nothing to save memory on
                return _forward(*args, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = run
        n += 1
    if n == 0:
        raise GlimpseError("train.activation_checkpointing: this model has no blocks (nn.ModuleList children)")
    return n


def shard(model: nn.Module, precision: str) -> nn.Module:
    """FSDP2 over the process group torchrun set up: each block a group, then the root.  bf16 precision
    gathers parameters in bf16 and reduces gradients in fp32 (the master weights and AdamW stay fp32)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if precision == "bf16" else MixedPrecisionPolicy()
    # FSDP cannot shard a 0-d parameter (a temperature, a gate): those stay whole on every process, their
    # gradients averaged by sync_replicated_grads as DDP would
    scalars = {p for p in model.parameters() if p.ndim == 0}
    for block in blocks(model):
        fully_shard(block, mp_policy=mp, ignored_params=scalars or None)
    fully_shard(model, mp_policy=mp, ignored_params=scalars or None)
    return model


def sync_replicated_grads(model: nn.Module) -> None:
    """Average the gradients of the parameters FSDP left whole (see `shard`) over the processes."""
    import torch.distributed as dist

    for p in model.parameters():
        if p.grad is not None and not hasattr(p, "to_local"):
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gathered(model: nn.Module, writeback: bool = False):
    """Every parameter of an FSDP model gathered whole on every process for the duration, and kept so
    between forwards: one process may then run anything on the model alone (evaluation, feature caches,
    explicit submodule calls) without collectives.  Entered and left on every process.  `writeback`: what
    the block changed in the parameters is sharded back afterwards (a k-means-initialised codebook).
    On a model that is not sharded it does nothing."""
    if not is_sharded(model):
        yield
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import FSDPModule

    # the model, not the first submodule called alone inside, must be FSDP's root: initialise it as such now
    # (torch has no public call for this; forward does it on first use)
    model._get_fsdp_state()._lazy_init()
    groups = [m for m in model.modules() if isinstance(m, FSDPModule)]
    blocks_ = [m for m in groups if m is not model]  # the root keeps its parameters after forward already
    for m in groups:
        m.unshard()
    for m in blocks_:
        m.set_reshard_after_forward(False, recurse=False)
    # writeback sends back only the parameters the block changed: under bf16 the gathered copies are rounded,
    # and the fp32 shards of the others must stay as they are (buffers are not sharded: changes stay anyway)
    before = {k: v.detach().clone() for k, v in model.named_parameters()} if writeback else None
    changed = None
    try:
        yield
        if before is not None:
            changed = {k: v.detach().float().clone() for k, v in model.named_parameters()
                       if not torch.equal(v, before[k])}
    finally:
        for m in groups:
            m.reshard()
        for m in blocks_:
            m.set_reshard_after_forward(True, recurse=False)
    if changed:
        set_model_state_dict(model, changed, options=StateDictOptions(full_state_dict=True, strict=False))


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's tensors on the main process (CPU); called on every process."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # tied weights come back as two tensors: keep the first name, as a one-process checkpoint does
    seen, aliases = set(), set()
    for name, p in model.named_parameters(remove_duplicate=False):
        (aliases.add(name) if id(p) in seen else seen.add(id(p)))
    return {k: v for k, v in full.items() if k not in aliases}


def local_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this process holds of parameters, gradients and optimizer state (a shard's local part under FSDP)."""

    def nbytes(t) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    params = sum(nbytes(p) for p in model.parameters())
    grads = sum(nbytes(p.grad) for p in model.parameters() if p.grad is not None)
    state = sum(nbytes(v) for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v))
    return {"params": params, "grads": grads, "optimizer": state}
