"""C{popserv check-config}: every problem of a configuration, one a line."""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from typing import Any

from popserv.admin.common import (
    EX_OK,
    EX_PROBLEMS,
    configFrom,
)
from popserv.config import DEFAULT_STORE, Config, ConfigError

__all__ = ["checkConfig", "cmdCheckConfig"]


def checkConfig(config: Config) -> list[str]:
    """Every problem of a configuration, one line each (empty: all well)."""
    from twisted.internet import endpoints, reactor

    from popserv.build import makeChecker
    from popserv.threads import synchronously

    problems: list[str] = []
    try:
        config.validated()
    except ConfigError as e:
        return [str(e)]
    metrics = (config.metrics,) if config.metrics else ()
    for description in (*config.listen, *config.listen_tls, *metrics, *config.lmtp):
        try:
            endpoints.serverFromString(reactor, description)
        except Exception as e:  # endpoint parsers raise all sorts
            problems.append(f"listen: bad endpoint {description!r}: {e!r}")
    if config.mail_location:  # (none: a server that only proxies)
        problems += _storeProblems(config)
        kind = config.store[0]
        if config.uidl_source != "native" and kind != DEFAULT_STORE:
            # A warning: the server runs, but serves the store's own UIDLs.
            print(
                f"warning: uidl_source = {config.uidl_source} applies to Maildir stores only; "
                f"the {kind} store ignores it"
                + (" (its X-UIDL rule is always on)" if kind == "mbox" else "")
            )
    if config.passdb:  # the passwd shorthand is read below, user by user
        try:
            checker = makeChecker(replace(config, passwd=None), reactor, synchronously)
        except ConfigError as e:
            problems.append(str(e))
        else:
            for source in getattr(checker, "sources", (checker,)):
                problems += _statusProblems(f"passdb {source!r}", source)
    if config.passwd:
        problems += _passwdProblems(config)
    return problems + _mechanismProblems(config, reactor) + _tlsProblems(config)


def _statusProblems(label: str, part: Any) -> list[str]:
    """A store or auth source that can say how it is (a database: reached,
    its schema) says it; either way it is closed."""
    status = getattr(part, "status", None)
    try:
        if status is not None:
            print(f"{label}: {status()}")
        return []
    except Exception as e:
        return [f"{label}: {str(e) or repr(e)}"]
    finally:
        getattr(part, "close", lambda: None)()


def _mechanismProblems(config: Config, reactor: Any) -> list[str]:
    """
    The sources of the password-less mechanisms say whether they can be
    used: the GSSAPI keytab (readable, the service key in it), the OAuth
    JWKS or introspection endpoint (fetched once).
    """
    from popserv.build import makeTokenValidator
    from popserv.sasl.gssapi import GSSAPI
    from popserv.threads import synchronously

    offered = {m.upper() for m in config.sasl_mechanisms} if config.sasl_mechanisms else None
    problems: list[str] = []
    if config.gssapi_keytab and (offered is None or "GSSAPI" in offered):
        try:
            mechanism = GSSAPI.configured(
                config.path(config.gssapi_keytab),
                config.gssapi_principal,
                config.gssapi_realm_map,
                synchronously,
            )
            print(f"gssapi: {mechanism.status()}")
        except ValueError as e:
            problems.append(f"gssapi_keytab: {e}")
    if offered is None or offered & {"OAUTHBEARER", "XOAUTH2"}:
        try:
            tokens = makeTokenValidator(config, reactor)
            if tokens is not None:
                print(f"oauth: {tokens.status()}")
        except (ConfigError, ValueError) as e:
            setting = "oauth_jwks" if config.oauth_jwks else "oauth_introspection"
            problems.append(str(e) if isinstance(e, ConfigError) else f"{setting}: {e}")
    return problems


def _passwdProblems(config: Config) -> list[str]:
    """What is wrong with the passwd-file and, for Maildirs, its users' maildrops."""
    from popserv.auth.passwdfile import parsePasswdFile

    problems: list[str] = []
    users: dict[str, object] = {}
    try:
        with open(config.passwdPath, encoding="utf-8") as f:
            users = dict(parsePasswdFile(f.read(), config.passwdPath, problems))
    except OSError as e:
        problems.append(f"passwd: cannot read {config.passwdPath}: {e.strerror}")
    if not users and not problems:
        problems.append(f"passwd: {config.passwdPath} has no users")
    if config.store[0] != DEFAULT_STORE:
        return problems
    location = config.location
    for user in users:
        try:
            path = location.expand(user)
        except Exception as e:
            problems.append(f"user {user}: cannot name a maildrop ({e})")
            continue
        if os.path.isdir(path):
            if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
                problems.append(f"user {user}: {path} is not readable and writable")
        elif not config.create_maildirs:
            problems.append(f"user {user}: {path} does not exist")
    return problems


def _tlsProblems(config: Config) -> list[str]:
    from popserv.tls import ServerTLS, TLSError

    problems = []
    if config.tlsEnabled:
        try:
            ServerTLS(
                config.path(config.tls_cert),
                config.path(config.tls_key),
                config.path(config.tls_client_ca),
                selfSignedHosts=None if config.tls_cert else ["localhost"],
            )
        except TLSError as e:
            problems.append(f"tls: {e}")
    return problems


def cmdCheckConfig(args: argparse.Namespace) -> int:
    problems = checkConfig(configFrom(args))
    for problem in problems:
        print(problem)
    if not problems:
        print("configuration OK")
    return EX_PROBLEMS if problems else EX_OK


def _storeProblems(config: Any) -> list[str]:
    from popserv.build import makeStore
    from popserv.threads import synchronously

    try:
        store = makeStore(config, synchronously)
    except ConfigError as e:
        return [str(e)]
    problems = _statusProblems("mail_location", store)
    from popserv.backends.maildir.foreign import storeNote

    note = storeNote(store)
    if note:
        print(note)  # a remark, not a problem
    return problems
