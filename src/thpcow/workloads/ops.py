"""The operation stream: what a workload asks the simulated kernel to do, and when.

A workload is a generator of :class:`Op` in non-decreasing time order.  Each op
names a workload process id (``pid``: 0 is the first process spawned; the
runner maps it to a kernel :class:`~thpcow.kernel.Process`) and, for memory
operations, a *region* (an ``mmap`` made by the workload) plus byte offsets
inside it.  Offsets instead of addresses make a stream independent of where
the kernel places mappings: a child forked later sees its parent's regions at
the same addresses, so the same region ids work for it.

Writes and reads come in batches: one op carries an int64 array of offsets
(one store or load each, within one page) and becomes one
``Process.write_many`` / ``read_many`` call.  Workloads batch by time (all the
stores of one ``batch_ms`` tick) so that a simulation makes a few thousand
kernel calls, not millions.

``t`` is when the op is issued, in simulated ns.  By default time is open
loop without queueing: the modelled cost of an op does not delay the ops after
it.  A scenario's ``loop`` (``open``: ``t`` is an arrival and ops queue behind
their client's busy time; ``closed``: each op's cost shifts its client's later
ops) is applied by :mod:`thpcow.experiments.loop`; streams stay the same.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable

import numpy as np

SPAWN = "spawn"          # a new process (as after execve)
MMAP = "mmap"            # region <- mmap(length) in pid
MUNMAP = "munmap"        # munmap(region + offset, length)
MADVISE = "madvise"      # madvise(region + offset, length, arg)
WRITE = "write"          # write_many(region + offsets, token)
READ = "read"            # read_many(region + offsets)
FORK = "fork"            # pid forks; the child is workload pid ``arg``
EXIT = "exit"            # pid exits
PHASE_END = "phase_end"  # the COW policy's phase_end(parent=pid, its live children)
END = "end"              # nothing: the clock runs until t (kernel threads run)

KINDS = (SPAWN, MMAP, MUNMAP, MADVISE, WRITE, READ, FORK, EXIT, PHASE_END, END)


@dataclass(frozen=True, slots=True, eq=False)
class Op:
    """One timed operation of a workload (see the module docstring for the fields' meaning)."""

    t: int                                   # simulated time (ns) the op is issued
    kind: str                                # one of KINDS
    pid: int                                 # workload process id
    phase: str = ""                          # workload phase label ("load", "snapshot", ...)
    region: int = -1                         # MMAP/MUNMAP/MADVISE/WRITE/READ: region id
    offset: int = 0                          # MUNMAP/MADVISE: start offset in the region
    length: int = 0                          # MMAP/MUNMAP/MADVISE: bytes
    offsets: np.ndarray | None = None        # WRITE/READ: byte offsets (int64), one access each
    token: int = 0                           # WRITE: the content token stored
    nbytes: int = 0                          # WRITE/READ: bytes stored/loaded (for the cost model)
    arg: int = 0                             # MADVISE: advice; FORK: the child's pid
    needs: tuple[tuple[int, int, int], ...] = ()   # FORK: (region, offset, length) the child uses

    @property
    def n(self) -> int:
        """Number of accesses (stores or loads) in the op."""
        return 0 if self.offsets is None else len(self.offsets)

    def key(self) -> tuple:
        """Everything but the offsets array, as a comparable tuple."""
        return (self.t, self.kind, self.pid, self.phase, self.region, self.offset, self.length,
                self.token, self.nbytes, self.arg, self.needs, self.n)

    def same(self, other: "Op") -> bool:
        """Field-by-field equality, arrays included."""
        if self.key() != other.key():
            return False
        if self.offsets is None or other.offsets is None:
            return self.offsets is None and other.offsets is None
        return bool(np.array_equal(self.offsets, other.offsets))


def stream_digest(ops: Iterable[Op]) -> str:
    """A SHA-256 of a whole op stream: equal digests mean identical streams."""
    h = hashlib.sha256()
    for op in ops:
        h.update(repr(op.key()).encode())
        if op.offsets is not None:
            h.update(np.ascontiguousarray(op.offsets, dtype=np.int64).tobytes())
    return h.hexdigest()


def check_order(ops: Iterable[Op]) -> Iterable[Op]:
    """Pass ops through, raising ValueError if time goes backwards or a kind is unknown."""
    last = 0
    for i, op in enumerate(ops):
        if op.kind not in KINDS:
            raise ValueError(f"op #{i}: kind={op.kind!r} is not one of {', '.join(KINDS)}")
        if op.t < last:
            raise ValueError(f"op #{i}: t={op.t} is before the previous op's t={last}")
        last = op.t
        yield op
