"""
Mail locations: Dovecot-style templates such as
C{maildir:/var/mail/%d/%n/Maildir} that turn a user name into a maildrop path.

Variables: C{%u} the whole user name, C{%n} its local part (before C{@}),
C{%d} its domain (after C{@}, empty if none), C{%%} a percent sign.
A user name that could escape the mail root is refused.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import cached_property

from popserv.errors import InvalidUserName

__all__ = ["MailLocation", "splitUser", "checkUserName"]

_VARIABLE = re.compile(r"%(.)")
_KNOWN = {"u", "n", "d", "%"}
#: Path separators and control characters: never in a user name used in a path.
_UNSAFE = re.compile(r"[/\\\x00-\x1f\x7f]")

#: User names longer than this cannot be real (RFC 5321 caps an address at 254).
MAX_USER_NAME = 254


def splitUser(user: str) -> tuple[str, str]:
    """C{local@domain} -> (local, domain); the domain is empty without an C{@}."""
    local, _, domain = user.rpartition("@") if "@" in user else (user, "", "")
    return local, domain


def checkUserName(user: str) -> None:
    """Raise L{InvalidUserName} unless C{user} is safe to use in a path."""
    if not user or len(user) > MAX_USER_NAME:
        raise InvalidUserName()
    if _UNSAFE.search(user):
        raise InvalidUserName()
    for part in (user, *splitUser(user)):
        if part in (".", ".."):
            raise InvalidUserName()


@dataclass(frozen=True)
class MailLocation:
    """A parsed mail location: the storage kind and the path template."""

    kind: str
    template: str

    @classmethod
    def parse(cls, template: str, relativeTo: str | None = None) -> MailLocation:
        """
        Parse a path template (a C{maildir:} in front is allowed). A relative
        template is made absolute against C{relativeTo} (or the working
        directory). Raises ValueError for an empty one or an unknown variable.
        """
        template = template.removeprefix("maildir:")
        if not template:
            raise ValueError("empty mail location")
        for var in _VARIABLE.findall(template):
            if var not in _KNOWN:
                raise ValueError(f"unknown variable %{var} in mail location (known: %u %n %d %%)")
        if not os.path.isabs(template):
            template = os.path.join(relativeTo or os.getcwd(), template)
        return cls("maildir", template)

    @property
    def root(self) -> str:
        """The fixed directory every expansion stays below."""
        head = self.template.split("%", 1)[0]
        return os.path.dirname(head) if "%" in self.template else head

    def expand(self, user: str) -> str:
        """The maildrop path of C{user}; L{InvalidUserName} if it is unsafe."""
        checkUserName(user)
        local, domain = splitUser(user)
        path = os.path.normpath(self._format.format(u=user, n=local, d=domain))
        if path != self._root and not path.startswith(self._below):
            raise InvalidUserName()
        return path

    @cached_property
    def _format(self) -> str:
        # The template as a str.format string, made once: %u -> {u}, %% -> %.
        return _VARIABLE.sub(
            lambda m: "%" if m.group(1) == "%" else "{" + m.group(1) + "}",
            self.template.replace("{", "{{").replace("}", "}}"),
        )

    @cached_property
    def _root(self) -> str:
        return os.path.normpath(self.root)

    @cached_property
    def _below(self) -> str:
        return self._root.rstrip(os.sep) + os.sep
