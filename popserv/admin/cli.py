"""The C{popserv} command line: its parser, and L{main}."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from popserv.admin.check import cmdCheckConfig
from popserv.admin.common import (
    EX_TEMPFAIL,
    AdminError,
)
from popserv.admin.mail import addPOPSourceOptions, cmdDeliver, cmdMigrate, cmdUidl
from popserv.admin.options import addSettings, positive, schemeNames
from popserv.admin.sandbox import cmdSandbox
from popserv.admin.server import cmdDb, cmdSelfSigned, cmdServe
from popserv.admin.users import cmdPw, cmdUser

__all__ = ["main"]

#: The settings most commands take (the server's configuration, where users and mail are).
_COMMON = ("passwd", "mail_location", "passdb")


def _parser(serveOptions: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="popserv",
        description="Administer a popserv POP3 server. Options may come before or after "
        "a command's name.",
    )
    addSettings(parser, _COMMON)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, run: object, help: str, settings: bool = True, **kw: object) -> Any:
        p = sub.add_parser(name, help=help, description=help, **kw)
        if settings:
            addSettings(p, _COMMON)
        p.set_defaults(run=run)
        return p

    def passwordOptions(p: argparse.ArgumentParser) -> None:
        p.add_argument("--scheme", "-s", default="ARGON2ID", help=f"one of {schemeNames()}")
        p.add_argument(
            "--password-stdin",
            action="store_true",
            help="read the password from the first line of standard input",
        )

    pw = command(
        "pw", cmdPw, "hash a password for the passwd-file", settings=False, aliases=["passwd"]
    )
    passwordOptions(pw)

    user = sub.add_parser("user", help="add, delete or list passwd-file users")
    addSettings(user, _COMMON)
    actions = user.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, help in (("add", "add a user"), ("del", "delete a user"), ("list", "list users")):
        p = actions.add_parser(action, help=help, description=help)
        addSettings(p, _COMMON)
        if action != "list":
            p.add_argument("name", help="the user name")
        if action == "add":
            passwordOptions(p)
        p.set_defaults(run=cmdUser)

    deliverCmd = command(
        "deliver", cmdDeliver, "deliver a message from standard input (usable as an MDA)"
    )
    deliverCmd.add_argument("user")
    deliverCmd.add_argument(
        "--verbose", "-v", action="store_true", help="print the delivered file's path"
    )

    command("check-config", cmdCheckConfig, "report every problem of a configuration")

    uidl = command("uidl", cmdUidl, "print the UIDLs the server would serve a user")
    uidl.add_argument("user")
    uidl.add_argument("--sizes", action="store_true", help="also print each message's size")

    db = sub.add_parser("db", help="create, upgrade or report a pgsql: store's schema")
    addSettings(db, _COMMON)
    dbActions = db.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, help in (
        ("init", "create the schema in an empty database"),
        ("upgrade", "apply the migrations the database lacks"),
        ("status", "print the schema version (exit 1 if not this popserv's)"),
    ):
        p = dbActions.add_parser(action, help=help, description=help)
        addSettings(p, _COMMON)
        p.set_defaults(run=cmdDb)
    migrateCmd = command("migrate", cmdMigrate, "copy maildrops to another store, keeping UIDLs")
    migrateCmd.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="KIND:ARGS|URL",
        help="a store, or a live POP3 server: pop://USER;auth=*@HOST:PORT (pop3s:// for TLS)",
    )
    migrateCmd.add_argument("--to", dest="target", required=True, metavar="KIND:ARGS")
    migrateCmd.add_argument("--user", dest="users", action="append", help="only USER (repeatable)")
    addPOPSourceOptions(migrateCmd)

    serve = command(
        "serve",
        cmdServe,
        "run N worker processes sharing the listening sockets (all cores); takes every "
        "setting twistd popserv takes",
        settings=False,
    )
    if serveOptions:
        addSettings(serve)
    serve.add_argument(
        "--workers",
        "-w",
        type=positive,
        default=os.cpu_count() or 1,
        help="worker processes [default: one per core]",
    )

    cert = command(
        "selfsigned", cmdSelfSigned, "write a self-signed cert.pem and key.pem", settings=False
    )
    cert.add_argument("directory")
    cert.add_argument("hosts", nargs="*", help="host names [default: localhost]")

    sandbox = command(
        "sandbox",
        cmdSandbox,
        "serve a copy of a directory of .eml files (or an mbox) to try a mail client",
        settings=False,
    )
    sandbox.add_argument("source", help="a directory of .eml files, or an mbox file")
    sandbox.add_argument("--host", default="127.0.0.1", help="[default: 127.0.0.1]")
    sandbox.add_argument("--port", type=int, default=1110, help="0: any [default: 1110]")
    sandbox.add_argument("--tls", action="store_true", help="offer STLS and implicit TLS")
    sandbox.add_argument("--tls-port", type=int, default=1995, help="[default: 1995]")
    sandbox.add_argument("--user", default="sandbox", help="[default: sandbox]")
    sandbox.add_argument("--password", help="[default: a random one, printed]")
    sandbox.add_argument("--keep", action="store_true", help="keep the copy when stopping")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # serve's options come from every plugin: found only when serve is asked for.
    args = _parser(serveOptions="serve" in argv or "-h" in argv).parse_args(argv)
    try:
        return int(args.run(args))
    except AdminError as e:
        print(f"popserv {args.command}: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        return EX_TEMPFAIL
