"""A deterministic, resumable stream of sample keys.

Global position p of the infinite stream maps to epoch p // N and a seeded permutation
of that epoch, so any step's batch can be computed from the step number alone: resuming
needs no saved iterator state, and every process takes its own contiguous slice of each
global batch, which is what makes a two-process step see the same global batch as one.

With `lengths` (group_by_length, as LLaVA's and transformers' length-grouped samplers), each
epoch's permutation is cut into megabatches of `group` global batches, each megabatch sorted by
length, and the resulting batches shuffled: a batch holds samples of about the same length, so
little of it is padding, while which samples meet in an epoch stays random.  An epoch is then
the largest whole number of global batches (a random n % batch items sit that epoch out), so
batches stay aligned with steps across epochs.
"""

from __future__ import annotations

import numpy as np
from torch.utils.data import Sampler


class StepBatchSampler(Sampler):
    def __init__(self, n_items: int, global_batch: int, *, seed: int, start_step: int = 0, rank: int = 0,
                 world_size: int = 1, grad_accum: int = 1, max_steps: int | None = None,
                 lengths=None, group: int = 4):
        per_micro, rest = divmod(global_batch, world_size * grad_accum)
        if rest or per_micro == 0:
            raise ValueError(f"train.batch_size {global_batch} must be a multiple of processes x grad_accum "
                             f"({world_size} x {grad_accum})")
        if n_items == 0:
            raise ValueError("the training set is empty")
        if lengths is not None and len(lengths) != n_items:
            raise ValueError(f"{len(lengths)} lengths for {n_items} items")
        self.n, self.B, self.seed = n_items, global_batch, seed
        self.lengths, self.group = None if lengths is None else np.asarray(lengths), group
        # items per epoch: whole global batches when grouping (see the module docstring)
        self.per_epoch = n_items - n_items % global_batch if lengths is not None and n_items >= global_batch else n_items
        self.start, self.max_steps = start_step, max_steps
        self.rank, self.accum, self.micro = rank, grad_accum, per_micro
        self._epoch, self._perm, self._choice = -1, None, None

    def _epoch_arrays(self, epoch: int):
        if epoch != self._epoch:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch]))
            self._perm = rng.permutation(self.n)
            if self.lengths is not None:
                self._perm = self._grouped(self._perm[:self.per_epoch], rng)
            self._choice = rng.integers(0, 2**31 - 1, self.n)  # which caption of the item
            self._epoch = epoch
        return self._perm, self._choice

    def _grouped(self, perm: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """`perm` with each megabatch sorted by length (longest first) and its batches shuffled."""
        mega = self.B * self.group
        parts = [chunk[np.argsort(-self.lengths[chunk], kind="stable")] for chunk in np.split(perm, range(mega, len(perm), mega))]
        batches = [b for chunk in parts for b in np.split(chunk, range(self.B, len(chunk), self.B))]
        return np.concatenate([batches[i] for i in rng.permutation(len(batches))])

    def keys(self, positions: range) -> list[tuple[int, int]]:
        out = []
        for p in positions:
            perm, choice = self._epoch_arrays(p // self.per_epoch)
            i = p % self.per_epoch
            out.append((int(perm[i]), int(choice[i])))
        return out

    def step_batches(self, step: int) -> list[list[tuple[int, int]]]:
        """This process's micro-batches of one optimizer step."""
        base = step * self.B + self.rank * self.micro * self.accum
        return [self.keys(range(base + m * self.micro, base + (m + 1) * self.micro)) for m in range(self.accum)]

    def __iter__(self):
        step = self.start
        while self.max_steps is None or step < self.max_steps:
            yield from self.step_batches(step)
            step += 1

    def __len__(self) -> int:
        if self.max_steps is None:
            raise TypeError("an endless sampler has no length")
        return (self.max_steps - self.start) * self.accum
