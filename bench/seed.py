"""
Deterministic Maildir seeding for the benchmark.

Every message is built from a fixed random seed: a pool of text lines (LF
line endings, about one line in 23 starting with "."), cut at line boundaries
after a per-message header. The bytes of message I{n} of user I{u} are the
same on every run and every machine; only the file names change, because they
carry the file's inode, as Postfix's do.

File names:

- Postfix C{local(8)}/C{virtual(8)} maildir delivery:
  C{SECONDS.VdevIinoMusec.HOST} in C{new/} (no size fields).
- Dovecot LDA (C{--size-hints}): C{SECONDS.MusecPpid.HOST,S=size,W=vsize} in
  C{new/}, where S is the size on disk and W the size with CRLF line endings.

The manifest records, per user, each message's unique name, its exact wire
size (CRLF, before byte-stuffing) and optionally the SHA-256 of its wire form.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import os
import random
import shutil
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field

__all__ = ["Seeder", "Message", "Maildrop", "uniquePart", "HOST"]

SEED = 20240611
HOST = "bench.example.org"
#: Synthetic delivery time of the first message (names carry it, as Postfix's do).
BASE_TIME = 1_700_000_000
DOT_LINE_ONE_IN = 23
POOL_BYTES = 8 * 1024 * 1024
SMALL_MIN = 500
SMALL_MAX = 64 * 1024
#: Dovecot LDA's process id in the names it writes (any fixed number).
LDA_PID = 4242


def uniquePart(name: str) -> str:
    """The unique part of a Maildir name: no ":2," info, no ,S= / ,W= fields."""
    base = name.split(":", 1)[0]
    first, *fields_ = base.split(",")
    kept = [f for f in fields_ if not (f.startswith("S=") or f.startswith("W="))]
    return ",".join([first, *kept])


@dataclass(frozen=True)
class Message:
    name: str  # file name (in new/)
    size: int  # exact wire size: CRLF line endings, before byte-stuffing
    digest: bytes | None  # SHA-256 of the CRLF form, if recorded


@dataclass
class Maildrop:
    user: str
    password: str
    path: str  # the Maildir
    messages: list[Message] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(m.size for m in self.messages)

    def byUID(self) -> dict[str, Message]:
        """
        Every name a server might use as this message's UIDL: the unique part
        (popserv, Dovecot with %f-like formats), the full name, and the MD5 of
        the file name (twisted.mail.maildir.MaildirMailbox.getUidl).
        """
        table: dict[str, Message] = {}
        for m in self.messages:
            table[uniquePart(m.name)] = m
            table[m.name] = m
            table[hashlib.md5(m.name.encode()).hexdigest()] = m
        return table


class _Pool:
    """A few MiB of text lines; messages are slices of it (wrapping around)."""

    def __init__(self, rng: random.Random, size: int = POOL_BYTES) -> None:
        # Printable ASCII without "." (dots appear only where we put them:
        # at line starts) and with extra spaces so lines look like words.
        alphabet = bytes(c for c in range(0x21, 0x7F) if c != 0x2E) + b" " * 16
        table = bytes(alphabet[i % len(alphabet)] for i in range(256))
        raw = rng.randbytes(size).translate(table)
        parts: list[bytes] = []
        starts = array("Q")
        pos = used = 0
        while used < size:
            starts.append(used)
            r = rng.random()
            if r < 1 / DOT_LINE_ONE_IN:
                # A dot line: sometimes just "." or ".." (the edge cases of
                # byte-stuffing), usually a line of text starting with ".".
                kind = rng.randrange(8)
                if kind == 0:
                    line = b".\n"
                elif kind == 1:
                    line = b"..\n"
                else:
                    n = rng.randint(1, 75)
                    line = b"." + raw[pos : pos + n] + b"\n"
                    pos += n
            elif r < 0.08:
                line = b"\n"  # paragraph break
            else:
                n = rng.randint(20, 76)
                line = raw[pos : pos + n] + b"\n"
                pos += n
            if pos >= size - 100:
                pos = 0
            parts.append(line)
            used += len(line)
        self.data = b"".join(parts)
        self.starts = starts

    def text(self, offset: int, length: int) -> bytes:
        """At least C{length} bytes of whole lines starting at line C{offset}."""
        data, starts = self.data, self.starts
        begin = starts[offset % len(starts)]
        out: list[bytes] = []
        while length > 0:
            avail = len(data) - begin
            if length >= avail:
                out.append(data[begin:])
                length -= avail
                begin = 0
                continue
            # End at the first line boundary at or after begin + length.
            i = bisect.bisect_left(starts, begin + length)
            end = starts[i] if i < len(starts) else len(data)
            out.append(data[begin:end])
            break
        return b"".join(out)


def _header(user: str, seed: int, n: int) -> bytes:
    return (
        f"Return-Path: <sender{n % 997}@example.net>\n"
        f"Delivered-To: {user}@{HOST}\n"
        f"Received: from mx.example.net (mx.example.net [192.0.2.25])\n"
        f"\tby {HOST} (Postfix) with ESMTPS id {seed % 65536:04X}{n:08X}\n"
        f"\tfor <{user}@{HOST}>; Tue, 14 Nov 2023 22:13:20 +0000 (UTC)\n"
        f"From: Sender {n % 997} <sender{n % 997}@example.net>\n"
        f"To: {user}@{HOST}\n"
        f"Subject: benchmark message {n} for {user}\n"
        f"Date: Tue, 14 Nov 2023 22:13:20 +0000\n"
        f"Message-ID: <{seed}.{n}@example.net>\n"
        "MIME-Version: 1.0\n"
        "Content-Type: text/plain; charset=us-ascii\n"
        "\n"
    ).encode("ascii")


def wireSize(data: bytes) -> int:
    """CRLF size of an LF-only message that ends with LF."""
    return len(data) + data.count(b"\n")


def wireDigest(data: bytes) -> bytes:
    return hashlib.sha256(data.replace(b"\n", b"\r\n")).digest()


class Seeder:
    """Builds Maildirs under C{root}/USER/Maildir from the fixed seed."""

    def __init__(self, root: str, seed: int = SEED) -> None:
        self.root = root
        self.randomSeed = seed
        self.pool = _Pool(random.Random(seed))
        self._stamp = 0
        os.makedirs(root, exist_ok=True)

    def maildir(self, user: str) -> str:
        return os.path.join(self.root, user, "Maildir")

    def _rng(self, user: str) -> random.Random:
        return random.Random(f"{self.randomSeed}/{user}")

    def contents(
        self, user: str, count: int, size: int | None = None
    ) -> Iterator[tuple[int, bytes]]:
        """
        The messages of C{user}: C{count} of them, each of C{size} bytes
        (about: cut at a line boundary) or, without a size, log-uniformly
        distributed between SMALL_MIN and SMALL_MAX.
        """
        rng = self._rng(user)
        lo, hi = math.log(SMALL_MIN), math.log(SMALL_MAX)
        for n in range(1, count + 1):
            target = size if size is not None else int(math.exp(rng.uniform(lo, hi)))
            header = _header(user, self.randomSeed, n)
            body = self.pool.text(rng.randrange(1 << 30), max(0, target - len(header)))
            yield n, header + body

    def seed(
        self,
        user: str,
        password: str,
        count: int,
        size: int | None = None,
        digests: bool = True,
    ) -> Maildrop:
        """(Re)create C{user}'s Maildir holding exactly its seeded messages, Postfix-named."""
        path = self.maildir(user)
        self.clear(path)
        drop = Maildrop(user, password, path)
        tmp, new = os.path.join(path, "tmp"), os.path.join(path, "new")
        for _n, data in self.contents(user, count, size):
            stamp = self._nextStamp()
            seconds, usec = BASE_TIME + stamp // 1000, (stamp % 1000) * 997 % 1_000_000
            # Postfix: write tmp/SECONDS.PpidQcount.HOST, then rename to a name
            # with the file's device and inode: SECONDS.VdevIinoMusec.HOST.
            tmpName = os.path.join(tmp, f"{seconds}.P{os.getpid()}Q{stamp}.{HOST}")
            fd = os.open(tmpName, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                st = os.fstat(fd)
            finally:
                os.close(fd)
            name = f"{seconds}.V{st.st_dev:x}I{st.st_ino:x}M{usec}.{HOST}"
            final = os.path.join(new, name)
            os.rename(tmpName, final)
            delivered = seconds + usec / 1e6
            os.utime(final, (delivered, delivered))
            drop.messages.append(
                Message(name, wireSize(data), wireDigest(data) if digests else None)
            )
        self._settle(path)
        return drop

    def linkWithSizeHints(self, source: Maildrop, user: str, password: str) -> Maildrop:
        """
        C{user}'s Maildir: hard links to C{source}'s files under the names
        Dovecot's LDA gives them (C{,S=} and C{,W=} size fields).
        """
        path = self.maildir(user)
        self.clear(path)
        drop = Maildrop(user, password, path)
        for i, m in enumerate(source.messages, 1):
            src = os.path.join(source.path, "new", m.name)
            st = os.stat(src)
            seconds, rest = m.name.split(".", 1)
            usec = rest.split("M", 1)[1].split(".", 1)[0]
            name = f"{seconds}.M{usec}P{LDA_PID}Q{i}.{HOST},S={st.st_size},W={m.size}"
            os.link(src, os.path.join(path, "new", name))
            drop.messages.append(Message(name, m.size, m.digest))
        self._settle(path)
        return drop

    def _settle(self, path: str) -> None:
        """
        Directory times as after the last delivery (a moment in the past),
        not "just now": files carry their delivery time too, as with a real MTA.
        """
        last = BASE_TIME + self._stamp // 1000 + 1
        for sub in ("tmp", "new", "cur", ""):
            os.utime(os.path.join(path, sub), (last, last))

    def _nextStamp(self) -> int:
        self._stamp += 1
        return self._stamp

    @staticmethod
    def clear(path: str) -> None:
        """An empty Maildir at C{path} (whatever was there, .Trash included, is removed)."""
        if os.path.isdir(path):
            shutil.rmtree(path)
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(path, sub), mode=0o700, exist_ok=True)
