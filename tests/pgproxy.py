"""
A TCP relay in front of the test PostgreSQL's Unix socket that a test can
cut off as a network partition would (L{Relay.partition}: nothing passes
either way, connections stay open and new ones hang), or make drop the
next reply and close (L{Relay.dropNextReply}: a request that ran but whose
answer never came), or the reply to the next request holding some bytes
(L{Relay.dropReplyTo}, e.g. a COMMIT that committed).
"""

from __future__ import annotations

import os
import socket
import threading


class Relay:
    def __init__(self, socketDir: str, port: int = 5432) -> None:
        self.target = os.path.join(socketDir, f".s.PGSQL.{port}")
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.cut = False
        self.dropReply = False
        self._dropMarker: bytes | None = None
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def uri(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def partition(self) -> None:
        self.cut = True

    def heal(self) -> None:
        """New connections pass again (the ones cut stay silent)."""
        self.cut = False

    def dropNextReply(self) -> None:
        self.dropReply = True

    def dropReplyTo(self, marker: bytes) -> None:
        """The next request holding C{marker} is passed on, its reply dropped."""
        self._dropMarker = marker

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                self._sockets.append(client)
            if self.cut:
                continue  # accepted, never answered
            server = socket.socket(socket.AF_UNIX)
            server.connect(self.target)
            with self._lock:
                self._sockets.append(server)
            silenced = [False, False]  # cut off; the next reply to drop
            threading.Thread(
                target=self._pump, args=(client, server, silenced, False), daemon=True
            ).start()
            threading.Thread(
                target=self._pump, args=(server, client, silenced, True), daemon=True
            ).start()

    def _pump(self, source, sink, silenced, replies: bool) -> None:
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                return
            if not data:
                break
            if self.cut:
                silenced[0] = True
            if silenced[0]:
                continue
            if replies and (self.dropReply or silenced[1]):
                self.dropReply = False
                break
            marker = self._dropMarker
            if not replies and marker is not None and marker in data:
                self._dropMarker = None
                silenced[1] = True
            try:
                sink.sendall(data)
            except OSError:
                break
        for s in (source, sink):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.listener.close()
        with self._lock:
            for s in self._sockets:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
