"""
The framework's floor for row 1: what the login dialogue costs a Twisted
server that does no work at all.

A bare C{twisted.internet.protocol.Protocol} answers the greeting, USER,
PASS, STAT and QUIT of row 1 with fixed lines (no password check, no
maildrop, no lock, no log line) and closes, as a POP3 server would. It runs
pinned to core 0 and is driven by the benchmark's load generator on core 1,
64 clients, exactly like row 1. Whatever a real server adds (authentication,
opening and locking the maildrop, listing it, the session's log line) comes
on top of these figures: they bound how much faster than another Twisted
server any Twisted server can log clients in on this machine.

    python bench/floor.py [--sessions 5000] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path
from time import perf_counter

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen import EOF, GREETING, Engine, Step, raiseFileLimit  # noqa: E402
from servers import BENCH, Server  # noqa: E402


def serve(port: int) -> None:
    from twisted.internet import protocol, reactor

    class Bare(protocol.Protocol):
        def connectionMade(self) -> None:
            self.transport.setTcpNoDelay(True)
            self.transport.write(b"+OK ready\r\n")

        def dataReceived(self, data: bytes) -> None:
            verb = data[:4]
            if verb == b"STAT":
                self.transport.write(b"+OK 10 264898\r\n")
            elif verb == b"QUIT":
                self.transport.write(b"+OK bye\r\n")
                self.transport.loseConnection()
            else:
                self.transport.write(b"+OK\r\n")

    reactor.listenTCP(port, protocol.Factory.forProtocol(Bare), 1024, "127.0.0.1")
    reactor.run()


class Floor(Server):
    name = "floor"
    label = "bare Twisted protocol"

    def command(self) -> tuple[list[str], dict[str, str]]:
        return [sys.executable, str(BENCH / "floor.py"), "--serve", str(self.port)], dict(
            os.environ
        )


def session(n: int):
    yield GREETING
    yield Step(b"USER user%03d\r\n" % n)
    yield Step(b"PASS pw\r\n")
    yield Step(b"STAT\r\n")
    yield Step(b"QUIT\r\n")
    yield EOF


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=5000, help="sessions per run")
    parser.add_argument("--runs", type=int, default=3, help="runs (the median is shown)")
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients")
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    raiseFileLimit()
    os.sched_setaffinity(0, {1})
    with tempfile.TemporaryDirectory() as work:
        server = Floor(Path(work), Path(work), Path(work) / "passwd").start()
        try:
            engine = Engine(server.port)

            def sessions(total: int) -> None:
                started = 0

                def launch(n: int) -> None:
                    nonlocal started
                    started += 1
                    engine.start(session(n), str(n), lambda _r: started < total and launch(n))

                for n in range(min(args.clients, total)):
                    launch(n)
                engine.run()

            sessions(128)
            rates, cpus = [], []
            for run in range(args.runs):
                (u0, s0), t0 = server.cpuTimes(), perf_counter()
                sessions(args.sessions)
                t1, (u1, s1) = perf_counter(), server.cpuTimes()
                rates.append(args.sessions / (t1 - t0))
                cpus.append((u1 + s1 - u0 - s0) / args.sessions * 1000)
                print(
                    f"floor run {run + 1}: {rates[-1]:,.0f} sessions/s, server CPU "
                    f"{cpus[-1]:.3f} ms/session ({(s1 - s0) / (u1 + s1 - u0 - s0):.0%} "
                    "in the kernel)",
                    flush=True,
                )
            engine.close()
        finally:
            server.stop()
    print(
        f"bare Twisted protocol, login dialogue, {args.clients} clients: "
        f"{statistics.median(rates):,.0f} sessions/s, "
        f"{statistics.median(cpus):.3f} ms CPU per session (medians of {args.runs})"
    )


if __name__ == "__main__":
    main()
