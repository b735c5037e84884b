"""render.py: every field of the ConfigMap and RayJob the operator creates, without a cluster."""

from __future__ import annotations

import shlex

import yaml

from distill_operator import render
from distill_operator.render import JobRef
from distill_operator.resources import parse_spec
from distill_trainer.config import config_from_dict

JOB = JobRef(name="qwen-distill", namespace="ml", uid="0123456789abcdef")


def spec_dict(**overrides):
    spec = {
        "image": "registry.example/kubedistill:0.1",
        "distill": {
            "max_steps": 100,
            "student_pretrain": "/models/student",
            "teacher_pretrain": "/models/teacher",
            "output_dir": "out",
            "student": {"data_args": {"file_name": "/data/train.jsonl"}, "device_mapping": [0]},
            "teacher": {"strategy_args": {"strategy_name": "torch_infer"}, "device_mapping": [0]},
        },
        "workers": {
            "replicas": 2,
            "gpusPerWorker": 4,
            "nodeSelector": {"nvidia.com/gpu.product": "H100"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        },
        "storage": {"claimName": "ckpt"},
    }
    spec.update(overrides)
    return spec


def test_configmap_holds_the_trainer_yaml_with_output_on_storage():
    cm = render.render_configmap(parse_spec(spec_dict()), JOB)
    assert cm["metadata"]["name"] == "qwen-distill-config"
    assert cm["metadata"]["ownerReferences"][0]["uid"] == JOB.uid
    config = config_from_dict(yaml.safe_load(cm["data"]["distill.yaml"]))  # the trainer accepts it as is
    assert config.output_dir == "/checkpoints/ml/qwen-distill/out"
    assert config.logging_dir == "/checkpoints/ml/qwen-distill/output/logs"
    assert config.max_steps == 100 and config.student.device_mapping == [0]


def test_absolute_output_dir_and_no_storage_are_left_alone():
    spec = spec_dict(storage=None)
    spec["distill"]["output_dir"] = "/abs/out"
    config = render.trainer_config(parse_spec(spec), JOB)
    assert config["output_dir"] == "/abs/out" and config["logging_dir"] == "./output/logs"


def test_trainer_serves_its_metrics_on_the_head_pods_network_under_kuberay():
    config = config_from_dict(render.trainer_config(parse_spec(spec_dict()), JOB))
    assert (config.metrics_port, config.metrics_bind_address) == (9108, "0.0.0.0") == (
        render.TRAINER_METRICS_PORT, "0.0.0.0")
    assert config.metrics_linger_seconds == render.TRAINER_METRICS_LINGER_SECONDS
    # The port is the operator's to choose (container port, NetworkPolicy); the linger is the user's if set.
    spec = spec_dict()
    spec["distill"].update(metrics_port=1234, metrics_bind_address="127.0.0.1", metrics_linger_seconds=5)
    config = config_from_dict(render.trainer_config(parse_spec(spec), JOB))
    assert (config.metrics_port, config.metrics_bind_address, config.metrics_linger_seconds) == (9108, "0.0.0.0", 5)
    rj = render.render_rayjob(parse_spec(spec_dict()), JOB, attempt=0, resume=False)
    cluster = rj["spec"]["rayClusterSpec"]
    head_ports = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
    assert {"containerPort": 9108, "name": "trainer-metrics"} in head_ports
    # Only the head runs the driver.
    worker_ports = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["ports"]
    assert all(p["containerPort"] != 9108 for p in worker_ports)


def test_ray_address_launcher_keeps_the_metrics_settings_as_written():
    spec = spec_dict(launcher={"type": "RayAddress", "rayAddress": "http://127.0.0.1:8265"})
    config = config_from_dict(yaml.safe_load(render.render_submission(parse_spec(spec), JOB, 0, False)["config_yaml"]))
    assert (config.metrics_port, config.metrics_bind_address, config.metrics_linger_seconds) == (0, "127.0.0.1", 0)


def test_rayjob_has_head_gpu_workers_entrypoint_and_teardown():
    rj = render.render_rayjob(parse_spec(spec_dict()), JOB, attempt=0, resume=False)
    assert (rj["apiVersion"], rj["kind"]) == ("ray.io/v1", "RayJob")
    meta = rj["metadata"]
    assert meta["name"] == "qwen-distill-0" and meta["namespace"] == "ml"
    assert meta["labels"][render.LABEL_JOB] == "qwen-distill" and meta["labels"][render.LABEL_ATTEMPT] == "0"
    assert meta["ownerReferences"] == [render.owner_reference(JOB)]
    assert meta["ownerReferences"][0]["controller"] is True
    spec = rj["spec"]
    assert shlex.split(spec["entrypoint"]) == ["kubedistill", "train", "/etc/kubedistill/distill.yaml"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["backoffLimit"] == 0
    assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"] == render.trainer_env(JOB)
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    assert head["containers"][0]["image"] == "registry.example/kubedistill:0.1"
    assert "nvidia.com/gpu" not in head["containers"][0]["resources"]["limits"]
    (group,) = cluster["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 2
    worker = group["template"]["spec"]
    assert worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert worker["nodeSelector"] == {"nvidia.com/gpu.product": "H100"}
    assert worker["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    for pod in (head, worker):
        mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        assert mounts == {"kubedistill-config": "/etc/kubedistill", "checkpoints": "/checkpoints",
                          "tmp": "/tmp", "home": render.HOME_DIR}  # the last two: see the security test below
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["kubedistill-config"]["configMap"]["name"] == "qwen-distill-config"
        assert volumes["checkpoints"]["persistentVolumeClaim"]["claimName"] == "ckpt"
    assert "activeDeadlineSeconds" not in spec


def test_retry_resumes_from_checkpoint_under_a_new_name():
    rj = render.render_rayjob(parse_spec(spec_dict()), JOB, attempt=2, resume=True, active_deadline_seconds=300)
    assert rj["metadata"]["name"] == "qwen-distill-2"
    assert shlex.split(rj["spec"]["entrypoint"])[-1] == "resume_from_checkpoint=true"
    assert rj["spec"]["activeDeadlineSeconds"] == 300


def test_rendering_is_deterministic_and_names_are_bounded():
    spec = parse_spec(spec_dict())
    assert render.render_rayjob(spec, JOB, 1, True) == render.render_rayjob(spec, JOB, 1, True)
    long = JobRef(name="a" * 200, namespace="ml", uid="u")
    name = render.rayjob_name(long, 12)
    assert len(name) <= render.RAYJOB_NAME_LIMIT and name.endswith("-12")
    assert name == render.rayjob_name(long, 12) != render.rayjob_name(JobRef("a" * 199, "ml", "u"), 12)
    assert len(render.labels(long)[render.LABEL_JOB]) <= 63


def test_submission_for_the_ray_address_launcher():
    spec = parse_spec(spec_dict(launcher={"type": "RayAddress", "rayAddress": "http://127.0.0.1:8265"}))
    sub = render.render_submission(spec, JOB, attempt=1, resume=True)
    assert sub["submission_id"] == "kubedistill-ml-qwen-distill-01234567-1"
    assert shlex.split(sub["entrypoint"]) == ["kubedistill", "train", "distill.yaml", "resume_from_checkpoint=true"]
    assert sub["runtime_env"]["env_vars"]["KUBEDISTILL_DISTILLJOB_NAME"] == "qwen-distill"
    assert config_from_dict(yaml.safe_load(sub["config_yaml"])).max_steps == 100


def test_ray_address_working_dir_resolves_relative_paths():
    spec = spec_dict(storage=None, launcher={"type": "RayAddress", "rayAddress": "http://127.0.0.1:8265",
                                             "workingDir": "/repo"})
    spec["distill"]["student_pretrain"] = "models/student"
    spec["distill"]["student"]["data_args"]["eval_file_name"] = "data/eval.jsonl"
    config = render.trainer_config(parse_spec(spec), JOB)
    assert config["student_pretrain"] == "/repo/models/student"
    assert config["teacher_pretrain"] == "/models/teacher"
    assert config["output_dir"] == "/repo/out" and config["logging_dir"] == "/repo/output/logs"
    assert config["student"]["data_args"] == {**config["student"]["data_args"], "file_name": "/data/train.jsonl",
                                              "eval_file_name": "/repo/data/eval.jsonl"}


def test_example_manifests_parse_and_render():
    from pathlib import Path

    for path in sorted(Path(__file__).resolve().parents[2].glob("examples/manifests/distilljob-*.yaml")):
        for body in yaml.safe_load_all(path.read_text()):  # a file may hold several jobs (teacher cache)
            spec = parse_spec(body["spec"])
            job = JobRef(body["metadata"]["name"], "default", "uid")
            config_from_dict(render.trainer_config(spec, job))
            render.render_rayjob(spec, job, 0, False)


def _pods(rj):
    cluster = rj["spec"]["rayClusterSpec"]
    return {
        "head": cluster["headGroupSpec"]["template"]["spec"],
        "worker": cluster["workerGroupSpecs"][0]["template"]["spec"],
        "submitter": rj["spec"]["submitterPodTemplate"]["spec"],
    }


def test_every_ray_pod_runs_non_root_read_only_without_capabilities():
    rj = render.render_rayjob(parse_spec(spec_dict()), JOB, attempt=0, resume=False)
    for role, pod in _pods(rj).items():
        assert pod["securityContext"] == {
            "runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
            "fsGroupChangePolicy": "OnRootMismatch", "seccompProfile": {"type": "RuntimeDefault"},
        }, role
        (container,) = pod["containers"]
        assert container["securityContext"] == {
            "runAsNonRoot": True, "readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
            "privileged": False, "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"},
        }, role
        # What Ray and Python write goes to emptyDirs: /tmp (Ray's /tmp/ray session dir) and HOME (caches).
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes[mounts["/tmp"]] == {"name": "tmp", "emptyDir": {}}, role
        assert volumes[mounts[render.HOME_DIR]] == {"name": "home", "emptyDir": {}}, role
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["HOME"] == render.HOME_DIR and env["TMPDIR"] == "/tmp", role
        assert env["XDG_CACHE_HOME"].startswith(render.HOME_DIR + "/"), role


def test_only_the_head_mounts_the_service_account_token():
    # The trainer's driver (the progress reporter) runs on the head: Ray runs a job's entrypoint there.
    pods = _pods(render.render_rayjob(parse_spec(spec_dict()), JOB, attempt=0, resume=False))
    assert {role: pod["automountServiceAccountToken"] for role, pod in pods.items()} == {
        "head": True, "worker": False, "submitter": False}
    # One account everywhere (its imagePullSecrets pull the image): the per-job one unless the spec names one.
    assert {pod["serviceAccountName"] for pod in pods.values()} == {"qwen-distill-trainer"}
    named = _pods(render.render_rayjob(parse_spec(spec_dict(serviceAccountName="team-sa")), JOB, 0, False))
    assert {pod["serviceAccountName"] for pod in named.values()} == {"team-sa"}


def test_pod_user_and_groups_come_from_the_spec():
    spec = parse_spec(spec_dict(podSecurity={"runAsUser": 1234, "runAsGroup": 100, "fsGroup": 4321}))
    for pod in _pods(render.render_rayjob(spec, JOB, 0, False)).values():
        context = pod["securityContext"]
        assert (context["runAsUser"], context["runAsGroup"], context["fsGroup"]) == (1234, 100, 4321)


def test_root_user_is_rejected_by_the_spec():
    import pydantic
    import pytest

    with pytest.raises(pydantic.ValidationError, match="runAsUser"):
        parse_spec(spec_dict(podSecurity={"runAsUser": 0}))


def test_submitter_carries_the_job_labels_and_no_command():
    rj = render.render_rayjob(parse_spec(spec_dict()), JOB, attempt=3, resume=True)
    template = rj["spec"]["submitterPodTemplate"]
    assert template["metadata"]["labels"] == render.labels(JOB, 3)  # the NetworkPolicy admits it by these
    assert template["spec"]["restartPolicy"] == "Never"
    (container,) = template["spec"]["containers"]
    assert container["image"] == "registry.example/kubedistill:0.1"
    assert "command" not in container and "args" not in container  # KubeRay fills in `ray job submit`


def test_dashboard_listens_on_the_pod_ip_not_all_interfaces():
    rj = render.render_rayjob(parse_spec(spec_dict()), JOB, attempt=0, resume=False)
    head_group = rj["spec"]["rayClusterSpec"]["headGroupSpec"]
    params = head_group["rayStartParams"]
    assert params["dashboard-host"] == "$(KUBEDISTILL_POD_IP)" != "0.0.0.0"
    assert params["metrics-export-port"] == str(render.METRICS_PORT)
    # The kubelet expands $(KUBEDISTILL_POD_IP) in KubeRay's generated args from this container's env.
    env = {e["name"]: e for e in head_group["template"]["spec"]["containers"][0]["env"]}
    assert env["KUBEDISTILL_POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    ports = {p["name"]: p["containerPort"] for p in head_group["template"]["spec"]["containers"][0]["ports"]}
    # No Ray client port; the trainer's metrics under the name a PodMonitor selects.
    assert ports == {"gcs-server": 6379, "dashboard": 8265, "metrics": 8080, "trainer-metrics": 9108}
    # Older Ray: KubeRay's head probes call localhost:8265, so the dashboard must stay on all interfaces.
    old = render.render_rayjob(parse_spec(spec_dict(rayVersion="2.40.0")), JOB, 0, False)
    assert old["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"


def test_trainer_env_names_the_distilljob_its_uid_and_its_progress_configmap():
    env = render.trainer_env(JOB)
    assert env == {
        "KUBEDISTILL_DISTILLJOB_NAME": "qwen-distill",
        "KUBEDISTILL_DISTILLJOB_NAMESPACE": "ml",
        "KUBEDISTILL_DISTILLJOB_UID": "0123456789abcdef",
        "KUBEDISTILL_PROGRESS_CONFIGMAP": "qwen-distill-progress",
    }
    rj = render.render_rayjob(parse_spec(spec_dict()), JOB, attempt=0, resume=False)
    assert yaml.safe_load(rj["spec"]["runtimeEnvYAML"])["env_vars"] == env
    head = rj["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {e["name"]: e.get("value") for e in head["env"]}["KUBEDISTILL_DISTILLJOB_UID"] == "0123456789abcdef"
    sub = render.render_submission(parse_spec(spec_dict()), JOB, attempt=0, resume=False)
    assert sub["runtime_env"]["env_vars"]["KUBEDISTILL_DISTILLJOB_UID"] == "0123456789abcdef"


def test_ray_pods_run_as_the_per_job_trainer_account_unless_the_spec_names_one():
    for spec, account in ((spec_dict(), "qwen-distill-trainer"), (spec_dict(serviceAccountName="team"), "team")):
        cluster = render.render_rayjob(parse_spec(spec), JOB, attempt=0, resume=False)["spec"]["rayClusterSpec"]
        pods = [cluster["headGroupSpec"]["template"], cluster["workerGroupSpecs"][0]["template"]]
        assert {pod["spec"]["serviceAccountName"] for pod in pods} == {account}


def test_ray_pods_detect_a_lost_node_well_within_rays_default_65_seconds():
    rayjob = render.render_rayjob(parse_spec(spec_dict()), JOB, attempt=1, resume=False)
    cluster = rayjob["spec"]["rayClusterSpec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        env = {e["name"]: e.get("value") for e in group["template"]["spec"]["containers"][0]["env"]}
        period = int(env["RAY_health_check_period_ms"]) / 1000
        timeout = int(env["RAY_health_check_timeout_ms"]) / 1000
        threshold = int(env["RAY_health_check_failure_threshold"])
        assert threshold >= 3  # one slow answer never declares a node dead
        assert threshold * (period + timeout) <= 20  # Ray's defaults: 5 x (10 s timeout + 3 s period), ~65 s
