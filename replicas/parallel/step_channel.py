"""How rank 0 hands each step to the other ranks: one TCP connection per worker, not a Ray call.

A Ray actor call costs the caller ~0.2 ms on a fast host (1.5 ms on a busy 2-core one) against
~10-70 us to pickle a StepMessage and write it to a socket, and rank 0 makes one per worker per
step, on the engine thread, between the GPU's steps. Each worker connects while it starts and
then reads steps on a thread of its own, in the order rank 0 wrote them.

Rank 0 listens on its node's address (workers may sit on other nodes when the placement strategy
spreads them); a worker proves it belongs to the group with the rendezvous's random prefix, so
another process that connects first takes no worker's place. Frames are an 8-byte length and a
pickle; only rank 0 writes them, and a worker reads nothing but its own group's rank 0.
"""
from __future__ import annotations

import pickle
import socket
import struct
import time
from dataclasses import dataclass

_LENGTH = struct.Struct("<Q")
_HELLO = struct.Struct("<I")  # the worker's rank, after the group's token


@dataclass(frozen=True)
class ChannelAddress:
    host: str
    port: int
    token: bytes  # the group's secret: rank 0's listener drops a connection that lacks it


class StepSender:
    """Rank 0's end: a listener, then one connection per worker rank (1..k-1), in rank order."""

    def __init__(self, host: str, token: bytes):
        self._listener = socket.create_server((host, 0))
        self.address = ChannelAddress(host, self._listener.getsockname()[1], token)
        self._peers: list[socket.socket] = []

    def accept(self, num_workers: int, timeout_s: float) -> None:
        """Wait until every worker rank has connected (they do as they start)."""
        by_rank: dict[int, socket.socket] = {}
        deadline = time.monotonic() + timeout_s
        while len(by_rank) < num_workers:
            self._listener.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                conn, _ = self._listener.accept()
            except socket.timeout:
                raise TimeoutError(f"{num_workers - len(by_rank)} tensor-parallel worker(s) never connected") from None
            conn.settimeout(5.0)
            try:
                hello = _read_exact(conn, len(self.address.token) + _HELLO.size)
            except OSError:
                hello = None
            rank = _HELLO.unpack(hello[-_HELLO.size:])[0] if hello else 0
            if hello is None or hello[:-_HELLO.size] != self.address.token or not 1 <= rank <= num_workers:
                conn.close()  # not one of this group's workers
                continue
            conn.settimeout(None)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            by_rank[rank] = conn
        self._peers = [by_rank[r] for r in range(1, num_workers + 1)]
        self._listener.close()

    def send(self, message: object) -> None:
        """The same message to every worker (raises OSError when one is gone)."""
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        header = _LENGTH.pack(len(data))
        for conn in self._peers:
            sent = conn.sendmsg([header, data])
            if sent < len(header) + len(data):  # a signal cut the write short: the frame must stay whole
                conn.sendall(memoryview(header + data)[sent:])

    def close(self) -> None:
        for conn in [self._listener, *self._peers]:
            try:
                conn.close()
            except OSError:
                pass


class StepReceiver:
    """A worker's end: connects to rank 0 and reads its messages in order."""

    def __init__(self, address: ChannelAddress, rank: int, timeout_s: float):
        self._conn = socket.create_connection((address.host, address.port), timeout=timeout_s)
        self._conn.settimeout(None)
        self._conn.sendall(address.token + _HELLO.pack(rank))

    def receive(self) -> object | None:
        """The next message; None once rank 0 has closed the connection (or gone)."""
        try:
            header = _read_exact(self._conn, _LENGTH.size)
            if header is None:
                return None
            data = _read_exact(self._conn, _LENGTH.unpack(header)[0])
        except OSError:
            return None
        return None if data is None else pickle.loads(data)

    def close(self) -> None:
        try:
            self._conn.close()
        except OSError:
            pass


def _read_exact(conn: socket.socket, n: int) -> bytearray | None:
    """n bytes, or None at the end of the stream."""
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = conn.recv_into(view[got:])
        if k == 0:
            return None
        got += k
    return buf
