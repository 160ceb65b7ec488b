"""The anonymous cases of tools/testing/selftests/mm/khugepaged.c, run on the simulator.

Each selftest function is ported with the kernel's page counts and boundaries and runs in
both of the selftest's collapse contexts:

- ``khugepaged``: the range is made MADV_HUGEPAGE and khugepaged is waited for, as the
  selftest's wait_for_scan() does: until the range is huge, or khugepaged has completed two
  more full scans, or 6 ticks of 0.5 s (more for large ranges) have gone by, on the
  simulated clock; the limits (max_ptes_none/swap/shared) apply;
- ``madvise``: THP is switched off globally (``enabled=never``, which also stops khugepaged),
  the range made MADV_HUGEPAGE and MADV_COLLAPSE called (once more after EAGAIN); no limits.

The knobs are the selftest's defaults, set through sysfs as it sets them: enabled=madvise,
defrag=always, use_zero_page=0, khugepaged defrag=1, scan_sleep_millisecs=10,
alloc_sleep_millisecs=10, pages_to_scan=4096, max_ptes_none=511, max_ptes_swap=64,
max_ptes_shared=256.  The region is mapped at 1 GiB (the selftest's BASE_ADDR) and faulted
*before* it becomes MADV_HUGEPAGE, so it starts as 4 KiB pages.  Every page i of a region
holds the token ``0xdead0000 + i`` (fill_memory()), checked after each collapse
(validate_memory()).  check_huge() reads AnonHugePages of the VMA starting at the address.

Every case runs under every kernel build of :mod:`thpcow.kernel.builds`.  On ``thp-cow-v1``
(the 2026 series as posted) every PMD collapse oopses (collapse_huge_page() hands
set_pmd_at() a NULL PMD): a case that collapses raises KernelOops there instead.  A few cases
cannot hold on builds that copy a whole THP, or a block of it, on the child's first COW
write (``DIVERGES``): there the port must fail at the step the selftest would report.

Not ported: the file/shmem cases (and madvise_retracted_page_tables, file only); the
mthp_khugepaged context and its collapse_order_* / collapse_single_mthp cases (mTHP
collapse is not in 6.18).  collapse_fork_cow_race, from the 2026 selftest, is ported in a
sequential form (the simulator has no concurrency): the parent writes the shared pages
before and after the child's collapse.
"""

from __future__ import annotations

import errno
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pytest

from thpcow.kernel import (
    HPAGE_PMD_NR, HPAGE_PMD_SIZE, MADV_COLLAPSE, MADV_DONTNEED, MADV_HUGEPAGE, MADV_NOHUGEPAGE,
    MADV_PAGEOUT, MREMAP_FIXED, MREMAP_MAYMOVE, PAGE_SIZE, Kernel, KernelError, KernelOops, Process,
)
from thpcow.kernel.builds import BUILDS

BASE_ADDR = 1 << 30
TICK_NS = 500_000 * 1000                   # usleep(TICK): 500 ms
TOKEN = 0xDEAD0000
RAM = 512 << 20
SWAP = 64 << 20

SELFTEST_SETTINGS = {                      # main(): default_settings, in thp_write_settings() order
    "enabled": "madvise",
    "defrag": "always",
    "use_zero_page": "0",
    "khugepaged/defrag": "1",
    "khugepaged/alloc_sleep_millisecs": "10",
    "khugepaged/scan_sleep_millisecs": "10",
    "khugepaged/max_ptes_none": str(HPAGE_PMD_NR - 1),
    "khugepaged/max_ptes_swap": str(HPAGE_PMD_NR // 8),
    "khugepaged/max_ptes_shared": str(HPAGE_PMD_NR // 2),
    "khugepaged/pages_to_scan": str(HPAGE_PMD_NR * 8),
    "hugepages-2048kB/enabled": "inherit",
}


class SelftestFail(AssertionError):
    """What the selftest would report as a failure (fail() or ksft_exit_fail_msg())."""


class Selftest:
    """The selftest's process on one simulated kernel, with its settings stack and helpers."""

    def __init__(self, build: str, context: str, ram: int = RAM, check: bool = True) -> None:
        self.k = Kernel(ram=ram, check=check, build=build, swap=SWAP)
        for path, value in SELFTEST_SETTINGS.items():
            self.k.sysfs.write(path, value)
        self.context = context
        self.enforce_limits = context == "khugepaged"
        self.p = self.k.spawn()
        self._stack: list[dict[str, str]] = []

    # -- thp_push_settings() / thp_pop_settings() ------------------------------------------------
    def push(self, **knobs: str) -> None:
        saved = {}
        for name, value in knobs.items():
            path = name.replace("__", "/")
            saved[path] = self.k.sysfs.read(path).strip()
            if path == "enabled":
                saved[path] = saved[path].split("[")[1].split("]")[0]
            self.k.sysfs.write(path, value)
        self._stack.append(saved)

    def pop(self) -> None:
        for path, value in self._stack.pop().items():
            self.k.sysfs.write(path, value)

    def read_num(self, path: str) -> int:
        return int(self.k.sysfs.read(path))

    # -- mem_ops for anon ---------------------------------------------------------------------------
    def setup_area(self, nr_hpages: int, proc: Process | None = None) -> int:
        """alloc_mapping(): mmap at BASE_ADDR (a hint the selftest requires to be honoured)."""
        p = self.p.mmap(nr_hpages * HPAGE_PMD_SIZE, addr=BASE_ADDR)
        if p != BASE_ADDR:
            raise SelftestFail(f"Failed to allocate VMA at {BASE_ADDR:#x}")
        return p

    @staticmethod
    def fault(proc: Process, p: int, start: int, end: int) -> None:
        """fill_memory(): page i (counted from p) gets TOKEN + i, one store per page."""
        idx = np.arange(start // PAGE_SIZE, end // PAGE_SIZE, dtype=np.int64)
        proc.write_many(p + idx * PAGE_SIZE, TOKEN + idx)

    @staticmethod
    def validate(proc: Process, p: int, start: int, end: int) -> None:
        """validate_memory()."""
        idx = np.arange(start // PAGE_SIZE, end // PAGE_SIZE, dtype=np.int64)
        got = proc.read_many(p + idx * PAGE_SIZE)
        bad = np.flatnonzero(got != TOKEN + idx)
        if len(bad):
            i = int(idx[bad[0]])
            raise SelftestFail(f"Page {i} is corrupted: {int(got[bad[0]]):#x}")

    @staticmethod
    def check_huge(proc: Process, p: int, nr_hpages: int) -> bool:
        """check_huge_anon(): AnonHugePages of the VMA that starts at p is nr_hpages PMDs."""
        vma = proc.mm.find_vma(p)
        if vma is None or vma.start != p:
            return False
        return proc.smaps_fields(p)["AnonHugePages"] == nr_hpages * (HPAGE_PMD_SIZE >> 10)

    # -- collapse contexts ----------------------------------------------------------------------------
    def madvise_collapse_retry(self, proc: Process, p: int, size: int) -> int:
        """MADV_COLLAPSE, once more after EAGAIN; returns 0 or the errno."""
        for attempt in range(2):
            try:
                proc.madvise(p, size, MADV_COLLAPSE)
                return 0
            except KernelError as e:
                if e.errno != errno.EAGAIN or attempt:
                    return e.errno
        raise AssertionError("unreachable")

    def _madvise_collapse(self, proc: Process, p: int, nr_hpages: int, expect: bool) -> None:
        """__madvise_collapse(): THP off globally (khugepaged stops), MADV_HUGEPAGE, MADV_COLLAPSE."""
        self.push(enabled="never")
        proc.madvise(p, nr_hpages * HPAGE_PMD_SIZE, MADV_HUGEPAGE)
        ret = self.madvise_collapse_retry(proc, p, nr_hpages * HPAGE_PMD_SIZE)
        try:
            if bool(ret) == expect:
                raise SelftestFail(f"Fail: Bad return value ({errno.errorcode.get(ret, ret)})")
            if not self.check_huge(proc, p, nr_hpages if expect else 0):
                raise SelftestFail("Fail: check_huge()")
        finally:
            self.pop()

    def _wait_for_scan(self, proc: Process, p: int, nr_hpages: int) -> bool:
        """wait_for_scan(): True if it timed out."""
        size = nr_hpages * HPAGE_PMD_SIZE
        timeout = 6 + 2 * (size // (128 << 20))
        if not self.check_huge(proc, p, 0):
            raise SelftestFail("Unexpected huge page")
        proc.madvise(p, size, MADV_HUGEPAGE)
        full_scans = self.read_num("khugepaged/full_scans") + 2
        while True:
            if timeout == 0:
                return True                              # while (timeout--) ends with -1
            timeout -= 1
            if self.check_huge(proc, p, nr_hpages):
                return False
            if self.read_num("khugepaged/full_scans") >= full_scans:
                return False
            self.k.advance(TICK_NS)

    def _khugepaged_collapse(self, proc: Process, p: int, nr_hpages: int, expect: bool) -> None:
        collapsed = self.k.khugepaged_counters["pages_collapsed"]
        if self._wait_for_scan(proc, p, nr_hpages):
            if expect:
                raise SelftestFail("Timeout")
            return
        if not self.check_huge(proc, p, nr_hpages if expect else 0):
            raise SelftestFail("Fail")
        # (not in the selftest) the THPs are khugepaged's work
        assert self.k.khugepaged_counters["pages_collapsed"] - collapsed == (nr_hpages if expect else 0)

    def collapse(self, msg: str, p: int, nr_hpages: int, expect: bool, proc: Process | None = None) -> None:
        """c->collapse(): in the selftest's process, or in ``proc`` (a forked child)."""
        proc = proc or self.p
        if self.context == "khugepaged":
            self._khugepaged_collapse(proc, p, nr_hpages, expect)
        else:
            if not self.check_huge(proc, p, 0):          # madvise_collapse()'s sanity check
                raise SelftestFail("Unexpected huge page")
            self._madvise_collapse(proc, p, nr_hpages, expect)

    def alloc_hpage(self) -> int:
        """alloc_hpage(): a PMD THP made by MADV_COLLAPSE of a faulted range, then MADV_HUGEPAGE."""
        p = self.setup_area(1)
        self.fault(self.p, p, 0, HPAGE_PMD_SIZE)
        if self.madvise_collapse_retry(self.p, p, HPAGE_PMD_SIZE):
            raise SelftestFail("madvise(MADV_COLLAPSE)")
        if not self.check_huge(self.p, p, 1):
            raise SelftestFail("madvise(MADV_COLLAPSE): not huge")
        self.p.madvise(p, HPAGE_PMD_SIZE, MADV_HUGEPAGE)
        return p

    def expect(self, ok: bool, msg: str) -> None:
        if not ok:
            raise SelftestFail(msg)


# -- the cases: one function per selftest function (its name), in the selftest's order ------------
def alloc_at_fault(t: Selftest) -> None:
    """enabled=always: one store faults a PMD THP; MADV_DONTNEED of one page splits the PMD."""
    t.push(enabled="always")
    p = t.setup_area(1)
    t.p.write(p, 1, 1)
    t.expect(t.check_huge(t.p, p, 1), "Allocate huge page on fault: Fail")
    t.pop()
    t.p.madvise(p, PAGE_SIZE, MADV_DONTNEED)
    t.expect(t.check_huge(t.p, p, 0), "Split huge PMD on MADV_DONTNEED: Fail")
    t.p.munmap(p, HPAGE_PMD_SIZE)


def collapse_full(t: Selftest) -> None:
    """Four fully populated PTE tables collapse into four THPs."""
    nr = 4
    p = t.setup_area(nr)
    t.fault(t.p, p, 0, nr * HPAGE_PMD_SIZE)
    t.collapse("Collapse multiple fully populated PTE table", p, nr, True)
    t.validate(t.p, p, 0, nr * HPAGE_PMD_SIZE)
    t.p.munmap(p, nr * HPAGE_PMD_SIZE)


def collapse_empty(t: Selftest) -> None:
    """Nothing was ever faulted: nothing to collapse."""
    p = t.setup_area(1)
    t.collapse("Do not collapse empty PTE table", p, 1, False)
    t.p.munmap(p, HPAGE_PMD_SIZE)


def collapse_single_pte_entry(t: Selftest) -> None:
    """One page present, 511 empty PTEs: within max_ptes_none=511, so it collapses."""
    p = t.setup_area(1)
    t.fault(t.p, p, 0, PAGE_SIZE)
    t.collapse("Collapse PTE table with single PTE entry present", p, 1, True)
    t.p.munmap(p, HPAGE_PMD_SIZE)


def collapse_max_ptes_none(t: Selftest) -> None:
    """max_ptes_none=256: 255 pages present (257 empty) is over the limit for khugepaged (not
    for MADV_COLLAPSE); 256 present (256 empty) is within it."""
    max_ptes_none = HPAGE_PMD_NR // 2
    t.push(khugepaged__max_ptes_none=str(max_ptes_none))
    p = t.setup_area(1)
    present = (HPAGE_PMD_NR - max_ptes_none - 1) * PAGE_SIZE
    t.fault(t.p, p, 0, present)
    t.collapse("Maybe collapse with max_ptes_none exceeded", p, 1, not t.enforce_limits)
    t.validate(t.p, p, 0, present)
    if t.enforce_limits:
        t.p.munmap(p, HPAGE_PMD_SIZE)
        p = t.setup_area(1)
        present = (HPAGE_PMD_NR - max_ptes_none) * PAGE_SIZE
        t.fault(t.p, p, 0, present)
        t.collapse("Collapse with max_ptes_none PTEs empty", p, 1, True)
        t.validate(t.p, p, 0, present)
    t.p.munmap(p, HPAGE_PMD_SIZE)
    t.pop()


def _swapout_range(t: Selftest, p: int, size: int) -> None:
    """swapout_range(): MADV_PAGEOUT until smaps shows ``size`` swapped (one try suffices here)."""
    t.p.madvise(p, size, MADV_PAGEOUT)
    t.expect(t.p.smaps_fields(p)["Swap"] == size >> 10, f"Swapout {size // PAGE_SIZE} pages: Fail")


def collapse_swapin_single_pte(t: Selftest) -> None:
    """One page swapped out: the collapse swaps it in first."""
    p = t.setup_area(1)
    t.fault(t.p, p, 0, HPAGE_PMD_SIZE)
    _swapout_range(t, p, PAGE_SIZE)
    t.collapse("Collapse with swapping in single PTE entry", p, 1, True)
    t.validate(t.p, p, 0, HPAGE_PMD_SIZE)
    t.p.munmap(p, HPAGE_PMD_SIZE)


def collapse_max_ptes_swap(t: Selftest) -> None:
    """max_ptes_swap=64: 65 pages swapped out is over the limit for khugepaged (not for
    MADV_COLLAPSE); 64 is within it."""
    max_ptes_swap = t.read_num("khugepaged/max_ptes_swap")
    assert max_ptes_swap == 64
    p = t.setup_area(1)
    t.fault(t.p, p, 0, HPAGE_PMD_SIZE)
    _swapout_range(t, p, (max_ptes_swap + 1) * PAGE_SIZE)
    t.collapse("Maybe collapse with max_ptes_swap exceeded", p, 1, not t.enforce_limits)
    t.validate(t.p, p, 0, HPAGE_PMD_SIZE)
    if t.enforce_limits:
        t.fault(t.p, p, 0, HPAGE_PMD_SIZE)
        _swapout_range(t, p, max_ptes_swap * PAGE_SIZE)
        t.collapse("Collapse with max_ptes_swap pages swapped out", p, 1, True)
        t.validate(t.p, p, 0, HPAGE_PMD_SIZE)
    t.p.munmap(p, HPAGE_PMD_SIZE)


def collapse_single_pte_entry_compound(t: Selftest) -> None:
    """A THP whose PMD MADV_DONTNEED split, leaving one PTE that maps its first page."""
    p = t.alloc_hpage()
    t.p.madvise(p, HPAGE_PMD_SIZE, MADV_NOHUGEPAGE)
    t.p.madvise(p + PAGE_SIZE, HPAGE_PMD_SIZE - PAGE_SIZE, MADV_DONTNEED)
    t.expect(t.check_huge(t.p, p, 0), "Split huge page leaving single PTE mapping compound page: Fail")
    t.collapse("Collapse PTE table with single PTE mapping compound page", p, 1, True)
    t.validate(t.p, p, 0, PAGE_SIZE)
    t.p.munmap(p, HPAGE_PMD_SIZE)


def collapse_full_of_compound(t: Selftest) -> None:
    """A THP PTE-mapped whole: MADV_NOHUGEPAGE on its first page splits the VMA (and the PMD),
    MADV_NOHUGEPAGE on all of it merges the VMAs again."""
    p = t.alloc_hpage()
    t.p.madvise(p, PAGE_SIZE, MADV_NOHUGEPAGE)
    t.p.madvise(p, HPAGE_PMD_SIZE, MADV_NOHUGEPAGE)
    t.expect(t.check_huge(t.p, p, 0), "Split huge page leaving single PTE page table full of compound pages: Fail")
    t.collapse("Collapse PTE table full of compound pages", p, 1, True)
    t.validate(t.p, p, 0, HPAGE_PMD_SIZE)
    t.p.munmap(p, HPAGE_PMD_SIZE)


def collapse_compound_extreme(t: Selftest) -> None:
    """A PTE table whose 512 PTEs each map a page of a different THP, built by faulting a THP
    at BASE_ADDR 512 times and moving its first page (with those gathered so far) below
    BASE_ADDR with two mremap()s."""
    p = t.setup_area(1)
    for i in range(HPAGE_PMD_NR):
        t.p.madvise(BASE_ADDR, HPAGE_PMD_SIZE, MADV_HUGEPAGE)
        t.fault(t.p, BASE_ADDR, 0, HPAGE_PMD_SIZE)
        if not t.check_huge(t.p, BASE_ADDR, 1):
            raise SelftestFail("Failed to allocate huge page")
        t.p.madvise(BASE_ADDR, HPAGE_PMD_SIZE, MADV_NOHUGEPAGE)
        p = t.p.mremap(BASE_ADDR - i * PAGE_SIZE, i * PAGE_SIZE + HPAGE_PMD_SIZE, (i + 1) * PAGE_SIZE,
                       MREMAP_MAYMOVE | MREMAP_FIXED, BASE_ADDR + 2 * HPAGE_PMD_SIZE)
        p = t.p.mremap(BASE_ADDR + 2 * HPAGE_PMD_SIZE, (i + 1) * PAGE_SIZE, (i + 1) * PAGE_SIZE + HPAGE_PMD_SIZE,
                       MREMAP_MAYMOVE | MREMAP_FIXED, BASE_ADDR - (i + 1) * PAGE_SIZE)
    t.p.munmap(BASE_ADDR, HPAGE_PMD_SIZE)
    t.fault(t.p, p, 0, HPAGE_PMD_SIZE)
    t.expect(not t.check_huge(t.p, p, 1), "Construct PTE page table full of different PTE-mapped compound pages: Fail")
    t.collapse("Collapse PTE table full of different compound pages", p, 1, True)
    t.validate(t.p, p, 0, HPAGE_PMD_SIZE)
    t.p.munmap(p, HPAGE_PMD_SIZE)


def collapse_fork(t: Selftest) -> None:
    """A small page shared over fork; the child faults a second one and collapses: the child
    gets a THP, the parent keeps its small page."""
    p = t.setup_area(1)
    t.fault(t.p, p, 0, PAGE_SIZE)
    t.expect(t.check_huge(t.p, p, 0), "Allocate small page: Fail")
    child = t.p.fork()
    t.expect(t.check_huge(child, p, 0), "Share small page over fork(): Fail")
    t.fault(child, p, PAGE_SIZE, 2 * PAGE_SIZE)
    t.collapse("Collapse PTE table with single page shared with parent process", p, 1, True, proc=child)
    t.validate(child, p, 0, PAGE_SIZE)
    child.munmap(p, HPAGE_PMD_SIZE)
    child.exit()
    t.expect(t.check_huge(t.p, p, 0), "Check if parent still has small page: Fail")
    t.validate(t.p, p, 0, PAGE_SIZE)
    t.p.munmap(p, HPAGE_PMD_SIZE)


def collapse_fork_compound(t: Selftest) -> None:
    """A THP shared over fork; the child splits its PMD (the MADV_NOHUGEPAGE trick), writes its
    first page and, with max_ptes_shared=511, collapses: the parent keeps its THP."""
    p = t.alloc_hpage()
    child = t.p.fork()
    t.expect(t.check_huge(child, p, 1), "Share huge page over fork(): Fail")
    child.madvise(p, PAGE_SIZE, MADV_NOHUGEPAGE)
    child.madvise(p, HPAGE_PMD_SIZE, MADV_NOHUGEPAGE)
    t.expect(t.check_huge(child, p, 0), "Split huge page PMD in child process: Fail")
    t.fault(child, p, 0, PAGE_SIZE)
    t.k.sysfs.write("khugepaged/max_ptes_shared", str(HPAGE_PMD_NR - 1))
    t.collapse("Collapse PTE table full of compound pages in child", p, 1, True, proc=child)
    t.k.sysfs.write("khugepaged/max_ptes_shared", SELFTEST_SETTINGS["khugepaged/max_ptes_shared"])
    t.validate(child, p, 0, HPAGE_PMD_SIZE)
    child.munmap(p, HPAGE_PMD_SIZE)
    child.exit()
    t.expect(t.check_huge(t.p, p, 1), "Check if parent still has huge page: Fail")
    t.validate(t.p, p, 0, HPAGE_PMD_SIZE)
    t.p.munmap(p, HPAGE_PMD_SIZE)


def collapse_max_ptes_shared(t: Selftest) -> None:
    """max_ptes_shared=256: the child COWs 255 pages of the shared THP (257 PTEs still map shared
    pages: over the limit for khugepaged, not for MADV_COLLAPSE), then 256 (within it)."""
    max_ptes_shared = t.read_num("khugepaged/max_ptes_shared")
    assert max_ptes_shared == 256
    p = t.alloc_hpage()
    child = t.p.fork()
    t.expect(t.check_huge(child, p, 1), "Share huge page over fork(): Fail")
    t.fault(child, p, 0, (HPAGE_PMD_NR - max_ptes_shared - 1) * PAGE_SIZE)
    t.expect(t.check_huge(child, p, 0), f"Trigger CoW on page {HPAGE_PMD_NR - max_ptes_shared - 1}: Fail")
    t.collapse("Maybe collapse with max_ptes_shared exceeded", p, 1, not t.enforce_limits, proc=child)
    if t.enforce_limits:
        t.fault(child, p, 0, (HPAGE_PMD_NR - max_ptes_shared) * PAGE_SIZE)
        t.expect(t.check_huge(child, p, 0), f"Trigger CoW on page {HPAGE_PMD_NR - max_ptes_shared}: Fail")
        t.collapse("Collapse with max_ptes_shared PTEs shared", p, 1, True, proc=child)
    t.validate(child, p, 0, HPAGE_PMD_SIZE)
    child.munmap(p, HPAGE_PMD_SIZE)
    child.exit()
    t.expect(t.check_huge(t.p, p, 1), "Check if parent still has huge page: Fail")
    t.validate(t.p, p, 0, HPAGE_PMD_SIZE)
    t.p.munmap(p, HPAGE_PMD_SIZE)


def collapse_fork_cow_race(t: Selftest) -> None:
    """(2026 selftest) 64 pages shared over fork; the child fills the rest and collapses while
    the parent rewrites the shared pages (here: before and after the collapse): the child
    keeps the pre-fork contents, the parent sees only its own writes."""
    shared = 64 * PAGE_SIZE
    n = shared // PAGE_SIZE
    p = t.setup_area(1)
    t.fault(t.p, p, 0, shared)
    child = t.p.fork()
    t.fault(child, p, shared, HPAGE_PMD_SIZE)
    parent_tokens = 0xBEEF0000 + np.arange(n, dtype=np.int64)
    addrs = p + np.arange(n, dtype=np.int64) * PAGE_SIZE
    t.p.write_many(addrs[: n // 2], parent_tokens[: n // 2])          # some before the collapse
    t.collapse("Collapse a range shared with a writing co-sharer", p, 1, True, proc=child)
    t.p.write_many(addrs, parent_tokens)                             # all of them after it
    t.validate(child, p, 0, HPAGE_PMD_SIZE)
    child.munmap(p, HPAGE_PMD_SIZE)
    child.exit()
    t.expect((t.p.read_many(addrs) == parent_tokens).all(), "Fail: parent content")
    t.p.munmap(p, HPAGE_PMD_SIZE)


def madvise_collapse_existing_thps(t: Selftest) -> None:
    """(madvise only) A collapsed range collapses again: MADV_COLLAPSE of a PMD-mapped THP succeeds."""
    p = t.setup_area(1)
    t.fault(t.p, p, 0, HPAGE_PMD_SIZE)
    t.collapse("Collapse fully populated PTE table...", p, 1, True)
    t.validate(t.p, p, 0, HPAGE_PMD_SIZE)
    t._madvise_collapse(t.p, p, 1, True)                             # c->collapse() would refuse a THP
    t.validate(t.p, p, 0, HPAGE_PMD_SIZE)
    t.p.munmap(p, HPAGE_PMD_SIZE)


@dataclass(frozen=True)
class Case:
    fn: object
    contexts: tuple[str, ...] = ("khugepaged", "madvise")
    collapses: bool = True          # some step collapses a PMD (so thp-cow-v1 oopses)
    slow: bool = False              # 512 THP faults: more RAM, the checker once at the end,
                                    # and fewer builds (see BUILDS_FOR_SLOW)


CASES = [
    Case(alloc_at_fault, contexts=("fault",), collapses=False),
    Case(collapse_full),
    Case(collapse_empty, collapses=False),
    Case(collapse_single_pte_entry),
    Case(collapse_max_ptes_none),
    Case(collapse_swapin_single_pte),
    Case(collapse_max_ptes_swap),
    Case(collapse_single_pte_entry_compound),
    Case(collapse_full_of_compound),
    Case(collapse_compound_extreme, slow=True),
    Case(collapse_fork),
    Case(collapse_fork_compound),
    Case(collapse_max_ptes_shared),
    Case(collapse_fork_cow_race),
    Case(madvise_collapse_existing_thps, contexts=("madvise",)),
]

# Builds that copy on the child's first COW write to a shared PMD-mapped THP more than 4 KiB:
# collapse_max_ptes_shared's CoW steps do not leave the PTE counts it is built around.
DIVERGES = {
    ("collapse_max_ptes_shared", "thp-cow-meant"): "Trigger CoW on page 255: Fail",   # whole THP copied
    ("collapse_max_ptes_shared", "pre-5.8"): "Trigger CoW on page 255: Fail",         # whole THP copied
    ("collapse_max_ptes_shared", "cow-density"): "Trigger CoW on page 255: Fail",     # copied at the 64th COW
}
# mthp-cow (order 4) copies 16-page blocks: after 255 writes 256 pages are the child's own and
# 256 PTEs map shared pages, which is within max_ptes_shared: khugepaged collapses at once.
DIVERGES_KHUGEPAGED = {("collapse_max_ptes_shared", "mthp-cow"): "^Fail$"}

# collapse_compound_extreme faults 512 THPs (1 GiB: 1.5 GiB of RAM spares it compaction); its
# steps reach no COW and no collapse but the last, so the builds differ only there: upstream
# and the oopsing thp-cow-v1 stand for them.
BUILDS_FOR_SLOW = ("upstream", "thp-cow-v1")


def _params():
    for case in CASES:
        for context in case.contexts:
            for build in BUILDS:
                if case.slow and build not in BUILDS_FOR_SLOW:
                    continue
                yield pytest.param(case, context, build, id=f"{case.fn.__name__}-{context}-{build}")


@pytest.mark.parametrize("case, context, build", list(_params()))
def test_khugepaged_selftest(case: Case, context: str, build: str):
    name = case.fn.__name__
    t = Selftest(build, "madvise" if context == "fault" else context,
                 ram=3 * RAM if case.slow else RAM, check=not case.slow)
    expected_fail = DIVERGES.get((name, build))
    if context == "khugepaged" and not expected_fail:
        expected_fail = DIVERGES_KHUGEPAGED.get((name, build))
    if build == "thp-cow-v1" and case.collapses:
        with pytest.raises(KernelOops) as ei:
            case.fn(t)
        assert ei.value.function in ("map_anon_folio_pmd_nopf", "__page_table_check_pmds_set")
        assert "collapse_huge_page" in ei.value.stack
        return
    if expected_fail:
        with pytest.raises(SelftestFail, match=expected_fail):
            case.fn(t)
        return
    case.fn(t)
    assert not t._stack
    t.k.check()
