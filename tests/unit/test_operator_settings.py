"""settings.py and the operator's flags: which service accounts and claims a DistillJob may name."""

from __future__ import annotations

import pytest

from distill_operator.__main__ import build_parser, settings_from_args
from distill_operator.network import parse_peer
from distill_operator.render import JobRef
from distill_operator.resources import parse_spec
from distill_operator.settings import OperatorSettings, check_allowed
from tests.unit.test_operator_render import spec_dict

JOB = JobRef(name="qwen-distill", namespace="ml", uid="0123456789abcdef")


def test_by_default_only_the_per_job_account_is_allowed():
    settings = OperatorSettings()
    check_allowed(parse_spec(spec_dict()), JOB, settings)  # unset: the job's own <job>-trainer
    check_allowed(parse_spec(spec_dict(serviceAccountName="qwen-distill-trainer")), JOB, settings)
    with pytest.raises(ValueError) as error:
        check_allowed(parse_spec(spec_dict(serviceAccountName="admin")), JOB, settings)
    message = str(error.value)
    assert "spec.serviceAccountName" in message and "'admin'" in message
    assert "--allow-service-account admin" in message


@pytest.mark.parametrize("pattern", ["admin", "ml/admin", "ml/*", "adm*"])
def test_allow_service_account_patterns(pattern):
    check_allowed(parse_spec(spec_dict(serviceAccountName="admin")), JOB,
                  OperatorSettings(allowed_service_accounts=(pattern,)))


def test_pattern_for_another_namespace_does_not_allow():
    with pytest.raises(ValueError):
        check_allowed(parse_spec(spec_dict(serviceAccountName="admin")), JOB,
                      OperatorSettings(allowed_service_accounts=("other/admin",)))


def test_claims_are_open_by_default_and_can_be_restricted():
    check_allowed(parse_spec(spec_dict()), JOB, OperatorSettings())  # claim "ckpt"
    restricted = OperatorSettings(allowed_claims=("distill-*",))
    with pytest.raises(ValueError, match=r"spec.storage.claimName: 'ckpt'.*--allow-claim ckpt"):
        check_allowed(parse_spec(spec_dict()), JOB, restricted)
    check_allowed(parse_spec(spec_dict(storage={"claimName": "distill-a"})), JOB, restricted)


def test_flags_travel_to_the_handlers_through_the_environment():
    args = build_parser().parse_args([
        "--allow-service-account", "ml/team-*", "--allow-service-account", "shared",
        "--allow-claim", "ckpt-*",
        "--dashboard-client", "kubernetes.io/metadata.name=ray-system:app.kubernetes.io/name=kuberay-operator",
        "--metrics-client", "kubernetes.io/metadata.name=monitoring:app.kubernetes.io/name=prometheus",
    ])
    settings = settings_from_args(args)
    assert settings.allowed_service_accounts == ("ml/team-*", "shared")
    assert settings.allowed_claims == ("ckpt-*",)
    assert settings.dashboard_clients == (
        parse_peer("kubernetes.io/metadata.name=ray-system:app.kubernetes.io/name=kuberay-operator"),)
    assert OperatorSettings.from_env(settings.to_env()) == settings
    assert OperatorSettings.from_env({}) == OperatorSettings() == settings_from_args(build_parser().parse_args([]))


def test_malformed_peer_flag_is_a_usage_error():
    with pytest.raises(SystemExit):
        settings_from_args(build_parser().parse_args(["--dashboard-client", "not a label"]))


def test_an_empty_client_flag_means_no_such_rule_never_everyone():
    settings = settings_from_args(build_parser().parse_args(["--metrics-client", ""]))
    assert settings.metrics_clients == ()
    assert OperatorSettings.from_env({"KUBEDISTILL_METRICS_CLIENTS": ""}).metrics_clients == ()
