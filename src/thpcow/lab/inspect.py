"""What a live process's THPs look like, in the spirit of the kernel's tools/mm/thpmaps.

For each anonymous VMA of a process, :func:`inspect_pid` reads

- ``/proc/PID/smaps`` (the VMAs, Anonymous, AnonHugePages, Swap),
- the PAGEMAP_SCAN ioctl on ``/proc/PID/pagemap`` (v6.7): which pages a PMD maps
  (PAGE_IS_HUGE), which are the zero page, which are swapped out,
- ``/proc/PID/pagemap``: each present page's PFN (root only: the kernel shows
  PFNs to CAP_SYS_ADMIN alone),
- ``/proc/kpageflags`` for the PFN blocks those pages live in: which pages
  belong to a large folio (KPF_THP), where each folio starts (COMPOUND_HEAD)
  and how long it is (the COMPOUND_TAIL pages after it).  A large folio is a
  buddy block, so it never crosses a 2 MiB-aligned PFN block: one read of
  512 words per block finds every folio in it.

and sorts the anonymous memory of the VMA into

- ``pmd``: PMD-mapped THP;
- per folio size (16 KiB .. 2 MiB) mapped by PTEs: ``aligned`` (the whole
  folio mapped in this VMA, page i of the folio at page i of a naturally
  aligned virtual block: what a fault or a collapse produces), ``unaligned``
  (the whole folio mapped, but not so: after mremap), ``partial`` (only some
  of its pages mapped here: after MADV_DONTNEED, munmap or a VMA split);
- ``small``: order-0 pages; ``zero``: the shared zero page (huge zero PMDs in
  ``huge_zero``); ``swap``: swapped-out pages.

Amounts are in kB, as smaps prints them.  Only reading is done: nothing is
written anywhere.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from . import procfs
from .procfs import (
    KPF_COMPOUND_HEAD, KPF_COMPOUND_TAIL, KPF_THP, KPF_ZERO_PAGE, PAGE_IS_HUGE, PAGE_IS_PFNZERO, PAGE_IS_PRESENT,
    PAGE_IS_SWAPPED, PM_PRESENT, PM_SWAP, LabError, kpf_test,
)

PAGE = 4096
PAGE_KB = PAGE // 1024
BLOCK = 512                        # PFNs per 2 MiB block: no large folio crosses one
CHUNK_PAGES = 1 << 18              # pagemap read per 1 GiB of address space


class InspectError(LabError):
    """A process cannot be inspected: gone, or not readable with this process's rights."""


@dataclass
class VmaThp:
    """The THP state of one anonymous VMA (kB)."""

    start: int
    end: int
    perms: str
    name: str
    anon_kb: int = 0                  # smaps Anonymous
    pmd_kb: int = 0                   # PMD-mapped THP
    huge_zero_kb: int = 0             # the huge zero page, PMD-mapped
    small_kb: int = 0                 # order-0 anon pages
    zero_kb: int = 0                  # the shared zero page, PTE-mapped
    swap_kb: int = 0
    pte: dict[int, dict[str, int]] = field(default_factory=dict)   # folio kB -> {aligned, unaligned, partial}

    def pte_kb(self) -> int:
        return sum(sum(v.values()) for v in self.pte.values())


@dataclass
class ProcThp:
    """The THP state of one process: its anonymous VMAs and their totals."""

    pid: int
    comm: str
    vmas: list[VmaThp]
    pmd_source: str                   # "PAGEMAP_SCAN", or "smaps AnonHugePages" on kernels without it

    def total(self) -> VmaThp:
        t = VmaThp(0, 0, "", "total")
        for v in self.vmas:
            for name in ("anon_kb", "pmd_kb", "huge_zero_kb", "small_kb", "zero_kb", "swap_kb"):
                setattr(t, name, getattr(t, name) + getattr(v, name))
            for size, kinds in v.pte.items():
                tk = t.pte.setdefault(size, {"aligned": 0, "unaligned": 0, "partial": 0})
                for kind, kb in kinds.items():
                    tk[kind] += kb
        return t

    def to_dict(self) -> dict:
        return {"pid": self.pid, "comm": self.comm, "pmd_source": self.pmd_source,
                "vmas": [asdict(v) for v in self.vmas], "total": asdict(self.total())}


def _anonymous(v: procfs.Vma) -> bool:
    """A private anonymous VMA with anonymous memory in it (heap, stack and plain mmap)."""
    return v.inode == 0 and v.perms[3] == "p" and (v.kb("Anonymous") or v.kb("Swap")) > 0 \
        and not v.name.startswith("[v")                      # not [vdso], [vvar], [vsyscall]


def _comm(pid: int, root: str) -> str:
    try:
        with open(os.path.join(root, "proc", str(pid), "comm")) as fh:
            return fh.read().strip()
    except OSError:
        return "?"


def _folios(pfns: np.ndarray, root: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For each PFN: (is in a large folio, its folio's head PFN, the folio's order, is the zero
    page); head and order -1 where not in a large folio."""
    blocks = np.unique(pfns // BLOCK)
    words = procfs.read_kpageflags((blocks[:, None] * BLOCK + np.arange(BLOCK)).ravel(), root)
    words = words.reshape(len(blocks), BLOCK)
    head = kpf_test(words, KPF_COMPOUND_HEAD)
    tail = kpf_test(words, KPF_COMPOUND_TAIL)
    thp = kpf_test(words, KPF_THP)
    zero = kpf_test(words, KPF_ZERO_PAGE)
    # The head of each page's folio: the last head at or before it in its block.
    idx = np.where(head, np.arange(BLOCK), -1)
    last_head = np.maximum.accumulate(idx, axis=1)
    # A folio's length: its head and the tail pages after it.
    run = np.zeros_like(words, dtype=np.int64)
    for i in range(BLOCK - 1, -1, -1):                       # 512 vector steps, not per page
        nxt = run[:, i + 1] if i + 1 < BLOCK else 0
        run[:, i] = np.where(tail[:, i], 1 + nxt, 0)
    length = np.where(head, 1 + np.concatenate([run[:, 1:], np.zeros((len(blocks), 1), np.int64)], axis=1), 0)
    b = np.searchsorted(blocks, pfns // BLOCK)
    off = (pfns % BLOCK).astype(np.int64)
    in_large = thp[b, off] & (head[b, off] | tail[b, off]) & ~zero[b, off]
    h = last_head[b, off]
    head_pfn = np.where(in_large & (h >= 0), (pfns // BLOCK) * BLOCK + np.maximum(h, 0), -1)
    nr = np.where(in_large & (h >= 0), length[b, np.maximum(h, 0)], 0)
    order = np.where(nr > 0, np.log2(np.maximum(nr, 1)).astype(np.int64), -1)
    return in_large & (h >= 0), head_pfn.astype(np.int64), order, zero[b, off]


def inspect_vma(pid: int, v: procfs.Vma, root: str = "/", use_scan: bool = True) -> tuple[VmaThp, bool]:
    """The THP state of one anonymous VMA; also whether PAGEMAP_SCAN answered."""
    out = VmaThp(v.start, v.end, v.perms, v.name or "[anon]", anon_kb=v.kb("Anonymous"))
    npages = (v.end - v.start) // PAGE
    huge = np.zeros(npages, dtype=bool)
    scanned = False
    if use_scan:
        regions = procfs.pagemap_scan(pid, v.start, v.end, PAGE_IS_PRESENT | PAGE_IS_SWAPPED | PAGE_IS_HUGE
                                      | PAGE_IS_PFNZERO, root)
        if regions is not None:
            scanned = True
            for s, e, cat in regions:
                if cat & PAGE_IS_HUGE and cat & PAGE_IS_PRESENT:
                    a, b = (s - v.start) // PAGE, (e - v.start) // PAGE
                    if cat & PAGE_IS_PFNZERO:
                        out.huge_zero_kb += (b - a) * PAGE_KB
                    else:
                        huge[a:b] = True
    vaddr_chunks, pfn_chunks = [], []
    for first in range(0, npages, CHUNK_PAGES):
        n = min(CHUNK_PAGES, npages - first)
        ent = procfs.read_pagemap(pid, v.start + first * PAGE, n, root)
        present = (ent & np.uint64(PM_PRESENT)) != 0
        out.swap_kb += int(np.count_nonzero(((ent & np.uint64(PM_SWAP)) != 0) & ~present)) * PAGE_KB
        sel = np.flatnonzero(present & ~huge[first: first + n])
        pfn = (ent[sel] & np.uint64(procfs.PM_PFRAME_MASK)).astype(np.int64)
        if len(sel) and not pfn.any():
            raise InspectError(f"pid {pid}: /proc/{pid}/pagemap shows no PFNs: reading them needs "
                               "CAP_SYS_ADMIN (run as root)")
        vaddr_chunks.append(first + sel)
        pfn_chunks.append(pfn)
    out.pmd_kb = int(np.count_nonzero(huge)) * PAGE_KB
    if not scanned:
        out.pmd_kb = v.kb("AnonHugePages")
    vpage = np.concatenate(vaddr_chunks) if vaddr_chunks else np.zeros(0, np.int64)
    pfns = np.concatenate(pfn_chunks) if pfn_chunks else np.zeros(0, np.int64)
    if not len(pfns):
        return out, scanned
    large, head, order, zero = _folios(pfns, root)
    out.zero_kb = int(np.count_nonzero(zero)) * PAGE_KB
    out.small_kb = int(np.count_nonzero(~large & ~zero)) * PAGE_KB
    if large.any():
        vl, hl, ol, pl = vpage[large], head[large], order[large], pfns[large]
        # One entry per (folio, mapping): pages of a folio mapped in this VMA.
        keys, inv, counts = np.unique(hl, return_inverse=True, return_counts=True)
        first_v = np.full(len(keys), np.iinfo(np.int64).max)
        np.minimum.at(first_v, inv, vl - (pl - hl))          # where page 0 of the folio would be
        consistent = np.ones(len(keys), dtype=bool)
        np.logical_and.at(consistent, inv, (vl - (pl - hl)) == first_v[inv])
        korder = np.zeros(len(keys), dtype=np.int64)
        korder[inv] = ol
        knr = 1 << korder
        whole = counts == knr
        start_addr = v.start // PAGE + first_v
        aligned = whole & consistent & (start_addr % knr == 0)
        for o in np.unique(korder).tolist():
            sel = korder == o
            kb = (1 << o) * PAGE_KB
            bucket = out.pte.setdefault(kb, {"aligned": 0, "unaligned": 0, "partial": 0})
            bucket["aligned"] += int(np.count_nonzero(sel & aligned)) * kb
            bucket["unaligned"] += int(np.count_nonzero(sel & whole & ~aligned)) * kb
            bucket["partial"] += int(counts[sel & ~whole].sum()) * PAGE_KB
    if not scanned and out.pmd_kb:
        # The PMD-mapped THPs were counted as aligned 2 MiB PTE-mapped folios: move them.
        b = out.pte.get(2048)
        if b:
            moved = min(b["aligned"], out.pmd_kb)
            b["aligned"] -= moved
    return out, scanned


def inspect_pid(pid: int, root: str = "/") -> ProcThp:
    """The THP state of process ``pid`` (InspectError if it is gone or cannot be read)."""
    try:
        vmas = procfs.read_smaps(pid, root)
    except LabError as exc:
        if not os.path.exists(os.path.join(root, "proc", str(pid))):
            raise InspectError(f"pid {pid}: no such process") from None
        raise InspectError(f"pid {pid}: {exc}") from None
    out, scanned_all = [], True
    try:
        for v in vmas:
            if _anonymous(v):
                r, scanned = inspect_vma(pid, v, root)
                scanned_all &= scanned
                out.append(r)
    except LabError as exc:
        if not os.path.exists(os.path.join(root, "proc", str(pid))):
            raise InspectError(f"pid {pid}: exited while it was read") from None
        raise InspectError(str(exc)) from None
    return ProcThp(pid, _comm(pid, root), out, "PAGEMAP_SCAN" if scanned_all else "smaps AnonHugePages")


def cgroup_pids(path: str) -> list[int]:
    """The processes of a cgroup v2 directory (cgroup.procs), InspectError if it cannot be read."""
    procs = os.path.join(path, "cgroup.procs")
    try:
        with open(procs) as fh:
            return [int(x) for x in fh.read().split()]
    except OSError as exc:
        raise InspectError(f"--cgroup={path}: cannot read {procs}: {exc.strerror}") from None


def all_pids(root: str = "/") -> list[int]:
    """Every process with an address space (kernel threads have none)."""
    out = []
    for name in os.listdir(os.path.join(root, "proc")):
        if name.isdigit():
            try:
                with open(os.path.join(root, "proc", name, "statm")) as fh:
                    if int(fh.read().split()[0]) > 0:
                        out.append(int(name))
            except (OSError, ValueError, IndexError):
                continue
    return sorted(out)


def watch(pids, seconds: float, fn, count: int | None = None) -> None:
    """Call ``fn(results)`` every ``seconds`` (``count`` times, or until interrupted)."""
    n = 0
    while count is None or n < count:
        fn([inspect_pid(p) for p in pids], time.time())
        n += 1
        if count is not None and n >= count:
            break
        time.sleep(seconds)
