"""Names that cross the trainer/operator boundary are defined once (distill_trainer.shared_names) and both sides
use those very objects."""

import ast
import typing
from datetime import datetime, timezone
from pathlib import Path

import pytest

from distill_trainer import shared_names

ROOT = Path(__file__).resolve().parents[2]


def test_both_sides_use_the_shared_definitions():
    from distill_operator import access, children, render, resources
    from distill_trainer import k8s_progress, losses, prometheus_sink, run_identity, workers
    from distill_trainer.config import KdObjective

    assert (resources.GROUP, resources.VERSION, resources.KIND, resources.PLURAL) == (
        shared_names.GROUP, shared_names.VERSION, shared_names.KIND, shared_names.PLURAL)
    assert resources.API_VERSION == "kubedistill.io/v1alpha1" == shared_names.API_VERSION
    for operator_name, trainer_name, shared in [
        (render.ENV_JOB_NAME, k8s_progress.ENV_NAME, shared_names.ENV_JOB_NAME),
        (render.ENV_JOB_NAMESPACE, k8s_progress.ENV_NAMESPACE, shared_names.ENV_JOB_NAMESPACE),
        (render.ENV_JOB_UID, run_identity.ENV_JOB_UID, shared_names.ENV_JOB_UID),
        (render.ENV_PROGRESS_CONFIGMAP, k8s_progress.ENV_PROGRESS_CONFIGMAP, shared_names.ENV_PROGRESS_CONFIGMAP),
        (access.PROGRESS_KEY, k8s_progress.PROGRESS_KEY, shared_names.PROGRESS_KEY),
    ]:
        assert operator_name is trainer_name is shared
    assert render.MANAGER == shared_names.OPERATOR_FIELD_MANAGER != k8s_progress.FIELD_MANAGER
    assert k8s_progress.FIELD_MANAGER == shared_names.TRAINER_FIELD_MANAGER
    assert render.LABEL_JOB.startswith(shared_names.GROUP + "/")
    assert children.FROZEN_SPEC_ANNOTATION.startswith(shared_names.GROUP + "/")
    assert losses.KD_OBJECTIVES is shared_names.KD_OBJECTIVES
    assert typing.get_args(KdObjective) == shared_names.KD_OBJECTIVES  # config accepts exactly the losses' names
    assert prometheus_sink.LABELS is shared_names.METRIC_LABELS
    assert prometheus_sink.NONFINITE_STEPS is shared_names.TRAINER_NONFINITE_STEPS
    assert workers.ENV_NUM_THREADS is shared_names.ENV_NUM_THREADS


def test_the_operator_writes_and_reads_timestamps_in_the_shared_format():
    from distill_operator import conditions

    moment = datetime(2026, 1, 2, 3, 4, 5, 678, tzinfo=timezone.utc)
    text = shared_names.format_timestamp(moment)
    assert text == "2026-01-02T03:04:05Z" == conditions.format_time(moment)
    assert conditions.parse_time(text) == shared_names.parse_timestamp(text) == moment.replace(microsecond=0)


def _string_literals(path: Path):
    """String constants of a module that are not docstrings."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.lineno, node.value


@pytest.mark.parametrize("name", [
    shared_names.GROUP, shared_names.VERSION, shared_names.PLURAL, shared_names.ENV_JOB_NAME,
    shared_names.ENV_JOB_NAMESPACE, shared_names.ENV_JOB_UID, shared_names.ENV_PROGRESS_CONFIGMAP,
    shared_names.PROGRESS_KEY, shared_names.TRAINER_FIELD_MANAGER, shared_names.ENV_NUM_THREADS,
    shared_names.TRAINER_LOSS,
])
def test_no_other_module_spells_a_shared_name(name):
    spelled = [
        f"{path.relative_to(ROOT)}:{line}"
        for folder in ("trainer", "operator")
        for path in sorted((ROOT / folder).rglob("*.py"))
        if path.name != "shared_names.py"
        for line, text in _string_literals(path)
        if text == name or text.startswith(name + "/")
    ]
    assert spelled == []
