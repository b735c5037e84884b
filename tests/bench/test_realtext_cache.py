"""bench/realtext.py's "KD from cache" rows (issue 19): a --quick run that writes a teacher cache and trains a
student from it, end to end (real pipeline runs, one embedded Ray). Needs the prose of python3.11-doc, like
test_realtext.py's quick run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench.test_realtext import REPO, SCRIPT, _prose_available


@pytest.mark.slow
@pytest.mark.skipif(not _prose_available(), reason="neither apt-get nor a cached python3.11-doc")
def test_quick_run_from_cache(tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--from-cache", "--no-live", "--no-check-prefix",
         "--cache-weights", "0.5", "--out", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for row in ("SFT only", "forward_kl w=0.5 top-16 cache", "teacher cache top-16 (compact)", "teacher strength:"):
        assert row in proc.stdout, row
    results = json.loads((tmp_path / "results.json").read_text())
    assert {(r["w"], r["cache_k"]) for r in results["runs"]} == {(0.0, None), (0.5, 16)}  # no live-teacher rows
    cache = results["caches"]["16"]
    manifest = json.loads((Path(cache["dir"]) / "manifest.json").read_text())
    assert cache["rows"] == sum(f["rows"] for f in manifest["shard_files"]) > 0
    assert cache["bytes_per_token"] > 0 and cache["seconds"] > 0
    assert all(r["curve"] and r["step_s"] > 0 for r in results["runs"])
