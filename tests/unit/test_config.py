"""Config validation: every mistake names the field path and the bad value."""

import pytest

from distill_trainer.cli import main
from distill_trainer.config import ConfigError, compose_config, config_from_dict

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


def test_teacher_and_student_must_share_device_layout():
    data = with_changes(teacher={"strategy_args": {"strategy_name": "torch_infer"}, "device_mapping": [0]})
    with pytest.raises(ConfigError, match="teacher.device_mapping"):
        config_from_dict(data)


def test_student_must_use_a_train_strategy():
    data = with_changes(student={"data_args": {"file_name": "x"}, "strategy_args": {"strategy_name": "torch_infer"}})
    with pytest.raises(ConfigError, match="student.strategy_args.strategy_name must be a \\*_train"):
        config_from_dict(data)


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
