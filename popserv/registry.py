"""
The plugin registry: where popserv finds its mail stores and auth sources.

Both are Twisted plugins (L{twisted.plugin}) in the C{popserv.plugins}
package, found the way C{twisted.plugins} is: any directory on C{sys.path}
holding C{popserv/plugins/NAME.py} (without an C{__init__.py} there) adds to
it, so a third-party distribution adds a store or an auth source without
touching popserv. Finding a plugin imports only C{popserv.plugins}' modules,
and those import their implementation only when it is built.

A plugin is an object providing L{IStoreKind} (a C{kind:} of
C{--mail-location}) or L{IAuthSourceKind} (a C{kind:} of C{--passdb}). Each
parses its own arguments: everything after the first colon reaches it as is.
Options a plugin declares (L{popserv.settings.Setting}s) become command-line
options and configuration keys named C{KIND_OPTION}, and keys of a
C{[[passdb]]} table of that kind.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from zope.interface import Attribute, Interface

__all__ = [
    "IStoreKind",
    "IAuthSourceKind",
    "StoreContext",
    "SourceContext",
    "storeKinds",
    "authSourceKinds",
    "storeKind",
    "authSourceKind",
    "splitSpec",
    "UnknownKind",
    "DuplicateKind",
    "forgetPlugins",
]

#: A plugin's name: what stands before the colon of a spec.
_KIND = re.compile(r"[a-z][a-z0-9-]*")


class UnknownKind(ValueError):
    """No plugin of that name is installed; the message lists those that are."""


class DuplicateKind(ValueError):
    """Two installed plugins claim one name; the message names both."""


class _IKind(Interface):
    name = Attribute("The kind, as written before the colon: C{maildir}, C{passwd-file}.")
    description = Attribute("One line for C{--help} and the documentation.")
    options = Attribute(
        "The options this kind takes, a sequence of L{popserv.settings.Setting}s "
        "(their names without the kind's prefix)."
    )

    def check(args: str, baseDir: str) -> None:
        """
        Raise ValueError (its message for the administrator) if C{args} can
        never work. Cheap and without I/O: configuration checks call it.
        """


class IStoreKind(_IKind):
    """A kind of mail storage: C{--mail-location KIND:ARGS}."""

    def makeStore(args: str, context: StoreContext) -> Any:
        """
        The L{popserv.interfaces.IMailStore} for C{args}. May do blocking I/O:
        it runs at start-up, before the reactor.
        """


class IAuthSourceKind(_IKind):
    """A kind of user database: C{--passdb KIND:ARGS}."""

    def makeSource(args: str, context: SourceContext) -> Any:
        """
        The C{twisted.cred} checker for C{args}. It fails unknown users with
        L{popserv.errors.UnknownUser}, wrong passwords with
        C{UnauthorizedLogin}, and its own outages with
        L{popserv.errors.TemporaryFailure}, so that a chain of sources can
        tell them apart. It may also provide
        L{popserv.auth.scramkeys.ISecretSource} (SASL mechanisms beyond PLAIN)
        and L{popserv.policy.IUserSettingsSource} (per-user settings).
        """


@dataclass(frozen=True)
class StoreContext:
    """
    What a store is built with.

    @ivar baseDir: relative paths are relative to it (the configuration's directory).
    @ivar runInThread: runs blocking work off the reactor (a bounded pool).
    @ivar options: this kind's options, by name without prefix, defaults filled in.
    @ivar createMissing: create a missing maildrop at first login.
    @ivar uidlSource: C{uidl_source}: where UIDLs come from at first listing
        (stores that keep UIDLs of their own ignore it).
    """

    baseDir: str
    runInThread: Callable[..., Any]
    options: Mapping[str, Any] = field(default_factory=dict)
    createMissing: bool = True
    uidlSource: str = "native"


@dataclass(frozen=True)
class SourceContext:
    """
    What an auth source is built with.

    @ivar reactor: for timers (the reactor; a Clock in tests).
    @ivar masterUsers: users who may log in as another user.
    @ivar cache: remembers successful slow-hash checks (a
        L{popserv.auth.cache.VerificationCache}), or None.
    @ivar saltKey: the key SCRAM salts derive from (shared by every process
        serving the same mail): bytes, or a
        L{popserv.auth.scramkeys.LateKey} still to be fetched (pass it to
        C{stableSalt} as it is); None for a per-process one.
    """

    baseDir: str
    runInThread: Callable[..., Any]
    reactor: Any = None
    options: Mapping[str, Any] = field(default_factory=dict)
    masterUsers: frozenset[str] = frozenset()
    cache: Any = None
    saltKey: Any = None


#: The plugins found, by interface: looked for once per process.
_found: dict[type[Interface], dict[str, Any]] = {}


def _plugins(interface: type[Interface]) -> dict[str, Any]:
    found = _found.get(interface)
    if found is None:
        from twisted.plugin import getPlugins

        import popserv.plugins

        found = {}
        for plugin in getPlugins(interface, popserv.plugins):
            other = found.setdefault(plugin.name, plugin)
            if other is not plugin:
                raise DuplicateKind(
                    f"two plugins are called {plugin.name!r}: "
                    f"{type(other).__module__}.{type(other).__name__} and "
                    f"{type(plugin).__module__}.{type(plugin).__name__}"
                )
        _found[interface] = found
    return found


def forgetPlugins() -> None:
    """Look for plugins again at the next lookup (after C{sys.path} changed)."""
    _found.clear()


def storeKinds() -> dict[str, Any]:
    """Every installed store kind, by name."""
    return _plugins(IStoreKind)


def authSourceKinds() -> dict[str, Any]:
    """Every installed auth-source kind, by name."""
    return _plugins(IAuthSourceKind)


def _lookup(kinds: Mapping[str, Any], name: str, what: str) -> Any:
    try:
        return kinds[name]
    except KeyError:
        raise UnknownKind(
            f"unknown {what} kind {name!r} (installed: {', '.join(sorted(kinds)) or 'none'})"
        ) from None


def storeKind(name: str) -> Any:
    """The store kind called C{name}; L{UnknownKind} if none is installed."""
    return _lookup(storeKinds(), name, "mail storage")


def authSourceKind(name: str) -> Any:
    """The auth-source kind called C{name}; L{UnknownKind} if none is installed."""
    return _lookup(authSourceKinds(), name, "passdb")


def splitSpec(spec: str, default: str | None = None) -> tuple[str, str]:
    """
    C{KIND:ARGS} -> (kind, args), the args untouched. Without a kind (no
    colon, or what precedes it cannot name one, as in C{/var/mail:x}), the
    whole spec is the arguments of C{default}; ValueError if there is none.
    """
    kind, sep, args = spec.partition(":")
    if sep and _KIND.fullmatch(kind):
        return kind, args
    if default is None:
        raise ValueError(f"{spec!r}: expected KIND:ARGUMENTS")
    return default, spec


def kindOptions(plugin: Any) -> Sequence[Any]:
    """The options a plugin declares (none if it declares none)."""
    return tuple(getattr(plugin, "options", ()) or ())
