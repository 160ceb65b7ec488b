"""redis-bgsave: a key-value store snapshots its THP-backed dataset with fork() while it keeps serving writes."""

from __future__ import annotations

from typing import Iterator

import numpy as np

from ..kernel.constants import PAGE_SIZE
from .base import MIB, NSEC_PER_SEC, Param, Workload, keys, ms, per_tick, populate_ops, span_offsets
from .ops import END, EXIT, FORK, PHASE_END, READ, WRITE, Op


class RedisBgsave(Workload):
    """Redis BGSAVE: the parent forks a child that streams the dataset to disk.

    Timeline (``batch_ms`` ticks): at t=0 the parent (pid 0) maps
    ``dataset_mib`` (MADV_HUGEPAGE if ``thp``) and writes all of it.  From the
    first tick on it stores ``writes_per_s`` values of ``value_size`` bytes at
    keys drawn uniformly or from a scrambled Zipfian law, and reads
    ``reads_per_s`` values (GETs) at keys of the same law.  At ``fork_after_ms``
    it forks the snapshot child (pid 1), which reads the dataset sequentially
    at ``scan_mib_s`` (one load per page) and exits when done; the parent then
    ends the phase (the COW policy's ``phase_end``) and keeps writing for
    ``tail_ms``.  Phases: ``load``, ``before``, ``snapshot``, ``after``.
    """

    name = "redis-bgsave"
    help = "a parent with an N MiB THP-backed dataset forks a snapshot child that scans it while the parent writes"
    measure_phase = "snapshot"
    params = {
        "dataset_mib": Param(256, "dataset size (MiB), written once at t=0", lo=1),
        "thp": Param(True, "madvise(MADV_HUGEPAGE) on the dataset"),
        "value_size": Param(1024, "bytes stored per write (a value)", lo=1, hi=1 << 20),
        "key_dist": Param("zipf", "key popularity", choices=("uniform", "zipf")),
        "zipf_s": Param(0.99, "Zipf exponent (key_dist=zipf)", lo=0.01, hi=10.0),
        "writes_per_s": Param(100_000.0, "parent writes per second", lo=0),
        "reads_per_s": Param(0.0, "parent reads (GETs) per second, same key law as the writes", lo=0),
        "scan_mib_s": Param(512.0, "snapshot child's sequential read rate (MiB/s)", lo=1e-3),
        "fork_after_ms": Param(10.0, "time from the load to the fork (ms)", lo=0),
        "tail_ms": Param(100.0, "time the parent keeps writing after the child exits (ms)", lo=0),
        "batch_ms": Param(1.0, "one write batch per tick of this length (ms)", lo=1e-3, hi=10_000),
    }

    # -- schedule -------------------------------------------------------------------------
    def _ticks(self) -> tuple[int, int, int, int, int]:
        """(tick_ns, fork tick, exit tick, last tick, pages scanned per tick)."""
        tick = max(ms(self.batch_ms), 1)
        npages = self.dataset_mib * MIB // PAGE_SIZE
        fork_i = max(1, int(round(ms(self.fork_after_ms) / tick)))
        per = max(1, int(round(self.scan_mib_s * MIB / PAGE_SIZE * tick / NSEC_PER_SEC)))
        exit_i = fork_i + -(-npages // per)
        last = exit_i + int(round(ms(self.tail_ms) / tick))
        return tick, fork_i, exit_i, last, per

    def duration_ns(self) -> int:
        tick, _f, _e, last, _p = self._ticks()
        return last * tick

    def ops(self, seed: int = 0) -> Iterator[Op]:
        rng = np.random.default_rng(seed)
        size = self.dataset_mib * MIB
        npages = size // PAGE_SIZE
        nkeys = size // self.value_size
        tick, fork_i, exit_i, last, per = self._ticks()
        yield from populate_ops(0, 0, size, self.thp)
        counts = per_tick(self.writes_per_s, tick, last)
        reads = per_tick(self.reads_per_s, tick, last) if self.reads_per_s else None
        for i in range(1, last + 1):
            t = i * tick
            phase = "before" if i < fork_i else "snapshot" if i <= exit_i else "after"
            if i == fork_i:
                yield Op(t, FORK, 0, phase, arg=1, needs=((0, 0, size),))
            n = int(counts[i - 1])
            if n:
                starts = keys(rng, nkeys, self.key_dist, self.zipf_s, n, salt=seed) * self.value_size
                yield Op(t, WRITE, 0, phase, region=0, offsets=span_offsets(starts, self.value_size),
                         token=1 + i, nbytes=n * self.value_size)
            r = int(reads[i - 1]) if reads is not None else 0
            if r:
                starts = keys(rng, nkeys, self.key_dist, self.zipf_s, r, salt=seed + 1) * self.value_size
                yield Op(t, READ, 0, phase, region=0, offsets=span_offsets(starts, self.value_size),
                         nbytes=r * self.value_size)
            if fork_i <= i < exit_i:
                lo = (i - fork_i) * per
                hi = min(lo + per, npages)
                yield Op(t, READ, 1, phase, region=0, offsets=np.arange(lo, hi, dtype=np.int64) * PAGE_SIZE,
                         nbytes=(hi - lo) * PAGE_SIZE)
            if i == exit_i:
                yield Op(t, EXIT, 1, phase)
                yield Op(t, PHASE_END, 0, phase)
        yield Op(last * tick, END, 0, "after" if last > exit_i else "snapshot")
