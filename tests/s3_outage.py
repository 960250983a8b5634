"""Test support: a TCP proxy on 127.0.0.1 in front of a server (the moto S3 server) that can cut it off for a few
seconds, to simulate an object-store outage. During an outage every open connection is reset and every new one is
reset as soon as it is accepted, as a crashed or restarting server would do; afterwards traffic flows again.

    proxy = OutageProxy(target_port)           # proxy.endpoint_url -> AWS_ENDPOINT_URL
    proxy.outage(5.0)                          # from now, for 5 s
    proxy.outage_on_request(lambda head: head.startswith(b"PUT ") and b"/checkpoint_" in head, 5.0)
    proxy.outages, proxy.refused               # when outages started, connections refused during them
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

_LINGER_RESET = b"\x01\x00\x00\x00\x00\x00\x00\x00"  # struct linger {on, 0 s}: close() sends RST


def _reset(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


class OutageProxy:
    """Forwards 127.0.0.1:`port` to `target_host`:`target_port`, except during outages."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self.down_until = 0.0
        self.trigger: tuple[Callable[[bytes], bool], float] | None = None
        self.outages: list[float] = []  # time.monotonic() at the start of each outage
        self.refused = 0  # connections reset on accept during an outage
        self.forwarded = 0  # connections forwarded
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._closed = False
        threading.Thread(target=self._accept, name="outage-proxy", daemon=True).start()

    # -- control ---------------------------------------------------------------------------------------------------
    def outage(self, seconds: float) -> None:
        """Cut every connection now and refuse new ones for `seconds`."""
        with self._lock:
            self.down_until = time.monotonic() + seconds
            self.outages.append(time.monotonic())
            sockets, self._open = list(self._open), set()
        for sock in sockets:
            _reset(sock)

    def outage_on_request(self, predicate: Callable[[bytes], bool], seconds: float) -> None:
        """Start an outage of `seconds` when a client sends data for which `predicate(data)` holds (the data is not
        forwarded). One shot: the trigger is removed when it fires."""
        self.trigger = (predicate, seconds)

    def is_down(self) -> bool:
        return time.monotonic() < self.down_until

    def wait_until_up(self) -> None:
        while self.is_down():
            time.sleep(0.05)

    def close(self) -> None:
        self._closed = True
        self.listener.close()
        with self._lock:
            sockets, self._open = list(self._open), set()
        for sock in sockets:
            _reset(sock)

    def __enter__(self) -> OutageProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- forwarding ------------------------------------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.is_down():
                self.refused += 1
                _reset(client)
                continue
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=10)
            upstream.settimeout(None)
        except OSError:
            _reset(client)
            return
        with self._lock:
            self._open.update((client, upstream))
            self.forwarded += 1
        threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()
        self._pump(client, upstream, True)

    def _pump(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        graceful = False
        try:
            while True:
                data = source.recv(65536)
                if self.is_down():
                    break
                if not data:  # an orderly close on one side: pass it on
                    graceful = True
                    break
                trigger = self.trigger
                if from_client and trigger is not None and trigger[0](data):
                    self.trigger = None
                    self.outage(trigger[1])
                    break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._open.discard(source)
                self._open.discard(sink)
            for sock in (source, sink):
                if graceful:
                    sock.close()
                else:
                    _reset(sock)
