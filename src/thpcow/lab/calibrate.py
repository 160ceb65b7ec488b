"""Measure the latency model's costs on the running kernel (``thpcow calibrate``).

Every cost of :class:`~thpcow.machine.latency.CalibrationProfile` that the lab
can provoke is measured here with Python (anonymous ``mmap`` through ctypes,
numpy strided stores, ``os.fork``), following the method of
calibration.md (the reference measurements of the lab VM):

* **Batches, not single faults.**  One numpy call touches N pages (a strided
  store or load), and the figure is (batch time - the same batch run again,
  which no longer faults) / N: the interpreter's overhead and the stores' own
  cost cancel, and what is left is the fault, which is what the latency model
  prices (it prices accesses apart).  After a fork() the interpreter's own
  heap is write-protected too, so each batch is first run on an empty
  selection ("settle") to take those faults outside the timing.  A batch mean
  is also what the model needs, as it prices totals (calibration.md reports
  per-fault p50s, which sit below the means).
* **fork()** is timed in pairs, without the region (MADV_DONTFORK) and with
  it: the difference is the region's page-table copy; the fork of the
  interpreter itself (``fork_base``) drifts with its heap.
* **Warm** (default): right before every step that allocates, a slightly
  larger scratch region of the same backing is touched and freed, so the
  buddy allocator hands out memory the host still backs (calibration.md
  section 0, free-page reporting).  ``warm=False`` sleeps instead ("cold").
* **CPU time**: every figure is timed with this thread's CPU time
  (:func:`timed_ns`), not wall time, so other tasks on the CPUs do not
  inflate it; only the child exits, which the child does, are wall time.
* **Repeats and medians**: every figure is the median of ``repeats`` runs;
  the runs, min and max are kept.
* **Counter cross-check**: every run's /proc/vmstat deltas (system-wide),
  this process's own fault count and the region's smaps line (per process,
  exact) are checked against :data:`RULES`.  A run whose counters show that
  the kernel took another path than the figure is about (a THP fault that
  fell back to 4 KiB, a COW that copied a whole THP, a collapse that failed,
  a copy that faulted) is refused; a step is tried three times (another
  process's burst of THP faults is not a wrong path), then
  :class:`WrongPathError` is raised and no profile is written.

Nothing here writes sysfs: the knobs are read and recorded.

The profile file is what ``CalibrationProfile.save()`` writes, with a comment
header and a commented TOML ``[lab]`` section (lines starting ``#: ``) that
``CalibrationProfile.load()`` ignores and :func:`read_lab_section` parses: the
metadata (kernel, THP knobs, CPU, governor, date, warm/cold), the costs the
profile has no field for (mmap, madvise, memset, the random-read model) and
every figure's runs and counter deltas.

Costs that are not measured keep the reference value (listed in
``lab.not_measured``): compaction, swap, TLB shootdowns, failed THP
allocations.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import gc
import json
import math
import os
import platform
import resource
import statistics
import time
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np

from ..machine.latency import DEFAULT_PROFILE, SIGNED_FIELDS, CalibrationProfile
from . import procfs
from ._libc import Libc
from .scenario import _write_all

PAGE = 4096
PMD = 2 << 20
MiB = 1 << 20
GiB = 1 << 30

# include/uapi/asm-generic/mman-common.h
MADV_DONTFORK = 10
MADV_DOFORK = 11
MADV_HUGEPAGE = 14
MADV_NOHUGEPAGE = 15
MADV_COLLAPSE = 25                # v6.1
PROT_RW = 0x1 | 0x2
MAP_PRIVATE_ANON = 0x02 | 0x20

COLD_SLEEP_S = 3.5                # calibration.md: free 2 MiB blocks are reported ~2 s after the free
LAB_PREFIX = "#: "                # lines of the commented [lab] section
LAB_FORMAT = 1

# The vmstat counters every run records (``pgalloc`` is the sum of the pgalloc_<zone> counters).
COUNTERS: tuple[str, ...] = (
    "pgfault", "pgalloc", "pgreuse", "thp_fault_alloc", "thp_fault_fallback", "thp_split_pmd",
    "thp_collapse_alloc", "thp_collapse_alloc_failed", "thp_deferred_split_page", "thp_zero_page_alloc",
)


class WrongPathError(procfs.LabError):
    """A measured run whose counters show the kernel took another path than the figure is about."""


# ---------------------------------------------------------------------------------------------
# Counter cross-check
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Expect:
    """One expectation on an observed counter: ``min <= value <= max`` (either bound optional).

    ``counter`` is a /proc/vmstat delta name (or ``pgalloc``), ``self:minflt`` (this
    process's minor faults, from getrusage) or ``smaps:<Field>`` for the measured
    region's smaps line in kB after the run.  ``why`` says what a violation means.
    """

    counter: str
    min: int | None = None
    max: int | None = None
    why: str = ""

    def violated(self, value: int) -> bool:
        return (self.min is not None and value < self.min) or (self.max is not None and value > self.max)

    def describe(self) -> str:
        if self.min is not None and self.min == self.max:
            return f"== {self.min}"
        if self.max is None:
            return f">= {self.min}"
        if self.min is None:
            return f"<= {self.max}"
        return f"in [{self.min}, {self.max}]"


def check_path(figure: str, observed: Mapping[str, int], expects: Iterable[Expect]) -> list[str]:
    """Raise WrongPathError if ``observed`` breaks an expectation; return the rules checked.

    vmstat is system-wide, so the rules are one-sided where other processes can
    only add: "at least N" for the events the figure consists of, and "at most
    half the operations" for the THP events of a wrong path (a wrong path moves
    them by about one per operation; background noise moves them by a few).
    Counters that other processes move by thousands (pgalloc, pgfault) only get
    "at least" rules; what must *not* happen there is checked per process.  The
    smaps and ``self:minflt`` rules are per process and exact (a step that must
    not fault is checked with ``self:minflt``: other processes fault all the time).  A counter this kernel lacks
    (absent from ``observed``) cannot be checked and is skipped.
    """
    checked, problems = [], []
    for e in expects:
        if e.counter not in observed:
            continue
        val = int(observed[e.counter])
        checked.append(f"{e.counter} {e.describe()}")
        if e.violated(val):
            problems.append(f"{e.counter} = {val}, expected {e.describe()} ({e.why})")
    if problems:
        shown = ", ".join(f"{k} {v} kB" if k.startswith("smaps:") else f"{k} {v:+d}"
                          for k, v in observed.items())
        raise WrongPathError(f"{figure}: refusing to report this figure, the counters show another "
                             f"kernel path: {'; '.join(problems)}. Observed: {shown}")
    return checked


def _half(n: int) -> int:
    return n // 2


# Faults of the interpreter itself that a "no faults" step tolerates (a new arena, a stack page).
NO_FAULT_SLACK = 16


# Expectations per figure: f(n operations, region size in kB) -> rules.  See check_path().
RULES: dict[str, Callable[[int, int], list[Expect]]] = {
    "fault_4k_zero": lambda n, kb: [
        Expect("pgfault", min=n, why="one write fault per 4 KiB page"),
        Expect("pgalloc", min=n, why="every fault allocates a zeroed page"),
        Expect("thp_fault_alloc", max=_half(n), why="a MADV_NOHUGEPAGE region must not get THPs"),
        Expect("smaps:AnonHugePages", max=0, why="the region must be 4 KiB-mapped"),
        Expect("smaps:Rss", min=kb, why="every page must be resident after the writes"),
    ],
    "fault_thp_zero": lambda n, kb: [
        Expect("thp_fault_alloc", min=n, why="every 2 MiB write fault must allocate a THP"),
        Expect("thp_fault_fallback", max=_half(n), why="a fallback means the 4 KiB path was taken"),
        Expect("smaps:AnonHugePages", min=kb, max=kb, why="the whole region must be PMD-mapped"),
    ],
    "zero_page_read": lambda n, kb: [
        Expect("pgfault", min=n, why="one read fault per 4 KiB page"),
        Expect("smaps:Rss", max=0, why="a read fault maps the shared zero page: nothing becomes resident"),
    ],
    "huge_zero_read": lambda n, kb: [
        Expect("pgfault", min=n, why="one read fault per 2 MiB"),
        Expect("thp_fault_alloc", max=_half(n),
               why="a read fault must map the huge zero page (use_zero_page=0 allocates THPs)"),
        Expect("smaps:AnonHugePages", max=0, why="the huge zero page is not an anonymous THP"),
        Expect("smaps:Rss", max=0, why="huge-zero-page mappings are not resident memory"),
    ],
    "reuse_thp": lambda n, kb: [
        Expect("pgfault", min=n, why="one write fault per write-protected PMD"),
        Expect("thp_split_pmd", max=_half(n), why="an exclusive THP is reused, not split"),
        Expect("thp_fault_alloc", max=_half(n), why="a reuse allocates nothing"),
        Expect("pgalloc", max=256 * n, why="a reuse copies nothing (a whole-THP copy allocates 512 pages)"),
        Expect("smaps:AnonHugePages", min=kb, max=kb, why="the region must stay PMD-mapped"),
    ],
    "cow_first": lambda n, kb: [
        Expect("thp_split_pmd", min=n, why="the first write into a shared PMD-mapped THP splits the PMD"),
        Expect("thp_fault_alloc", max=_half(n), why="a whole-THP COW (thp_cow series) allocates a THP"),
        Expect("pgalloc", min=n, why="every fault copies one 4 KiB page"),
        Expect("smaps:AnonHugePages", max=0, why="every PMD of the writer must be split"),
    ],
    "cow_4k": lambda n, kb: [
        Expect("pgfault", min=n, why="one COW fault per 4 KiB page"),
        Expect("pgalloc", min=n, why="every COW fault allocates the copy"),
        Expect("pgreuse", max=_half(n), why="a reuse means the page was not shared"),
        Expect("thp_split_pmd", max=_half(n), why="the PMDs were split by the first writes"),
    ],
    "cow_4k_4kbacked": lambda n, kb: [
        Expect("pgfault", min=n, why="one COW fault per 4 KiB page"),
        Expect("pgalloc", min=n, why="every COW fault allocates the copy"),
        Expect("pgreuse", max=_half(n), why="a reuse means the page was not shared"),
    ],
    "reuse_4k": lambda n, kb: [
        Expect("pgfault", min=n, why="one write fault per write-protected PTE"),
        Expect("pgreuse", min=n, why="every fault must reuse its page (wp_page_reuse), not copy it"),
    ],
    "collapse": lambda n, kb: [
        Expect("thp_collapse_alloc", min=n, why="every MADV_COLLAPSE must allocate a THP"),
        Expect("thp_collapse_alloc_failed", max=_half(n), why="a failed allocation collapses nothing"),
        Expect("smaps:AnonHugePages", min=kb, max=kb, why="the whole region must be PMD-mapped again"),
    ],
    "fork_thp": lambda n, kb: [
        Expect("thp_split_pmd", max=_half(n), why="fork shares PMDs, it does not split them"),
        Expect("smaps:AnonHugePages", min=kb, max=kb, why="the forked region must be PMD-mapped"),
    ],
    "fork_4k": lambda n, kb: [
        Expect("smaps:AnonHugePages", max=0, why="the forked region must be 4 KiB-mapped"),
        Expect("smaps:Rss", min=kb, why="the forked region must be resident"),
    ],
    "random_read_thp": lambda n, kb: [
        Expect("self:minflt", max=NO_FAULT_SLACK, why="the buffer was populated: the reads must not fault"),
        Expect("smaps:AnonHugePages", min=kb, max=kb, why="the buffer must be PMD-mapped"),
    ],
    "random_read_4k": lambda n, kb: [
        Expect("self:minflt", max=NO_FAULT_SLACK, why="the buffer was populated: the reads must not fault"),
        Expect("smaps:AnonHugePages", max=0, why="the buffer must be 4 KiB-mapped"),
    ],
    "none": lambda n, kb: [],
    "no_faults": lambda n, kb: [
        Expect("self:minflt", max=NO_FAULT_SLACK, why="the memory was populated: the timing must contain no faults"),
    ],
    "syscall": lambda n, kb: [
        Expect("self:minflt", max=NO_FAULT_SLACK + _half(n), why="mmap/madvise of untouched memory faults nothing"),
    ],
}


# ---------------------------------------------------------------------------------------------
# Memory regions and children on the running kernel
# ---------------------------------------------------------------------------------------------

class _Libc(Libc):
    """mmap/munmap/madvise through ctypes (with errno), and a null call for the ctypes overhead."""

    def __init__(self) -> None:
        super().__init__()
        lib = self.lib
        self.labs = lib.labs
        self.labs.argtypes = [ctypes.c_long]
        self.labs.restype = ctypes.c_long


_LIBC: _Libc | None = None


def libc() -> _Libc:
    global _LIBC
    if _LIBC is None:
        _LIBC = _Libc()
    return _LIBC


def _oserror(call: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{call}: {os.strerror(err)}")


def sys_mmap(length: int) -> int:
    """mmap(NULL, length, RW, MAP_PRIVATE|MAP_ANONYMOUS): the address, or OSError."""
    addr = libc().mmap(None, length, PROT_RW, MAP_PRIVATE_ANON, -1, 0)
    if addr is None or addr == ctypes.c_void_p(-1).value:
        raise _oserror(f"mmap({length})")
    return int(addr)


def sys_madvise(addr: int, length: int, advice: int) -> None:
    if libc().madvise(addr, length, advice) != 0:
        raise _oserror(f"madvise({addr:#x}, {length}, {advice})")


def sys_munmap(addr: int, length: int) -> None:
    if libc().munmap(addr, length) != 0:
        raise _oserror(f"munmap({addr:#x}, {length})")


class _RawBuffer:
    """numpy's array interface over raw memory (no ctypes array type, no buffer export)."""

    def __init__(self, addr: int, size: int) -> None:
        self.__array_interface__ = {"data": (addr, False), "shape": (size,), "typestr": "|u1",
                                    "version": 3}


class Region:
    """Anonymous private memory whose 2 MiB-aligned ``size`` bytes at ``addr`` are advised.

    ``backing`` is "thp" (MADV_HUGEPAGE), "4k" (MADV_NOHUGEPAGE) or None (no
    advice).  ``buf`` is a numpy uint8 view of the range.  The madvise splits
    the VMA, so the range's smaps line describes exactly this range.
    NOTE: ``buf`` (and any view of it) must not be used after close().
    """

    def __init__(self, size: int, backing: str | None) -> None:
        if size <= 0 or size % PMD:
            raise ValueError(f"Region: size {size} is not a positive multiple of 2 MiB")
        if backing not in ("thp", "4k", None):
            raise ValueError(f"Region: backing {backing!r}: expected 'thp', '4k' or None")
        self.size, self.backing = size, backing
        self.map_len = size + PMD
        self.map_addr = sys_mmap(self.map_len)
        self.addr = (self.map_addr + PMD - 1) & ~(PMD - 1)
        try:
            if backing:
                sys_madvise(self.addr, size, MADV_HUGEPAGE if backing == "thp" else MADV_NOHUGEPAGE)
        except OSError:
            sys_munmap(self.map_addr, self.map_len)
            raise
        self.buf = np.asarray(_RawBuffer(self.addr, size))

    def close(self) -> None:
        if self.map_addr:
            self.buf = None
            sys_munmap(self.map_addr, self.map_len)
            self.map_addr = 0

    def __enter__(self) -> "Region":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def smaps(self) -> dict[str, int]:
        """``smaps:AnonHugePages`` and ``smaps:Rss`` (kB) of this range, for check_path()."""
        vmas = procfs.read_smaps("self")
        return {f"smaps:{name}": procfs.smaps_field_in_range(vmas, self.addr, self.addr + self.size, name)
                for name in ("AnonHugePages", "Rss")}

    @property
    def kb(self) -> int:
        return self.size // 1024


def populate(region: Region) -> None:
    """Write one byte in every page (every 2 MiB for a THP region: one fault each)."""
    region.buf[:: PMD if region.backing == "thp" else PAGE] = 1


def prewarm(size: int, backing: str | None, warm: bool = True) -> None:
    """calibration.md's "warm" method: touch and free a slightly larger scratch region first.

    The buddy allocator then hands the next allocations memory that the host
    still backs.  ``warm=False`` ("cold") sleeps COLD_SLEEP_S instead, so the
    freed memory is reported to the host and the next faults pay for it.
    """
    if not warm:
        time.sleep(COLD_SLEEP_S)
        return
    scratch = size + size // 8 + PMD
    scratch += -scratch % PMD
    with Region(scratch, backing) as r:
        r.buf[::PAGE] = 1


class Child:
    """A forked child that waits on a pipe: run ``task`` once and report, or exit.

    :meth:`fork` returns the child and the parent-side fork() time (ns).  The
    child does nothing until told: :meth:`run` makes it call ``task()`` (which
    returns a JSON-able dict, e.g. its own timing) and returns that dict;
    :meth:`exit` releases it and returns the ns from the release to waitpid()'s
    return (the child's exit and teardown).  The child always leaves through
    os._exit(), never through the parent's Python frames.
    """

    def __init__(self, pid: int, go_w: int, rep_r: int) -> None:
        self.pid, self.go_w, self.rep_r = pid, go_w, rep_r

    @classmethod
    def fork(cls, task: Callable[[], dict] | None = None) -> tuple["Child", int]:
        go_r, go_w = os.pipe()
        rep_r, rep_w = os.pipe()
        t0 = time.thread_time_ns()                     # the parent's CPU time: see timed_ns()
        pid = os.fork()
        if pid == 0:                                    # child: never returns
            status = 1
            try:
                os.close(go_w)
                os.close(rep_r)
                while os.read(go_r, 1) == b"r":
                    try:
                        report = task() if task else {}
                    except BaseException as e:  # noqa: BLE001 - reported to the parent
                        report = {"error": f"{type(e).__name__}: {e}"}
                    _write_all(rep_w, json.dumps(report).encode() + b"\n")
                status = 0
            finally:
                os._exit(status)
        fork_ns = time.thread_time_ns() - t0
        os.close(go_r)
        os.close(rep_w)
        return cls(pid, go_w, rep_r), fork_ns

    def run(self) -> dict:
        os.write(self.go_w, b"r")
        line = b""
        while not line.endswith(b"\n"):
            chunk = os.read(self.rep_r, 65536)
            if not chunk:
                raise procfs.LabError(f"child {self.pid} exited without a report")
            line += chunk
        report = json.loads(line)
        if "error" in report:
            raise procfs.LabError(f"child {self.pid} failed: {report['error']}")
        return report

    def exit(self) -> int:
        t0 = time.perf_counter_ns()
        os.write(self.go_w, b"x")
        _, status = os.waitpid(self.pid, 0)
        ns = time.perf_counter_ns() - t0
        os.close(self.go_w)
        os.close(self.rep_r)
        if status != 0:
            raise procfs.LabError(f"child {self.pid} exited with wait status {status}")
        return ns


def fork_pairs(region: Region, repeats: int) -> list[tuple[int, int, int, int]]:
    """``repeats`` pairs of fork() + child exit: without ``region`` (MADV_DONTFORK), then with it.

    Returns (fork ns without, fork ns with, exit ns without, exit ns with) per
    pair.  Both forks of a pair see the same interpreter, so their difference
    is the region's page-table copy (and teardown) alone.  One fork with the
    region goes first, unrecorded: the first fork of a populated region also
    write-protects its PTEs or PMDs in the parent (20-40 % dearer for 4 KiB
    pages), which later forks find done; the figures are those later forks.
    """
    Child.fork()[0].exit()
    out = []
    for _ in range(repeats):
        sys_madvise(region.addr, region.size, MADV_DONTFORK)
        child, fb = Child.fork()
        eb = child.exit()
        sys_madvise(region.addr, region.size, MADV_DOFORK)
        child, fr = Child.fork()
        er = child.exit()
        out.append((fb, fr, eb, er))
    return out


# ---------------------------------------------------------------------------------------------
# Counters
# ---------------------------------------------------------------------------------------------

def vmstat_counters(vm: Mapping[str, int]) -> dict[str, int]:
    """The COUNTERS of one /proc/vmstat snapshot (``pgalloc`` summed over zones)."""
    out = {c: int(vm[c]) for c in COUNTERS if c in vm}
    out["pgalloc"] = sum(int(v) for k, v in vm.items() if k.startswith("pgalloc_"))
    return out


class Counters:
    """Counter deltas around a measured block: ``with Counters() as c: ...; c.delta``.

    The delta has the vmstat COUNTERS (system-wide) and ``self:minflt``, this
    process's own minor faults (getrusage; exact, unlike pgfault).
    """

    def __init__(self, root: str = "/") -> None:
        self.root = root
        self.delta: dict[str, int] = {}

    def __enter__(self) -> "Counters":
        self._before = vmstat_counters(procfs.read_vmstat(self.root))
        self._minflt = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        return self

    def __exit__(self, *exc) -> None:
        minflt = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        after = vmstat_counters(procfs.read_vmstat(self.root))
        self.delta = {k: after[k] - self._before[k] for k in after if k in self._before}
        self.delta["self:minflt"] = minflt - self._minflt


def _store(a: np.ndarray, where, value: int) -> None:
    """``a[where] = value``: one numpy call, one C loop over every element (a batch of stores)."""
    a[where] = value


def timed_ns(fn: Callable[[], object]) -> int:
    """The CPU time (ns) this thread spends in ``fn``, in user and kernel mode (CLOCK_THREAD_CPUTIME_ID).

    Faults, copies and fork() run in the calling thread, so its CPU time is
    their cost; unlike wall time it leaves out the time other tasks hold the
    CPU.  On the lab VM with both vCPUs busy with other work, a 4 KiB fault
    took 3.0 us of wall time and 1.57 us of CPU time (the same 1.55-1.62 us as
    on a quiet machine), and a fork() of 1 GiB 4 KiB-backed 14-40 ms wall
    against 10-15 ms CPU.  What it cannot leave out: caches and memory
    bandwidth shared with the other CPU.
    """
    t0 = time.thread_time_ns()
    fn()
    return time.thread_time_ns() - t0


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------

@dataclass
class Figure:
    """One measured cost: ns per operation of every run, and each run's observed counters."""

    name: str
    what: str
    per: str                       # one operation: "fault", "PMD", "PTE table", "2 MiB", ...
    n: int = 0                     # operations per run
    runs: list[float] = field(default_factory=list)
    observed: list[dict[str, int]] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)
    dropped: list[float] = field(default_factory=list)   # runs below zero: measurement errors, not costs

    @property
    def median(self) -> float:
        return float(statistics.median(self.runs)) if self.runs else math.nan

    @property
    def min(self) -> float:
        return float(min(self.runs)) if self.runs else math.nan

    @property
    def max(self) -> float:
        return float(max(self.runs)) if self.runs else math.nan

    def to_dict(self) -> dict:
        obs = {k: int(statistics.median([o[k] for o in self.observed if k in o]))
               for k in sorted({k for o in self.observed for k in o})}
        return {"what": self.what, "per": self.per, "n": self.n, "median_ns": round(self.median, 3),
                "min_ns": round(self.min, 3), "max_ns": round(self.max, 3),
                "runs_ns": [round(r, 3) for r in self.runs], "observed_median": obs, "checked": self.checked,
                "dropped_ns": [round(r, 3) for r in self.dropped]}


# What each figure is, and the profile field it sets (None: a lab extra).
FIGURES: dict[str, tuple[str, str, str | None]] = {
    "fault_4k_zero": ("4 KiB anon write fault (zero-fill), MADV_NOHUGEPAGE", "fault", "fault_4k_zero_ns"),
    "fault_thp_zero": ("2 MiB THP write fault (alloc + clear), MADV_HUGEPAGE", "fault", "fault_thp_zero_ns"),
    "zero_page_read": ("4 KiB read fault mapping the zero page", "fault", "zero_page_read_ns"),
    "huge_zero_read": ("2 MiB read fault mapping the huge zero page", "fault", "huge_zero_read_ns"),
    "cow_first": ("COW, 1st write into a shared PMD-mapped THP (split PMD + copy 4 KiB)", "fault", None),
    "cow_4k": ("COW, later 4 KiB writes into the split THP", "fault", "cow_4k_ns"),
    "split_pmd": ("PMD split = cow_first - cow_4k", "PMD", "split_pmd_ns"),
    "cow_4k_4kbacked": ("COW of a 4 KiB-backed page (all pages, 1st per PTE table included)", "fault", None),
    "cow_dense": ("COW inside a memset over fork-shared 4 KiB pages, minus the memset without faults", "fault",
                  None),
    "cow_dense_extra": ("cow_dense - cow_4k: what a dense overwrite adds to a COW fault", "fault",
                        "cow_dense_4k_ns"),
    "reuse_4k": ("write-after-fork once the child has exited, 4 KiB (reuse fault)", "fault", "reuse_4k_ns"),
    "reuse_thp": ("write-after-fork once the child has exited, THP (PMD reuse fault)", "fault", "reuse_thp_ns"),
    "collapse": ("MADV_COLLAPSE of a COW-split PTE-mapped THP, child exited (511 pages in the old folio)",
                 "2 MiB", "collapse_ns"),
    "collapse_4k_pages": ("MADV_COLLAPSE of 2 MiB made of 512 separate 4 KiB pages (all COW copies)", "2 MiB",
                          None),
    "copy_4k": ("memcpy of 4 KiB blocks (cold, strided walk)", "4 KiB", "copy_4k_ns"),
    "copy_2m": ("memcpy of 2 MiB blocks (cold, strided walk)", "2 MiB", "copy_2m_ns"),
    "memset_2m": ("memset of populated memory, no faults (glibc memset)", "2 MiB", None),
    "fork_base": ("fork() of this process, region MADV_DONTFORK (the interpreter's own mappings)", "fork",
                  "fork_base_ns"),
    "fork_thp": ("fork() with the THP-backed region minus the paired fork without it", "PMD", "fork_pmd_ns"),
    "fork_4k": ("fork() with the 4 KiB-backed region minus the paired fork without it", "PTE table", None),
    "fork_4k_sparse": ("fork() with a 4 KiB-backed region of 1 page per 2 MiB, minus the paired fork",
                       "PTE table", "fork_pte_table_ns"),
    "fork_pte": ("(fork_4k - fork_4k_sparse) / 511: one present PTE copied", "PTE", "fork_pte_ns"),
    "exit_base": ("child exit + waitpid, region MADV_DONTFORK", "exit", None),
    "exit_thp": ("child exit + waitpid with the THP-backed region minus the paired one without", "PMD",
                 "exit_pmd_ns"),
    "exit_4k": ("child exit + waitpid with the 4 KiB-backed region minus the paired one without", "PTE table",
                None),
    "exit_4k_sparse": ("child exit + waitpid, 1 page per 2 MiB, minus the paired one", "PTE table",
                       "exit_pte_table_ns"),
    "exit_pte": ("(exit_4k - exit_4k_sparse) / 511: one present PTE torn down", "PTE", "exit_pte_ns"),
    "mmap": ("mmap() of 2 MiB, untouched (ctypes call minus a null ctypes call)", "call", None),
    "munmap": ("munmap() of an untouched 2 MiB mapping", "call", None),
    "madvise": ("madvise(MADV_HUGEPAGE / MADV_NOHUGEPAGE) of a whole untouched 64 MiB VMA", "call", None),
    "numpy_store": ("numpy strided 1-byte store into populated memory (the batch overhead)", "store", None),
}

# Profile fields the lab does not measure (they keep the reference value).
NOT_MEASURED = ("compact_page_ns", "swap_out_page_ns", "swap_in_page_ns", "tlb_shootdown_ns",
                "thp_fault_fallback_ns")

# Reference values for the lab extras when a profile has no [lab] section: calibration.md.
REFERENCE_EXTRAS: dict[str, float] = {
    "memset_2m_ns": 77.3e3,        # 3c: no-fault baseline memset, 4k row (thp row: 85.1 us)
}
# calibration.md section 6, numpy take of 20 M random indices, ns per access: (4k, thp).
REFERENCE_RANDOM_READS: dict[int, tuple[float, float]] = {
    256: (15.0, 14.0), 1024: (15.9, 15.7), 4096: (53.9, 21.5), 8192: (63.1, 39.5),
}


@dataclass
class CalibrationConfig:
    """Sizes and repeat counts; :meth:`quick` keeps a run under a minute."""

    size: int = 256 * MiB                  # fault / COW / reuse / collapse regions
    fork_size: int = 1 * GiB               # fork and exit regions, 4 KiB-backed
    fork_thp_size: int = 4 * GiB           # THP-backed: 2048 PMDs, ~2 ms, well above the fork's own noise
    copy_size: int = 512 * MiB             # memcpy / memset buffers
    zero_read_size: int = 8 * GiB          # huge-zero-page reads (virtual only: nothing is allocated)
    random_sizes: tuple[int, ...] = (64 * MiB, 256 * MiB, 1 * GiB, 4 * GiB)
    random_accesses: int = 16_000_000
    repeats: int = 5
    fork_repeats: int = 31
    syscall_calls: int = 2000
    warm: bool = True
    tlb_preset: str = "amd-zen4-genoa"
    seed: int = 0
    quick: bool = False

    @classmethod
    def quick_config(cls, **kw) -> "CalibrationConfig":
        base = dict(size=64 * MiB, fork_size=1 * GiB, copy_size=128 * MiB, zero_read_size=2 * GiB,
                    random_sizes=(256 * MiB, 1 * GiB), random_accesses=4_000_000, repeats=3,
                    fork_repeats=21, syscall_calls=1000, quick=True)
        base.update(kw)
        return cls(**base)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["random_sizes"] = list(self.random_sizes)
        return d


# ---------------------------------------------------------------------------------------------
# The measurements
# ---------------------------------------------------------------------------------------------

class Calibrator:
    """Runs the measurements of one calibration and keeps their :class:`Figure` s.

    Each ``measure_*`` method is one step: it runs once (one repeat) and adds a
    run to its figures, cross-checking the counters first.  :func:`calibrate`
    drives the steps with repeats and progress.  The caller holds lab_lock().
    """

    def __init__(self, config: CalibrationConfig | None = None, root: str = "/") -> None:
        self.cfg = config or CalibrationConfig()
        self.root = root
        self.figures: dict[str, Figure] = {}
        self.random_points: list[dict] = []
        self.round_marks: list[tuple[dict[str, int], int]] = []   # after each round: runs per figure, points
        self.cpu = "unknown"                  # /proc/cpuinfo model name, for the profile's ``cpu``
        self.kernel = ""                      # uname -r, for the profile's ``kernel``
        self.cpu_id = ""                      # vendor:family:model, for the profile's ``cpu_id``

    # -- bookkeeping --------------------------------------------------------------------------
    def fig(self, name: str) -> Figure:
        if name not in self.figures:
            if name.endswith("_batch"):
                what, per = f"{name[:-6]}: the same batch again without faults (subtracted)", "operation"
            else:
                what, per, _ = FIGURES[name]
            self.figures[name] = Figure(name, what, per)
        return self.figures[name]

    def record(self, name: str, total_ns: float, n: int, observed: Mapping[str, int],
               rules: str | None = None, kb: int = 0, rule_n: int | None = None) -> float:
        """Check ``observed`` against RULES[rules or name](rule_n or n, kb), then add a run of total_ns / n.

        A run below zero (a difference of two timings that noise inverted) is
        a measurement error, not a cost: it is kept apart in ``dropped`` and
        reported, never used.
        """
        checked = check_path(name, observed, RULES[rules or name](rule_n or n, kb))
        f = self.fig(name)
        f.n = n
        if total_ns < 0:
            f.dropped.append(total_ns / n)
            return total_ns / n
        f.runs.append(total_ns / n)
        f.observed.append(dict(observed))
        f.checked = checked
        return total_ns / n

    def _warm(self, size: int, backing: str | None) -> None:
        prewarm(size, backing, self.cfg.warm)

    # -- syscalls ---------------------------------------------------------------------------------
    def measure_syscalls(self) -> None:
        """mmap / munmap of untouched 2 MiB, madvise of a whole 64 MiB VMA; minus a null ctypes call."""
        n = self.cfg.syscall_calls
        lc = libc()
        null = timed_ns(lambda: [lc.labs(-1) for _ in range(n)]) / n
        addrs: list[int] = []
        with Counters(self.root) as c:
            t_map = timed_ns(lambda: addrs.extend(lc.mmap(None, PMD, PROT_RW, MAP_PRIVATE_ANON, -1, 0)
                                                  for _ in range(n)))
            t_unmap = timed_ns(lambda: [lc.munmap(a, PMD) for a in addrs])
        if any(a is None or a == ctypes.c_void_p(-1).value for a in addrs):
            raise procfs.LabError("mmap: a call failed while measuring mmap()")
        self.record("mmap", t_map - null * n, n, c.delta, rules="syscall")
        self.record("munmap", t_unmap - null * n, n, c.delta, rules="syscall")
        with Region(64 * MiB, None) as r, Counters(self.root) as c:
            advice = [MADV_HUGEPAGE, MADV_NOHUGEPAGE] * (n // 2)
            t = timed_ns(lambda: [lc.madvise(r.addr, r.size, a) for a in advice])
        self.record("madvise", t - null * len(advice), len(advice), c.delta, rules="syscall")

    # -- batches of faults ------------------------------------------------------------------------
    def batch(self, name: str, fn: Callable[[], object], n: int, region: Region | None = None,
              rules: str | None = None, settle: Callable[[], object] | None = None) -> float:
        """Time ``fn`` (n faults), then the same ``fn`` again (no faults), record the difference / n.

        The second run is the batch's own cost: the interpreter's call overhead
        and the loads or stores themselves (TLB and cache misses), which the
        latency model prices apart from the faults.  It must not fault.

        ``settle`` is ``fn`` on an empty selection, run twice first, the way the
        batch runs (counters, timer): after a fork() every page of the
        interpreter's own heap is write-protected, and the first write to each
        (refcounts, numpy's scratch) would fault inside the timed batch: about
        30 faults, 20-50 us, which is 3x the cost of 4 PMD reuse faults.
        """
        for _ in range(2 if settle else 0):
            with Counters(self.root):
                timed_ns(settle)
        with Counters(self.root) as c:
            t = timed_ns(fn)
        with Counters(self.root) as c0:
            t0 = timed_ns(fn)
        check_path(f"{name} (repeat without faults)", c0.delta, RULES["no_faults"](0, 0))
        obs = {**c.delta, **(region.smaps() if region else {})}
        self.record(f"{name}_batch", t0, n, c0.delta, rules="none")
        return self.record(name, t - t0, n, obs, rules=rules, kb=region.kb if region else 0)

    # -- zero-page reads --------------------------------------------------------------------------
    def measure_zero_reads(self) -> None:
        """Read one byte per 4 KiB of a 4k region (zero page) and per 2 MiB of a THP region."""
        with Region(self.cfg.size, "4k") as r:
            self.batch("zero_page_read", lambda: int(r.buf[::PAGE].max()), r.size // PAGE, r)
        with Region(self.cfg.zero_read_size, "thp") as r:
            self.batch("huge_zero_read", lambda: int(r.buf[::PMD].max()), r.size // PMD, r)

    # -- THP chain --------------------------------------------------------------------------------
    def measure_thp_chain(self) -> None:
        """THP fault; PMD reuse after the child exits; COW split; MADV_COLLAPSE; later 4 KiB COWs.

        In order, on one THP region: the THP faults; fork + exit, then the PMD
        reuse faults; fork, the first writes (PMD split + 4 KiB copy), exit, and
        MADV_COLLAPSE of the PTE-mapped THPs (511 of 512 pages still in the old
        folio: calibration.md section 5's case); fork, first writes again
        (untimed), the 511 later 4 KiB COWs per 2 MiB, exit, and MADV_COLLAPSE of
        what are now 512 separate 4 KiB pages per 2 MiB (a lab extra: about 3x
        dearer).
        """
        size = self.cfg.size
        nr_pmd = size // PMD
        self._warm(size, "thp")
        with Region(size, "thp") as r:
            self.batch("fault_thp_zero", lambda: _store(r.buf, np.s_[::PMD], 1), nr_pmd, r)
            with Counters(self.root) as c:                     # every 4 KiB page, no faults
                t = timed_ns(lambda: _store(r.buf, np.s_[::PAGE], 1))
            self.record("numpy_store", t, size // PAGE, c.delta, rules="no_faults")

            child, _ = Child.fork()
            child.exit()
            self.batch("reuse_thp", lambda: _store(r.buf, np.s_[::PMD], 2), nr_pmd, r,
                       settle=lambda: _store(r.buf, np.s_[0:0], 2))

            child, _ = Child.fork()
            try:
                self._warm(nr_pmd * PAGE, "4k")
                self.batch("cow_first", lambda: _store(r.buf, np.s_[PAGE::PMD], 3), nr_pmd, r,
                           settle=lambda: _store(r.buf, np.s_[0:0], 3))
            finally:
                child.exit()
            self._collapse(r, "collapse")

            child, _ = Child.fork()
            try:
                self._warm(nr_pmd * PAGE, "4k")
                _store(r.buf, np.s_[PAGE::PMD], 4)
                pages = r.buf.reshape(nr_pmd, PMD // PAGE, PAGE)[:, :, 0]
                self._warm(size, "4k")
                self.batch("cow_4k", lambda: (_store(pages, np.s_[:, 0], 3), _store(pages, np.s_[:, 2:], 3)),
                           nr_pmd * (PMD // PAGE - 1),
                           settle=lambda: (_store(pages, np.s_[:0, 0], 3), _store(pages, np.s_[:0, 2:], 3)))
            finally:
                child.exit()
            self._collapse(r, "collapse_4k_pages")

    def _collapse(self, r: Region, name: str) -> None:
        """MADV_COLLAPSE every 2 MiB of ``r``, one call each (a warm THP allocation for each)."""
        nr_pmd = r.size // PMD
        self._warm(r.size, "thp")
        lc = libc()
        rcs: list[int] = []

        def collapse(count: int = nr_pmd) -> None:
            rcs.extend(lc.madvise(r.addr + i * PMD, PMD, MADV_COLLAPSE) for i in range(count))

        self.batch(name, collapse, nr_pmd, r, rules="collapse", settle=lambda: collapse(0))
        if any(rcs):
            err = ctypes.get_errno()
            raise WrongPathError(f"{name}: MADV_COLLAPSE failed for {sum(1 for x in rcs if x)} of "
                                 f"{len(rcs)} calls ({os.strerror(err)}); refusing to report this figure")

    # -- 4 KiB chain ------------------------------------------------------------------------------
    def measure_4k_chain(self) -> None:
        """4 KiB faults; reuse after the child exits; COW of 4 KiB-backed pages, 1 B per page and memset."""
        size = self.cfg.size
        n = size // PAGE
        self._warm(size, "4k")
        with Region(size, "4k") as r:
            self.batch("fault_4k_zero", lambda: _store(r.buf, np.s_[::PAGE], 1), n, r)
            child, _ = Child.fork()
            child.exit()
            self.batch("reuse_4k", lambda: _store(r.buf, np.s_[::PAGE], 2), n,
                       settle=lambda: _store(r.buf, np.s_[0:0], 2))
            child, _ = Child.fork()
            try:
                self._warm(size, "4k")
                self.batch("cow_4k_4kbacked", lambda: _store(r.buf, np.s_[::PAGE], 3), n,
                           settle=lambda: _store(r.buf, np.s_[0:0], 3))
            finally:
                child.exit()
            child, _ = Child.fork()                  # a dense overwrite: memset over shared pages
            try:
                self._warm(size, "4k")
                self.batch("cow_dense", lambda: ctypes.memset(r.addr, 4, size), n, rules="cow_4k_4kbacked",
                           settle=lambda: ctypes.memset(r.addr, 4, 0))
            finally:
                child.exit()

    # -- memcpy / memset ---------------------------------------------------------------------------
    def measure_copies(self) -> None:
        """memcpy of 4 KiB and 2 MiB blocks (every other block of a populated buffer), memset."""
        size = self.cfg.copy_size
        self._warm(2 * size, "thp")
        with Region(size, "thp") as src, Region(size, "thp") as dst:
            populate(src)
            populate(dst)
            src.buf[::PAGE] = 7
            for name, block in (("copy_4k", PAGE), ("copy_2m", PMD)):
                s2 = src.buf.reshape(-1, 2, block)[:, 0, :]
                d2 = dst.buf.reshape(-1, 2, block)[:, 0, :]
                n = s2.shape[0]
                with Counters(self.root) as c:
                    t = timed_ns(lambda: np.copyto(d2, s2))
                self.record(name, t, n, c.delta, rules="no_faults", rule_n=n * block // PAGE)
            with Counters(self.root) as c:
                t = timed_ns(lambda: ctypes.memset(dst.addr, 5, size))
            self.record("memset_2m", t, size // PMD, c.delta, rules="no_faults", rule_n=size // PAGE)

    # -- fork / exit ---------------------------------------------------------------------------------
    def measure_forks(self, repeats: int | None = None) -> None:
        """fork() and the child's exit, with and without a THP-backed, a 4 KiB-backed and a sparse region
        (``repeats`` pairs each; default the config's fork_repeats).

        The sparse region has one page per 2 MiB: its PTE tables hold one entry
        each, so its cost per table is the table's own (allocation and walk),
        and the full region's extra over it is 511 present PTEs.  See fork_pairs(): the region's share is the paired difference, so the
        interpreter's own fork (fork_base, which drifts by +-0.5 ms with its heap)
        cancels out.
        """
        for backing in ("thp", "4k", "4k_sparse"):
            kind = backing.split("_")[0]
            size = self.cfg.fork_thp_size if kind == "thp" else self.cfg.fork_size
            nr_pmd = size // PMD
            self._warm(size, kind)
            with Region(size, kind) as r:
                if backing == "4k_sparse":               # one page per PTE table: the table's own cost
                    _store(r.buf, np.s_[::PMD], 1)
                else:
                    populate(r)
                kb = r.kb if backing != "4k_sparse" else nr_pmd * PAGE // 1024
                with Counters(self.root) as c:
                    pairs = fork_pairs(r, repeats or self.cfg.fork_repeats)
                obs = {**c.delta, **r.smaps()}
                for fb, fr, eb, er in pairs:
                    self.record("fork_base", fb, 1, {}, rules="none")
                    self.record("exit_base", eb, 1, {}, rules="none")
                    self.record(f"fork_{backing}", fr - fb, nr_pmd, obs, rules=f"fork_{kind}", kb=kb)
                    self.record(f"exit_{backing}", er - eb, nr_pmd, obs, rules=f"fork_{kind}", kb=kb)

    # -- random reads -----------------------------------------------------------------------------
    def measure_random_reads(self, size: int, repeats: int | None = None) -> dict[str, float]:
        """ns per 8-byte random read (numpy take) over a THP-backed and a 4 KiB-backed buffer."""
        reps = repeats or self.cfg.repeats
        m = self.cfg.random_accesses
        idx = random_indices(size, m, self.cfg.seed)
        out = np.empty(m, dtype=np.uint64)
        res = {}
        for backing in ("4k", "thp"):
            self._warm(size, backing)
            with Region(size, backing) as r:
                populate(r)
                u64 = r.buf.view(np.uint64)
                np.take(u64, idx, out=out, mode="clip")      # warm-up pass (caches, TLBs, `out`)
                runs = []
                for _ in range(reps):
                    with Counters(self.root) as c:
                        t = timed_ns(lambda: np.take(u64, idx, out=out, mode="clip"))
                    obs = {**c.delta, **r.smaps()}
                    check_path(f"random_read_{backing} ({size // MiB} MiB)", obs,
                               RULES[f"random_read_{backing}"](r.size // PAGE, r.kb))
                    runs.append(t / m)
            ns = float(statistics.median(runs))
            res[backing] = ns
            self.random_points.append({"size_mib": size // MiB, "backing": backing, "ns": round(ns, 3),
                                       "min_ns": round(min(runs), 3), "max_ns": round(max(runs), 3),
                                       "runs_ns": [round(x, 3) for x in runs]})
        return res

    # -- rounds (interleaved runs) -------------------------------------------------------------------
    def mark_round(self) -> None:
        """Note where a round of the calibration ends (see _steps() with ``between``)."""
        self.round_marks.append(({k: len(f.runs) for k, f in self.figures.items()}, len(self.random_points)))

    def round(self, i: int, points: list[dict]) -> "Calibrator":
        """A Calibrator holding only round ``i``'s runs (figures measured once, before the rounds,
        keep all theirs) and its random-read ``points`` (those of every round, unmerged), so that
        its profile() and extras() are that round's."""
        lo, lo_pts = self.round_marks[i - 1] if i else ({}, 0)
        hi, hi_pts = self.round_marks[i]
        sub = Calibrator(self.cfg, self.root)
        sub.cpu, sub.kernel, sub.cpu_id = self.cpu, self.kernel, self.cpu_id
        for k, f in self.figures.items():
            a, b = lo.get(k, 0), hi.get(k, 0)
            keep = slice(a, b) if b > a else slice(None)
            sub.figures[k] = Figure(f.name, f.what, f.per, f.n, f.runs[keep], f.observed[keep], f.checked)
        sub.random_points = merged_random_points(points[lo_pts:hi_pts])
        return sub

    def extras(self) -> dict[str, float]:
        """The lab extras (ns) of the [lab] section: medians of the figures that are no profile field."""
        return {f"{k}_ns": round(self.figures[k].median, 3)
                for k in ("mmap", "munmap", "madvise", "memset_2m", "cow_first", "cow_4k_4kbacked",
                          "collapse_4k_pages", "exit_base", "numpy_store") if k in self.figures and self.figures[k].runs}

    # -- the profile ----------------------------------------------------------------------------------
    def profile(self, name: str, source: str) -> CalibrationProfile:
        """The profile: measured medians where there are figures, the reference value elsewhere."""
        vals = DEFAULT_PROFILE.to_dict()
        vals.update(name=name, source=source, cpu=self.cpu, kernel=self.kernel, cpu_id=self.cpu_id)
        med = {k: f.median for k, f in self.figures.items() if f.runs}
        # Derived figures, run by run: (name, minuend, subtrahend, divisor).
        for derived, a_name, b_name, div in (("split_pmd", "cow_first", "cow_4k", 1),
                                             ("cow_dense_extra", "cow_dense", "cow_4k", 1),
                                             ("fork_pte", "fork_4k", "fork_4k_sparse", PMD // PAGE - 1),
                                             ("exit_pte", "exit_4k", "exit_4k_sparse", PMD // PAGE - 1)):
            if a_name in med and b_name in med:
                d = self.fig(derived)
                d.n = self.figures[a_name].n
                a_runs, b_runs = self.figures[a_name].runs, self.figures[b_name].runs
                low = -math.inf if FIGURES[derived][2] in SIGNED_FIELDS else 0.0
                if len(a_runs) == len(b_runs):
                    d.runs = [max(low, a - b) / div for a, b in zip(a_runs, b_runs)]
                else:
                    d.runs = [max(low, med[a_name] - med[b_name]) / div]
                med[derived] = d.median
        for fig_name, (_, _, fld) in FIGURES.items():
            if fld and fig_name in med:
                vals[fld] = round(med[fig_name] if fld in SIGNED_FIELDS else max(0.0, med[fig_name]), 3)
        return CalibrationProfile.from_dict(vals)


PROBE_SIZE = 32 * MiB


def speed_probe(reps: int = 5) -> dict[str, float]:
    """How fast this machine is right now: fault-free work timed like the figures (CPU time).

    ``memset_ns``: memset of a populated 32 MiB (memory bandwidth); ``call_ns``:
    one ctypes call into libc (the CPU).  Medians of ``reps``.  A guest's speed
    drifts with what the host runs beside it, which no counter inside the guest
    shows; validate compares its probe with the calibration's.
    """
    lc = libc()
    with Region(PROBE_SIZE, "4k") as r:
        populate(r)
        mem = [timed_ns(lambda: ctypes.memset(r.addr, 1, PROBE_SIZE)) for _ in range(reps)]
    calls = [timed_ns(lambda: [lc.labs(-1) for _ in range(2000)]) / 2000 for _ in range(reps)]
    return {"memset_ns": float(statistics.median(mem)), "call_ns": float(statistics.median(calls))}


def probe_drift(then: Mapping | None, now: Mapping | None) -> dict[str, float]:
    """now / then of each probe figure both have (above 1: the machine is slower now)."""
    if not then or not now:
        return {}
    return {k: float(now[k]) / float(then[k]) for k in ("memset_ns", "call_ns")
            if k in then and k in now and float(then[k]) > 0}


def random_indices(size: int, m: int, seed: int) -> np.ndarray:
    """``m`` random 8-byte word indices into ``size`` bytes (the same for every run of a size)."""
    return np.random.default_rng(seed + size // MiB).integers(0, size // 8, m, dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# The random-read model: per-access memory cost + TLB simulator
# ---------------------------------------------------------------------------------------------

SIM_BASE = 0x7F00_0000_0000          # where the TLB simulation puts a buffer (1 GiB aligned)


def tlb_rates(size: int, page_shift: int | Callable[[np.ndarray], np.ndarray], knobs, accesses: int = 400_000,
              seed: int = 0, base: int = SIM_BASE) -> tuple[float, float]:
    """(L2 TLB hits, page-walk memory references) per access of random 8-byte reads over ``size``.

    ``page_shift`` is 12 or 21 for the whole buffer, or a function giving the
    page size of each address (e.g. page_shifts_of() on a simulated process).
    The buffer starts at ``base``.  The first quarter of the accesses only
    warms the TLBs.
    """
    from ..machine.tlb import Metric, SimMetric, TlbSimulator

    idx = random_indices(size, accesses, seed)
    vaddr = (base + idx * 8).astype(np.int64)
    sim = TlbSimulator(knobs)
    warm = accesses // 4
    shifts = np.asarray(page_shift(vaddr) if callable(page_shift) else page_shift, dtype=np.uint8)
    sim.simulate(vaddr[:warm], page_shift=shifts if shifts.ndim == 0 else shifts[:warm])
    sim.reset_stats()
    sim.simulate(vaddr[warm:], page_shift=shifts if shifts.ndim == 0 else shifts[warm:])
    n = accesses - warm
    l2_hits = sim.l2.get_metric(Metric.HITS) if sim.l2 else 0
    return l2_hits / n, sim.get_metric(SimMetric.WALK_MEM_REFS) / n


@dataclass
class RandomReadModel:
    """Predicted ns per random 8-byte read = mem_ns(size) + the TLB simulator's translation time.

    Translation per access = L2 TLB hits x the preset's ``l2_hit_cycles`` /
    ``cpu_ghz`` + page-walk memory references x ``walk_ns(size)``.  Both
    per-size terms are fitted on the (4 KiB, THP) pair measured at each size:
    the cost of a walk reference is the time difference per extra reference
    (it grows with the buffer because the page tables stop fitting in the
    caches: 2 MiB of PTEs per GiB), the memory cost is what remains.  Between
    sizes both are interpolated in log2(size), and clamped outside.
    """

    preset: str
    base_ns: dict[int, float]          # size MiB -> ns per access without translation
    walk_ref_ns: dict[int, float]      # size MiB -> ns per page-walk memory reference
    source: str = ""

    def _interp(self, table: Mapping[int, float], size: int) -> float:
        sizes = sorted(table)
        x = math.log2(max(size, 1) / MiB)
        return float(np.interp(x, [math.log2(s) for s in sizes], [table[s] for s in sizes]))

    def mem_ns(self, size: int) -> float:
        return self._interp(self.base_ns, size)

    def walk_ns(self, size: int) -> float:
        return self._interp(self.walk_ref_ns, size)

    def knobs(self, size: int | None = None):
        """The preset's TLB knobs (with walk_ref_cycles set for ``size`` when given)."""
        from ..machine.presets import get_preset

        k = get_preset(self.preset)
        if size is not None:
            k.walk_ref_cycles = self.walk_ns(size) * k.cpu_ghz
        return k

    def translation_ns(self, l2_hits: float, walk_refs: float, size: int) -> float:
        k = self.knobs()
        return l2_hits * k.l2_hit_cycles / k.cpu_ghz + walk_refs * self.walk_ns(size)

    def to_dict(self) -> dict:
        return {"preset": self.preset, "source": self.source,
                "base_ns": {str(k): round(v, 4) for k, v in sorted(self.base_ns.items())},
                "walk_ref_ns": {str(k): round(v, 4) for k, v in sorted(self.walk_ref_ns.items())}}

    @classmethod
    def from_dict(cls, d: Mapping) -> "RandomReadModel":
        return cls(preset=str(d["preset"]), source=str(d.get("source", "")),
                   base_ns={int(k): float(v) for k, v in dict(d["base_ns"]).items()},
                   walk_ref_ns={int(k): float(v) for k, v in dict(d["walk_ref_ns"]).items()})


def fit_random_reads(points: Mapping[int, tuple[float, float]], preset: str = "amd-zen4-genoa",
                     accesses: int = 400_000, seed: int = 0, source: str = "") -> RandomReadModel:
    """Fit a :class:`RandomReadModel` to measured ns per access ``{size MiB: (4k, thp)}``.

    At each size: walk = max(0, (t4k - l2_4k) - (tthp - l2_thp)) / (refs4k - refsthp)
    and base = max(0, mean over both backings of t - l2 - walk x refs), where
    l2 and refs are the TLB simulator's L2 hit time and walk references per
    access for that backing.
    """
    from ..machine.presets import get_preset

    knobs = get_preset(preset)
    l2_ns = knobs.l2_hit_cycles / knobs.cpu_ghz
    base, walk = {}, {}
    for size_mib, (t4k, tthp) in sorted(points.items()):
        h4, r4 = tlb_rates(size_mib * MiB, 12, knobs, accesses, seed)
        hh, rh = tlb_rates(size_mib * MiB, 21, knobs, accesses, seed)
        a, c = t4k - h4 * l2_ns, tthp - hh * l2_ns
        w = max(0.0, (a - c) / (r4 - rh)) if r4 - rh > 1e-9 else 0.0
        walk[size_mib] = w
        base[size_mib] = max(0.0, ((a - w * r4) + (c - w * rh)) / 2)
    return RandomReadModel(preset=preset, base_ns=base, walk_ref_ns=walk, source=source)


_REFERENCE_MODEL: RandomReadModel | None = None


def reference_random_model() -> RandomReadModel:
    """The random-read model fitted to calibration.md section 6 (computed once)."""
    global _REFERENCE_MODEL
    if _REFERENCE_MODEL is None:
        _REFERENCE_MODEL = fit_random_reads(REFERENCE_RANDOM_READS,
                                            source="calibration.md section 6 (numpy take, 20 M indices)")
    return _REFERENCE_MODEL


# ---------------------------------------------------------------------------------------------
# Metadata, the whole run, the profile file
# ---------------------------------------------------------------------------------------------

def _read_optional(root: str, *parts: str) -> str | None:
    path = os.path.join(root, *parts)
    if not os.path.exists(path):
        return None
    try:
        return procfs._read_text(path).strip()
    except procfs.LabError:
        return None


def cpu_id_of(meta: Mapping) -> str:
    """``vendor:family:model`` of collect_metadata()'s CPU fields ("GenuineIntel:6:207"), or ""."""
    parts = [str(meta.get(k, "")) for k in ("cpu_vendor", "cpu_family", "cpu_model_number")]
    return ":".join(parts) if all(parts) else ""


def collect_metadata(root: str = "/") -> dict:
    """Kernel, CPU, governor, THP knobs and VM facts, for every lab result (style.md 13)."""
    meta: dict = dict(procfs.read_metadata(root))
    cpuinfo = _read_optional(root, "proc", "cpuinfo") or ""
    wanted = {"vendor_id": "cpu_vendor", "cpu family": "cpu_family", "model": "cpu_model_number",
              "stepping": "cpu_stepping", "cpu MHz": "cpu_mhz", "cache size": "cpu_cache_size"}
    for line in cpuinfo.splitlines():                      # the first processor's block
        if not line.strip():
            break
        key, _, val = line.partition(":")
        if key.strip() in wanted:
            meta[wanted[key.strip()]] = val.strip()
    load = _read_optional(root, "proc", "loadavg")
    meta["loadavg"] = " ".join(load.split()[:3]) if load else "n/a"
    # v5.14 (page reporting order): 9 means free 2 MiB blocks go back to the host (calibration.md 0).
    order = _read_optional(root, "sys", "module", "page_reporting", "parameters", "page_reporting_order")
    meta["page_reporting_order"] = order if order is not None else "n/a"
    kd = os.path.join(root, "sys", "kernel", "mm", "damon", "admin", "kdamonds")
    states = []
    if os.path.isdir(kd):                                  # v5.18: DAMON sysfs interface
        for name in sorted(os.listdir(kd)):
            st = _read_optional(root, "sys", "kernel", "mm", "damon", "admin", "kdamonds", name, "state")
            if st is not None:
                states.append(st)
    meta["damon_kdamonds"] = ",".join(states) if states else "none"
    meta["python"] = platform.python_version()
    meta["numpy"] = np.__version__
    return meta


class MachineLoad:
    """How busy the other tasks kept the CPUs during a run (from /proc/stat and os.times()).

    ``other_busy`` is the share of all CPUs' time, over the run, that was not
    idle and not spent by this process or its children.  On the lab VM the two
    vCPUs share a core's resources, so a busy neighbour inflates every figure
    (about 2x for faults); the figure goes into the metadata and a warning.
    """

    def __init__(self, root: str = "/") -> None:
        self.root = root
        self.other_busy = math.nan

    def _stat(self) -> tuple[int, int] | None:
        text = _read_optional(self.root, "proc", "stat")
        if not text:
            return None
        vals = [int(x) for x in text.splitlines()[0].split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        return sum(vals[:8]) - idle, sum(vals[:8])

    def __enter__(self) -> "MachineLoad":
        self._t0, self._s0 = os.times(), self._stat()
        return self

    def __exit__(self, *exc) -> None:
        t1, s1 = os.times(), self._stat()
        if self._s0 is None or s1 is None or s1[1] <= self._s0[1]:
            return
        hz = os.sysconf("SC_CLK_TCK")
        own = sum(b - a for a, b in zip(self._t0[:4], t1[:4])) * hz
        self.other_busy = max(0.0, (s1[0] - self._s0[0] - own) / (s1[1] - self._s0[1]))

    def meta_value(self):
        """other_busy for a result's metadata: rounded, or "n/a" when it could not be measured."""
        return "n/a" if math.isnan(self.other_busy) else round(self.other_busy, 3)


BUSY_WARNING = 0.15


@dataclass
class CalibrationResult:
    """A calibration: the profile, the figures behind it and the [lab] section written with it."""

    profile: CalibrationProfile
    figures: dict[str, Figure]
    lab: dict
    elapsed_s: float = 0.0
    rounds: list["RoundProfile"] = field(default_factory=list)     # interleaved runs: each round's own


@dataclass
class RoundProfile:
    """One round of an interleaved calibration: the profile, lab extras and random-read points
    of that round's runs alone (Calibrator.round())."""

    profile: CalibrationProfile
    extras: dict[str, float]
    random_points: list[dict]


Steps = list[tuple[str, Callable[[], object]]]


def _steps(cal: Calibrator, between: Callable[[int, int], Steps] | None = None) -> Steps:
    """The calibration's steps in order.  With ``between``, every figure is measured in each of
    the ``repeats`` rounds (fork pairs and random reads split over them) and ``between(i, rounds)``'s
    steps follow round ``i``: other measurements then see the machine at the same speeds."""
    cfg = cal.cfg
    steps: Steps = [("mmap / munmap / madvise", cal.measure_syscalls)]
    per_round = -(-cfg.fork_repeats // cfg.repeats)
    for i in range(cfg.repeats):
        steps += [(f"zero-page reads ({i + 1}/{cfg.repeats})", cal.measure_zero_reads),
                  (f"THP fault, reuse, COW, collapse ({i + 1}/{cfg.repeats})", cal.measure_thp_chain),
                  (f"4 KiB fault, reuse, COW ({i + 1}/{cfg.repeats})", cal.measure_4k_chain),
                  (f"memcpy / memset ({i + 1}/{cfg.repeats})", cal.measure_copies)]
        if between is None:
            continue
        # forks last, as in the other measurement's round: a fork's per-PTE work walks the
        # struct pages of its region, and a region populated right after gigabytes of other
        # pages were freed lies otherwise (20 % dearer forks measured on a 2 vCPU VM)
        steps += [(f"random reads, {size // MiB} MiB ({i + 1}/{cfg.repeats})",
                   lambda s=size: cal.measure_random_reads(s, 1)) for size in cfg.random_sizes]
        steps.append((f"fork / exit x {per_round} ({i + 1}/{cfg.repeats})",
                      lambda: cal.measure_forks(per_round)))
        steps.append((f"calibration round {i + 1}/{cfg.repeats} done", cal.mark_round))
        steps += between(i, cfg.repeats)
    if between is not None:
        return steps
    steps.append((f"fork / exit, {cfg.fork_size // MiB} MiB x {cfg.fork_repeats}", cal.measure_forks))
    for size in cfg.random_sizes:
        steps.append((f"random reads, {size // MiB} MiB", lambda s=size: cal.measure_random_reads(s)))
    return steps


def merged_random_points(points: list[dict]) -> list[dict]:
    """One random-read point per (size, backing): the runs of several rounds, their median."""
    by: dict[tuple[int, str], list[float]] = {}
    for p in points:
        by.setdefault((p["size_mib"], p["backing"]), []).extend(p["runs_ns"])
    return [{"size_mib": size, "backing": backing, "ns": round(float(statistics.median(runs)), 3),
             "min_ns": round(min(runs), 3), "max_ns": round(max(runs), 3), "runs_ns": runs}
            for (size, backing), runs in by.items()]


STEP_ATTEMPTS = 3


def run_step(cal: "Calibrator", fn: Callable[[], object], attempts: int = STEP_ATTEMPTS) -> None:
    """Run one step; if a run is refused, drop the step's new runs and try again (``attempts`` in all).

    A wrong kernel path shows up every time; another process's burst of THP
    faults or reuse faults during one run does not.  The last refusal is
    raised, naming the number of attempts.
    """
    for attempt in range(1, attempts + 1):
        marks = {k: len(f.runs) for k, f in cal.figures.items()}
        npoints = len(cal.random_points)
        try:
            fn()
            return
        except WrongPathError as e:
            for k, f in list(cal.figures.items()):
                keep = marks.get(k, 0)
                del f.runs[keep:], f.observed[keep:]
            del cal.random_points[npoints:]
            if attempt == attempts:
                raise WrongPathError(f"{e} (refused in all {attempts} attempts)") from None


def calibrate(config: CalibrationConfig | None = None,
              progress: Callable[[str, int, int], None] | None = None, root: str = "/",
              between: Callable[[int, int], Steps] | None = None) -> CalibrationResult:
    """Measure every figure on the running kernel and build the profile; see the module docstring.

    Holds lab_lock() for the whole run and disables the garbage collector
    during it.  ``progress(label, done, total)`` is called before every step
    and once at the end.  ``between``: steps of another measurement run after
    each round (see _steps(); validate's interleaved runs).  Raises
    WrongPathError (a figure's counters show the wrong path), procfs.LabError
    (THP unavailable, a view unreadable) or OSError (a system call failed).
    """
    from .scenario import lab_lock

    cfg = config or CalibrationConfig()
    ok, reason = procfs.thp_available(root)
    if not ok:
        raise procfs.LabError(f"cannot calibrate THP costs: {reason}")
    cal = Calibrator(cfg, root)
    steps = _steps(cal, between)
    t0 = time.perf_counter()
    meta = collect_metadata(root)
    knobs = procfs.read_thp_knobs(root)
    gc.collect()                         # garbage with cycles would be forked (and its page tables copied)
    gc_was = gc.isenabled()
    gc.disable()
    load = MachineLoad(root)
    try:
        with lab_lock(), load:
            probe = speed_probe()
            for i, (label, fn) in enumerate(steps):
                if progress:
                    progress(label, i, len(steps) + 1)
                run_step(cal, fn)
        if progress:
            progress("fitting the random-read model (TLB simulator)", len(steps), len(steps) + 1)
    finally:
        if gc_was:
            gc.enable()
    meta["other_cpu_busy"] = load.meta_value()
    points = cal.random_points                                          # unmerged: the rounds' own
    cal.random_points = merged_random_points(points)
    pts: dict[int, list[float]] = {}
    for p in cal.random_points:
        pts.setdefault(p["size_mib"], [math.nan, math.nan])[0 if p["backing"] == "4k" else 1] = p["ns"]
    model = fit_random_reads({k: (v[0], v[1]) for k, v in pts.items()}, cfg.tlb_preset, seed=cfg.seed,
                             source="thpcow calibrate (numpy take)") if pts else None
    date = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    state = "warm" if cfg.warm else "cold"
    name = f"calibrated-{meta.get('kernel', 'unknown')}-{state}"
    source = (f"thpcow calibrate{' --quick' if cfg.quick else ''}, {date}, Linux {meta.get('kernel')}, "
              f"{meta.get('cpu_model')} x{meta.get('nr_cpus')}, {state}")
    cal.cpu = str(meta.get("cpu_model", "unknown"))
    cal.kernel = str(meta.get("kernel", ""))
    cal.cpu_id = cpu_id_of(meta)
    profile = cal.profile(name, source)
    extras = cal.extras()
    lab = {
        "format": LAB_FORMAT,
        "date": date,
        "warm": cfg.warm,
        "method": ("warm: a scratch region 1/8 larger than the step's is touched and freed before every "
                   "allocating step" if cfg.warm else f"cold: {COLD_SLEEP_S} s sleep before every allocating step"),
        "quick": cfg.quick,
        "config": cfg.to_dict(),
        "metadata": meta,
        "knobs": knobs,
        "not_measured": list(NOT_MEASURED),
        "probe": {k: round(v, 3) for k, v in probe.items()},
        "extras": extras,
        "random_reads": {"accesses": cfg.random_accesses,
                         "points": {f"{p['backing']}-{p['size_mib']}": p for p in cal.random_points},
                         **({"model": model.to_dict()} if model else {})},
        "figures": {k: f.to_dict() for k, f in cal.figures.items() if f.runs},
    }
    if progress:
        progress("done", len(steps) + 1, len(steps) + 1)
    return CalibrationResult(profile=profile, figures=cal.figures, lab=lab, elapsed_s=time.perf_counter() - t0,
                             rounds=[RoundProfile(r.profile(name, source), r.extras(), r.random_points)
                                     for r in (cal.round(i, points) for i in range(len(cal.round_marks)))])


# -- the file ------------------------------------------------------------------------------------

def _toml_key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else json.dumps(k)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else '"nan"'
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} {v!r} as TOML")


def toml_lines(data: Mapping, table: str = "") -> list[str]:
    """A nested mapping as TOML lines: scalars and lists inline, sub-mappings as [tables]."""
    lines = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, Mapping)]
    for k, v in data.items():
        if isinstance(v, Mapping):
            name = f"{table}.{_toml_key(k)}" if table else _toml_key(k)
            lines += ["", f"[{name}]"] + toml_lines(v, name)
    return lines


def write_profile(profile: CalibrationProfile, path: str | Path, lab: Mapping | None = None) -> Path:
    """Write ``profile`` with CalibrationProfile.save(), plus a comment header and the [lab] section.

    The result loads with CalibrationProfile.load() (the lab section is
    commented out) and with :func:`load_profile` (profile and lab section).
    """
    path = Path(path)
    if path.suffix == ".json":
        raise ValueError(f"{path}: the lab section needs a .toml profile")
    path.parent.mkdir(parents=True, exist_ok=True)
    profile.save(path)
    body = path.read_text()
    head = ["# thpcow latency profile: one cost (ns) per kernel event, CalibrationProfile fields.",
            "# Load with thpcow.machine.latency.CalibrationProfile.load(); the commented [lab] section",
            "# at the end (lines starting '#: ') is read by thpcow.lab.calibrate.load_profile()."]
    text = "\n".join(head) + "\n" + body
    if lab:
        text += "\n# --- [lab] section: metadata and measurements behind these numbers ---\n"
        text += "\n".join((LAB_PREFIX + ln).rstrip() for ln in toml_lines({"lab": dict(lab)})) + "\n"
    path.write_text(text)
    return path


def cache_profile(result: "CalibrationResult") -> Path | None:
    """Write a calibration as this machine's cached profile (cost_presets.cache_path()); its path,
    or None when the cache is off.  Raises OSError when it cannot be written."""
    from ..machine import cost_presets

    path = cost_presets.cache_path(result.profile.cpu_id, result.profile.kernel)
    return None if path is None else write_profile(result.profile, path, result.lab)


def read_lab_section(path: str | Path) -> dict:
    """The commented [lab] section of a profile file ({} if it has none)."""
    path = Path(path)
    lines = [ln[len(LAB_PREFIX):] if ln.startswith(LAB_PREFIX) else "" for ln in path.read_text().splitlines()
             if ln.startswith(LAB_PREFIX) or ln.strip() == LAB_PREFIX.strip()]
    if not lines:
        return {}
    try:
        return dict(tomllib.loads("\n".join(lines)).get("lab", {}))
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: the [lab] section cannot be parsed: {e}") from None


def load_profile(path: str | Path | None) -> tuple[CalibrationProfile, dict]:
    """(profile, lab section) of a profile file; (DEFAULT_PROFILE, {}) for None.

    A name that is no file but a cost preset (thpcow.machine.cost_presets) gives
    the preset, and ``auto`` the profile cost_presets.select() picks for this
    machine; neither has a lab section, except a cached profile.
    """
    from ..machine import cost_presets

    if path is None:
        return DEFAULT_PROFILE, {}
    if not Path(path).exists() and str(path) in cost_presets.PRESETS:
        return cost_presets.PRESETS[str(path)], {}
    if not Path(path).exists() and str(path) == "auto":
        choice = cost_presets.select()
        return choice.profile, (read_lab_section(choice.path) if choice.path is not None else {})
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such profile file or cost preset (presets: "
                         f"{', '.join(cost_presets.PRESETS)}, or auto)")
    profile = CalibrationProfile.load(path)
    return profile, (read_lab_section(path) if path.suffix != ".json" else {})


def lab_extras(lab: Mapping) -> dict[str, float]:
    """The extra costs validate needs: a profile's [lab] extras, else calibration.md's."""
    out = dict(REFERENCE_EXTRAS)
    out.update({k: float(v) for k, v in dict(lab.get("extras", {})).items() if k in REFERENCE_EXTRAS})
    return out


def random_model(lab: Mapping) -> RandomReadModel:
    """The random-read model of a profile's [lab] section, else the one fitted to calibration.md."""
    m = dict(lab.get("random_reads", {})).get("model")
    return RandomReadModel.from_dict(m) if m else reference_random_model()


def profile_rows(result: CalibrationResult, reference: CalibrationProfile = DEFAULT_PROFILE) -> Iterator[dict]:
    """One row per measured figure: name, profile field, median/min/max ns, reference ns, n."""
    for name, (what, per, fld) in FIGURES.items():
        f = result.figures.get(name)
        if f is None or not (f.runs or f.dropped):
            continue
        ref = getattr(reference, fld) if fld else None
        if ref is None and f"{name}_ns" in REFERENCE_EXTRAS:
            ref = REFERENCE_EXTRAS[f"{name}_ns"]
        yield {"figure": name, "field": fld, "what": what, "per": per, "n": f.n, "median_ns": f.median,
               "min_ns": f.min, "max_ns": f.max, "reference_ns": ref, "repeats": len(f.runs),
               "dropped": len(f.dropped)}
