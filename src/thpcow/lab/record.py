"""Record which pages a real process writes, and when, as a trace the simulator replays.

The trace format is :mod:`thpcow.workloads.trace`'s (time_ns, pid, op, address, length, arg).
The recorder traces a command it starts (or a running pid) with ptrace: fork, vfork, exec and exit
events stop the tracee, so that every process is set up before it runs and read once more before
it exits.  Between events the tracees run freely; every ``interval`` the recorder reads their
anonymous private VMAs (/proc/PID/smaps: new ones become ``mmap`` rows, vanished ones ``munmap``
rows, VM_HUGEPAGE/VM_NOHUGEPAGE ``madvise`` rows) and which pages were written since the last read.

Two methods tell the written pages:

``uffd-wp`` (Linux 6.7+: UFFD_FEATURE_WP_ASYNC and the PAGEMAP_SCAN ioctl)
    Each traced process gets a userfaultfd that it creates itself (one injected system call,
    :mod:`thpcow.lab.ptrace`); the recorder takes a copy of it (pidfd_getfd) and registers the
    process's anonymous VMAs in write-protect mode with asynchronous resolution: a write to a
    write-protected page only clears the page's uffd-wp bit, the process never waits.  Each
    interval one PAGEMAP_SCAN with PM_SCAN_WP_MATCHING lists the written pages and write-protects
    them again, atomically.  Exact per interval for pages mapped by PTEs.  A PMD-mapped THP would
    be split by the kernel on its first write after write-protection (an async uffd-wp fault on a
    PMD falls back to PTEs), so THPs are write-protected only at a fork, when both processes share
    them and the first write splits them anyway (COW).  Until then a PMD-mapped THP is recorded
    once, as a write of all its 2 MiB, when it appears (its fault).  When the last traced child of
    a process has exited, its THPs are write-protected no longer.
``pagemap`` (any kernel with /proc/PID/pagemap; PFNs need CAP_SYS_ADMIN)
    Each interval the pagemap of every anonymous VMA is compared with the previous one: a page
    that became present, or whose PFN changed (a COW copy), was written; a page that became
    present on the zero page was read.  It misses writes to pages that were already present and
    stayed where they were (a page written twice; writes to a page the process owns alone), so
    it suits COW accounting (every COW changes a PFN) and not write counts.

Closing the recorder's userfaultfd copies unregisters the VMAs and clears every uffd-wp bit (the
kernel's userfaultfd release), so nothing of the recording stays in a process; every tracee is
detached, also on Ctrl-C.  Threads (CLONE_VM) are not traced: a fork made by a thread other than
the main one is not seen.  A vfork child runs untraced (it shares its parent's mm until it execs,
so its writes are the parent's).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import procfs
from . import ptrace as pt

METHODS = ("uffd-wp", "pagemap")

# userfaultfd (include/uapi/linux/userfaultfd.h)
UFFD_API = 0xAA
UFFD_USER_MODE_ONLY = 1
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13        # v6.4; the PAGEMAP_SCAN walk needs it for anonymous VMAs
UFFD_FEATURE_WP_ASYNC = 1 << 15              # v6.7
UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0


def _iowr(nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (UFFD_API << 8) | nr


UFFDIO_API = _iowr(0x3F, 24)
UFFDIO_REGISTER = _iowr(0x00, 32)
UFFDIO_WRITEPROTECT = _iowr(0x06, 24)

PM_SCAN_WP_MATCHING = 1 << 0
PM_SCAN_CHECK_WPASYNC = 1 << 1

_O_CLOEXEC = 0o2000000
_O_NONBLOCK = 0o4000
_OPTIONS = pt.PTRACE_O_TRACEFORK | pt.PTRACE_O_TRACEVFORK | pt.PTRACE_O_TRACEEXEC | pt.PTRACE_O_TRACEEXIT
_TASK_TOP = 1 << 47                          # x86-64 user space (4-level): [vsyscall] lies above


class RecordError(Exception):
    """The recording could not start or continue; the message says why (one line)."""


class _UffdioApi(ctypes.Structure):
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class _UffdioRegister(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("ioctls", ctypes.c_uint64)]


class _UffdioWriteprotect(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64), ("mode", ctypes.c_uint64)]




# ---------------------------------------------------------------------------------------------
# Pure helpers: page runs, replay-friendly mappings, rows (tested without a kernel)
# ---------------------------------------------------------------------------------------------

def page_runs(addrs: np.ndarray, page: int = procfs.PAGE_SIZE) -> list[tuple[int, int]]:
    """Sorted distinct page addresses as [start, end) runs of adjacent pages."""
    a = np.unique(np.asarray(addrs, dtype=np.uint64)) // np.uint64(page)
    return [(int(a[i]) * page, int(a[j - 1] + 1) * page) for i, j in procfs.cont_ranges(a)]


def merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """[start, end) ranges, sorted, with touching or overlapping ones joined."""
    out: list[list[int]] = []
    for s, e in sorted(ranges):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def subtract(ranges: list[tuple[int, int]], minus: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of ``ranges`` (merged) not covered by ``minus``."""
    out = []
    cut = merge_ranges(minus)
    for s, e in merge_ranges(ranges):
        pos = s
        for cs, ce in cut:
            if ce <= pos or cs >= e:
                continue
            if cs > pos:
                out.append((pos, cs))
            pos = max(pos, ce)
        if pos < e:
            out.append((pos, e))
    return out


def covered(s: int, e: int, ranges: list[tuple[int, int]]) -> bool:
    """Is [s, e) inside the union of ``ranges``?"""
    return not subtract([(s, e)], ranges)


def replay_pieces(start: int, end: int, pmd: int) -> list[tuple[int, int]]:
    """[start, end) as the mappings of a trace: the PMD-aligned middle (whole PMDs) a mapping of its
    own, the unaligned head and tail others.  The replay places each mapping where the simulated
    kernel puts it and a whole-PMD-multiple mapping is PMD aligned there, so the middle keeps its
    THP alignment."""
    lo = -(-start // pmd) * pmd
    hi = end // pmd * pmd
    if hi - lo < pmd:
        return [(start, end)]
    return [(s, e) for s, e in ((start, lo), (lo, hi), (hi, end)) if e > s]


def clip_rows(ranges: list[tuple[int, int]], mappings: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of ``ranges`` inside ``mappings``, cut at mapping boundaries (a trace row lies in
    one mapping); parts outside every mapping are dropped."""
    out = []
    for s, e in merge_ranges(ranges):
        for ms, me in mappings:
            a, b = max(s, ms), min(e, me)
            if a < b:
                out.append((a, b))
    return sorted(out)


@dataclass
class TraceRows:
    """The rows of a trace in the order recorded: (time_ns, pid, op, address, length, arg)."""

    rows: list[tuple] = field(default_factory=list)

    def add(self, t: int, pid: int, op: str, addr: int = 0, length: int = 0, arg: str | int = "") -> None:
        """Append one row (time never goes back: a late row takes the last row's time)."""
        if self.rows and t < self.rows[-1][0]:
            t = self.rows[-1][0]
        self.rows.append((int(t), int(pid), op, int(addr), int(length), str(arg)))

    def writes(self, t: int, pid: int, op: str, ranges: list[tuple[int, int]],
               mappings: list[tuple[int, int]]) -> int:
        """Rows ``op`` (write/read) for ``ranges`` cut at ``mappings``; the bytes they cover."""
        n = 0
        for s, e in clip_rows(ranges, mappings):
            self.add(t, pid, op, s, e - s)
            n += e - s
        return n


# ---------------------------------------------------------------------------------------------
# userfaultfd and PAGEMAP_SCAN on another process
# ---------------------------------------------------------------------------------------------

def uffd_api(fd: int) -> None:
    """UFFDIO_API with WP_ASYNC | WP_UNPOPULATED (RecordError if the kernel lacks them)."""
    want = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED
    arg = _UffdioApi(UFFD_API, want, 0)
    try:
        fcntl.ioctl(fd, UFFDIO_API, arg)
    except OSError as exc:
        raise RecordError(f"userfaultfd: UFFDIO_API with WP_ASYNC|WP_UNPOPULATED refused ({exc.strerror}): "
                          "the uffd-wp method needs Linux 6.7+ (use --method pagemap)") from None


def uffd_register_wp(fd: int, start: int, end: int) -> bool:
    """UFFDIO_REGISTER [start, end) in write-protect mode; False if the range is gone or refused."""
    try:
        fcntl.ioctl(fd, UFFDIO_REGISTER, _UffdioRegister(start, end - start, UFFDIO_REGISTER_MODE_WP, 0))
        return True
    except OSError:
        return False


def uffd_writeprotect(fd: int, start: int, end: int, wp: bool) -> None:
    """UFFDIO_WRITEPROTECT [start, end) on (wp) or off; a vanished range is ignored."""
    try:
        fcntl.ioctl(fd, UFFDIO_WRITEPROTECT,
                    _UffdioWriteprotect(start, end - start, UFFDIO_WRITEPROTECT_MODE_WP if wp else 0))
    except OSError:
        pass


class Scanner:
    """PAGEMAP_SCAN on one process's /proc/PID/pagemap, with a reusable output vector."""

    def __init__(self, pid: int, nvec: int = 8192):
        self.path = f"/proc/{pid}/pagemap"
        self.fd = os.open(self.path, os.O_RDONLY)
        self.nvec = nvec
        self.vec = (procfs.PageRegion * nvec)()

    def close(self) -> None:
        """Close the pagemap file."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def scan(self, start: int, end: int, flags: int, mask: int, inverted: int = 0,
             ret: int = 0, anyof: int = 0) -> list[tuple[int, int, int]]:
        """(start, end, categories & ret) of the pages of [start, end) matching ``mask`` (after
        ``inverted``) and one of ``anyof``; with PM_SCAN_WP_MATCHING in ``flags`` they are
        write-protected too."""
        out: list[tuple[int, int, int]] = []
        pos = start
        while pos < end:
            arg = procfs.PmScanArg(size=ctypes.sizeof(procfs.PmScanArg), flags=flags, start=pos, end=end,
                             vec=ctypes.addressof(self.vec), vec_len=self.nvec, category_inverted=inverted,
                             category_mask=mask, category_anyof_mask=anyof, return_mask=ret or mask)
            try:
                n = fcntl.ioctl(self.fd, procfs.PAGEMAP_SCAN, arg)
            except OSError as exc:
                if exc.errno == errno.ESRCH:
                    return out
                raise RecordError(f"{self.path}: PAGEMAP_SCAN: {exc.strerror}") from None
            v = self.vec
            out += [(int(v[i].start), int(v[i].end), int(v[i].categories)) for i in range(n)]
            if arg.walk_end <= pos or arg.walk_end >= end:
                break
            pos = int(arg.walk_end)
        return out


# ---------------------------------------------------------------------------------------------
# The processes being recorded
# ---------------------------------------------------------------------------------------------

@dataclass
class _Vma:
    start: int
    end: int
    flags: list[str]


def anon_vmas(pid: int) -> list[_Vma]:
    """The anonymous private VMAs of ``pid`` (heap, stack, anonymous mmaps), from smaps."""
    out = []
    for v in procfs.read_smaps(pid):
        if v.inode or v.perms[3] != "p" or v.start >= _TASK_TOP:
            continue
        if v.name and v.name not in ("[heap]", "[stack]") and not v.name.startswith("[anon"):
            continue
        out.append(_Vma(v.start, v.end, v.vm_flags))
    return out


@dataclass
class Tracee:
    """One recorded process."""

    pid: int
    parent: int | None = None
    mappings: list[tuple[int, int]] = field(default_factory=list)    # the trace's mappings, sorted
    advised: dict[tuple[int, int], str] = field(default_factory=dict)  # VMA -> advice recorded
    uffd: int = -1
    scanner: Scanner | None = None
    huge_seen: dict[int, int] = field(default_factory=dict)            # PMD address -> PFN recorded
    snapshot: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)   # pagemap method
    children: set[int] = field(default_factory=set)
    stopped: bool = False
    started: bool = False             # its first stop (the auto-attach stop of a fork child) was seen
    vfork_child: bool = False
    exited: bool = False              # its exit row is written

    def close(self) -> None:
        """Drop the userfaultfd copy (the kernel unregisters and un-write-protects) and pagemap."""
        if self.scanner is not None:
            self.scanner.close()
            self.scanner = None
        if self.uffd >= 0:
            os.close(self.uffd)
            self.uffd = -1


@dataclass
class RecordSummary:
    """What a recording saw."""

    rows: int
    pids: int
    forks: int
    written_bytes: int
    read_bytes: int
    duration_ns: int
    scans: int
    scan_ns_median: float
    method: str
    exit_status: int | None = None
    interrupted: bool = False

    def to_dict(self) -> dict:
        """The summary as a plain dict."""
        return dict(self.__dict__)


def method_supported(method: str) -> tuple[bool, str]:
    """Can ``method`` record on this kernel?  (ok, reason)."""
    if method not in METHODS:
        return False, f"unknown method {method!r}: expected one of {', '.join(METHODS)}"
    ok, why = pt.supported()
    if not ok:
        return False, why
    if os.geteuid() != 0:
        return False, "recording needs root (ptrace of any process, PFNs in pagemap)"
    if method == "pagemap":
        return True, ""
    if procfs.pagemap_scan("self", 0, procfs.PAGE_SIZE, procfs.PAGE_IS_PRESENT) is None:
        return False, "this kernel has no PAGEMAP_SCAN ioctl (Linux 6.7+): use --method pagemap"
    try:
        fd = pt.syscall(pt.SYS_userfaultfd, _O_CLOEXEC | _O_NONBLOCK | UFFD_USER_MODE_ONLY)
    except OSError as exc:
        return False, f"userfaultfd() refused ({exc.strerror}): use --method pagemap"
    try:
        uffd_api(fd)
    except RecordError as exc:
        return False, str(exc)
    finally:
        os.close(fd)
    return True, ""


class Recorder:
    """Record the anonymous memory writes of a process tree (see the module docstring)."""

    def __init__(self, method: str = "uffd-wp", interval_ms: float = 10.0,
                 progress: Callable[[str], None] | None = None):
        if method not in METHODS:
            raise ValueError(f"method={method!r}: expected one of {', '.join(METHODS)}")
        if not interval_ms > 0:
            raise ValueError(f"interval_ms={interval_ms}: must be > 0")
        self.method = method
        self.interval_ns = int(interval_ms * 1e6)
        self.progress = progress
        self.pmd = procfs.hpage_pmd_size()
        self.page = procfs.PAGE_SIZE
        self.trace = TraceRows()
        self.tracees: dict[int, Tracee] = {}
        self.pending_stops: dict[int, int] = {}     # a fork child's first stop seen before its fork event
        self.t0 = time.monotonic_ns()
        self.insn: dict[int, int] = {}
        self.scan_ns: list[int] = []
        self.forks = 0
        self.written = 0
        self.read = 0
        self.root_pid: int | None = None
        self.exit_status: int | None = None
        self.zero_pfns: set[int] = set()

    # -- time and rows ------------------------------------------------------------------------

    def now(self) -> int:
        """ns since the recording started."""
        return time.monotonic_ns() - self.t0

    # -- set-up of one process -----------------------------------------------------------------

    def _setup_uffd(self, tr: Tracee) -> None:
        """Inject userfaultfd() into the stopped tracee, take a copy, close its own; UFFDIO_API."""
        insn = pt.find_syscall_insn(tr.pid)
        fd = pt.inject_syscall(tr.pid, insn, pt.SYS_userfaultfd, _O_CLOEXEC | _O_NONBLOCK | UFFD_USER_MODE_ONLY)
        try:
            tr.uffd = pt.steal_fd(tr.pid, fd)
        finally:
            pt.inject_syscall(tr.pid, insn, pt.SYS_close, fd)
        uffd_api(tr.uffd)

    def _open(self, tr: Tracee) -> None:
        """Per-process state for the method (the tracee is stopped, in its current mm)."""
        tr.close()
        if self.method == "uffd-wp":
            self._setup_uffd(tr)
            tr.scanner = Scanner(tr.pid)

    # -- one look at a process -----------------------------------------------------------------

    def update(self, tr: Tracee, record: bool = True) -> None:
        """Read ``tr``'s VMAs and written pages; rows unless ``record`` is False (the baseline of a
        fork child, whose memory is its parent's)."""
        if tr.exited:
            return
        t = self.now()
        try:
            vmas = anon_vmas(tr.pid)
        except procfs.LabError:
            return                                              # gone meanwhile
        spans = merge_ranges([(v.start, v.end) for v in vmas])
        # munmap: a mapping of the trace that is no longer all there
        keep = []
        for m in tr.mappings:
            if covered(m[0], m[1], spans):
                keep.append(m)
                continue
            if record:
                self.trace.add(t, tr.pid, "munmap", m[0], m[1] - m[0])
            tr.snapshot.pop(m, None)
            for key in [k for k in tr.advised if k[0] < m[1] and k[1] > m[0]]:
                del tr.advised[key]                     # a part that stays is mapped (and advised) anew
        tr.mappings = keep
        # mmap: what the trace has no mapping for yet, VMA by VMA (a neighbour that goes later
        # must not take this one's mapping with it)
        for v in vmas:
            for s, e in subtract([(v.start, v.end)], tr.mappings):
                for piece in replay_pieces(s, e, self.pmd):
                    if record:
                        self.trace.add(t, tr.pid, "mmap", piece[0], piece[1] - piece[0])
                    tr.mappings.append(piece)
            tr.mappings.sort()
        # madvise: VM_HUGEPAGE / VM_NOHUGEPAGE as smaps shows them
        for v in vmas:
            advice = "hugepage" if "hg" in v.flags else "nohugepage" if "nh" in v.flags else ""
            key = (v.start, v.end)
            if advice and tr.advised.get(key) != advice:
                if record:
                    for s, e in clip_rows([key], tr.mappings):
                        self.trace.add(t, tr.pid, "madvise", s, e - s, advice)
                tr.advised[key] = advice
        if self.method == "uffd-wp":
            for v in vmas:
                if "uw" not in v.flags:
                    uffd_register_wp(tr.uffd, v.start, v.end)
            self._scan_uffd(tr, spans, record)
        else:
            self._scan_pagemap(tr, record)

    def _scan_uffd(self, tr: Tracee, spans: list[tuple[int, int]], record: bool) -> None:
        if not spans or tr.scanner is None:
            return
        lo, hi = spans[0][0], spans[-1][1]
        c0 = time.perf_counter_ns()
        P = procfs
        ret = P.PAGE_IS_WRITTEN | P.PAGE_IS_PFNZERO | P.PAGE_IS_HUGE
        # Pages mapped by PTEs: list the written ones and write-protect them again, atomically.
        # A hole (no page table yet) reads as written too (Linux 6.18): present-or-swapped keeps
        # holes out, which matters: write-protecting a hole installs PTE markers in a new page
        # table, and a fault there can no longer get a THP.
        here = P.PAGE_IS_PRESENT | P.PAGE_IS_SWAPPED
        small = tr.scanner.scan(lo, hi, PM_SCAN_WP_MATCHING,
                                P.PAGE_IS_WRITTEN | P.PAGE_IS_WPALLOWED | P.PAGE_IS_HUGE,
                                inverted=P.PAGE_IS_HUGE, ret=ret, anyof=here)
        # PMD-mapped THPs not write-protected: listed, left alone (see the module docstring)
        huge = tr.scanner.scan(lo, hi, 0, P.PAGE_IS_WRITTEN | P.PAGE_IS_WPALLOWED | P.PAGE_IS_HUGE, ret=ret,
                               anyof=here)
        self.scan_ns.append(time.perf_counter_ns() - c0)
        t = self.now()
        writes = [(s, e) for s, e, c in small if not c & P.PAGE_IS_PFNZERO]
        reads = [(s, e) for s, e, c in small if c & P.PAGE_IS_PFNZERO]
        new_huge = []
        if huge:
            fd = os.open(f"/proc/{tr.pid}/pagemap", os.O_RDONLY)
            try:
                for s, e, c in huge:
                    for a in range(s - s % self.pmd, e, self.pmd):
                        ent = int.from_bytes(os.pread(fd, 8, a // self.page * 8), "little")
                        pfn = ent & procfs.PM_PFRAME_MASK if ent & procfs.PM_PRESENT else 0
                        if tr.huge_seen.get(a) != pfn:
                            tr.huge_seen[a] = pfn
                            (reads if c & P.PAGE_IS_PFNZERO else new_huge).append((a, a + self.pmd))
            except OSError:
                pass
            finally:
                os.close(fd)
        if record:
            self.read += self.trace.writes(t, tr.pid, "read", reads, tr.mappings)
            self.written += self.trace.writes(t, tr.pid, "write", writes + new_huge, tr.mappings)

    def _wp_huge(self, tr: Tracee, wp: bool) -> None:
        """Write-protect (or not) every PMD-mapped THP of ``tr`` that is (or is not) already."""
        if tr.scanner is None:
            return
        P = procfs
        try:
            spans = merge_ranges([(v.start, v.end) for v in anon_vmas(tr.pid)])
        except procfs.LabError:
            return
        if not spans:
            return
        lo, hi = spans[0][0], spans[-1][1]
        mask = P.PAGE_IS_WPALLOWED | P.PAGE_IS_HUGE | P.PAGE_IS_PRESENT | P.PAGE_IS_WRITTEN
        inv = P.PAGE_IS_PFNZERO if wp else P.PAGE_IS_PFNZERO | P.PAGE_IS_WRITTEN
        for s, e, _c in tr.scanner.scan(lo, hi, 0, mask | P.PAGE_IS_PFNZERO, inverted=inv):
            uffd_writeprotect(tr.uffd, s, e, wp)

    def _scan_pagemap(self, tr: Tracee, record: bool) -> None:
        c0 = time.perf_counter_ns()
        t = None
        writes, reads = [], []
        for m in tr.mappings:
            try:
                ent = procfs.read_pagemap(tr.pid, m[0], (m[1] - m[0]) // self.page)
            except procfs.LabError:
                return
            pfn = procfs.pagemap_pfn(ent)
            old = tr.snapshot.get(m)
            tr.snapshot[m] = pfn
            if old is None:
                old = np.zeros_like(pfn)
            changed = (pfn != 0) & (pfn != old)
            if not changed.any():
                continue
            idx = np.flatnonzero(changed)
            zero = self._is_zero(pfn[idx])
            base = np.uint64(m[0])
            step = np.uint64(self.page)
            writes += page_runs(base + idx[~zero].astype(np.uint64) * step)
            reads += page_runs(base + idx[zero].astype(np.uint64) * step)
        self.scan_ns.append(time.perf_counter_ns() - c0)
        if record:
            t = self.now()
            self.read += self.trace.writes(t, tr.pid, "read", reads, tr.mappings)
            self.written += self.trace.writes(t, tr.pid, "write", writes, tr.mappings)

    def _is_zero(self, pfns: np.ndarray) -> np.ndarray:
        """Which PFNs are the zero page or the huge zero page (kpageflags KPF_ZERO_PAGE)."""
        if pfns.size == 0:
            return np.zeros(0, dtype=bool)
        known = np.isin(pfns, np.fromiter(self.zero_pfns, dtype=np.uint64, count=len(self.zero_pfns)))
        rest = np.unique(pfns[~known])
        if rest.size:
            flags = procfs.read_kpageflags(rest)
            for p in rest[procfs.kpf_test(flags, procfs.KPF_ZERO_PAGE)]:
                self.zero_pfns.add(int(p))
            known = np.isin(pfns, np.fromiter(self.zero_pfns, dtype=np.uint64, count=len(self.zero_pfns)))
        return known

    # -- events -------------------------------------------------------------------------------

    def _attach_first(self, pid: int, at_exec: bool) -> None:
        """Set up the first process (stopped) and record its current memory as written."""
        tr = Tracee(pid)
        tr.started = True
        tr.stopped = True
        self.tracees[pid] = tr
        if at_exec:
            pt.step(pid)
        self._open(tr)
        self.update(tr)

    def _on_fork(self, parent: Tracee, child_pid: int, vfork: bool) -> None:
        """The parent is stopped at its fork event: read it, add the fork row, set up the child."""
        child = Tracee(child_pid, parent=parent.pid, vfork_child=vfork)
        self.tracees[child_pid] = child
        if vfork:                                      # untraced: detached at its first stop
            if self.pending_stops.pop(child_pid, None) is not None:
                self.tracees.pop(child_pid, None)
                try:
                    pt.detach(child_pid)
                except OSError:
                    pass
            return
        self.update(parent)
        self.forks += 1
        self.trace.add(self.now(), parent.pid, "fork", 0, 0, child_pid)
        child.mappings = list(parent.mappings)
        child.advised = dict(parent.advised)
        child.huge_seen = dict(parent.huge_seen)
        child.snapshot = {m: a.copy() for m, a in parent.snapshot.items()}
        parent.children.add(child_pid)
        self._wait_first_stop(child)
        self._open(child)
        self.update(child, record=False)               # baseline: what it inherited is not its write
        if self.method == "uffd-wp":
            self._wp_huge(child, True)
            self._wp_huge(parent, True)
        if self.method == "pagemap":
            # the parent's next COW copies show as new PFNs against its own snapshot: nothing to do
            pass

    def _wait_first_stop(self, tr: Tracee) -> None:
        if tr.pid in self.pending_stops:
            self.pending_stops.pop(tr.pid)
        else:
            while True:
                status = pt.wait_stop(tr.pid)
                if os.WIFSTOPPED(status):
                    break
        tr.started = True
        tr.stopped = True

    def _on_exit_event(self, tr: Tracee) -> None:
        """The tracee is stopped before its mm goes: read it one last time, add the exit row."""
        self.update(tr)
        self.trace.add(self.now(), tr.pid, "exit")
        tr.exited = True
        tr.close()

    def _gone(self, pid: int) -> None:
        tr = self.tracees.pop(pid, None)
        if tr is None:
            return
        tr.close()
        if tr.parent in self.tracees:
            par = self.tracees[tr.parent]
            par.children.discard(pid)
            if not par.children and self.method == "uffd-wp" and par.scanner is not None:
                self._wp_huge(par, False)              # its THPs are its own again

    def _resume(self, tr: Tracee, sig: int = 0) -> None:
        try:
            pt.cont(tr.pid, sig)
            tr.stopped = False
        except OSError:
            pass

    def handle(self, pid: int, status: int) -> None:
        """One wait status of a tracee."""
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            if pid == self.root_pid:
                self.exit_status = os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)
            tr = self.tracees.get(pid)
            if tr is not None and tr.started and not tr.exited and not tr.vfork_child:
                self.trace.add(self.now(), pid, "exit")
            self._gone(pid)
            return
        if not os.WIFSTOPPED(status):
            return
        tr = self.tracees.get(pid)
        if tr is None or not tr.started:
            if tr is None:                              # a fork child's stop before its parent's event
                self.pending_stops[pid] = status
                return
            tr.started = True
            if tr.vfork_child:
                self.tracees.pop(pid, None)
                try:
                    pt.detach(pid)
                except OSError:
                    pass
                return
            return
        tr.stopped = True
        sig = os.WSTOPSIG(status)
        event = status >> 16
        if sig == signal.SIGTRAP and event in (pt.PTRACE_EVENT_FORK, pt.PTRACE_EVENT_VFORK):
            child = pt.event_msg(pid)
            self._on_fork(tr, child, event == pt.PTRACE_EVENT_VFORK)
            child_tr = self.tracees.get(child)
            if child_tr is not None and not child_tr.vfork_child:
                self._resume(child_tr)
            self._resume(tr)
        elif sig == signal.SIGTRAP and event == pt.PTRACE_EVENT_EXEC:
            t = self.now()
            for m in tr.mappings:
                self.trace.add(t, pid, "munmap", m[0], m[1] - m[0])
            tr.mappings, tr.advised, tr.huge_seen, tr.snapshot = [], {}, {}, {}
            pt.step(pid)
            self._open(tr)
            self.update(tr)
            self._resume(tr)
        elif sig == signal.SIGTRAP and event == pt.PTRACE_EVENT_EXIT:
            self._on_exit_event(tr)
            self._resume(tr)
        elif event == pt.PTRACE_EVENT_STOP:
            if sig in (signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU):
                try:
                    pt.listen(pid)                       # a group stop: stay stopped as without us
                    tr.stopped = False
                except OSError:
                    pass
            else:
                self._resume(tr)
        else:
            self._resume(tr, sig)                        # a signal for the tracee: deliver it

    def poll_events(self) -> None:
        """Handle every wait status ready now."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG | pt.WALL)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.handle(pid, status)

    # -- running ------------------------------------------------------------------------------

    def spawn(self, argv: list[str]) -> int:
        """Start ``argv`` (PATH searched) traced from its exec on; its pid."""
        go_r, go_w = os.pipe()
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:                                    # the command: wait to be seized, then exec
            try:
                os.close(go_w)
                os.close(err_r)
                os.read(go_r, 1)
                os.close(go_r)
                os.execvp(argv[0], argv)
            except OSError as exc:
                os.write(err_w, (exc.strerror or str(exc)).encode())
            finally:
                os._exit(127)
        os.close(go_r)
        os.close(err_w)
        self.root_pid = pid
        self._started = pid
        try:
            pt.seize(pid, _OPTIONS)
        finally:
            os.write(go_w, b"x")
            os.close(go_w)
        try:
            while True:
                status = pt.wait_stop(pid)
                if os.WIFSTOPPED(status) and (status >> 16) == pt.PTRACE_EVENT_EXEC:
                    break
                pt.cont(pid, 0 if os.WSTOPSIG(status) == signal.SIGTRAP else os.WSTOPSIG(status))
        except pt.PtraceError:
            why = os.read(err_r, 512).decode(errors="replace") or "it exited before its exec"
            raise RecordError(f"cannot run {argv[0]}: {why}") from None
        finally:
            os.close(err_r)
        self.t0 = time.monotonic_ns()
        self._attach_first(pid, at_exec=True)
        pt.cont(pid)
        self.tracees[pid].stopped = False
        return pid

    def attach(self, pid: int) -> None:
        """Trace the running process ``pid`` (its memory now is recorded as written at time 0)."""
        try:
            pt.seize(pid, _OPTIONS)
            pt.interrupt(pid)
            while True:
                status = pt.wait_stop(pid)
                if os.WIFSTOPPED(status) and (status >> 16) == pt.PTRACE_EVENT_STOP:
                    break
                pt.cont(pid, os.WSTOPSIG(status))
        except OSError as exc:
            raise RecordError(f"pid {pid}: cannot trace it: {exc.strerror}") from None
        self.t0 = time.monotonic_ns()
        self._attach_first(pid, at_exec=False)
        pt.cont(pid)
        self.tracees[pid].stopped = False

    def run(self, duration_s: float | None = None) -> None:
        """Record until every tracee has exited (or ``duration_s`` passed)."""
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        try:
            next_scan = self.now() + self.interval_ns
            end = None if duration_s is None else self.now() + int(duration_s * 1e9)
            last_progress = 0
            while self.tracees:
                self.poll_events()
                now = self.now()
                if now >= next_scan:
                    for tr in list(self.tracees.values()):
                        if tr.started and not tr.vfork_child:
                            self.update(tr)
                    next_scan = max(next_scan + self.interval_ns, self.now())
                    if self.progress and now - last_progress > 1e9:
                        last_progress = now
                        self.progress(f"{now / 1e9:.1f} s, {len(self.trace.rows)} rows, "
                                      f"{len(self.tracees)} processes, {self.written >> 20} MiB written")
                if end is not None and now >= end:
                    break
                wait = max(0.0, (next_scan - self.now()) / 1e9)
                signal.sigtimedwait([signal.SIGCHLD], min(wait, 0.002))
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)

    def close(self, kill_started: bool = False) -> None:
        """Stop recording: unregister (close the userfaultfds) and detach every tracee; with
        ``kill_started`` the command this recorder started (and its traced children) is killed."""
        for tr in list(self.tracees.values()):
            tr.close()
        for pid, tr in list(self.tracees.items()):
            try:
                if not tr.stopped:
                    pt.interrupt(pid)
                    while True:
                        st = pt.wait_stop(pid)
                        if os.WIFSTOPPED(st):
                            break
                pt.detach(pid)
            except OSError:
                pass
        if kill_started:
            for pid in list(self.tracees):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        started = getattr(self, "_started", None)
        if started is not None and kill_started:
            try:
                os.kill(started, signal.SIGKILL)
                os.waitpid(started, 0)
            except OSError:
                pass
        self.tracees.clear()

    def summary(self) -> RecordSummary:
        """The recording's summary."""
        rows = self.trace.rows
        return RecordSummary(
            rows=len(rows), pids=len({r[1] for r in rows}), forks=self.forks,
            written_bytes=self.written, read_bytes=self.read,
            duration_ns=rows[-1][0] if rows else 0, scans=len(self.scan_ns),
            scan_ns_median=float(np.median(self.scan_ns)) if self.scan_ns else 0.0,
            method=self.method, exit_status=self.exit_status)


def record(argv: list[str] | None = None, pid: int | None = None, out: str | None = None,
           method: str = "uffd-wp", interval_ms: float = 10.0, duration_s: float | None = None,
           progress: Callable[[str], None] | None = None) -> tuple[list[tuple], RecordSummary]:
    """Record ``argv`` (started here) or the running ``pid``; write the trace to ``out`` if given.
    Returns (rows, summary).  RecordError for what stops the recording (one line).  Ctrl-C ends
    the recording: the trace holds what was recorded until then (``summary.interrupted``), the
    command started here is killed, a ``pid`` is left running, untraced."""
    ok, why = method_supported(method)
    if not ok:
        raise RecordError(why)
    rec = Recorder(method, interval_ms, progress)
    started = argv is not None
    interrupted = False
    try:
        if started:
            rec.spawn(argv)
        else:
            if pid is None or not os.path.exists(f"/proc/{pid}"):
                raise RecordError(f"pid {pid}: no such process")
            rec.attach(pid)
        rec.run(duration_s)
    except KeyboardInterrupt:
        interrupted = True
    except pt.PtraceError as exc:
        raise RecordError(str(exc)) from None
    finally:
        rec.close(kill_started=started)
    if out:
        from ..workloads.trace import write_trace
        write_trace(out, rec.trace.rows)
    summary = rec.summary()
    summary.interrupted = interrupted
    return rec.trace.rows, summary


# ---------------------------------------------------------------------------------------------
# Replay on the simulator
# ---------------------------------------------------------------------------------------------

def rows_in_range(rows: list[tuple], start: int, end: int) -> list[tuple]:
    """The rows of a trace that concern [start, end): mmap/munmap/madvise/write/read rows that lie
    in it (cut to it), and every fork and exit row.  A mapping that straddles the range becomes the
    part inside it, so the replay sees this memory alone (e.g. one region of a program)."""
    out = []
    for t, pid, op, addr, length, *arg in rows:
        if op in ("fork", "exit"):
            out.append((t, pid, op, addr, length, *arg))
            continue
        a, b = max(addr, start), min(addr + length, end)
        if a < b:
            out.append((t, pid, op, a, b - a, *arg))
    return out


def replay(path: str, seed: int = 0, knobs: dict[str, str] | None = None) -> dict:
    """Replay the trace at ``path`` on the simulator (policy upstream, the running kernel's THP
    knobs unless ``knobs``); the summary counters of the run (sim_cow_bytes, thp_split_pmd, ...)."""
    from ..experiments.runner import run_point
    from ..kernel.sysfs import WRITABLE_PATHS

    if knobs is None:
        knobs = {k: v for k, v in procfs.read_thp_knobs().items() if k in WRITABLE_PATHS}
    scenario = {"name": "recorded", "tlb_model": False, "sample_ms": 1.0, "seed": seed, "sysfs": knobs,
                "workload": {"name": "trace", "path": os.path.abspath(path)}, "policies": ["upstream"]}
    res = run_point(scenario, "upstream")
    return {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in res.summary.items()}
