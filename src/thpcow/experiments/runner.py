"""The runner: apply a workload's op stream to a simulated kernel under one COW policy, and measure.

For each op of the stream (see :mod:`thpcow.workloads.ops`) the runner lets
the kernel's clock run to the op's start (khugepaged and other kernel threads
run then), takes a THP-coverage/memory sample at every ``sample_ms`` boundary
on the way, applies the op (a batch of stores is one ``write_many``), and
records the op's vmstat deltas, its modelled cost and the memory in use.  The
start is the op's own time, or under the scenario's ``loop`` (open or closed)
what :mod:`.loop` decides from the costs of the ops before it.

Figures of a run (one summary row per policy):

- counters (``pgfault``, ``thp_fault_alloc``, ``thp_split_pmd``, ...) are
  vmstat deltas from just before the first fork to the end (khugepaged
  included); with no fork in the stream, from the start.  Bytes moved, apart:
  ``cow_mib`` = sim_cow_bytes (COW copies: 4 KiB, mTHP blocks, whole THPs),
  ``collapse_mib`` = sim_collapse_bytes (khugepaged and MADV_COLLAPSE
  copies), ``zero_mib`` = sim_zero_bytes (pages cleared for faults);
- ``peak_mib``: max of (nr_frames - nr_free) x 4 KiB after every op;
  ``peak_extra_mib``/``end_extra_mib``: above the level just before the fork;
- ``lat_p50_us``/``lat_p99_us``/``lat_p999_us``/``lat_max_us``: the
  modelled latency (``lat_ns``: the cost, plus the wait under an open loop)
  of one *write op* of the workload's measured phase
  (redis-bgsave: ``snapshot``): a write op is one batch of stores (one
  ``write_many`` call: a request's writes, a range rewritten), priced by
  :func:`~thpcow.experiments.costs.latency_model` (thpcow.machine.latency on
  the op's vmstat deltas, plus its accesses and bytes);
- ``read_p50_us``/``read_p99_us``/``read_p999_us``: the same for its read ops
  (``read_batches`` of them);
- ``ops_per_s``/``loads_per_s``: read and write ops, and loads, per second of
  modelled time, from the first fork's start (or the first op's) to the last
  of them's completion; ``end_ms``: the modelled end of the run; ``loop``;
- ``thp_mean``/``thp_min``/``thp_end``: AnonHugePages / Anonymous of the
  parent (workload pid 0) over the samples;
- ``thp_child_mean``/``thp_child_min``/``thp_child_end``: the same for the
  other live processes together (the children), over the samples where one
  lives (``thp_child_end``: the last of them); NaN if no sample saw one;
- ``model_ms``: foreground time, the sum of the modelled cost of every op of
  the workload (translation included with ``tlb_in_latency`` or a loop);
  ``bg_ms``: background time, what the kernel threads (khugepaged) did
  between ops, priced the same way (a
  collapse at its calibrated cost); both over the whole run, the load
  before the fork included;
- ``tlb_misses``: page walks (last-level dTLB misses) of the workload's
  loads and stores from the first fork on, replayed through the machine
  model's TLB simulator (:mod:`thpcow.machine`, preset ``machine``) with the
  page size each address has after the op; ``tlb_ms`` the translation time
  it estimates.  Flushes: every flush the kernel records
  (``Kernel.tlb_flush_log``: COW remaps, PMD splits, collapses, unmaps,
  mprotect/mremap, swap-out, migration, the parent's flush_tlb_mm() at fork)
  is replayed before the op's accesses, and an exiting process's address
  space is dropped.  NaN when thpcow.machine cannot be imported.

The per-op rows (:attr:`PointResult.ops`, ops.parquet) add up to the
summary: one row per workload op (an op that OOM or an oops stopped keeps
what it did), plus one row of kind ``kthread`` for the kernel threads' work
before an op whenever they did any.  Each counter of the summary is the sum
of the rows with ``since_fork`` set; ``model_ms`` and ``bg_ms`` the sums of
``cost_ns`` over the workload's rows and the ``kthread`` rows; the latency
quantiles those of the write rows of the measured phase.

Per phase of the workload (:attr:`PointResult.phases`), the runner also
records the vmstat deltas (every counter that moved) from the end of the
previous phase to the end of this one, kernel threads included, and, at the
phase's end (after its last op, before the clock moves on), the Anonymous
and AnonHugePages of every live process, plus its smaps text when asked
(``run_point(..., smaps=True)``).  A phase that comes back later adds to its
deltas and takes the later end's figures.

A policy is a kernel build (booted for the run) or a userspace strategy on
upstream; the strategy's calls (``before_fork`` at a fork, ``phase_end`` at
a phase_end op) and the build's ``cost_bytes`` (for the summary) are made by
the runner only, each from one method of :class:`_Run`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..kernel import Kernel, KernelOops, OutOfMemory
from ..kernel.constants import HPAGE_PMD_NR, PAGE_SIZE
from ..kernel.vmstat import delta
from .policies import parse_policy
from ..workloads import ops as O
from ..workloads.ops import check_order
from .costs import latency_model
from .loop import Issued, Loop
from .scenario import Scenario, resolve_scenario

MIB = 1 << 20
KTHREAD = "kthread"            # the kind of an ops row for the kernel threads' work between two ops

# vmstat counters recorded per op and summarised per run.
COUNTERS = ("pgfault", "pgreuse", "thp_fault_alloc", "thp_fault_fallback", "thp_split_pmd", "thp_collapse_alloc",
            "thp_deferred_split_page", "sim_cow_pages", "sim_cow_bytes", "sim_huge_cow", "sim_collapse_bytes",
            "sim_zero_bytes",
            # reclaim, swap and compaction work, which the latency model prices too
            "pgmajfault", "pswpin", "pswpout", "pgmigrate_success", "compact_stall", "thp_swpout",
            "thp_split_page")

# Summary columns and their dtypes (fixed, so that per-point Parquet files form one dataset).
SUMMARY_SCHEMA: dict[str, str] = {
    "scenario": "string", "workload": "string", "policy": "string", "seed": "int64", "machine": "string",
    "latency_model": "string",
    "cow_mib": "float64", "collapse_mib": "float64", "zero_mib": "float64", "peak_mib": "float64", "peak_extra_mib": "float64", "end_extra_mib": "float64",
    "policy_cost_mib": "float64",
    **{c: "int64" for c in COUNTERS},
    "lat_p50_us": "float64", "lat_p99_us": "float64", "lat_p999_us": "float64", "lat_max_us": "float64",
    "write_batches": "int64",
    "read_p50_us": "float64", "read_p99_us": "float64", "read_p999_us": "float64", "read_batches": "int64",
    "ops_per_s": "float64", "loads_per_s": "float64", "end_ms": "float64", "loop": "string",
    "thp_mean": "float64", "thp_min": "float64", "thp_end": "float64",
    "thp_child_mean": "float64", "thp_child_min": "float64", "thp_child_end": "float64",
    "tlb_misses": "float64", "tlb_ms": "float64",
    "model_ms": "float64", "bg_ms": "float64", "sim_ms": "float64", "ops": "int64", "oom": "bool",
    "oops": "string",            # "" or where the kernel oopsed (KernelOops.summary()); the run stopped there
}

ProgressFn = Callable[[int, int], None]


def _deltas(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """The COUNTERS' deltas between two vmstat snapshots."""
    return {c: after[c] - before[c] for c in COUNTERS}


@dataclass
class PointResult:
    """One policy on one scenario: the summary row, per-op records and samples (columns of lists).

    ``phases``: per workload phase, in order of first appearance, ``{"vmstat": {counter: delta},
    "anon_kb": {pid: kB}, "anon_huge_kb": {pid: kB}}`` (pids: the workload's, of the processes
    alive at the phase's end) and ``"smaps": {pid: text}`` when the run was asked for smaps.
    """

    summary: dict[str, Any]
    ops: dict[str, list] = field(default_factory=dict)
    samples: dict[str, list] = field(default_factory=dict)
    wall_s: float = 0.0
    phases: dict[str, dict[str, dict]] = field(default_factory=dict)


def _mapped(proc) -> tuple[int, int, int]:
    """(PTE tables, PMD leaves, PTEs not none) of a process: what fork() copies and exit() tears
    down (machine.latency.fork_hints())."""
    try:
        from ..machine.latency import fork_hints
        h = fork_hints(proc)
        return h["fork_pte_tables"], h["fork_pmds"], h["fork_ptes"]
    except (AttributeError, ImportError):          # the public (slower) view: 2 MiB blocks with 4 KiB pages
        f = proc.smaps_fields()
        return (-(-(f["Rss"] - f["AnonHugePages"]) // 2048), f["AnonHugePages"] // 2048,
                (f["Rss"] - f["AnonHugePages"]) // 4)


def thp_kb(proc) -> tuple[int, int]:
    """(Anonymous, AnonHugePages) of a process in kB: the smaps rollup figures, read fast.

    Optimization: smaps_fields() walks every PTE (~10 ms for 256 MiB split);
    this counts PMD leaves and reads the rss counter instead.  The tests check
    that both agree.
    """
    try:
        from ..kernel.mm import PMD_LEAF
        pt = proc.mm.pt
        n = pt.nr_slots
        leaf = (pt.pmd_kind[:n] == PMD_LEAF) & (pt.pmd_folio[:n] != proc.kernel.huge_zero_fid)
        return int(proc.mm.rss_anon) * (PAGE_SIZE >> 10), int(np.count_nonzero(leaf)) * (HPAGE_PMD_NR * PAGE_SIZE >> 10)
    except (AttributeError, ImportError):          # the public (slower) view
        f = proc.smaps_fields()
        return f["Anonymous"], f["AnonHugePages"]


class _TlbMeter:
    """The machine model's TLB simulator fed with the workload's accesses (None if unavailable)."""

    def __init__(self, machine: str) -> None:
        from ..machine import SimMetric, TlbSimulator, get_preset, page_shifts_of
        from ..machine.tlb import ASID_LIMIT

        self.sim = TlbSimulator(get_preset(machine))
        self.shifts = page_shifts_of
        self.walk_metrics = (SimMetric.WALKS_PMD, SimMetric.WALKS_PTE_PWC_HIT, SimMetric.WALKS_PTE_PWC_MISS)
        self.asids = ASID_LIMIT

    @classmethod
    def make(cls, machine: str) -> "_TlbMeter | None":
        try:
            return cls(machine)
        except (ImportError, KeyError, ValueError):
            return None

    def asid(self, proc) -> int:
        return proc.pid % self.asids

    def access(self, proc, addrs: np.ndarray, write: bool) -> None:
        self.sim.simulate(addrs.astype(np.uint64), write, self.shifts(proc, addrs), self.asid(proc))

    def flush(self, proc) -> None:
        self.sim.flush_asid(self.asid(proc))

    def replay(self, k) -> None:
        """Apply the TLB flushes the kernel recorded (COW remaps, splits, collapses, unmaps, fork)."""
        log = k.tlb_flush_log
        if not log:
            return
        for ev in log:
            asid = ev[0] % self.asids
            if len(ev) == 3:
                self.sim.invalidate_range(asid, ev[1], min(ev[2], 1 << 47))
            else:
                self.sim.invalidate_pages(asid, ev[1])
        log.clear()

    def walks(self) -> int:
        return sum(self.sim.get_metric(m) for m in self.walk_metrics)


class _Run:
    """The state of one run: kernel, processes, regions, meters."""

    def __init__(self, scenario: Scenario, policy: str, smaps: bool = False) -> None:
        self.sc = scenario
        self.workload = scenario.make_workload()
        self.pol = parse_policy(policy)
        self.k = Kernel(ram=scenario.ram_mib * MIB, seed=scenario.seed, check=scenario.check,
                        build=self.pol.build, fragmentation=scenario.fragmentation)
        for path, value in scenario.sysfs.items():
            self.k.sysfs.write(path, value)
        self.model = latency_model(scenario.profile)
        self.tlb = _TlbMeter.make(scenario.machine) if scenario.tlb_model else None
        # One clock: translation is part of an op's time when asked, and always under a loop.
        self.tlb_in_latency = scenario.tlb_in_latency or scenario.loop != "none"
        self.loop = Loop(check_order(self.workload.ops(scenario.seed)), scenario.loop, scenario.think_us * 1000.0,
                         scenario.cores)
        if self.tlb is not None:
            self.k.tlb_flush_log = []
        self.procs: dict[int, Any] = {}
        self.live: dict[int, Any] = {}                 # the processes that have not exited
        self.children: dict[int, list[int]] = {}
        self.base: dict[int, int] = {}
        self.duration = max(int(self.workload.duration_ns()), 1)
        step = scenario.sample_ms * 1e6 if scenario.sample_ms else self.duration / 200
        self.interval = max(int(step), 1000)
        self.next_sample = 0
        self.ops: dict[str, list] = {c: [] for c in ("seq", "t_ns", "kind", "pid", "phase", "n", "nbytes",
                                                     "cost_ns", "lat_ns", "end_ns", "mem_bytes", "tlb_walks",
                                                     "since_fork", *COUNTERS)}
        self.samples: dict[str, list] = {c: [] for c in ("t_ns", "anon_kb", "anon_huge_kb", "thp_coverage",
                                                         "child_anon_kb", "child_anon_huge_kb",
                                                         "child_thp_coverage", "mem_bytes", "nr_procs")}
        self.smaps = smaps
        self.phase: str | None = None                  # the phase of the last op applied
        self.phase_start: dict[str, int] = {}          # vmstat at the end of the phase before it
        self.phases: dict[str, dict[str, dict]] = {}
        self.before_fork: dict[str, int] | None = None
        self.mem_at_fork = 0
        self.peak = 0
        self.oom = False
        self.oops = ""                                 # the kernel oopsed: where (the run stopped)

    # -- meters -------------------------------------------------------------------------------
    def used(self) -> int:
        return (self.k.mem.nr_frames - self.k.mem.nr_free) * PAGE_SIZE

    def sample(self) -> None:
        parent = self.procs.get(0)
        if parent is None:
            return                                   # nothing to sample before the first process
        anon = huge = 0
        cov = math.nan
        if parent.mm.alive:
            anon, huge = thp_kb(parent)
            cov = huge / anon if anon else 0.0
        kids = [thp_kb(p) for pid, p in self.live.items() if pid != 0]
        kid_anon, kid_huge = sum(a for a, _h in kids), sum(h for _a, h in kids)
        kid_cov = (kid_huge / kid_anon if kid_anon else 0.0) if kids else math.nan
        s = self.samples
        s["t_ns"].append(self.k.now)
        s["anon_kb"].append(anon)
        s["anon_huge_kb"].append(huge)
        s["thp_coverage"].append(cov)
        s["child_anon_kb"].append(kid_anon)
        s["child_anon_huge_kb"].append(kid_huge)
        s["child_thp_coverage"].append(kid_cov)
        s["mem_bytes"].append(self.used())
        s["nr_procs"].append(len(self.k.procs))

    def advance_to(self, t: int) -> None:
        """Run the clock to ``t``, sampling at every interval boundary on the way."""
        while self.next_sample <= t:
            if self.next_sample > self.k.now:
                self.k.run_until(self.next_sample)
            self.sample()
            self.next_sample += self.interval
        if t > self.k.now:
            self.k.run_until(t)

    def end_phase(self) -> None:
        """Record the phase that just ended: its vmstat deltas and each live process's THP figures."""
        if self.phase is None:
            return
        now = self.k.vmstat_snapshot()
        rec = self.phases.setdefault(self.phase, {"vmstat": {}})
        moved = rec["vmstat"]
        for name, d in delta(now, self.phase_start).items():
            moved[name] = moved.get(name, 0) + d
        rec["vmstat"] = {name: d for name, d in moved.items() if d}
        rec["anon_kb"], rec["anon_huge_kb"] = {}, {}
        for pid, proc in self.live.items():
            rec["anon_kb"][pid], rec["anon_huge_kb"][pid] = thp_kb(proc)
        if self.smaps and not self.oops:          # a dead kernel answers no more reads
            rec["smaps"] = {pid: proc.smaps() for pid, proc in self.live.items()}
        self.phase_start = now

    # -- the policy's userspace strategy and its build's own memory: the only places asked ----------
    def policy_before_fork(self, parent, needs: list[tuple[int, int]]) -> None:
        if self.pol.strategy is not None:
            self.pol.strategy.before_fork(parent, needs)

    def policy_phase_end(self, parent, children: list) -> None:
        if self.pol.strategy is not None:
            self.pol.strategy.phase_end(parent, children)

    def policy_cost_bytes(self) -> int:
        return self.k.build.cost_bytes(self.k)

    # -- ops ------------------------------------------------------------------------------------
    def apply(self, op: O.Op) -> tuple[int, int, int]:
        """Do one op; returns (PTE tables, PMD leaves, PTEs) walked by a fork or exit (else zeros)."""
        k, kind = self.k, op.kind
        if kind == O.SPAWN:
            self.procs[op.pid] = self.live[op.pid] = k.spawn()
            return 0, 0, 0
        proc = self.procs.get(op.pid)
        if proc is None and kind != O.END:
            raise ValueError(f"op at t={op.t}: {kind} by pid {op.pid}, which was never spawned or forked")
        if kind == O.MMAP:
            self.base[op.region] = proc.mmap(op.length)
        elif kind == O.MUNMAP:
            proc.munmap(self.base[op.region] + op.offset, op.length)
        elif kind == O.MADVISE:
            proc.madvise(self.base[op.region] + op.offset, op.length, op.arg)
        elif kind in (O.WRITE, O.READ):
            addrs = self.base[op.region] + op.offsets
            if kind == O.WRITE:
                proc.write_many(addrs, op.token)
            else:
                proc.read_many(addrs)
            if self.tlb is not None:
                self.tlb.replay(k)
                self.tlb.access(proc, addrs, kind == O.WRITE)
        elif kind == O.FORK:
            needs = [(self.base[r] + off, length) for r, off, length in op.needs]
            self.policy_before_fork(proc, needs)
            walked = _mapped(proc)
            self.procs[op.arg] = self.live[op.arg] = proc.fork()
            self.children.setdefault(op.pid, []).append(op.arg)
            if self.tlb is not None:
                self.tlb.replay(k)                     # includes the parent's flush_tlb_mm()
            return walked
        elif kind == O.EXIT:
            walked = _mapped(proc)
            proc.exit()
            self.live.pop(op.pid, None)
            if self.tlb is not None:
                # The whole address space goes: its own unmaps need no replay.
                k.tlb_flush_log[:] = [e for e in k.tlb_flush_log if e[0] != proc.pid]
                self.tlb.replay(k)
                self.tlb.flush(proc)
            return walked
        elif kind == O.PHASE_END:
            kids = [self.procs[c] for c in self.children.get(op.pid, []) if self.procs[c].mm.alive]
            self.policy_phase_end(proc, kids)
        return 0, 0, 0

    def step(self, it: Issued) -> None:
        seq, op = it.seq, it.op
        if op.phase != self.phase:
            self.end_phase()
            self.phase = op.phase
        bg = self.k.vmstat_snapshot()
        try:
            self.advance_to(it.t)                     # kernel threads (khugepaged) run on the way
        except KernelOops as e:
            self.oops = e.summary()
            self.record_background(seq, op, bg)
            raise
        before = self.record_background(seq, op, bg)  # also the state the op starts from
        if op.kind == O.FORK and self.before_fork is None:
            self.before_fork = before
            self.mem_at_fork = self.used()
            if self.tlb is not None:
                self.tlb.sim.reset_stats()
        walks = self.tlb.walks() if self.tlb is not None else 0
        xlat = self.tlb.sim.translation_ns() if self.tlb is not None else 0.0
        try:
            tables, pmds, ptes = self.apply(op)
        except (OutOfMemory, KernelOops) as e:
            # The op stopped part way: its row keeps what it did (so that the rows still sum to the summary).
            if isinstance(e, OutOfMemory):
                self.oom = True
            else:
                self.oops = e.summary()
            d = _deltas(before, self.k.vmstat_snapshot())
            cost = self.model.op_cost_ns(op.kind, d, accesses=op.n, nbytes=op.nbytes)
            self.record(seq, it.t, op.kind, op.pid, op.phase, op.n, op.nbytes, cost, 0, d,
                        self.loop.finish(it, cost))
            raise
        d = _deltas(before, self.k.vmstat_snapshot())
        cost = self.model.op_cost_ns(op.kind, d, accesses=op.n, nbytes=op.nbytes, pte_tables=tables, pmds=pmds,
                                     ptes=ptes if op.kind in (O.FORK, O.EXIT) else None,
                                     dense=op.kind == O.WRITE and op.n > 0 and op.nbytes >= op.n * PAGE_SIZE)
        if self.tlb_in_latency and self.tlb is not None:
            cost += self.tlb.sim.translation_ns() - xlat          # one clock: translation is part of the op
        self.record(seq, it.t, op.kind, op.pid, op.phase, op.n, op.nbytes, cost,
                    self.tlb.walks() - walks if self.tlb is not None else 0, d, self.loop.finish(it, cost))

    def record_background(self, seq: int, op: O.Op, before: dict[str, int]) -> dict[str, int]:
        """One ``kthread`` row for what the kernel threads did while the clock ran up to ``op``;
        returns the vmstat snapshot taken now."""
        after = self.k.vmstat_snapshot()
        d = _deltas(before, after)
        if any(d.values()):
            cost = self.model.op_cost_ns(KTHREAD, d)
            self.loop.background(cost)                    # the clients' share of it, on few cores
            self.record(seq, self.k.now, KTHREAD, -1, op.phase, 0, 0, cost, 0, d, (self.k.now + cost, cost))
        return after

    def record(self, seq: int, t: int, kind: str, pid: int, phase: str, n: int, nbytes: int, cost: float,
               walks: int, d: dict[str, int], done: tuple[float, float]) -> None:
        """One ops row; ``done``: (completion, latency) in ns, from the loop."""
        mem = self.used()
        self.peak = max(self.peak, mem)
        r = self.ops
        r["seq"].append(seq)
        r["t_ns"].append(t)
        r["kind"].append(kind)
        r["pid"].append(pid)
        r["phase"].append(phase)
        r["n"].append(n)
        r["nbytes"].append(nbytes)
        r["cost_ns"].append(cost)
        r["end_ns"].append(done[0])
        r["lat_ns"].append(done[1])
        r["mem_bytes"].append(mem)
        r["tlb_walks"].append(walks)
        r["since_fork"].append(self.before_fork is not None)
        for c in COUNTERS:
            r[c].append(d[c])

    # -- the summary ------------------------------------------------------------------------------
    def summary(self, policy: str) -> dict[str, Any]:
        final = self.k.vmstat_snapshot()
        base = self.before_fork or self._start
        d = {c: int(final[c] - base[c]) for c in COUNTERS}
        r = self.ops
        if self.before_fork is None:                 # no fork: every figure counts from the start
            r["since_fork"] = [True] * len(r["seq"])
        kinds = np.asarray(r["kind"], dtype=object)
        phases = np.asarray(r["phase"], dtype=object)
        cost = np.asarray(r["cost_ns"], dtype=np.float64)
        wait = np.asarray(r["lat_ns"], dtype=np.float64)        # the cost, plus queueing under a loop
        bg = kinds == KTHREAD
        measured = phases == self.workload.measure_phase
        lat = wait[(kinds == O.WRITE) & measured] / 1000.0
        rlat = wait[(kinds == O.READ) & measured] / 1000.0
        ops_per_s, loads_per_s = self._throughput(kinds)
        cov = np.asarray(self.samples["thp_coverage"], dtype=np.float64)
        cov = cov[~np.isnan(cov)]
        kid = np.asarray(self.samples["child_thp_coverage"], dtype=np.float64)
        kid = kid[~np.isnan(kid)]
        ref = self.mem_at_fork if self.before_fork is not None else self._start_mem
        out: dict[str, Any] = {
            "scenario": self.sc.name, "workload": self.workload.name, "policy": policy, "seed": self.sc.seed,
            "machine": self.sc.machine, "latency_model": self.model.name,
            "cow_mib": d["sim_cow_bytes"] / MIB,
            "collapse_mib": d["sim_collapse_bytes"] / MIB,
            "zero_mib": d["sim_zero_bytes"] / MIB,
            "peak_mib": self.peak / MIB,
            "peak_extra_mib": max(self.peak - ref, 0) / MIB,
            "end_extra_mib": (self.used() - ref) / MIB,
            "policy_cost_mib": self.policy_cost_bytes() / MIB,
            **d,
            "lat_p50_us": float(np.percentile(lat, 50)) if len(lat) else math.nan,
            "lat_p99_us": float(np.percentile(lat, 99)) if len(lat) else math.nan,
            "lat_p999_us": float(np.percentile(lat, 99.9)) if len(lat) else math.nan,
            "lat_max_us": float(lat.max()) if len(lat) else math.nan,
            "write_batches": int(len(lat)),
            "read_p50_us": float(np.percentile(rlat, 50)) if len(rlat) else math.nan,
            "read_p99_us": float(np.percentile(rlat, 99)) if len(rlat) else math.nan,
            "read_p999_us": float(np.percentile(rlat, 99.9)) if len(rlat) else math.nan,
            "read_batches": int(len(rlat)),
            "ops_per_s": ops_per_s, "loads_per_s": loads_per_s,
            "end_ms": max(max(r["end_ns"], default=0.0), float(self.k.now)) / 1e6,
            "loop": self.sc.loop,
            "thp_mean": float(cov.mean()) if len(cov) else math.nan,
            "thp_min": float(cov.min()) if len(cov) else math.nan,
            "thp_end": float(cov[-1]) if len(cov) else math.nan,
            "thp_child_mean": float(kid.mean()) if len(kid) else math.nan,
            "thp_child_min": float(kid.min()) if len(kid) else math.nan,
            "thp_child_end": float(kid[-1]) if len(kid) else math.nan,
            "tlb_misses": float(self.tlb.walks()) if self.tlb is not None else math.nan,
            "tlb_ms": self.tlb.sim.translation_ns() / 1e6 if self.tlb is not None else math.nan,
            "model_ms": float(cost[~bg].sum()) / 1e6,
            "bg_ms": float(cost[bg].sum()) / 1e6,
            "sim_ms": self.k.now / 1e6,
            "ops": int(np.count_nonzero(~bg)),
            "oom": self.oom,
            "oops": self.oops,
        }
        return out

    def _throughput(self, kinds: np.ndarray) -> tuple[float, float]:
        """(read and write ops, loads) per second of modelled time, from the first fork's start (or the
        first op's) to the completion of the last read or write op; NaN without any."""
        r = self.ops
        since = np.asarray(r["since_fork"], dtype=bool)
        t = np.asarray(r["t_ns"], dtype=np.float64)
        fork = since & (kinds == O.FORK)
        t0 = float(t[fork][0]) if fork.any() else float(t[0]) if len(t) else 0.0
        sel = since & ((kinds == O.READ) | (kinds == O.WRITE))
        if not sel.any():
            return math.nan, math.nan
        span = (float(np.asarray(r["end_ns"], dtype=np.float64)[sel].max()) - t0) / 1e9
        loads = float(np.asarray(r["n"], dtype=np.float64)[sel & (kinds == O.READ)].sum())
        if span <= 0:
            return math.nan, math.nan
        return float(np.count_nonzero(sel)) / span, loads / span

    def run(self, policy: str, progress: ProgressFn | None = None) -> PointResult:
        t0 = time.perf_counter()
        self._start = self.phase_start = self.k.vmstat_snapshot()
        self._start_mem = self.used()
        self.peak = self._start_mem
        for it in self.loop:
            try:
                self.step(it)
            except (OutOfMemory, KernelOops):
                break
            if progress is not None:
                progress(min(it.op.t, self.duration), self.duration)
        if not self.oom and not self.oops:
            self.advance_to(self.k.now)
            if not self.samples["t_ns"] or self.samples["t_ns"][-1] != self.k.now:
                self.sample()
        self.end_phase()
        summary = self.summary(policy)
        return PointResult(summary, self.ops, self.samples, time.perf_counter() - t0, self.phases)


def run_point(scenario: "Scenario | str | dict | None", policy: str, progress: ProgressFn | None = None, *,
              smaps: bool = False) -> PointResult:
    """Run one policy on one scenario: a fresh kernel, the scenario's sysfs values, the workload's ops.

    ``smaps``: also keep the smaps text of every live process at the end of each phase
    (:attr:`PointResult.phases`).
    """
    sc = resolve_scenario(scenario)
    return _Run(sc, policy, smaps).run(policy, progress)


@dataclass
class CompareResult:
    """Every policy of one scenario: summary (one row per policy), per-op records and samples."""

    scenario: Scenario
    summary: Any                 # pandas.DataFrame
    ops: Any                     # pandas.DataFrame
    samples: Any                 # pandas.DataFrame
    wall_s: dict[str, float]


def summary_frame(rows: list[dict[str, Any]]):
    """Summary rows as a DataFrame with the fixed :data:`SUMMARY_SCHEMA` dtypes."""
    import pandas as pd

    df = pd.DataFrame(rows)
    for col, dtype in SUMMARY_SCHEMA.items():
        if col in df.columns:
            df[col] = df[col].astype(dtype)
    return df


def run_compare(scenario: "Scenario | str | dict | None" = None, policies: list[str] | None = None,
                progress: Callable[[int, str, int, int], None] | None = None) -> CompareResult:
    """Run each policy on the same scenario; ``progress(policy index, policy, t, duration)``."""
    import pandas as pd

    sc = resolve_scenario(scenario)
    if policies:
        sc = sc.with_policies(list(policies))
    rows, ops, samples, wall = [], [], [], {}
    for i, pol in enumerate(sc.policies):
        cb = (lambda t, total, i=i, pol=pol: progress(i, pol, t, total)) if progress else None
        res = run_point(sc, pol, cb)
        rows.append(res.summary)
        ops.append(pd.DataFrame(res.ops).assign(policy=pol))
        samples.append(pd.DataFrame(res.samples).assign(policy=pol))
        wall[pol] = res.wall_s
    return CompareResult(sc, summary_frame(rows), pd.concat(ops, ignore_index=True),
                         pd.concat(samples, ignore_index=True), wall)


def compare(scenario_or_path: "Scenario | str | dict | None" = None, policies: list[str] | None = None, *,
            out: str | None = None, seed: int | None = None, progress=None):
    """Run each policy on one scenario and return the summary DataFrame (one row per policy).

    ``scenario_or_path``: a :class:`Scenario`, a YAML path, a dict in the
    scenario schema, or None for the built-in one; ``policies`` replaces the
    scenario's list; ``seed`` its seed; ``out``: also write the Parquet files
    and the HTML report there.  :func:`run_compare` gives the per-op records
    and samples too.
    """
    from dataclasses import replace

    sc = resolve_scenario(scenario_or_path)
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed={seed!r}: expected an integer >= 0")
        sc = replace(sc, seed=seed)
    res = run_compare(sc, policies, progress)
    if out is not None:
        from .report import write_results
        write_results(res, out)
    return res.summary
