"""render.py and resources.py for the teacher cache on Kubernetes: spec.mode cacheTeacher, spec.teacherCacheFrom."""

from __future__ import annotations

import shlex

import pytest
import yaml
from pydantic import ValidationError

from distill_operator import render
from distill_operator.render import JobRef
from distill_operator.resources import IMMUTABLE_SPEC_FIELDS, parse_spec
from distill_trainer.config import config_from_dict, format_validation_error

CACHE_JOB = JobRef(name="teacher-cache", namespace="ml", uid="0123456789abcdef")
TRAIN_JOB = JobRef(name="student", namespace="ml", uid="fedcba9876543210")


def spec_dict(cache_dir="/checkpoints/cache/qwen", mode=None, cache_from=None, **overrides):
    spec = {
        "image": "registry.example/kubedistill:0.1",
        "distill": {
            "max_steps": 100,
            "student_pretrain": "/models/student",
            "teacher_pretrain": "/models/teacher",
            "student": {"data_args": {"file_name": "/data/train.jsonl"}},
        },
        "storage": {"claimName": "ckpt"},
    }
    if cache_dir is not None:
        spec["distill"]["teacher_cache_dir"] = cache_dir
    if mode is not None:
        spec["mode"] = mode
    if cache_from is not None:
        spec["teacherCacheFrom"] = cache_from
    spec.update(overrides)
    return spec


def refusal(spec: dict) -> str:
    with pytest.raises(ValidationError) as error:
        parse_spec(spec)
    return format_validation_error(error.value, "spec")


def test_cache_teacher_mode_runs_cache_teacher_with_the_same_config_in_both_launchers():
    spec = parse_spec(spec_dict(mode="cacheTeacher"))
    rayjob = render.render_rayjob(spec, CACHE_JOB, 0, resume=False)
    assert shlex.split(rayjob["spec"]["entrypoint"]) == ["kubedistill", "cache-teacher", render.CONFIG_PATH]
    # A retry continues the interrupted write by itself: no resume_from_checkpoint override.
    retry = render.render_rayjob(spec, CACHE_JOB, 1, resume=True)
    assert shlex.split(retry["spec"]["entrypoint"]) == ["kubedistill", "cache-teacher", render.CONFIG_PATH]
    submission = render.render_submission(spec, CACHE_JOB, 0, resume=True)
    assert shlex.split(submission["entrypoint"]) == ["kubedistill", "cache-teacher", render.CONFIG_FILE]
    config = config_from_dict(yaml.safe_load(render.render_configmap(spec, CACHE_JOB)["data"]["distill.yaml"]))
    assert config.teacher_cache_dir == "/checkpoints/cache/qwen"


def test_train_mode_is_the_default_and_unchanged():
    spec = parse_spec(spec_dict(cache_dir=None))
    assert spec.mode == "train" and spec.teacher_cache_from is None
    assert shlex.split(render.render_rayjob(spec, TRAIN_JOB, 1, resume=True)["spec"]["entrypoint"]) == [
        "kubedistill", "train", render.CONFIG_PATH, "resume_from_checkpoint=true"]
    assert render.entrypoint_args() == ["kubedistill", "train", render.CONFIG_PATH]


def test_relative_cache_dir_lies_under_the_cache_jobs_directory_for_both_jobs():
    cache = parse_spec(spec_dict(cache_dir="cache", mode="cacheTeacher"))
    train = parse_spec(spec_dict(cache_dir="cache", cache_from="teacher-cache"))
    assert render.teacher_cache_path(cache, CACHE_JOB) == "/checkpoints/ml/teacher-cache/cache"
    assert render.teacher_cache_path(train, TRAIN_JOB) == "/checkpoints/ml/teacher-cache/cache"
    assert render.trainer_config(train, TRAIN_JOB)["output_dir"] == "/checkpoints/ml/student/output"
    assert render.teacher_cache_location(cache, CACHE_JOB) == render.teacher_cache_location(train, TRAIN_JOB) == (
        "ckpt", "ml/teacher-cache/cache")
    # Without teacherCacheFrom a relative cache dir is the job's own, like output_dir.
    alone = parse_spec(spec_dict(cache_dir="cache"))
    assert render.teacher_cache_path(alone, TRAIN_JOB) == "/checkpoints/ml/student/cache"


def test_cache_location_does_not_depend_on_the_mount_path():
    a = parse_spec(spec_dict(cache_dir="/data/c", mode="cacheTeacher", storage={"claimName": "ckpt", "mountPath": "/data"}))
    b = parse_spec(spec_dict(cache_dir="/checkpoints/c", cache_from="teacher-cache"))
    assert render.teacher_cache_location(a, CACHE_JOB) == render.teacher_cache_location(b, TRAIN_JOB) == ("ckpt", "c")


def test_ray_address_working_dir_resolves_a_relative_cache_dir():
    spec = parse_spec(spec_dict(cache_dir="runs/cache", mode="cacheTeacher", storage=None,
                                launcher={"type": "RayAddress", "rayAddress": "http://ray:8265",
                                          "workingDir": "/repo"}))
    assert render.teacher_cache_path(spec, CACHE_JOB) == "/repo/runs/cache"
    assert render.teacher_cache_location(spec, CACHE_JOB) == (None, "/repo/runs/cache")


@pytest.mark.parametrize("spec, field, words", [
    (spec_dict(cache_dir=None, mode="cacheTeacher"), "spec.distill.teacher_cache_dir", "required with spec.mode"),
    (spec_dict(cache_dir=None, cache_from="teacher-cache"), "spec.distill.teacher_cache_dir",
     "required with spec.teacherCacheFrom"),
    (spec_dict(mode="cacheTeacher", cache_from="other"), "spec.teacherCacheFrom", "for train jobs"),
    (spec_dict(mode="cacheTeacher", storage=None), "spec.storage", "required with spec.mode cacheTeacher"),
    (spec_dict(cache_from="teacher-cache", storage=None), "spec.storage", "required with spec.teacherCacheFrom"),
    (spec_dict(cache_dir="/elsewhere/cache", mode="cacheTeacher"), "spec.distill.teacher_cache_dir",
     "must lie on spec.storage"),
    (spec_dict(cache_dir="/checkpointsX/cache", cache_from="teacher-cache"), "spec.distill.teacher_cache_dir",
     "must lie on spec.storage"),
    (spec_dict(cache_dir="../../../up", mode="cacheTeacher"), "spec.distill.teacher_cache_dir",
     "must lie on spec.storage"),
    (spec_dict(mode="cacheTeachers"), "spec.mode", "'train' or 'cacheTeacher'"),
    (spec_dict(cache_from="Not_A_Name"), "spec.teacherCacheFrom", "pattern"),
])
def test_teacher_cache_specs_are_refused_naming_the_field(spec, field, words):
    message = refusal(spec)  # what status.message of the Failed (InvalidSpec) job shows, a line per problem
    assert f"  {field.removeprefix('spec.')}: " in message and words in message, message


def test_valid_teacher_cache_specs():
    parse_spec(spec_dict(cache_dir="../../shared/cache", mode="cacheTeacher"))  # /checkpoints/shared/cache
    parse_spec(spec_dict(cache_dir="/checkpoints/cache", cache_from="teacher-cache"))
    # RayAddress: a cluster's own storage, none of ours.
    parse_spec(spec_dict(mode="cacheTeacher", storage=None, launcher={"type": "RayAddress",
                                                                        "rayAddress": "http://ray:8265"}))
    # A train job may read a cache without the operator's gate (no teacherCacheFrom): the trainer checks it.
    parse_spec(spec_dict(cache_dir="/anywhere/cache"))


def test_mode_and_teacher_cache_from_are_immutable():
    assert {"mode", "teacherCacheFrom"} <= set(IMMUTABLE_SPEC_FIELDS)


def test_crd_has_the_fields_and_cel_rules():
    from distill_operator import crdgen

    schema = crdgen.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert schema["properties"]["mode"]["enum"] == ["train", "cacheTeacher"]
    assert "teacherCacheFrom" in schema["properties"]
    rules = " ".join(r["rule"] for r in schema["x-kubernetes-validations"])
    assert "self.mode == 'cacheTeacher'" in rules and "has(self.teacherCacheFrom)" in rules
