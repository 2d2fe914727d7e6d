"""
The scale-out page's files (docs/guide/scaleout.rst): the node configuration
is one popserv accepts, and the Grafana dashboard queries only metrics, and
labels, that popserv exports, so the two cannot drift apart.
"""

from __future__ import annotations

import json
import re

from prometheus_client import Counter, Gauge, Histogram

from popserv.config import loadConfig
from popserv.metrics import Metrics
from support import REPO

_SUFFIXES = {Counter: ("_total",), Gauge: ("",), Histogram: ("_bucket", "_sum", "_count")}
#: Labels Prometheus adds (instance, job) or histograms have (le).
_ADDED_LABELS = {"instance", "job", "le"}


def exported() -> dict[str, set[str]]:
    """Every series name popserv's metrics expose -> the labels it carries."""
    names: dict[str, set[str]] = {}
    for metric in vars(Metrics()).values():
        for kind, suffixes in _SUFFIXES.items():
            if isinstance(metric, kind):
                for suffix in suffixes:
                    names[metric._name + suffix] = set(metric._labelnames) | _ADDED_LABELS
    return names


def dashboardQueries() -> list[str]:
    dashboard = json.loads((REPO / "etc" / "grafana-popserv.json").read_text())
    queries = []
    for panel in dashboard["panels"]:
        queries += [target["expr"] for target in panel.get("targets", ())]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            queries.append(variable["definition"])
    return queries


def test_every_metric_the_dashboard_queries_is_exported():
    names = exported()
    assert "popserv_logins_total" in names  # the test's own sanity
    queries = dashboardQueries()
    assert len(queries) >= 15
    used = set()
    for query in queries:
        for name in re.findall(r"\bpopserv_[a-z_]+", query):
            assert name in names, f"{name} (in {query!r}) is not a metric popserv exports"
            used.add(name)
        # Labels matched ({label="..."}) or grouped by (by (a, b)) must be the metric's.
        for name, matchers in re.findall(r"\b(popserv_[a-z_]+)\{([^}]*)\}", query):
            for label in re.findall(r"(\w+)\s*[!=]~?", matchers):
                assert label in names[name], f"{name} has no label {label!r} ({query!r})"
        metrics = re.findall(r"\bpopserv_[a-z_]+", query)
        for group in re.findall(r"\bby \(([^)]*)\)", query):
            for label in (x.strip() for x in group.split(",")):
                assert all(label in names[m] for m in metrics), f"by {label!r} in {query!r}"
    # The cluster at a glance: logins, failures, sessions, bytes, backend latency.
    for wanted in (
        "popserv_logins_total",
        "popserv_connections_open",
        "popserv_sent_bytes_total",
        "popserv_backend_seconds_bucket",
    ):
        assert wanted in used


def test_dashboard_shows_each_node():
    queries = dashboardQueries()
    assert any("by (instance" in q and "popserv_backend_seconds_bucket" in q for q in queries)
    assert any("by (instance" in q and 'result!="ok"' in q for q in queries)


def test_node_configuration_is_valid():
    config = loadConfig(REPO / "etc" / "node.conf").validated()
    assert config.store[0] == "pgsql"
    assert all(e.startswith("haproxy:") for e in config.listen + config.listen_tls)
    assert config.haproxy_trusted_networks
    assert config.lmtp
    assert config.metrics
