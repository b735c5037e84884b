"""tests/images/podman_pod.py: pod specs the project renders, translated to ``podman run`` arguments (no podman)."""

from __future__ import annotations

import json
import stat

import pytest

from distill_operator import render
from distill_operator.resources import parse_spec
from tests.images.podman_pod import (
    PodTranslationError,
    container_env,
    expand,
    kuberay_pod,
    ray_start_command,
    ray_start_params,
    translate,
)
from tests.unit.test_operator_render import JOB, spec_dict


def _option_values(options: list[str], flag: str) -> list[str]:
    return [options[i + 1] for i, o in enumerate(options) if o == flag]


def _head_group():
    rayjob = render.render_rayjob(parse_spec(spec_dict()), JOB, attempt=0, resume=False)
    return rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]


def _translate_head(tmp_path, **kwargs):
    template = _head_group()["template"]
    (tmp_path / "claim").mkdir()
    (tmp_path / "cm").mkdir()
    return translate(template, "img", workdir=tmp_path / "pod", fields={"status.podIP": "10.1.2.3"},
                     claims={"ckpt": tmp_path / "claim"},
                     config_maps={render.configmap_name(JOB): tmp_path / "cm"}, **kwargs)


def test_expand_follows_the_kubelets_rules():
    env = {"A": "1", "B": "x"}
    assert expand("$(A)-$(B)", env) == "1-x"
    assert expand("$$(A)", env) == "$(A)"  # escaped
    assert expand("$(NOPE) $A", env) == "$(NOPE) $A"  # unknown and shell syntax left as written


def test_env_sees_only_earlier_variables_and_resolves_field_refs():
    container = {"env": [
        {"name": "LATER_REF", "value": "$(IP)"},
        {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "URL", "value": "http://$(IP):8265"},
        {"name": "CLUSTER", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['ray.io/cluster']"}}},
    ]}
    env = container_env(container, {"status.podIP": "10.0.0.9"}, {"labels": {"ray.io/cluster": "c1"}})
    assert env == {"LATER_REF": "$(IP)", "IP": "10.0.0.9", "URL": "http://10.0.0.9:8265", "CLUSTER": "c1"}
    with pytest.raises(PodTranslationError, match="status.hostIP"):
        container_env({"env": [{"name": "H", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}}]}, {})


def test_head_pod_runs_as_the_rendered_user_read_only_without_capabilities(tmp_path):
    run = _translate_head(tmp_path)
    pod = _head_group()["template"]["spec"]
    uid, gid = pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]
    assert _option_values(run.options, "--user") == [f"{uid}:{gid}"]
    assert _option_values(run.options, "--group-add") == [str(pod["securityContext"]["fsGroup"])]
    # podman's --read-only alone would leave /tmp, /var/tmp and /run writable: a pod has no such tmpfs.
    assert "--read-only" in run.options and "--read-only-tmpfs=false" in run.options
    assert "--cap-drop=ALL" in run.options
    assert _option_values(run.options, "--security-opt") == ["no-new-privileges"]


def test_head_pod_volumes_become_bind_mounts_configmap_read_only(tmp_path):
    run = _translate_head(tmp_path)
    mounts = _option_values(run.options, "--mount")
    spec = parse_spec(spec_dict())
    assert f"type=bind,src={tmp_path / 'cm'},dst={render.CONFIG_DIR},ro=true" in mounts
    assert f"type=bind,src={tmp_path / 'claim'},dst={spec.storage.mount_path}" in mounts
    for name, path in (("tmp", render.TMP_DIR), ("home", render.HOME_DIR)):
        source = tmp_path / "pod" / "emptydir" / name
        assert f"type=bind,src={source},dst={path}" in mounts
        assert stat.S_IMODE(source.stat().st_mode) == 0o777  # writable by any uid, as the kubelet makes it
        assert run.host_dirs[name] == source
    assert "--tmpfs" not in run.options  # KubeRay adds /dev/shm, not the template


def test_missing_sources_are_errors_not_silently_dropped(tmp_path):
    template = _head_group()["template"]
    with pytest.raises(PodTranslationError, match="claim 'ckpt'"):
        translate(template, "img", workdir=tmp_path, fields={"status.podIP": "1.2.3.4"},
                  config_maps={render.configmap_name(JOB): tmp_path})
    with pytest.raises(PodTranslationError, match="status.podIP"):
        translate(template, "img", workdir=tmp_path, claims={"ckpt": tmp_path},
                  config_maps={render.configmap_name(JOB): tmp_path})


def test_run_as_non_root_with_uid_0_is_refused_like_the_kubelet_does(tmp_path):
    template = {"spec": {"securityContext": {"runAsNonRoot": True, "runAsUser": 0},
                         "containers": [{"name": "c"}]}}
    with pytest.raises(PodTranslationError, match="runAsUser 0"):
        translate(template, "img", workdir=tmp_path)


def test_env_carries_the_rendered_variables_with_the_pod_ip_resolved(tmp_path):
    run = _translate_head(tmp_path)
    env_options = dict(item.split("=", 1) for item in _option_values(run.options, "-e"))
    assert env_options == run.env
    assert run.env[render.ENV_POD_IP] == "10.1.2.3"
    assert run.env["HOME"] == render.HOME_DIR and run.env["TMPDIR"] == render.TMP_DIR


def test_service_account_token_only_where_the_pod_mounts_it(tmp_path):
    token = tmp_path / "sa"
    run = _translate_head(tmp_path, service_account=(token, "127.0.0.1", 6443))
    assert f"type=bind,src={token},dst=/var/run/secrets/kubernetes.io/serviceaccount,ro=true" in _option_values(
        run.options, "--mount")
    assert (run.env["KUBERNETES_SERVICE_HOST"], run.env["KUBERNETES_SERVICE_PORT"]) == ("127.0.0.1", "6443")
    template = {"spec": {"automountServiceAccountToken": False, "containers": [{"name": "c"}]}}
    run = translate(template, "img", workdir=tmp_path, service_account=(token, "127.0.0.1", 6443))
    assert "--mount" not in run.options and "KUBERNETES_SERVICE_HOST" not in run.env


def test_command_replaces_the_entrypoint_args_follow_the_image(tmp_path):
    template = {"spec": {"containers": [{"name": "c", "command": ["/bin/sh", "-c"], "args": ["echo $(X)"],
                                         "env": [{"name": "X", "value": "hi"}]}]}}
    run = translate(template, "img", workdir=tmp_path)
    assert json.loads(_option_values(run.options, "--entrypoint")[0]) == ["/bin/sh", "-c"]
    assert run.argv()[-2:] == ["img", "echo hi"]
    only_args = translate({"spec": {"containers": [{"name": "c", "args": ["--flag"]}]}}, "img", workdir=tmp_path)
    assert "--entrypoint" not in only_args.options and only_args.argv()[-2:] == ["img", "--flag"]


def test_memory_emptydir_is_a_sized_tmpfs(tmp_path):
    template = {"spec": {"volumes": [{"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}}],
                         "containers": [{"name": "c", "volumeMounts": [{"name": "shm", "mountPath": "/dev/shm"}]}]}}
    run = translate(template, "img", workdir=tmp_path)
    assert _option_values(run.options, "--tmpfs") == [f"/dev/shm:rw,exec,mode=1777,size={2**30}"]


def test_kuberay_head_command_is_composed_like_kuberay_does():
    params = ray_start_params({"dashboard-host": "$(KUBEDISTILL_POD_IP)", "metrics-export-port": "8080"},
                              {"limits": {"cpu": "4", "memory": "16Gi"}}, head=True)
    assert params == {"dashboard-host": "$(KUBEDISTILL_POD_IP)", "metrics-export-port": "8080", "block": "true",
                      "dashboard-agent-listen-port": "52365", "num-cpus": "4", "memory": str(16 * 2**30)}
    assert ray_start_command(params, head=True) == (
        "ray start --head  --block  --dashboard-agent-listen-port=52365  --dashboard-host=$(KUBEDISTILL_POD_IP) "
        f" --memory={16 * 2**30}  --metrics-export-port=8080  --num-cpus=4 ")
    assert ray_start_params({}, {"requests": {"cpu": "500m"}}, head=True)["num-cpus"] == "1"  # rounded up
    assert ray_start_params({}, {"limits": {"cpu": "2", "nvidia.com/gpu": "8"}}, head=False)["num-gpus"] == "8"


def test_kuberay_head_pod_runs_ray_start_with_the_pod_ip_expanded(tmp_path):
    group = _head_group()
    pod = kuberay_pod(group, cluster_name="rc")
    assert pod["metadata"]["labels"]["ray.io/node-type"] == "head"
    (tmp_path / "claim").mkdir()
    run = translate(pod, "img", workdir=tmp_path / "pod", fields={"status.podIP": "10.1.2.3",
                                                                 "metadata.name": "rc-head-x"},
                    claims={"ckpt": tmp_path / "claim"}, config_maps={render.configmap_name(JOB): tmp_path})
    assert json.loads(_option_values(run.options, "--entrypoint")[0]) == ["/bin/bash", "-lc", "--"]
    (script,) = run.command
    assert script.startswith("ulimit -n 65536; ray start --head ")
    if group["rayStartParams"]["dashboard-host"].startswith("$("):
        assert " --dashboard-host=10.1.2.3 " in script  # $(KUBEDISTILL_POD_IP), expanded as the kubelet does
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert f" --num-cpus={limits['cpu']} " in script
    assert run.env["RAY_ADDRESS"] == "127.0.0.1:6379" and run.env["RAY_CLUSTER_NAME"] == "rc"
    assert any(t.startswith("/dev/shm:") for t in _option_values(run.options, "--tmpfs"))


def test_write_failures_name_the_path():
    from tests.images.podman_pod import write_failures

    logs = {
        "head": "ok\nOSError: [Errno 30] Read-only file system: '/usr/local/lib/python3.11/dist-packages/x.cache'\n",
        "driver": "Matplotlib created a temporary cache directory at /tmp/matplotlib-1 because the default path "
                  "(/home/u/.config/matplotlib) is not a writable directory; it is highly recommended to set the "
                  "MPLCONFIGDIR environment variable\n",
        "clean": "distill step 4/4 finished\n",
    }
    found = write_failures(logs)
    assert len(found) == 2
    assert found[0].startswith("head: /usr/local/lib/python3.11/dist-packages/x.cache: ")
    assert found[1].startswith("driver: ") and "/home/u/.config/matplotlib" in found[1]


def test_fs_group_makes_a_claim_writable_for_the_group(tmp_path):
    import os

    from tests.images.podman_pod import apply_fs_group

    (tmp_path / "claim" / "sub").mkdir(parents=True)
    (tmp_path / "claim" / "sub" / "f").write_text("x")
    if os.geteuid() != 0:
        pytest.skip("chgrp to another group needs root")
    apply_fs_group(tmp_path / "claim", 4242)
    for path in (tmp_path / "claim", tmp_path / "claim" / "sub", tmp_path / "claim" / "sub" / "f"):
        info = path.stat()
        assert info.st_gid == 4242 and info.st_mode & stat.S_IWGRP
    assert (tmp_path / "claim" / "sub").stat().st_mode & stat.S_ISGID
