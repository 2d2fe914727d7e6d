"""
Helper processes for tests/test_crash.py (not a test module).

C{python crashserver.py zygote ROOT}
    A "zygote": imports popserv and Twisted once, then serves commands read
    from stdin, one a line, so that a popserv server can be (re)started in a
    few milliseconds instead of the ~0.7 s of a fresh C{twistd}:

    - C{start PORT}: fork a child that installs a fresh reactor, builds the
      server with L{popserv.makeService} (Maildir under ROOT/mail, passwd-file
      ROOT/passwd, listening on 127.0.0.1:PORT), starts it and, once the
      reactor runs, writes C{ready PID} to stdout (C{error PID TEXT} if it
      could not start). The test kills the child with SIGKILL.
    - C{reap PID}: wait for that child to be gone (lock released, port
      closed) and answer C{reaped PID STATUS}.

    The zygote itself never installs a reactor and starts no thread, so every
    child starts from a clean slate. At start-up it writes C{hello
    reactor_installed_by_import=0|1 threads=N}: whether importing popserv
    installed the global reactor by itself (see L{_importPopserv}), and how
    many threads it has (1, or forking would not be safe).

C{python crashserver.py deliver MAILDIR LOG LOCK SEED INTERVAL CAP}
    A deliverer: every INTERVAL seconds writes a message the Maildir way
    (tmp/, then rename into new/) and appends C{UNIQUE SHA256 SIZE CRLFSIZE
    SERIAL} to LOG right after the rename. Every few deliveries it also acts like a mail
    client that moves a message from new/ to cur/ (adding C{:2,S}) or
    changes the flags of one in cur/. Delivery, log line and moves happen
    under an exclusive flock on LOCK, which the test takes while it compares
    the directories with the log. Pauses while new/ + cur/ hold CAP messages.
    Runs until killed.
"""

from __future__ import annotations

import base64
import hashlib
import os
import random
import sys
import time

HOSTNAME = "crash.invalid"
USER = "alice"
PASSWORD = "crash-secret"


# -- the zygote ----------------------------------------------------------------


def _importPopserv() -> bool:
    """
    Import everything a server child needs, so that a fork has nothing left to load.

    Returns whether that installed the global reactor. It must not: each
    child installs its own. (popserv before commit c79079b did, through
    C{prometheus_client.twisted}.)
    """
    import twisted.application.internet  # noqa: F401
    import twisted.internet.endpoints  # noqa: F401
    import twisted.internet.epollreactor  # noqa: F401
    import twisted.internet.tcp  # noqa: F401
    import twisted.internet.threads  # noqa: F401
    import twisted.logger  # noqa: F401
    import twisted.python.threadpool  # noqa: F401

    import popserv  # noqa: F401
    import popserv.auth.passwdfile  # noqa: F401
    import popserv.backends.maildir  # noqa: F401
    import popserv.service  # noqa: F401
    import popserv.streaming  # noqa: F401

    return "twisted.internet.reactor" in sys.modules


def _serve(root: str, port: int) -> None:
    """The child: run popserv on 127.0.0.1:PORT until killed."""
    from twisted.internet import epollreactor

    epollreactor.install()  # this child's own reactor, created after the fork
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    import popserv

    log = open(os.path.join(root, "server.log"), "a", buffering=1)  # noqa: SIM115
    globalLogBeginner.beginLoggingTo(
        [textFileLogObserver(log)], discardBuffer=True, redirectStandardIO=False
    )
    service = popserv.makeService(
        listen=[f"tcp:{port}:interface=127.0.0.1"],
        passwd=os.path.join(root, "passwd"),
        mail_location=f"maildir:{root}/mail/%n/Maildir",
        hostname=HOSTNAME,
        auth_penalty=0,
        shutdown_grace=0,
        reactor=reactor,
    )
    service.startService()  # listens now: a busy port raises here
    reactor.callWhenRunning(lambda: _say(f"ready {os.getpid()}"))
    reactor.run()


def _say(line: str) -> None:
    os.write(1, (line + "\n").encode())


def zygote(root: str) -> None:
    installed = _importPopserv()
    import threading

    # Forking is only safe with a single thread.
    threads = threading.active_count()
    _say(f"hello reactor_installed_by_import={int(installed)} threads={threads}")
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "start":
            port = int(words[1])
            pid = os.fork()
            if pid == 0:
                status = 0
                try:
                    sys.stdin.close()
                    _serve(root, port)
                except BaseException as e:  # report, never fall back into the loop
                    _say(f"error {os.getpid()} {e!r}".replace("\n", " "))
                    status = 1
                finally:
                    os._exit(status)
        elif words[0] == "reap":
            pid = int(words[1])
            _, status = os.waitpid(pid, 0)
            _say(f"reaped {pid} {status}")
        elif words[0] == "exit":
            break


# -- the deliverer ---------------------------------------------------------------


def _message(rng: random.Random, serial: int) -> bytes:
    """A message with LF endings, ending in LF, some lines starting with "."."""
    kind = rng.random()
    if kind < 0.1:
        target = rng.randint(260 * 1024, 600 * 1024)  # more than one 256 KiB read
    elif kind < 0.3:
        target = rng.randint(8 * 1024, 60 * 1024)
    else:
        target = rng.randint(50, 3000)
    lines = [
        f"X-Crash-Serial: {serial}",
        f"Subject: crash test message {serial}",
        f"Message-ID: <{serial}.{os.getpid()}@{HOSTNAME}>",
        "",
    ]
    if rng.random() < 0.1:
        lines.insert(0, ".Dotted-First-Line: yes")  # byte-stuffed on the very first line
    if rng.random() < 0.3:
        lines += [".", "..", ".starts with a dot"]  # right after the blank line
    size = sum(len(x) + 1 for x in lines)
    body = []
    pool = base64.b64encode(rng.randbytes(max(512, min(target, 64 * 1024)))).decode()
    offset = 0
    while size < target:
        choice = rng.random()
        if choice < 0.08:
            line = "." + pool[offset % 4000 : offset % 4000 + rng.randint(0, 70)]
        elif choice < 0.1:
            line = rng.choice([".", "..", ". ", "", ".\t."])
        else:
            width = rng.randint(0, 76)
            start = offset % max(1, len(pool) - 80)
            line = pool[start : start + width]
        offset += 77
        body.append(line)
        size += len(line) + 1
    return ("\n".join(lines + body) + "\n").encode()


def _crlfSize(data: bytes) -> int:
    return len(data) + data.count(b"\n")


def deliver(
    maildir: str, logPath: str, lockPath: str, seed: int, interval: float, cap: int
) -> None:
    import fcntl

    rng = random.Random(seed)
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(maildir, sub), exist_ok=True)
    logFD = os.open(logPath, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    lockFD = os.open(lockPath, os.O_RDWR | os.O_CREAT, 0o600)
    new, cur, tmp = (os.path.join(maildir, s) for s in ("new", "cur", "tmp"))
    host = "crashhost"
    serial = 0
    nextAt = time.monotonic()
    while True:
        nextAt += interval
        delay = nextAt - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            nextAt = time.monotonic()
        if len(os.listdir(new)) + len(os.listdir(cur)) >= cap:
            continue
        serial += 1
        data = _message(rng, serial)
        now = time.time()
        unique = f"{int(now)}.M{int(now * 1e6) % 1000000}P{os.getpid()}Q{serial}.{host}"
        style = rng.random()
        if style < 0.4:
            name = f"{unique},S={len(data)},W={_crlfSize(data)}"
        elif style < 0.6:
            name = f"{unique},S={len(data)}"
        else:
            name = unique
        tmpPath = os.path.join(tmp, name)
        fd = os.open(tmpPath, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        digest = hashlib.sha256(data).hexdigest()
        fcntl.flock(lockFD, fcntl.LOCK_EX)
        try:
            os.rename(tmpPath, os.path.join(new, name))
            line = f"{unique} {digest} {len(data)} {_crlfSize(data)} {serial}\n"
            os.write(logFD, line.encode())
            if serial % 4 == 0:
                _actLikeAClient(rng, new, cur)
        finally:
            fcntl.flock(lockFD, fcntl.LOCK_UN)


def _actLikeAClient(rng: random.Random, new: str, cur: str) -> None:
    """Move a message new/ -> cur/, or change the flags of one in cur/ (as MUAs do)."""
    try:
        if rng.random() < 0.6:
            names = [n for n in os.listdir(new) if not n.startswith(".")]
            if names:
                name = rng.choice(names)
                os.rename(os.path.join(new, name), os.path.join(cur, name + ":2,S"))
        else:
            names = [n for n in os.listdir(cur) if not n.startswith(".")]
            if names:
                name = rng.choice(names)
                base = name.split(":", 1)[0]
                flags = "".join(sorted(rng.sample("DFRS", rng.randint(0, 3))))
                os.rename(os.path.join(cur, name), os.path.join(cur, f"{base}:2,{flags}"))
    except FileNotFoundError:
        pass  # the server removed it meanwhile: fine


def main(argv: list[str]) -> None:
    if argv[1] == "zygote":
        zygote(argv[2])
    elif argv[1] == "deliver":
        maildir, logPath, lockPath, seed, interval, cap = argv[2:8]
        deliver(maildir, logPath, lockPath, int(seed), float(interval), int(cap))
    else:
        raise SystemExit(f"usage: {argv[0]} zygote ROOT | deliver ...")


if __name__ == "__main__":
    main(sys.argv)
