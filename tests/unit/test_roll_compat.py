"""Configs of the original pipeline (alibaba/ROLL): its keys and nesting load, map onto ours, and what we cannot
honour is refused before Ray starts, naming the field."""

import subprocess
import sys
from pathlib import Path

import pytest

from distill_trainer.config import (
    ConfigError,
    compose_config,
    config_from_dict,
    dump_config,
    logits_transport,
    resolve_max_steps,
    steps_for_epochs,
    worker_env,
)

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "roll"  # distill_megatron.yaml: the original's Megatron example
# The original example's values we refuse, set to what we support: context parallel (not supported) and sequence
# packing (torch strategies only: the example is Megatron's).
SUPPORTED_VALUES = [
    "student.strategy_args.strategy_config.context_parallel_size=1",
    "teacher.strategy_args.strategy_config.context_parallel_size=1",
    "student.use_sequence_packing=false",
    "teacher.use_sequence_packing=false",
]
BASE = {
    "max_steps": 10,
    "student_pretrain": "s",
    "teacher_pretrain": "t",
    "student": {"data_args": {"file_name": "train.jsonl"}},
}


def with_changes(**changes):
    return {**BASE, **changes}


def error_lines(data) -> list[str]:
    with pytest.raises(ConfigError) as error:
        config_from_dict(data, source="my.yaml")
    lines = str(error.value).splitlines()
    assert lines[0] == "invalid configuration in my.yaml:"
    return lines[1:]


def test_original_megatron_example_loads_with_its_keys_and_nesting():
    config = compose_config(FIXTURE, "distill_megatron", SUPPORTED_VALUES)
    student, teacher = config.student, config.teacher
    # Top-level keys of the original land in the student's sections.
    assert (student.data_args.question_key, student.data_args.answer_key) == ("question_zh", "answer_zh")
    assert student.training_args.max_grad_norm == 1.0
    assert student.data_args.file_name == ["data/GSM8K_zh.json"]
    assert student.data_args.eval_file_name == ["data/GSM8K_zh.json"]  # validation.data_args.file_name
    # num_train_epochs instead of max_steps: resolved once the data is read.
    assert config.max_steps is None and student.training_args.num_train_epochs == 1
    # strategy_config's Megatron names become our fields.
    for side in (student, teacher):
        assert side.device_mapping == list(range(8))
        assert (side.strategy_args.tp_size, side.strategy_args.pp_size) == (2, 2)
        assert side.model_args.dtype == "bf16"
        assert side.model_args.model_type == "causal_lm"
        assert side.model_args.hf_attn_implementation == "flash_attention_2"
    assert config.dp_size == 2
    assert (student.strategy_args.strategy_name, teacher.strategy_args.strategy_name) == (
        "megatron_train", "megatron_infer")
    assert student.strategy_args.sequence_parallel is True  # honoured: Megatron's sequence parallel
    assert teacher.strategy_args.sequence_parallel is True
    assert student.strategy_args.recompute_granularity == "full"  # honoured: Megatron recomputes every layer
    assert student.strategy_args.use_distributed_optimizer is True  # honoured: Megatron's ZeRO-1
    assert student.model_args.activation_checkpointing and not teacher.model_args.activation_checkpointing
    assert worker_env(config) == {"RAY_PROFILING": "0"}
    assert logits_transport(config) == "same_device"  # nccl-only: the same-device hand-off
    assert config.checkpoint_config.output_dir == "/var/tmp/ckpt"


def test_loaded_original_config_survives_dump_and_reload():
    # What a checkpoint records and the operator renders must validate again to the same config.
    config = compose_config(FIXTURE, "distill_megatron", SUPPORTED_VALUES)
    assert config_from_dict(dump_config(config)) == config


def test_the_original_example_as_is_is_refused_naming_each_unsupported_field():
    with pytest.raises(ConfigError) as error:
        compose_config(FIXTURE, "distill_megatron")
    lines = str(error.value).splitlines()[1:]
    assert [line.split(":")[0].strip() for line in lines] == [
        "student.strategy_args.strategy_config.context_parallel_size",
        "student.use_sequence_packing",
        "teacher.strategy_args.strategy_config.context_parallel_size",
        "teacher.use_sequence_packing",
    ]
    assert "context parallelism is not supported; set 1" in lines[0]
    # Sequence packing is the torch strategies': Megatron packs only through TransformerEngine. Refused beside the
    # errors of strategy_args itself, and again once those are fixed.
    assert "Megatron packs sequences only with TransformerEngine's attention (packed_seq_params / THD)" in lines[1]
    assert lines[1].endswith("; set false (micro-batches are then padded) or use torch_train / torch_infer (got True)")
    with pytest.raises(ConfigError) as error:
        compose_config(FIXTURE, "distill_megatron", SUPPORTED_VALUES[:2])
    lines = str(error.value).splitlines()[1:]
    assert [line.split(":")[0].strip() for line in lines] == ["student.use_sequence_packing",
                                                              "teacher.use_sequence_packing"]


# --- both places of one setting -------------------------------------------------------------------------------------

PLACES = [
    # (the original's place, its value, our place, its value, a different value of ours)
    ({"question_key": "q"}, {"student": {"data_args": {"file_name": "x", "question_key": "q"}}},
     {"student": {"data_args": {"file_name": "x", "question_key": "p"}}},
     "question_key", "student.data_args.question_key"),
    ({"answer_key": "a"}, {"student": {"data_args": {"file_name": "x", "answer_key": "a"}}},
     {"student": {"data_args": {"file_name": "x", "answer_key": "b"}}},
     "answer_key", "student.data_args.answer_key"),
    ({"max_grad_norm": 0.5}, {"student": {"data_args": {"file_name": "x"}, "training_args": {"max_grad_norm": 0.5}}},
     {"student": {"data_args": {"file_name": "x"}, "training_args": {"max_grad_norm": 2.0}}},
     "max_grad_norm", "student.training_args.max_grad_norm"),
    ({"validation": {"data_args": {"file_name": ["v.json"]}}},
     {"student": {"data_args": {"file_name": "x", "eval_file_name": ["v.json"]}}},
     {"student": {"data_args": {"file_name": "x", "eval_file_name": "w.json"}}},
     "validation.data_args.file_name", "student.data_args.eval_file_name"),
]


@pytest.mark.parametrize("theirs, ours, other, their_path, our_path", PLACES, ids=[p[3] for p in PLACES])
def test_a_setting_may_be_written_in_the_original_place_or_ours_but_not_differently_in_both(
        theirs, ours, other, their_path, our_path):
    expected = config_from_dict(with_changes(**ours))
    from_theirs = config_from_dict(with_changes(**theirs))
    both = config_from_dict(with_changes(**theirs, **ours))

    def value(config):
        node = config
        for part in our_path.split("."):
            node = getattr(node, part)
        return node

    assert value(from_theirs) == value(both) == value(expected)
    [line] = error_lines(with_changes(**theirs, **other))
    assert line.startswith(f"  {their_path}: conflicts with {our_path}="), line


@pytest.mark.parametrize(
    "strategy_config, ours, field, path",
    [
        ({"tensor_model_parallel_size": 2}, {"tp_size": 4}, "strategy_config.tensor_model_parallel_size",
         "strategy_args.tp_size"),
        ({"pipeline_model_parallel_size": 2}, {"pp_size": 4}, "strategy_config.pipeline_model_parallel_size",
         "strategy_args.pp_size"),
        ({"recompute_granularity": "full"}, {"recompute_granularity": "selective"},
         "strategy_config.recompute_granularity", "strategy_args.recompute_granularity"),
    ],
)
def test_strategy_config_conflicting_with_our_field_is_refused_naming_both(strategy_config, ours, field, path):
    side = {"strategy_args": {"strategy_name": "megatron_train", "strategy_config": strategy_config, **ours},
            "data_args": {"file_name": "x"}, "device_mapping": list(range(8))}
    teacher = {"strategy_args": {"strategy_name": "megatron_infer", **ours}, "device_mapping": list(range(8))}
    [line] = error_lines(with_changes(student=side, teacher=teacher))
    assert line.startswith(f"  student.strategy_args.{field}: conflicts with {path}="), line


def test_strategy_config_megatron_options_map_to_our_fields():
    from distill_trainer.config import StrategyArgs

    args = StrategyArgs(strategy_name="megatron_train", strategy_config={
        "tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2, "sequence_parallel": True,
        "use_distributed_optimizer": True, "recompute_granularity": "full"})
    assert (args.tp_size, args.pp_size, args.sequence_parallel, args.use_distributed_optimizer,
            args.recompute_granularity) == (2, 2, True, True, "full")


def test_sequence_parallel_is_accepted_at_tp2():
    devices = [0, 1]
    config = config_from_dict(with_changes(
        student={"data_args": {"file_name": "x"}, "device_mapping": devices,
                 "strategy_args": {"strategy_name": "megatron_train", "tp_size": 2,
                                   "strategy_config": {"sequence_parallel": True}}},
        teacher={"device_mapping": devices, "strategy_args": {"strategy_name": "megatron_infer", "tp_size": 2,
                                                              "sequence_parallel": True}}))
    assert config.student.strategy_args.sequence_parallel and config.teacher.strategy_args.sequence_parallel


@pytest.mark.parametrize("option, value, off", [("use_distributed_optimizer", True, "false")])
def test_megatron_options_the_strategy_does_not_honour_yet_are_refused_not_ignored(option, value, off, monkeypatch):
    # None is listed at present; the mechanism stays for the next option the config accepts before the strategy.
    from distill_trainer import config as config_module

    monkeypatch.setitem(config_module.MEGATRON_OPTIONS_NOT_YET_HONOURED, option, False)
    devices = [0, 1]
    lines = error_lines(with_changes(
        student={"data_args": {"file_name": "x"}, "device_mapping": devices,
                 "strategy_args": {"strategy_name": "megatron_train", "tp_size": 2,
                                   "strategy_config": {option: value}}},
        teacher={"device_mapping": devices, "strategy_args": {"strategy_name": "megatron_infer", "tp_size": 2}}))
    assert lines == [f"  student.strategy_args.{option}: not supported by megatron_train yet (it would be ignored); "
                     f"set {off} or remove it (got {value!r})"]


def test_strategy_config_bf16_sets_the_dtype_and_refuses_another():
    megatron = {"strategy_name": "megatron_infer", "strategy_config": {"bf16": True}}
    config = config_from_dict(with_changes(
        student={"data_args": {"file_name": "x"}, "strategy_args": {"strategy_name": "megatron_train"}},
        teacher={"strategy_args": megatron}))
    assert config.teacher.model_args.dtype == "bf16"
    [line] = error_lines(with_changes(
        student={"data_args": {"file_name": "x"}, "strategy_args": {"strategy_name": "megatron_train"}},
        teacher={"strategy_args": megatron, "model_args": {"dtype": "fp16"}}))
    assert line.startswith("  teacher.strategy_args.strategy_config.bf16: conflicts with model_args.dtype='fp16'")


# --- num_train_epochs -> max_steps ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "epochs, records, batch, accumulation, devices, tp, pp, steps",
    [
        (1, 100, 4, 2, [], 1, 1, 12),        # 100 / 8 = 12.5: the partial last batch is not a step
        (3, 100, 4, 2, [], 1, 1, 37),        # 300 / 8
        (1, 7473, 8, 4, list(range(8)), 2, 2, 116),  # the original's example on GSM8K: dp = 8 / (2*2) = 2
        (1, 64, 2, 1, [0, 1], 2, 1, 32),     # tp 2 over 2 devices: dp 1
        (1, 64, 2, 1, [0, 1], 1, 1, 16),     # dp 2 (torch data parallel, or megatron tp=pp=1)
        (0.5, 10, 1, 1, [], 1, 1, 5),
        (1, 3, 8, 1, [], 1, 1, 1),           # fewer records than one batch: still one step
    ],
)
def test_num_train_epochs_gives_max_steps_from_records_batch_accumulation_and_dp(
        epochs, records, batch, accumulation, devices, tp, pp, steps):
    strategy = "megatron" if tp * pp > 1 or len(devices) > 1 else "torch"
    config = config_from_dict({
        "student_pretrain": "s", "teacher_pretrain": "t",
        "student": {"data_args": {"file_name": "x"}, "device_mapping": devices,
                    "training_args": {"num_train_epochs": epochs, "per_device_train_batch_size": batch,
                                      "gradient_accumulation_steps": accumulation},
                    "strategy_args": {"strategy_name": f"{strategy}_train", "tp_size": tp, "pp_size": pp}},
        "teacher": {"device_mapping": devices,
                    "strategy_args": {"strategy_name": f"{strategy}_infer", "tp_size": tp, "pp_size": pp}},
    })
    assert config.dp_size == max(1, len(devices) // (tp * pp))
    assert steps_for_epochs(config, records) == steps
    assert resolve_max_steps(config, records).startswith(f"max_steps={steps}: num_train_epochs={epochs:g} x {records}")
    assert config.max_steps == steps


def test_max_steps_that_is_set_wins_over_num_train_epochs():
    config = config_from_dict(with_changes(
        student={"data_args": {"file_name": "x"}, "training_args": {"num_train_epochs": 3}}))
    assert resolve_max_steps(config, 1000) is None and config.max_steps == 10


def test_neither_max_steps_nor_num_train_epochs_is_refused():
    data = {key: value for key, value in BASE.items() if key != "max_steps"}
    assert error_lines(data) == [
        "  max_steps: required, or student.training_args.num_train_epochs (the original's way)"]


# --- accepted and mapped --------------------------------------------------------------------------------------------


def test_hf_infer_is_the_torch_inference_strategy():
    config = config_from_dict(with_changes(teacher={"strategy_args": {"strategy_name": "hf_infer"}}))
    assert config.teacher.strategy_args.strategy_name == "torch_infer"


@pytest.mark.parametrize("backend, transport", [
    ("ipc+nccl", "same_device"), ("nccl-only", "same_device"), ("nccl_only", "same_device"),
    ("ray", "object_store"),
])
def test_logits_transfer_backend_maps_to_a_channel_transport(backend, transport):
    assert logits_transport(config_from_dict(with_changes(logits_transfer_backend=backend))) == transport


def test_worker_env_is_the_top_level_system_envs_under_each_sides_own():
    config = config_from_dict(with_changes(
        system_envs={"RAY_PROFILING": "0", "NCCL_DEBUG": "WARN", "OMP_NUM_THREADS": 4},
        student={"data_args": {"file_name": "x"}, "system_envs": {"NCCL_DEBUG": "INFO"}}))
    assert worker_env(config) == {"RAY_PROFILING": "0", "NCCL_DEBUG": "WARN", "OMP_NUM_THREADS": "4"}
    assert worker_env(config, "student")["NCCL_DEBUG"] == "INFO"
    assert worker_env(config, "teacher")["NCCL_DEBUG"] == "WARN"


@pytest.mark.parametrize("template", ["native", "qwen2_5", "qwen3"])
def test_chat_formats_that_mean_the_tokenizers_template_are_accepted(template):
    config = config_from_dict(with_changes(student={"data_args": {"file_name": "x", "template": template}}))
    assert config.student.data_args.template == template


def test_hydra_section_of_a_plain_config_is_ignored():
    config = config_from_dict(with_changes(hydra={"run": {"dir": "."}, "output_subdir": None}))
    assert "hydra" not in dump_config(config)


# --- refused, naming the field --------------------------------------------------------------------------------------

MEGATRON = {"student": {"data_args": {"file_name": "x"}, "strategy_args": {"strategy_name": "megatron_train"}},
            "teacher": {"strategy_args": {"strategy_name": "megatron_infer"}}}


def _student(**sections):
    return {"student": {"data_args": {"file_name": "x"}, **sections}}


@pytest.mark.parametrize(
    "changes, path, words",
    [
        (_student(strategy_args={"strategy_name": "fsdp2_train"}), "student.strategy_args.strategy_name",
         "not supported; supported: torch_train, torch_infer, megatron_train, megatron_infer, "
         "hf_infer (= torch_infer)"),
        (_student(strategy_args={"strategy_name": "deepspeed_train"}), "student.strategy_args.strategy_name",
         "not supported"),
        ({"teacher": {"strategy_args": {"strategy_name": "vllm"}}}, "teacher.strategy_args.strategy_name",
         "not supported"),
        ({"teacher": {"strategy_args": {"strategy_name": "megatron_infer"}}}, "teacher.strategy_args.strategy_name",
         "must be torch_infer to go with student.strategy_args.strategy_name='torch_train'"),
        (_student(strategy_args={"strategy_config": {"context_parallel_size": 2}}),
         "student.strategy_args.strategy_config.context_parallel_size", "context parallelism is not supported"),
        (_student(strategy_args={"strategy_config": {"expert_model_parallel_size": 2}}),
         "student.strategy_args.strategy_config.expert_model_parallel_size", "not supported here"),
        ({"student": {**MEGATRON["student"], "use_sequence_packing": True}, "teacher": MEGATRON["teacher"]},
         "student.use_sequence_packing", "Megatron packs sequences only with TransformerEngine's attention"),
        ({**_student(use_sequence_packing=True), "teacher": {"use_sequence_packing": False}},
         "teacher.use_sequence_packing", "differs from student.use_sequence_packing=true"),
        (_student(data_args={"file_name": "x", "template": "chatml"}), "student.data_args.template",
         "chat format 'chatml' is not supported"),
        ({**_student(data_args={"file_name": "x", "template": "qwen2_5"}),
          "teacher": {"data_args": {"template": "qwen3"}}}, "teacher.data_args.template",
         "differs from student.data_args.template='qwen2_5'"),
        (_student(model_args={"model_type": "auto_sequence_classification"}), "student.model_args.model_type",
         "Input should be 'causal_lm'"),
        (_student(model_args={"attn_implementation": "fa2"}), "student.model_args.attn_implementation",
         "flash attention needs a GPU"),
        ({"checkpoint_config": {"type": "hdfs"}}, "checkpoint_config.type", "Input should be 'file_system'"),
        ({"logits_transfer_backend": "nccl"}, "logits_transfer_backend", "Input should be"),
        ({"system_envs": {"CUDA_VISIBLE_DEVICES": "0"}}, "system_envs", "set by Ray from device_mapping"),
        ({"system_envs": {"NCCL_P2P_DISABLE": True}}, "system_envs", "quote it"),
        (_student(strategy_args={"strategy_config": {"sequence_parallel": True}}),
         "student.strategy_args.sequence_parallel", "not supported by torch_train"),
        (_student(strategy_args={"use_distributed_optimizer": True}), "student.strategy_args.use_distributed_optimizer",
         "not supported by torch_train"),
        (_student(strategy_args={"recompute_granularity": "full"}), "student.strategy_args.recompute_granularity",
         "disable_gradient_checkpointing: false"),
        ({**_student(strategy_args={"tp_size": 2}), "teacher": {"strategy_args": {"tp_size": 2}}},
         "student.device_mapping", "not a multiple of tp_size*pp_size=2"),
        ({"student": {"data_args": {"file_name": "x"}, "strategy_args": {"tp_size": 2}, "device_mapping": [0, 1]},
          "teacher": {"strategy_args": {"tp_size": 2}, "device_mapping": [0, 1]}},
         "student.strategy_args.tp_size", "values > 1 need megatron_train/megatron_infer"),
        ({"student": {**MEGATRON["student"], "strategy_args": {"strategy_name": "megatron_train",
                                                                "sequence_parallel": True}},
          "teacher": MEGATRON["teacher"]}, "student.strategy_args.sequence_parallel", "needs tp_size > 1"),
        ({"hydra": "run"}, "hydra", "expected Hydra's settings"),
    ],
)
def test_unsupported_value_is_refused_naming_the_field(changes, path, words):
    lines = error_lines(with_changes(**changes))
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"  {path}: "), lines[0]
    assert words in lines[0], lines[0]


def test_megatron_strategies_lift_the_single_device_and_tp_pp_limits():
    devices = list(range(8))
    config = config_from_dict(with_changes(
        student={"data_args": {"file_name": "x"}, "device_mapping": devices,
                 "strategy_args": {"strategy_name": "megatron_train", "tp_size": 2, "pp_size": 2}},
        teacher={"device_mapping": devices,
                 "strategy_args": {"strategy_name": "megatron_infer", "tp_size": 2, "pp_size": 2}}))
    assert config.dp_size == 2


def test_flash_attention_without_the_package_is_refused_before_ray(monkeypatch):
    import importlib.util

    from distill_trainer.config import check_runtime_support

    config = config_from_dict(with_changes(
        student={"data_args": {"file_name": "x"}, "device_mapping": [0], "model_args": {"attn_implementation": "fa2"}},
        teacher={"device_mapping": [0]}))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name, *a))
    with pytest.raises(ConfigError, match=r"^student\.model_args\.attn_implementation='fa2' needs the flash-attn "
                                          r"package, which is not installed; use sdpa"):
        check_runtime_support(config)


def test_kubedistill_train_refuses_an_unsupported_field_of_the_original_config_in_one_line(tmp_path):
    # Through the console entry point, as a user runs it: exit status 2, no traceback, the field named, nothing
    # written, Ray never started.
    args = [sys.executable, "-m", "distill_trainer.cli", "train", str(FIXTURE / "distill_megatron.yaml"),
            *SUPPORTED_VALUES[1:], f"output_dir={tmp_path / 'out'}", f"logging_dir={tmp_path / 'logs'}"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "ray" not in done.stderr.lower()
    assert done.stderr.strip().splitlines() == [
        f"error: invalid configuration in {FIXTURE / 'distill_megatron.yaml'}:",
        "  student.strategy_args.strategy_config.context_parallel_size: context parallelism is not supported; set 1 "
        "(sequences stay whole on each rank). Megatron splits a sequence over ranks only with TransformerEngine's "
        "attention, and the megatron strategies do not pass it on yet (got 2)",
    ]
    assert list(tmp_path.iterdir()) == []


# --- the example configs --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config_path, dp", [("examples/qwen2.5-7B-distill_megatron", 2), ("examples/tiny", 1)])
def test_megatron_examples_load(config_path, dp):
    config = compose_config(ROOT / config_path, "distill_megatron")
    assert config.student.strategy_args.strategy_name == "megatron_train"
    assert config.student.strategy_args.tp_size == 2 and config.dp_size == dp
    assert config.max_steps is None and config.student.training_args.num_train_epochs == 1
