"""An agent: one real process of a workload, doing the ops its runner sends (see lab/realrun.py).

The runner starts the first agent of a workload pid (``python -c`` running :func:`main` on one end
of a socketpair) and talks to it in messages: an 8-byte little-endian length, then a pickle.  Each
request is a tuple ``(verb, *args)``; each answer ``(error, wall_ns, minflt, value)``: ``error`` is
"" or what failed, ``wall_ns`` the op's own time (perf_counter_ns around the system call or the
stores), ``minflt`` the minor faults the process took during it (getrusage around the same code).

Verbs: ``mmap length`` (anonymous, private, RW, the start aligned to the PMD size: over-map and trim),
``munmap addr length``, ``madvise addr length advice`` (value: errno, 0 on success), ``write addr
offsets token`` (one byte stored at each offset), ``read addr offsets`` (one byte loaded at each),
``fork`` (an fd arrives with it: the child becomes the agent on it; value: the child's pid) and
``exit`` (answer, then _exit).  The agent exits at EOF (the runner went away), and its own forks are
reaped by the kernel (SIGCHLD ignored).  Kept small: it imports numpy and the standard library only.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import resource
import signal
import socket
import struct
import time

import numpy as np

from ._libc import Libc

PMD = 2 << 20
PROT_RW = 0x1 | 0x2
MAP_PRIVATE_ANON = 0x02 | 0x20
_HDR = struct.Struct("<Q")


def send_msg(sock: socket.socket, obj, fds: tuple[int, ...] = ()) -> None:
    """One message (length, pickle) with optional fds (SCM_RIGHTS on the length)."""
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    head = _HDR.pack(len(data))
    if fds:
        socket.send_fds(sock, [head], list(fds))
    else:
        sock.sendall(head)
    sock.sendall(data)


def _recv_exact(sock: socket.socket, n: int, head: bytes = b"") -> bytes:
    buf = bytearray(head)
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def recv_msg(sock: socket.socket, want_fds: bool = False):
    """(message, fds): one message and the fds that came with it; EOFError at EOF."""
    fds: list[int] = []
    if want_fds:
        data, fds, _flags, _addr = socket.recv_fds(sock, _HDR.size, 4)
        if not data:
            raise EOFError
        head = _recv_exact(sock, _HDR.size, data)
    else:
        head = _recv_exact(sock, _HDR.size)
    (n,) = _HDR.unpack(head)
    return pickle.loads(_recv_exact(sock, n)), fds


def aligned_mmap(libc: Libc, length: int) -> int:
    """mmap ``length`` bytes whose start is PMD-aligned (over-map by one PMD, unmap head and tail)."""
    raw = libc.mmap(None, length + PMD, PROT_RW, MAP_PRIVATE_ANON, -1, 0)
    if raw is None or raw == ctypes.c_void_p(-1).value:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap({length}): {os.strerror(err)}")
    addr = (raw + PMD - 1) & ~(PMD - 1)
    if addr > raw:
        libc.munmap(raw, addr - raw)
    tail = raw + length + PMD - (addr + length)
    if tail:
        libc.munmap(addr + length, tail)
    return addr


class _Buf:
    """numpy's array interface over raw memory (no buffer export)."""

    def __init__(self, addr: int, size: int) -> None:
        self.__array_interface__ = {"shape": (size,), "typestr": "|u1", "data": (addr, False), "version": 3}


class Agent:
    """The state of one agent: its socket and the regions it can address."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.libc = Libc()
        self.views: dict[int, np.ndarray] = {}        # region start -> uint8 view

    def view(self, addr: int, offsets: np.ndarray) -> np.ndarray:
        v = self.views.get(addr)
        if v is None:
            raise ValueError(f"no region at {addr:#x}")
        return v

    def do(self, verb: str, args: tuple, fds: list[int]):
        """Run one verb; returns (wall_ns, value)."""
        if verb == "mmap":
            (length,) = args
            t0 = time.perf_counter_ns()
            addr = aligned_mmap(self.libc, length)
            wall = time.perf_counter_ns() - t0
            self.views[addr] = np.asarray(_Buf(addr, length))
            return wall, addr
        if verb == "munmap":
            addr, length = args
            t0 = time.perf_counter_ns()
            rc = self.libc.munmap(addr, length)
            wall = time.perf_counter_ns() - t0
            if rc:
                err = ctypes.get_errno()
                raise OSError(err, f"munmap({addr:#x}, {length}): {os.strerror(err)}")
            for start in [s for s, v in self.views.items() if addr <= s and s + len(v) <= addr + length]:
                del self.views[start]
            return wall, 0
        if verb == "madvise":
            addr, length, advice = args
            t0 = time.perf_counter_ns()
            rc = self.libc.madvise(addr, length, advice)
            wall = time.perf_counter_ns() - t0
            return wall, (ctypes.get_errno() if rc else 0)
        if verb == "write":
            addr, offsets, token = args
            v = self.view(addr, offsets)
            val = np.uint8(token & 0xFF)
            t0 = time.perf_counter_ns()
            v[offsets] = val
            return time.perf_counter_ns() - t0, 0
        if verb == "read":
            addr, offsets = args
            v = self.view(addr, offsets)
            t0 = time.perf_counter_ns()
            s = int(v[offsets].sum(dtype=np.uint64))
            return time.perf_counter_ns() - t0, s
        if verb == "fork":
            (fd,) = fds
            t0 = time.perf_counter_ns()
            pid = os.fork()
            if pid == 0:                                   # the child: the agent on the new socket
                self.sock.close()
                self.sock = socket.socket(fileno=fd)
                return None, None
            wall = time.perf_counter_ns() - t0
            os.close(fd)
            return wall, pid
        raise ValueError(f"unknown verb {verb!r}")

    def loop(self) -> None:
        while True:
            try:
                msg, fds = recv_msg(self.sock, want_fds=True)
            except (EOFError, OSError):
                return
            verb, args = msg[0], msg[1:]
            if verb == "exit":
                send_msg(self.sock, ("", 0, 0, os.getpid()))
                return
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            try:
                wall, value = self.do(verb, args, fds)
                err = ""
            except Exception as exc:            # noqa: BLE001 - the runner names it
                wall, value, err = 0, None, f"{verb}: {type(exc).__name__}: {exc}"
            if wall is None:                    # the new child of a fork: answer nothing, serve
                continue
            flt = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
            send_msg(self.sock, (err, wall, flt, value))


def main(fd: int) -> None:
    """The agent's entry point: serve the socket ``fd`` until exit or EOF, then _exit."""
    from ..experiments._orphans import die_with_parent

    die_with_parent()                                 # the runner's direct child dies with it
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)     # the agent's forks are reaped by the kernel
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # Ctrl-C is the runner's: it ends the agents
    status = 0
    try:
        Agent(socket.socket(fileno=fd)).loop()
    except BaseException:                             # noqa: BLE001
        status = 1
    finally:
        os._exit(status)
