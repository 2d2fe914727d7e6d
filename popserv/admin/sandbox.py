"""
C{popserv sandbox DIR}: a throw-away server over a directory of C{.eml}
files (or an mbox file), for trying a mail client by hand. The messages are
delivered into a Maildir of its own in a temporary directory, so the
originals are never deleted; it is gone when the server stops.
"""

from __future__ import annotations

import argparse
import mailbox
import os
import secrets
import shutil
import signal
import tempfile
from collections.abc import Iterator
from typing import Any

from popserv.admin.common import EX_OK, EX_USAGE, AdminError

__all__ = ["cmdSandbox", "sourceMessages"]


def sourceMessages(source: str) -> Iterator[bytes]:
    """
    The messages of C{source}, one at a time: the C{.eml} files of a
    directory by name, one C{.eml} file, or the messages of an mbox file in
    order. A file that is none of these is refused (C{ValueError}), not
    served as an empty mailbox.
    """
    if os.path.isdir(source):
        for name in sorted(os.listdir(source)):
            path = os.path.join(source, name)
            if name.lower().endswith(".eml") and os.path.isfile(path):
                with open(path, "rb") as f:
                    yield f.read()
        return
    if source.lower().endswith(".eml"):
        with open(source, "rb") as f:
            yield f.read()
        return
    with open(source, "rb") as f:
        start = f.read(5)
    if start and start != b"From ":
        raise ValueError("neither a directory, an .eml file nor an mbox (no 'From ' line first)")
    box = mailbox.mbox(source, create=False)
    try:
        for key in box.iterkeys():
            yield box.get_bytes(key)
    finally:
        box.close()


def settingsText(
    core: Any, user: str, password: str, count: int, source: str, host: str = "127.0.0.1"
) -> str:
    """What a person needs to point Thunderbird, fetchmail or curl at the sandbox."""
    host = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host  # (any address: loopback)
    urlHost = f"[{host}]" if ":" in host else host
    s = core.settings()
    port, tlsPort, cafile = s["port"], s["tls_port"], s["cafile"]
    rc = os.path.join(core.directory, "fetchmailrc")
    # With sslproto fetchmail insists on STLS on the plain port.
    ssl = (
        f" sslproto TLS1.2+ sslcertck sslcertfile {cafile} sslcommonname localhost"
        if cafile
        else ""
    )
    fd = os.open(rc, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # fetchmail insists
    with os.fdopen(fd, "w") as f:
        f.write(
            f'poll {host} protocol pop3 service {port} user "{user}" '
            f'password "{password}" keep{ssl}'
            f' mda "cat >/dev/null"\n'
        )
    lines = [
        f"popserv sandbox: {count} message(s) from {source}, served from a copy in "
        f"{core.directory} (the originals are never touched).",
        "",
        f"  server    {host}, port {port}"
        + (f" (STARTTLS offered); implicit TLS (SSL/TLS) on port {tlsPort}" if tlsPort else ""),
        f"  user      {user}",
        f"  password  {password}",
    ]
    if cafile:
        lines.append(f"  CA file   {cafile}")
    lines += [
        "",
        "Thunderbird: New account > Configure manually: Incoming server POP3, hostname "
        f"{host}, port {tlsPort or port}, connection security "
        f"{'SSL/TLS' if tlsPort else 'None'}, authentication 'Normal password', "
        f"username {user}.",
    ]
    if cafile:
        lines.append(
            "  (first import the CA file: Settings > Privacy & Security > Manage "
            "Certificates > Authorities > Import)"
        )
    lines += [
        f"fetchmail:   fetchmail -f {rc} -v   (keeps the mail on the server, throws "
        "the copies away)",
        f"curl:        curl -u {user}:{password} pop3://{urlHost}:{port}/      (the list)",
        f"             curl -u {user}:{password} pop3://{urlHost}:{port}/1     (message 1)",
    ]
    if cafile:
        lines.append(
            f"             curl --cacert {cafile} -u {user}:{password} pop3s://localhost:{tlsPort}/1"
        )
    lines += ["", "Ctrl-C stops the server and removes the copy."]
    return "\n".join(lines)


def cmdSandbox(args: argparse.Namespace) -> int:
    source = args.source
    if not os.path.exists(source):
        raise AdminError(f"{source}: no such directory or mbox file", EX_USAGE)
    from twisted.internet import reactor
    from twisted.internet.defer import inlineCallbacks
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from popserv.testserver.server import TestServerCore

    work = tempfile.mkdtemp(prefix="popserv-sandbox-")
    password = args.password or secrets.token_urlsafe(9)
    log = open(os.path.join(work, "server.log"), "a", encoding="utf-8")  # noqa: SIM115
    globalLogBeginner.beginLoggingTo([textFileLogObserver(log)], redirectStandardIO=False)
    try:
        core = TestServerCore(work, reactor)
        core.addUser(args.user, password)
        try:
            core.listen(args.port, args.host)
            if args.tls:
                core.enableTLS(args.tls_port, args.host)
        except Exception as e:  # a busy port, mostly
            raise AdminError(f"cannot listen: {e}") from None

        failed: list[str] = []

        @inlineCallbacks
        def fill() -> Any:
            count = 0
            messages = sourceMessages(source)
            try:
                # The files are read in a thread, one message at a time.
                while (message := (yield core.run(next, messages, None))) is not None:
                    yield core.deliver(args.user, message)
                    count += 1
            except Exception as e:
                failed.append(f"cannot read {source}: {e}")
                reactor.stop()
                return
            text = settingsText(core, args.user, password, count, source, args.host)
            print(text, flush=True)

        # Twisted stops on SIGINT and SIGTERM; a closed terminal (SIGHUP) too.
        signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(reactor.stop))
        reactor.callWhenRunning(fill)
        reactor.run()
    finally:
        log.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if failed:
        raise AdminError(failed[0])
    return EX_OK
