"""``python -m distill_operator`` / ``kubedistill operator``: run the DistillJob operator (kopf).

Serves a liveness endpoint (kopf's, ``/healthz``) and Prometheus metrics (``/metrics``). Both bind to
``--bind-address`` (127.0.0.1 by default; the Deployment passes 0.0.0.0 so the kubelet and Prometheus reach them).
The flags configure one ``OperatorRuntime`` (runtime.py), handed to the kopf handlers through kopf's memo; the
Helm chart (charts/kubedistill) sets them from its values.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from distill_operator.settings import OperatorSettings


LOG_LEVELS = ("debug", "info", "warning", "error")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubedistill operator",
        description="Run the kubedistill operator: DistillJob -> ConfigMap + KubeRay RayJob, status conditions.",
    )
    parser.add_argument(
        "-n", "--namespace", action="append", default=[],
        help="Watch only this namespace (repeatable; globs allowed). Default: all namespaces.",
    )
    parser.add_argument("--bind-address", default="127.0.0.1", help="Address of the metrics and liveness servers.")
    parser.add_argument("--metrics-port", type=int, default=9090, help="Prometheus /metrics port; 0 disables it.")
    parser.add_argument("--liveness-port", type=int, default=8080, help="Liveness /healthz port; 0 disables it.")
    parser.add_argument(
        "--reconcile-interval", type=float, default=None,
        help="Seconds between timer reconciles of a job (deadlines, TTL, Ray Jobs API polling). Default: 10.",
    )
    parser.add_argument(
        "--allow-service-account", action="append", default=[], metavar="PATTERN",
        help="A spec.serviceAccountName the Ray pods may run as, besides the per-job <job>-trainer account the "
        "operator creates (repeatable; NAME or NAMESPACE/NAME, shell globs allowed). Default: none.",
    )
    parser.add_argument(
        "--allow-claim", action="append", default=None, metavar="PATTERN",
        help="A spec.storage.claimName (PVC) jobs may mount (repeatable; NAME or NAMESPACE/NAME, shell globs "
        "allowed). Default: any claim of the job's namespace.",
    )
    parser.add_argument(
        "--dashboard-client", action="append", default=None, metavar="PEER",
        help="Pods the job's NetworkPolicy admits to the Ray dashboard / Jobs API (port 8265), as "
        "[NAMESPACE_LABELS:]POD_LABELS, e.g. kubernetes.io/metadata.name=ray-system:app.kubernetes.io/name="
        "kuberay-operator (repeatable). Default: app.kubernetes.io/name=kuberay-operator and "
        "app.kubernetes.io/name=kubedistill-operator in any namespace.",
    )
    parser.add_argument(
        "--metrics-client", action="append", default=None, metavar="PEER",
        help="Pods admitted to Ray's metrics port (8080), same form (repeatable). Default: "
        "app.kubernetes.io/name=prometheus in any namespace.",
    )
    parser.add_argument(
        "--log-level", choices=LOG_LEVELS, default="info",
        help="debug logs kopf's handler runs and API requests; info (default) the operator's own decisions.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="Verbose logging (= --log-level debug).")
    return parser


def settings_from_args(args: argparse.Namespace) -> "OperatorSettings":
    """The flags as OperatorSettings (argparse error on a malformed peer)."""
    from distill_operator import network
    from distill_operator.settings import OperatorSettings

    default = OperatorSettings()
    try:
        return OperatorSettings(
            allowed_service_accounts=tuple(args.allow_service_account),
            allowed_claims=tuple(args.allow_claim) if args.allow_claim is not None else default.allowed_claims,
            # An empty value ('') gives an empty list: that rule is left out of the NetworkPolicy.
            dashboard_clients=tuple(network.parse_peer(p) for p in args.dashboard_client if p.strip())
            if args.dashboard_client is not None else default.dashboard_clients,
            metrics_clients=tuple(network.parse_peer(p) for p in args.metrics_client if p.strip())
            if args.metrics_client is not None else default.metrics_clients,
        )
    except ValueError as error:
        build_parser().error(str(error))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.reconcile_interval is not None and not args.reconcile_interval > 0:
        build_parser().error(f"--reconcile-interval must be > 0 (got {args.reconcile_interval})")
    settings = settings_from_args(args)
    import kopf
    from prometheus_client import start_http_server

    from distill_operator import handlers  # noqa: F401  (registers the handlers)
    from distill_operator.runtime import DEFAULT_RECONCILE_INTERVAL, OperatorRuntime

    # The operator's runtime state, configured from the flags; the handlers reach it through kopf's memo.
    runtime = OperatorRuntime(
        settings, args.reconcile_interval if args.reconcile_interval is not None else DEFAULT_RECONCILE_INTERVAL
    )

    level = "debug" if args.verbose else args.log_level
    kopf.configure(verbose=level == "debug", log_format=kopf.LogFormat.PLAIN)
    logging.getLogger().setLevel(level.upper())
    if level != "debug":
        # kopf logs every handler run at INFO; at 200 jobs that logging alone costs seconds of the event loop.
        # What matters is in our own log lines, the DistillJob's events and conditions, and /metrics.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    if args.metrics_port:
        start_http_server(args.metrics_port, addr=args.bind_address)
    liveness = f"http://{args.bind_address}:{args.liveness_port}/healthz" if args.liveness_port else None
    logging.getLogger(__name__).info(
        "kubedistill operator: %s, metrics :%s, liveness %s",
        ", ".join(args.namespace) or "all namespaces", args.metrics_port or "off", liveness or "off",
    )
    asyncio.run(
        kopf.operator(
            clusterwide=not args.namespace,
            namespaces=args.namespace,
            liveness_endpoint=liveness,
            standalone=True,
            memo=kopf.Memo(runtime=runtime),
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
