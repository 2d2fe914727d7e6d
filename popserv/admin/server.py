"""
C{popserv db}, C{serve} and C{selfsigned}: a database's schema, worker
processes, a certificate to try TLS.
"""

from __future__ import annotations

import argparse
import os

from popserv.admin.common import (
    EX_OK,
    EX_PROBLEMS,
    EX_TEMPFAIL,
    EX_USAGE,
    AdminError,
    configFrom,
)
from popserv.admin.options import givenSettings
from popserv.config import ConfigError

__all__ = ["cmdDb", "cmdServe", "cmdSelfSigned"]


def cmdDb(args: argparse.Namespace) -> int:
    """Create, upgrade or report the schema of the mail location's database."""
    config = configFrom(args)
    kind, uri = config.store if config.mail_location else ("", "")
    if kind != "pgsql":  # users alone in PostgreSQL
        kind, uri = next(((s.kind, s.args) for s in config.passdb if s.kind == "pgsql"), ("", ""))
    if kind != "pgsql":
        raise AdminError(
            "needs --mail-location pgsql:URI or --passdb pgsql:URI (or a configuration with one)",
            EX_USAGE,
        )
    import psycopg

    from popserv.backends.pgsql.connections import connectionInfo
    from popserv.backends.pgsql.schema import CURRENT, SchemaError, migrate, schemaVersion

    try:
        with psycopg.connect(connectionInfo(uri), autocommit=True) as conn:
            if args.action == "status":
                version = schemaVersion(conn)
                state = "up to date" if version == CURRENT else f"this popserv needs {CURRENT}"
                print(f"schema version {version} ({state})")
                return EX_OK if version == CURRENT else EX_PROBLEMS
            if args.action == "init" and schemaVersion(conn) > 0:
                raise AdminError("the schema exists already: use popserv db upgrade")
            before, after = migrate(conn)
    except psycopg.OperationalError as e:
        raise AdminError(f"cannot reach the database: {str(e).strip()}", EX_TEMPFAIL) from None
    except psycopg.Error as e:  # (e.g. no right to create tables: the role is not the owner)
        raise AdminError(f"the database refused: {str(e).strip()}") from None
    except SchemaError as e:
        raise AdminError(str(e)) from None
    print(f"schema version {after}" + (f" (was {before})" if before != after else " (unchanged)"))
    return EX_OK


def cmdServe(args: argparse.Namespace) -> int:
    from popserv.tap import buildConfig
    from popserv.workers import Supervisor

    given = givenSettings(args)
    try:
        config = buildConfig(getattr(args, "config", None), given)
        supervisor = Supervisor(getattr(args, "config", None), config, args.workers, given)
    except (ConfigError, ValueError, OSError) as e:
        raise AdminError(str(e), EX_USAGE) from None
    return supervisor.run()


def cmdSelfSigned(args: argparse.Namespace) -> int:
    from popserv.tls import selfSigned

    os.makedirs(args.directory, exist_ok=True)
    certPEM, keyPEM = selfSigned(args.hosts or ["localhost"])
    keyPath = os.path.join(args.directory, "key.pem")
    fd = os.open(keyPath, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(keyPEM)
    certPath = os.path.join(args.directory, "cert.pem")
    with open(certPath, "wb") as f:
        f.write(certPEM)
    print(f"wrote {certPath} and {keyPath}")
    return EX_OK
