"""Model of struct mm_struct, struct vm_area_struct and the page tables.

Page tables are arrays, not objects per page:

- the PMD level is a set of *slots*, one per 2 MiB of address space that was
  ever populated (``slot_of[pmd index]``), with the entry kind (none, leaf,
  table), the leaf's folio id and flags, and the PTE table's row;
- PTE tables are rows of two 2-D arrays: ``pte_pfn[row, i]`` (-1 when none)
  and ``pte_flags[row, i]``.

A PMD leaf always carries a deposited PTE table (``pgtable_trans_huge_deposit``)
which counts in ``nr_ptes``; its contents are not needed until a split.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np

from .constants import (
    HPAGE_PMD_SHIFT, HPAGE_PMD_SIZE, PAGE_SHIFT, PTRS_PER_PTE, VM_FLAG_MNEMONICS, VM_READ, VM_WRITE,
    VM_EXEC, VM_MAYREAD, VM_MAYWRITE, VM_MAYEXEC,
)

# PMD entry kinds
PMD_NONE = 0
PMD_LEAF = 1
PMD_TABLE = 2

# PTE / PMD flag bits (simulator encoding; names after the x86 _PAGE_* bits)
_PAGE_PRESENT = 1 << 0
_PAGE_RW = 1 << 1
_PAGE_DIRTY = 1 << 2
_PAGE_ACCESSED = 1 << 3
_PAGE_SPECIAL = 1 << 4        # zero page / huge zero page: no struct page refcounting
_PAGE_SOFT_DIRTY = 1 << 5
_PAGE_SWP_EXCLUSIVE = 1 << 6  # a swap entry whose page was AnonExclusive
_PAGE_HWPOISON = 1 << 7       # an empty entry left by memory_failure(): access is SIGBUS

# Entry encoding in pte_pfn: >= 0 a present page's PFN, -1 none, <= -2 a swap entry
# for slot (-2 - value).
PTE_NONE = -1


def swp_entry(slot):
    return -2 - slot


def swp_offset(val):
    return -2 - val

PTE_NEW_ANON = _PAGE_PRESENT | _PAGE_RW | _PAGE_DIRTY | _PAGE_ACCESSED
PTE_ZERO = _PAGE_PRESENT | _PAGE_SPECIAL


@dataclass
class VMA:
    """Model of struct vm_area_struct for a private anonymous mapping."""

    start: int
    end: int
    flags: int
    anon_vma: int = 0            # 0: no anon_vma yet; else an id (anon_vma_prepare)
    pgoff: int = -1              # vm_pgoff: for anon memory, the page index at mmap time

    def __post_init__(self) -> None:
        if self.pgoff < 0:
            self.pgoff = self.start >> 12

    @property
    def length(self) -> int:
        return self.end - self.start

    def contains(self, addr: int) -> bool:
        return self.start <= addr < self.end

    def perms(self) -> str:
        f = self.flags
        return ("r" if f & VM_READ else "-") + ("w" if f & VM_WRITE else "-") + \
               ("x" if f & VM_EXEC else "-") + "p"

    def mnemonics(self) -> str:
        return " ".join(name for bit, name in VM_FLAG_MNEMONICS if self.flags & bit)


def prot_to_vm_flags(prot: int) -> int:
    """Model of calc_vm_prot_bits() plus the VM_MAY* bits of a private mapping."""
    flags = VM_MAYREAD | VM_MAYWRITE | VM_MAYEXEC
    if prot & 1:
        flags |= VM_READ
    if prot & 2:
        flags |= VM_WRITE
    if prot & 4:
        flags |= VM_EXEC
    return flags


class PageTables:
    """The PMD slots and PTE tables of one mm."""

    def __init__(self, cap_slots: int = 64, cap_rows: int = 16) -> None:
        self.slot_of: dict[int, int] = {}
        self.cap_slots = cap_slots
        self.pmd_index = np.zeros(cap_slots, dtype=np.int64)
        self.pmd_kind = np.zeros(cap_slots, dtype=np.int8)
        self.pmd_folio = np.full(cap_slots, -1, dtype=np.int64)
        self.pmd_flags = np.zeros(cap_slots, dtype=np.uint8)
        self.pmd_row = np.full(cap_slots, -1, dtype=np.int64)
        self.nr_slots = 0
        self.cap_rows = cap_rows
        self.pte_pfn = np.full((cap_rows, PTRS_PER_PTE), -1, dtype=np.int64)
        self.pte_flags = np.zeros((cap_rows, PTRS_PER_PTE), dtype=np.uint8)
        self.free_rows: list[int] = []
        self.nr_rows = 0
        self._sorted_keys: np.ndarray | None = None
        self._sorted_slots: np.ndarray | None = None
        self._dense: np.ndarray | None = None
        self._dense_lo = 0

    # -- slots ------------------------------------------------------------------
    def slot(self, pmd_idx: int) -> int:
        """The slot of a PMD index, creating an empty (pmd_none) one if needed."""
        s = self.slot_of.get(pmd_idx)
        if s is not None:
            return s
        s = self.nr_slots
        if s == self.cap_slots:
            self._grow_slots()
        self.nr_slots += 1
        self.slot_of[pmd_idx] = s
        self.pmd_index[s] = pmd_idx
        self.pmd_kind[s] = PMD_NONE
        self.pmd_folio[s] = -1
        self.pmd_flags[s] = 0
        self.pmd_row[s] = -1
        self._sorted_keys = None
        return s

    def _grow_slots(self) -> None:
        cap = self.cap_slots * 2
        for name, fill in (("pmd_index", 0), ("pmd_kind", 0), ("pmd_folio", -1),
                           ("pmd_flags", 0), ("pmd_row", -1)):
            old = getattr(self, name)
            new = np.full(cap, fill, dtype=old.dtype)
            new[: self.cap_slots] = old
            setattr(self, name, new)
        self.cap_slots = cap

    def lookup_slots(self, pmd_idx: np.ndarray) -> np.ndarray:
        """Vector slot lookup: slot per PMD index, -1 where there is none.

        Optimization: while the used PMD indexes span a modest window (one
        region, the usual case) a dense index array answers with one gather;
        a sparse address space falls back to binary search.
        """
        if self._sorted_keys is None:
            keys = self.pmd_index[: self.nr_slots]
            self._dense = None
            if len(keys) and int(keys.max()) - int(keys.min()) < (1 << 22):
                lo = int(keys.min())
                dense = np.full(int(keys.max()) - lo + 1, -1, dtype=np.int64)
                dense[keys - lo] = np.arange(len(keys))
                self._dense, self._dense_lo = dense, lo
            order = np.argsort(keys, kind="stable")
            self._sorted_keys = keys[order]
            self._sorted_slots = order
        if self._dense is not None:
            rel = pmd_idx - self._dense_lo
            inside = (rel >= 0) & (rel < len(self._dense))
            return np.where(inside, self._dense[np.where(inside, rel, 0)], -1)
        keys = self._sorted_keys
        if len(keys) == 0:
            return np.full(len(pmd_idx), -1, dtype=np.int64)
        pos = np.searchsorted(keys, pmd_idx)
        pos_c = np.minimum(pos, len(keys) - 1)
        found = keys[pos_c] == pmd_idx
        return np.where(found, self._sorted_slots[pos_c], -1)

    def pmd_entries(self, vpns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Vector PMD-level walk for virtual page numbers: (slot, or 0; entry kind, PMD_NONE if no slot)."""
        slots = self.lookup_slots(vpns >> 9)
        has = slots >= 0
        sc = np.where(has, slots, 0)
        return sc, np.where(has, self.pmd_kind[sc], PMD_NONE)

    def slots_in(self, start: int, end: int) -> list[int]:
        """Slots whose 2 MiB block overlaps [start, end), in address order."""
        lo = start >> HPAGE_PMD_SHIFT
        hi = (end - 1) >> HPAGE_PMD_SHIFT
        if hi - lo + 1 <= len(self.slot_of):
            out = [self.slot_of[i] for i in range(lo, hi + 1) if i in self.slot_of]
        else:
            out = sorted((i, s) for i, s in self.slot_of.items() if lo <= i <= hi)
            out = [s for _, s in out]
        return out

    def spans_in(self, start: int, end: int):
        """For each slot of slots_in(): (slot, block start, the part [lo, hi) of [start, end) in its block)."""
        for s in self.slots_in(start, end):
            base = int(self.pmd_index[s]) * HPAGE_PMD_SIZE
            yield s, base, max(start, base), min(end, base + HPAGE_PMD_SIZE)

    # -- PTE tables -----------------------------------------------------------------
    def alloc_row(self) -> int:
        """A fresh, empty PTE table (pte_alloc_one)."""
        if self.free_rows:
            row = self.free_rows.pop()
        else:
            row = self.nr_rows
            if row == self.cap_rows:
                cap = self.cap_rows * 2
                pfn = np.full((cap, PTRS_PER_PTE), -1, dtype=np.int64)
                flg = np.zeros((cap, PTRS_PER_PTE), dtype=np.uint8)
                pfn[: self.cap_rows] = self.pte_pfn
                flg[: self.cap_rows] = self.pte_flags
                self.pte_pfn, self.pte_flags, self.cap_rows = pfn, flg, cap
            self.nr_rows += 1
        self.pte_pfn[row] = -1
        self.pte_flags[row] = 0
        return row

    def free_row(self, row: int) -> None:
        self.pte_pfn[row] = -1
        self.pte_flags[row] = 0
        self.free_rows.append(row)


_next_mm_id = [1]


@dataclass
class MM:
    """Model of struct mm_struct: VMAs, page tables, rss counters and flags."""

    pid: int
    vmas: list[VMA] = field(default_factory=list)
    pt: PageTables = field(default_factory=PageTables)
    mm_id: int = 0
    rss_anon: int = 0            # MM_ANONPAGES
    rss_swap: int = 0            # MM_SWAPENTS
    nr_ptes: int = 0             # page-table pages (incl. deposited ones)
    thp_disable: int = 0         # PR_SET_THP_DISABLE flags: 1 completely, 3 except advised
    khugepaged: bool = False     # MMF_VM_HUGEPAGE: on khugepaged's list
    huge_zero: bool = False      # MMF_HUGE_ZERO_FOLIO
    alive: bool = True
    mmap_base: int = 0

    def __post_init__(self) -> None:
        if not self.mm_id:
            self.mm_id = _next_mm_id[0]
            _next_mm_id[0] += 1

    # -- VMA tree (a sorted list: VMAs are few) -----------------------------------
    def find_vma(self, addr: int) -> VMA | None:
        """Model of vma_lookup(): the VMA containing addr, or None."""
        starts = [v.start for v in self.vmas]
        i = bisect.bisect_right(starts, addr) - 1
        if i >= 0 and self.vmas[i].end > addr:
            return self.vmas[i]
        return None

    def vmas_in(self, start: int, end: int) -> list[VMA]:
        return [v for v in self.vmas if v.start < end and v.end > start]

    def insert_vma(self, vma: VMA) -> None:
        bisect.insort(self.vmas, vma, key=lambda v: v.start)



def pmd_index(addr: int) -> int:
    return addr >> HPAGE_PMD_SHIFT


def pte_index(addr: int) -> int:
    return (addr >> PAGE_SHIFT) & (PTRS_PER_PTE - 1)
