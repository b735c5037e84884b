"""``python -m distill_operator`` / ``kubedistill operator``: run the DistillJob operator (kopf).

Serves a liveness endpoint (kopf's, ``/healthz``, failing once the API server or the DistillJob watch has been silent
for ``--liveness-api-timeout``: runtime.OperatorRuntime.health) and Prometheus metrics (``/metrics``). Both bind to
``--bind-address`` (127.0.0.1 by default; the Deployment passes 0.0.0.0 so the kubelet and Prometheus reach them).
The flags configure one ``OperatorRuntime`` (runtime.py), handed to the kopf handlers through kopf's memo; the
Helm chart (charts/kubedistill) sets them from its values.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Callable

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
        "--liveness-api-timeout", type=float, default=60.0, metavar="SECONDS",
        help="/healthz fails once the API server has been unreachable, or the DistillJob watch silent about a change "
        "a list shows, for longer than this (the kubelet then restarts the operator). 0: never. Default: 60.",
    )
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
    election = parser.add_argument_group(
        "leader election", "Several replicas may run: the one holding a coordination.k8s.io Lease writes, the others "
        "stand by (watch, write nothing) and take over when it stops renewing or releases the Lease at shutdown.")
    election.add_argument(
        "--leader-election", action=argparse.BooleanOptionalAction, default=True,
        help="Hold the Lease before writing anything (default: on). --no-leader-election: this process writes "
        "alone; run one replica only.",
    )
    election.add_argument(
        "--leader-election-namespace", default=None,
        help="Namespace of the Lease. Default: POD_NAMESPACE (the chart sets it from the downward API), the pod's "
        "service account namespace, else the first watched namespace.",
    )
    election.add_argument("--leader-election-lease-name", default="kubedistill-operator", help="Name of the Lease.")
    election.add_argument("--leader-election-lease-duration", type=float, default=15.0, metavar="SECONDS",
                          help="How long a standby waits after the leader's last renew (default 15).")
    election.add_argument("--leader-election-renew-deadline", type=float, default=10.0, metavar="SECONDS",
                          help="The leader stops writing (and exits) when it could not renew for this long (default 10).")
    election.add_argument("--leader-election-retry-period", type=float, default=2.0, metavar="SECONDS",
                          help="Between renew / acquire tries (default 2).")
    parser.add_argument("--readiness-port", type=int, default=8081,
                        help="Readiness /readyz port: 200 on the leader (or without leader election) and on a standby "
                        "in contact with the Lease (body: leader / standby), else 503; 0 disables it.")
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
    if not args.liveness_api_timeout >= 0:
        build_parser().error(f"--liveness-api-timeout must be >= 0 (got {args.liveness_api_timeout})")
    settings = settings_from_args(args)
    import kopf
    from prometheus_client import start_http_server

    from distill_operator import handlers  # noqa: F401  (registers the handlers)
    from distill_operator import metrics
    from distill_operator.runtime import DEFAULT_RECONCILE_INTERVAL, OperatorRuntime

    # The operator's runtime state, configured from the flags; the handlers reach it through kopf's memo.
    elector = None
    if args.leader_election:
        from distill_operator.leader import LeaderElector, default_namespace

        lease_namespace = args.leader_election_namespace or default_namespace(args.namespace)
        if not lease_namespace:
            build_parser().error("leader election needs --leader-election-namespace (or POD_NAMESPACE) here")
        try:
            elector = LeaderElector(
                lambda: runtime.api_client(), lease_namespace, args.leader_election_lease_name,
                lease_duration=args.leader_election_lease_duration,
                renew_deadline=args.leader_election_renew_deadline,
                retry_period=args.leader_election_retry_period,
            )
        except ValueError as error:
            build_parser().error(str(error))
    runtime = OperatorRuntime(
        settings, args.reconcile_interval if args.reconcile_interval is not None else DEFAULT_RECONCILE_INTERVAL,
        leader=elector,
    )
    # Set (on kopf's loop) when the Lease is lost. An asyncio.Event: kopf waits for a threading.Event in an executor
    # thread, which would keep the process from exiting after a SIGTERM.
    stop_operator = asyncio.Event()

    runtime.liveness_api_timeout, runtime.namespaces = args.liveness_api_timeout, tuple(args.namespace)
    level = "debug" if args.verbose else args.log_level
    kopf.configure(verbose=level == "debug", log_format=kopf.LogFormat.PLAIN)
    logging.getLogger().setLevel(level.upper())
    if level != "debug":
        # kopf logs every handler run at INFO; at 200 jobs that logging alone costs seconds of the event loop.
        # What matters is in our own log lines, the DistillJob's events and conditions, and /metrics.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    if args.metrics_port:
        start_http_server(args.metrics_port, addr=args.bind_address)
    metrics.LEADER.set_function(lambda: float(runtime.leading()))
    if args.readiness_port:
        serve_readiness(args.bind_address, args.readiness_port, runtime.ready, runtime.leading)
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
            memo=kopf.Memo(runtime=runtime, stop_operator=stop_operator),
            stop_flag=stop_operator,
        )
    )
    if stop_operator.is_set():
        logging.getLogger(__name__).error("exiting: the leader Lease was lost (the kubelet restarts a standby)")
        return 1
    return 0


def serve_readiness(host: str, port: int, ready: "Callable[[], bool]", leading: "Callable[[], bool]") -> None:
    """``GET /readyz`` on its own thread: 200 while ``ready()`` (the leader, or a standby in contact with the
    Lease), else 503; the body says which (``leader`` / ``standby``). A standby is ready on purpose: with only the
    leader Ready, a PodDisruptionBudget could never let the leader's node drain, nor a rolling update proceed."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            if self.path.split("?")[0] != "/readyz":
                self.send_error(404)
                return
            ok = ready()
            body = b"leader\n" if leading() else b"standby\n"
            self.send_response(200 if ok else 503)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="readyz", daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
