"""bench/packing.py stays runnable: its records, and a --quick run end to end (slow: fetches python3.11-doc)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "packing.py"


def _module():
    spec = importlib.util.spec_from_file_location("packing_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["packing_bench"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_records_are_whole_paragraphs_question_first():
    bench = _module()
    docs = {"b.rst.txt": ["one two three four five six"], "a.rst.txt": ["w1 w2 w3", "x1 x2 x3 x4 x5"]}
    assert bench.paragraph_records(docs, 3) == [
        {"question": "x1 x2 x3", "answer": " x4 x5"},
        {"question": "one two three", "answer": " four five six"},
    ]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("apt-get") is None and not any(
    (Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kubedistill" / "realtext").glob(
        "python3.11-doc*")), reason="neither apt-get nor a cached python3.11-doc")
def test_quick_run_prints_the_table():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick"], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| padded | " in proc.stdout and "| packed | " in proc.stdout
    assert "packed / padded label tokens per second:" in proc.stdout
