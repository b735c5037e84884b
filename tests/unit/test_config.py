"""Config validation: every mistake names the field path and the bad value."""

import pytest

from distill_trainer.cli import main
from distill_trainer.config import ConfigError, compose_config, config_from_dict, dump_config

BASE = {
    "max_steps": 10,
    "student_pretrain": "s",
    "teacher_pretrain": "t",
    "student": {"data_args": {"file_name": "train.jsonl"}},
}


def with_changes(**changes):
    data = {**BASE, **changes}
    return data


def test_minimal_config_gets_documented_defaults():
    config = config_from_dict(BASE)
    assert config.logits_topk == 64
    assert config.kd_objective == "forward_kl"
    assert config.teacher.strategy_args.strategy_name == "torch_infer"
    assert config.student.strategy_args.strategy_name == "torch_train"
    assert config.resume_from_checkpoint is False


@pytest.mark.parametrize(
    "changes, path, bad",
    [
        ({"distill_loss_weight": 1.5}, "distill_loss_weight", "1.5"),
        ({"kd_temperature": 0}, "kd_temperature", "0"),
        ({"kd_objective": "kl"}, "kd_objective", "'kl'"),
        ({"logits_topk": -1}, "logits_topk", "-1"),
        ({"max_steps": 0}, "max_steps", "0"),
        ({"skew_lambda": 2}, "skew_lambda", "2"),
        ({"student": {"data_args": {"file_name": "x"}, "training_args": {"learning_rate": -1}}},
         "student.training_args.learning_rate", "-1"),
        ({"student": {"data_args": {"file_name": "x"}, "device_mapping": "range(8)"}},
         "student.device_mapping", "range(8)"),
    ],
)
def test_invalid_value_is_reported_with_field_path_and_value(changes, path, bad):
    with pytest.raises(ConfigError) as error:
        config_from_dict(with_changes(**changes), source="my.yaml")
    message = str(error.value)
    assert "my.yaml" in message
    assert f"  {path}:" in message
    assert bad in message


def test_misspelled_field_is_rejected_not_ignored():
    with pytest.raises(ConfigError, match=r"student\.training_args\.learning_rat: unknown field"):
        config_from_dict(with_changes(student={"data_args": {"file_name": "x"}, "training_args": {"learning_rat": 1}}))


def test_missing_required_fields_are_named():
    with pytest.raises(ConfigError) as error:
        config_from_dict({"max_steps": 1})
    assert "student_pretrain: Field required" in str(error.value)
    assert "teacher_pretrain: Field required" in str(error.value)


def test_teacher_and_student_must_have_as_many_ranks():
    data = with_changes(teacher={"strategy_args": {"strategy_name": "torch_infer"}, "device_mapping": [0]})
    with pytest.raises(ConfigError, match="teacher.device_mapping"):
        config_from_dict(data)


def test_a_teacher_on_devices_of_its_own_gets_them_whole():
    from distill_trainer.config import gpu_memory_fraction
    from distill_trainer.workers import device_bundles

    apart = config_from_dict(with_changes(student={"data_args": {"file_name": "x"}, "device_mapping": [0, 1]},
                                          teacher={"device_mapping": [2, 3]}))
    assert [gpu_memory_fraction(apart, side) for side in ("student", "teacher")] == [0.9, 0.9]
    # One placement-group bundle per device; teacher rank i in the bundle of its own device.
    assert device_bundles(apart) == {"student": [0, 1], "teacher": [2, 3]}
    shared = config_from_dict(with_changes(student={"data_args": {"file_name": "x"}, "device_mapping": [0, 1]},
                                           teacher={"device_mapping": [0, 1]}))
    assert [gpu_memory_fraction(shared, side) for side in ("student", "teacher")] == [0.45, 0.45]
    assert device_bundles(shared) == {"student": [0, 1], "teacher": [0, 1]}
    crossed = config_from_dict(with_changes(student={"data_args": {"file_name": "x"}, "device_mapping": [0, 1]},
                                            teacher={"device_mapping": [1, 0]}))
    assert device_bundles(crossed) == {"student": [0, 1], "teacher": [1, 0]}
    assert gpu_memory_fraction(crossed, "teacher") == 0.45  # each GPU holds a teacher and a student rank


def test_with_a_teacher_cache_the_one_side_that_runs_gets_its_gpus_whole():
    # Training from a cache starts no teacher; `kubedistill cache-teacher` starts no student.
    from distill_trainer.config import gpu_memory_fraction

    cached = config_from_dict(with_changes(student={"data_args": {"file_name": "x"}, "device_mapping": [0, 1]},
                                           teacher={"device_mapping": [0, 1]}, teacher_cache_dir="/cache"))
    assert [gpu_memory_fraction(cached, side) for side in ("student", "teacher")] == [0.9, 0.9]


def test_only_the_sides_that_run_reserve_devices():
    from distill_trainer.workers import device_bundles

    apart = config_from_dict(with_changes(student={"data_args": {"file_name": "x"}, "device_mapping": [4, 5]},
                                          teacher={"device_mapping": [2, 3]}))
    assert device_bundles(apart, ["student"]) == {"student": [0, 1]}  # reading a teacher cache: no teacher GPUs
    assert device_bundles(apart, ["teacher"]) == {"teacher": [0, 1]}  # cache-teacher: no student GPUs
    assert device_bundles(apart) == {"student": [2, 3], "teacher": [0, 1]}


def test_student_must_use_a_train_strategy():
    data = with_changes(student={"data_args": {"file_name": "x"}, "strategy_args": {"strategy_name": "torch_infer"}})
    with pytest.raises(ConfigError, match=r"student\.strategy_args\.strategy_name: must be a \*_train strategy "
                                          r"\(got 'torch_infer'\)"):
        config_from_dict(data)


@pytest.mark.parametrize("teacher", [
    {"model_args": {"dtype": "bf16"}},
    {"strategy_args": {"gpu_memory_utilization": 0.5}},
    {"device_mapping": []},
])
def test_teacher_section_without_strategy_name_gets_the_inference_strategy(teacher):
    config = config_from_dict(with_changes(teacher=teacher))
    assert config.teacher.strategy_args.strategy_name == "torch_infer"
    assert config.student.strategy_args.strategy_name == "torch_train"
    # What a checkpoint records and the operator renders says so too.
    assert dump_config(config)["teacher"]["strategy_args"]["strategy_name"] == "torch_infer"


def test_teacher_set_to_a_train_strategy_is_still_rejected():
    with pytest.raises(ConfigError, match=r"teacher\.strategy_args\.strategy_name: must be an \*_infer strategy"):
        config_from_dict(with_changes(teacher={"strategy_args": {"strategy_name": "torch_train"}}))


@pytest.mark.parametrize(
    "changes, line",
    [
        ({"teacher": {"strategy_args": {"tp_size": 2}}},
         "  teacher.strategy_args.tp_size: must equal student.strategy_args.tp_size (1): teacher and student share "
         "a parallel layout (got 2)"),
        ({"teacher": {"device_mapping": [0]}},
         "  teacher.device_mapping: must name as many devices as student.device_mapping [] (teacher rank i feeds "
         "student rank i); the same list keeps each pair on one device (got [0])"),
        ({"student": {"data_args": {"file_name": "x"}, "strategy_args": {"pp_size": 2}},
          "teacher": {"strategy_args": {"pp_size": 2}}},
         "  student.device_mapping: 1 rank(s) (an empty list is one CPU rank) is not a multiple of tp_size*pp_size=2"
         " (got [])"),
        ({"student": {}}, "  student.data_args.file_name: required: the training data file"),
    ],
)
def test_cross_field_error_names_the_field_path_and_only_the_clashing_values(changes, line):
    with pytest.raises(ConfigError) as error:
        config_from_dict(with_changes(**changes), source="my.yaml")
    message = str(error.value)
    assert message.splitlines()[0] == "invalid configuration in my.yaml:"
    assert message.splitlines()[1].startswith(line), message
    assert len(message.splitlines()) == 2
    assert "<top level>" not in message and "student_pretrain" not in message  # not the whole config dict


def test_cross_field_error_under_a_distilljob_spec_is_prefixed_with_the_spec_path():
    from pydantic import BaseModel, ValidationError

    from distill_trainer.config import DistillConfig, format_validation_error

    class Spec(BaseModel):
        distill: DistillConfig

    with pytest.raises(ValidationError) as error:
        Spec(distill=with_changes(teacher={"strategy_args": {"tp_size": 2}}))
    assert format_validation_error(error.value, "spec").splitlines()[1].startswith(
        "  distill.teacher.strategy_args.tp_size: must equal student.strategy_args.tp_size (1)")


def test_metrics_endpoint_is_off_and_loopback_by_default():
    config = config_from_dict(BASE)
    assert (config.metrics_port, config.metrics_bind_address, config.metrics_linger_seconds) == (0, "127.0.0.1", 0)
    with pytest.raises(ConfigError, match=r"metrics_port: .*65535"):
        config_from_dict(with_changes(metrics_port=70000))


def test_device_mapping_accepts_the_range_expression_of_the_original_configs():
    data = with_changes(student={"data_args": {"file_name": "x"}, "device_mapping": "list(range(0,1))"},
                        teacher={"strategy_args": {"strategy_name": "torch_infer"}, "device_mapping": [0]})
    assert config_from_dict(data).student.device_mapping == [0]


def test_hydra_overrides_apply_and_are_validated(tmp_path):
    import yaml

    (tmp_path / "run.yaml").write_text(yaml.safe_dump(BASE))
    config = compose_config(tmp_path, "run", ["kd_objective=reverse_kl", "student.training_args.learning_rate=0.01"])
    assert config.kd_objective == "reverse_kl"
    assert config.student.training_args.learning_rate == 0.01
    with pytest.raises(ConfigError, match="kd_temperature"):
        compose_config(tmp_path, "run.yaml", ["+kd_temperature=-2"])


def test_missing_config_file_names_the_path(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        compose_config(tmp_path, "nope")


def test_cli_reports_config_errors_and_exits_2(tmp_path, capsys):
    import yaml

    (tmp_path / "run.yaml").write_text(yaml.safe_dump(with_changes(distill_loss_weight=3)))
    assert main(["train", str(tmp_path / "run.yaml")]) == 2
    err = capsys.readouterr().err
    assert "distill_loss_weight" in err and "run.yaml" in err


@pytest.mark.parametrize(
    "text, expected",
    [
        ("max_steps: [1\nseed: 2\n",
         r"run\.yaml:2:5: invalid YAML: expected ',' or '\]', but got ':' \(while parsing a flow sequence at line 1, "
         r"column 12\)"),
        ("max_steps: 1\n  seed: 2\n", r"run\.yaml:2:7: invalid YAML: mapping values are not allowed here"),
        ('exp_name: "unclosed\n', r"run\.yaml:2:1: invalid YAML: found unexpected end of stream"),
        ("max_steps: 1\nseed: 1\nseed: 2\n", r"run\.yaml:3:1: invalid YAML: found duplicate key seed"),
        ("- max_steps: 1\n- seed: 2\n", r"run\.yaml: expected a mapping of config fields .* the file holds a list"),
        ("max_steps\n", r"run\.yaml: expected a mapping of config fields .* the file holds a plain string"),
        ("42\n", r"run\.yaml: expected a mapping of config fields .* the file holds a single int value"),
    ],
    ids=["unclosed-bracket", "bad-indent", "unclosed-quote", "duplicate-key", "list", "plain-string", "number"],
)
def test_bad_yaml_names_file_line_and_column(tmp_path, text, expected):
    (tmp_path / "run.yaml").write_text(text)
    with pytest.raises(ConfigError, match=expected):
        compose_config(tmp_path, "run")


def test_yaml_error_in_a_file_of_the_defaults_list_names_that_file(tmp_path):
    import yaml

    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"defaults": ["_self_", {"optim": "fast"}], **BASE}))
    (tmp_path / "optim").mkdir()
    (tmp_path / "optim" / "fast.yaml").write_text("# @package _global_\nkd_temperature: [2\n")
    with pytest.raises(ConfigError, match=r"optim/fast\.yaml:3:1: invalid YAML"):
        compose_config(tmp_path, "run")


def test_yaml_with_a_utf8_bom_is_read(tmp_path):
    import yaml

    (tmp_path / "run.yaml").write_bytes(b"\xef\xbb\xbf" + yaml.safe_dump(BASE).encode())
    assert compose_config(tmp_path, "run").max_steps == 10


def test_yaml_that_is_not_utf8_says_so_and_how_to_convert(tmp_path):
    (tmp_path / "run.yaml").write_bytes("exp_name: caf\u00e9\nmax_steps: 1\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"run\.yaml:1: the file is not UTF-8 \(byte 0xe9 at byte offset 13, "
                                          r"column 14\).*iconv -f latin1 -t utf-8"):
        compose_config(tmp_path, "run")


def run_launcher(args, cwd):
    import subprocess
    import sys

    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=cwd)


@pytest.mark.parametrize("launcher", ["kubedistill train", "start_distill_pipeline.py"])
def test_launchers_report_bad_yaml_in_one_line_with_exit_status_2(tmp_path, launcher):
    from pathlib import Path

    (tmp_path / "run.yaml").write_text("max_steps: 1\n  seed: 2\n")
    root = Path(__file__).resolve().parents[2]
    if launcher == "kubedistill train":
        args = ["-m", "distill_trainer.cli", "train", str(tmp_path / "run.yaml")]
    else:
        args = [str(root / "examples" / "start_distill_pipeline.py"), "--config_path", str(tmp_path),
                "--config_name", "run"]
    done = run_launcher(args, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'run.yaml'}:2:7: invalid YAML: mapping values are not allowed here; check the "
        "indentation, quotes and brackets"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]  # nothing written


def test_topk_tail_is_on_by_default():
    assert config_from_dict(BASE).topk_tail is True


def test_pure_topk_kd_without_the_tail_warns_at_startup_naming_the_fields():
    from distill_trainer.config import startup_warnings

    risky = config_from_dict(with_changes(distill_loss_weight=1.0, logits_topk=64, topk_tail=False))
    (warning,) = startup_warnings(risky, has_chat_template=True)
    for field in ("distill_loss_weight=1", "logits_topk=64", "topk_tail=false", "train/student_loss"):
        assert field in warning
    for safe in (
        with_changes(distill_loss_weight=1.0, logits_topk=64),  # the tail is on
        with_changes(distill_loss_weight=0.5, logits_topk=64, topk_tail=False),  # CE holds the rest
        with_changes(distill_loss_weight=1.0, logits_topk=0, topk_tail=False),  # full vocabulary
    ):
        assert startup_warnings(config_from_dict(safe), has_chat_template=True) == []


@pytest.mark.parametrize(
    "student, teacher, weight, expected",
    [
        (None, None, 0.5, (0.45, 0.45)),  # unset: half of 0.9 each
        (None, None, 0.0, (0.9, None)),  # no teacher: the student has the GPU
        (0.6, None, 0.5, (0.6, 0.3)),  # one side set: the other gets 0.9 minus it
        (None, 0.25, 0.5, (0.65, 0.25)),
        (0.5, 0.5, 0.5, (0.5, 0.5)),
    ],
)
def test_each_side_gets_a_documented_share_of_the_gpu(student, teacher, weight, expected):
    from distill_trainer.config import gpu_memory_fraction

    data = with_changes(distill_loss_weight=weight,
                        student={**BASE["student"], "gpu_memory_fraction": student},
                        teacher={"gpu_memory_fraction": teacher})
    config = config_from_dict(data)
    assert gpu_memory_fraction(config, "student") == pytest.approx(expected[0])
    if expected[1] is not None:
        assert gpu_memory_fraction(config, "teacher") == pytest.approx(expected[1])


def test_shares_of_one_gpu_over_the_whole_are_refused_naming_the_field():
    with pytest.raises(ConfigError) as error:
        config_from_dict(with_changes(student={**BASE["student"], "gpu_memory_fraction": 0.6},
                                      teacher={"gpu_memory_fraction": 0.5}), source="my.yaml")
    assert str(error.value).splitlines()[1] == ("  teacher.gpu_memory_fraction: teacher 0.5 + student 0.6 is more than "
                                               "the whole GPU they share; lower it (got 0.5)")
    with pytest.raises(ConfigError, match="student.gpu_memory_fraction"):
        config_from_dict(with_changes(student={**BASE["student"], "gpu_memory_fraction": 1.0}))


def test_sequence_parallel_ranks_get_one_cuda_connection_unless_the_user_sets_it():
    from distill_trainer.config import worker_env

    config = config_from_dict(with_changes(system_envs={"NCCL_DEBUG": "WARN"}))
    assert worker_env(config, "student") == {"NCCL_DEBUG": "WARN"}
    # (set past validation: this config's torch strategies refuse sequence_parallel; worker_env reads the field only)
    config.student.strategy_args.sequence_parallel = True
    assert worker_env(config, "student") == {"NCCL_DEBUG": "WARN", "CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in worker_env(config, "teacher")
    config.student.system_envs = {"CUDA_DEVICE_MAX_CONNECTIONS": "8"}
    assert worker_env(config, "student")["CUDA_DEVICE_MAX_CONNECTIONS"] == "8"


# --- sequence packing ----------------------------------------------------------------------------------------------

PACKING_MEGATRON = {"data_args": {"file_name": "x"}, "strategy_args": {"strategy_name": "megatron_train"}}


def test_sequence_packing_is_one_setting_of_both_sides():
    both = config_from_dict(with_changes(student={**BASE["student"], "use_sequence_packing": True},
                                         teacher={"use_sequence_packing": True}))
    assert both.student.use_sequence_packing and both.teacher.use_sequence_packing
    # A side left unset follows the other (the teacher runs the student's micro-batches).
    for changes in ({"student": {**BASE["student"], "use_sequence_packing": True}},
                    {"teacher": {"use_sequence_packing": True}}):
        config = config_from_dict(with_changes(**changes))
        assert config.student.use_sequence_packing and config.teacher.use_sequence_packing
        assert config_from_dict(dump_config(config)) == config
    with pytest.raises(ConfigError) as error:
        config_from_dict(with_changes(student={**BASE["student"], "use_sequence_packing": False},
                                      teacher={"use_sequence_packing": True}), source="my.yaml")
    assert str(error.value).splitlines()[1] == (
        "  student.use_sequence_packing: differs from teacher.use_sequence_packing=true: the teacher runs the "
        "student's micro-batches, so both sides see the same packing; set both the same (or leave one unset) "
        "(got False)")


@pytest.mark.parametrize("te_installed", [False, True])
def test_sequence_packing_with_megatron_is_refused_naming_each_side(monkeypatch, te_installed):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (object() if te_installed else None) if name == "transformer_engine"
                        else real(name, *a))
    with pytest.raises(ConfigError) as error:
        config_from_dict(with_changes(student={**PACKING_MEGATRON, "use_sequence_packing": True},
                                      teacher={"strategy_args": {"strategy_name": "megatron_infer"},
                                               "use_sequence_packing": True}), source="my.yaml")
    lines = str(error.value).splitlines()[1:]
    assert [line.split(":")[0].strip() for line in lines] == ["student.use_sequence_packing",
                                                              "teacher.use_sequence_packing"]
    why = ("TransformerEngine is installed, but the megatron strategies do not pass packed_seq_params to it yet"
           if te_installed else "TransformerEngine is not installed here, and Megatron's local attention would let "
           "the records of a packed row attend to each other")
    assert lines[0].startswith("  student.use_sequence_packing: Megatron packs sequences only with TransformerEngine's "
                               "attention (packed_seq_params / THD); " + why)
    assert lines[0].endswith("; set false (micro-batches are then padded) or use torch_train / torch_infer (got True)")


def test_sequence_packing_needs_a_transformers_that_keeps_packed_records_apart(monkeypatch):
    import transformers.masking_utils

    from distill_trainer.config import check_runtime_support

    config = config_from_dict(with_changes(student={**BASE["student"], "use_sequence_packing": True}))
    check_runtime_support(config)  # the installed transformers does
    monkeypatch.delattr(transformers.masking_utils, "find_packed_sequence_indices")
    with pytest.raises(ConfigError, match=r"^student\.use_sequence_packing needs a transformers that keeps packed "
                                          r"records apart for sdpa and eager attention"):
        check_runtime_support(config)
