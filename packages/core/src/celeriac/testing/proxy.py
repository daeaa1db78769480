"""A loopback TCP proxy for broker tests: it can hold back what the server sends (confirms,
heartbeats: a half-open connection or a partition as the client sees it), stop reading what the
client sends (so the client's socket buffer fills up) and cut every connection. Loopback only;
one thread per direction and connection."""

from __future__ import annotations

import socket
import threading
import time

__all__ = ["HoldingProxy"]


class HoldingProxy:
    """Forward ``127.0.0.1:port`` to ``target`` (host, port). While ``hold_replies`` is set,
    bytes from the server are held (new connections hang too); while ``hold_requests`` is set,
    nothing more is read from clients; :meth:`cut` shuts every connection down; :meth:`close`
    stops listening."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.hold_replies = threading.Event()
        self.hold_requests = threading.Event()
        self.sockets: list[socket.socket] = []
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            self.sockets += [client, server]
            threading.Thread(target=self._pipe, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, from_server: bool) -> None:
        try:
            while True:
                while not from_server and self.hold_requests.is_set() and not self.closed:
                    time.sleep(0.01)
                data = src.recv(65536)
                if not data:
                    break
                while from_server and self.hold_replies.is_set() and not self.closed:
                    time.sleep(0.01)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def cut(self) -> None:
        for s in list(self.sockets):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.sockets.clear()

    def close(self) -> None:
        self.closed = True
        self.listener.close()
        self.cut()
