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

A result is {"rcs": the calls' return values (0, an offset for mremap, or an errno name),
"vmas": the VMAs left in the stretch as rows (start, end, perms, VmFlags the simulator models,
AnonHugePages kB, Rss kB)}; with ``trace=True`` also "trace": per step, the rows after it.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import random
import sys
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..kernel import (
    MADV_COLLAPSE, MADV_HUGEPAGE, MADV_NOHUGEPAGE, MAP_ANONYMOUS, MAP_FIXED_NOREPLACE, MAP_NORESERVE,
    MAP_PRIVATE, MREMAP_DONTUNMAP, MREMAP_FIXED, MREMAP_MAYMOVE, PAGE_SIZE, PROT_NONE, PROT_READ, PROT_WRITE,
    Kernel, KernelError,
)
from ..kernel.constants import MADV_DOFORK, MADV_DONTFORK, MADV_DONTNEED, VM_FLAG_MNEMONICS
from . import procfs

K = PAGE_SIZE
M = 1 << 20
G = 1 << 30
PMD = 2 * M
R, RW, NONE = PROT_READ, PROT_READ | PROT_WRITE, PROT_NONE
MAYMOVE, FIXED, DONTUNMAP = MREMAP_MAYMOVE, MREMAP_FIXED, MREMAP_DONTUNMAP
SIM_BASE = 0x7E00_0000_0000            # 1 GiB aligned, far below the simulator's mmap base
__all__ = ["run_sim", "run_real", "run_real_forked", "random_program", "differential", "shrink",
           "real_kernel_reason", "sim_kernel", "format_program", "DiffSummary", "MAP_NORESERVE"]


def _span(program) -> int:
    """The stretch of address space a program uses, from base."""
    end = 0
    for step in program:
        if step[0] in ("map", "touch", "read", "prot", "unmap", "adv"):
            end = max(end, step[2])
        elif step[0] == "remap":
            end = max(end, step[1] + max(step[2], step[3]))
            if len(step) > 5:
                end = max(end, step[5] + step[3])
    return -(-(end + M) // M) * M


_MODELLED_FLAGS = {name for _, name in VM_FLAG_MNEMONICS}


def _vma_rows(vmas, base: int, span: int) -> list[list]:
    """The VMAs in [base, base + span): offsets, perms, the VmFlags the simulator models, AnonHugePages, Rss."""
    return [[v.start - base, v.end - base, v.perms, " ".join(f for f in v.vm_flags if f in _MODELLED_FLAGS),
             v.fields.get("AnonHugePages", 0), v.fields.get("Rss", 0)]
            for v in vmas if v.start < base + span and v.end > base]


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


def run_sim(program, k: Kernel | None = None, trace: bool = False) -> dict:
    """The program on a simulated kernel (Linux 6.18 as booted, unless ``k`` is given)."""
    k = k or Kernel(ram=1 << 30, check=True)
    p = k.spawn()
    base, span = SIM_BASE, _span(program)
    rcs: list = []
    steps: list = []

    def call(fn, *args):
        try:
            r = fn(*args)
        except KernelError as e:
            return errno.errorcode[e.errno]
        return r

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
        elif op == "remap":
            lo, old_len, new_len, flags, *new = args
            r = call(p.mremap, base + lo, old_len, new_len, flags, base + new[0] if new else 0)
            rcs.append(r if isinstance(r, str) else r - base)
        elif op == "fork":
            p = p.fork()
        else:
            raise ValueError(op)
        if trace:
            steps.append(_vma_rows(procfs.parse_smaps(p.smaps()), base, span))
    out = {"rcs": rcs, "vmas": _vma_rows(procfs.parse_smaps(p.smaps()), base, span)}
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


def _real_steps(program, base: int, span: int, out_fd: int | None = None, trace: list | None = None) -> dict:
    rcs: list = []
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
        elif op == "remap":
            lo, old_len, new_len, flags, *new = args
            r = _syscall(_SYS_MREMAP, base + lo, old_len, new_len, flags, base + new[0] if new else 0)
            rcs.append(errno.errorcode[ctypes.get_errno()] if r == -1 else (r & ((1 << 64) - 1)) - base)
        elif op == "fork":
            if trace is not None:
                trace.append(None)              # the child's VMAs, filled in by _real_fork
            return _real_fork(program[i + 1:], base, span, rcs, trace)
        else:
            raise ValueError(op)
        if trace is not None:
            trace.append(_vma_rows(procfs.read_smaps(os.getpid()), base, span))
    out = {"rcs": rcs, "vmas": _vma_rows(procfs.read_smaps(os.getpid()), base, span)}
    if trace is not None:
        out["trace"] = trace
    return out


def _real_fork(rest, base: int, span: int, rcs: list, trace: list | None = None) -> dict:
    """fork(); the child runs ``rest`` and reports its results and VMAs through a pipe."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(r)
            if trace is not None:
                trace[-1] = _vma_rows(procfs.read_smaps(os.getpid()), base, span)
            out = _real_steps(rest, base, span, trace=trace)
            os.write(w, json.dumps(out).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 1 << 16):
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert status == 0, f"the child failed (wait status {status})"
    child = json.loads(b"".join(chunks))
    out = {"rcs": rcs + child["rcs"], "vmas": child["vmas"]}
    if trace is not None:
        out["trace"] = child["trace"]
    return out


def run_real(program, trace: bool = False) -> dict:
    """The program on the running kernel, on a fresh 1 GiB aligned stretch of this process."""
    span = _span(program)
    size = span + G
    r = _libc.mmap(None, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
    assert r not in (None, MAP_FAILED), "could not reserve address space"
    base = -(-r // G) * G
    _libc.munmap(r, size)                          # [base, base + span) is free now
    try:
        return _real_steps(program, base, span, trace=[] if trace else None)
    finally:
        _libc.munmap(base, span)


def run_real_forked(program, trace: bool = False) -> dict:
    """run_real() in a forked child: a program that faults kills the child, not this process
    (RuntimeError then)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(r)
            os.write(w, json.dumps(run_real(program, trace)).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 1 << 16):
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        raise RuntimeError(f"the program's child failed (wait status {status})")
    return json.loads(b"".join(chunks))


def real_kernel_reason() -> str | None:
    """Why the programs cannot run on this machine's kernel, or None."""
    if not sys.platform.startswith("linux") or os.uname().machine != "x86_64":
        return f"the probes use x86-64 Linux syscall numbers ({sys.platform}, {os.uname().machine})"
    if procfs.PAGE_SIZE != PAGE_SIZE or procfs.hpage_pmd_size() != 2 * M:
        return "the simulator models 4 KiB pages and 2 MiB PMDs"
    return None
