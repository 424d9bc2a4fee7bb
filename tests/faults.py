"""Fault injection for the resilience tests: a loopback TCP proxy put between one component and
Redis, and a ``redis-server`` that restarts for real.

``FaultyProxy`` forwards ``127.0.0.1:<proxy.port>`` to an upstream port and can, at any moment:

- ``delay(seconds)``: hold every chunk that long before forwarding it (both directions);
- ``blackhole()``: keep connections open but forward nothing, and accept new connections without
  ever answering on them (a network partition: no RST, no FIN; the peer only learns from its
  own timeouts);
- ``reset()``: close every open connection with an RST (``SO_LINGER`` 0);
- ``refuse()``: reset open connections and refuse new ones (a restart on the far side);
- ``go_stale()``: drop, forever, whatever either side sends on the connections open now, and
  tell nobody, while new connections pass (a NAT or firewall that lost their state);
- ``heal()``: back to forwarding (connections gone stale stay so).

Give a component ``proxy.url`` instead of the server's URL and the fault reaches that component
alone: the others keep talking to Redis directly.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading
import time
from types import TracebackType

from embedded.redis_server import RedisServer

_CHUNK = 65536


class FaultyProxy:
    """A TCP proxy on 127.0.0.1 whose connections can be delayed, blackholed, reset, refused
    or silenced."""

    def __init__(self, upstream_port: int, *, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._held: list[socket.socket] = []  # accepted while blackholed: never answered
        self._stale: set[socket.socket] = set()  # what is sent to these is dropped (go_stale)
        self._mode = "pass"
        self._delay_s = 0.0
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="faulty-proxy", daemon=True)
        self._thread.start()

    def url(self, db: int = 0, *, scheme: str = "redis", auth: str = "") -> str:
        return f"{scheme}://{auth}127.0.0.1:{self.port}/{db}"

    # -- faults --------------------------------------------------------------------------

    def delay(self, seconds: float) -> None:
        with self._lock:
            self._mode, self._delay_s = "pass", seconds

    def blackhole(self) -> None:
        with self._lock:
            self._mode = "blackhole"

    def reset(self) -> int:
        """RST every open connection; new ones are accepted as before. Returns how many."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
            held, self._held = self._held, []
        for sock in [s for pair in pairs for s in pair] + held:
            _abort(sock)
        return len(pairs) + len(held)

    def refuse(self) -> int:
        """RST every open connection and every new one, until ``heal()``."""
        with self._lock:
            self._mode = "refuse"
        return self.reset()

    def go_stale(self) -> int:
        """Silence every connection open now: nothing sent on them arrives, no RST, no FIN.
        Returns how many."""
        with self._lock:
            for pair in self._pairs:
                self._stale.update(pair)
            return len(self._pairs)

    def heal(self) -> None:
        with self._lock:
            self._mode, self._delay_s = "pass", 0.0
            held, self._held = self._held, []
        for sock in held:
            _abort(sock)

    def connections(self) -> int:
        with self._lock:
            return len(self._pairs)

    # -- plumbing ------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        self._listener.settimeout(0.1)
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._admit(client)

    def _admit(self, client: socket.socket) -> None:
        with self._lock:
            mode = self._mode
            if mode == "blackhole":
                self._held.append(client)
                return
        if mode == "refuse":
            _abort(client)
            return
        try:
            upstream = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            _abort(client)
            return
        with self._lock:
            self._pairs.append((client, upstream))
        for source, sink in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        selector = selectors.DefaultSelector()
        try:
            selector.register(source, selectors.EVENT_READ)
            while not self._closing.is_set():
                if not selector.select(timeout=0.1):
                    continue
                data = source.recv(_CHUNK)
                if not data:
                    break
                if not self._forward(data, sink):
                    break
        except (OSError, ValueError):
            pass
        finally:
            selector.close()
            self._drop(source, sink)

    def _forward(self, data: bytes, sink: socket.socket) -> bool:
        """Send ``data`` on after the delay in force. While blackholed it waits here, as TCP
        retransmissions would, and goes through if the proxy heals before the peer gives up."""
        while True:
            with self._lock:
                mode, delay_s = self._mode, self._delay_s
                if sink in self._stale:
                    return True  # swallowed: no answer, no RST, no FIN
            if mode == "pass":
                break
            if mode == "refuse" or self._closing.is_set():
                return False
            time.sleep(0.05)
        if delay_s:
            time.sleep(delay_s)
        sink.sendall(data)
        return True

    def _drop(self, *socks: socket.socket) -> None:
        with self._lock:
            self._pairs = [p for p in self._pairs if p[0] not in socks and p[1] not in socks]
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.close()

    def close(self) -> None:
        self._closing.set()
        self._listener.close()
        self.reset()
        self._thread.join(timeout=2)

    def __enter__(self) -> FaultyProxy:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _abort(sock: socket.socket) -> None:
    """Close with an RST rather than a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


def restart(server: RedisServer, down_s: float = 0.0) -> None:
    """Stop ``server`` (SIGTERM: with ``appendonly`` on, its data survives), stay down
    ``down_s`` seconds, and start it again on the same port and directory."""
    server.stop()
    time.sleep(down_s)
    server.start()
