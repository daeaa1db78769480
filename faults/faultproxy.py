"""A TCP proxy on loopback that injects network faults between a worker and its broker.

``FaultProxy(port)`` listens on ``127.0.0.1:<ephemeral>`` and forwards every connection to
``127.0.0.1:port``, one thread per direction. While it runs a test can:

- ``latency = 0.1``: hold every chunk 100 ms before forwarding it (both directions);
- ``reset_all()``: close every open connection with a TCP RST (``SO_LINGER`` 0), as a broker
  restart or a NAT timeout does; new connections are accepted as usual;
- ``freeze()`` / ``thaw()``: stop forwarding without closing anything (a half-open connection,
  a partition): data stays in the kernel's buffers, no side sees an error; new connections are
  accepted but not connected upstream until ``thaw()``. ``thaw()`` resumes forwarding what was
  held (a partition that heals).

Loopback only, no root needed, nothing to install.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time

__all__ = ["FaultProxy"]


def _rst_close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class FaultProxy:
    """Forward ``127.0.0.1:self.port`` to ``127.0.0.1:target_port``, with faults on demand."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.latency = 0.0
        self._flowing = threading.Event()
        self._flowing.set()
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._closed = False
        self.connections = 0  # accepted so far
        self.resets = 0  # connections reset by reset_all()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self.port: int = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, name=f"proxy-{self.port}", daemon=True).start()

    def url_for(self, url: str, port: int) -> str:
        """``url`` with ``127.0.0.1:port`` (or ``localhost:port``) replaced by this proxy."""
        for host in ("127.0.0.1", "localhost"):
            url = url.replace(f"{host}:{port}", f"127.0.0.1:{self.port}")
        return url

    # -- faults ------------------------------------------------------------------------------

    def freeze(self) -> None:
        """Stop forwarding in both directions, closing nothing (half-open / partition)."""
        self._flowing.clear()

    def thaw(self) -> None:
        """Resume forwarding (the partition heals)."""
        self._flowing.set()

    @property
    def frozen(self) -> bool:
        """True between :meth:`freeze` and :meth:`thaw`."""
        return not self._flowing.is_set()

    def reset_all(self) -> int:
        """Reset every open connection (RST to both sides); return how many."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for client, upstream in pairs:
            _rst_close(client)
            _rst_close(upstream)
        self.resets += len(pairs)
        return len(pairs)

    def open_connections(self) -> int:
        """Connections currently forwarded."""
        with self._lock:
            return len(self._pairs)

    def close(self) -> None:
        """Stop listening and reset everything."""
        self._closed = True
        self._flowing.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        self.reset_all()

    # -- forwarding --------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._open, args=(client,), daemon=True).start()

    def _open(self, client: socket.socket) -> None:
        self._flowing.wait()  # a frozen network does not complete the upstream handshake
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            _rst_close(client)
            return
        upstream.settimeout(None)
        for sock in (client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._pairs.append((client, upstream))
        threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
        threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                self._flowing.wait()
                data = src.recv(65536)
                if not data:
                    break
                if self.latency:
                    time.sleep(self.latency)
                self._flowing.wait()  # frozen meanwhile: hold what was read
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
            with self._lock:
                pairs = [p for p in self._pairs if src not in p]
                gone = len(pairs) != len(self._pairs)
                self._pairs = pairs
            if gone:
                for sock in (src, dst):
                    with contextlib.suppress(OSError):
                        sock.close()
