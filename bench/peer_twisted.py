"""
The comparison server: a small POP3 server built only from Twisted's public
API, C{twisted.mail.pop3.POP3} + C{twisted.mail.maildir.MaildirMailbox} + an
in-memory checker, serving the same Maildirs as popserv.

    python bench/peer_twisted.py --port 1110 --root DIR --passwd FILE [--logfile FILE]

Users are C{ROOT/USER/Maildir}; the passwd-file holds C{user:{PLAIN}secret}
lines. It listens on 127.0.0.1 only.

Stock C{twisted.mail} cannot pass the benchmark's checks on LF-stored Maildirs,
so four small fixes are made by subclassing, each at the public extension
point and no faster than the stock code path:

1. C{MaildirMailbox.getMessage} opens the file in text mode; on Python 3 the
   first RETR fails (C{str.replace} with bytes in C{transformChunk}). Opened
   in binary mode here.
2. C{MaildirMailbox.listMessages} reports C{st_size}, which for LF-stored
   files is not what RETR sends (every LF goes out as CRLF): LIST, STAT and
   the RETR status would be wrong. Here the size is the exact CRLF size,
   counted once per file and cached in the process by (device, inode, size,
   mtime), as popserv does; every call still C{stat}s each file as stock does.
3. C{POP3.transformChunk} byte-stuffs each 16 KiB chunk on its own, so a
   line starting with "." right after a chunk boundary (or on the first line)
   goes out unstuffed and the client sees a corrupt message (about twice per
   50 MiB with one line in 23 starting with "."). The state is carried across
   chunks here.
4. C{MaildirMailbox.deleteMessage} joins the (bytes) Maildir path with the
   str C{".Trash"}: TypeError on Python 3, and the pipelined commands behind
   the DELE are never answered. Same code with bytes here.

Like stock C{POP3} it leaves Nagle's algorithm on; C{--nodelay} turns it off
(C{TCP_NODELAY}, as popserv does) for a comparison of the code rather than of
that setting.

DELE keeps Twisted's behaviour otherwise (the file is moved into
C{.Trash/cur} at once, not at QUIT); the C{.Trash} folder Twisted expects is
created if missing.
"""

from __future__ import annotations

import argparse
import os
import sys

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import IRealm, Portal
from twisted.internet import endpoints, protocol
from twisted.logger import globalLogBeginner, textFileLogObserver
from twisted.mail import maildir, pop3
from zope.interface import implementer

_sizes: dict[tuple[int, int, int, int], int] = {}


def exactSize(path: bytes) -> int:
    st = os.stat(path)
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    size = _sizes.get(key)
    if size is None:
        lines = 0
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                lines += chunk.count(b"\n")
        size = _sizes[key] = st.st_size + lines
    return size


class ExactMaildirMailbox(maildir.MaildirMailbox):
    def __init__(self, path: bytes) -> None:
        super().__init__(path)
        for sub in (b"cur", b"new", b"tmp"):
            os.makedirs(os.path.join(path, b".Trash", sub), 0o700, exist_ok=True)

    def listMessages(self, i=None):
        if i is None:
            return [exactSize(m) if m else 0 for m in self.list]
        m = self.list[i]
        return exactSize(m) if m else 0

    def getMessage(self, i):
        return open(self.list[i], "rb")

    def deleteMessage(self, i):
        # Stock code joins the bytes path with str ".Trash": TypeError on Python 3.
        trash = os.path.join(self.path, b".Trash", b"cur", os.path.basename(self.list[i]))
        os.rename(self.list[i], trash)
        self.deleted[self.list[i]] = trash
        self.list[i] = 0


class StuffingPOP3(pop3.POP3):
    _lineStart = True
    noDelay = False

    def connectionMade(self):
        if self.noDelay:
            self.transport.setTcpNoDelay(True)
        super().connectionMade()

    def do_RETR(self, i):
        self._lineStart = True
        return super().do_RETR(i)

    def do_TOP(self, i, size):
        self._lineStart = True
        return super().do_TOP(i, size)

    def transformChunk(self, chunk: bytes) -> bytes:
        out = chunk.replace(b"\n", b"\r\n").replace(b"\r\n.", b"\r\n..")
        if out:
            if self._lineStart and out[:1] == b".":
                out = b"." + out
            self._lineStart = out[-1:] == b"\n"
        return out


@implementer(IRealm)
class MaildirRealm:
    def __init__(self, root: bytes) -> None:
        self.root = root

    def requestAvatar(self, avatarId, mind, *interfaces):
        if pop3.IMailbox not in interfaces:
            raise NotImplementedError()
        mailbox = ExactMaildirMailbox(os.path.join(self.root, avatarId, b"Maildir"))
        return pop3.IMailbox, mailbox, lambda: None


class POP3ServerFactory(protocol.ServerFactory):
    protocol = StuffingPOP3

    def __init__(self, portal: Portal) -> None:
        self.portal = portal

    def buildProtocol(self, addr):
        p = self.protocol()
        p.portal = self.portal
        p.factory = self
        return p


def readPasswd(path: str) -> dict[bytes, bytes]:
    users = {}
    with open(path, "rb") as f:
        for line in f:
            line = line.rstrip(b"\r\n")
            if not line or line.startswith(b"#"):
                continue
            user, _, rest = line.partition(b":")
            secret = rest.split(b":", 1)[0]
            if not secret.startswith(b"{PLAIN}"):
                raise SystemExit(f"{path}: only {{PLAIN}} secrets are supported")
            users[user] = secret[len(b"{PLAIN}") :]
    return users


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--root", required=True, help="USER/Maildir lives under this")
    parser.add_argument("--passwd", required=True)
    parser.add_argument("--logfile", help="log here (as twistd would); default: no log")
    parser.add_argument("--backlog", type=int, default=1024)
    parser.add_argument("--nodelay", action="store_true", help="set TCP_NODELAY (stock: off)")
    parser.add_argument("--tls-port", type=int, help="also listen with implicit TLS here")
    parser.add_argument("--tls-cert", help="PEM file: certificate and key (for --tls-port)")
    args = parser.parse_args(argv)

    if args.logfile:
        globalLogBeginner.beginLoggingTo(
            [textFileLogObserver(open(args.logfile, "a"))], redirectStandardIO=False
        )
    from twisted.internet import reactor

    checker = InMemoryUsernamePasswordDatabaseDontUse(**{})
    for user, password in readPasswd(args.passwd).items():
        checker.addUser(user, password)
    portal = Portal(MaildirRealm(os.fsencode(args.root)), [checker])
    endpoint = endpoints.TCP4ServerEndpoint(
        reactor, args.port, backlog=args.backlog, interface="127.0.0.1"
    )
    StuffingPOP3.noDelay = args.nodelay
    d = endpoint.listen(POP3ServerFactory(portal))
    if args.tls_port:
        # Twisted's own TLS, as a twisted.mail server would use it: the
        # certificate options' defaults (no session tickets, no session cache).
        from twisted.internet import ssl

        pem = open(args.tls_cert).read()
        options = ssl.PrivateCertificate.loadPEM(pem).options()
        endpoints.SSL4ServerEndpoint(
            reactor, args.tls_port, options, backlog=args.backlog, interface="127.0.0.1"
        ).listen(POP3ServerFactory(portal))

    def listening(port):
        print("listening on", port.getHost().port, flush=True)

    def failed(failure):
        print("cannot listen:", failure.getErrorMessage(), file=sys.stderr, flush=True)
        reactor.stop()

    d.addCallbacks(listening, failed)
    reactor.run()


if __name__ == "__main__":
    main()
