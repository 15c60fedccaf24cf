"""What this machine computes fast: the fp32 matmul rate that timings are stated with, and whether
its CPU has native bf16 (without it, a bf16 matmul is emulated and runs hundreds of times slower:
0.29 against 124 GFLOP/s for a 2048² product, measured on a 2-core AVX2 machine)."""

from __future__ import annotations

import ctypes
import functools
import sys
import time

import torch


@functools.cache
def matmul_gflops(dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 3, device: str = "cpu") -> float:
    """The best rate of an n x n matmul over `repeats` runs, in GFLOP/s (measured once per process)."""
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    return 2 * n**3 / _best_seconds(lambda: a @ b, device, repeats) / 1e9


def _best_seconds(fn, device: str, repeats: int) -> float:
    """The shortest of `repeats` timed calls of `fn`, after one warm-up (thread pool, allocator, kernels)."""
    def sync():
        if device != "cpu":
            torch.cuda.synchronize()

    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


@functools.cache
def memory_read_gbps(device: str = "cpu", mib: int = 512, repeats: int = 5) -> float:
    """The best rate at which this machine reads an fp32 tensor of `mib` MiB, far past any cache, in GB/s
    (measured once per process): the faster of a sum over it and a matrix-vector product with it as the
    matrix.  The roof of batch-1 decoding, which reads every weight of the LM once per token."""
    x = torch.ones(mib * 2**20 // 4, device=device)
    w, v = x.view(-1, 4096), torch.ones(4096, device=device)
    best = min(_best_seconds(x.sum, device, repeats), _best_seconds(lambda: w.mv(v), device, repeats))
    return x.numel() * 4 / best / 1e9


@functools.cache
def cpu_bf16_is_slow() -> bool:
    """True when a bf16 matmul on this CPU is more than 4x slower than fp32 (no native bf16): a 256²
    product in each, timed once (about 30 ms on a CPU without it)."""
    def seconds(dtype: torch.dtype) -> float:
        a = torch.randn(256, 256, dtype=dtype)
        a @ a
        t0 = time.perf_counter()
        for _ in range(3):
            a @ a
        return time.perf_counter() - t0

    return seconds(torch.bfloat16) > 4 * seconds(torch.float32)


_warned: set = set()


def warn_if_slow_dtype(dtype, device, instead: str) -> None:
    """Say once per process, on stderr, when bf16 was asked for on a CPU that emulates it; `instead`
    names the setting that avoids it."""
    if dtype != torch.bfloat16 or torch.device(device).type != "cpu" or "bf16" in _warned:
        return
    if cpu_bf16_is_slow():
        _warned.add("bf16")
        print(f"glimpse: warning: this CPU has no native bf16 (it is emulated, hundreds of times slower than fp32 "
              f"here); use {instead}", file=sys.stderr)


@functools.cache
def keep_freed_cpu_memory() -> bool:
    """Have glibc's malloc keep freed blocks for reuse instead of handing them back to the kernel; True
    where it applied (Linux with glibc), False elsewhere, where nothing changes.  Once per process.

    PyTorch's CPU tensors come straight from malloc, and glibc serves each block over its mmap threshold
    (32 MB at most by default) with a fresh mmap and unmaps it when freed: the tens-of-MB activations and
    gradients of a training step are then new pages every step, and the kernel's page faults and zeroing
    cost as much as the elementwise work on them (a 51 MB GELU backward: 19 ms into a fresh tensor, 7 ms
    into a reused one, on a 2-core Xeon).  A 1 GiB mmap threshold and a 2 GiB trim threshold keep such
    blocks in the heap, as jemalloc or tcmalloc would (bench/RESULTS.md: the benchmark's fp32 step 1.2x).
    Freed memory then stays with the process, up to the step's peak, until it exits."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt if hasattr(libc, "gnu_get_libc_version") else None  # glibc's alone
    except OSError:
        return False
    if mallopt is None:
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # glibc's malloc.h
    settings = ((m_mmap_threshold, 1 << 30), (m_trim_threshold, (1 << 31) - 1), (m_top_pad, 64 << 20))
    return all(mallopt(key, value) == 1 for key, value in settings)

