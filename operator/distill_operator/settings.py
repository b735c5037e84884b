"""The operator's own settings (flags of ``kubedistill operator``) and the checks of a spec against them.

The operator acts with its own permissions on what a DistillJob names: the Ray pods it creates run as
``spec.serviceAccountName`` and mount ``spec.storage.claimName``. Whoever may create a DistillJob could otherwise
borrow any ServiceAccount (and its token, RBAC and image pull secrets) or any PVC of the namespace. So:
- service accounts: only the per-job ``<job>-trainer`` that the operator creates, plus what
  ``--allow-service-account`` names;
- claims: any by default; ``--allow-claim`` restricts them.
Patterns are shell-style globs (``fnmatch``) matched against ``NAME`` and ``NAMESPACE/NAME``.

``__main__`` builds these from its flags into the operator's ``OperatorRuntime`` (runtime.py);
``kopf run -m distill_operator.handlers`` and the tests set environment variables instead, which ``from_env`` reads
when the runtime is made at startup.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from typing import Mapping

from distill_operator import network
from distill_operator.network import Peer
from distill_operator.render import JobRef, trainer_service_account
from distill_operator.resources import DistillJobSpec

ENV_ALLOWED_SERVICE_ACCOUNTS = "KUBEDISTILL_ALLOWED_SERVICE_ACCOUNTS"  # comma-separated patterns
ENV_ALLOWED_CLAIMS = "KUBEDISTILL_ALLOWED_CLAIMS"  # comma-separated patterns
ENV_DASHBOARD_CLIENTS = "KUBEDISTILL_DASHBOARD_CLIENTS"  # ';'-separated peers
ENV_METRICS_CLIENTS = "KUBEDISTILL_METRICS_CLIENTS"  # ';'-separated peers


@dataclass(frozen=True)
class OperatorSettings:
    allowed_service_accounts: tuple[str, ...] = ()
    allowed_claims: tuple[str, ...] = ("*",)
    dashboard_clients: tuple[Peer, ...] = network.DEFAULT_DASHBOARD_CLIENTS
    metrics_clients: tuple[Peer, ...] = network.DEFAULT_METRICS_CLIENTS

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "OperatorSettings":
        env = os.environ if env is None else env
        default = cls()

        def patterns(name: str, fallback: tuple[str, ...]) -> tuple[str, ...]:
            if name not in env:
                return fallback
            return tuple(p.strip() for p in env[name].split(",") if p.strip())

        def peers(name: str, fallback: tuple[Peer, ...]) -> tuple[Peer, ...]:
            if name not in env:
                return fallback
            return tuple(network.parse_peer(p.strip()) for p in env[name].split(";") if p.strip())

        return cls(
            allowed_service_accounts=patterns(ENV_ALLOWED_SERVICE_ACCOUNTS, default.allowed_service_accounts),
            allowed_claims=patterns(ENV_ALLOWED_CLAIMS, default.allowed_claims),
            dashboard_clients=peers(ENV_DASHBOARD_CLIENTS, default.dashboard_clients),
            metrics_clients=peers(ENV_METRICS_CLIENTS, default.metrics_clients),
        )

    def to_env(self) -> dict[str, str]:
        return {
            ENV_ALLOWED_SERVICE_ACCOUNTS: ",".join(self.allowed_service_accounts),
            ENV_ALLOWED_CLAIMS: ",".join(self.allowed_claims),
            ENV_DASHBOARD_CLIENTS: ";".join(str(p) for p in self.dashboard_clients),
            ENV_METRICS_CLIENTS: ";".join(str(p) for p in self.metrics_clients),
        }


def _matches(patterns: tuple[str, ...], namespace: str, name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(f"{namespace}/{name}", p) for p in patterns)


def check_allowed(spec: DistillJobSpec, job: JobRef, settings: OperatorSettings) -> None:
    """ValueError naming the field, the value and the flag that would allow it, for a service account or claim
    the operator's settings do not allow. Called before any child object is created."""
    account = spec.service_account_name
    if account and account != trainer_service_account(job) and not _matches(
        settings.allowed_service_accounts, job.namespace, account
    ):
        raise ValueError(
            f"spec.serviceAccountName: {account!r} is not allowed by the operator: the Ray pods would run with that "
            f"account's token and permissions. Leave it unset (the job runs as its own "
            f"{trainer_service_account(job)!r}), or start the operator with --allow-service-account {account} "
            f"(or {job.namespace}/{account})"
        )
    claim = spec.storage.claim_name if spec.storage is not None else None
    if claim and not _matches(settings.allowed_claims, job.namespace, claim):
        raise ValueError(
            f"spec.storage.claimName: {claim!r} is not allowed by the operator (allowed: "
            f"{', '.join(settings.allowed_claims) or 'none'}); start the operator with --allow-claim {claim} "
            f"(or {job.namespace}/{claim}) to allow it"
        )
