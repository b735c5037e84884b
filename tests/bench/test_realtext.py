"""bench/realtext.py stays runnable: its text extraction, and a --quick run end to end (real pipeline runs).

The quick run needs the prose of Debian's python3.11-doc: fetched once with apt-get into the cache
(~/.cache/kubedistill/realtext) and skipped where there is neither apt-get nor a cached copy.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "realtext.py"


def _module():
    spec = importlib.util.spec_from_file_location("realtext", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["realtext"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_rst_markup_is_stripped_and_code_dropped():
    rt = _module()
    text = """Descriptors
===========

The :func:`~os.path.join` function and the ``sep`` attribute of :mod:`os` follow the
`conventions <https://example.org>`_ of the *platform* you are on, as **always**.

.. note::

   A directive body is not prose.

Example::

    >>> import os
    >>> os.sep

>>> print("doctest")

+------+------+
| a    | b    |
+------+------+
"""
    assert rt.rst_paragraphs(text) == [
        "The os.path.join function and the sep attribute of os follow the conventions of the platform you are "
        "on, as always."
    ]


def test_records_hold_out_whole_documents():
    rt = _module()
    docs = {f"doc{i}.rst.txt": [" ".join(f"w{i}_{j}" for j in range(100))] for i in range(40)}
    sizes = rt.Sizes(**{**rt.QUICK.__dict__, "q_words": 3, "a_words": 7, "eval_records": 1000})
    train, held_out = rt.make_records(docs, sizes)
    docs_of = lambda records: {r["question"].split("_")[0] for r in records}  # noqa: E731
    assert train and held_out and not docs_of(train) & docs_of(held_out)
    assert all(len(r["question"].split()) == 3 and len(r["answer"].split()) == 7 for r in train + held_out)
    assert train[0]["answer"].startswith(" ")  # the continuation of the question's text


def test_loss_at_interpolates_between_evaluations():
    rt = _module()
    run = rt.Run("sft", 0, 0.0, None, 30, curve=[(10, 5.0), (20, 4.0), (30, 3.5)])
    assert run.loss_at(20) == 4.0
    assert run.loss_at(25) == pytest.approx(3.75)
    assert run.loss_at(31) is None
    assert rt._divisor_near(80, 20) == 20 and rt._divisor_near(250, 50) == 50


def _prose_available() -> bool:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kubedistill" / "realtext"
    return shutil.which("apt-get") is not None or any(cache.glob("python3.11-doc*"))


@pytest.mark.slow
@pytest.mark.skipif(not _prose_available(), reason="neither apt-get nor a cached python3.11-doc")
def test_quick_run_prints_the_table(tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for row in ("SFT only", "forward_kl w=0.5", "forward_kl w=1 ", "forward_kl w=1 no tail", "machine:", "teacher "):
        assert row in proc.stdout, row
    results = json.loads((tmp_path / "results.json").read_text())
    assert {(r["w"], r["tail"]) for r in results["runs"]} == {(0.0, True), (0.5, True), (1.0, True), (1.0, False)}
    assert all(r["curve"] and r["step_s"] > 0 for r in results["runs"])
    # The equal-steps reading of SFT (the long run at step S) is exactly what an S-step run gives.
    check = results["prefix_check"]
    assert check["separate_run"] == check["long_run_at_S"]
