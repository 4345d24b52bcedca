"""Fault injection for tests: a TCP proxy on loopback that can refuse, cut or answer 503 SlowDown."""

from __future__ import annotations

import random
import socket
import struct
import threading
import time

SLOW_DOWN = (b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\n"
             b"Content-Length: 107\r\n\r\n<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
             b"<Error><Code>SlowDown</Code><Message>Reduce your request rate.</Message></Error>")


def _reset(sock: socket.socket) -> None:
    """Close with a TCP RST (as a dropped connection reads to the client)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    except OSError:
        pass


class FlakyProxy:
    """Forwards 127.0.0.1:<port> to a server; `outage(s)` refuses new connections and resets live ones for s
    seconds, `slow_down(s)` answers every request with 503 SlowDown for s seconds."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.mode = "up"
        self.live: set[socket.socket] = set()
        self.lock = threading.Lock()
        self.listener = self._fixed_port()
        self.port = self.listener.getsockname()[1]
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _fixed_port(self) -> socket.socket:
        """A listener on a port below the kernel's ephemeral range (32768+): while the proxy is down, no outgoing
        connection of Ray's or botocore's can take its port, so it can listen there again."""
        for port in random.sample(range(20000, 32000), 200):
            try:
                return self._listen(port)
            except OSError:
                continue
        raise OSError("no free port below the ephemeral range")

    def _listen(self, port: int) -> socket.socket:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(64)
        sock.settimeout(0.2)
        return sock

    def _accept(self) -> None:
        while not self.closed:
            listener = self.listener
            try:
                client, _ = listener.accept()
            except (socket.timeout, OSError):
                if self.mode == "down" or listener is not self.listener:
                    time.sleep(0.05)
                continue
            if self.mode == "slow":
                threading.Thread(target=self._slow_down, args=(client,), daemon=True).start()
            elif self.mode == "down":
                _reset(client)
            else:
                threading.Thread(target=self._forward, args=(client,), daemon=True).start()

    def _slow_down(self, client: socket.socket) -> None:
        client.settimeout(5)
        try:
            client.recv(65536)
            client.sendall(SLOW_DOWN)
            client.shutdown(socket.SHUT_WR)
            time.sleep(0.1)
        except OSError:
            pass
        client.close()

    def _forward(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target)
        except OSError:
            return _reset(client)
        with self.lock:
            self.live |= {client, upstream}
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            _reset(src)
            _reset(dst)
        with self.lock:
            self.live.discard(src)

    def outage(self, seconds: float) -> None:
        """Refuse connections (nothing listens) and reset those in flight for `seconds`, in the background. A
        connection whose pump is blocked reading is not reset by the close (Linux keeps the socket until the read
        returns): it goes silent, as a connection dropped without a reset does, and only the client's read
        timeout ends it."""
        self.mode = "down"
        self.listener.close()
        with self.lock:
            live, self.live = self.live, set()
        for sock in live:
            _reset(sock)
        threading.Timer(seconds, self._restore).start()

    def slow_down(self, seconds: float) -> None:
        """Answer 503 SlowDown to every new connection for `seconds`, in the background."""
        self.mode = "slow"
        with self.lock:
            live, self.live = self.live, set()
        for sock in live:  # kept-alive connections would bypass the 503s
            _reset(sock)
        threading.Timer(seconds, self._restore).start()

    def _restore(self) -> None:
        while self.mode == "down" and not self.closed:
            try:
                self.listener = self._listen(self.port)
            except OSError:  # the port is not free yet: the store stays down a moment longer
                time.sleep(0.1)
                continue
            break
        self.mode = "up"

    def close(self) -> None:
        self.closed = True
        self.listener.close()
