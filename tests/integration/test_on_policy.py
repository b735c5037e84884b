"""On-policy distillation and seq_kd end to end on a real local Ray with tiny models: λ = 0 changes nothing; λ = 1
trains on the student's own samples only (the micro-batches the loss reads are exactly its samples, drawn with its
current weights); seq_kd trains on the teacher's samples; a run with sampling resumes bit for bit, from a checkpoint and
after kill -9 mid-run; a prompt with no room for a completion is refused before anything is written; eval/onpolicy_rkl
and time/sample are reported."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml
import torch
from safetensors.torch import load_file

from distill_trainer.config import ConfigError, config_from_dict
from distill_trainer.data import IGNORE_INDEX
from distill_trainer.strategies.torch import load_causal_lm
from distill_trainer.pipeline import DistillPipeline, prepare, training_batches
from distill_trainer.sampling import SAMPLER_STUDENT, SAMPLER_TEACHER, SamplingParams, sample_with_kv_cache, sampling_seed
from distill_trainer.workers import create_workers
from tests.conftest import logged_metrics, tiny_config_dict

GENERATION = {"max_new_tokens": 6}


def config_of(setup, out, **overrides):
    return config_from_dict(tiny_config_dict(setup, out, **overrides))


def run(setup, out, **overrides):
    config = config_of(setup, out, **overrides)
    return DistillPipeline(config, num_threads=1, console=False).run()


def weights(checkpoint_dir):
    return load_file(str(checkpoint_dir / "student" / "model.safetensors"))


def test_lambda_zero_is_the_off_policy_run_bit_for_bit(tiny_setup, tmp_path, local_ray):
    run(tiny_setup, tmp_path / "off", max_steps=2, save_steps=0, eval_steps=0)
    # Every other on-policy knob set, λ = 0: nothing is sampled and nothing else changes.
    run(tiny_setup, tmp_path / "zero", max_steps=2, save_steps=0, eval_steps=0, on_policy_fraction=0.0,
        on_policy_loss="sampled_reverse_kl", opd_kl_coef=3.0, generation={"max_new_tokens": 4, "temperature": 0.7})
    off, zero = weights(tmp_path / "off/output/checkpoint-2"), weights(tmp_path / "zero/output/checkpoint-2")
    assert off.keys() == zero.keys() and all(torch.equal(off[k], zero[k]) for k in off)
    losses = [[m["train/loss"] for m in logged_metrics(tmp_path / name) if "train/loss" in m] for name in ("off", "zero")]
    assert losses[0] == losses[1]
    assert not any("time/sample" in m for m in logged_metrics(tmp_path / "zero"))


def _first_step(setup, out, **overrides):
    """The driver's first step with real workers: the micro-batches each rank trains on (as handed to its
    train_step), the records they were drawn from, and the students' step results."""
    import ray

    config = config_of(setup, out, **overrides)
    prepared = prepare(config)
    pipeline = DistillPipeline(config, num_threads=1, console=False)
    workers = create_workers(config, prepared.vocab, prepared.eval, None, 1)
    try:
        records = training_batches(config, prepared.train)
        expected_records = [records.next_indices() for _ in range(config.train_args.gradient_accumulation_steps)]
        batches = training_batches(config, prepared.train)
        work = pipeline._hand_out(workers, batches, prepared.vocab.pad_token_id, step=1)
        micro_batches = ray.get(work.slices[0])
        results = ray.get(pipeline._student_steps(workers, work))
    finally:
        workers.shutdown()
    return config, prepared, micro_batches, expected_records, work, results


def _check_samples(config, prepared, micro_batches, expected_records, sampler, model_dir, side):
    """Each micro-batch holds its records' prompts, samples_per_prompt times each, and after them exactly the
    completion ``model_dir``'s model samples with the step's seed; the labels are those completion tokens only."""
    model = load_causal_lm(str(model_dir), getattr(config, side).model_args, torch.device("cpu"))
    params = SamplingParams.of(config.generation)
    for index, (batch, records) in enumerate(zip(micro_batches, expected_records)):
        assert int(batch["sampler"]) == sampler
        prompts = [prepared.train[r].input_ids[: prepared.train[r].prompt_length]
                   for r in records for _ in range(config.samples_per_prompt)]
        completions = sample_with_kv_cache(model, prompts, params, prepared.vocab.eos_token_id,
                                           prepared.vocab.pad_token_id, sampling_seed(config.seed, 1, index, side),
                                           prepared.vocab.size, torch.device("cpu"))
        assert batch["input_ids"].shape[0] == len(prompts)
        for row, (prompt, completion) in enumerate(zip(prompts, completions)):
            n, p = len(completion.tokens), len(prompt)
            assert batch["input_ids"][row, : p + n].tolist() == prompt + completion.tokens
            labelled = (batch["labels"][row] != IGNORE_INDEX).nonzero().flatten().tolist()
            assert labelled == list(range(p - 1, p - 1 + n))  # the positions that predict the sampled tokens
            assert batch["labels"][row, labelled].tolist() == completion.tokens
            assert torch.allclose(batch["behaviour_logprobs"][row, labelled], torch.tensor(completion.logprobs))


def test_lambda_one_trains_on_the_students_own_samples_only(tiny_setup, tmp_path, local_ray):
    config, prepared, micro_batches, records, work, results = _first_step(
        tiny_setup, tmp_path, on_policy_fraction=1.0, samples_per_prompt=2, generation=GENERATION)
    _check_samples(config, prepared, micro_batches, records, SAMPLER_STUDENT, tiny_setup.student, "student")
    sampled_tokens = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro_batches)
    # The normaliser and the positions the loss read are the sampled tokens and nothing else.
    assert work.label_tokens == sampled_tokens
    assert sum(r.stats.label_tokens for r in results) == sampled_tokens
    assert all(r.update.applied for r in results)


def test_seq_kd_trains_on_the_teachers_samples(tiny_setup, tmp_path, local_ray):
    config, prepared, micro_batches, records, work, results = _first_step(
        tiny_setup, tmp_path, seq_kd=True, generation={**GENERATION, "temperature": 0.8, "top_k": 20})
    _check_samples(config, prepared, micro_batches, records, SAMPLER_TEACHER, tiny_setup.teacher, "teacher")
    assert sum(r.stats.label_tokens for r in results) == work.label_tokens


SAMPLING_RUN = dict(on_policy_fraction=0.5, on_policy_loss="sampled_reverse_kl", samples_per_prompt=2, seq_kd=True,
                    generation=GENERATION, eval_steps=2, save_steps=2)


@pytest.fixture(scope="module")
def sampling_run(tiny_setup, tmp_path_factory, local_ray):
    out = tmp_path_factory.mktemp("sampling")
    run(tiny_setup, out, **SAMPLING_RUN)
    return out


def test_a_run_with_sampling_reports_the_time_split_and_eval_onpolicy_rkl(sampling_run):
    metrics = logged_metrics(sampling_run)
    train = [m for m in metrics if "train/loss" in m]
    assert [m["step"] for m in train] == [1, 2, 3, 4]
    for m in train:
        assert m["time/sample"] > 0 and m["time/teacher_forward"] > 0 and m["time/student_step"] > 0
        assert "time/logits_transfer" in m
    rkl = [m["eval/onpolicy_rkl"] for m in metrics if "eval/onpolicy_rkl" in m]
    assert len(rkl) == 2 and all(value > 0 for value in rkl)


def test_a_run_with_sampling_resumes_bit_for_bit(sampling_run, tiny_setup, tmp_path):
    # A run that stopped after step 2: only its step-2 checkpoint exists in its output_dir.
    shutil.copytree(sampling_run / "output" / "checkpoint-2", tmp_path / "output" / "checkpoint-2")
    run(tiny_setup, tmp_path, resume_from_checkpoint=True, **SAMPLING_RUN)
    straight, resumed = weights(sampling_run / "output/checkpoint-4"), weights(tmp_path / "output/checkpoint-4")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


def test_kill_9_mid_run_with_sampling_then_resume_gives_the_uninterrupted_weights(tiny_setup, tmp_path, local_ray):
    # `kubedistill train` in its own session, killed with SIGKILL (the driver and its Ray processes) a step or two
    # after its step-4 checkpoint, mid-step; the same command with resume_from_checkpoint=true finishes the run.
    settings = dict(SAMPLING_RUN, max_steps=12, eval_steps=0)
    config_file = tmp_path / "distill.yaml"
    config_file.write_text(yaml.safe_dump(tiny_config_dict(tiny_setup, tmp_path / "killed", **settings)))
    command = [sys.executable, "-m", "distill_trainer.cli", "train", str(config_file)]
    env = {**os.environ, "KUBEDISTILL_NUM_THREADS": "1"}
    output = tmp_path / "killed" / "output"
    trainer = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while not (output / "checkpoint-4").is_dir():
        assert trainer.poll() is None, trainer.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no step-4 checkpoint in 180 s"
        time.sleep(0.01)
    time.sleep(0.05)  # into the next step (a tiny step takes about that)
    os.killpg(trainer.pid, signal.SIGKILL)
    trainer.wait()
    assert not (output / "checkpoint-12").exists(), "the kill came after the run had finished"
    rerun = subprocess.run(command + ["resume_from_checkpoint=true"], env=env, capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    resumed_at = re.search(r"resuming from \S+checkpoint-(\d+) at step", rerun.stdout + rerun.stderr)
    assert resumed_at and 4 <= int(resumed_at.group(1)) < 12, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    run(tiny_setup, tmp_path / "straight", **settings)
    straight, resumed = weights(tmp_path / "straight/output/checkpoint-12"), weights(output / "checkpoint-12")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


def test_a_prompt_without_room_for_a_completion_is_refused_before_anything_is_written(tiny_setup, tmp_path):
    with pytest.raises(ConfigError, match=r"train\.jsonl:1: the prompt is \d+ tokens, but sampled completions need "
                                          r"generation\.max_new_tokens=28 of sequence_length=32"):
        run(tiny_setup, tmp_path, on_policy_fraction=1.0, generation={"max_new_tokens": 28})
    assert not (tmp_path / "output").exists()


def _ranked_run(setup, out, *, strategy, ranks, tp, per_device, accumulation, **overrides):
    data = tiny_config_dict(setup, out, max_steps=2, save_steps=2, eval_steps=2, **overrides)
    data["student"]["training_args"].update(per_device_train_batch_size=per_device,
                                            gradient_accumulation_steps=accumulation)
    data["student"]["strategy_args"] = {"strategy_name": f"{strategy}_train", "tp_size": tp}
    data["teacher"]["strategy_args"] = {"strategy_name": f"{strategy}_infer", "tp_size": tp}
    data["student"]["device_mapping"] = data["teacher"]["device_mapping"] = list(range(ranks))  # CPU ranks
    return DistillPipeline(config_from_dict(data), num_threads=1, console=False).run()


def _same_steps(a_out, b_out, tags, tolerance):
    a, b = logged_metrics(a_out), logged_metrics(b_out)
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2]
    for x, y in zip(a, b):
        for tag in tags:
            assert (tag in x) == (tag in y), (x["step"], tag)
            if tag not in x:  # an evaluation metric: only at the evaluation steps
                continue
            assert abs(x[tag] - y[tag]) <= tolerance * max(1.0, abs(x[tag])), (x["step"], tag, x[tag], y[tag])


def test_two_data_parallel_ranks_sample_and_train_what_one_rank_does(tiny_setup, tmp_path, local_ray):
    # Global micro-batch g is sampled with the seed of g whichever replica holds it: 2 ranks x 1 micro-batch equal
    # 1 rank x 2 micro-batches.
    on_policy = dict(on_policy_fraction=1.0, samples_per_prompt=2, generation=GENERATION)
    _ranked_run(tiny_setup, tmp_path / "dp2", strategy="torch", ranks=2, tp=1, per_device=4, accumulation=1, **on_policy)
    _ranked_run(tiny_setup, tmp_path / "dp1", strategy="torch", ranks=1, tp=1, per_device=4, accumulation=2, **on_policy)
    assert "eval/onpolicy_rkl" in logged_metrics(tmp_path / "dp2")[-1]
    _same_steps(tmp_path / "dp1", tmp_path / "dp2", ("train/loss", "train/distill_loss", "train/grad_norm",
                                                      "eval/onpolicy_rkl"), 1e-5)


@pytest.mark.timeout(600)
def test_tensor_parallel_megatron_on_policy_matches_the_torch_strategy(tiny_setup, tmp_path, local_ray):
    # Greedy samples (temperature 0) are the same tokens on both strategies; ROLL's loss needs the teacher's label
    # log-probs, which a TP teacher takes from its all-reduced log-sum-exp.
    on_policy = dict(on_policy_fraction=1.0, on_policy_loss="sampled_reverse_kl",
                     generation={**GENERATION, "temperature": 0.0})
    _ranked_run(tiny_setup, tmp_path / "tp2", strategy="megatron", ranks=2, tp=2, per_device=4, accumulation=2,
                **on_policy)
    _ranked_run(tiny_setup, tmp_path / "torch", strategy="torch", ranks=1, tp=1, per_device=4, accumulation=2,
                **on_policy)
    _same_steps(tmp_path / "torch", tmp_path / "tp2", ("train/loss", "train/distill_loss", "train/student_loss",
                                                        "eval/onpolicy_rkl"), 1e-3)


@pytest.mark.timeout(300)
def test_an_off_policy_run_reports_eval_onpolicy_rkl_while_the_teacher_is_a_step_ahead(tiny_setup, tmp_path, local_ray):
    # overlap_teacher: at evaluation the next step's two micro-batches hold both slots of the teacher's ring, so the
    # evaluation's targets must not need a slot (they go through the object store).
    run(tiny_setup, tmp_path, max_steps=4, save_steps=0, eval_steps=2, eval_onpolicy_rkl=True, generation=GENERATION)
    rkl = [(m["step"], m["eval/onpolicy_rkl"]) for m in logged_metrics(tmp_path) if "eval/onpolicy_rkl" in m]
    assert [step for step, _ in rkl] == [2, 4] and all(value > 0 for _, value in rkl)
    assert not any("time/sample" in m for m in logged_metrics(tmp_path))  # nothing sampled in training
