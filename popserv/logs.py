"""
What a session did, and the one log line an administrator greps for when it
ends (compare Dovecot's C{pop3_logout_format}).

The line is a C{twisted.logger} event: its text comes from a configurable
template, and every field is also in the event itself, so the JSON observer
(C{twistd --logger popserv.logs.json ...}) ships them structured. Passwords
and AUTH payloads are never part of any event.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    Logger,
    formatEventAsClassicLogText,
    formatTime,
    jsonFileLogObserver,
)

__all__ = [
    "SessionStats",
    "DEFAULT_LOGOUT_FORMAT",
    "LOGOUT_FIELDS",
    "ClassicText",
    "json",
    "text",
    "validateFormat",
]

_log = Logger(namespace="popserv.session")

#: The logout line; every name in L{LOGOUT_FIELDS} may be used.
DEFAULT_LOGOUT_FORMAT = (
    "session end: user={user} ip={ip} tls={tls} mechanism={mechanism} reason={reason} "
    "duration={duration:.3f}s retr={retr}/{retr_bytes} top={top}/{top_bytes} "
    "dele={dele} removed={removed} left={left} bytes_out={bytes_out}"
)

LOGOUT_FIELDS = (
    "user",
    "ip",
    "port",
    "tls",
    "mechanism",
    "reason",
    "duration",
    "retr",
    "retr_bytes",
    "top",
    "top_bytes",
    "dele",
    "removed",
    "left",
    "bytes_out",
    "commands",
    "bad_commands",
    "backend_host",
)


@dataclass(slots=True)
class SessionStats:
    """Counters of one connection (kept by L{popserv.recorder.SessionRecorder})."""

    ip: str = "-"
    port: int = 0
    started: float = field(default_factory=time.monotonic)
    user: str = "-"
    mechanism: str = "-"
    tls: bool = False
    reason: str = "disconnect"
    retr: int = 0
    retr_bytes: int = 0
    top: int = 0
    top_bytes: int = 0
    dele: int = 0
    removed: int = 0
    left: int = 0
    bytes_out: int = 0
    commands: int = 0
    bad_commands: int = 0
    #: The server a proxied session was relayed to (L{popserv.proxy}).
    backend_host: str = "-"
    perCommand: dict[str, int] | None = None

    def command(self, verb: str) -> None:
        """Count a command by verb (for metrics; L{commands} is the protocol's)."""
        if self.perCommand is None:
            self.perCommand = {}
        self.perCommand[verb] = self.perCommand.get(verb, 0) + 1

    def fields(self) -> dict[str, Any]:
        """The values the logout line may name (L{LOGOUT_FIELDS})."""
        values = {name: getattr(self, name) for name in _PLAIN_FIELDS}
        values["tls"] = "yes" if self.tls else "no"
        values["duration"] = time.monotonic() - self.started
        return values

    def log(self, template: str) -> None:
        """Emit the logout line: one event, all fields in it."""
        self.logFields(template, self.fields())

    def logFields(self, template: str, fields: dict[str, Any]) -> None:
        """Emit the logout line for C{fields} (as L{fields} gave them)."""
        # str.format does the template once, and the finished line is the
        # event's format, braces escaped: the observer's formatter (several
        # times slower) then has no field to look up. session_line keeps it too.
        line = template.format(**fields)
        _log.info(line.replace("{", "{{").replace("}", "}}"), session_line=line, **fields)


def validateFormat(template: str) -> None:
    """Raise ValueError unless C{template} formats with the logout fields."""
    sample = SessionStats().fields()
    try:
        template.format(**sample)
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"bad logout format ({e}); fields: {', '.join(LOGOUT_FIELDS)}") from None


class ClassicText:
    """
    Format events as Twisted's text observer does (C{"TIME [SYSTEM] TEXT"},
    C{formatEventAsClassicLogText}), the same characters, for less: the
    timestamp is made once a second rather than once a line (Twisted's takes
    about 11 us a line; a whole line then costs about 12 us, this one 2-3),
    and a logout line is its own text, not formatted again.
    """

    __slots__ = ("_last",)

    def __init__(self) -> None:
        #: The last second formatted, and its text (one tuple: threads log too).
        self._last: tuple[int, str] = (-1, "")

    def formatTime(self, when: float | None) -> str:
        """RFC 3339 local time to the second, as C{twisted.logger.formatTime}."""
        if when is None:
            return "-"
        # The second datetime.fromtimestamp shows: rounded to the microsecond first.
        fraction, whole = math.modf(when)
        micros = round(fraction * 1e6)
        second = int(whole) + (1 if micros >= 1_000_000 else -1 if micros < 0 else 0)
        last = self._last
        if last[0] != second:
            last = self._last = (second, formatTime(second))
        return last[1]

    def __call__(self, event: dict[str, Any]) -> str | None:
        line = event.get("session_line")
        level = event.get("log_level")
        if (
            line
            and level is not None
            and event.get("log_namespace") == _log.namespace
            and "log_system" not in event
            and "log_failure" not in event
        ):
            stamp = self.formatTime(event.get("log_time"))
            text = f"{stamp} [{_log.namespace}#{level.name}] {line}"
            return text.replace("\n", "\n\t") + "\n"
        return formatEventAsClassicLogText(event, formatTime=self.formatTime)


def text() -> ILogObserver:
    """
    A log observer writing Twisted's text lines to standard output, cheaper
    (see L{ClassicText}): C{twistd --logger popserv.logs.text -n popserv ...};
    C{popserv serve} gives it to its workers.
    """
    return FileLogObserver(sys.stdout, ClassicText())


def json() -> ILogObserver:
    """
    A log observer writing one JSON object a line to standard output, for log
    shippers: C{twistd --logger popserv.logs.json -n popserv ...}.
    """
    return jsonFileLogObserver(sys.stdout)


_PLAIN_FIELDS = tuple(name for name in LOGOUT_FIELDS if name not in ("tls", "duration"))
