"""
The per-user routing fields, with Dovecot's names, as an auth source reads
them from a user's extra fields (passwd-file) or columns (SQL):

  - C{proxy}: proxy this user (C{y}, C{yes}, C{1} or the bare word);
  - C{host}, C{port}: the user's own backend;
  - C{destuser}: the name to log in as at the backend;
  - C{proxy_timeout}: seconds to reach and log in to a backend;
  - C{starttls}, C{ssl}: TLS to the user's own backend (STLS, or implicit);
    C{any-cert} as the value skips the certificate's verification.

A yes/no field that is absent means no. The settings' names are those of
L{popserv.policy.IUserSettingsSource.settingsFor}'s dictionary.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ROUTING_FIELDS", "routingSetting", "yes"]

#: Field names and the settings they set.
ROUTING_FIELDS = {
    "proxy": "proxy",
    "host": "proxyHost",
    "port": "proxyPort",
    "destuser": "proxyDestUser",
    "proxy_timeout": "proxyTimeout",
    "starttls": "proxyStartTLS",
    "ssl": "proxySSL",
}

_YES = frozenset({"y", "yes", "1", "true", "any-cert"})


def yes(value: object) -> bool:
    """Dovecot's booleans: C{y}, C{yes}, C{1} (and a bare field, given as None or "")."""
    if value is None or value is True:
        return True
    text = str(value).strip().lower()
    return text == "" or text in _YES


def routingSetting(field: str, value: Any) -> tuple[str, Any] | None:
    """
    The (setting, value) of a routing C{field} (None if C{field} is not
    one); ValueError for a bad value.
    """
    setting = ROUTING_FIELDS.get(field)
    if setting is None:
        return None
    if field == "proxy":
        return setting, yes(value)
    if field in ("starttls", "ssl"):
        if value is not None and str(value).strip().lower() == "any-cert":
            return setting, "any-cert"
        return setting, yes(value)
    if field in ("port", "proxy_timeout"):
        number = int(value)
        if not 0 < number < (65536 if field == "port" else 86401):
            raise ValueError(f"{field} out of range")
        return setting, number
    if value is None or not str(value).strip():
        raise ValueError(f"{field} needs a value")
    return setting, str(value).strip()
