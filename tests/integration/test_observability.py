"""Alerts and dashboards, checked with the real Prometheus (Debian's 2.42: ``prometheus``, ``promtool``).

- ``promtool check rules`` and ``promtool test rules`` pass on charts/kubedistill/rules/ (the unit tests there make
  each alert fire on synthetic series and stay silent on the nearest healthy case).
- The dashboards are well-formed Grafana JSON with ``${datasource}`` everywhere and a job selector.
- A real Prometheus on 127.0.0.1 scrapes the operator process and a short real training run; every query of every
  dashboard panel and of every template variable returns data, and every alert expression parses and evaluates,
  through the HTTP API (scripts/prometheus/ensure.sh installs the binaries; scripts/test.sh calls it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from kube_cluster import http_get
from tests.integration.operator_fixtures import (  # noqa: F401  (fixtures)
    distilljob_crd,
    jobs,
    operator_credentials,
    operator_process,
)

ROOT = Path(__file__).resolve().parents[2]
RULES_DIR = ROOT / "charts" / "kubedistill" / "rules"
RULES = RULES_DIR / "kubedistill.rules.yaml"
RULE_TESTS = RULES_DIR / "kubedistill.rules.test.yaml"
DASHBOARDS = sorted((ROOT / "charts" / "kubedistill" / "dashboards").glob("*.json"))
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def binary(name: str) -> str:
    """Path of a Prometheus binary; a failure under scripts/test.sh (which installs them), else a skip."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} not found: run scripts/prometheus/ensure.sh (apt-get install prometheus)"
        if os.environ.get("KUBEDISTILL_REQUIRE_K8S") == "1":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return path


def panels(board: dict) -> list[dict]:
    """Every panel, including those inside collapsed rows; rows themselves excluded."""
    found = []
    for panel in board["panels"]:
        if panel["type"] == "row":
            found.extend(panel.get("panels", []))
        else:
            found.append(panel)
    return found


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


# ------------------------------------------------------------------------------------------------ promtool
def test_alert_rules_pass_promtool_check():
    done = subprocess.run([binary("promtool"), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in done.stdout


def test_each_alert_fires_on_its_synthetic_series_in_promtool_unit_tests():
    done = subprocess.run([binary("promtool"), "test", "rules", RULE_TESTS.name], cwd=RULES_DIR,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    # Every alert has a case where it fires (a non-empty exp_alerts) and one where it does not.
    fires, silent = set(), set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert fires == names and silent == names, (names - fires, names - silent)


def test_every_alert_says_what_and_how_bad():
    for rule in alert_rules():
        assert re.fullmatch(r"Kubedistill[A-Z][A-Za-z]+", rule["alert"]), rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


# ------------------------------------------------------------------------------------------------ dashboards
@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_is_grafana_json_with_datasource_variable_and_job_selector(path):
    board = json.loads(path.read_text())
    assert board["uid"] and board["title"].startswith("kubedistill / ")
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    selectors = [v for v in variables.values() if v["type"] == "query"]
    assert selectors, "a selector variable (job)"
    for variable in selectors:
        assert variable["datasource"] == DATASOURCE
        assert variable["query"]["query"].startswith("label_values(")
    ids = set()
    for panel in panels(board):
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"] and panel.get("description"), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE and target["expr"].strip(), panel["title"]
        assert {t["refId"] for t in panel["targets"]} == set("ABCDEFGH"[: len(panel["targets"])]), panel["title"]
        assert panel["id"] not in ids
        ids.add(panel["id"])
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]


def test_dashboard_uids_are_unique():
    uids = [json.loads(path.read_text())["uid"] for path in DASHBOARDS]
    assert len(DASHBOARDS) == 2 and len(set(uids)) == len(uids)


def test_training_dashboard_selects_jobs_by_distilljob_name():
    board = json.loads((ROOT / "charts/kubedistill/dashboards/kubedistill-training.json").read_text())
    variable = next(v for v in board["templating"]["list"] if v["name"] == "distilljob")
    assert variable["query"]["query"].startswith("label_values(kubedistill_trainer_step")
    assert variable["query"]["query"].endswith(", distilljob_name)")
    for panel in panels(board):
        for target in panel["targets"]:
            assert 'distilljob_name=~"$distilljob"' in target["expr"], (panel["title"], target["expr"])


# ------------------------------------------------------------------------------------------------ live Prometheus
class Prometheus:
    """A real Prometheus server on 127.0.0.1 (temp config and TSDB), read through its HTTP API."""

    def __init__(self, workdir: Path, targets: dict[str, int], rule_files: list[Path]):
        from kube_cluster import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "200ms", "scrape_timeout": "200ms", "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
                               for job, port in targets.items()],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log_path = workdir / "prometheus.log"
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [binary("prometheus"), f"--config.file={workdir / 'prometheus.yml'}",
             f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
             "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def wait_ready(self) -> None:
        from kube_cluster import wait_for

        def ready():
            assert self.process.poll() is None, self.log_path.read_text()[-3000:]
            return http_get(f"{self.url}/-/ready")[0] == 200

        wait_for(ready, timeout=30, message="Prometheus /-/ready")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()

    def api(self, path: str, **params) -> object:
        """GET /api/v1/<path>; the ``data`` of a success, else an AssertionError with Prometheus' error."""
        import urllib.error
        import urllib.parse
        import urllib.request

        query = urllib.parse.urlencode(params, doseq=True)
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=30) as response:
                reply = json.load(response)
        except urllib.error.HTTPError as error:
            reply = json.load(error)
        assert reply["status"] == "success", f"{params.get('query', params)}: {reply.get('error')}"
        return reply["data"]

    def query(self, expr: str, at: float) -> list[dict]:
        return self.api("query", query=expr, time=at)["result"]

    def query_range(self, expr: str, start: float, end: float, step: float = 1) -> list[dict]:
        return self.api("query_range", query=expr, start=start, end=end, step=step)["result"]


def _finite_values(result: list[dict]) -> list[float]:
    import math

    values = [float(s["value"][1]) for s in result if "value" in s]
    values += [float(v) for s in result for _, v in s.get("values", [])]
    return [v for v in values if math.isfinite(v)]


def _substitute(expr: str, variables: dict[str, str]) -> str:
    """What Grafana sends: $var / ${var} replaced (longest names first, so $__range does not eat $__rate_interval)."""
    for name in sorted(variables, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", variables[name]).replace("$" + name, variables[name])
    assert "$" not in expr, f"unknown variable in {expr}"
    return expr


@pytest.mark.k8s
def test_every_dashboard_query_and_alert_expression_works_on_a_real_prometheus(
    kube_cluster, distilljob_crd, jobs, kube_namespace, tiny_setup, local_ray, tmp_path, monkeypatch
):
    from distill_trainer.config import config_from_dict
    from distill_trainer.pipeline import DistillPipeline
    from kube_cluster import free_port, wait_for
    from tests.conftest import tiny_config_dict
    from tests.integration.operator_fixtures import distilljob

    job, trainer_port = "obs", free_port()
    t0 = time.time()
    # The operator with the chart's ServiceAccount token, as when installed (operator_fixtures.operator_credentials).
    with operator_process(operator_credentials(str(kube_cluster.kubeconfig)), kube_namespace, tmp_path) as operator_port:
        prometheus = Prometheus(tmp_path, {"kubedistill-operator": operator_port, "kubedistill-trainer": trainer_port},
                                [RULES])
        try:
            prometheus.wait_ready()
            # A DistillJob the operator launches and sees Running (we play KubeRay's part) ...
            jobs.create(distilljob(job, kube_namespace))
            jobs.rayjob(f"{job}-0")
            jobs.play_kuberay(f"{job}-0", "Running", "RUNNING")
            jobs.wait_state(job, "Running")
            # One more reconcile once Prometheus holds the counter (increase() cannot count a series' first
            # value): a change of the job's run policy.
            reconciles = 'kubedistill_reconciles_total{handler="distilljob"}'
            wait_for(lambda: prometheus.query(reconciles, time.time()), timeout=15, message="operator scraped")
            jobs.patch_spec(job, {"runPolicy": {"backoffLimit": 1}})
            wait_for(lambda: prometheus.query(f"increase({reconciles}[1m]) > 0", time.time()), timeout=15,
                     message="the reconcile of the spec change scraped")
            # ... and its trainer: a real run of the tiny models, labelled as the operator's env would label it.
            monkeypatch.setenv("KUBEDISTILL_DISTILLJOB_NAME", job)
            monkeypatch.setenv("KUBEDISTILL_DISTILLJOB_NAMESPACE", kube_namespace)
            monkeypatch.setenv("KUBECONFIG", str(kube_cluster.kubeconfig))  # its progress reports, too
            config = tiny_config_dict(tiny_setup, tmp_path, max_steps=48, save_steps=24, eval_steps=24,
                                      eval_exact_match=True, exp_name="obs-test", metrics_port=trainer_port,
                                      device_peak_tflops=0.01,  # train/mfu: the MFU panel has data too
                                      eval_onpolicy_rkl=True, generation={"max_new_tokens": 6},  # its panel too
                                      metrics_linger_seconds=2)
            result = DistillPipeline(config_from_dict(config), num_threads=1, console=False).run()
            assert result.final_step == 48

            # The last scrape of the trainer (its endpoint is gone now): queries about the run are asked then.
            trainer = f'distilljob_namespace="{kube_namespace}", distilljob_name="{job}"'
            stamps = prometheus.query_range(f"timestamp(kubedistill_trainer_step{{{trainer}}})", t0, time.time())
            assert stamps, "Prometheus never scraped the trainer"
            at = max(float(v) for _, v in stamps[0]["values"])
            assert prometheus.query(f"kubedistill_trainer_step{{{trainer}}}", at)[0]["value"][1] == "48"
            # Rates and the ETA need the step seen moving: several scrapes during training.
            steps = prometheus.query_range(f"kubedistill_trainer_step{{{trainer}}}", t0, at, 0.05)[0]["values"]
            seen = sorted({int(v) for _, v in steps})
            assert len(seen) >= 3, f"the trainer was scraped at too few steps: {seen}"
            variables = {"__rate_interval": "10s", "__range": f"{int(at - t0) + 1}s", "datasource": "prometheus"}
            expected = {"job": "kubedistill-operator", "namespace": kube_namespace, "distilljob": job}

            checked = []
            for path in DASHBOARDS:
                board = json.loads(path.read_text())
                # Template variables: each label_values() query lists the value we select.
                for variable in board["templating"]["list"]:
                    if variable["type"] != "query":
                        continue
                    match = re.fullmatch(r"label_values\((.+), *(\w+)\)", variable["query"]["query"])
                    assert match, variable["query"]["query"]
                    values = prometheus.api(f"label/{match[2]}/values", start=t0, end=at,
                                            **{"match[]": _substitute(match[1], variables)})
                    assert expected[variable["name"]] in values, (path.name, variable["name"], values)
                    variables[variable["name"]] = expected[variable["name"]]
                for panel in panels(board):
                    for target in panel["targets"]:
                        expr = _substitute(target["expr"], variables)
                        result = (prometheus.query(expr, at) if target.get("instant")
                                  else prometheus.query_range(expr, t0, at))
                        assert _finite_values(result), f"{path.name} / {panel['title']}: no data for {expr}"
                        checked.append(expr)
            assert len(checked) >= 30

            # Alert expressions: they parse and evaluate on the real series, and none holds in this healthy run ...
            rules = alert_rules()
            for rule in rules:
                assert prometheus.query(rule["expr"], at) == [], (rule["alert"], "holds in a healthy run")
            # ... until the trainer's series are gone while the operator still says Running: the join of the
            # operator's and the trainer's job labels works on real series.
            missing = next(r["expr"] for r in rules if r["alert"] == "KubedistillTrainerMetricsMissing")
            found = wait_for(lambda: prometheus.query(missing, time.time()), timeout=15,
                             message="KubedistillTrainerMetricsMissing's expression after the trainer stopped")
            assert [s["metric"] for s in found] == [{"distilljob_namespace": kube_namespace, "distilljob_name": job}]

            # Prometheus loaded the rules file and evaluates every rule without error.
            def evaluated():
                groups = prometheus.api("rules")["groups"]
                loaded = [r for g in groups for r in g["rules"]]
                return loaded if all(r["lastEvaluation"] > "2000" for r in loaded) else None

            loaded = wait_for(evaluated, timeout=15, message="rules evaluated")
            assert {r["name"] for r in loaded} == {r["alert"] for r in rules}
            assert all(r["health"] == "ok" for r in loaded), [(r["name"], r.get("lastError")) for r in loaded]
            assert [a for a in prometheus.api("alerts")["alerts"] if a["state"] == "firing"] == []
        finally:
            prometheus.stop()


def test_dashboards_and_alerts_use_only_exported_metric_names():
    """A typo in a metric name is caught here even without Prometheus (the live test then finds no data)."""
    from prometheus_client import REGISTRY

    from distill_operator import metrics  # noqa: F401  (registers the operator's families)
    from distill_trainer import prometheus_sink

    exported = {v for k, v in vars(prometheus_sink).items() if k.isupper() and str(v).startswith("kubedistill_")}
    for family in REGISTRY.collect():
        if family.name.startswith("kubedistill_"):
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
            exported |= {family.name + suffix for suffix in suffixes}
    used = set()
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        exprs = [t["expr"] for p in panels(board) for t in p["targets"]]
        exprs += [v["query"]["query"] for v in board["templating"]["list"] if v["type"] == "query"]
        used |= {name for expr in exprs for name in re.findall(r"\bkubedistill_\w+", expr)}
    used |= {name for rule in alert_rules() for name in re.findall(r"\bkubedistill_\w+", rule["expr"])}
    assert used - exported == set()
    # And every trainer metric is on the training dashboard.
    assert {n for n in exported if n.startswith("kubedistill_trainer_")} <= used
