"""Multi-host (multi-controller) execution: every host runs the same step in lockstep.

Rank 0 schedules. Before each device step it sends the step's packed arrays
to the other ranks over a plain TCP connection (a few KB of raw bytes, no
pickling), and every rank then calls the same jitted step on its shards.
The same connections carry heartbeats both ways: a rank that dies or stops
answering is noticed within ``LOST_AFTER_S`` and the survivors exit non-zero
naming it, instead of hanging in a collective.
"""

from __future__ import annotations

import json
import os
import queue
import socket
import struct
import sys
import threading
import time

import numpy as np


HEARTBEAT_S = 1.0
LOST_AFTER_S = 10.0
_LEN = struct.Struct("!I")


def init_distributed(dist_init_addr: str, nnodes: int, node_rank: int,
                     timeout_s: int = 120) -> None:
    """``jax.distributed.initialize`` with bounded waiting for the other hosts."""
    import jax

    jax.distributed.initialize(coordinator_address=dist_init_addr, num_processes=nnodes,
                               process_id=node_rank, initialization_timeout=timeout_s)


def channel_address(dist_init_addr: str) -> tuple[str, int]:
    """The step channel listens one port above the JAX coordinator."""
    host, port = dist_init_addr.rsplit(":", 1)
    return host, int(port) + 1


def _send_msg(sock: socket.socket, kind: str, arrays: dict[str, np.ndarray] | None = None) -> None:
    arrays = arrays or {}
    meta = [[k, v.dtype.str, list(v.shape)] for k, v in arrays.items()]
    header = json.dumps({"kind": kind, "arrays": meta}).encode()
    payload = b"".join(np.ascontiguousarray(v).tobytes() for v in arrays.values())
    sock.sendall(_LEN.pack(len(header)) + header + _LEN.pack(len(payload)) + payload)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk
    return bytes(buf)


def _recv_msg(sock: socket.socket) -> tuple[str, dict[str, np.ndarray]]:
    header = json.loads(_recv_exact(sock, _LEN.unpack(_recv_exact(sock, 4))[0]))
    payload = _recv_exact(sock, _LEN.unpack(_recv_exact(sock, 4))[0])
    arrays, at = {}, 0
    for name, dtype, shape in header["arrays"]:
        dt = np.dtype(dtype)
        size = int(np.prod(shape)) * dt.itemsize
        arrays[name] = np.frombuffer(payload[at:at + size], dt).reshape(shape)
        at += size
    return header["kind"], arrays


def _die(message: str) -> None:
    # One line straight to stderr (no logging: the process may be racing JAX's own abort,
    # and a log handler on stderr would print it twice).
    sys.stderr.flush()
    os.write(2, f"error: {message}\n".encode())
    os._exit(1)  # a collective may be stuck in C++: only a hard exit is bounded


class Leader:
    """Rank 0's end: sends steps to every follower, watches their heartbeats."""

    def __init__(self, addr: tuple[str, int], nnodes: int, on_lost=None, accept_timeout_s=120):
        self.on_lost = on_lost
        self._lock = threading.Lock()
        self._closing = False  # "shutdown" sent: followers leaving is expected now
        server = socket.create_server(("0.0.0.0", addr[1]), reuse_port=False)
        server.settimeout(accept_timeout_s)
        self.peers: dict[int, socket.socket] = {}
        while len(self.peers) < nnodes - 1:
            try:
                conn, _ = server.accept()
            except socket.timeout:
                missing = sorted(set(range(1, nnodes)) - set(self.peers))
                _die(f"ranks {missing} did not connect within {accept_timeout_s} s")
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _, arrays = _recv_msg(conn)
            self.peers[int(arrays["rank"][0])] = conn
        server.close()
        self._last_seen = {r: time.monotonic() for r in self.peers}
        for rank, conn in self.peers.items():
            threading.Thread(target=self._listen, args=(rank, conn), daemon=True).start()
        threading.Thread(target=self._heartbeat, daemon=True).start()

    def _lost(self, rank: int, why: str) -> None:
        if self._closing:
            return
        if self.on_lost:
            self.on_lost(rank)
        _die(f"lost rank {rank} ({why}); shutting down")

    def _listen(self, rank: int, conn: socket.socket) -> None:
        conn.settimeout(LOST_AFTER_S)
        try:
            while True:
                _recv_msg(conn)
                self._last_seen[rank] = time.monotonic()
        except (OSError, ConnectionError, ValueError) as e:
            self._lost(rank, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)

    def _heartbeat(self) -> None:
        while not self._closing:
            time.sleep(HEARTBEAT_S)
            self.send("heartbeat")

    def send(self, kind: str, arrays: dict[str, np.ndarray] | None = None) -> None:
        with self._lock:
            if self._closing:
                return
            self._closing = kind == "shutdown"
            for rank, conn in self.peers.items():
                try:
                    _send_msg(conn, kind, arrays)
                except OSError as e:
                    self._lost(rank, str(e))


class Follower:
    """A follower's end: receives steps from rank 0, answers with heartbeats.

    A reader thread owns the receiving side, even while the main thread is inside a
    device step, so a leader that dies is noticed the moment its socket closes (the
    kernel closes a killed process's sockets). That matters: rank 0 also hosts JAX's
    coordination service, whose client aborts this process a few milliseconds after
    losing it (with a message about "the leader task"), and a Python callback for
    that (``missed_heartbeat_callback``) cannot be used in jaxlib 0.10.2 (calling
    it fails with std::bad_cast). Exiting first is how the user gets our line.
    """

    def __init__(self, addr: tuple[str, int], rank: int, connect_timeout_s: float = 120,
                 leader: str | None = None):
        self.leader = leader or f"{addr[0]}:{addr[1]}"  # how the user named rank 0
        deadline = time.monotonic() + connect_timeout_s
        while True:
            try:
                self.sock = socket.create_connection(addr, timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    _die(f"rank 0 at {self.leader} did not answer within "
                         f"{connect_timeout_s} s")
                time.sleep(0.2)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._lock = threading.Lock()
        self._steps: queue.Queue = queue.Queue()
        self._released = threading.Event()  # rank 0 said "shutdown": its going away is expected
        _send_msg(self.sock, "hello", {"rank": np.asarray([rank], np.int32)})
        self.sock.settimeout(LOST_AFTER_S)
        # The reader must get the GIL at once when the leader's socket closes, to print
        # before JAX's abort does: hand the GIL over after 0.1 ms, not the default 5 ms
        # (the other threads here sleep almost always, so this costs nothing).
        sys.setswitchinterval(1e-4)
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._heartbeat, daemon=True).start()

    def _lost(self, why: str) -> None:
        if not self._released.is_set():
            _die(f"lost rank 0 (the leader at {self.leader} {why}); exiting")

    def _read(self) -> None:
        try:
            while True:
                kind, arrays = _recv_msg(self.sock)
                if kind == "heartbeat":
                    continue
                if kind == "shutdown":
                    self._released.set()
                self._steps.put((kind, arrays))
                if kind == "shutdown":
                    return
        except TimeoutError:
            self._lost(f"sent nothing for {LOST_AFTER_S:.0f} s")
        except ConnectionError:
            self._lost("closed the connection: it stopped or was killed")
        except (OSError, ValueError) as e:
            self._lost(f"failed: {type(e).__name__}: {e}")

    def _heartbeat(self) -> None:
        while not self._released.is_set():
            time.sleep(HEARTBEAT_S)
            try:
                with self._lock:
                    _send_msg(self.sock, "heartbeat")
            except OSError as e:
                self._lost(f"stopped taking heartbeats: {e}")
                return

    def recv(self) -> tuple[str, dict[str, np.ndarray]]:
        """The next step rank 0 sent (the process exits if rank 0 is lost first)."""
        return self._steps.get()

