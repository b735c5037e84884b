"""conditions.py for spec.teacherCacheFrom: the gate (may this train job start?) and what decide does with it."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from distill_operator.conditions import (
    TEACHER_CACHE_FAILED,
    TEACHER_CACHE_MISMATCH,
    TEACHER_CACHE_READY,
    WAITING_FOR_TEACHER_CACHE,
    CacheGate,
    Observation,
    decide,
    get_condition,
    teacher_cache_gate,
    timer_due,
)
from distill_operator.render import JobRef
from distill_operator.resources import parse_spec

T0 = datetime(2025, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
JOB = JobRef("student", "ml", "uid-student")
SUCCEEDED = Observation("Succeeded", "RayJobSucceeded", "RayJob teacher-cache-0 succeeded")
FAILED = Observation("Failed", "RayJobFailed", "RayJob teacher-cache-0 failed")


def raw(cache_dir="/checkpoints/cache", mode=None, cache_from=None, claim="ckpt", **extra):
    spec = {
        "image": "img",
        "distill": {"max_steps": 10, "student_pretrain": "s", "teacher_pretrain": "t",
                    "student": {"data_args": {"file_name": "d.jsonl"}}, "teacher_cache_dir": cache_dir},
        "storage": {"claimName": claim},
        "runPolicy": {"backoffLimit": 1},
    }
    if mode:
        spec["mode"] = mode
    if cache_from:
        spec["teacherCacheFrom"] = cache_from
    spec.update(extra)
    return spec


def cache_job(state=None, reason=None, message=None, **spec):
    body = {"metadata": {"name": "teacher-cache", "namespace": "ml", "uid": "uid-cache"},
            "spec": raw(mode="cacheTeacher", **spec)}
    if state:
        body["status"] = {"state": state, "reason": reason, "message": message}
    return body


TRAIN = parse_spec(raw(cache_from="teacher-cache"))


def gate(cache):
    return teacher_cache_gate(TRAIN, JOB, cache)


def test_missing_cache_job_waits_and_says_so():
    g = gate(None)
    assert (g.start, g.refused, g.reason) == (False, False, WAITING_FOR_TEACHER_CACHE)
    assert "teacher-cache" in g.message and "does not exist" in g.message and "/checkpoints/cache" in g.message


@pytest.mark.parametrize("state, reason", [(None, None), ("Pending", "RayJobCreated"), ("Running", "RayJobRunning"),
                                           ("Queued", "WaitingForWorkload"), ("Restarting", "RayJobFailed"),
                                           ("Suspended", "Suspended")])
def test_unfinished_cache_job_waits_naming_its_state(state, reason):
    g = gate(cache_job(state, reason))
    assert (g.start, g.refused, g.reason) == (False, False, WAITING_FOR_TEACHER_CACHE)
    assert f"it is {state} ({reason})" in g.message if state else "not started yet" in g.message


def test_succeeded_cache_job_lets_it_start():
    assert gate(cache_job("Succeeded", "Succeeded")) == CacheGate(
        True, TEACHER_CACHE_READY, "DistillJob teacher-cache has written the teacher cache /checkpoints/cache")


def test_failed_cache_job_blocks_with_its_reason_and_what_to_do():
    g = gate(cache_job("Failed", "BackoffLimitExceeded", "RayJob teacher-cache-1 failed " + "x" * 1000))
    assert (g.start, g.refused, g.reason) == (False, False, TEACHER_CACHE_FAILED)
    assert "BackoffLimitExceeded" in g.message and "delete and re-create teacher-cache" in g.message
    assert len(g.message) < 600  # the cache job's own message is cut


@pytest.mark.parametrize("cache, words", [
    ({**cache_job("Succeeded"), "spec": raw()}, "spec.mode is train, not cacheTeacher"),
    (cache_job("Running", claim="other"), "spec.storage.claimName 'ckpt' differs from 'other'"),
    (cache_job(cache_dir="/checkpoints/other"), "teacher_cache_dir is /checkpoints/cache here but DistillJob "
                                                "teacher-cache (spec.teacherCacheFrom) writes its cache to "
                                                "/checkpoints/other"),
])
def test_a_mismatched_cache_job_refuses_at_once(cache, words):
    g = gate(cache)
    assert (g.start, g.refused, g.reason) == (False, True, TEACHER_CACHE_MISMATCH)
    assert words in g.message, g.message


def test_relative_dirs_match_through_the_cache_jobs_directory():
    train = parse_spec(raw(cache_dir="cache", cache_from="teacher-cache"))
    assert teacher_cache_gate(train, JOB, cache_job("Succeeded", cache_dir="cache")).start
    assert teacher_cache_gate(train, JOB, cache_job("Succeeded", cache_dir="/checkpoints/ml/teacher-cache/cache")).start
    assert teacher_cache_gate(train, JOB, cache_job("Succeeded", cache_dir="/checkpoints/ml/student/cache")).refused


def test_an_invalid_cache_job_spec_is_judged_by_its_state():
    broken = cache_job("Failed", "InvalidSpec", "bad")
    broken["spec"]["distill"]["max_steps"] = "ten"
    assert gate(broken).reason == TEACHER_CACHE_FAILED


def _decide(status, gate_, observation=None, spec=TRAIN, now=T0):
    return decide(spec=spec, spec_error=None, status=status, generation=1, observation=observation, now=now,
                  cache_gate=gate_, teacher_cache_path="/checkpoints/cache")


def test_a_waiting_job_launches_nothing_and_shows_the_reason_then_launches_when_the_cache_is_ready():
    d = _decide({}, gate(None))
    assert d.action == "none" and d.status["state"] == "Pending"
    assert d.status["reason"] == WAITING_FOR_TEACHER_CACHE and "does not exist" in d.status["message"]
    created = get_condition(d.status["conditions"], "Created")
    assert (created["status"], created["reason"]) == ("False", WAITING_FOR_TEACHER_CACHE)
    assert [e[:2] for e in d.events] == [("Normal", WAITING_FOR_TEACHER_CACHE)]
    assert "attempt" not in d.status and "startTime" not in d.status  # deadlines count from the launch

    again = _decide(d.status, gate(cache_job("Running", "RayJobRunning")), now=T0 + timedelta(seconds=5))
    assert again.action == "none" and again.events == []  # same reason: no second Event
    assert "it is Running (RayJobRunning)" in again.status["message"]

    failed = _decide(again.status, gate(cache_job("Failed", "BackoffLimitExceeded", "boom")))
    assert failed.action == "none" and failed.status["state"] == "Pending"
    assert failed.status["reason"] == TEACHER_CACHE_FAILED
    assert [e[:2] for e in failed.events] == [("Warning", TEACHER_CACHE_FAILED)]

    ready = _decide(failed.status, gate(cache_job("Succeeded", "Succeeded")), now=T0 + timedelta(seconds=9))
    assert (ready.action, ready.attempt, ready.resume) == ("launch", 0, False)
    assert get_condition(ready.status["conditions"], "Created")["status"] == "True"
    assert ready.status["startTime"] == "2025-01-01T12:00:09Z"


def test_a_mismatch_fails_the_job():
    d = _decide({}, gate(cache_job(claim="other")))
    assert d.action == "none" and d.status["state"] == "Failed" and d.status["reason"] == TEACHER_CACHE_MISMATCH
    assert get_condition(d.status["conditions"], "Failed")["status"] == "True"
    assert [e[:2] for e in d.events] == [("Warning", TEACHER_CACHE_MISMATCH)]


def test_suspended_before_the_first_launch_then_resumed_goes_back_to_waiting():
    suspended = decide(spec=parse_spec(raw(cache_from="teacher-cache", runPolicy={"suspend": True})), spec_error=None,
                       status={}, generation=1, observation=None, now=T0, cache_gate=gate(None))
    assert suspended.status["state"] == "Suspended" and suspended.action == "none"
    resumed = _decide(suspended.status, gate(cache_job("Running", "RayJobRunning")))
    assert resumed.action == "none" and resumed.status["reason"] == WAITING_FOR_TEACHER_CACHE
    assert get_condition(resumed.status["conditions"], "Suspended")["status"] == "False"


def test_the_gate_only_holds_back_the_first_launch():
    d = _decide({}, gate(cache_job("Succeeded")))
    running = _decide(d.status, None, Observation("Running", "RayJobRunning", "running"))
    assert running.status["state"] == "Running"  # later reconciles pass no gate (runtime: attempt is set)


def test_cache_job_success_and_retry_messages_speak_of_the_cache():
    spec = parse_spec(raw(mode="cacheTeacher"))
    first = decide(spec=spec, spec_error=None, status={}, generation=1, observation=None, now=T0)
    retry = decide(spec=spec, spec_error=None, status=first.status, generation=1, observation=FAILED, now=T0)
    assert retry.action == "launch" and "continues the teacher cache write" in retry.status["message"]
    done = decide(spec=spec, spec_error=None, status=retry.status, generation=1, observation=SUCCEEDED, now=T0,
                  teacher_cache_path="/checkpoints/cache")
    assert done.status["state"] == "Succeeded"
    assert done.status["message"] == "RayJob teacher-cache-0 succeeded: the teacher cache /checkpoints/cache is complete"


def test_waiting_jobs_are_polled_by_the_timer_until_launched():
    spec = raw(cache_from="teacher-cache")
    waiting = {"state": "Pending", "reason": WAITING_FOR_TEACHER_CACHE}
    assert timer_due(spec, waiting, T0)
    assert not timer_due(spec, {**waiting, "attempt": 0}, T0)
    assert not timer_due(raw(), {"state": "Pending", "attempt": 0}, T0)
    assert not timer_due(spec, {"state": "Failed", "reason": TEACHER_CACHE_MISMATCH}, T0)
