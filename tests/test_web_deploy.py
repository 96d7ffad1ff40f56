"""deploy/: the Prometheus rules pass `promtool check rules` and their unit tests
(`promtool test rules`), and every metric the rules and the Grafana dashboard use is one the
daemon exposes (a renamed metric would silently empty a panel or never fire an alert)."""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from orchestrator import metrics
from orchestrator.web import queries
from tests import harness

DEPLOY = harness.ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "bes-orchestrator.json"
PROMTOOL = shutil.which("promtool")
_NAME = re.compile(r"\b((?:bes_orchestrator|process)_[a-z_]+)\b")


def exposed_names() -> set[str]:
    """Every sample name the daemon's registry can expose (labelled series given a value)."""
    from prometheus_client import parser

    metrics.register_process_metrics()
    for c in (metrics.jobs_finished, metrics.job_duration):
        c.labels("svc", "done")
    for c2 in (metrics.transient_errors, metrics.internal_errors, metrics.throttled,
               metrics.polls, metrics.files_seen, metrics.files_claimed,
               metrics.bytes_uploaded, metrics.bytes_downloaded):
        c2.labels("svc")
    metrics.files_rejected.labels("unreadable")
    metrics.backend_calls.labels("svc", "submit", "2xx")
    metrics.backend_call_seconds.labels("svc", "submit")
    metrics.database.snapshot = queries.snapshot(
        [("svc", "started", "NotStarted", 1, dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
          dt.datetime(2026, 1, 1, tzinfo=dt.UTC))], {}, services=["svc"],
        now=dt.datetime(2026, 1, 2, tzinfo=dt.UTC), query_s=0.001)
    from prometheus_client import generate_latest

    text = generate_latest(metrics.REGISTRY).decode()
    return {s.name for f in parser.text_string_to_metric_families(text) for s in f.samples}


def test_rules_and_dashboard_use_only_exposed_metrics() -> None:
    names = exposed_names()
    rules = RULES.read_text()
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used_in_rules = set(_NAME.findall(rules))
    used_in_dashboard = set(_NAME.findall("\n".join(exprs)))
    assert used_in_rules and used_in_dashboard
    assert used_in_rules - names == set()
    assert used_in_dashboard - names == set()
    assert "up{" in rules  # the scrape itself: daemon down


def test_dashboard_is_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for p in dashboard["panels"]:
        if p["type"] == "row":
            continue
        assert p["targets"] and all(t["expr"] and t["refId"] for t in p["targets"]), p["title"]
        assert p["datasource"]["uid"] == "${datasource}"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables == {"datasource", "job", "service"}


@pytest.mark.skipif(PROMTOOL is None, reason="promtool (Debian package prometheus) not installed")
def test_promtool_checks_and_unit_tests_the_rules() -> None:
    assert PROMTOOL is not None
    check = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 7 rules found" in check.stdout
    unit = subprocess.run([PROMTOOL, "test", "rules", "alerts.test.yml"],
                          cwd=RULES.parent, capture_output=True, text=True, timeout=60)
    assert unit.returncode == 0, unit.stdout + unit.stderr
    assert "SUCCESS" in unit.stdout


def test_scrape_config_points_at_the_default_listener() -> None:
    from orchestrator import config

    text = (DEPLOY / "prometheus" / "scrape.yml").read_text()
    assert "job_name: bes-orchestrator" in text
    default = config.HttpConfig().listen
    assert f'"{default}"' in text
    assert Path(RULES).read_text().count('job="bes-orchestrator"') >= 2
