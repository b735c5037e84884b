"""The operator's command line."""

from __future__ import annotations

import subprocess
import sys

from distill_operator.__main__ import build_parser


def test_help_works_without_a_cluster():
    result = subprocess.run([sys.executable, "-m", "distill_operator", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--metrics-port" in result.stdout and "--liveness-port" in result.stdout


def test_defaults_bind_to_localhost_and_watch_all_namespaces():
    args = build_parser().parse_args([])
    assert args.bind_address == "127.0.0.1" and args.namespace == []
    assert (args.metrics_port, args.liveness_port) == (9090, 8080)
