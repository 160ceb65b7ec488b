"""Programs of VMA-level syscalls, run on the simulator and on the running kernel, and a
differential harness over seeded random programs.

A program is a list of steps on a fresh stretch of address space (``base``, 1 GiB aligned; the
offsets are relative to it):

    ("map", lo, hi, prot[, extra mmap flags])   mmap MAP_PRIVATE|MAP_ANONYMOUS|MAP_FIXED_NOREPLACE
    ("touch", lo, hi[, stride])                 store one byte every ``stride`` bytes (4 KiB)
    ("read", lo, hi)                            load one byte every 4 KiB
    ("prot", lo, hi, prot)                      mprotect
    ("unmap", lo, hi)                           munmap
    ("adv", lo, hi, advice)                     madvise
    ("remap", lo, old_len, new_len, flags[, new_lo])   mremap
    ("fork",)                                   the rest runs in a child, whose VMAs are the result
    ("padv", lo, hi, advice)                    after a fork: the parent's process_madvise() on the child
    ("thpoff",)                                 prctl(PR_SET_THP_DISABLE, 1)
    ("forkexit",)                               fork(); the child exits at once, the program goes on

A result is {"rcs": the calls' return values (0, an offset for mremap, or an errno name),
"vmas": the VMAs left in the stretch as rows (start, end, perms, VmFlags the simulator models,
AnonHugePages kB, Rss kB)}; with ``trace=True`` also "trace": per step, the rows after it.
With ``wide=True`` each row also has smaps Referenced (kB) and the counts of the VMA's pages
that pagemap shows present, PM_MMAP_EXCLUSIVE, swapped and guard regions (WIDE_COLUMNS).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import random
import struct
import sys
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..kernel import (
    MADV_COLLAPSE, MADV_HUGEPAGE, MADV_NOHUGEPAGE, MAP_ANONYMOUS, MAP_FIXED_NOREPLACE, MAP_NORESERVE,
    MAP_PRIVATE, MREMAP_DONTUNMAP, MREMAP_FIXED, MREMAP_MAYMOVE, PAGE_SIZE, PROT_NONE, PROT_READ, PROT_WRITE,
    Kernel, KernelError,
)
from ..kernel.constants import (
    MADV_COLD, MADV_DOFORK, MADV_DONTFORK, MADV_DONTNEED, MADV_FREE, MADV_GUARD_INSTALL, MADV_GUARD_REMOVE,
    MADV_PAGEOUT, MADV_WILLNEED, MADV_WIPEONFORK,
    PR_SET_THP_DISABLE, VM_FLAG_MNEMONICS,
)
from . import procfs

K = PAGE_SIZE
M = 1 << 20
G = 1 << 30
PMD = 2 * M
R, RW, NONE = PROT_READ, PROT_READ | PROT_WRITE, PROT_NONE
MAYMOVE, FIXED, DONTUNMAP = MREMAP_MAYMOVE, MREMAP_FIXED, MREMAP_DONTUNMAP
SIM_BASE = 0x7E00_0000_0000            # 1 GiB aligned, far below the simulator's mmap base
__all__ = ["run_sim", "run_real", "run_real_forked", "one_cpu", "random_program", "differential", "shrink",
           "real_kernel_reason", "sim_kernel", "format_program", "DiffSummary", "MAP_NORESERVE"]


def _span(program) -> int:
    """The stretch of address space a program uses, from base."""
    end = 0
    for step in program:
        if step[0] in ("map", "touch", "read", "prot", "unmap", "adv", "padv"):
            end = max(end, step[2])
        elif step[0] == "remap":
            end = max(end, step[1] + max(step[2], step[3]))
            if len(step) > 5:
                end = max(end, step[5] + step[3])
    return -(-(end + M) // M) * M


_MODELLED_FLAGS = {name for _, name in VM_FLAG_MNEMONICS}


WIDE_COLUMNS = ("Referenced kB", "present", "exclusive", "swapped", "guard")
_PM_MASKS = (procfs.PM_PRESENT, procfs.PM_MMAP_EXCLUSIVE, procfs.PM_SWAP, procfs.PM_GUARD_REGION)


def _vma_rows(vmas, base: int, span: int, pagemap: Callable[[int, int], np.ndarray] | None = None) -> list[list]:
    """The VMAs in [base, base + span): offsets, perms, the VmFlags the simulator models, AnonHugePages, Rss;
    with ``pagemap`` (start, npages -> entries) also the WIDE_COLUMNS."""
    rows = []
    for v in vmas:
        if not (v.start < base + span and v.end > base):
            continue
        row = [v.start - base, v.end - base, v.perms, " ".join(f for f in v.vm_flags if f in _MODELLED_FLAGS),
               v.fields.get("AnonHugePages", 0), v.fields.get("Rss", 0)]
        if pagemap is not None:
            lo, hi = max(v.start, base), min(v.end, base + span)
            entries = pagemap(lo, (hi - lo) // K)
            row += [v.fields.get("Referenced", 0)] + [int(np.count_nonzero(entries & np.uint64(m))) for m in _PM_MASKS]
        rows.append(row)
    return rows


def _stride(args) -> int:
    return args[2] if len(args) > 2 else K


# -- the simulator ---------------------------------------------------------------------------------------
def sim_kernel(knobs: dict[str, str] | None = None, ram: int = 1 << 30) -> Kernel:
    """A checked simulated kernel, with the writable THP knobs of ``knobs`` (procfs.read_thp_knobs())."""
    from ..kernel.sysfs import WRITABLE_PATHS

    k = Kernel(ram=ram, check=True)
    for path, value in (knobs or {}).items():
        if path in WRITABLE_PATHS:
            k.sysfs.write(path, value)
    return k


def run_sim(program, k: Kernel | None = None, trace: bool = False, wide: bool = False) -> dict:
    """The program on a simulated kernel (Linux 6.18 as booted, unless ``k`` is given); ``wide``:
    rows with the WIDE_COLUMNS."""
    k = k or Kernel(ram=1 << 30, check=True)
    p = k.spawn()
    parent = None
    base, span = SIM_BASE, _span(program)
    rcs: list = []
    steps: list = []

    def call(fn, *args):
        try:
            r = fn(*args)
        except KernelError as e:
            return errno.errorcode[e.errno]
        return r

    def rows():
        return _vma_rows(procfs.parse_smaps(p.smaps()), base, span, p.pagemap if wide else None)

    for step in program:
        op, *args = step
        if op == "map":
            lo, hi, prot, *extra = args
            flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE | (extra[0] if extra else 0)
            r = call(p.mmap, hi - lo, prot, flags, base + lo)
            rcs.append(0 if r == base + lo else r)
        elif op == "touch":
            p.write_many(base + np.arange(args[0], args[1], _stride(args)), 1)
        elif op == "read":
            p.read_many(base + np.arange(args[0], args[1], K))
        elif op == "prot":
            rcs.append(call(p.mprotect, base + args[0], args[1] - args[0], args[2]) or 0)
        elif op == "unmap":
            rcs.append(call(p.munmap, base + args[0], args[1] - args[0]) or 0)
        elif op == "adv":
            rcs.append(call(p.madvise, base + args[0], args[1] - args[0], args[2]) or 0)
        elif op == "padv":
            if parent is None:
                raise ValueError("padv before fork")
            rcs.append(call(parent.process_madvise, p, base + args[0], args[1] - args[0], args[2]) or 0)
        elif op == "remap":
            lo, old_len, new_len, flags, *new = args
            r = call(p.mremap, base + lo, old_len, new_len, flags, base + new[0] if new else 0)
            rcs.append(r if isinstance(r, str) else r - base)
        elif op == "fork":
            parent, p = p, p.fork()
        elif op == "forkexit":
            p.fork().exit()
        elif op == "thpoff":
            rcs.append(call(p.prctl, PR_SET_THP_DISABLE, 1) or 0)
        else:
            raise ValueError(op)
        if trace:
            steps.append(rows())
    out = {"rcs": rcs, "vmas": rows()}
    if trace:
        out["trace"] = steps
    return out


# -- the running kernel ----------------------------------------------------------------------------------
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.mmap.restype = ctypes.c_void_p
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.syscall.restype = ctypes.c_long
_SYS_MREMAP, _SYS_MADVISE = 25, 28              # x86-64
MAP_FAILED = ctypes.c_void_p(-1).value


def _rc(ret: int) -> int | str:
    return errno.errorcode[ctypes.get_errno()] if ret == -1 else 0


def _syscall(nr: int, *args: int) -> int:
    ctypes.set_errno(0)
    return _libc.syscall(ctypes.c_long(nr), *(ctypes.c_ulong(a & ((1 << 64) - 1)) for a in args))


_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_SYS_PIDFD_OPEN, _SYS_PROCESS_MADVISE = 434, 440
_REQ = struct.Struct("qqq")                     # a padv request: start, length, advice
_NO_RC = ("touch", "read", "fork", "forkexit")  # the steps that return nothing


def _own_pagemap(start: int, npages: int) -> np.ndarray:
    return procfs.read_pagemap(os.getpid(), start, npages)


def _real_steps(program, base: int, span: int, trace: list | None = None, wide: bool = False,
                padv: tuple[int, int] | None = None) -> dict:
    """The steps on this process; ``padv``: the pipes (request, reply) to the parent that
    carries out process_madvise() on this process."""
    rcs: list = []
    pagemap = _own_pagemap if wide else None
    for i, step in enumerate(program):
        op, *args = step
        ctypes.set_errno(0)
        if op == "map":
            lo, hi, prot, *extra = args
            flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE | (extra[0] if extra else 0)
            r = _libc.mmap(base + lo, hi - lo, prot, flags, -1, 0)
            rcs.append(errno.errorcode[ctypes.get_errno()] if r in (None, MAP_FAILED) else
                       (0 if r == base + lo else r - base))
        elif op == "touch":
            for off in range(args[0], args[1], _stride(args)):
                ctypes.c_char.from_address(base + off).value = b"\x01"
        elif op == "read":
            for off in range(args[0], args[1], K):
                ctypes.c_char.from_address(base + off).value
        elif op == "prot":
            rcs.append(_rc(_libc.mprotect(base + args[0], args[1] - args[0], args[2])))
        elif op == "unmap":
            rcs.append(_rc(_libc.munmap(base + args[0], args[1] - args[0])))
        elif op == "adv":
            rcs.append(_rc(_syscall(_SYS_MADVISE, base + args[0], args[1] - args[0], args[2])))
        elif op == "padv":
            if padv is None:
                raise ValueError("padv before fork")
            os.write(padv[0], _REQ.pack(base + args[0], args[1] - args[0], args[2]))
            (r,) = struct.unpack("q", _read_exact(padv[1], 8))
            rcs.append(errno.errorcode[-r] if r < 0 else 0)
        elif op == "remap":
            lo, old_len, new_len, flags, *new = args
            r = _syscall(_SYS_MREMAP, base + lo, old_len, new_len, flags, base + new[0] if new else 0)
            rcs.append(errno.errorcode[ctypes.get_errno()] if r == -1 else (r & ((1 << 64) - 1)) - base)
        elif op == "thpoff":
            rcs.append(_rc(_libc.prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0)))
        elif op == "forkexit":
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
        elif op == "fork":
            if trace is not None:
                trace.append(None)              # the child's VMAs, filled in by _real_fork
            return _real_fork(program[i + 1:], base, span, rcs, trace, wide)
        else:
            raise ValueError(op)
        if trace is not None:
            trace.append(_vma_rows(procfs.read_smaps(os.getpid()), base, span, pagemap))
    out = {"rcs": rcs, "vmas": _vma_rows(procfs.read_smaps(os.getpid()), base, span, pagemap)}
    if trace is not None:
        out["trace"] = trace
    return out


def _read_exact(fd: int, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


def _serve_padv(pid: int, requests: int, replies: int) -> None:
    """The parent's side of "padv": process_madvise() on the child ``pid`` for each request,
    until the child closes its end."""
    pidfd = _syscall(_SYS_PIDFD_OPEN, pid, 0)
    try:
        while len(req := _read_exact(requests, _REQ.size)) == _REQ.size:
            start, length, advice = _REQ.unpack(req)
            iov = (ctypes.c_ulong * 2)(start, length)
            if pidfd < 0:
                r = -errno.ESRCH
            else:
                ret = _syscall(_SYS_PROCESS_MADVISE, pidfd, ctypes.addressof(iov), 1, advice, 0)
                r = -ctypes.get_errno() if ret == -1 else 0
            os.write(replies, struct.pack("q", r))
    finally:
        if pidfd >= 0:
            os.close(pidfd)


def _in_child(fn, serve: bool = False) -> tuple[int, dict | None]:
    """fork(); the child runs ``fn()`` (``fn(padv_pipes)`` with ``serve``) and sends back its JSON
    result through a pipe.  With ``serve`` this process answers the child's "padv" requests
    meanwhile.  Returns the child's wait status and the result (None if the child sent none)."""
    r, w = os.pipe()
    if serve:
        req_r, req_w = os.pipe()
        rep_r, rep_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(r)
            if serve:
                os.close(req_r)
                os.close(rep_w)
                res = fn((req_w, rep_r))
                os.close(req_w)                 # the parent stops serving
            else:
                res = fn()
            os.write(w, json.dumps(res).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(w)
    if serve:
        os.close(req_w)
        os.close(rep_r)
        try:
            _serve_padv(pid, req_r, rep_w)
        finally:
            os.close(req_r)
            os.close(rep_w)
    chunks = []
    while chunk := os.read(r, 1 << 16):
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    return status, (json.loads(b"".join(chunks)) if status == 0 else None)


def _real_fork(rest, base: int, span: int, rcs: list, trace: list | None = None, wide: bool = False) -> dict:
    """fork(); the child runs ``rest`` and reports its results and VMAs through a pipe; this
    process serves its "padv" steps."""
    def child(padv) -> dict:
        if trace is not None:
            trace[-1] = _vma_rows(procfs.read_smaps(os.getpid()), base, span, _own_pagemap if wide else None)
        return _real_steps(rest, base, span, trace=trace, wide=wide, padv=padv)

    status, got = _in_child(child, serve=True)
    assert status == 0, f"the child failed (wait status {status})"
    out = {"rcs": rcs + got["rcs"], "vmas": got["vmas"]}
    if trace is not None:
        out["trace"] = got["trace"]
    return out


REAL_BASE = 0x2000_0000_0000          # 32 TiB: far below where mmap() and malloc() place anything


def _free_stretch(span: int) -> int:
    """A free, 1 GiB aligned stretch of ``span`` bytes of this process's address space.

    Low in the address space (REAL_BASE): mmap() without an address takes the highest gap that
    fits, so the interpreter's own later mappings (arenas, NumPy buffers) never land in the holes
    a program leaves, where they would change the program's VMAs and be unmapped with the
    stretch at the end.
    """
    step = -(-span // G) * G + G
    for i in range(64):
        want = REAL_BASE + i * step
        r = _libc.mmap(want, span, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED_NOREPLACE,
                       -1, 0)
        if r not in (None, MAP_FAILED):
            _libc.munmap(r, span)
            if r == want:
                return want
    r = _libc.mmap(None, span + G, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
    assert r not in (None, MAP_FAILED), "could not reserve address space"
    _libc.munmap(r, span + G)
    return -(-r // G) * G


def run_real(program, trace: bool = False, wide: bool = False) -> dict:
    """The program on the running kernel, on a fresh 1 GiB aligned stretch of this process
    (_free_stretch())."""
    span = _span(program)
    base = _free_stretch(span)                     # [base, base + span) is free now
    try:
        return _real_steps(program, base, span, trace=[] if trace else None, wide=wide)
    finally:
        _libc.munmap(base, span)


def one_cpu() -> int:
    """Pin this process (and the children it forks from now on) to one CPU it may run on; the CPU.

    The simulator runs every task on one CPU.  On the kernel a fresh small folio waits in the
    faulting CPU's LRU-add batch (folio_add_lru()) until that batch drains, and
    madvise_cold_or_pageout_pte_range() skips a folio not on the LRU, while madvise_cold() and
    madvise_pageout() drain only the calling CPU's batch (lru_add_drain()).  A parent's
    process_madvise(MADV_COLD) on its child thus leaves the child's last stores young when the
    two ran on different CPUs; on one CPU the drain puts them on the LRU, as the simulator has it.
    """
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    return cpu


def run_real_forked(program, trace: bool = False, wide: bool = False, pin: bool = True) -> dict:
    """run_real() in a forked child: a program that faults kills the child, not this process
    (RuntimeError then).  ``pin``: the child and its children run on one CPU (one_cpu())."""
    def child() -> dict:
        if pin:
            one_cpu()
        return run_real(program, trace, wide)

    status, got = _in_child(child)
    if status != 0:
        raise RuntimeError(f"the program's child failed (wait status {status})")
    return got


def real_kernel_reason() -> str | None:
    """Why the programs cannot run on this machine's kernel, or None."""
    if not sys.platform.startswith("linux") or os.uname().machine != "x86_64":
        return f"the probes use x86-64 Linux syscall numbers ({sys.platform}, {os.uname().machine})"
    if procfs.PAGE_SIZE != PAGE_SIZE or procfs.hpage_pmd_size() != 2 * M:
        return "the simulator models 4 KiB pages and 2 MiB PMDs"
    return None


# -- seeded random programs ------------------------------------------------------------------------------
ADVICE_NAMES = {MADV_HUGEPAGE: "MADV_HUGEPAGE", MADV_NOHUGEPAGE: "MADV_NOHUGEPAGE", MADV_DONTNEED: "MADV_DONTNEED",
                MADV_COLLAPSE: "MADV_COLLAPSE", MADV_DONTFORK: "MADV_DONTFORK", MADV_DOFORK: "MADV_DOFORK",
                MADV_FREE: "MADV_FREE", MADV_COLD: "MADV_COLD", MADV_PAGEOUT: "MADV_PAGEOUT",
                MADV_WILLNEED: "MADV_WILLNEED", MADV_WIPEONFORK: "MADV_WIPEONFORK",
                MADV_GUARD_INSTALL: "MADV_GUARD_INSTALL", MADV_GUARD_REMOVE: "MADV_GUARD_REMOVE"}
PROT_NAMES = {RW: "RW", R: "R", NONE: "NONE"}
RANDOM_SPAN = 32 * M                    # random programs stay in [0, 32 MiB) of their stretch


class _Pages:
    """What a program has done to each 4 KiB page, for touching only what is surely mapped
    read-write (a store elsewhere would kill the runner): -1 unmapped, else the protection;
    a call that fails part-way (a hole in its range) leaves its range unknown (-2); and
    where guard markers may be.  A "padv" needs a fork before it."""

    def __init__(self, span: int) -> None:
        self.prot = np.full(span // K, -1, dtype=np.int8)
        self.dontfork = np.zeros(span // K, dtype=bool)
        self.guard = np.zeros(span // K, dtype=bool)        # maybe a guard marker (SIGSEGV on access)
        self.forked = False

    def accessible(self, need: tuple[int, ...]) -> np.ndarray:
        """The pages surely mapped with one of the protections ``need`` and no guard marker."""
        return np.isin(self.prot, need) & ~self.guard

    def step(self, step) -> bool:
        """Apply ``step``; False when it would store to a page not surely read-write."""
        op, *args = step
        if op == "fork":
            self.prot[self.dontfork] = -2           # maybe gone in the child
            self.forked = True
            return True
        if op in ("forkexit", "thpoff"):
            return True
        if op == "padv" and not self.forked:
            return False                            # process_madvise() on a child not there yet
        lo, hi = args[0] // K, -(-args[1] // K)
        if op == "remap":
            new_len = args[2]
            self.prot[args[0] // K:-(-(args[0] + max(args[1], new_len)) // K)] = -2
            if len(args) > 4:
                self.prot[args[4] // K:-(-(args[4] + new_len) // K)] = -2
            return True
        if hi > len(self.prot):
            return op not in ("touch", "read")
        sl = self.prot[lo:hi]
        if op == "map":
            if (sl == -1).all():
                sl[:] = args[2]
                self.dontfork[lo:hi] = False
                self.guard[lo:hi] = False
            elif (sl != -1).all() and (sl != -2).all():
                pass                                    # EEXIST: nothing changes
            else:
                sl[sl == -1] = -2                      # unknown whether it mapped
        elif op == "unmap":
            sl[:] = -1
            self.guard[lo:hi] = False
        elif op == "prot":
            sl[:] = args[2] if (sl >= 0).all() else -2
        elif op == "adv":
            if args[2] == MADV_DONTFORK:
                self.dontfork[lo:hi] = True
            elif args[2] == MADV_DOFORK and (sl >= 0).all():
                self.dontfork[lo:hi] = False
            elif args[2] == MADV_GUARD_INSTALL:
                self.guard[lo:hi] = True
            elif args[2] == MADV_GUARD_REMOVE:
                self.guard[lo:hi] &= sl < 0             # cleared where surely mapped
        elif op in ("touch", "read"):
            need = (RW,) if op == "touch" else (RW, R)
            return bool(self.accessible(need)[lo:hi].all())
        return True


def program_is_safe(program) -> bool:
    """No step of ``program`` stores to or loads from a page that may not be mapped for it."""
    pages = _Pages(max(_span(program), RANDOM_SPAN) + G)
    return all(pages.step(s) for s in program)


def random_program(rng: random.Random, steps: int = 16, span: int = RANDOM_SPAN, wide: bool = False) -> list[tuple]:
    """A seeded random program: 2-8 MiB mappings at PMD-aligned offsets, madvise of
    HUGEPAGE/NOHUGEPAGE/DONTNEED/COLLAPSE/DONTFORK/DOFORK, mprotect, partial munmap, mremap
    (in place, or MREMAP_FIXED moves inside the stretch) and strided stores over random ranges
    (often straddling PMDs and mappings), perhaps one fork.

    ``wide``: the wider set, also MADV_FREE/COLD/PAGEOUT/WILLNEED/WIPEONFORK, MAP_NORESERVE,
    PROT_NONE round trips, loads (and load-then-store), process_madvise() of the parent on its
    forked child (COLD/PAGEOUT/WILLNEED/COLLAPSE), PR_SET_THP_DISABLE before the fork and a
    child that exits at once."""
    pages = _Pages(span)
    prog: list[tuple] = []
    regions: list[tuple[int, int]] = []

    def point(near: list[int]) -> int:
        roll = rng.random()
        if roll < 0.35 and near:
            return rng.choice(near)
        if roll < 0.7:
            return rng.randrange(0, span // PMD + 1) * PMD
        return rng.randrange(0, span // K + 1) * K

    def a_range() -> tuple[int, int]:
        mapped = np.flatnonzero(pages.prot != -1)
        if len(mapped) and rng.random() < 0.6:         # inside a mapping, or just across its edge
            first = int(mapped[rng.randrange(len(mapped))])
            last = first
            while last + 1 < len(pages.prot) and pages.prot[last + 1] != -1:
                last += 1
            while first > 0 and pages.prot[first - 1] != -1:
                first -= 1
            lo = rng.randrange(first, last + 1)
            hi = rng.randrange(lo + 1, last + 2)
            lo, hi = lo * K, hi * K
            if rng.random() < 0.3:
                lo, hi = lo & ~(PMD - 1), -(-hi // PMD) * PMD      # widened to whole PMDs
            if rng.random() < 0.1:
                hi = min(span, hi + rng.randrange(1, 512) * K)      # across the mapping's end
            return lo, hi
        edges = [e for r in regions for e in r]
        for _ in range(20):
            lo, hi = sorted((point(edges), point(edges)))
            if lo < hi:
                return lo, hi
        return 0, PMD

    forked = False
    while len(prog) < steps:
        roll = rng.random()
        kind = _wide_kind(roll, forked) if wide else _basic_kind(roll)
        if kind == "map" or not regions:
            if regions and rng.random() < 0.6:           # somewhere free, mostly
                free = [i * PMD for i in range(span // PMD) if (pages.prot[i * PMD // K:(i + 1) * PMD // K] == -1).all()]
                if not free:
                    continue
                size = rng.randrange(1, 5) * PMD
                lo = rng.choice(free)
                run = lo
                while run + PMD < span and run + PMD in free and run + PMD - lo < size:
                    run += PMD
                size = max(PMD, min(size, run + PMD - lo))
                step = ("map", lo, lo + size, rng.choice([RW, RW, RW, R]), *_map_extra(rng, wide))
                regions.append((lo, lo + size))
                if pages.step(step):
                    prog.append(step)
                continue
            size = rng.randrange(2 * M // K, 8 * M // K + 1) * K if rng.random() < 0.4 else rng.randrange(1, 5) * PMD
            lo = rng.randrange(0, (span - size) // PMD + 1) * PMD
            step = ("map", lo, lo + size, rng.choice([RW, RW, RW, R]), *_map_extra(rng, wide))
            regions.append((lo, lo + size))
        elif kind == "adv":
            lo, hi = a_range()
            step = ("adv", lo, hi, rng.choice(WIDE_ADVICE if wide else BASIC_ADVICE))
        elif kind == "padv":
            lo, hi = a_range()
            step = ("padv", lo, hi, rng.choice(REMOTE_ADVICE))
        elif kind == "prot":
            lo, hi = a_range()
            step = ("prot", lo, hi, rng.choice([RW, RW, R, NONE]))
            if wide and rng.random() < 0.3 and (pages.prot[lo // K:-(-hi // K)] >= 0).all():
                back = int(pages.prot[lo // K])         # a PROT_NONE round trip
                if (pages.prot[lo // K:-(-hi // K)] == back).all() and pages.step(("prot", lo, hi, NONE)):
                    prog.append(("prot", lo, hi, NONE))
                    step = ("prot", lo, hi, back)
        elif kind == "unmap":
            lo, hi = a_range()
            if hi - lo > 4 * M:
                hi = lo + rng.randrange(1, 4 * M // K + 1) * K
            step = ("unmap", lo, hi)
        elif kind == "remap":
            lo, hi = a_range()
            old_len = min(hi - lo, 4 * M)
            if rng.random() < 0.5:                      # in place: shrink or grow
                step = ("remap", lo, old_len, rng.randrange(1, 6 * M // K + 1) * K, 0)
            else:                                       # a fixed move (DONTUNMAP keeps the old range)
                new_lo = point([])
                new_lo = min(new_lo, span - old_len)
                flags = MAYMOVE | FIXED | (DONTUNMAP if rng.random() < 0.25 else 0)
                step = ("remap", lo, old_len, old_len, flags, new_lo)
        elif kind in ("touch", "read"):
            ok = pages.accessible((RW,) if kind == "touch" else (RW, R))
            rw = np.flatnonzero(ok)
            if not len(rw):
                continue
            first = int(rw[rng.randrange(len(rw))])
            last = first
            while last + 1 < len(pages.prot) and ok[last + 1] and last - first < 4 * M // K:
                last += 1
            lo = first * K
            hi = rng.randrange(first + 1, last + 2) * K
            if kind == "read":
                step = ("read", lo, hi)
                if rng.random() < 0.4 and pages.accessible((RW,))[first:hi // K].all() and pages.step(step):
                    prog.append(step)                   # read, then write
                    step = ("touch", lo, hi)
            else:
                step = ("touch", lo, hi, rng.choice([K, K, 2 * K, 16 * K, 512 * K]))
        elif kind == "forkexit":
            step = ("forkexit",)
        else:
            if forked:
                continue
            forked = True
            if wide and rng.random() < 0.3 and len(prog) + 1 < steps:
                prog.append(("thpoff",))                # PR_SET_THP_DISABLE, inherited by the child
            step = ("fork",)
        if pages.step(step):
            prog.append(step)
    return prog[:steps]


BASIC_ADVICE = [MADV_HUGEPAGE, MADV_HUGEPAGE, MADV_NOHUGEPAGE, MADV_DONTNEED, MADV_COLLAPSE, MADV_COLLAPSE,
                MADV_DONTFORK, MADV_DOFORK]
WIDE_ADVICE = BASIC_ADVICE + [MADV_FREE, MADV_FREE, MADV_COLD, MADV_PAGEOUT, MADV_WILLNEED, MADV_WIPEONFORK,
                              MADV_GUARD_INSTALL, MADV_GUARD_REMOVE]
REMOTE_ADVICE = [MADV_COLD, MADV_PAGEOUT, MADV_WILLNEED, MADV_COLLAPSE]     # process_madvise() on another process


def _basic_kind(roll: float) -> str:
    """The basic set's step kinds, by a uniform roll."""
    for bound, kind in ((0.2, "map"), (0.5, "adv"), (0.62, "prot"), (0.68, "unmap"), (0.73, "remap"), (0.97, "touch")):
        if roll < bound:
            return kind
    return "fork"


def _wide_kind(roll: float, forked: bool) -> str:
    """The wide set's step kinds: also loads, process_madvise() on the child, fork-and-exit."""
    for bound, kind in ((0.15, "map"), (0.38, "adv"), (0.48, "prot"), (0.53, "unmap"), (0.58, "remap"),
                        (0.72, "touch"), (0.84, "read"), (0.91, "padv"), (0.95, "forkexit")):
        if roll < bound:
            return "adv" if kind == "padv" and not forked else kind
    return "fork"


def _map_extra(rng: random.Random, wide: bool) -> tuple:
    """The wide set maps one mapping in five MAP_NORESERVE."""
    return (MAP_NORESERVE,) if wide and rng.random() < 0.2 else ()


def format_program(program) -> str:
    """The program as Python source (a list of steps, with named constants), one step a line."""
    def num(x: int) -> str:
        if x and x % M == 0:
            return f"{x // M} * M"
        if x and x % K == 0:
            return f"{x // K} * K"
        return str(x)

    lines = []
    for step in program:
        op, *args = step
        if op in ("map", "prot"):
            parts = [num(args[0]), num(args[1]), PROT_NAMES.get(args[2], str(args[2]))] + \
                ["MAP_NORESERVE" if a == MAP_NORESERVE else str(a) for a in args[3:]]
        elif op in ("adv", "padv"):
            parts = [num(args[0]), num(args[1]), ADVICE_NAMES.get(args[2], str(args[2]))]
        elif op == "touch":
            parts = [num(args[0]), num(args[1])] + [num(a) for a in args[2:]]
        else:
            parts = [num(a) if isinstance(a, int) else str(a) for a in args]
        lines.append(f"    ({', '.join([repr(op)] + parts)}{',' if not parts else ''}),")
    return "[\n" + "\n".join(lines) + "\n]"


# -- the differential harness ----------------------------------------------------------------------------
NOISE_COUNTERS = ("thp_collapse_alloc", "thp_collapse_alloc_failed", "thp_fault_fallback", "thp_split_pmd",
                  "thp_split_page")


def first_difference(a: dict, b: dict, program: list | None = None) -> str | None:
    """Where two results of ``program`` first differ (step by step when both have a trace:
    the step's return value, then the VMAs after it; else the return values, then the VMAs
    left), or None when they agree."""
    ta, tb = a.get("trace"), b.get("trace")
    if program is not None and ta is not None and tb is not None:
        call = 0
        for i, step in enumerate(program):
            if step[0] not in _NO_RC:
                x, y = a["rcs"][call:call + 1], b["rcs"][call:call + 1]
                if x != y:
                    return f"step {i} ({step[0]}) returned {x[0] if x else None} vs {y[0] if y else None}"
                call += 1
            if ta[i:i + 1] != tb[i:i + 1]:
                return f"VMAs after step {i} ({step[0]})"
    for i, (x, y) in enumerate(zip(a["rcs"], b["rcs"])):
        if x != y:
            return f"call {i} returned {x} vs {y}"
    if len(a["rcs"]) != len(b["rcs"]):
        return "number of calls"
    if a["vmas"] != b["vmas"]:
        return "VMAs left"
    return None


@dataclass
class Outcome:
    """One program of a differential run: its verdict, where the sides first differed, why a
    mismatch was judged noise, the minimal program of a difference and the two sides' results."""
    index: int
    program: list
    verdict: str                                        # equal, noisy, different
    where: str | None = None
    why: str | None = None                              # noisy: why; equal: why a rerun judged it
    minimal: list | None = None
    real: dict | None = None
    sim: dict | None = None


@dataclass
class DiffSummary:
    """A differential run: how many programs were run, equal, noisy and different, and each outcome."""
    programs: int = 0
    equal: int = 0
    rerun_equal: int = 0                                # of equal: khugepaged worked in the first run
    noisy: int = 0
    different: int = 0
    seed: int = 0
    steps: int = 0
    elapsed_s: float = 0.0
    lock_wait_s: float = 0.0                            # of elapsed_s, waiting for the lab lock
    outcomes: list[Outcome] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"programs": self.programs, "equal": self.equal, "rerun_equal": self.rerun_equal,
                "noisy": self.noisy, "different": self.different,
                "seed": self.seed, "steps": self.steps, "elapsed_s": round(self.elapsed_s, 3),
                "lock_wait_s": round(self.lock_wait_s, 3),
                "differences": [{"index": o.index, "where": o.where, "program": o.program, "minimal": o.minimal,
                                 "real": o.real, "sim": o.sim}
                                for o in self.outcomes if o.verdict == "different"],
                "noisy_programs": [{"index": o.index, "where": o.where, "why": o.why, "program": o.program,
                                    "real": o.real, "sim": o.sim}
                                   for o in self.outcomes if o.verdict == "noisy"]}


Runner = Callable[[list], dict]


KHUGEPAGED_COUNTERS = ("full_scans", "pages_collapsed")   # /sys/kernel/mm/transparent_hugepage/khugepaged/


def _khugepaged_counters() -> dict[str, int]:
    """khugepaged's own progress counters (read-only sysfs files; {} where absent)."""
    out = {}
    for name in KHUGEPAGED_COUNTERS:
        try:
            with open(f"/sys/kernel/mm/transparent_hugepage/khugepaged/{name}") as fh:
                out[f"khugepaged:{name}"] = int(fh.read())
        except (OSError, ValueError):
            pass
    return out


def _real_with_vmstat(program, wide: bool = False) -> tuple[dict, dict[str, int]]:
    """(the program's result on the running kernel, the system-wide NOISE_COUNTERS deltas and
    khugepaged's counters' deltas over the run)."""
    before, kb = procfs.read_vmstat(), _khugepaged_counters()
    res = run_real_forked(program, trace=True, wide=wide)
    after, ka = procfs.read_vmstat(), _khugepaged_counters()
    return res, {**{c: after.get(c, 0) - before.get(c, 0) for c in NOISE_COUNTERS},
                 **{c: ka[c] - kb[c] for c in ka if c in kb}}


def khugepaged_ran(d: dict[str, int]) -> bool:
    """Did khugepaged scan a full round or collapse anything during a run (its counters' deltas)?"""
    return any(d.get(f"khugepaged:{c}", 0) for c in KHUGEPAGED_COUNTERS)


def shrink(program: list, differs: Callable[[list], bool]) -> list:
    """Delta debugging: drop chunks of steps, then single steps, while ``differs`` still holds
    (only programs that store nowhere they should not are tried)."""
    prog = list(program)
    n = 2
    while len(prog) >= 2:
        chunk = max(1, len(prog) // n)
        removed = False
        for start in range(0, len(prog), chunk):
            cand = prog[:start] + prog[start + chunk:]
            if cand and program_is_safe(cand) and differs(cand):
                prog, removed = cand, True
                n = max(n - 1, 2)
                break
        if not removed:
            if chunk == 1:
                break
            n = min(len(prog), n * 2)
    return prog


def differential(n: int, seed: int, steps: int = 16, sim_runner: Runner | None = None,
                 real_runner: Runner | None = None, knobs: dict[str, str] | None = None,
                 progress: Callable[[str, int, int], None] | None = None, wide: bool = False) -> DiffSummary:
    """Run ``n`` random programs (seeded by ``seed``) on the simulator and on the running kernel
    (or ``real_runner``, which is then taken as noise-free) and compare them step by step.
    ``wide``: the wider set of programs (random_program()) and of columns (WIDE_COLUMNS).

    khugepaged runs on its own timer on the kernel; the simulator's programs take no time, so its
    khugepaged never runs during one.  A mismatch in a run during which khugepaged's counters
    (full_scans, pages_collapsed) moved is judged by the first of up to three reruns that
    khugepaged left alone: equal to the simulator, it counts as equal (``rerun_equal``).

    A mismatch is rerun twice on the real side: a rerun that gives the simulator's result or
    differs from the first run, or a first run
    whose system-wide THP counters (NOISE_COUNTERS: khugepaged collapsing, a failed THP
    allocation, splits) moved other than the simulator's, makes it noisy; otherwise it is a
    difference, shrunk to a minimal program.
    """
    import time

    t0 = time.monotonic()
    rng = random.Random(seed)
    kernel_side = real_runner is None
    if kernel_side:
        reason = real_kernel_reason()
        if reason:
            raise RuntimeError(reason)
        knobs = procfs.read_thp_knobs() if knobs is None else knobs

    def sim(program, with_vmstat=False):
        if sim_runner is not None:
            return (sim_runner(program), {}) if with_vmstat else sim_runner(program)
        k = sim_kernel(knobs)
        before = k.vmstat_snapshot()
        res = run_sim(program, k, trace=True, wide=wide)
        after = k.vmstat_snapshot()
        d = {c: after.get(c, 0) - before.get(c, 0) for c in NOISE_COUNTERS}
        return (res, d) if with_vmstat else res

    def real(program):
        if not kernel_side:
            return real_runner(program), {}
        lock.hold()
        try:
            return _real_with_vmstat(program, wide)
        finally:
            lock.maybe_release()

    def differs(program) -> bool:
        r1, _ = real(program)
        if first_difference(r1, sim(program), program) is None:
            return False
        if kernel_side:
            r2, _ = real(program)
            return r1 == r2
        return True

    lock = _LockSlice()
    try:
        out = _differential(n, rng, steps, wide, sim, real, differs, kernel_side, progress, t0,
                            DiffSummary(programs=n, seed=seed, steps=steps))
    finally:
        lock.release()
    out.lock_wait_s = lock.waited_s
    return out


class _LockSlice:
    """The lab lock (scenario.lab_lock()), held for up to ``slice_s`` seconds of runs at a time (others
    hold it for whole tests):
    one wait for the lock per slice rather than per program."""

    def __init__(self, slice_s: float = 60.0) -> None:
        import contextlib
        self.slice_s = slice_s
        self.stack = contextlib.ExitStack()
        self.since: float | None = None
        self.waited_s = 0.0                     # time spent waiting for the lock

    def hold(self) -> None:
        import time

        from . import scenario
        if self.since is None:
            t = time.monotonic()
            self.stack.enter_context(scenario.lab_lock())
            self.since = time.monotonic()
            self.waited_s += self.since - t

    def maybe_release(self) -> None:
        import time
        if self.since is not None and time.monotonic() - self.since > self.slice_s:
            self.release()

    def release(self) -> None:
        self.stack.close()
        self.since = None


def _differential(n, rng, steps, wide, sim, real, differs, kernel_side, progress, t0, out) -> DiffSummary:
    """The loop of differential(): each program run, judged, and if different shrunk."""
    import time

    for i in range(n):
        program = random_program(rng, steps=steps, wide=wide)
        if progress:
            progress(f"program {i + 1} of {n}", i, n)
        r1, d1 = real(program)
        s, ds = sim(program, with_vmstat=True)
        where = first_difference(r1, s, program)
        if where is None:
            out.equal += 1
            out.outcomes.append(Outcome(i, program, "equal"))
            continue
        why = None
        if kernel_side and khugepaged_ran(d1):
            # khugepaged (asynchronous, on its own timer) worked during the run: judge the program by
            # a run it left alone instead, if one of three comes out so
            for _ in range(3):
                r2, d2 = real(program)
                if not khugepaged_ran(d2):
                    break
            if not khugepaged_ran(d2) and first_difference(r2, s, program) is None:
                out.equal += 1
                out.rerun_equal += 1
                out.outcomes.append(Outcome(i, program, "equal", where, "khugepaged worked during the first run ("
                                            + ", ".join(f"{c} +{d1[c]}" for c in d1 if c.startswith("khugepaged:")
                                                        and d1[c]) + "); a run it left alone equals the simulator",
                                            real=_strip(r1), sim=_strip(s)))
                continue
        if kernel_side:
            moved = {c: (d1.get(c, 0), ds.get(c, 0)) for c in NOISE_COUNTERS if d1.get(c, 0) != ds.get(c, 0)}
            reruns = [real(program)[0] for _ in range(2)]
            if any(first_difference(r, s, program) is None for r in reruns):
                why = "a rerun on the running kernel gave the simulator's result"
            elif any(r != r1 for r in reruns):
                why = "reruns on the running kernel differ from the first run"
            elif moved:
                why = "system-wide THP counters moved other than the simulator's: " + ", ".join(
                    f"{c} {a} vs {b}" for c, (a, b) in moved.items())
        if why:
            out.noisy += 1
            out.outcomes.append(Outcome(i, program, "noisy", where, why, real=_strip(r1), sim=_strip(s)))
            continue
        minimal = shrink(program, differs)
        out.different += 1
        out.outcomes.append(Outcome(i, program, "different", where, minimal=minimal,
                                    real=_strip(real(minimal)[0]), sim=_strip(sim(minimal))))
    if progress:
        progress("done", n, n)
    out.elapsed_s = time.monotonic() - t0
    return out


def _strip(res: dict) -> dict:
    return {"rcs": res["rcs"], "vmas": res["vmas"]}
