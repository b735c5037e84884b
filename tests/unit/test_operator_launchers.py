"""The Ray-address launcher against a stand-in Jobs API client: idempotent submit, status mapping, stop."""

from __future__ import annotations

import shlex
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from distill_operator import launchers
from distill_operator.render import JobRef
from distill_operator.resources import parse_spec

JOB = JobRef("tiny", "ml", "abcdef0123")


class FakeJobsClient:
    """What JobSubmissionClient does, in memory (404s are RuntimeErrors, as in Ray)."""

    def __init__(self):
        self.jobs: dict[str, SimpleNamespace] = {}
        self.submitted: list[dict] = []

    def get_job_info(self, submission_id):
        if submission_id not in self.jobs:
            raise RuntimeError(f"Request failed with status code 404: Job {submission_id} does not exist.")
        return self.jobs[submission_id]

    def submit_job(self, **kwargs):
        workdir = Path(kwargs["runtime_env"]["working_dir"])
        kwargs["uploaded_config"] = yaml.safe_load((workdir / "distill.yaml").read_text())
        self.submitted.append(kwargs)
        self.jobs[kwargs["submission_id"]] = SimpleNamespace(status=SimpleNamespace(value="PENDING"), message="")
        return kwargs["submission_id"]

    def stop_job(self, submission_id):
        self.get_job_info(submission_id).status.value = "STOPPED"


@pytest.fixture
def launcher(monkeypatch):
    fake = FakeJobsClient()
    launcher = launchers.RayAddressLauncher("http://127.0.0.1:8265")
    monkeypatch.setattr(launcher, "_client", lambda: fake)
    launcher.fake = fake
    return launcher


def spec():
    return parse_spec({
        "image": "unused",
        "launcher": {"type": "RayAddress", "rayAddress": "http://127.0.0.1:8265", "workingDir": "/repo"},
        "distill": {"max_steps": 5, "student_pretrain": "models/s", "teacher_pretrain": "models/t",
                    "student": {"data_args": {"file_name": "data/train.jsonl"}}},
    })


def test_submit_is_idempotent_and_carries_config_env_and_resume_flag(launcher):
    assert launcher.observe(JOB, 1).phase == "Missing"
    launcher.launch(spec(), JOB, attempt=1, resume=True, remaining_deadline=None)
    launcher.launch(spec(), JOB, attempt=1, resume=True, remaining_deadline=None)  # e.g. after an operator restart
    (submitted,) = launcher.fake.submitted
    assert submitted["submission_id"] == launcher.run_name(JOB, 1) == "kubedistill-ml-tiny-abcdef01-1"
    assert shlex.split(submitted["entrypoint"]) == ["kubedistill", "train", "distill.yaml", "resume_from_checkpoint=true"]
    assert submitted["runtime_env"]["env_vars"] == {
        "KUBEDISTILL_DISTILLJOB_NAME": "tiny", "KUBEDISTILL_DISTILLJOB_NAMESPACE": "ml",
        "KUBEDISTILL_DISTILLJOB_UID": JOB.uid, "KUBEDISTILL_PROGRESS_CONFIGMAP": "tiny-progress"}
    assert submitted["uploaded_config"]["student_pretrain"] == "/repo/models/s"
    assert launcher.observe(JOB, 1).phase == "Pending"


@pytest.mark.parametrize("status, phase", [("RUNNING", "Running"), ("SUCCEEDED", "Succeeded"), ("FAILED", "Failed")])
def test_ray_job_status_maps_to_phases(launcher, status, phase):
    launcher.launch(spec(), JOB, attempt=0, resume=False, remaining_deadline=None)
    launcher.fake.jobs[launcher.run_name(JOB, 0)].status.value = status
    assert launcher.observe(JOB, 0).phase == phase


def test_stop_stops_and_tolerates_unknown_jobs(launcher):
    launcher.launch(spec(), JOB, attempt=0, resume=False, remaining_deadline=None)
    launcher.stop(JOB, 0)
    assert launcher.observe(JOB, 0).phase == "Failed"
    launcher.stop(JOB, 7)  # never submitted: nothing to do


def test_launcher_for_picks_by_spec():
    assert isinstance(launchers.launcher_for(spec(), api_client=None), launchers.RayAddressLauncher)


BAD_ADDRESSES = [
    "http://host:8265/any/path?x=1",  # became GET /any/path?x=1/api/version
    "http://host:8265/api",
    "http://host:8265?x=1",
    "http://host:8265#frag",
    "http://user:secret@host:8265",
    "ftp://host:8265",
    "host:8265",
    "http://host:70000",
    "http://",
]


@pytest.mark.parametrize("address", BAD_ADDRESSES)
def test_ray_address_other_than_a_base_url_is_refused_before_any_request(address):
    with pytest.raises(ValueError, match=r"spec\.launcher\.rayAddress"):
        launchers.RayAddressLauncher(address)
    import pydantic

    body = {"image": "unused", "launcher": {"type": "RayAddress", "rayAddress": address},
            "distill": {"max_steps": 5, "student_pretrain": "s", "teacher_pretrain": "t",
                        "student": {"data_args": {"file_name": "d"}}}}
    with pytest.raises(pydantic.ValidationError, match=r"rayAddress"):
        parse_spec(body)


@pytest.mark.parametrize("address, base", [
    ("http://raycluster-head-svc.ray:8265", "http://raycluster-head-svc.ray:8265"),
    ("https://ray.example.com/", "https://ray.example.com"),
    ("http://10.0.0.7:8265", "http://10.0.0.7:8265"),
    ("http://[fd00::7]:8265", "http://[fd00::7]:8265"),
])
def test_ray_address_base_urls_are_accepted(address, base):
    assert launchers.RayAddressLauncher(address).address == base
