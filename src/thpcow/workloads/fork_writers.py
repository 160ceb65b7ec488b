"""Fork-then-write workloads: copy-after-fork, prefork-server, python-refcount, forkserver, fork-touch."""

from __future__ import annotations

from typing import Iterator

import numpy as np

from ..kernel.constants import HPAGE_PMD_NR, HPAGE_PMD_SIZE, PAGE_SIZE
from .base import (MIB, NSEC_PER_SEC, Loads, Param, Workload, keys, ms, page_offsets, per_tick, populate_ops,
                   read_params)
from .ops import END, EXIT, FORK, PHASE_END, READ, WRITE, Op


def _sorted(ops: list[Op]) -> list[Op]:
    """Ops in time order; ops at the same time keep the order they were made in."""
    return sorted(ops, key=lambda op: op.t)


class CopyAfterFork(Workload):
    """The series' end-to-end copying test: after fork one side rewrites large contiguous ranges.

    The parent (pid 0) maps and writes ``size_mib``; at ``fork_after_ms`` it
    forks pid 1.  The ``writer`` (child or parent) then rewrites ``copy_mib``
    in ranges of ``range_kib`` (every page of a range, one op per range),
    in sequential or random range order, at ``copy_mib_s``.  The phase ends
    (``phase_end``) with the child alive; ``hold_ms`` later the child exits.
    From the fork to the child's exit the ``reader`` (parent or child) loads
    ``reads_per_s`` 8-byte words of the whole region, one batch per
    ``read_batch_ms`` tick, where ``read_dist`` puts them (a service reading
    its heap while a copy runs, and after it; ``read_in`` keeps one phase).
    Phases: ``load``, ``copy``, ``after``.
    """

    name = "copy-after-fork"
    help = "after fork the child (or parent) rewrites large contiguous ranges: the series' copying test"
    measure_phase = "copy"
    params = {
        "size_mib": Param(64, "region size (MiB), written once at t=0", lo=1),
        "thp": Param(True, "madvise(MADV_HUGEPAGE) on the region"),
        "copy_mib": Param(32.0, "how much the writer rewrites after the fork (MiB)", lo=0),
        "range_kib": Param(8192, "size of each contiguous range rewritten (KiB, multiple of 4)", lo=4),
        "order": Param("random", "order of the ranges", choices=("sequential", "random")),
        "writer": Param("child", "which side rewrites", choices=("child", "parent")),
        "copy_mib_s": Param(4096.0, "rewrite bandwidth (MiB/s): one range every range/bandwidth", lo=1e-3),
        "fork_after_ms": Param(10.0, "time from the load to the fork (ms)", lo=0),
        "hold_ms": Param(10.0, "time the child lives after the copy (ms)", lo=0),
        "reads_per_s": Param(0.0, "loads per second by the reader, from the fork to the child's exit", lo=0),
        "reader": Param("parent", "which side loads", choices=("parent", "child")),
        "read_in": Param("both", "the phases the reader loads in: copy (while the copy runs), after (from "
                                 "its end to the child's exit) or both", choices=("both", "copy", "after")),
        "read_batch_ms": Param(1.0, "one batch of loads per tick of this length (ms)", lo=1e-3, hi=10_000),
        **read_params("the region"),
    }

    def check(self) -> None:
        if self.range_kib % 4:
            raise ValueError(f"workload {self.name}: parameter range_kib={self.range_kib}: must be a multiple of 4")
        if self.copy_mib > self.size_mib:
            raise ValueError(f"workload {self.name}: parameter copy_mib={self.copy_mib} exceeds "
                             f"size_mib={self.size_mib}")
        if self.range_kib > self.size_mib * 1024:
            raise ValueError(f"workload {self.name}: parameter range_kib={self.range_kib} exceeds "
                             f"size_mib={self.size_mib}")

    def _plan(self) -> tuple[int, int, int, int]:
        """(range bytes, number of ranges, ns per range, fork time)."""
        rbytes = self.range_kib * 1024
        nranges = int(round(self.copy_mib * MIB / rbytes))
        per = max(1, int(round(rbytes / (self.copy_mib_s * MIB) * NSEC_PER_SEC)))
        return rbytes, nranges, per, ms(self.fork_after_ms)

    def duration_ns(self) -> int:
        _r, nranges, per, t_fork = self._plan()
        return t_fork + nranges * per + ms(self.hold_ms)

    def ops(self, seed: int = 0) -> Iterator[Op]:
        rng = np.random.default_rng(seed)
        size = self.size_mib * MIB
        rbytes, nranges, per, t_fork = self._plan()
        slots = size // rbytes
        yield from populate_ops(0, 0, size, self.thp)
        order = np.arange(slots) if self.order == "sequential" else rng.permutation(slots)
        chosen = order[:nranges]
        writer = 1 if self.writer == "child" else 0
        if self.reads_per_s and self.reader == "child":
            needs: tuple = ((0, 0, size),)             # the child loads from all of it
        elif writer == 1:
            needs = tuple((0, int(s) * rbytes, rbytes) for s in np.sort(chosen))
        else:
            needs = ()
        out = [Op(t_fork, FORK, 0, "copy", arg=1, needs=needs)]
        for i, slot in enumerate(chosen.tolist()):
            out.append(Op(t_fork + i * per, WRITE, writer, "copy", region=0,
                          offsets=page_offsets(slot * rbytes, rbytes), token=2 + i, nbytes=rbytes))
        t_done = t_fork + nranges * per
        t_exit = t_done + ms(self.hold_ms)
        out.append(Op(t_done, PHASE_END, 0, "copy"))
        if self.reads_per_s:
            out += self._reads(rng, size, t_fork, t_done, t_exit)
        out.append(Op(t_exit, EXIT, 1, "after"))
        out.append(Op(t_exit, END, 0, "after"))
        yield from _sorted(out)

    def _reads(self, rng: np.random.Generator, size: int, t_fork: int, t_done: int, t_exit: int) -> list[Op]:
        """The reader's load batches, one per tick from the fork until (not at) the child's exit."""
        tick = max(ms(self.read_batch_ms), 1)
        nticks = -(-(t_exit - t_fork) // tick)
        loads = Loads(size, self.read_dist, self.read_zipf_s)
        reader = 1 if self.reader == "child" else 0
        out = []
        ends = np.minimum(np.arange(1, nticks + 1, dtype=np.float64) * tick, t_exit - t_fork)
        edges = np.floor(np.concatenate(([0.0], ends)) * self.reads_per_s / NSEC_PER_SEC)
        for j, n in enumerate(np.diff(edges).astype(np.int64).tolist()):      # the last tick pro rata
            t = t_fork + j * tick
            phase = "copy" if t < t_done else "after"
            if n and self.read_in in ("both", phase):
                offs = loads.offsets(rng, reader, n)
                out.append(Op(t, READ, reader, phase, region=0, offsets=offs, nbytes=8 * n))
        return out


class PreforkServer(Workload):
    """A pre-forking server: the parent loads data, forks K workers, each writes a small share.

    The parent (pid 0) maps and writes ``data_mib``, then forks ``workers``
    children (pids 1..K) ``fork_gap_ms`` apart, starting at ``fork_after_ms``.
    Each worker writes 8 bytes into each page of its own random share
    (``share`` of the pages), spread evenly over ``serve_ms`` in ``batch_ms``
    ticks, and (``reads_per_tick``) loads 8 bytes at random places of all the
    data every tick (where ``read_dist`` puts them).  Then the parent ends the phase and the
    workers exit.  Phases:
    ``load``, ``serve``, ``after``.
    """

    name = "prefork-server"
    help = "the parent loads data and forks K workers that each write a small share of it"
    measure_phase = "serve"
    params = {
        "data_mib": Param(256, "data loaded by the parent (MiB)", lo=1),
        "thp": Param(True, "madvise(MADV_HUGEPAGE) on the data"),
        "workers": Param(8, "worker processes forked", lo=1, hi=4096),
        "share": Param(0.02, "fraction of the data pages each worker writes", lo=0, hi=1),
        "serve_ms": Param(1000.0, "how long each worker serves (ms)", lo=0),
        "batch_ms": Param(10.0, "one write batch per worker per tick of this length (ms)", lo=1e-3),
        "fork_after_ms": Param(10.0, "time from the load to the first fork (ms)", lo=0),
        "fork_gap_ms": Param(1.0, "time between two forks (ms)", lo=0),
        "reads_per_tick": Param(0, "loads each worker makes per tick at random places of all the data "
                                   "(a read-mostly server: its shared state)", lo=0),
        **read_params("all the data"),
    }

    def _plan(self) -> tuple[int, int, int]:
        tick = max(ms(self.batch_ms), 1)
        nticks = max(1, int(round(ms(self.serve_ms) / tick)))
        return tick, nticks, ms(self.fork_after_ms)

    def duration_ns(self) -> int:
        tick, nticks, t0 = self._plan()
        return t0 + (self.workers - 1) * ms(self.fork_gap_ms) + nticks * tick

    def _worker_writes(self, rng: np.random.Generator, w: int, npages: int, nticks: int) -> list[np.ndarray]:
        """The offsets worker ``w`` writes, one array per tick."""
        pages = rng.choice(npages, size=int(round(self.share * npages)), replace=False)
        offs = pages.astype(np.int64) * PAGE_SIZE + rng.integers(0, PAGE_SIZE // 8, size=len(pages)) * 8
        return np.array_split(offs, nticks)

    def ops(self, seed: int = 0) -> Iterator[Op]:
        rng = np.random.default_rng(seed)
        size = self.data_mib * MIB
        npages = size // PAGE_SIZE
        tick, nticks, t0 = self._plan()
        yield from populate_ops(0, 0, size, self.thp)
        out: list[Op] = []
        gap = ms(self.fork_gap_ms)
        reads = getattr(self, "reads_per_tick", 0)        # (python-refcount: its reads are writes)
        loads = Loads(size, self.read_dist, self.read_zipf_s, salt=seed) if reads else None
        for w in range(1, self.workers + 1):
            t_fork = t0 + (w - 1) * gap
            out.append(Op(t_fork, FORK, 0, "serve", arg=w, needs=((0, 0, size),)))
            for j, offs in enumerate(self._worker_writes(rng, w, npages, nticks)):
                if len(offs):
                    out.append(Op(t_fork + (j + 1) * tick, WRITE, w, "serve", region=0, offsets=offs,
                                  token=1000 * w + j, nbytes=8 * len(offs)))
                if loads is not None:
                    offs = loads.offsets(rng, w, reads)
                    out.append(Op(t_fork + (j + 1) * tick, READ, w, "serve", region=0, offsets=offs,
                                  nbytes=8 * len(offs)))
        t_end = self.duration_ns()
        out.append(Op(t_end, PHASE_END, 0, "serve"))
        out += [Op(t_end, EXIT, w, "after") for w in range(1, self.workers + 1)]
        out.append(Op(t_end, END, 0, "after"))
        yield from _sorted(out)


class PythonRefcount(PreforkServer):
    """Like prefork-server, but every object a worker reads is written (CPython refcounts).

    Each worker makes ``touches_per_s`` object accesses over ``serve_ms``;
    every access increments the object's refcount, an 8-byte store at the
    object's header (objects are ``object_size`` bytes, keys uniform or
    Zipfian).  So every page a worker merely reads is COWed.
    """

    name = "python-refcount"
    help = "prefork workers whose reads also write (refcount updates): every touched page is COWed"
    params = {
        "data_mib": Param(256, "heap of Python objects loaded by the parent (MiB)", lo=1),
        "thp": Param(True, "madvise(MADV_HUGEPAGE) on the heap"),
        "workers": Param(8, "worker processes forked", lo=1, hi=4096),
        "object_size": Param(64, "bytes per object (the refcount is its first 8 bytes)", lo=8, hi=1 << 20),
        "touches_per_s": Param(100_000.0, "object accesses per second per worker", lo=0),
        "key_dist": Param("uniform", "object popularity", choices=("uniform", "zipf")),
        "zipf_s": Param(0.99, "Zipf exponent (key_dist=zipf)", lo=0.01, hi=10.0),
        "serve_ms": Param(1000.0, "how long each worker serves (ms)", lo=0),
        "batch_ms": Param(10.0, "one batch of accesses per worker per tick of this length (ms)", lo=1e-3),
        "fork_after_ms": Param(10.0, "time from the load to the first fork (ms)", lo=0),
        "fork_gap_ms": Param(1.0, "time between two forks (ms)", lo=0),
    }

    def check(self) -> None:
        if self.object_size % 8:
            raise ValueError(f"workload {self.name}: parameter object_size={self.object_size}: "
                             "must be a multiple of 8")
        if self.object_size > self.data_mib * MIB:
            raise ValueError(f"workload {self.name}: parameter object_size={self.object_size} exceeds "
                             f"data_mib={self.data_mib}")

    def _worker_writes(self, rng, w, npages, nticks):
        nobj = npages * PAGE_SIZE // self.object_size
        tick, _n, _t0 = self._plan()
        counts = per_tick(self.touches_per_s, tick, nticks)
        return [keys(rng, nobj, self.key_dist, self.zipf_s, int(c), salt=w) * self.object_size for c in counts]


class Forkserver(Workload):
    """A fork server: thousands of short-lived children, each writing a few pages.

    The parent (pid 0) maps and writes ``data_mib``.  From ``fork_after_ms``
    on it forks ``children`` children at ``fork_rate_per_s``; child i writes
    ``pages_per_child`` random pages of the first ``hot_mib`` at its fork time,
    then loads ``reads_per_child`` 8-byte words of all the data (where
    ``read_dist`` puts them), lives ``lifetime_ms``, and exits right after the
    parent's ``phase_end``.
    Phases: ``load``, ``serve``.
    """

    name = "forkserver"
    help = "forks thousands of short-lived children that each write a few pages"
    measure_phase = "serve"
    params = {
        "data_mib": Param(64, "memory of the fork server (MiB)", lo=1),
        "thp": Param(True, "madvise(MADV_HUGEPAGE) on it"),
        "children": Param(1000, "children forked", lo=1, hi=1_000_000),
        "pages_per_child": Param(8, "pages each child writes", lo=0),
        "hot_mib": Param(4.0, "the children write within the first hot_mib (MiB)", lo=0.004),
        "fork_rate_per_s": Param(1000.0, "forks per second", lo=1e-3),
        "lifetime_ms": Param(0.5, "how long a child lives (ms)", lo=0),
        "fork_after_ms": Param(10.0, "time from the load to the first fork (ms)", lo=0),
        "reads_per_child": Param(0, "loads each child makes after its writes, over all the data", lo=0),
        **read_params("all the data"),
    }

    def check(self) -> None:
        if self.hot_mib > self.data_mib:
            raise ValueError(f"workload {self.name}: parameter hot_mib={self.hot_mib} exceeds "
                             f"data_mib={self.data_mib}")

    def _times(self, i: int) -> int:
        return ms(self.fork_after_ms) + int(round(i * NSEC_PER_SEC / self.fork_rate_per_s))

    def duration_ns(self) -> int:
        return self._times(self.children - 1) + ms(self.lifetime_ms)

    def ops(self, seed: int = 0) -> Iterator[Op]:
        rng = np.random.default_rng(seed)
        size = self.data_mib * MIB
        hot = max(1, int(self.hot_mib * MIB) // PAGE_SIZE)
        yield from populate_ops(0, 0, size, self.thp)
        out: list[Op] = []
        life = ms(self.lifetime_ms)
        loads = Loads(size, self.read_dist, self.read_zipf_s, salt=seed) if self.reads_per_child else None
        for i in range(self.children):
            pid, t = i + 1, self._times(i)
            pages = rng.integers(0, hot, size=self.pages_per_child, dtype=np.int64)
            out.append(Op(t, FORK, 0, "serve", arg=pid, needs=((0, 0, size if loads else hot * PAGE_SIZE),)))
            if len(pages):
                out.append(Op(t, WRITE, pid, "serve", region=0, offsets=pages * PAGE_SIZE, token=100 + i,
                              nbytes=8 * len(pages)))
            if loads is not None:
                offs = loads.offsets(rng, pid, self.reads_per_child)
                out.append(Op(t, READ, pid, "serve", region=0, offsets=offs, nbytes=8 * len(offs)))
            out.append(Op(t + life, PHASE_END, 0, "serve"))
            out.append(Op(t + life, EXIT, pid, "serve"))
        out.append(Op(self.duration_ns(), END, 0, "serve"))
        yield from _sorted(out)


class ForkTouch(Workload):
    """The smallest fork/COW story: populate, fork, the child touches every 2 MiB block, the child exits.

    The parent (pid 0) maps ``size_mib`` and writes all of it; it forks pid 1;
    the child writes ``pages_per_2m`` distinct random pages of every 2 MiB
    block (one op, empty when ``pages_per_2m`` is 0); the child exits.  Everything happens at t=0, so no kernel
    thread runs.  Each step is its own phase: ``load``, ``fork``, ``write``,
    ``exit`` (``thpcow demo`` shows the vmstat deltas of each).
    """

    name = "fork-touch"
    help = "populate, fork, the child writes N pages in every 2 MiB block, the child exits (the demo)"
    measure_phase = "write"
    params = {
        "size_mib": Param(8, "region size (MiB, a multiple of 2), written once before the fork", lo=2),
        "thp": Param(True, "madvise(MADV_HUGEPAGE) on the region"),
        "pages_per_2m": Param(1, "pages the child writes in every 2 MiB block", lo=0, hi=HPAGE_PMD_NR),
    }

    def check(self) -> None:
        if self.size_mib % 2:
            raise ValueError(f"workload {self.name}: parameter size_mib={self.size_mib}: must be a multiple of 2")

    def duration_ns(self) -> int:
        return 0

    def ops(self, seed: int = 0) -> Iterator[Op]:
        rng = np.random.default_rng(seed)
        size = self.size_mib * MIB
        nblocks = size // HPAGE_PMD_SIZE
        yield from populate_ops(0, 0, size, self.thp)
        yield Op(0, FORK, 0, "fork", arg=1, needs=((0, 0, size),))
        pages = np.sort(rng.random((nblocks, HPAGE_PMD_NR)).argsort(axis=1)[:, :self.pages_per_2m], axis=1)
        offs = ((np.arange(nblocks, dtype=np.int64)[:, None] * HPAGE_PMD_NR + pages) * PAGE_SIZE).ravel()
        yield Op(0, WRITE, 1, "write", region=0, offsets=offs, token=2, nbytes=len(offs) * PAGE_SIZE)
        yield Op(0, EXIT, 1, "exit")
        yield Op(0, END, 0, "exit")
