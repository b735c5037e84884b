"""The teacher cache end to end on a real local Ray with tiny models: `kubedistill cache-teacher` writes it, a
training run reads it and starts no teacher; float32 equals a live run bit for bit, compact stays within 1e-3;
a run whose config differs, or a corrupted shard, is refused before training; an interrupted write (kill -9)
resumes to the same cache; DP=2 and TP=2 writers give one rank's cache."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from distill_trainer.config import ConfigError, config_from_dict
from distill_trainer.pipeline import DistillPipeline
from distill_trainer.teacher_cache.reader import TeacherCache
from distill_trainer.teacher_cache.store import CacheError, read_manifest
from distill_trainer.teacher_cache.writer import CacheTeacherRun
from tests.conftest import checkpoint_weights, logged_metrics, tiny_config_dict

REPO = Path(__file__).resolve().parents[2]
RECORDS = 16


@pytest.fixture(scope="module")
def small_data(tiny_setup, tmp_path_factory) -> Path:
    """The tiny set's first 16 records: an epoch is 8 steps of 2 records, so a 10-step run reads two epochs."""
    path = tmp_path_factory.mktemp("cache_data") / "train.jsonl"
    path.write_text("".join(tiny_setup.train_file.read_text().splitlines(keepends=True)[:RECORDS]))
    return path


def config_dict(setup, out, data, cache=None, **overrides):
    """Batch size 1, 2 micro-batches per step, 10 steps (over an epoch boundary, reshuffled)."""
    config = tiny_config_dict(setup, out, **{"max_steps": 10, "save_steps": 0, "eval_steps": 0, **overrides})
    config["student"]["training_args"].update(per_device_train_batch_size=1, gradient_accumulation_steps=2)
    config["student"]["data_args"]["file_name"] = str(data)
    config["teacher"]["infer_batch_size"] = 1
    if cache is not None:
        config["teacher_cache_dir"] = str(cache)
    return config


def write_cache(setup, out, data, cache, **overrides):
    config = config_from_dict(config_dict(setup, out, data, cache, **overrides))
    return CacheTeacherRun(config, num_threads=1).run()


def train(setup, out, data, cache=None, **overrides):
    config = config_from_dict(config_dict(setup, out, data, cache, **overrides))
    return DistillPipeline(config, num_threads=1, console=False).run()


def shard_bytes(cache: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(cache.glob("shard-*.kdtc"))}


@pytest.fixture(scope="module")
def live(tiny_setup, small_data, tmp_path_factory, local_ray):
    out = tmp_path_factory.mktemp("live")
    train(tiny_setup, out, small_data)
    return out


@pytest.fixture(scope="module")
def float32_cache(tiny_setup, small_data, tmp_path_factory, local_ray):
    out = tmp_path_factory.mktemp("float32_cache")
    result = write_cache(tiny_setup, out, small_data, out / "cache", teacher_cache_dtype="float32",
                         teacher_cache_records_per_shard=4)
    assert (result.records, result.shards, result.written) == (RECORDS, 4, 4)
    return out / "cache"


def test_float32_cache_run_equals_the_live_run_bit_for_bit_over_two_epochs(live, float32_cache, tiny_setup,
                                                                          small_data, tmp_path):
    train(tiny_setup, tmp_path, small_data, float32_cache)
    lives, cached = logged_metrics(live), logged_metrics(tmp_path)
    assert [r["step"] for r in cached] == list(range(1, 11))
    for a, b in zip(lives, cached):
        for tag in ("train/loss", "train/distill_loss", "train/student_loss", "train/grad_norm"):
            assert b[tag] == a[tag], (a["step"], tag)
        assert b["time/teacher_forward"] == 0  # no teacher ran
    final_live, final_cached = checkpoint_weights(live, 10), checkpoint_weights(tmp_path, 10)
    for name in final_live:
        assert torch.equal(final_live[name], final_cached[name]), name


@pytest.fixture(scope="module")
def sharp_teacher(tiny_setup, tmp_path_factory) -> Path:
    """The tiny teacher with its output layer scaled so that its next-token distributions are as peaked as a
    trained LM's (the random-init one is nearly uniform: a KD loss of ~0.002 nats/token, where the compact
    encoding's quantisation is a larger share than on any real teacher; see encoding's "Precision")."""
    import shutil

    from safetensors.torch import load_file, save_file

    path = tmp_path_factory.mktemp("sharp") / "teacher"
    shutil.copytree(tiny_setup.teacher, path)
    weights = load_file(str(path / "model.safetensors"))
    name = "lm_head.weight" if "lm_head.weight" in weights else "model.embed_tokens.weight"
    weights[name] = weights[name] * 40
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def test_compact_cache_holds_the_kd_loss_within_1e_3_of_live_on_every_step(tiny_setup, sharp_teacher, small_data,
                                                                           tmp_path, local_ray):
    teacher = {"teacher_pretrain": str(sharp_teacher)}
    train(tiny_setup, tmp_path / "live", small_data, **teacher)
    write_cache(tiny_setup, tmp_path, small_data, tmp_path / "cache", **teacher)
    manifest = read_manifest(tmp_path / "cache")
    assert manifest["codec"]["encoding"] == "compact" and manifest["complete"]
    train(tiny_setup, tmp_path / "run", small_data, tmp_path / "cache", **teacher)
    live, cached = logged_metrics(tmp_path / "live"), logged_metrics(tmp_path / "run")
    assert min(r["train/distill_loss"] for r in live) > 0.05  # a teacher as sharp as a real one
    for a, b in zip(live, cached):
        assert b["train/distill_loss"] == pytest.approx(a["train/distill_loss"], rel=1e-3), a["step"]
        assert b["train/distill_loss"] != a["train/distill_loss"]  # it is the compact encoding that was read


def test_a_run_whose_config_differs_from_the_cache_is_refused_naming_each_field(float32_cache, tiny_setup,
                                                                               small_data, tmp_path):
    with pytest.raises(ConfigError) as refused:
        train(tiny_setup, tmp_path, small_data, float32_cache, sequence_length=24, kd_temperature=2.0)
    message = str(refused.value)
    assert "sequence_length" in message and "32" in message and "24" in message
    assert "kd_temperature" in message
    assert not (tmp_path / "output").exists()  # stopped before anything was written


def test_a_corrupted_shard_is_named_and_refused_before_training(float32_cache, tiny_setup, small_data, tmp_path):
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(float32_cache, cache)
    shard = cache / "shard-00002.kdtc"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="shard-00002.kdtc.*checksum"):
        train(tiny_setup, tmp_path / "run", small_data, cache)
    assert not (tmp_path / "run" / "output").exists()


def test_an_incomplete_cache_is_refused_with_what_to_do(tiny_setup, small_data, tmp_path):
    (tmp_path / "cache").mkdir()
    with pytest.raises(CacheError, match="cache-teacher"):
        train(tiny_setup, tmp_path, small_data, tmp_path / "cache")


def test_kill_9_mid_write_then_rerun_gives_the_uninterrupted_cache(float32_cache, tiny_setup, small_data, tmp_path):
    config = config_dict(tiny_setup, tmp_path, small_data, tmp_path / "cache", teacher_cache_dtype="float32",
                         teacher_cache_records_per_shard=1)
    config_file = tmp_path / "distill.yaml"
    config_file.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "distill_trainer.cli", "cache-teacher", str(config_file)]
    env = {**os.environ, "KUBEDISTILL_NUM_THREADS": "1"}
    writer = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while len(list((tmp_path / "cache").glob("shard-*.kdtc"))) < 3:
        assert writer.poll() is None, writer.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the writer wrote no shard in 120 s"
        time.sleep(0.01)
    os.killpg(writer.pid, signal.SIGKILL)  # the driver and its Ray processes, mid-write
    writer.wait()
    written = len(list((tmp_path / "cache").glob("shard-*.kdtc")))
    assert 3 <= written < RECORDS, "the kill came too late to interrupt the write"
    assert not read_manifest(tmp_path / "cache")["complete"]
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"{written} of {RECORDS} shards are written already" in rerun.stdout + rerun.stderr
    assert not list((tmp_path / "cache").glob(".*tmp*"))
    # The uninterrupted cache of the same config, one record per shard.
    straight = tmp_path / "straight"
    write_cache(tiny_setup, tmp_path / "s", small_data, straight, teacher_cache_dtype="float32",
                teacher_cache_records_per_shard=1)
    assert shard_bytes(tmp_path / "cache") == shard_bytes(straight)
    assert read_manifest(tmp_path / "cache") == read_manifest(straight)


def test_two_data_parallel_writers_write_one_ranks_cache(float32_cache, tiny_setup, small_data, tmp_path):
    config = config_dict(tiny_setup, tmp_path, small_data, tmp_path / "cache", teacher_cache_dtype="float32",
                         teacher_cache_records_per_shard=4)
    config["student"]["device_mapping"] = config["teacher"]["device_mapping"] = [0, 1]  # two CPU ranks
    CacheTeacherRun(config_from_dict(config), num_threads=1).run()
    assert shard_bytes(tmp_path / "cache") == shard_bytes(float32_cache)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("layout", [{"tp_size": 2}, {"pp_size": 2}], ids=["tp2", "pp2"])
def test_megatron_writers_on_two_ranks_match_one_torch_rank(float32_cache, tiny_setup, small_data, tmp_path, layout):
    # TP: the writing rank gathers the global top-k of both vocabulary shards; PP: the last stage writes.
    config = config_dict(tiny_setup, tmp_path, small_data, tmp_path / "cache", teacher_cache_dtype="float32",
                         teacher_cache_records_per_shard=4)
    config["teacher"]["strategy_args"] = {"strategy_name": "megatron_infer", **layout}
    config["student"]["strategy_args"] = {"strategy_name": "megatron_train", **layout}
    config["student"]["device_mapping"] = config["teacher"]["device_mapping"] = [0, 1]
    CacheTeacherRun(config_from_dict(config), num_threads=1).run()
    one, two = TeacherCache(str(float32_cache)), TeacherCache(str(tmp_path / "cache"))
    for record in range(RECORDS):
        a = one._shard(record // 4).get(record)
        b = two._shard(record // 4).get(record)
        assert np.array_equal(a.input_ids, b.input_ids)
        ta, tb = one.codec.decode(a.rows), two.codec.decode(b.rows)
        assert torch.equal(ta.indices, tb.indices), record
        torch.testing.assert_close(tb.values, ta.values, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tb.tail, ta.tail, rtol=1e-5, atol=1e-5)


@pytest.mark.timeout(600)
def test_tensor_parallel_megatron_student_reads_the_cache_as_it_reads_a_live_teacher(float32_cache, tiny_setup,
                                                                                    small_data, tmp_path):
    # Each TP rank gets its vocabulary shard's share of the cached global top-k (StudentStrategy.local_targets).
    def megatron(out, cache=None):
        config = config_dict(tiny_setup, out, small_data, cache, max_steps=3)
        config["teacher"]["strategy_args"] = {"strategy_name": "megatron_infer", "tp_size": 2}
        config["student"]["strategy_args"] = {"strategy_name": "megatron_train", "tp_size": 2}
        config["student"]["device_mapping"] = config["teacher"]["device_mapping"] = [0, 1]
        DistillPipeline(config_from_dict(config), num_threads=1, console=False).run()
        return logged_metrics(out)

    live, cached = megatron(tmp_path / "live"), megatron(tmp_path / "cached", float32_cache)
    assert len(live) == len(cached) == 3
    # The cache was written by one torch rank, the live targets by TP=2 Megatron ranks: equal up to the two
    # teachers' float rounding (~1e-7 in the logits; seen: 1e-5 of this near-zero KD loss). Wrong shards (every
    # rank's copy of the top-k counted, or a rank missing its entries) change the KD loss by far more.
    for a, b in zip(live, cached):
        for tag in ("train/loss", "train/distill_loss", "train/grad_norm"):
            assert b[tag] == pytest.approx(a[tag], rel=1e-4), (a["step"], tag)


def test_a_run_from_the_cache_resumes_bit_for_bit(float32_cache, tiny_setup, small_data, tmp_path):
    import shutil

    train(tiny_setup, tmp_path / "straight", small_data, float32_cache, save_steps=5)
    shutil.copytree(tmp_path / "straight" / "output" / "checkpoint-5", tmp_path / "resumed" / "output" / "checkpoint-5")
    train(tiny_setup, tmp_path / "resumed", small_data, float32_cache, save_steps=5, resume_from_checkpoint=True)
    straight, resumed = checkpoint_weights(tmp_path / "straight", 10), checkpoint_weights(tmp_path / "resumed", 10)
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


def test_packed_rows_read_each_records_targets(float32_cache, tiny_setup, small_data, tmp_path):
    # Packed rows hold several records: each one's cached targets, in order. The live teacher computes them on the
    # packed row (positions restarting per record), the cache on each record alone: equal up to float rounding.
    packed = {"student": {**config_dict(tiny_setup, tmp_path, small_data)["student"], "use_sequence_packing": True}}
    train(tiny_setup, tmp_path / "live", small_data, max_steps=4, **packed)
    train(tiny_setup, tmp_path / "cached", small_data, float32_cache, max_steps=4, **packed)
    live, cached = logged_metrics(tmp_path / "live"), logged_metrics(tmp_path / "cached")
    assert len(live) == len(cached) == 4
    for a, b in zip(live, cached):
        for tag in ("train/loss", "train/distill_loss", "train/grad_norm"):
            assert b[tag] == pytest.approx(a[tag], rel=1e-5), (a["step"], tag)
