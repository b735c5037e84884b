"""bench/realtext.py's --on-policy rows: the options, the rows' configs and the table, without running them (fast),
and a --quick run end to end (slow, real pipeline runs; needs the prose of python3.11-doc like test_realtext.py's)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.bench.test_realtext import REPO, SCRIPT, _module, _prose_available


def _args(rt, monkeypatch, argv):
    """The namespace main() hands to Bench for ``argv``, Bench not run."""
    for name in ("KUBEDISTILL_NUM_THREADS", "RAY_AUTH_MODE", "PYTHONPATH"):  # main() sets them: restored afterwards
        monkeypatch.setenv(name, os.environ.get(name, ""))
    seen = []
    monkeypatch.setattr(rt.Bench, "main", lambda self: seen.append(self.args) or 0)
    assert rt.main(argv) == 0
    return seen[0]


def test_on_policy_options(monkeypatch):
    rt = _module()
    args = _args(rt, monkeypatch, ["--quick"])
    assert not args.on_policy and rt.on_policy_specs(args) == []  # no on-policy rows unless asked
    args = _args(rt, monkeypatch, ["--quick", "--on-policy"])
    assert rt.on_policy_specs(args) == [(0.5, "reverse_kl"), (1.0, "reverse_kl")]
    args = _args(rt, monkeypatch, ["--on-policy", "--on-policy-fractions", "1", "--on-policy-objectives", "forward_kl",
                                   "sampled_reverse_kl"])
    assert rt.on_policy_specs(args) == [(1.0, "forward_kl"), (1.0, "sampled_reverse_kl")]
    for argv in (["--on-policy-fractions", "1"], ["--on-policy", "--on-policy-fractions", "0"]):
        with pytest.raises(SystemExit):
            _args(rt, monkeypatch, argv)


def test_generation_budget_is_the_longest_answer_window_capped_so_every_prompt_fits():
    rt = _module()
    # answer windows min(answer + EOS, 64 - prompt): 11, 21 and 60 (the third answer truncated); cap 64 - 30
    budget = rt.generation_budget([10, 20, 4], [10, 20, 100], 64, [10, 20, 4, 30])
    assert budget["window_max"] == 60 and budget["cap"] == 64 - 30 and budget["max_new_tokens"] == 34
    assert rt.generation_budget([10], [5], 64, [10, 12])["max_new_tokens"] == 6  # short answers: their window


def test_row_configs(monkeypatch, tmp_path):
    rt = _module()
    init = tmp_path / "init"
    common = dict(steps=4, w=1.0, seed=0, lr=1e-3, schedule="constant_with_warmup", warmup=1, eval_steps=0,
                  teacher=tmp_path / "teacher", objective="reverse_kl")

    args = _args(rt, monkeypatch, ["--quick", "--out", str(tmp_path)])
    bench = rt.Bench(args, rt.QUICK)
    assert bench.rkl_eval() == {}
    plain = bench.config("kd", init, **common, **bench.rkl_eval())
    assert plain.on_policy_fraction == 0 and plain.eval_onpolicy_rkl is None  # as before --on-policy existed
    assert plain.generation == type(plain.generation)()

    args = _args(rt, monkeypatch, ["--quick", "--on-policy", "--out", str(tmp_path)])
    bench = rt.Bench(args, rt.QUICK)
    bench.budget = {"max_new_tokens": 20}
    off = bench.config("kd", init, **common, **bench.rkl_eval())  # an off-policy KD row: evaluated on-policy too
    assert off.on_policy_fraction == 0 and off.eval_onpolicy_rkl is True and off.generation.max_new_tokens == 20
    on = bench.config("op", init, **common, on_policy=0.5, **bench.rkl_eval())
    assert (on.on_policy_fraction, on.on_policy_loss, on.kd_objective, on.distill_loss_weight) == \
        (0.5, "kd", "reverse_kl", 1.0)
    g = on.generation
    assert (g.max_new_tokens, g.temperature, g.top_p, g.top_k, on.samples_per_prompt) == (20, 1.0, 1.0, 0, 1)
    assert on.eval_onpolicy_rkl is True and on.topk_tail and on.teacher_cache_dir is None
    roll = bench.config("roll", init, **{**common, "objective": "sampled_reverse_kl"}, on_policy=1.0,
                        **bench.rkl_eval())
    assert (roll.on_policy_loss, roll.kd_objective) == ("sampled_reverse_kl", "reverse_kl")


def test_table_keeps_on_policy_rows_apart(monkeypatch, tmp_path):
    rt = _module()
    args = _args(rt, monkeypatch, ["--quick", "--on-policy", "--objectives", "reverse_kl", "--weights", "1",
                                   "--renorm", "--out", str(tmp_path)])
    bench = rt.Bench(args, rt.QUICK)
    bench.loads, bench.n_train, bench.n_transfer, bench.caches = [1.0], 100, 50, {}
    bench.budget = {"max_new_tokens": 20}
    curve = [(2, 5.0), (4, 4.0), (8, 3.0), (16, 2.0)]
    runs = [
        rt.Run("sft_s0", 0, 0.0, None, 16, step_s=0.01, curve=curve),
        rt.Run("reverse_kl_w1_s0", 0, 1.0, "reverse_kl", 4, step_s=0.02, curve=[(4, 3.9)], rkl=0.5),
        rt.Run("reverse_kl_w1_op0.5_s0", 0, 1.0, "reverse_kl", 4, on_policy=0.5, step_s=0.03, curve=[(4, 3.8)],
               rkl=0.25, sample_s=0.01),
        rt.Run("reverse_kl_w1_op1_s0", 0, 1.0, "reverse_kl", 4, on_policy=1.0, step_s=0.04, curve=[(4, 3.7)],
               rkl=0.125, sample_s=0.02),
    ]
    teacher = rt.Run("teacher", 1000, 0.0, None, 4, curve=[(4, 3.0)])
    table = bench.report(runs, teacher, 1000, 100, 60.0, (1.0, 1.0, 1.0), 16, 2)
    lines = {line.split("  ")[0]: line for line in table.splitlines()}
    assert "onpolicy rkl" in table and "sample ms" in table
    assert "0.5000 [0.5000-0.5000]" in lines["reverse_kl w=1"] and "3.900" in lines["reverse_kl w=1"]
    row = lines["reverse_kl w=1 on-policy λ=0.5"]
    assert "3.800" in row and "0.2500 [0.2500-0.2500]" in row and row.split()[-1] == "10"  # sample ms
    row = lines["reverse_kl w=1 on-policy λ=1"]
    assert "3.700" in row and "0.1250" in row and row.split()[5] == "4.00"  # xSFT: 40 ms / 10 ms

    args.on_policy = False  # without --on-policy: no such columns
    assert "onpolicy rkl" not in bench.report(runs[:2], teacher, 1000, 100, 60.0, (1.0, 1.0, 1.0), 16, 2)


@pytest.mark.slow
@pytest.mark.skipif(not _prose_available(), reason="neither apt-get nor a cached python3.11-doc")
def test_quick_run_on_policy(tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--on-policy", "--objectives", "reverse_kl", "--weights", "1",
         "--renorm", "--no-check-prefix", "--on-policy-fractions", "1", "--on-policy-objectives", "reverse_kl",
         "sampled_reverse_kl", "--out", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for row in ("reverse_kl w=1 ", "reverse_kl w=1 on-policy λ=1", "sampled rkl (ROLL) w=1 on-policy λ=1",
                "onpolicy rkl", "generation.max_new_tokens"):
        assert row in proc.stdout, row
    results = json.loads((tmp_path / "results.json").read_text())
    runs = {(r["objective"], r["on_policy"]): r for r in results["runs"]}
    assert set(runs) == {(None, 0.0), ("reverse_kl", 0.0), ("reverse_kl", 1.0), ("sampled_reverse_kl", 1.0)}
    assert all(r["rkl"] is not None and r["rkl"] >= 0 for r in results["runs"] if r["w"] > 0)
    assert all(r["sample_s"] > 0 for r in results["runs"] if r["on_policy"])
    assert 0 < results["generation_budget"]["max_new_tokens"] <= results["generation_budget"]["cap"]
