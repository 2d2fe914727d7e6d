"""
What one session reports: its counters (L{SessionStats}), the metrics it
feeds, and its one logout line. The protocol tells the recorder what
happened; only the recorder knows where that goes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from popserv.logs import SessionStats

if TYPE_CHECKING:
    from popserv.metrics import Metrics

__all__ = ["SessionRecorder"]


@dataclass(slots=True)
class SessionRecorder(SessionStats):
    """
    The counters of one connection and the reports made from them.

    It is the stats themselves, not an object beside them: an idle session
    pays for one more slot, not one more object.

    @ivar metrics: where counts go, if the server keeps metrics.
    """

    metrics: Metrics | None = None

    def opened(self, secure: bool) -> None:
        """The connection was admitted."""
        metrics = self.metrics
        if metrics is not None:
            metrics.open.inc()
            metrics.connections.labels("yes" if secure else "no").inc()

    def loggedIn(self, user: str, mechanism: str) -> None:
        """C{user} logged in with C{mechanism} (C{USER}, C{APOP} or a SASL name)."""
        self.user = user
        self.mechanism = mechanism
        self._countLogin("ok", mechanism)

    def loginFailed(self, result: str, mechanism: str) -> None:
        """A login failed: C{failed}, C{in_use}, C{login_delay} or C{error}."""
        self._countLogin(result, mechanism)

    def _countLogin(self, result: str, mechanism: str) -> None:
        metrics = self.metrics
        if metrics is not None:
            metrics.logins.labels(result, mechanism).inc()
            if result == "in_use":
                metrics.lockConflicts.inc()

    def penalized(self) -> None:
        """A failed login is answered late (L{popserv.limits.AuthPenalty})."""
        if self.metrics is not None:
            self.metrics.authPenalties.inc()

    def backend(self, operation: str, started: float) -> None:
        """A storage operation begun at C{started} (C{time.monotonic}) finished."""
        if self.metrics is not None:
            self.metrics.backend.labels(operation).observe(time.monotonic() - started)

    def ended(self, logoutFormat: str, tls: bool) -> None:
        """The session is over: write its logout line and fold it into the metrics."""
        self.tls = tls
        fields = self.fields()
        if self.backend_host != "-" and "{backend_host}" not in logoutFormat:
            logoutFormat += " backend={backend_host}"  # a proxied session names its backend
        self.logFields(logoutFormat, fields)
        if self.metrics is not None:
            self.metrics.sessionEnded(self, fields["duration"])
