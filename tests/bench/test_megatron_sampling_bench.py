"""bench/megatron_sampling.py stays runnable: a tiny run at tp = 2 on gloo CPU ranks, whose two steppers (Megatron's
KV cache and a whole forward per token) draw the same tokens with the same seed on both ranks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "megatron_sampling.py"


@pytest.mark.timeout(300)
def test_a_tiny_run_prints_both_steppers_and_they_draw_the_same_tokens():
    run = subprocess.run([sys.executable, str(SCRIPT), "--tp", "2", "--hidden", "64", "--layers", "2", "--vocab", "512",
                          "--prompt", "6", "--new-tokens", "5", "--repeats", "1"],
                         capture_output=True, text=True, timeout=280)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert any(line.startswith("no cache ") for line in lines) and any(line.startswith("kv ") for line in lines)
    assert "same tokens drawn by both: True; on every rank: True" in run.stdout, run.stdout
