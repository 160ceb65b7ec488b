"""Random programs on the simulated kernel: a syscall fuzzer and a batch-vs-scalar store oracle.

Two kinds of random test live here (style guide, point 15):

1. :class:`SyscallMachine`, a Hypothesis ``RuleBasedStateMachine`` whose rules are system calls
   on a small machine (``Kernel(ram=512 << 20, check=True)``, so page_table_check and the
   refcount/mapcount invariants run after every call).  A reference model keeps, per process,
   the mapped pages with their VMA attributes and the token every page must read, updated as
   Linux says.  Invariants compare the model with the kernel after every step.  A failure is
   printed by Hypothesis as a runnable ``state = SyscallMachine(); state.rule(...)`` program;
   the concrete Kernel-API calls the rules made are printed after it (``note``).
   :class:`SwapSyscallMachine` runs the same rules with a swap device plus MADV_PAGEOUT,
   MADV_COLD and reclaim (contents must survive swap; only MADV_FREE'd pages may read 0).

2. The batch-vs-scalar oracle: the same program runs on two kernels; one applies every store
   batch with ``Process.write_many`` (``access.write_pages``, the batched path), the other
   with ``Process.write_many_scalar`` (one page at a time, the reference).  After each step a
   canonical state that does not depend on which frames the allocator picked must be equal.
   Programs come from a table of hand-written scenarios, from Hypothesis and from seeded
   numpy RNGs.  On a divergence the message shows the first differing field and a runnable
   script of the program.

3. Minimal reproducers of the simulator bugs these found (regression tests now).

The file runs in about 20 s (``python3 -m pytest tests/test_random_programs.py -q``).
"""

from __future__ import annotations

import bisect
import errno as E

import numpy as np
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from thpcow.kernel import (
    MADV_DOFORK, MADV_DONTFORK, MADV_DONTNEED, MADV_FREE, MADV_HUGEPAGE, MADV_KEEPONFORK,
    MADV_COLD, MADV_COLLAPSE, MADV_NOHUGEPAGE, MADV_PAGEOUT, MADV_WIPEONFORK, MAP_FIXED, MAP_POPULATE,
    MREMAP_DONTUNMAP, MREMAP_FIXED, MREMAP_MAYMOVE, PAGE_SHIFT, PAGE_SIZE, PROT_READ,
    VM_DONTCOPY, VM_HUGEPAGE, VM_NOHUGEPAGE, VM_WIPEONFORK, VM_WRITE, Kernel, KernelError,
    SegmentationFault,
)
from thpcow.kernel.access import entry_state, resolve_pfns
from thpcow.kernel.constants import HPAGE_PMD_NR, HPAGE_PMD_SIZE, MADV_NAMES
from thpcow.kernel.folio import (
    PG_ANON, PG_DEFERRED, PG_DIRTY, PG_HUGE_ZERO, PG_LRU, PG_MM_IDS_SHARED, PG_PARTIALLY_MAPPED,
    PG_SWAPBACKED,
)
from thpcow.kernel.mm import PMD_LEAF, PMD_TABLE, _PAGE_ACCESSED, _PAGE_DIRTY, _PAGE_RW, _PAGE_SPECIAL
from thpcow.kernel.page_alloc import PG_ANON_EXCLUSIVE
from thpcow.kernel.task_mmu import kpagecount

from conftest import ANON, RW, THP_RAM

RAM = THP_RAM

# Model attribute bits of a mapped page (one per VMA flag the model follows).
A_W, A_DC, A_WF, A_HG, A_NH = 1, 2, 4, 8, 16
_VM_TO_ATTR = ((VM_WRITE, A_W), (VM_DONTCOPY, A_DC), (VM_WIPEONFORK, A_WF), (VM_HUGEPAGE, A_HG),
               (VM_NOHUGEPAGE, A_NH))
# advice -> (attrs set, attrs cleared); the other advice leaves the attributes alone.
_ADVICE_ATTRS = {
    MADV_HUGEPAGE: (A_HG, A_NH), MADV_NOHUGEPAGE: (A_NH, A_HG),
    MADV_DONTFORK: (A_DC, 0), MADV_DOFORK: (0, A_DC),
    MADV_WIPEONFORK: (A_WF, 0), MADV_KEEPONFORK: (0, A_WF),
}
ADVICES = (MADV_HUGEPAGE, MADV_NOHUGEPAGE, MADV_DONTNEED, MADV_FREE, MADV_DONTFORK, MADV_DOFORK,
           MADV_WIPEONFORK, MADV_KEEPONFORK)
SYSFS_CHOICES = (
    ("enabled", "always"), ("enabled", "madvise"), ("enabled", "never"),
    ("hugepages-64kB/enabled", "always"), ("hugepages-64kB/enabled", "never"),
    ("hugepages-16kB/enabled", "always"), ("hugepages-16kB/enabled", "never"),
    ("use_zero_page", "1"), ("use_zero_page", "0"),
)
# Mapping sizes in pages: 4 KiB .. 8 MiB, some multiples of 2 MiB, some just off them.
MAP_PAGES = (1, 3, 4, 16, 25, 256, 511, 512, 513, 1024, 1100, 1536, 2048)
MAX_PROCS = 4
MAX_MAPPED_PAGES = 12 << 10          # 48 MiB per process keeps 4 processes well inside 512 MiB


def vm_attrs(flags: int) -> int:
    return sum(a for vm, a in _VM_TO_ATTR if flags & vm)


def kernel_runs(p) -> list[tuple[int, int, int]]:
    """The process's VMAs as (first page, end page, model attrs), adjacent equal runs merged."""
    return merge_runs((v.start >> PAGE_SHIFT, v.end >> PAGE_SHIFT, vm_attrs(v.flags)) for v in p.vmas())


def merge_runs(runs) -> list[tuple[int, int, int]]:
    out: list[list[int]] = []
    for lo, hi, a in runs:
        if out and out[-1][1] == lo and out[-1][2] == a:
            out[-1][1] = hi
        else:
            out.append([lo, hi, a])
    return [tuple(r) for r in out]


def vma_pages(p, writable_only: bool = False) -> np.ndarray:
    """Every page (number) of the process's VMAs, ascending."""
    parts = [np.arange(v.start >> PAGE_SHIFT, v.end >> PAGE_SHIFT, dtype=np.int64) for v in p.vmas()
             if not writable_only or v.flags & VM_WRITE]
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


def peek_tokens(k: Kernel, mm, pages: np.ndarray) -> np.ndarray:
    """The token of every page without faulting: 0 where nothing is mapped, the swap slot's
    content for a swap entry (PTE value <= -2, swp_offset())."""
    pfn = resolve_pfns(k, mm, pages)
    out = np.zeros(len(pages), dtype=np.int64)
    present = pfn >= 0
    out[present] = k.mem.content[pfn[present]]
    swapped = pfn <= -2
    if swapped.any():
        out[swapped] = k.swap.content[-2 - pfn[swapped]]
    return out


def err_name(exc: KernelError) -> str:
    if isinstance(exc, SegmentationFault):
        return f"SIGSEGV@{exc.addr:#x}"
    return E.errorcode.get(exc.errno, str(exc.errno))


# =====================================================================================
# 1. The reference model and the syscall state machine
# =====================================================================================
class Ranges:
    """Mapped pages of one process as sorted, disjoint [lo, hi, attrs] runs (page numbers).

    Runs are never merged on update (VMA merging is the kernel's business); compare with
    :meth:`normalized`.
    """

    def __init__(self, runs=()) -> None:
        self.runs = [list(r) for r in runs]

    def copy(self) -> "Ranges":
        return Ranges(self.runs)

    def _cut(self, x: int) -> None:
        for i, (lo, hi, a) in enumerate(self.runs):
            if lo < x < hi:
                self.runs[i: i + 1] = [[lo, x, a], [x, hi, a]]
                return

    def pieces(self, lo: int, hi: int) -> list[list[int]]:
        """The runs covering [lo, hi), cut at lo and hi (the list items are live)."""
        self._cut(lo)
        self._cut(hi)
        return [r for r in self.runs if r[0] < hi and r[1] > lo]

    def remove(self, lo: int, hi: int) -> None:
        self._cut(lo)
        self._cut(hi)
        self.runs = [r for r in self.runs if not (r[0] < hi and r[1] > lo)]

    def add(self, lo: int, hi: int, attrs: int) -> None:
        assert not self.pieces(lo, hi), f"model: adding [{lo:#x}, {hi:#x}) over mapped pages"
        bisect.insort(self.runs, [lo, hi, attrs])

    def covered_until(self, lo: int, hi: int) -> int:
        """The first page in [lo, hi) that is not mapped, or hi."""
        x = lo
        for r in self.runs:
            if r[1] <= x:
                continue
            if r[0] > x:
                break
            x = r[1]
            if x >= hi:
                return hi
        return min(x, hi)

    def attrs_at(self, page: int) -> int | None:
        i = bisect.bisect_right(self.runs, [page, float("inf")]) - 1
        if i >= 0 and self.runs[i][0] <= page < self.runs[i][1]:
            return self.runs[i][2]
        return None

    def total(self) -> int:
        return sum(hi - lo for lo, hi, _ in self.runs)

    def normalized(self) -> list[tuple[int, int, int]]:
        return merge_runs(tuple(r) for r in self.runs)


class PModel:
    """The model of one process: its mapped pages and the tokens they must read (absent: 0).

    ``lazy`` holds the pages that were MADV_FREE'd and not stored to since: reclaim may
    discard them, so they read either their token or 0 (once 0, always 0).
    """

    def __init__(self, proc, ranges: Ranges | None = None, mem: dict[int, int] | None = None,
                 lazy: set[int] | None = None) -> None:
        self.proc = proc
        self.ranges = ranges or Ranges()
        self.mem = mem or {}
        self.lazy = lazy or set()

    def drop(self, lo: int, hi: int) -> None:
        """Contents of [lo, hi) are gone (munmap, MADV_DONTNEED, a fresh mapping): they read 0."""
        if hi - lo < len(self.mem):
            for pg in range(lo, hi):
                self.mem.pop(pg, None)
                self.lazy.discard(pg)
        else:
            for pg in [pg for pg in self.mem if lo <= pg < hi]:
                del self.mem[pg]
                self.lazy.discard(pg)

    def settle(self, pages: np.ndarray, got: np.ndarray) -> None:
        """Lazyfree pages seen reading 0 were discarded by reclaim: they stay 0 from now on."""
        for pg in pages[got == 0].tolist():
            if pg in self.lazy:
                self.lazy.discard(pg)
                self.mem.pop(pg, None)

    def want(self, pages: np.ndarray, got: np.ndarray) -> np.ndarray:
        """The tokens the model expects for ``pages``, given what was read (for lazy pages)."""
        want = np.array([self.mem.get(pg, 0) for pg in pages.tolist()], dtype=np.int64)
        if self.lazy:
            lazy = np.fromiter((pg in self.lazy for pg in pages.tolist()), dtype=bool, count=len(pages))
            want[lazy & (got == 0)] = 0
        return want


class SyscallMachine(RuleBasedStateMachine):
    """System calls on a 512 MiB simulated machine, checked against a reference model.

    Rule arguments are plain numbers interpreted against the current state (``who`` picks a
    live process, ``where`` a page of its mappings), so a printed failing program replays
    exactly.  Every kernel call is also logged as Kernel-API code (noted on failure).
    """

    SWAP = 0                         # bytes of swap device (0: none, as in the brief)

    def __init__(self) -> None:
        super().__init__()
        self.k = Kernel(ram=RAM, check=True, swap=self.SWAP)
        p = self.k.spawn()
        self.models: dict[int, PModel] = {p.pid: PModel(p)}
        self.next_token = 0
        self.script = ["import numpy as np", "from thpcow.kernel import *",
                       f"k = Kernel(ram={RAM >> 20} << 20, check=True, swap={self.SWAP >> 20} << 20)",
                       f"p{p.pid} = k.spawn()"]

    # -- helpers ---------------------------------------------------------------------
    def _pm(self, who: int) -> PModel:
        pids = sorted(self.models)
        return self.models[pids[who % len(pids)]]

    def _log(self, line: str) -> None:
        self.script.append(line)

    def _page_at(self, pm: PModel, where: int) -> int | None:
        """The ``where``-th mapped page of the process (modulo), or None without mappings."""
        pages = vma_pages(pm.proc)
        return int(pages[where % len(pages)]) if len(pages) else None

    def _tokens(self, n: int) -> np.ndarray:
        toks = np.arange(self.next_token + 1, self.next_token + 1 + n, dtype=np.int64)
        self.next_token += n
        return toks

    def _call(self, text: str, fn, *args):
        """Run one kernel call; returns (result, error name or None)."""
        self._log(text)
        try:
            return fn(*args), None
        except KernelError as exc:
            self._log(f"# -> {err_name(exc)}")
            return None, exc

    def _store_model(self, pm: PModel, pages, tokens) -> int:
        """Apply stores in order to the model; returns the index of the faulting one or -1."""
        for i, (pg, tok) in enumerate(zip(pages, tokens)):
            a = pm.ranges.attrs_at(pg)
            if a is None or not a & A_W:
                return i
            if tok:
                pm.mem[pg] = tok
            else:
                pm.mem.pop(pg, None)
            pm.lazy.discard(pg)
        return -1

    @initialize(npages=st.sampled_from([512, 1024, 1100, 2048]), advice=st.sampled_from([MADV_HUGEPAGE] * 3 + [0]),
                touch=st.integers(0, 2048), fork=st.booleans())
    def start(self, npages, advice, touch, fork):
        """Most programs start from a populated (THP) mapping, often already shared by fork."""
        self.mmap(who=0, npages=npages, ro=False, populate=False, fixed=None, advice=advice)
        if touch:
            self.write(who=0, where=0, npages=min(touch, npages), offset=0)
        if fork:
            self.fork(who=0)

    # -- mappings ----------------------------------------------------------------------
    @rule(who=st.integers(0, 7), npages=st.sampled_from(MAP_PAGES), ro=st.sampled_from([False] * 4 + [True]),
          populate=st.sampled_from([False] * 4 + [True]), fixed=st.none() | st.integers(0, 1 << 20),
          advice=st.sampled_from([0, 0, MADV_HUGEPAGE, MADV_HUGEPAGE, MADV_NOHUGEPAGE]))
    def mmap(self, who, npages, ro, populate, fixed, advice):
        """mmap(), then (``advice``) madvise() of the whole new mapping, as programs do."""
        pm = self._pm(who)
        if pm.ranges.total() + npages > MAX_MAPPED_PAGES:
            return
        prot = PROT_READ if ro else RW
        flags = ANON | (MAP_POPULATE if populate else 0)
        addr = 0
        if fixed is not None:
            pg = self._page_at(pm, fixed)
            if pg is not None:
                addr = pg << PAGE_SHIFT
                flags |= MAP_FIXED
        p = pm.proc
        got, exc = self._call(f"p{p.pid}.mmap({npages << PAGE_SHIFT:#x}, {prot}, {flags:#x}, {addr:#x})",
                              p.mmap, npages << PAGE_SHIFT, prot, flags, addr)
        assert exc is None, f"mmap failed: {exc}"
        lo = got >> PAGE_SHIFT
        if flags & MAP_FIXED:
            assert got == addr, f"MAP_FIXED mmap at {addr:#x} returned {got:#x}"
            pm.ranges.remove(lo, lo + npages)
        else:
            assert got % PAGE_SIZE == 0
            if npages % HPAGE_PMD_NR == 0:   # thp_get_unmapped_area() (v6.7+, PMD-multiple lengths)
                assert got % HPAGE_PMD_SIZE == 0, f"mmap of {npages} pages at {got:#x}: not 2 MiB aligned"
        pm.drop(lo, lo + npages)
        pm.ranges.add(lo, lo + npages, 0 if ro else A_W)
        if advice:
            _, exc = self._call(f"p{p.pid}.madvise({got:#x}, {npages << PAGE_SHIFT:#x}, {MADV_NAMES[advice]})",
                                p.madvise, got, npages << PAGE_SHIFT, advice)
            assert exc is None, f"madvise of a fresh mapping failed: {exc}"
            set_, clear = _ADVICE_ATTRS[advice]
            for r in pm.ranges.pieces(lo, lo + npages):
                r[2] = (r[2] | set_) & ~clear

    @rule(who=st.integers(0, 7), where=st.integers(0, 1 << 20), shift=st.integers(-600, 600),
          npages=st.integers(1, 3000))
    def munmap(self, who, where, shift, npages):
        pm = self._pm(who)
        pg = self._page_at(pm, where)
        if pg is None:
            return
        lo = pg + shift
        p = pm.proc
        _, exc = self._call(f"p{p.pid}.munmap({lo << PAGE_SHIFT:#x}, {npages << PAGE_SHIFT:#x})",
                            p.munmap, lo << PAGE_SHIFT, npages << PAGE_SHIFT)
        assert exc is None, f"munmap failed: {exc}"
        pm.ranges.remove(lo, lo + npages)
        pm.drop(lo, lo + npages)

    @rule(who=st.integers(0, 7), where=st.integers(0, 1 << 20), shift=st.integers(-64, 64),
          npages=st.integers(1, 2048), writable=st.booleans())
    def mprotect(self, who, where, shift, npages, writable):
        pm = self._pm(who)
        pg = self._page_at(pm, where)
        if pg is None:
            return
        lo, hi = pg + shift, pg + shift + npages
        prot = RW if writable else PROT_READ
        p = pm.proc
        _, exc = self._call(f"p{p.pid}.mprotect({lo << PAGE_SHIFT:#x}, {npages << PAGE_SHIFT:#x}, {prot})",
                            p.mprotect, lo << PAGE_SHIFT, npages << PAGE_SHIFT, prot)
        # do_mprotect_pkey(): ENOMEM with nothing changed when start is unmapped; otherwise the
        # VMAs up to the first hole take the new protection and the hole gives ENOMEM.
        stop = pm.ranges.covered_until(lo, hi) if pm.ranges.attrs_at(lo) is not None else lo
        expect = None if stop == hi else "ENOMEM"
        got = None if exc is None else err_name(exc)
        assert got == expect, f"mprotect [{lo << PAGE_SHIFT:#x}, +{npages} pages): got {got}, expected {expect}"
        for r in pm.ranges.pieces(lo, stop) if stop > lo else []:
            r[2] = (r[2] | A_W) if writable else (r[2] & ~A_W)

    @rule(who=st.integers(0, 7), where=st.integers(0, 1 << 20), shift=st.integers(-64, 64),
          npages=st.integers(1, 2048), advice=st.sampled_from(ADVICES))
    def madvise(self, who, where, shift, npages, advice):
        pm = self._pm(who)
        pg = self._page_at(pm, where)
        if pg is None:
            return
        lo, hi = pg + shift, pg + shift + npages
        p = pm.proc
        _, exc = self._call(f"p{p.pid}.madvise({lo << PAGE_SHIFT:#x}, {npages << PAGE_SHIFT:#x}, "
                            f"{MADV_NAMES[advice]})", p.madvise, lo << PAGE_SHIFT, npages << PAGE_SHIFT, advice)
        # madvise_walk_vmas(): the advice applies to every mapped part; a hole anywhere is ENOMEM.
        covered = sum(min(r[1], hi) - max(r[0], lo) for r in pm.ranges.runs if r[0] < hi and r[1] > lo)
        expect = None if covered == npages else "ENOMEM"
        got = None if exc is None else err_name(exc)
        assert got == expect, f"madvise {MADV_NAMES[advice]}: got {got}, expected {expect}"
        pieces = pm.ranges.pieces(lo, hi)
        if advice in _ADVICE_ATTRS:
            set_, clear = _ADVICE_ATTRS[advice]
            for r in pieces:
                r[2] = (r[2] | set_) & ~clear
        elif advice == MADV_DONTNEED:
            for r in pieces:
                pm.drop(r[0], r[1])
        elif advice == MADV_FREE:
            # Lazily freeable: the contents stay until reclaim discards a clean page (then 0).
            pm.lazy.update(pg for pg in pm.mem if any(r[0] <= pg < r[1] for r in pieces))

    @rule(who=st.integers(0, 7), where=st.integers(0, 1 << 20), shift=st.integers(-600, 600),
          npages=st.integers(1, 2048), whole=st.booleans())
    def collapse(self, who, where, shift, npages, whole):
        """MADV_COLLAPSE (of one whole VMA, or of any range): contents stay; success means THPs."""
        pm = self._pm(who)
        pg = self._page_at(pm, where)
        if pg is None:
            return
        lo, hi = pg + shift, pg + shift + npages
        if whole:
            v = pm.proc.mm.find_vma(pg << PAGE_SHIFT)
            lo, hi = v.start >> PAGE_SHIFT, v.end >> PAGE_SHIFT
            npages = hi - lo
        p = pm.proc
        _, exc = self._call(f"p{p.pid}.madvise({lo << PAGE_SHIFT:#x}, {npages << PAGE_SHIFT:#x}, MADV_COLLAPSE)",
                            p.madvise, lo << PAGE_SHIFT, npages << PAGE_SHIFT, MADV_COLLAPSE)
        covered = sum(min(r[1], hi) - max(r[0], lo) for r in pm.ranges.runs if r[0] < hi and r[1] > lo)
        got = None if exc is None else err_name(exc)
        if covered != npages:
            # madvise_walk_vmas(): ENOMEM for the hole, unless a VMA failed on its own first.
            assert got in ("ENOMEM", "EINVAL", "EAGAIN", "EBUSY"), f"MADV_COLLAPSE over a hole: got {got}"
            return
        assert got in (None, "EINVAL", "ENOMEM", "EAGAIN", "EBUSY"), f"MADV_COLLAPSE: unexpected {got}"
        if got is None:
            # Each VMA's part of the range is rounded inward on its own: a block across a VMA
            # boundary is left as it is.
            blocks = [b for b in range(-(-lo // HPAGE_PMD_NR), hi // HPAGE_PMD_NR)
                      if (v := p.mm.find_vma(b * HPAGE_PMD_SIZE)) is not None and
                      v.end >= (b + 1) * HPAGE_PMD_SIZE]
            blocks = np.array(blocks, dtype=np.int64)
            if len(blocks):
                _, kind, *_ = entry_state(p.mm, blocks * HPAGE_PMD_NR)
                assert (kind == PMD_LEAF).all(), "MADV_COLLAPSE succeeded but a 2 MiB block is not PMD-mapped"

    @rule(who=st.integers(0, 7), vma=st.integers(0, 63), off=st.integers(0, 1 << 16), length=st.integers(1, 1 << 16),
          mode=st.sampled_from(["shrink", "grow", "grow_maymove", "move_fixed", "dontunmap"]),
          extra=st.integers(1, 1536), dest=st.integers(0, 1 << 20))
    def mremap(self, who, vma, off, length, mode, extra, dest):
        pm = self._pm(who)
        p = pm.proc
        vmas = p.vmas()
        if not vmas:
            return
        v = vmas[vma % len(vmas)]
        vlo, vhi = v.start >> PAGE_SHIFT, v.end >> PAGE_SHIFT
        old_lo = vlo + off % (vhi - vlo)
        old_n = 1 + length % (vhi - old_lo)
        attrs = pm.ranges.attrs_at(old_lo)
        assert all(r[2] == attrs for r in pm.ranges.pieces(old_lo, old_lo + old_n)), "one VMA, mixed attrs"
        flags, new_addr = 0, 0
        if mode == "shrink":
            if old_n == 1:
                return
            new_n = 1 + extra % (old_n - 1)
        elif mode == "grow":
            new_n = old_n + extra
        elif mode == "grow_maymove":
            new_n, flags = old_n + extra, MREMAP_MAYMOVE
        elif mode == "move_fixed":
            new_n, flags = max(1, old_n + extra - 768), MREMAP_MAYMOVE | MREMAP_FIXED
        else:
            new_n, flags = old_n, MREMAP_MAYMOVE | MREMAP_DONTUNMAP
            if dest % 2:
                flags |= MREMAP_FIXED
        if pm.ranges.total() + max(0, new_n - old_n) > MAX_MAPPED_PAGES:
            return
        if flags & MREMAP_FIXED:
            # Over another mapping of this process, or into free space far away.
            pg = self._page_at(pm, dest) if dest % 3 else None
            new_lo = pg if pg is not None else (0x5000_0000_0000 >> PAGE_SHIFT) + (dest % 4096) * 37
            if new_lo < old_lo + old_n and old_lo < new_lo + new_n:
                return
            new_addr = new_lo << PAGE_SHIFT
        old_end = old_lo + old_n
        in_place = mode in ("grow", "grow_maymove") and vhi == old_end and \
            not pm.ranges.pieces(old_end, old_lo + new_n)
        got, exc = self._call(f"p{p.pid}.mremap({old_lo << PAGE_SHIFT:#x}, {old_n << PAGE_SHIFT:#x}, "
                              f"{new_n << PAGE_SHIFT:#x}, {flags}, {new_addr:#x})",
                              p.mremap, old_lo << PAGE_SHIFT, old_n << PAGE_SHIFT, new_n << PAGE_SHIFT, flags,
                              new_addr)
        if mode == "grow" and not in_place:
            assert exc is not None and exc.errno == E.ENOMEM, f"mremap grow without MAYMOVE: got {exc}"
            return
        assert exc is None, f"mremap {mode}: {exc}"
        new_lo = got >> PAGE_SHIFT
        if mode == "shrink" or in_place:
            assert new_lo == old_lo, f"mremap {mode} moved the mapping to {got:#x}"
            if new_n < old_n:
                pm.ranges.remove(old_lo + new_n, old_end)
                pm.drop(old_lo + new_n, old_end)
            else:
                pm.ranges.add(old_end, old_lo + new_n, attrs)
            return
        if flags & MREMAP_FIXED:
            assert got == new_addr, f"MREMAP_FIXED to {new_addr:#x} returned {got:#x}"
            pm.ranges.remove(new_lo, new_lo + new_n)
            pm.drop(new_lo, new_lo + new_n)
        else:
            assert new_lo != old_lo and not pm.ranges.pieces(new_lo, new_lo + new_n), \
                f"mremap moved onto mapped pages at {got:#x}"
        moved = min(old_n, new_n)
        if new_n < old_n:
            pm.ranges.remove(old_lo + new_n, old_end)
            pm.drop(old_lo + new_n, old_end)
        carried = {pg - old_lo + new_lo: tok for pg, tok in pm.mem.items() if old_lo <= pg < old_lo + moved}
        carried_lazy = {pg - old_lo + new_lo for pg in pm.lazy if old_lo <= pg < old_lo + moved}
        pm.drop(old_lo, old_lo + moved)
        if not flags & MREMAP_DONTUNMAP:
            pm.ranges.remove(old_lo, old_lo + moved)     # DONTUNMAP: the old range stays, empty
        pm.ranges.add(new_lo, new_lo + new_n, attrs)
        pm.mem.update(carried)
        pm.lazy |= carried_lazy

    # -- processes -----------------------------------------------------------------------
    @precondition(lambda self: len(self.models) < MAX_PROCS)
    @rule(who=st.integers(0, 7))
    def fork(self, who):
        pm = self._pm(who)
        p = pm.proc
        child, exc = self._call(f"p{self.k._next_pid} = p{p.pid}.fork()", p.fork)
        assert exc is None, f"fork failed: {exc}"
        # dup_mmap(): VM_DONTCOPY VMAs vanish, VM_WIPEONFORK ones are empty in the child.
        ranges = Ranges(r for r in pm.ranges.runs if not r[2] & A_DC)
        mem = {}
        for pg, tok in pm.mem.items():
            a = pm.ranges.attrs_at(pg)
            if not a & (A_DC | A_WF):
                mem[pg] = tok
        self.models[child.pid] = PModel(child, ranges, mem, {pg for pg in pm.lazy if pg in mem})

    @precondition(lambda self: len(self.models) > 1)
    @rule(who=st.integers(0, 7))
    def exit(self, who):
        pm = self._pm(who)
        _, exc = self._call(f"p{pm.proc.pid}.exit()", pm.proc.exit)
        assert exc is None, f"exit failed: {exc}"
        del self.models[pm.proc.pid]

    # -- accesses ------------------------------------------------------------------------
    @rule(who=st.integers(0, 7), where=st.integers(0, 1 << 20), npages=st.integers(1, 600),
          offset=st.sampled_from([0, 0, 1, 4095]))
    def write(self, who, where, npages, offset):
        pm = self._pm(who)
        pg = self._page_at(pm, where)
        if pg is None:
            return
        (tok,) = self._tokens(1)
        addr = (pg << PAGE_SHIFT) + offset
        length = (npages << PAGE_SHIFT) - offset
        p = pm.proc
        _, exc = self._call(f"p{p.pid}.write({addr:#x}, {length:#x}, token={tok})", p.write, addr, length, tok)
        bad = self._store_model(pm, range(pg, pg + npages), [tok] * npages)
        # si_addr is the first byte of the faulting page that the store touches.
        expect = None if bad < 0 else f"SIGSEGV@{addr if bad == 0 else (pg + bad) << PAGE_SHIFT:#x}"
        got = None if exc is None else err_name(exc)
        assert got == expect, f"write {npages} pages at {addr:#x}: got {got}, expected {expect}"

    @rule(who=st.integers(0, 7), seed=st.integers(0, 1 << 16), n=st.integers(1, 512),
          style=st.sampled_from(["uniform", "dense", "repeat", "cluster"]), ro_ok=st.sampled_from([False] * 3 + [True]))
    def write_many(self, who, seed, n, style, ro_ok):
        pm = self._pm(who)
        pool = vma_pages(pm.proc, writable_only=not ro_ok)
        if not len(pool):
            return
        pages = random_pages(np.random.default_rng(seed), pool, n, style)
        addrs = (pages << PAGE_SHIFT) + np.random.default_rng(seed + 1).integers(0, PAGE_SIZE, len(pages))
        toks = self._tokens(len(pages))
        p = pm.proc
        _, exc = self._call(f"p{p.pid}.write_many({_arr(addrs)}, {_arr(toks)})", p.write_many, addrs, toks)
        bad = self._store_model(pm, pages.tolist(), toks.tolist())
        expect = None if bad < 0 else f"SIGSEGV@{int(addrs[bad]):#x}"
        got = None if exc is None else err_name(exc)
        assert got == expect, f"write_many: got {got}, expected {expect}"

    @rule(who=st.integers(0, 7), seed=st.integers(0, 1 << 16), n=st.integers(1, 128))
    def read(self, who, seed, n):
        """Loads through the fault path (read faults map the zero pages: they read 0)."""
        pm = self._pm(who)
        pool = vma_pages(pm.proc)
        if not len(pool):
            return
        pages = np.random.default_rng(seed).choice(pool, size=min(n, len(pool)), replace=False)
        p = pm.proc
        got, exc = self._call(f"p{p.pid}.read_many({_arr(pages << PAGE_SHIFT)})", p.read_many, pages << PAGE_SHIFT)
        assert exc is None, f"read_many: {exc}"
        _assert_tokens(p.pid, pages, got, pm.want(pages, got), "read_many")
        pm.settle(pages, got)

    @rule(knob=st.sampled_from(SYSFS_CHOICES))
    def sysfs(self, knob):
        path, value = knob
        self._log(f"k.sysfs.write({path!r}, {value!r})")
        self.k.sysfs.write(path, value)

    # -- invariants -----------------------------------------------------------------------
    @invariant()
    def memory_matches_model(self):
        """Every process's VMAs and every mapped page's token equal the model (no faulting)."""
        assert sorted(self.models) == sorted(self.k.procs), "live processes differ from the model"
        for pid, pm in self.models.items():
            got_runs = kernel_runs(pm.proc)
            want_runs = pm.ranges.normalized()
            assert got_runs == want_runs, f"p{pid}: VMAs (page runs, attrs) {_runs(got_runs)} != model {_runs(want_runs)}"
            pages = vma_pages(pm.proc)
            if not len(pages):
                continue
            got = peek_tokens(self.k, pm.proc.mm, pages)
            want = np.zeros(len(pages), dtype=np.int64)
            if pm.mem:
                keys = np.fromiter(pm.mem.keys(), dtype=np.int64)
                vals = np.fromiter(pm.mem.values(), dtype=np.int64)
                want[np.searchsorted(pages, keys)] = vals
            if pm.lazy:
                lazy = np.fromiter(pm.lazy, dtype=np.int64)
                idx = np.searchsorted(pages, lazy)
                want[idx[got[idx] == 0]] = 0
            _assert_tokens(pid, pages, got, want, "memory")
            pm.settle(pages, got)

    def teardown(self):
        note("Kernel API calls of this run:\n" + "\n".join(self.script))
        self.k.check()


def _num(x: int) -> str:
    return hex(x) if x > 1 << 20 else str(x)


def _arr(a) -> str:
    """Source text for an int array: np.arange() for an arithmetic run, else a literal."""
    a = [int(x) for x in a]
    if len(a) > 2 and len(set(np.diff(a).tolist())) == 1 and a[1] != a[0]:
        step = a[1] - a[0]
        return f"np.arange({_num(a[0])}, {_num(a[-1] + step)}, {_num(step) if step > 0 else step})"
    return "np.array([" + ", ".join(_num(x) for x in a) + "])"


def _op_repr(op: tuple) -> str:
    """An op with long offset tuples written as tuple(range(...)) when they are runs."""
    parts = []
    for x in op:
        if isinstance(x, tuple) and len(x) > 2 and len(set(np.diff(x).tolist())) == 1 and x[1] != x[0]:
            parts.append(f"tuple(range({x[0]}, {x[-1] + x[1] - x[0]}, {x[1] - x[0]}))")
        else:
            parts.append(repr(x))
    return "(" + ", ".join(parts) + ("," if len(parts) == 1 else "") + ")"


def _runs(runs) -> str:
    return "[" + ", ".join(f"{lo << PAGE_SHIFT:#x}-{hi << PAGE_SHIFT:#x}:{a:#x}" for lo, hi, a in runs) + "]"


def _assert_tokens(pid, pages, got, want, what) -> None:
    bad = np.flatnonzero(np.asarray(got) != want)
    if len(bad):
        i = int(bad[0])
        raise AssertionError(f"p{pid} {what}: page {int(pages[i]) << PAGE_SHIFT:#x} reads {int(got[i])}, "
                             f"the model says {int(want[i])} ({len(bad)} pages differ)")


def random_pages(rng: np.random.Generator, pool: np.ndarray, n: int, style: str) -> np.ndarray:
    """``n`` store targets drawn from ``pool`` (sorted page numbers) in one of four shapes."""
    if style == "uniform":                       # sparse, with repeats
        return rng.choice(pool, size=n)
    if style == "dense":                         # a run of consecutive mapped pages
        i = int(rng.integers(0, len(pool)))
        return pool[i: i + n]
    if style == "repeat":                        # a handful of pages, stored many times
        few = rng.choice(pool, size=min(len(pool), int(rng.integers(1, 4))))
        return rng.choice(few, size=n)
    # cluster: pages around one 2 MiB block, shuffled, with repeats
    centre = int(rng.choice(pool))
    block = pool[(pool >> 9) == (centre >> 9)]
    return rng.choice(block, size=n)


TestSyscallFuzzer = SyscallMachine.TestCase
TestSyscallFuzzer.settings = settings(max_examples=40, stateful_step_count=30, deadline=None,
                                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class SwapSyscallMachine(SyscallMachine):
    """The same machine with a 64 MiB swap device, plus reclaim: MADV_PAGEOUT, MADV_COLD and
    kswapd-style reclaim runs.  Contents must survive swap-out, swap-in, fork of swap entries
    and COW of swapped-in pages; only MADV_FREE'd clean pages may be dropped (they read 0)."""

    SWAP = 64 << 20

    @rule(who=st.integers(0, 7), where=st.integers(0, 1 << 20), shift=st.integers(-64, 64),
          npages=st.integers(1, 2048), pageout=st.booleans())
    def cold_or_pageout(self, who, where, shift, npages, pageout):
        """madvise_cold_or_pageout(): the contents stay (in memory or in swap); holes are ENOMEM."""
        pm = self._pm(who)
        pg = self._page_at(pm, where)
        if pg is None:
            return
        lo, hi = pg + shift, pg + shift + npages
        advice = MADV_PAGEOUT if pageout else MADV_COLD
        p = pm.proc
        _, exc = self._call(f"p{p.pid}.madvise({lo << PAGE_SHIFT:#x}, {npages << PAGE_SHIFT:#x}, "
                            f"{MADV_NAMES[advice]})", p.madvise, lo << PAGE_SHIFT, npages << PAGE_SHIFT, advice)
        covered = sum(min(r[1], hi) - max(r[0], lo) for r in pm.ranges.runs if r[0] < hi and r[1] > lo)
        got = None if exc is None else err_name(exc)
        assert got == (None if covered == npages else "ENOMEM"), f"madvise {MADV_NAMES[advice]}: got {got}"

    @rule(pages=st.sampled_from([32, 512, 4096, 1 << 16]))
    def reclaim(self, pages):
        """kswapd: the deferred split shrinker, then LRU reclaim of up to ``pages``."""
        self._log(f"k.reclaim({pages})")
        self.k.reclaim(pages)


TestSwapSyscallFuzzer = SwapSyscallMachine.TestCase
TestSwapSyscallFuzzer.settings = settings(max_examples=30, stateful_step_count=30, deadline=None,
                                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# =====================================================================================
# 2. Batched stores versus the scalar reference
# =====================================================================================
_FOLIO_FLAGS_COMPARED = PG_ANON | PG_SWAPBACKED | PG_DIRTY | PG_LRU | PG_DEFERRED | PG_PARTIALLY_MAPPED | \
    PG_MM_IDS_SHARED | PG_HUGE_ZERO
PAGE_FIELDS = ("kind", "token", "writable", "dirty", "young", "special", "folio", "subpage", "order",
               "anon_exclusive", "kpagecount", "refcount", "large_mapcount", "entire_mapcount", "folio_flags",
               "mm_id0", "mm_cnt0", "mm_id1", "mm_cnt1")


def canonical_state(k: Kernel) -> dict:
    """Everything observable about the kernel except which physical frames were used.

    Per process and mapped virtual page: entry kind (0 none, 1 PMD leaf, 2 PTE, 3 swap), the token read
    without faulting, the entry's write/dirty/young/special bits, the folio (labelled by first
    appearance walking processes by pid and pages by address), the page's index in it, the
    order, AnonExclusive, kpagecount, the folio's refcount/mapcounts/flags/MM_ID slots.  Plus
    VMAs, rss, nr_ptes, smaps and smaps_rollup text per process, the whole of /proc/vmstat
    (nr_free_pages included), the per-size mTHP stats and the deferred split queue length.
    """
    f, mem = k.folios, k.mem
    procs = {}
    all_fids = []
    for pid in sorted(k.procs):
        p = k.procs[pid]
        mm = p.mm
        pt = mm.pt
        vp = vma_pages(p)
        sc, kind, rows, cols, _, pflags = entry_state(mm, vp)
        leaf = kind == PMD_LEAF
        eflags = np.where(leaf, pt.pmd_flags[sc], pflags).astype(np.int64)
        pfn = resolve_pfns(k, mm, vp)
        present = leaf | ((kind == PMD_TABLE) & (pfn >= 0))
        has = pfn >= 0
        pc = np.maximum(pfn, 0)
        fid = np.where(has, mem.folio[pc], -1).astype(np.int64)
        # the huge zero PMD resolves to the zero page; keep its folio visible through the PMD
        hz = leaf & (f.flags[np.maximum(pt.pmd_folio[sc], 0)] & PG_HUGE_ZERO).astype(bool)
        fid = np.where(hz, pt.pmd_folio[sc], fid)
        fc = np.maximum(fid, 0)
        isf = fid >= 0
        d = {
            "vpage": vp,
            "kind": np.where(present, np.where(leaf, 1, 2), np.where(pfn <= -2, 3, 0)),
            "token": np.where(has | (pfn <= -2), peek_tokens(k, mm, vp), -1),
            "writable": (eflags & _PAGE_RW) != 0,
            "dirty": (eflags & _PAGE_DIRTY) != 0,
            "young": (eflags & _PAGE_ACCESSED) != 0,
            "special": (eflags & _PAGE_SPECIAL) != 0,
            "subpage": np.where(isf & ~hz, pfn - f.head[fc], -1),
            "order": np.where(isf, f.order[fc], -1),
            "anon_exclusive": np.where(has, (mem.pflags[pc] & PG_ANON_EXCLUSIVE) != 0, False),
            "kpagecount": np.where(has, kpagecount(k, pc), -1),
            "refcount": np.where(isf, f.refcount[fc], -1),
            "large_mapcount": np.where(isf, f.large[fc], -1),
            "entire_mapcount": np.where(isf, f.entire[fc], -1),
            "folio_flags": np.where(isf, f.flags[fc].astype(np.int64) & _FOLIO_FLAGS_COMPARED, -1),
            "mm_id0": np.where(isf, f.mm_id0[fc], -1), "mm_cnt0": np.where(isf, f.mm_cnt0[fc], -1),
            "mm_id1": np.where(isf, f.mm_id1[fc], -1), "mm_cnt1": np.where(isf, f.mm_cnt1[fc], -1),
            "_fid": fid,
        }
        all_fids.append(fid)
        procs[pid] = {
            "vmas": [f"{v.start:#x}-{v.end:#x} flags={v.flags:#x} anon_vma={bool(v.anon_vma)}" for v in p.vmas()],
            "rss": mm.rss_anon, "nr_ptes": mm.nr_ptes, "status": p.status(),
            "smaps": p.smaps(), "smaps_rollup": p.smaps_rollup(), "pages": d,
        }
    # Label folios by first appearance (frame-independent identity).
    cat = np.concatenate(all_fids) if all_fids else np.empty(0, dtype=np.int64)
    uniq, first = np.unique(cat[cat >= 0], return_index=True)
    label = dict(zip(uniq[np.argsort(first)].tolist(), range(len(uniq))))
    for pr in procs.values():
        fid = pr["pages"].pop("_fid")
        pr["pages"]["folio"] = np.array([label.get(x, -1) for x in fid.tolist()], dtype=np.int64)
    return {
        "procs": procs,
        "vmstat": k.vmstat_snapshot(),
        "mthp": k.vmstat.mthp_snapshot(),
        "mthp_raw": k.vmstat.mthp.tolist(),          # every order, in case an order-0/1 row moves
        "deferred": len(k.deferred),
        "live_folios": int(f.nr_live),
    }


def state_diff(a: dict, b: dict, limit: int = 6) -> list[str]:
    """Human-readable differences between two canonical states (a: batched, b: scalar)."""
    out: list[str] = []
    if sorted(a["procs"]) != sorted(b["procs"]):
        return [f"live pids {sorted(a['procs'])} vs {sorted(b['procs'])}"]
    for pid in sorted(a["procs"]):
        pa, pb = a["procs"][pid], b["procs"][pid]
        for key in ("vmas", "rss", "nr_ptes", "status"):
            if pa[key] != pb[key]:
                out.append(f"p{pid} {key}: batched {pa[key]} vs scalar {pb[key]}")
        if pa["vmas"] != pb["vmas"]:
            continue
        da, db = pa["pages"], pb["pages"]
        for fld in PAGE_FIELDS:
            bad = np.flatnonzero(np.asarray(da[fld]) != np.asarray(db[fld]))
            if len(bad):
                i = int(bad[0])
                out.append(f"p{pid} page {int(da['vpage'][i]) << PAGE_SHIFT:#x} {fld}: batched {da[fld][i]} vs "
                           f"scalar {db[fld][i]} ({len(bad)} pages differ; "
                           f"batched page = {_page_repr(da, i)}; scalar page = {_page_repr(db, i)})")
        for key in ("smaps_rollup", "smaps"):
            if pa[key] != pb[key]:
                la, lb = pa[key].splitlines(), pb[key].splitlines()
                diffs = [f"{x.strip()!r} vs {y.strip()!r}" for x, y in zip(la, lb) if x != y][:3]
                out.append(f"p{pid} {key} differs: " + "; ".join(diffs))
    for key in ("vmstat",):
        for name in a[key]:
            if a[key][name] != b[key][name]:
                out.append(f"vmstat {name}: batched {a[key][name]} vs scalar {b[key][name]}")
    for size, stats in a["mthp"].items():
        for name, val in stats.items():
            if val != b["mthp"][size][name]:
                out.append(f"{size}/stats/{name}: batched {val} vs scalar {b['mthp'][size][name]}")
    for key in ("deferred", "live_folios", "mthp_raw"):
        if a[key] != b[key]:
            out.append(f"{key}: batched {a[key]} vs scalar {b[key]}")
    return out[:limit] + ([f"... and {len(out) - limit} more"] if len(out) > limit else [])


def _page_repr(d: dict, i: int) -> str:
    return "{" + ", ".join(f"{fld}={int(d[fld][i])}" for fld in PAGE_FIELDS) + "}"


class Runner:
    """Runs a program (a list of op tuples) on one kernel, batched or scalar, logging API code.

    Ops address memory relative to the current VMAs, so the same program means the same
    calls on two kernels as long as their states agree (which the oracle checks each step).

    - ("mmap", who, npages, advice or 0, populate)       - ("fork", who)      - ("exit", who)
    - ("write", who, seed, n, style, ro_ok)              random stores, see random_pages()
    - ("store", who, vma, offsets)                       stores at page offsets of the vma-th VMA
    - ("read", who, seed, n)                             loads (may fault in zero pages)
    - ("mprotect", who, where, npages, writable)         - ("madvise", who, where, npages, advice)
    - ("munmap", who, where, npages)                     - ("mremap", who, vma, new_npages)  (MAYMOVE)
    - ("sysfs", path, value)
    """

    def __init__(self, scalar: bool, build: str | None = None) -> None:
        self.k = Kernel(ram=RAM, check=True, build=build)
        self.scalar = scalar
        self.token = 0
        p = self.k.spawn()
        arg = f", build={build!r}" if build else ""
        self.script = ["import numpy as np", "from thpcow.kernel import *",
                       f"k = Kernel(ram={RAM >> 20} << 20, check=True{arg})", f"p{p.pid} = k.spawn()"]

    def pick(self, who: int):
        pids = sorted(self.k.procs)
        return self.k.procs[pids[who % len(pids)]]

    def _page(self, p, where: int) -> int | None:
        pages = vma_pages(p)
        return int(pages[where % len(pages)]) if len(pages) else None

    def run(self, op: tuple) -> str | None:
        """Apply one op; returns the error name or None."""
        try:
            self._run(op)
        except KernelError as exc:
            self.script.append(f"# -> {err_name(exc)}")
            return err_name(exc)
        return None

    def _do(self, text: str, fn, *args):
        self.script.append(text)
        return fn(*args)

    def _run(self, op: tuple) -> None:
        name, args = op[0], op[1:]
        if name == "sysfs":
            path, value = args
            self._do(f"k.sysfs.write({path!r}, {value!r})", self.k.sysfs.write, path, value)
            return
        p = self.pick(args[0])
        if name == "mmap":
            _, npages, advice, populate = args
            flags = ANON | (MAP_POPULATE if populate else 0)
            a = self._do(f"a = p{p.pid}.mmap({npages << PAGE_SHIFT:#x}, {RW}, {flags:#x})",
                         p.mmap, npages << PAGE_SHIFT, RW, flags)
            if advice:
                self._do(f"p{p.pid}.madvise({a:#x}, {npages << PAGE_SHIFT:#x}, {MADV_NAMES[advice]})",
                         p.madvise, a, npages << PAGE_SHIFT, advice)
        elif name == "fork":
            if len(self.k.procs) >= MAX_PROCS:
                return
            self._do(f"p{self.k._next_pid} = p{p.pid}.fork()", p.fork)
        elif name == "exit":
            if len(self.k.procs) > 1:
                self._do(f"p{p.pid}.exit()", p.exit)
        elif name in ("write", "store"):
            if name == "write":
                _, seed, n, style, ro_ok = args
                pool = vma_pages(p, writable_only=not ro_ok)
                if not len(pool):
                    return
                pages = random_pages(np.random.default_rng(seed), pool, n, style)
            else:
                _, vma, offsets = args
                vmas = p.vmas()
                if not vmas:
                    return
                v = vmas[vma % len(vmas)]
                n = (v.end - v.start) >> PAGE_SHIFT
                pages = (v.start >> PAGE_SHIFT) + np.array(offsets, dtype=np.int64) % n
            addrs = pages << PAGE_SHIFT
            toks = np.arange(self.token + 1, self.token + 1 + len(pages), dtype=np.int64)
            self.token += len(pages)
            how = "write_many_scalar" if self.scalar else "write_many"
            self._do(f"p{p.pid}.{how}({_arr(addrs)}, {_arr(toks)})", getattr(p, how), addrs, toks)
        elif name == "read":
            _, seed, n = args
            pool = vma_pages(p)
            if len(pool):
                pages = np.random.default_rng(seed).choice(pool, size=n)
                self._do(f"p{p.pid}.read_many({_arr(pages << PAGE_SHIFT)})", p.read_many, pages << PAGE_SHIFT)
        elif name in ("mprotect", "madvise", "munmap"):
            _, where, npages = args[:3]
            pg = self._page(p, where)
            if pg is None:
                return
            a, ln = pg << PAGE_SHIFT, npages << PAGE_SHIFT
            if name == "mprotect":
                prot = RW if args[3] else PROT_READ
                self._do(f"p{p.pid}.mprotect({a:#x}, {ln:#x}, {prot})", p.mprotect, a, ln, prot)
            elif name == "madvise":
                self._do(f"p{p.pid}.madvise({a:#x}, {ln:#x}, {MADV_NAMES[args[3]]})", p.madvise, a, ln, args[3])
            else:
                self._do(f"p{p.pid}.munmap({a:#x}, {ln:#x})", p.munmap, a, ln)
        elif name == "mremap":
            _, vma, new_npages = args
            vmas = p.vmas()
            if vmas:
                v = vmas[vma % len(vmas)]
                self._do(f"p{p.pid}.mremap({v.start:#x}, {v.end - v.start:#x}, {new_npages << PAGE_SHIFT:#x}, "
                         f"MREMAP_MAYMOVE)", p.mremap, v.start, v.end - v.start, new_npages << PAGE_SHIFT,
                         MREMAP_MAYMOVE)
        else:
            raise ValueError(f"unknown op {op!r}")


def run_batch_vs_scalar(program, build: str | None = None) -> None:
    """Run ``program`` batched and scalar; after every op the outcomes and states must agree."""
    batched, scalar = Runner(scalar=False, build=build), Runner(scalar=True, build=build)
    for i, op in enumerate(program):
        eb = batched.run(op)
        es = scalar.run(op)
        diffs = [f"outcome: batched {eb} vs scalar {es}"] if eb != es else []
        diffs += state_diff(canonical_state(batched.k), canonical_state(scalar.k))
        if diffs:
            raise AssertionError(
                f"batched and scalar stores diverge after op {i} {_op_repr(op)}:\n  " + "\n  ".join(diffs) +
                "\nprogram: [" + ", ".join(_op_repr(o) for o in program[: i + 1]) + "]" +
                "\nscript (batched; the scalar run calls write_many_scalar instead of write_many):\n" +
                "\n".join(batched.script))


# -- hand-written scenarios: each names the path it covers --------------------------------------
H, NH = MADV_HUGEPAGE, MADV_NOHUGEPAGE
ALL512 = tuple(range(512))
SCENARIOS = {
    # Fork, then dense stores in both: do_huge_pmd_wp_page() splits each side's PMD and the
    # rest of the block takes wp_page_copy_batch(); the last sharer reuses (pgreuse).
    "fork_dense_both": [("mmap", 0, 2048, H, False), ("store", 0, 0, tuple(range(2048))), ("fork", 0),
                        ("store", 1, 0, tuple(range(100, 700))), ("store", 0, 0, tuple(range(0, 2048, 1))),
                        ("store", 1, 0, tuple(range(2048)))],
    # Fork, then sparse stores: one page per 4 KiB/2 MiB block here and there.
    "fork_sparse": [("mmap", 0, 2048, H, False), ("mmap", 0, 1100, NH, False), ("write", 0, 1, 3000, "dense", 0),
                    ("write", 0, 2, 3000, "dense", 0), ("fork", 0), ("write", 1, 3, 64, "uniform", 0),
                    ("write", 0, 4, 64, "uniform", 0), ("write", 1, 5, 64, "uniform", 0)],
    # The same page stored many times in one batch: one fault, the last token wins.
    "same_page_repeated": [("mmap", 0, 512, H, False), ("store", 0, 0, (7,)), ("fork", 0),
                           ("store", 1, 0, (7, 7, 7, 8, 7, 8, 7)), ("store", 0, 0, (7,) * 20 + (9,))],
    # One batch spanning a shared PMD-mapped THP, its neighbour block and 4 KiB pages around.
    "span_shared_pmd": [("mmap", 0, 1536, H, False), ("store", 0, 0, (0, 600, 1100)), ("fork", 0),
                        ("store", 1, 0, tuple(range(500, 1100, 3)) + (0, 1, 2, 1535))],
    # A PTE-mapped THP: mprotect of part of the block splits the PMD in the parent first.
    "pte_mapped_thp": [("mmap", 0, 1024, H, False), ("store", 0, 0, ALL512), ("fork", 0),
                       ("mprotect", 0, 100, 50, False), ("mprotect", 0, 100, 50, True),
                       ("store", 0, 0, tuple(range(0, 512, 2))), ("store", 1, 0, tuple(range(1, 512, 2))),
                       ("store", 0, 0, ALL512)],
    # Exclusive folios: after the child exits every read-only PTE is reused, none copied.
    "exclusive_reuse": [("mmap", 0, 1024, H, False), ("store", 0, 0, tuple(range(1024))), ("fork", 0),
                        ("mprotect", 0, 10, 600, False), ("mprotect", 0, 10, 600, True), ("exit", 1),
                        ("store", 0, 0, tuple(range(1024)))],
    # mTHP: 64 KiB folios PTE-mapped, shared, copied page by page and finally reused.
    "mthp_64k": [("sysfs", "hugepages-64kB/enabled", "always"), ("sysfs", "enabled", "never"),
                 ("mmap", 0, 512, 0, False), ("store", 0, 0, tuple(range(0, 512, 3))), ("fork", 0),
                 ("store", 1, 0, tuple(range(0, 256))), ("store", 0, 0, tuple(range(0, 512, 5))),
                 ("exit", 1), ("store", 0, 0, ALL512)],
    # The huge zero page: read first (huge zero PMDs, shared by fork), then store
    # (do_huge_zero_wp_pmd() maps a fresh THP); in the child one zero PMD is split by
    # mprotect first, so its stores copy from the zero page PTE by PTE.
    "huge_zero_then_write": [("mmap", 0, 1024, H, False), ("read", 0, 1, 8), ("fork", 0),
                             ("store", 0, 0, (1, 2, 513)), ("mprotect", 1, 5, 1, False), ("mprotect", 1, 5, 1, True),
                             ("read", 1, 2, 64), ("store", 1, 0, (0, 1, 2, 3, 3, 0, 600, 1000))],
    # Three and four processes sharing folios (the third mm takes no MM_ID slot).
    # (VMA 0 is the lower, 64 KiB-mTHP one; VMA 1 the 4 MiB THP one.)
    "three_sharers": [("mmap", 0, 1024, H, False), ("sysfs", "hugepages-64kB/enabled", "always"),
                      ("sysfs", "enabled", "madvise"), ("mmap", 0, 256, 0, False),
                      ("store", 0, 1, tuple(range(1024))), ("store", 0, 0, tuple(range(256))),
                      ("fork", 0), ("fork", 0), ("fork", 1),
                      ("store", 2, 1, tuple(range(0, 1024, 7))), ("store", 3, 0, tuple(range(0, 256, 2))),
                      ("mprotect", 1, 3, 9, False), ("mprotect", 1, 3, 9, True),
                      ("store", 1, 1, tuple(range(512))), ("store", 0, 0, tuple(range(256))),
                      ("store", 3, 1, tuple(range(1024))), ("store", 2, 0, tuple(range(256)))],
    # Three sharers of a PTE-mapped THP, then the two that own the MM_ID slots exit: the last
    # one is alone with the folio but FOLIO_MM_IDS_SHARED stays set (the "maybe" in
    # folio_maybe_mapped_shared()), so every store copies.  Copying all 512 pages one at a time
    # puts the folio on the deferred split queue at the first copy (it is partially mapped
    # then); the batch must count thp_deferred_split_page/split_deferred the same way.
    "stale_mm_ids_shared": [("mmap", 0, 512, H, False), ("store", 0, 0, ALL512), ("fork", 0), ("fork", 0),
                            ("mprotect", 2, 0, 1, False), ("mprotect", 2, 0, 1, True),
                            ("exit", 0), ("exit", 0), ("store", 0, 0, ALL512)],
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_batch_equals_scalar_scenarios(name):
    run_batch_vs_scalar(SCENARIOS[name])


# -- generated programs ---------------------------------------------------------------------------
_who = st.integers(0, 3)
_where = st.integers(0, 1 << 16)
OP_STRATEGY = st.one_of(
    st.tuples(st.just("mmap"), _who, st.sampled_from(MAP_PAGES), st.sampled_from([0, H, H, NH]), st.booleans()),
    st.tuples(st.just("fork"), _who),
    st.tuples(st.just("exit"), _who),
    st.tuples(st.just("write"), _who, st.integers(0, 1 << 16), st.integers(1, 700),
              st.sampled_from(["uniform", "dense", "repeat", "cluster"]), st.sampled_from([0, 0, 0, 1])),
    st.tuples(st.just("store"), _who, st.integers(0, 7),
              st.lists(st.integers(0, 4095), min_size=1, max_size=40).map(tuple)),
    st.tuples(st.just("read"), _who, st.integers(0, 1 << 16), st.integers(1, 64)),
    st.tuples(st.just("mprotect"), _who, _where, st.integers(1, 1024), st.booleans()),
    st.tuples(st.just("madvise"), _who, _where, st.integers(1, 1024), st.sampled_from(ADVICES)),
    st.tuples(st.just("munmap"), _who, _where, st.integers(1, 1024)),
    st.tuples(st.just("mremap"), _who, st.integers(0, 7), st.integers(1, 2048)),
    st.sampled_from(SYSFS_CHOICES).map(lambda kv: ("sysfs",) + kv),
)
# Programs start from mapped, populated, shared memory so that stores meet COW most of the time.
PROLOGUE = [("mmap", 0, 2048, H, False), ("mmap", 0, 1024, 0, False), ("store", 0, 1, tuple(range(0, 2048, 3))),
            ("store", 0, 0, tuple(range(0, 1024, 2))), ("fork", 0)]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(OP_STRATEGY, min_size=1, max_size=14))
def test_batch_equals_scalar_hypothesis(program):
    run_batch_vs_scalar(PROLOGUE + program)


def numpy_program(seed: int, length: int = 24) -> list[tuple]:
    """A random program from a seeded numpy RNG, biased towards fork + stores."""
    rng = np.random.default_rng(seed)
    prog: list[tuple] = [("sysfs", *SYSFS_CHOICES[int(rng.integers(0, len(SYSFS_CHOICES)))])]
    prog.append(("mmap", 0, int(rng.choice([512, 1024, 2048])), int(rng.choice([0, H])), bool(rng.integers(0, 2))))
    kinds = ["write"] * 6 + ["store"] * 2 + ["fork"] * 2 + ["exit", "read", "mprotect", "madvise", "munmap",
                                                         "mremap", "mmap", "sysfs"]
    for _ in range(length):
        kind = kinds[int(rng.integers(0, len(kinds)))]
        who = int(rng.integers(0, 4))
        if kind == "write":
            prog.append(("write", who, int(rng.integers(0, 1 << 16)), int(rng.integers(1, 800)),
                         str(rng.choice(["uniform", "dense", "repeat", "cluster"])), int(rng.random() < 0.1)))
        elif kind == "store":
            prog.append(("store", who, int(rng.integers(0, 4)),
                         tuple(int(x) for x in rng.integers(0, 4096, int(rng.integers(1, 64))))))
        elif kind in ("fork", "exit"):
            prog.append((kind, who))
        elif kind == "read":
            prog.append(("read", who, int(rng.integers(0, 1 << 16)), int(rng.integers(1, 64))))
        elif kind == "mprotect":
            prog.append(("mprotect", who, int(rng.integers(0, 1 << 16)), int(rng.integers(1, 700)),
                         bool(rng.integers(0, 2))))
        elif kind == "madvise":
            prog.append(("madvise", who, int(rng.integers(0, 1 << 16)), int(rng.integers(1, 700)),
                         int(rng.choice(ADVICES))))
        elif kind == "munmap":
            prog.append(("munmap", who, int(rng.integers(0, 1 << 16)), int(rng.integers(1, 300))))
        elif kind == "mremap":
            prog.append(("mremap", who, int(rng.integers(0, 4)), int(rng.integers(1, 2048))))
        elif kind == "mmap":
            prog.append(("mmap", who, int(rng.choice(MAP_PAGES)), int(rng.choice([0, H, NH])),
                         bool(rng.random() < 0.3)))
        else:
            prog.append(("sysfs", *SYSFS_CHOICES[int(rng.integers(0, len(SYSFS_CHOICES)))]))
    return prog


@pytest.mark.parametrize("seed", range(16))
def test_batch_equals_scalar_numpy(seed):
    run_batch_vs_scalar(numpy_program(seed))


BUILD_SPECS = ("thp-cow-v1", "thp-cow-meant", "pre-5.8", "mthp-cow:order=4", "mthp-cow:order=9",
               "directed-khugepaged", "reservation:pool_mib=8", "cow-density:threshold=8")


@pytest.mark.parametrize("build", BUILD_SPECS)
@pytest.mark.parametrize("seed", range(3))
def test_batch_equals_scalar_under_every_build(build, seed):
    """Every kernel build decides through the same judgement points on both store paths."""
    run_batch_vs_scalar(numpy_program(100 + seed), build=build)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.sampled_from(BUILD_SPECS), st.lists(OP_STRATEGY, min_size=1, max_size=10))
def test_batch_equals_scalar_hypothesis_builds(build, program):
    run_batch_vs_scalar(PROLOGUE + program, build=build)


# =====================================================================================
# 3. Minimal reproducers of the simulator bugs the random programs found
# =====================================================================================
# Each test below is the shrunk form of a failure of the fuzzer or of the batch-vs-scalar
# oracle.  All four failed on d32f72b; 9780473 fixed the named functions, so they are
# regression tests now.

def run_twins(program):
    """Run ``program(k, store)`` with store=write_many and store=write_many_scalar; return both states."""
    states = []
    for how in ("write_many", "write_many_scalar"):
        k = Kernel(ram=RAM, check=True)
        program(k, lambda p, addrs, toks, how=how: getattr(p, how)(np.asarray(addrs), np.asarray(toks)))
        states.append(canonical_state(k))
    return states


def test_zero_page_cow_prepares_anon_vma_so_fork_copies_it(k, p):
    """memory.py:wp_page_copy() from the zero page skipped anon_vma_prepare() (fixed in 9780473).

    Linux's wp_page_copy() starts with vmf_anon_prepare(): a VMA whose only faults so far
    were reads (zero page) gets its anon_vma at the first write.  Without it the VMA still
    has no anon_vma, so dup_mmap() copies no page tables for it and the child reads 0.
    Found by SyscallMachine: mmap(1 page); read_many; write_many; fork.
    """
    a = p.mmap(PAGE_SIZE)
    p.read(a)                      # read fault: the shared zero page, no anon_vma
    p.write(a, 1, token=7)         # do_wp_page() -> wp_page_copy() from the zero page
    assert p.vmas()[0].anon_vma, "the first write fault of the VMA must give it an anon_vma"
    c = p.fork()
    assert int(c.read(a)[0]) == 7, "the child must see the parent's page after fork()"


def test_mremap_dontunmap_without_fixed_moves(k, p):
    """mremap.py:do_mremap() treated MREMAP_DONTUNMAP without MREMAP_FIXED as a no-op (fixed in 9780473).

    Since v5.7 (and in the v6.17+ rewrite: vrm_implies_new_addr() is FIXED | DONTUNMAP)
    MREMAP_DONTUNMAP always moves: new_address is only a hint, the pages go to a new
    range, and the old range stays mapped but empty (reads 0).  The simulator returned
    old_address and moved nothing (the same-size early return, before the flag was looked at).
    Found by SyscallMachine: mmap(1 page); mremap(a, 4096, 4096, MAYMOVE | DONTUNMAP).
    """
    a = p.mmap(PAGE_SIZE)
    p.write(a, 1, token=5)
    b = p.mremap(a, PAGE_SIZE, PAGE_SIZE, MREMAP_MAYMOVE | MREMAP_DONTUNMAP)
    assert b != a, "MREMAP_DONTUNMAP must move the mapping"
    assert int(p.read(b)[0]) == 5 and int(p.read(a)[0]) == 0
    assert len(p.vmas()) == 2


def test_batched_anonymous_faults_prepare_only_the_faulted_vma():
    """memory.py:do_anonymous_page_batch() gave an anon_vma to every VMA of the mm (fixed in 9780473).

    The scalar path (do_anonymous_page() -> anon_vma_prepare()) prepares only the VMA that
    faults.  The batch prepared all of them, so a VMA that was never touched could no longer
    merge with a neighbour that has a different anon_vma (is_mergeable_anon_vma()): after
    mprotect() made the flags equal, the scalar run had one VMA and the batched run two
    (and they differ for khugepaged, which needs an anon_vma).
    Found by the batch-vs-scalar oracle (numpy seeds 10 and 11).
    """
    def program(k, store):
        p = k.spawn()
        a = p.mmap(2 * PAGE_SIZE)                 # A
        b = p.mmap(PAGE_SIZE, PROT_READ)          # B, just below A, not merged (flags differ)
        p.write(a, 1, token=1)                    # first fault: A's PTE table and anon_vma
        store(p, [a + PAGE_SIZE], [2])            # batched: do_anonymous_page_batch()
        p.mprotect(b, PAGE_SIZE, RW)              # B's flags now equal A's: merge if anon_vma allows
    batched, scalar = run_twins(program)
    assert state_diff(batched, scalar) == []


def test_batched_cow_counts_deferred_split_like_scalar():
    """memory.py:wp_page_copy_batch() skipped the deferred split queueing of a folio it unmapped
    whole (fixed in 9780473).

    Three mms map a 16 KiB mTHP; the two holding the MM_ID slots exit, so the last one
    maps the folio alone but FOLIO_MM_IDS_SHARED stays set (folio_maybe_mapped_shared()
    is only a "maybe") and every store copies.  Copying one page at a time (do_wp_page(),
    the kernel) leaves the folio partially mapped after the first copy:
    __folio_remove_rmap() queues it (deferred_split_folio(partially_mapped=true):
    split_deferred += 1, thp_deferred_split_page for PMD order) before the last copy frees
    it.  The batch decremented every mapcount first and only queued folios that still had
    mapped pages, so a folio unmapped whole in one batch was never counted.
    Expected (scalar): hugepages-16kB/stats/split_deferred 1; batched: 0.
    The 2 MiB form (PTE-mapped THP, thp_deferred_split_page) is scenario "stale_mm_ids_shared".
    """
    def program(k, store):
        k.sysfs.write("hugepages-16kB/enabled", "always")
        p1 = k.spawn()
        a = p1.mmap(4 * PAGE_SIZE)
        p1.write(a, 4 * PAGE_SIZE, token=1)      # one order-2 folio
        p2 = p1.fork()                            # takes MM_ID slot 1
        p3 = p1.fork()                            # no slot left: FOLIO_MM_IDS_SHARED
        p1.exit()
        p2.exit()                                 # p3 alone, the SHARED bit stays set
        store(p3, a + PAGE_SIZE * np.arange(4), np.arange(2, 6))
    batched, scalar = run_twins(program)
    assert state_diff(batched, scalar) == []
