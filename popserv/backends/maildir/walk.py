"""
Finding every maildrop a mail location names, for migration: the template
walked with its variables as wildcards, each matching within one directory
level, and each path found mapped back to the user it belongs to.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

from popserv.errors import InvalidUserName
from popserv.location import MailLocation

__all__ = ["maildropUsers"]

_VARIABLE = re.compile(r"%(.)")
#: What each variable matches within a directory name (%d may be empty).
_PATTERNS = {"u": ".+?", "n": ".+?", "d": ".*?"}


def _pattern(component: str, bound: dict[str, str]) -> re.Pattern[str]:
    """One template component as a regular expression with a group per variable."""
    out: list[str] = []
    seen = set(bound)
    pos = 0
    for m in _VARIABLE.finditer(component):
        out.append(re.escape(component[pos : m.start()]))
        var = m.group(1)
        if var == "%":
            out.append("%")
        elif var in seen:
            out.append(re.escape(bound[var]) if var in bound else f"(?P={var})")
        else:
            out.append(f"(?P<{var}>{_PATTERNS[var]})")
            seen.add(var)
        pos = m.end()
    out.append(re.escape(component[pos:]))
    return re.compile("".join(out))


def _user(bound: dict[str, str]) -> str | None:
    if "u" in bound:
        return bound["u"]
    if "n" in bound:
        domain = bound.get("d", "")
        return f"{bound['n']}@{domain}" if domain else bound["n"]
    return None


def _walk(directory: str, parts: list[str], bound: dict[str, str]) -> Iterator[tuple[str, str]]:
    if not parts:
        user = _user(bound)
        if user is not None:
            yield user, directory
        return
    component, rest = parts[0], parts[1:]
    if "%" not in component:
        yield from _walk(os.path.join(directory, component), rest, bound)
        return
    if component == "%d" and "d" not in bound:
        # A user without a domain: the level is absent from the path.
        yield from _walk(directory, rest, {**bound, "d": ""})
    pattern = _pattern(component, bound)
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return
    for entry in entries:
        if entry.name[0] == ".":
            continue  # Maildir++ folders (.Trash), never a user's level
        m = pattern.fullmatch(entry.name)
        if m is None or not entry.is_dir():
            continue
        found = {k: v for k, v in m.groupdict().items() if v is not None}
        yield from _walk(entry.path, rest, {**bound, **found})


def maildropUsers(location: MailLocation) -> list[str]:
    """
    The users whose maildrop (a directory with C{cur/}) exists, sorted: a
    path counts only if expanding the user's name gives that very path, so
    every name returned opens the maildrop it was found for. A template
    with C{%u} gives whole names; with C{%n} and C{%d}, C{local@domain};
    with C{%n} alone, the local part. Names starting with a dot are not
    looked into (Maildir++ folders such as C{.Trash} are not users).
    Blocking: run it in a thread.
    """
    template = location.template.replace("%%", "\0")
    head, _, _ = template.partition("%")
    root = os.path.dirname(head) if "%" in template else head
    parts = [p.replace("\0", "%%") for p in template[len(root) :].split(os.sep) if p]
    users = set()
    for user, path in _walk(root.replace("\0", "%") or os.sep, parts, {}):
        try:
            expected = location.expand(user)
        except InvalidUserName:
            continue
        if os.path.normpath(path) == expected and os.path.isdir(os.path.join(path, "cur")):
            users.add(user)
    return sorted(users)
