"""The LLaVA-style benchmark runs end to end at its tiny size (its figures mean nothing there): the script
that bench/RESULTS.md's decoding tables come from does not rot between the runs that fill them."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "vlm_vs_transformers.py"


def test_vlm_benchmark_runs_at_tiny_size():
    out = subprocess.run([sys.executable, str(BENCH), "--size", "tiny", "--steps", "2", "--skip", "train",
                          "--roofline"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    for row in ("greedy tokens/s, batch 1", "greedy tokens/s, batch 16", "F.linear weights, batch 16"):
        assert re.search(re.escape(row) + r"\s+[\d.]+\s+[\d.]+\s+[\d.]+x", out.stdout), out.stdout
    assert re.search(r"transformers\s+[\d.]+ ms a step", out.stdout), out.stdout
