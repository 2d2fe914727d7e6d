"""
C{popserv pw} and C{popserv user add|del|list}: passwords, and the users of
a passwd-file or of PostgreSQL.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import tempfile

from popserv.admin.common import (
    EX_NOUSER,
    EX_OK,
    EX_TEMPFAIL,
    EX_USAGE,
    AdminError,
    configFrom,
    passwdPath,
)

__all__ = ["cmdPw", "cmdUser", "editPasswdFile"]


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


def editPasswdFile(path: str, user: str, field: str | None) -> None:
    """
    Add (C{field} given) or delete (C{field} None) C{user}, rewriting the file
    atomically: comments, order and file mode are kept; a reader never sees a
    half-written file.
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines(keepends=True)
        st = os.stat(path)
        mode, owner = st.st_mode & 0o7777, (st.st_uid, st.st_gid)
    except FileNotFoundError:
        if field is None:
            raise AdminError(f"{path} does not exist") from None
        lines, mode, owner = [], 0o640, None
    found = [i for i, line in enumerate(lines) if line.split(":", 1)[0] == user]
    if field is None:
        if not found:
            raise AdminError(f"no user {user} in {path}", EX_NOUSER)
        del lines[found[0]]
    else:
        if found:
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
            if owner is not None:
                # The server may read it as its group only (root:popserv 0640).
                try:
                    os.fchown(f.fileno(), *owner)
                except PermissionError:
                    pass  # (not root: the file becomes the editor's, as it can only)
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

    pgsql = next((s.args for s in configFrom(args).passdb if s.kind == "pgsql"), None)
    if pgsql is not None:
        return _pgsqlUser(args, pgsql)
    path = passwdPath(args)
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
        editPasswdFile(path, args.name, hashed(args))
        print(f"added {args.name} to {path}")
    else:
        editPasswdFile(path, args.name, None)
        print(f"removed {args.name} from {path}")
    return EX_OK


def hashed(args: argparse.Namespace) -> str:
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
        return userCommand(uri, args.action, getattr(args, "name", None), lambda: hashed(args))
    except TemporaryFailure as e:
        raise AdminError(str(e), EX_TEMPFAIL) from None
    except NoSuchUser as e:
        raise AdminError(str(e), EX_NOUSER) from None
    except ValueError as e:
        raise AdminError(str(e)) from None
