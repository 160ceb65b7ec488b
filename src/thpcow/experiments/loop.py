"""One clock for a workload's ops: when each op starts, when it completes, what its latency is.

A workload's stream gives each op a time ``t`` (see :mod:`thpcow.workloads.ops`).
The runner decides when the op really starts, one of three ways (the scenario's
``loop``):

- ``none`` (the default): the op starts at ``t`` whatever the ops before it
  cost; its latency is its own modelled cost.  Time is open loop and there is
  no queueing: the figures of the runs made before the loop existed.
- ``open``: ``t`` is the op's *arrival*.  Each client (workload pid) serves
  its ops one at a time, in order: an op that arrives while its client is
  busy waits, and its latency is the wait plus its cost.  The arrival rate is
  the workload's (its ``writes_per_s``, ``reads_per_s``, ...).
- ``closed``: each client issues its next op when the previous one completed,
  after the gap the workload put between them plus ``think_us``: every op's
  cost (and the think time) shifts all the later ops of its client, so an op
  that got slower delays the ones after it and throughput drops.  A forked
  child starts with its parent's shift, when the fork completed.

An op's cost is the runner's modelled time of it (faults, COW copies, zeroing,
its accesses and bytes, and under a loop its translation time from the TLB
model).  Two kinds of op are barriers: ``phase_end`` and ``end`` start only
when every op before them in the stream has completed, and every op after
them starts after they complete (a policy's phase-end work sees the phase
done, whatever the clients' shifts).  Ops start in order of their start times
(ties in stream order), so the kernel's clock and its threads (khugepaged)
interleave with the shifted ops.  The kernel applies an op at its start;
its completion only decides when its client may go on.

Background work on ``cores`` CPUs: the kernel threads' time between two ops
(``kthread`` rows) runs beside the clients.  With L live clients, one
background thread and N cores, ``cores: 0`` means the background is free (the
default, as without a loop); otherwise the share max(0, min(1, L + 1 - N)) of
the background time is taken from the clients, each live client's next op
completing later by that time divided by L.  Clients competing with each other
for cores is not modelled.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Iterator

from ..workloads.ops import END, EXIT, FORK, PHASE_END, SPAWN, Op

LOOPS = ("none", "open", "closed")
BARRIERS = (PHASE_END, END)


@dataclass
class Issued:
    """One op as the loop starts it: ``start`` (ns, when the kernel applies it) and ``arrive`` (ns,
    when its client asked for it: the latency counts from there)."""

    seq: int
    op: Op
    start: float
    arrive: float

    @property
    def t(self) -> int:
        """The kernel clock time of the start (ns, rounded up)."""
        return int(math.ceil(self.start))


class Loop:
    """The op scheduler of one run: iterate to get the ops in start order, call :meth:`finish` after
    each (before the next), and :meth:`background` for kernel-thread time between ops."""

    def __init__(self, ops: Iterable[Op], mode: str = "none", think_ns: float = 0.0, cores: int = 0) -> None:
        if mode not in LOOPS:
            raise ValueError(f"loop={mode!r}: expected one of {', '.join(LOOPS)}")
        self.mode, self.think, self.cores = mode, float(think_ns), int(cores)
        self.src = enumerate(ops)
        self.queues: dict[int, deque[tuple[int, Op]]] = {}
        self.shift: dict[int, float] = {}       # closed: a client's delay against the workload's times
        self.busy: dict[int, float] = {}        # when a client's last op completes
        self.steal: dict[int, float] = {}       # background time a client's next op pays
        self.known: set[int] = set()            # pids spawned or forked so far
        self.live: set[int] = set()
        self.floor = 0.0                        # the last barrier's completion
        self.horizon = 0.0                      # the latest completion so far
        self.held: tuple[int, Op] | None = None
        self.last_t = -1                        # the workload time of the last op pulled
        self.exhausted = False

    # -- when an op starts ------------------------------------------------------------------------
    def arrival(self, op: Op) -> float:
        """When the op's client asks for it."""
        if self.mode == "closed":
            return max(op.t + self.shift.get(op.pid, 0.0), self.busy.get(op.pid, 0.0))
        return float(op.t)

    def _arrive(self, op: Op, start: float) -> float:
        """Where an op's latency counts from: its arrival (open loop, queueing included), its start
        (closed loop: the client waits for nothing but its own previous op, and a barrier's hold is
        time it does not ask)."""
        return min(float(op.t), start) if self.mode == "open" else start

    def start_of(self, op: Op) -> float:
        return max(self.arrival(op), self.busy.get(op.pid, 0.0), self.floor)

    def _blocked(self, op: Op) -> bool:
        return op.pid not in self.known and op.kind != SPAWN

    def _pull(self) -> bool:
        """Move the next op of the stream to its client's queue (a barrier is held); False at the end."""
        if self.exhausted or self.held is not None:
            return False
        try:
            seq, op = next(self.src)
        except StopIteration:
            self.exhausted = True
            return False
        self.last_t = op.t
        if op.kind in BARRIERS:
            self.held = (seq, op)
        else:
            self.queues.setdefault(op.pid, deque()).append((seq, op))
        return True

    def _head(self) -> tuple[float, int, int] | None:
        """(start, seq, pid) of the client whose head op starts first (blocked clients last)."""
        best = None
        for pid, q in self.queues.items():
            seq, op = q[0]
            key = (self._blocked(op), self.start_of(op), seq, pid)
            if best is None or key < best:
                best = key
        return None if best is None else best[1:] if not best[0] else (math.inf, best[2], best[3])

    def __iter__(self) -> Iterator[Issued]:
        if self.mode == "none":
            for seq, op in self.src:              # the stream's own times and order
                yield Issued(seq, op, float(op.t), float(op.t))
            return
        while True:
            head = self._head()
            # Every op of the stream not pulled yet starts at or after its own time >= last_t.
            while head is None or self.last_t <= head[0]:
                if not self._pull():
                    break
                head = self._head()
            if head is not None:
                start, seq, pid = head
                _s, op = self.queues[pid].popleft()
                if not self.queues[pid]:
                    del self.queues[pid]
                if math.isinf(start):             # a pid never spawned: the runner names the op
                    start = max(float(op.t), self.floor)
                yield Issued(seq, op, start, self._arrive(op, start))
                continue
            if self.held is None:
                return
            seq, op = self.held
            self.held = None
            start = max(self.start_of(op), self.horizon)
            yield Issued(seq, op, start, self._arrive(op, start))

    # -- when it completes ----------------------------------------------------------------------
    def finish(self, it: Issued, cost_ns: float) -> tuple[float, float]:
        """The op took ``cost_ns``: returns (completion, latency) in ns and moves its client on."""
        op, pid = it.op, it.op.pid
        end = it.start + cost_ns + self.steal.pop(pid, 0.0)
        if self.mode == "none":
            return it.start + cost_ns, cost_ns
        self.busy[pid] = end
        if self.mode == "closed":
            self.shift[pid] = end + self.think - op.t
        if op.kind == SPAWN:
            self.known.add(pid)
            self.live.add(pid)
        elif op.kind == FORK:
            self.known.add(op.arg)
            self.live.add(op.arg)
            self.busy[op.arg] = end
            self.shift[op.arg] = self.shift.get(pid, 0.0)
        elif op.kind == EXIT:
            self.live.discard(pid)
        if op.kind in BARRIERS:
            self.floor = max(self.floor, end)
        self.horizon = max(self.horizon, end)
        return end, end - it.arrive

    def background(self, cost_ns: float) -> None:
        """Kernel threads ran ``cost_ns``: the clients' share of it (see the module docstring)."""
        if self.mode == "none" or self.cores <= 0 or cost_ns <= 0 or not self.live:
            return
        n = len(self.live)
        share = max(0, min(1, n + 1 - self.cores))
        if share:
            each = cost_ns * share / n
            for pid in sorted(self.live):
                self.steal[pid] = self.steal.get(pid, 0.0) + each
