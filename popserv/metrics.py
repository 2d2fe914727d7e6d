"""
Prometheus metrics (text format, via prometheus-client on twisted.web),
served on their own endpoint when C{--metrics} is given; off otherwise.

Under C{popserv serve}, every worker keeps its metrics in files in the
directory C{PROMETHEUS_MULTIPROC_DIR} names (prometheus-client's
multiprocess mode), and whichever worker answers a scrape serves the sum
of them all: one endpoint for the whole server.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from popserv.logs import SessionStats

if TYPE_CHECKING:
    from twisted.web.server import Site

__all__ = ["Metrics", "metricsSite", "MULTIPROCESS_DIR"]

#: The environment variable naming the directory of the workers' metrics files.
MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"

_DURATIONS = (0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600)
_LATENCIES = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5)


class Metrics:
    """The server's metrics, in their own registry (several servers per process work)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        #: What a scrape shows: this registry, or in multiprocess mode every
        #: process's files added up.
        self.exposed = self.registry
        if os.environ.get(MULTIPROCESS_DIR):
            from prometheus_client.multiprocess import MultiProcessCollector

            self.exposed = CollectorRegistry()
            MultiProcessCollector(self.exposed)
        r = self.registry
        self.connections = Counter(
            "popserv_connections", "Connections accepted", ["tls"], registry=r
        )
        self.open = Gauge(
            "popserv_connections_open",
            "Connections open now",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.logins = Counter(
            "popserv_logins",
            "Login attempts by result and mechanism",
            ["result", "mechanism"],
            registry=r,
        )
        self.commands = Counter("popserv_commands", "Commands received", ["command"], registry=r)
        self.bytesSent = Counter(
            "popserv_sent_bytes", "Bytes of message data sent", ["command"], registry=r
        )
        self.sessions = Histogram(
            "popserv_session_duration_seconds",
            "Connection lifetimes",
            ["reason"],
            buckets=_DURATIONS,
            registry=r,
        )
        self.lockConflicts = Counter(
            "popserv_lock_conflicts", "Logins refused because the maildrop was locked", registry=r
        )
        self.authPenalties = Counter(
            "popserv_auth_penalties", "Failed logins answered with a delay", registry=r
        )
        self.removed = Counter(
            "popserv_messages_removed", "Messages removed in UPDATE", registry=r
        )
        self.backend = Histogram(
            "popserv_backend_seconds",
            "Storage operation latency",
            ["operation"],
            buckets=_LATENCIES,
            registry=r,
        )

    def sessionEnded(self, stats: SessionStats, duration: float) -> None:
        """Fold a finished connection's counters in."""
        self.open.dec()
        self.sessions.labels(stats.reason).observe(duration)
        for verb, n in (stats.perCommand or {}).items():
            self.commands.labels(verb).inc(n)
        if stats.retr_bytes:
            self.bytesSent.labels("RETR").inc(stats.retr_bytes)
        if stats.top_bytes:
            self.bytesSent.labels("TOP").inc(stats.top_bytes)
        if stats.removed:
            self.removed.inc(stats.removed)


def metricsSite(metrics: Metrics) -> Site:
    """A web site serving the metrics at C{/metrics}."""
    # Imported here: prometheus_client.twisted installs the global reactor on
    # import, which importing popserv must never do.
    from prometheus_client.twisted import MetricsResource
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    root = Resource()
    root.putChild(b"metrics", MetricsResource(registry=metrics.exposed))
    return Site(root)
