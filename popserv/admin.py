"""
C{popserv}: the administrator's command (also C{python -m popserv})::

    popserv pw [--scheme ARGON2ID]            hash a password for the passwd-file
    popserv user add|del|list ...             edit a passwd-file safely
    popserv deliver USER < message            deliver into the mail store (MDA)
    popserv check-config --config FILE        report every problem, one a line
    popserv uidl USER --config FILE           the UIDLs the server would serve
    popserv db init|upgrade|status ...        the database schema of a pgsql: store
    popserv migrate --from LOC --to LOC       copy maildrops between stores
    popserv serve --workers N [OPTIONS]       N worker processes on shared sockets
    popserv selfsigned DIR [HOST...]          a self-signed certificate to try TLS

Exit codes follow sysexits(3) where Postfix and scripts look at them:
0 ok, 64 usage, 67 unknown user, 75 temporary failure (retry), 1 problems found.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from typing import IO, Any

from twisted.internet.defer import inlineCallbacks, maybeDeferred
from twisted.python.failure import Failure

from popserv.config import DEFAULT_STORE, Config, ConfigError, loadConfig
from popserv.errors import InvalidUserName

__all__ = ["main", "deliver", "editPasswdFile"]

EX_OK = 0
EX_PROBLEMS = 1
EX_USAGE = 64
EX_NOUSER = 67
EX_TEMPFAIL = 75

#: Bytes read from standard input at a time by deliver.
_CHUNK = 1024 * 1024


class AdminError(Exception):
    """A failure to report in one line, with the exit code to use."""

    def __init__(self, message: str, code: int = EX_PROBLEMS) -> None:
        super().__init__(message)
        self.code = code


# -- passwords -------------------------------------------------------------------


def _readPassword(fromStdin: bool) -> str:
    if fromStdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Retype password: ") != password:
            raise AdminError("the passwords do not match", EX_USAGE)
    if not password:
        raise AdminError("an empty password is not allowed", EX_USAGE)
    return password


def cmdPw(args: argparse.Namespace) -> int:
    from popserv.auth.schemes import UnknownScheme, hashPassword

    try:
        print(hashPassword(args.scheme, _readPassword(args.password_stdin)))
    except (UnknownScheme, ValueError) as e:
        raise AdminError(str(e), EX_USAGE) from None
    return EX_OK


# -- passwd-file editing -----------------------------------------------------------


def _config(args: argparse.Namespace) -> Config:
    """The configuration file's settings, overridden by the ones given on the command line."""
    try:
        config = loadConfig(args.config) if getattr(args, "config", None) else Config()
    except ConfigError as e:
        raise AdminError(str(e), EX_USAGE) from None
    overrides = {}
    if getattr(args, "passwd", None):
        overrides["passwd"] = os.path.abspath(args.passwd)
    if getattr(args, "mail_location", None):
        overrides["mail_location"] = args.mail_location
    if getattr(args, "passdb", None):
        overrides["passdb"] = tuple(args.passdb)
    return config.merged(**overrides)


def _passwdPath(args: argparse.Namespace) -> str:
    config = _config(args)
    if not config.passwd:
        raise AdminError("say which passwd-file: --passwd FILE or --config FILE", EX_USAGE)
    return config.passwdPath


def editPasswdFile(path: str, user: str, field: str | None) -> None:
    """
    Add (C{field} given) or delete (C{field} None) C{user}, rewriting the file
    atomically: comments, order and file mode are kept; a reader never sees a
    half-written file.
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines(keepends=True)
        mode = os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        if field is None:
            raise AdminError(f"{path} does not exist") from None
        lines, mode = [], 0o640
    owner = [i for i, line in enumerate(lines) if line.split(":", 1)[0] == user]
    if field is None:
        if not owner:
            raise AdminError(f"no user {user} in {path}", EX_NOUSER)
        del lines[owner[0]]
    else:
        if owner:
            raise AdminError(f"user {user} already exists in {path}")
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        lines.append(f"{user}:{field}\n")
    directory = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(prefix=".passwd.", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def _checkUserName(user: str) -> None:
    if not user or ":" in user or any(c.isspace() or ord(c) < 0x20 for c in user):
        raise AdminError(f"invalid user name {user!r}", EX_USAGE)


def cmdUser(args: argparse.Namespace) -> int:
    from popserv.auth.passwdfile import parsePasswdFile

    pgsql = next((s.args for s in _config(args).passdb if s.kind == "pgsql"), None)
    if pgsql is not None:
        return _pgsqlUser(args, pgsql)
    path = _passwdPath(args)
    if args.action == "list":
        try:
            with open(path, encoding="utf-8") as f:
                problems: list[str] = []
                users = parsePasswdFile(f.read(), path, problems)
        except OSError as e:
            raise AdminError(f"cannot read {path}: {e.strerror}") from None
        for name, entry in users.items():
            flags = " (disabled)" if entry.disabled else ""
            print(f"{name}\t{entry.scheme.name}{flags}")
        for problem in problems:
            print(problem, file=sys.stderr)
        return EX_OK
    _checkUserName(args.name)
    if args.action == "add":
        editPasswdFile(path, args.name, _hashed(args))
        print(f"added {args.name} to {path}")
    else:
        editPasswdFile(path, args.name, None)
        print(f"removed {args.name} from {path}")
    return EX_OK


def _hashed(args: argparse.Namespace) -> str:
    from popserv.auth.schemes import UnknownScheme, hashPassword

    try:
        return hashPassword(args.scheme, _readPassword(args.password_stdin))
    except (UnknownScheme, ValueError) as e:
        raise AdminError(str(e), EX_USAGE) from None


def _pgsqlUser(args: argparse.Namespace, uri: str) -> int:
    """C{user add|del|list} on the users table of a C{--passdb pgsql:URI}."""
    from popserv.backends.pgsql.users import NoSuchUser, userCommand
    from popserv.errors import TemporaryFailure

    if args.action != "list":
        _checkUserName(args.name)
    try:
        return userCommand(uri, args.action, getattr(args, "name", None), lambda: _hashed(args))
    except TemporaryFailure as e:
        raise AdminError(str(e), EX_TEMPFAIL) from None
    except NoSuchUser as e:
        raise AdminError(str(e), EX_NOUSER) from None
    except ValueError as e:
        raise AdminError(str(e)) from None


# -- delivery ----------------------------------------------------------------------


def deliver(maildir: str, source: IO[bytes], chunk: int = 1024 * 1024) -> str:
    """
    Deliver a message into a Maildir the safe way (see
    L{popserv.backends.maildir.delivery}): written in tmp/, synced, renamed
    into new/ with its ,S= (size on disk) and ,W= (CRLF size, what POP3
    reports) fields, the directory synced. Returns the new file's path.
    Streams: the message is never held in memory whole.
    """
    from popserv.backends.maildir.delivery import MaildirDelivery, makeMaildir

    makeMaildir(maildir)
    delivery = MaildirDelivery(maildir)
    try:
        while data := source.read(chunk):
            delivery.write(data)
        delivery.commit()
    except BaseException:
        delivery.abort()
        raise
    assert delivery.path is not None
    return delivery.path


def _checkRecipient(config: Config, user: str) -> None:
    """
    A user none of the auth sources knows is refused (EX_NOUSER), when every
    source can tell (as LMTP decides whom to accept mail for).
    """
    from popserv.build import makeChecker
    from popserv.lmtp.delivery import knowsUser
    from popserv.threads import synchronously, waitFor

    if not config.mail_location:
        raise AdminError("say where mail is: --mail-location or --config", EX_USAGE)
    if not config.authSources:
        return
    try:
        checker = makeChecker(config, None, synchronously)
    except ConfigError as e:
        raise AdminError(str(e), EX_TEMPFAIL) from None
    known = waitFor(knowsUser(getattr(checker, "sources", (checker,)), user))
    if isinstance(known, Failure):
        raise AdminError(f"cannot look {user} up: {known.getErrorMessage()}", EX_TEMPFAIL)
    if known is False:
        raise AdminError(f"no user {user}", EX_NOUSER)


def _maildirOf(config: Config, user: str, mustExist: bool) -> str:
    _checkRecipient(config, user)
    try:
        path = config.location.expand(user)
    except Exception as e:
        raise AdminError(f"user {user!r}: {e}", EX_NOUSER) from None
    if mustExist and not os.path.isdir(path):
        raise AdminError(f"{path}: no such maildir")
    return path


def cmdDeliver(args: argparse.Namespace) -> int:
    """Deliver standard input into the user's maildrop, through the configured store."""
    from popserv.build import makeStore
    from popserv.threads import synchronously, waitFor

    config = _config(args)
    _checkRecipient(config, args.user)
    try:
        store = makeStore(config, synchronously, createMissing=True)
    except ConfigError as e:
        raise AdminError(str(e), EX_USAGE) from None
    outcome = waitFor(_deliver(store, args.user, sys.stdin.buffer))
    if isinstance(outcome, Failure):
        if outcome.check(InvalidUserName):
            raise AdminError(f"user {args.user!r}: {outcome.getErrorMessage()}", EX_NOUSER)
        raise AdminError(
            f"delivery to {args.user} failed: {outcome.getErrorMessage()}", EX_TEMPFAIL
        )
    if args.verbose:
        print(outcome)
    return EX_OK


@inlineCallbacks
def _deliver(store: Any, user: str, source: IO[bytes]) -> Any:
    """Copy C{source} into a delivery to C{user}, in chunks; its path if it has one, or UIDL."""
    writer = yield maybeDeferred(store.deliverMessage, user)
    try:
        while data := source.read(_CHUNK):
            yield maybeDeferred(writer.write, data)
        uid = yield maybeDeferred(writer.commit)
    except BaseException:
        yield maybeDeferred(writer.abort)
        raise
    delivery = getattr(writer, "delivery", None)
    return getattr(delivery, "path", None) or uid


# -- check-config ------------------------------------------------------------------


def checkConfig(config: Config) -> list[str]:
    """Every problem of a configuration, one line each (empty: all well)."""
    from twisted.internet import endpoints, reactor

    from popserv.build import makeChecker, makeStore
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
    try:
        store = makeStore(config, synchronously)
    except ConfigError as e:
        problems.append(str(e))
    else:
        problems += _storeProblems(store)
    if config.passdb:  # the passwd shorthand is read below, user by user
        try:
            makeChecker(replace(config, passwd=None), reactor, synchronously)
        except ConfigError as e:
            problems.append(str(e))
    if config.passwd:
        problems += _passwdProblems(config)
    return problems + _tlsProblems(config)


def _storeProblems(store: Any) -> list[str]:
    """A store that can say how it is (a database: reached, its schema) says it."""
    status = getattr(store, "status", None)
    if status is None:
        return []
    try:
        print(f"mail_location: {status()}")
        return []
    except Exception as e:
        return [f"mail_location: {e.args[0] if e.args else e!r}"]
    finally:
        getattr(store, "close", lambda: None)()


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
    problems = checkConfig(_config(args))
    for problem in problems:
        print(problem)
    if not problems:
        print("configuration OK")
    return EX_PROBLEMS if problems else EX_OK


# -- uidl --------------------------------------------------------------------------------


def cmdUidl(args: argparse.Namespace) -> int:
    from popserv.backends.maildir import MaildirMailbox, MaildirStore
    from popserv.location import MailLocation
    from popserv.threads import synchronously

    config = _config(args)
    if config.mail_location and config.store[0] != DEFAULT_STORE:
        raise AdminError(f"reads Maildirs only, not a {config.store[0]} store", EX_USAGE)
    path = _maildirOf(config, args.user, mustExist=True)
    store = MaildirStore(MailLocation("maildir", path), runInThread=synchronously)
    # Read-only: a scan without taking the lock, so a live session is not disturbed.
    mailbox = MaildirMailbox(path, store, locked=False)
    results: list[object] = []
    mailbox.listMessages().addBoth(results.append)
    for number, info in enumerate(results[0], 1):  # type: ignore[arg-type]
        print(f"{number} {info.uid}" + (f" {info.size}" if args.sizes else ""))
    return EX_OK


# -- db ----------------------------------------------------------------------------------


def cmdDb(args: argparse.Namespace) -> int:
    """Create, upgrade or report the schema of the mail location's database."""
    config = _config(args)
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
    except SchemaError as e:
        raise AdminError(str(e)) from None
    print(f"schema version {after}" + (f" (was {before})" if before != after else " (unchanged)"))
    return EX_OK


def cmdMigrate(args: argparse.Namespace) -> int:
    from popserv.migrate import migrate, openStores

    try:
        stores = openStores(_config(args), args.source, args.target)
    except ConfigError as e:
        raise AdminError(str(e), EX_USAGE) from None
    return migrate(*stores, args.users)


def cmdServe(args: argparse.Namespace) -> int:
    from popserv.tap import buildConfig
    from popserv.workers import Supervisor

    given = _givenSettings(args)
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


# -- the command line ----------------------------------------------------------------

#: The settings most commands take (the server's configuration, where users and mail are).
_COMMON = ("passwd", "mail_location", "passdb")


def _addSettings(parser: argparse.ArgumentParser, names: Sequence[str] | None = None) -> None:
    """
    Options for settings, made from their declarations: C{names} only, or
    every setting C{twistd popserv} takes. Absent options set nothing, so
    they may be given before or after a command's name.
    """
    from popserv.settings import BOOL, LIST

    parser.add_argument(
        "--config", "-c", default=argparse.SUPPRESS, help="the server's TOML configuration file"
    )
    if names is None:
        from popserv.tap import commandLineSettings

        settings = [s for s, _ in commandLineSettings()]
    else:
        from popserv.config import SETTINGS

        settings = [s for s in SETTINGS if s.name in names]
    for declared in settings:
        spellings = [f"--{declared.option}", *(f"--{a}" for a in declared.optionAliases)]
        if declared.short:
            spellings.append(f"-{declared.short}")
        common = dict(dest=declared.name, default=argparse.SUPPRESS)
        helpText = declared.describe().replace("%", "%%")
        if declared.kind == BOOL:
            parser.add_argument(*spellings, action="store_true", help=helpText, **common)
            parser.add_argument(
                f"--no-{declared.option}",
                action="store_false",
                help=f"the opposite of --{declared.option}",
                **common,
            )
        else:
            action = "append" if declared.kind == LIST else "store"
            metavar = declared.metavar or declared.kind.upper()
            parser.add_argument(
                *spellings, action=action, metavar=metavar, help=helpText, **common
            )


def _givenSettings(args: argparse.Namespace) -> dict[str, object]:
    """The settings given on the command line, converted as their declarations say."""
    from popserv.settings import LIST, SettingError
    from popserv.tap import commandLineSettings

    given: dict[str, object] = {}
    for declared, _ in commandLineSettings():
        if not hasattr(args, declared.name):
            continue
        raw = getattr(args, declared.name)
        try:
            if isinstance(raw, bool):
                given[declared.name] = raw
            elif declared.kind == LIST:
                given[declared.name] = tuple(v for r in raw for v in declared.fromText(r))
            else:
                given[declared.name] = declared.fromText(raw)
        except SettingError as e:
            raise AdminError(f"--{declared.option}: {e}", EX_USAGE) from None
    return given


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a number of workers, 1 or more, not {text!r}")
    return int(text)


def _schemes() -> str:
    from popserv.auth.schemes import HASHING_SCHEMES

    return ", ".join(HASHING_SCHEMES)


def _parser(serveOptions: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="popserv",
        description="Administer a popserv POP3 server. Options may come before or after "
        "a command's name.",
    )
    _addSettings(parser, _COMMON)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, run: object, help: str, settings: bool = True, **kw: object) -> Any:
        p = sub.add_parser(name, help=help, description=help, **kw)
        if settings:
            _addSettings(p, _COMMON)
        p.set_defaults(run=run)
        return p

    def passwordOptions(p: argparse.ArgumentParser) -> None:
        p.add_argument("--scheme", "-s", default="ARGON2ID", help=f"one of {_schemes()}")
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
    _addSettings(user, _COMMON)
    actions = user.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, help in (("add", "add a user"), ("del", "delete a user"), ("list", "list users")):
        p = actions.add_parser(action, help=help, description=help)
        _addSettings(p, _COMMON)
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
    _addSettings(db, _COMMON)
    dbActions = db.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, help in (
        ("init", "create the schema in an empty database"),
        ("upgrade", "apply the migrations the database lacks"),
        ("status", "print the schema version (exit 1 if not this popserv's)"),
    ):
        p = dbActions.add_parser(action, help=help, description=help)
        _addSettings(p, _COMMON)
        p.set_defaults(run=cmdDb)
    migrateCmd = command("migrate", cmdMigrate, "copy maildrops to another store, keeping UIDLs")
    migrateCmd.add_argument("--from", dest="source", required=True, metavar="KIND:ARGS")
    migrateCmd.add_argument("--to", dest="target", required=True, metavar="KIND:ARGS")
    migrateCmd.add_argument("--user", dest="users", action="append", help="only USER (repeatable)")

    serve = command(
        "serve",
        cmdServe,
        "run N worker processes sharing the listening sockets (all cores); takes every "
        "setting twistd popserv takes",
        settings=False,
    )
    if serveOptions:
        _addSettings(serve)
    serve.add_argument(
        "--workers",
        "-w",
        type=_positive,
        default=os.cpu_count() or 1,
        help="worker processes [default: one per core]",
    )

    cert = command(
        "selfsigned", cmdSelfSigned, "write a self-signed cert.pem and key.pem", settings=False
    )
    cert.add_argument("directory")
    cert.add_argument("hosts", nargs="*", help="host names [default: localhost]")
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
