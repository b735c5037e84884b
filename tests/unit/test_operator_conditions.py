"""conditions.py: RayJob status -> Observation, condition bookkeeping, and the run policy, without a cluster."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from distill_operator.conditions import (
    MISSING,
    Observation,
    changed_fields,
    decide,
    format_time,
    get_condition,
    launch_blocked,
    observe_rayjob,
    observe_submission,
    set_condition,
    spec_hashes,
    timer_due,
)
from distill_operator.resources import CONDITION_TYPES, IMMUTABLE_SPEC_FIELDS, parse_spec

T0 = datetime(2025, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
PENDING = Observation("Pending", "RayJobPending", "starting")
RUNNING = Observation("Running", "RayJobRunning", "running")
SUCCEEDED = Observation("Succeeded", "RayJobSucceeded", "succeeded")
FAILED = Observation("Failed", "RayJobFailed", "RayJob x-0 failed")


def spec(**run_policy):
    return parse_spec({
        "image": "img",
        "distill": {"max_steps": 10, "student_pretrain": "s", "teacher_pretrain": "t",
                    "student": {"data_args": {"file_name": "d.jsonl"}}},
        "runPolicy": run_policy,
    })


def rayjob(deployment="", job=""):
    return {"metadata": {"name": "x-0"}, "status": {"jobDeploymentStatus": deployment, "jobStatus": job}}


@pytest.mark.parametrize(
    "deployment, job, phase",
    [
        ("", "", "Pending"),
        ("Initializing", "", "Pending"),
        ("Running", "PENDING", "Pending"),
        ("Running", "RUNNING", "Running"),
        ("Complete", "SUCCEEDED", "Succeeded"),
        ("Running", "SUCCEEDED", "Succeeded"),
        ("Complete", "FAILED", "Failed"),
        ("Failed", "", "Failed"),
        ("ValidationFailed", "", "Failed"),
        ("Complete", "STOPPED", "Failed"),
        ("Complete", "", "Failed"),
    ],
)
def test_rayjob_status_maps_to_one_phase(deployment, job, phase):
    assert observe_rayjob(rayjob(deployment, job)).phase == phase


def test_missing_rayjob_and_ray_jobs_api_statuses_map_the_same_way():
    assert observe_rayjob(None) == MISSING
    assert [observe_submission(s, "id").phase for s in (None, "PENDING", "RUNNING", "SUCCEEDED", "FAILED", "STOPPED")] == [
        "Missing", "Pending", "Running", "Succeeded", "Failed", "Failed"]
    assert observe_submission("FAILED", "id").reason == observe_rayjob(rayjob("Failed", "FAILED")).reason


def test_a_failed_ray_job_is_summed_up_by_its_exit_code_and_the_trainers_error_line_not_its_log_tail():
    # What the Ray Jobs API reports for a driver that exited 3 after losing a node (shortened), and a bare one.
    message = ("Job entrypoint command failed with exit code 3, last available logs (truncated to 20,000 chars):\n"
               "test step 8/24 (33%) loss 2.0811 | 6695 tok/s\n"
               "(raylet) The node with node id: 6ec3 and address: 10.200.1.2 has been marked dead\n"
               "error: lost Ray node 10.200.1.2 (host-b, node 6ec3e19f), where student rank 1, teacher rank 1 ran, "
               "during step 9. The run stopped.\n")
    observed = observe_submission("FAILED", "kd-0", message)
    assert observed.message == ("Ray job kd-0 failed: Job entrypoint command failed with exit code 3 (error: lost Ray "
                                "node 10.200.1.2 (host-b, node 6ec3e19f), where student rank 1, teacher rank 1 ran, "
                                "during step 9. The run stopped.)")
    assert observe_submission("STOPPED", "kd-0", "").message == "Ray job kd-0 stopped"
    assert observe_submission("FAILED", "kd-0", "Job supervisor actor died").message == \
        "Ray job kd-0 failed: Job supervisor actor died"


def test_last_transition_time_changes_only_when_status_flips():
    conditions = set_condition([], "Running", False, "RayJobPending", "a", T0, 1)
    later = set_condition(conditions, "Running", False, "RayJobPending", "b", T0 + timedelta(minutes=1), 2)
    assert later[0]["lastTransitionTime"] == format_time(T0)
    assert later[0]["message"] == "b" and later[0]["observedGeneration"] == 2
    flipped = set_condition(later, "Running", True, "RayJobRunning", "c", T0 + timedelta(minutes=2), 2)
    assert flipped[0]["lastTransitionTime"] == format_time(T0 + timedelta(minutes=2))
    assert conditions[0]["message"] == "a"  # inputs are not mutated


class Job:
    """Drives decide() the way the handler does: apply the returned status, feed the next observation."""

    def __init__(self, spec_, now=T0):
        self.spec, self.status, self.now, self.generation = spec_, {}, now, 1
        self.decisions = []

    def step(self, observation=None, after=0.0, progress=None):
        self.now += timedelta(seconds=after)
        if progress is not None:
            self.status["progress"] = progress
        d = decide(spec=self.spec, spec_error=None, status=self.status, generation=self.generation,
                   observation=observation, now=self.now, run_name=lambda a: f"job-{a}")
        self.status = {**self.status, **d.status}
        self.decisions.append(d)
        return d

    def condition(self, type_):
        return get_condition(self.status["conditions"], type_)

    def true(self):
        return sorted(c["type"] for c in self.status["conditions"] if c["status"] == "True")


def test_create_run_succeed():
    job = Job(spec())
    d = job.step()
    assert (d.action, d.attempt, d.resume) == ("launch", 0, False)
    assert job.status["state"] == "Pending" and job.status["rayJobName"] == "job-0"
    assert job.true() == ["Created"] and job.condition("Running")["status"] == "False"
    assert d.events == [("Normal", "RayJobCreated", "job-0 created")]
    assert job.step(PENDING, after=1).action == "none"
    d = job.step(RUNNING, after=5)
    assert job.status["state"] == "Running" and job.true() == ["Created", "Running"]
    assert d.events[0][:2] == ("Normal", "RayJobRunning")
    d = job.step(SUCCEEDED, after=60, progress={"step": 10, "maxSteps": 10})
    assert job.status["state"] == "Succeeded" and job.true() == ["Created", "Succeeded"]
    assert "after 10 steps" in job.condition("Succeeded")["message"]
    assert job.status["completionTime"] == format_time(job.now)
    assert "progress" not in d.status  # the trainer's field is never written by the operator


def test_no_change_means_no_new_status_or_events():
    job = Job(spec())
    job.step()
    job.step(RUNNING, after=1)
    before = dict(job.status)
    d = job.step(RUNNING, after=30)
    assert d.action == "none" and d.events == [] and job.status == before


def test_failure_retries_with_resume_until_backoff_limit():
    job = Job(spec(backoffLimit=2))
    job.step()
    job.step(RUNNING)
    d = job.step(FAILED, progress={"step": 4, "lastCheckpoint": "/ckpt/checkpoint-4"})
    assert (d.action, d.attempt, d.resume) == ("launch", 1, True)
    assert job.status["state"] == "Restarting" and job.status["restarts"] == 1
    assert job.status["rayJobName"] == "job-1"
    restarting = job.condition("Restarting")
    assert restarting["status"] == "True" and restarting["reason"] == "RayJobFailed"
    assert "/ckpt/checkpoint-4" in restarting["message"] and "restart 1 of 2" in restarting["message"]
    assert d.events[0][:2] == ("Warning", "Restarting")
    job.step(PENDING)
    assert job.status["state"] == "Restarting"
    job.step(RUNNING)
    assert job.condition("Restarting")["status"] == "False" and job.status["state"] == "Running"
    assert job.step(MISSING).attempt == 2  # a RayJob deleted behind our back counts as a failure
    assert job.condition("Restarting")["reason"] == "RayJobDeleted"
    d = job.step(FAILED)
    assert d.action == "none" and job.status["state"] == "Failed"
    assert job.condition("Failed")["reason"] == "BackoffLimitExceeded"
    assert job.status["restarts"] == 2


def test_status_reason_is_the_reason_of_the_condition_that_set_the_state():
    job = Job(spec(backoffLimit=1, preRunningDeadlineSeconds=30))
    job.step()
    assert (job.status["state"], job.status["reason"]) == ("Pending", "RayJobCreated")
    job.step(PENDING, after=1)
    assert job.status["reason"] == "RayJobPending"
    job.step(RUNNING, after=1)
    assert (job.status["state"], job.status["reason"]) == ("Running", "RayJobRunning")
    job.step(MISSING, after=1)
    assert (job.status["state"], job.status["reason"]) == ("Restarting", "RayJobDeleted")
    job.step(PENDING, after=1)  # still restarting: the Restarting condition's reason, not the pending attempt's
    assert (job.status["state"], job.status["reason"]) == ("Restarting", "RayJobDeleted")
    job.step(PENDING, after=60)
    assert (job.status["state"], job.status["reason"]) == ("Failed", "PreRunningDeadlineExceeded")
    assert job.condition("Failed")["reason"] == job.status["reason"]


@pytest.mark.parametrize("run_policy, observations, reason, next_step", [
    ({"backoffLimit": 0}, [RUNNING, FAILED], "BackoffLimitExceeded", "then delete and re-create the DistillJob"),
    ({"activeDeadlineSeconds": 10}, [RUNNING, RUNNING], "DeadlineExceeded",
     "larger spec.runPolicy.activeDeadlineSeconds"),
    ({"preRunningDeadlineSeconds": 10}, [PENDING, PENDING], "PreRunningDeadlineExceeded",
     "Check why its pods do not start"),
])
def test_a_failed_jobs_message_says_what_to_do_next(run_policy, observations, reason, next_step):
    job = Job(spec(**run_policy))
    job.step()
    for observation in observations:
        job.step(observation, after=30)
    assert (job.status["state"], job.status["reason"]) == ("Failed", reason)
    assert next_step in job.status["message"] and job.condition("Failed")["message"] == job.status["message"]


def test_an_invalid_spec_says_fix_and_re_create_once():
    failed = decide(spec=None, spec_error="spec.distill.x: bad", status={}, generation=1, observation=None, now=T0)
    assert failed.status["reason"] == "InvalidSpec"
    assert failed.status["message"] == "spec.distill.x: bad. Fix the spec, then delete and re-create the DistillJob"
    gone = "spec.distill changed ... revert the edit, or delete and re-create the DistillJob"
    again = decide(spec=None, spec_error=gone, status={}, generation=1, observation=None, now=T0)
    assert again.status["message"] == gone


def test_terminal_states_stay_terminal_and_never_leave_an_attempt_running():
    job = Job(spec(backoffLimit=0))
    job.step()
    job.step(FAILED)
    assert job.status["state"] == "Failed"
    frozen = dict(job.status)
    for observation in (SUCCEEDED, MISSING):
        assert job.step(observation, after=100).action == "none"
    for observation in (RUNNING, PENDING):  # e.g. a status written behind the operator's back: stop the RayJob
        d = job.step(observation, after=100)
        assert (d.action, d.attempt) == ("stop", 0) and d.events == []
    assert job.status["state"] == "Failed" and job.status["conditions"] == frozen["conditions"]


def test_suspend_stops_the_attempt_and_resume_continues_from_checkpoint():
    job = Job(spec(suspend=False))
    job.step()
    job.step(RUNNING, after=10)
    job.spec, job.generation = spec(suspend=True), 2
    d = job.step(RUNNING, after=10)
    assert (d.action, d.attempt) == ("stop", 0)
    assert job.status["state"] == "Suspended" and job.true() == ["Created", "Suspended"]
    assert job.condition("Suspended")["observedGeneration"] == 2
    assert job.step(MISSING, after=1).action == "none"  # deleted: nothing more to do, no retry counted
    assert job.status.get("restarts") == 0
    job.spec, job.generation = spec(suspend=False), 3
    d = job.step(MISSING, after=100)
    assert (d.action, d.attempt, d.resume) == ("launch", 1, True)
    assert job.condition("Suspended")["reason"] == "Resumed" and job.status["startTime"] == format_time(job.now)
    assert ("Normal", "Resumed") in [e[:2] for e in d.events]
    job.step(RUNNING)
    assert job.status["state"] == "Running"


def test_suspended_before_first_launch_launches_nothing():
    job = Job(spec(suspend=True))
    assert job.step().action == "none" and job.status["state"] == "Suspended"
    job.spec = spec(suspend=False)
    d = job.step()
    assert (d.action, d.attempt, d.resume) == ("launch", 0, False)


def test_active_deadline_fails_and_stops_the_attempt():
    job = Job(spec(activeDeadlineSeconds=60))
    d = job.step()
    assert d.remaining_deadline == 60
    job.step(RUNNING, after=30)
    d = job.step(RUNNING, after=31)
    assert (d.action, d.attempt) == ("stop", 0)
    assert job.status["state"] == "Failed" and job.condition("Failed")["reason"] == "DeadlineExceeded"


def test_pre_running_deadline_fails_a_job_stuck_before_running():
    job = Job(spec(preRunningDeadlineSeconds=20))
    job.step()
    assert job.step(PENDING, after=19).action == "none"
    d = job.step(PENDING, after=2)
    assert d.action == "stop" and job.condition("Failed")["reason"] == "PreRunningDeadlineExceeded"
    job2 = Job(spec(preRunningDeadlineSeconds=20))
    job2.step()
    job2.step(RUNNING, after=5)
    assert job2.step(RUNNING, after=60).action == "none"  # running jobs are not affected


def test_ttl_after_finished_deletes_the_job():
    job = Job(spec(ttlSecondsAfterFinished=30))
    job.step()
    job.step(SUCCEEDED)
    assert job.step(after=29).action == "none"
    assert job.step(after=2).action == "delete_job"


def test_invalid_spec_fails_with_reason():
    d = decide(spec=None, spec_error="spec.distill.x: bad", status={}, generation=1, observation=None, now=T0)
    assert d.status["state"] == "Failed" and d.action == "none"
    failed = get_condition(d.status["conditions"], "Failed")
    assert failed["reason"] == "InvalidSpec" and "spec.distill.x" in failed["message"]


def test_invalid_spec_edit_while_running_fails_the_job_and_stops_its_attempt():
    job = Job(spec())
    job.step()
    job.step(RUNNING)
    job.generation = 2
    d = decide(spec=None, spec_error="spec.image: bad", status=job.status, generation=2, observation=RUNNING,
               now=T0 + timedelta(seconds=5))
    assert (d.action, d.attempt) == ("stop", 0)
    assert d.status["state"] == "Failed" and get_condition(d.status["conditions"], "Failed")["reason"] == "InvalidSpec"
    assert get_condition(d.status["conditions"], "Running")["status"] == "False"


RAW = {"image": "img", "distill": {"max_steps": 10, "seed": 1}, "storage": {"claimName": "ckpt"},
       "runPolicy": {"backoffLimit": 1}}


def test_spec_hashes_name_the_immutable_fields_that_changed():
    recorded = spec_hashes(RAW)
    assert set(recorded) == set(IMMUTABLE_SPEC_FIELDS) and recorded["launcher"] == "-"
    assert changed_fields(RAW, recorded) == []
    assert changed_fields({**RAW, "image": "other", "runPolicy": {"suspend": True}}, recorded) == []
    edited = {**RAW, "distill": {"max_steps": 10, "seed": 2}, "launcher": {"type": "KubeRay"}}
    assert changed_fields(edited, recorded) == ["spec.distill", "spec.launcher"]
    assert changed_fields({k: v for k, v in RAW.items() if k != "storage"}, recorded) == ["spec.storage"]
    # Key order is not a change (the hash is of canonical JSON).
    assert changed_fields({**RAW, "distill": {"seed": 1, "max_steps": 10}}, recorded) == []


def test_immutable_edit_is_ignored_with_a_condition_and_one_event_and_cleared_when_reverted():
    job = Job(spec())
    d = decide(spec=job.spec, spec_error=None, status={}, generation=1, observation=None, now=T0,
               hashes={"distill": "a", "storage": "b", "launcher": "-"})
    assert d.status["specHashes"] == {"distill": "a", "storage": "b", "launcher": "-"}
    job.status = d.status
    job.step(RUNNING)
    d = decide(spec=job.spec, spec_error=None, status=job.status, generation=2, observation=RUNNING, now=T0,
               hashes={"distill": "other"}, ignored_changes=["spec.distill"])
    assert d.action == "none" and d.status["state"] == "Running"  # the running attempt goes on, untouched
    assert d.status["specHashes"]["distill"] == "a"  # the record of the original never moves
    ignored = get_condition(d.status["conditions"], "SpecChangeIgnored")
    assert ignored["status"] == "True" and ignored["reason"] == "ImmutableFieldChanged"
    assert "spec.distill changed after creation" in ignored["message"] and ignored["observedGeneration"] == 2
    assert [e[:2] for e in d.events] == [("Warning", "ImmutableFieldChanged")]
    again = decide(spec=job.spec, spec_error=None, status=d.status, generation=2, observation=RUNNING, now=T0,
                   ignored_changes=["spec.distill"])
    assert again.events == []
    reverted = decide(spec=job.spec, spec_error=None, status=d.status, generation=3, observation=RUNNING, now=T0)
    assert get_condition(reverted.status["conditions"], "SpecChangeIgnored")["status"] == "False"


def test_launch_blocked_by_a_foreign_object_changes_nothing_but_a_conflict_condition():
    job = Job(spec(backoffLimit=2))
    job.step()
    job.step(RUNNING)
    before = dict(job.status)
    planned = decide(spec=job.spec, spec_error=None, status=before, generation=1, observation=FAILED, now=T0)
    assert planned.action == "launch" and planned.status["restarts"] == 1
    message = "RayJob ns/job-1 exists and is not owned by this DistillJob"
    blocked = launch_blocked(before, planned, message, T0, 1)
    assert blocked.action == "none"
    assert (blocked.status["attempt"], blocked.status["restarts"]) == (0, 0)  # no attempt, no restart counted
    conflict = get_condition(blocked.status["conditions"], "Conflict")
    assert conflict["status"] == "True" and conflict["reason"] == "NameConflict" and message in conflict["message"]
    assert blocked.status["state"] == "Restarting" and message in blocked.status["message"]
    assert [e[:2] for e in blocked.events] == [("Warning", "NameConflict")]
    assert launch_blocked(blocked.status, planned, message, T0, 1).events == []  # once, not every tick
    assert timer_due({}, blocked.status, T0)  # tried again on every tick
    # The object is gone: the same launch goes through and the condition clears.
    d = decide(spec=job.spec, spec_error=None, status=blocked.status, generation=1, observation=FAILED, now=T0)
    assert d.action == "launch" and d.status["restarts"] == 1
    assert get_condition(d.status["conditions"], "Conflict")["status"] == "False"


def test_reasons_are_camel_case_and_types_known():
    job = Job(spec(backoffLimit=1))
    for obs in (None, PENDING, RUNNING, FAILED, RUNNING, SUCCEEDED):
        job.step(obs)
    for c in job.status["conditions"]:
        assert c["type"] in CONDITION_TYPES
        assert c["reason"][:1].isupper() and " " not in c["reason"]


def test_timer_is_due_only_when_a_deadline_or_ttl_has_come():
    started = {"state": "Running", "startTime": format_time(T0), "attemptStartTime": format_time(T0)}
    at = lambda seconds: T0 + timedelta(seconds=seconds)  # noqa: E731
    assert not timer_due({}, started, at(10_000))
    assert not timer_due({"runPolicy": {"activeDeadlineSeconds": 60}}, started, at(59))
    assert timer_due({"runPolicy": {"activeDeadlineSeconds": 60}}, started, at(60))
    pending = {**started, "state": "Pending"}
    assert timer_due({"runPolicy": {"preRunningDeadlineSeconds": 5}}, pending, at(5))
    assert not timer_due({"runPolicy": {"preRunningDeadlineSeconds": 5}}, started, at(5))
    done = {"state": "Succeeded", "completionTime": format_time(T0)}
    assert not timer_due({"runPolicy": {"ttlSecondsAfterFinished": 30}}, done, at(29))
    assert timer_due({"runPolicy": {"ttlSecondsAfterFinished": 30}}, done, at(30))
    assert not timer_due({"runPolicy": {"activeDeadlineSeconds": 1}}, done, at(100))
    assert timer_due({"launcher": {"type": "RayAddress"}}, started, at(0))
    assert not timer_due({"runPolicy": {"suspend": True, "activeDeadlineSeconds": 1}}, started, at(100))


def test_only_new_generations_need_a_reconcile():
    from distill_operator.conditions import needs_reconcile

    assert needs_reconcile({"metadata": {"generation": 1}})
    assert not needs_reconcile({"metadata": {"generation": 1}, "status": {"state": "Running", "observedGeneration": 1}})
    assert needs_reconcile({"metadata": {"generation": 2}, "status": {"state": "Running", "observedGeneration": 1}})
