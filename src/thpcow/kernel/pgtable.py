"""Model of the page tables and their writers (include/linux/pgtable.h, arch/x86/include/asm/pgtable.h).

Storage (:class:`PageTables`) is arrays, not objects per page:

- the PMD level is a set of *slots*, one per 2 MiB of address space that was
  ever populated (``slot_of[pmd index]``), with the entry kind (none, leaf,
  table), the leaf's folio id and flags, and the PTE table's row;
- PTE tables are rows of two 2-D arrays: ``pte_pfn[row, i]`` (-1 when none)
  and ``pte_flags[row, i]``.

A PMD leaf always carries a deposited PTE table (``pgtable_trans_huge_deposit``)
which counts in ``nr_ptes``; its contents are not needed until a split.

Writers.  The kernel stores into page tables through one family of helpers
(set_pte_at(), set_ptes(), pte_clear(), ptep_set_wrprotect(), set_pmd_at(),
pmd_populate(), pmdp_huge_get_and_clear(), ...), and page_table_check hooks
exactly there.  Likewise this module is the only one that stores into the PMD
slots and PTE tables; every other module reads them directly and writes through
the functions below.  PTE writers address entries by ``rows``/``cols``, which
may be ints, index arrays or (for ``cols``) a slice, so the batched paths write
many entries with one call.  PMD writers take a slot (or an array of slots for
the flag updates).

Every writer reports to page_table_check (``k.ptc``, see
:mod:`thpcow.kernel.page_table_check`) before it stores: the entries it
clears or overwrites first, then the ones it installs, and flag updates that
make entries writable.  With checking off ``k.ptc`` is None and the hook costs
one test per call.

Slot creation (an empty pmd_none slot) and the allocation and reset of
already empty PTE tables stay inside :class:`PageTables`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .constants import HPAGE_PMD_SIZE, PAGE_SHIFT, PMD_MASK, PMD_SHIFT, PMD_SIZE, PTRS_PER_PMD, PTRS_PER_PTE
from .errors import null_pmd_oops

if TYPE_CHECKING:
    from .kernel import Kernel
    from .mm import MM

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
# for slot (-2 - value).  A PTE marker is a -1 entry with marker bits in its flags:
# _PAGE_HWPOISON (PTE_MARKER_POISONED, left by memory_failure()) or PTE_MARKER_GUARD.
PTE_NONE = -1
PTE_MARKER_GUARD = _PAGE_SPECIAL      # MADV_GUARD_INSTALL's marker: any access is SIGSEGV
_PTE_MARKER_BITS = _PAGE_HWPOISON | PTE_MARKER_GUARD


def pte_none_mask(pfn, flags):
    """pte_none(): no page, no swap entry and no marker (ints or arrays)."""
    return (pfn == PTE_NONE) & ((flags & _PTE_MARKER_BITS) == 0)


def pte_guard_mask(pfn, flags):
    """is_guard_pte_marker(): a guard marker (ints or arrays)."""
    return (pfn == PTE_NONE) & ((flags & PTE_MARKER_GUARD) != 0)


def swp_entry(slot):
    return -2 - slot


def swp_offset(val):
    return -2 - val


# Entries made from vma->vm_page_prot are young: x86's protections all carry
# _PAGE_ACCESSED, so a fault maps a page (the zero page too) young.
PTE_NEW_ANON = _PAGE_PRESENT | _PAGE_RW | _PAGE_DIRTY | _PAGE_ACCESSED
PTE_ZERO = _PAGE_PRESENT | _PAGE_SPECIAL | _PAGE_ACCESSED
PMD_HUGE_ZERO = _PAGE_PRESENT | _PAGE_SPECIAL | _PAGE_ACCESSED


# -- page-table indexes -------------------------------------------------------------------------
# Plain operators: each works on a Python int and on a NumPy integer array alike.

def pmd_index(addr):
    """pmd_index(): the PMD entry an address falls in.

    Counted from address 0, not wrapped at PTRS_PER_PMD: the PMD slots of
    :class:`PageTables` are keyed by it (``slot_of``, ``pmd_index[slot]``).
    """
    return addr >> PMD_SHIFT


def pte_index(addr):
    """pte_index(): the entry of an address in its PTE table."""
    return (addr >> PAGE_SHIFT) & (PTRS_PER_PTE - 1)


def vpn_pmd_index(vpn):
    """pmd_index() of virtual page ``vpn`` (of the address PFN_PHYS(vpn))."""
    return vpn >> (PMD_SHIFT - PAGE_SHIFT)


def vpn_pte_index(vpn):
    """pte_index() of virtual page ``vpn`` (of the address PFN_PHYS(vpn))."""
    return vpn & (PTRS_PER_PTE - 1)


def pmd_addr_end(addr: int, end: int) -> int:
    """pmd_addr_end(): the end of the PMD block holding ``addr``, or ``end`` if that comes first."""
    return min((addr + PMD_SIZE) & PMD_MASK, end)


class PageTables:
    """The PMD slots and PTE tables of one mm (storage; stores go through the writers below)."""

    def __init__(self, cap_slots: int = 64, cap_rows: int = 16) -> None:
        self.slot_of: dict[int, int] = {}
        self.cap_slots = cap_slots
        self.pmd_index = np.zeros(cap_slots, dtype=np.int64)
        self.pmd_kind = np.zeros(cap_slots, dtype=np.int8)
        self.pmd_folio = np.full(cap_slots, -1, dtype=np.int64)
        self.pmd_flags = np.zeros(cap_slots, dtype=np.uint8)
        self.pmd_row = np.full(cap_slots, -1, dtype=np.int64)
        self.nr_slots = 0
        # PUD indexes (1 GiB of address space each) whose PMD table exists: allocated with the
        # first slot made in its range (__pmd_alloc() on a fault, a fork copy or an mremap
        # move), freed by free_pgtables() once no VMA is left in the range.
        self.pmd_tables: set[int] = set()
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
        self.pmd_tables.add(pmd_idx // PTRS_PER_PMD)
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
        slots = self.lookup_slots(vpn_pmd_index(vpns))
        has = slots >= 0
        sc = np.where(has, slots, 0)
        return sc, np.where(has, self.pmd_kind[sc], PMD_NONE)

    def has_pmd_table(self, addr: int) -> bool:
        """Does the PMD table covering ``addr`` exist (the PUD entry is present: mm_find_pmd() finds it)?"""
        return pmd_index(addr) // PTRS_PER_PMD in self.pmd_tables

    def slots_in(self, start: int, end: int) -> list[int]:
        """Slots whose 2 MiB block overlaps [start, end), in address order."""
        lo = pmd_index(start)
        hi = pmd_index(end - 1)
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
        """pte_free(): give back a PTE table whose entries were cleared (reset for reuse)."""
        self.pte_pfn[row] = -1
        self.pte_flags[row] = 0
        self.free_rows.append(row)


def _u8(bits: int) -> np.uint8:
    return np.uint8(bits & 0xFF)


# -- PTE writers -------------------------------------------------------------------------------
def set_pte_at(k: Kernel, mm: MM, row: int, i: int, pfn: int, flags: int) -> None:
    """Model of set_pte_at(): install one PTE (a page, a swap entry or a marker), replacing the old one."""
    pt = mm.pt
    if k.ptc is not None:
        k.ptc.pte_replace1(mm, int(pt.pte_pfn[row, i]), int(pt.pte_flags[row, i]), int(pfn), int(flags))
    pt.pte_pfn[row, i] = pfn
    pt.pte_flags[row, i] = flags


def set_ptes(k: Kernel, mm: MM, row: int, first: int, pfns, flags, nr: int | None = None) -> None:
    """Model of set_ptes(): a run of PTEs [first, first + nr) in one table.

    ``pfns``: an array of nr entries, or one value for all of them (then ``nr``
    is needed); ``flags``: one value or an array.
    """
    if nr is None:
        nr = len(pfns)
    pt = mm.pt
    sl = slice(first, first + nr)
    if k.ptc is not None:
        k.ptc.ptes_replace(mm, pt.pte_pfn[row, sl], pt.pte_flags[row, sl], pfns, flags)
    pt.pte_pfn[row, sl] = pfns
    pt.pte_flags[row, sl] = flags


def set_ptes_scatter(k: Kernel, mm: MM, rows, cols, pfns, flags) -> None:
    """Vectorised set_pte_at() for many distinct entries (rows[j], cols[j]) of one mm."""
    pt = mm.pt
    if k.ptc is not None:
        k.ptc.ptes_replace(mm, pt.pte_pfn[rows, cols], pt.pte_flags[rows, cols], pfns, flags)
    pt.pte_pfn[rows, cols] = pfns
    pt.pte_flags[rows, cols] = flags


def ptep_get_and_clear(k: Kernel, mm: MM, row: int, i: int) -> tuple[int, int]:
    """Model of ptep_get_and_clear(): clear one PTE and return its old (pfn, flags)."""
    pt = mm.pt
    pfn, flags = int(pt.pte_pfn[row, i]), int(pt.pte_flags[row, i])
    if k.ptc is not None:
        k.ptc.pte_clear1(mm, pfn, flags)
    pt.pte_pfn[row, i] = PTE_NONE
    pt.pte_flags[row, i] = 0
    return pfn, flags


def pte_clear(k: Kernel, mm: MM, row: int, i: int) -> None:
    """Model of pte_clear(): make one PTE none."""
    ptep_get_and_clear(k, mm, row, i)


def get_and_clear_full_ptes(k: Kernel, mm: MM, row: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Model of get_and_clear_full_ptes(): clear PTEs [lo, hi) of one table, returning copies of the old ones."""
    pt = mm.pt
    pfns = pt.pte_pfn[row, lo:hi].copy()
    flags = pt.pte_flags[row, lo:hi].copy()
    if k.ptc is not None:
        k.ptc.ptes_clear(mm, pfns, flags)
    pt.pte_pfn[row, lo:hi] = PTE_NONE
    pt.pte_flags[row, lo:hi] = 0
    return pfns, flags


def clear_ptes(k: Kernel, mm: MM, row: int, lo: int, hi: int) -> None:
    """Model of clear_full_ptes(): make PTEs [lo, hi) of one table none."""
    get_and_clear_full_ptes(k, mm, row, lo, hi)


def pte_update_flags(k: Kernel, mm: MM, rows, cols, set_bits: int = 0, clear_bits: int = 0) -> None:
    """Model of the in-place PTE updates (pte_mkyoung()/pte_mkclean()/pte_wrprotect()/... written back).

    Clears ``clear_bits`` then sets ``set_bits`` in the entries (rows, cols);
    an update that makes entries writable is checked by page_table_check.
    """
    pt = mm.pt
    if k.ptc is not None and set_bits & _PAGE_RW:
        k.ptc.ptes_mkwrite(mm, pt.pte_pfn[rows, cols], pt.pte_flags[rows, cols])
    if clear_bits:
        pt.pte_flags[rows, cols] &= _u8(~clear_bits)
    if set_bits:
        pt.pte_flags[rows, cols] |= _u8(set_bits)


def ptep_set_wrprotect(k: Kernel, mm: MM, rows, cols) -> None:
    """Model of ptep_set_wrprotect() / wrprotect_ptes(): clear the write bit."""
    mm.pt.pte_flags[rows, cols] &= _u8(~_PAGE_RW)


def ptep_set_access_flags(k: Kernel, mm: MM, rows, cols, bits: int) -> None:
    """Model of ptep_set_access_flags(): add young/dirty (and write) bits to present PTEs."""
    pte_update_flags(k, mm, rows, cols, set_bits=bits)


def ptep_test_and_clear_young(k: Kernel, mm: MM, row: int, i: int) -> bool:
    """Model of ptep_test_and_clear_young(): was the PTE young?  Clears the bit."""
    flags = mm.pt.pte_flags
    if not flags[row, i] & _PAGE_ACCESSED:
        return False
    flags[row, i] &= _u8(~_PAGE_ACCESSED)
    return True


def move_ptes(k: Kernel, mm: MM, srow: int, si: int, drow: int, di: int, n: int) -> None:
    """Model of move_ptes(): move n PTEs from [si, si + n) of one table to [di, di + n) of another."""
    pfns, flags = get_and_clear_full_ptes(k, mm, srow, si, si + n)
    set_ptes(k, mm, drow, di, pfns, flags)


# -- PMD writers -------------------------------------------------------------------------------
def set_pmd_at(k: Kernel, mm: MM, s: int, fid: int, flags: int) -> None:
    """Model of set_pmd_at(): install a PMD leaf mapping folio ``fid``, replacing the old leaf.

    ``s`` None is a NULL PMD pointer: the kernel oopses (KernelOops).
    """
    if s is None:
        raise null_pmd_oops(k)
    pt = mm.pt
    if k.ptc is not None:
        k.ptc.pmd_replace(mm, int(pt.pmd_kind[s]), int(pt.pmd_folio[s]), int(pt.pmd_flags[s]), fid, flags)
    pt.pmd_kind[s] = PMD_LEAF
    pt.pmd_folio[s] = fid
    pt.pmd_flags[s] = flags
    pt.pmd_row[s] = -1


def pmd_populate(k: Kernel, mm: MM, s: int, row: int) -> None:
    """Model of pmd_populate(): point the PMD at PTE table ``row`` (after a leaf was invalidated)."""
    pt = mm.pt
    if k.ptc is not None:
        k.ptc.pmd_clear(mm, int(pt.pmd_kind[s]), int(pt.pmd_folio[s]), int(pt.pmd_flags[s]))
    pt.pmd_kind[s] = PMD_TABLE
    pt.pmd_row[s] = row
    pt.pmd_folio[s] = -1
    pt.pmd_flags[s] = 0


def pmdp_huge_get_and_clear(k: Kernel, mm: MM, s: int) -> tuple[int, int]:
    """Model of pmdp_huge_get_and_clear(): clear a PMD leaf, returning its old (folio, flags)."""
    pt = mm.pt
    fid, flags = int(pt.pmd_folio[s]), int(pt.pmd_flags[s])
    pmd_clear(k, mm, s)
    return fid, flags


def pmd_clear(k: Kernel, mm: MM, s: int) -> None:
    """Model of pmd_clear(): make the PMD none (a leaf, or a table whose page was given back)."""
    pt = mm.pt
    if k.ptc is not None:
        k.ptc.pmd_clear(mm, int(pt.pmd_kind[s]), int(pt.pmd_folio[s]), int(pt.pmd_flags[s]))
    pt.pmd_kind[s] = PMD_NONE
    pt.pmd_folio[s] = -1
    pt.pmd_flags[s] = 0
    pt.pmd_row[s] = -1


def pmdp_collapse_flush(k: Kernel, mm: MM, s: int) -> int:
    """Model of pmdp_collapse_flush(): detach the PTE table under slot ``s`` (flushing the block); returns its row."""
    pt = mm.pt
    row = int(pt.pmd_row[s])
    base = int(pt.pmd_index[s]) * HPAGE_PMD_SIZE
    k.flush_tlb_range(mm, base, base + HPAGE_PMD_SIZE)
    pmd_clear(k, mm, s)
    return row


def free_pte_table(k: Kernel, mm: MM, s: int) -> None:
    """Model of free_pte_range(): clear the PMD pointing at a PTE table and free the table.

    page_table_check un-accounts entries still in it, as
    page_table_check_pte_clear_range() does (normally there are none).
    """
    pt = mm.pt
    row = int(pt.pmd_row[s])
    if k.ptc is not None:
        k.ptc.ptes_clear(mm, pt.pte_pfn[row], pt.pte_flags[row])
    pmd_clear(k, mm, s)
    pt.free_row(row)


def pmd_update_flags(k: Kernel, mm: MM, slots, set_bits: int = 0, clear_bits: int = 0) -> None:
    """Model of the in-place PMD leaf updates (pmd_mkyoung()/pmd_mkclean()/pmd_wrprotect()/... written back).

    ``slots``: one slot or an array of slots (PMD leaves).  An update that
    makes a leaf writable is checked by page_table_check.
    """
    pt = mm.pt
    if k.ptc is not None and set_bits & _PAGE_RW:
        for s in np.atleast_1d(slots).tolist():
            k.ptc.pmd_mkwrite(mm, int(pt.pmd_kind[s]), int(pt.pmd_folio[s]), int(pt.pmd_flags[s]))
    if clear_bits:
        pt.pmd_flags[slots] &= _u8(~clear_bits)
    if set_bits:
        pt.pmd_flags[slots] |= _u8(set_bits)


def pmdp_set_wrprotect(k: Kernel, mm: MM, s: int) -> None:
    """Model of pmdp_set_wrprotect(): clear the write bit of a PMD leaf."""
    mm.pt.pmd_flags[s] &= _u8(~_PAGE_RW)


def pmdp_set_access_flags(k: Kernel, mm: MM, s: int, bits: int) -> None:
    """Model of pmdp_set_access_flags(): add young/dirty (and write) bits to a PMD leaf."""
    pmd_update_flags(k, mm, s, set_bits=bits)


def pmdp_test_and_clear_young(k: Kernel, mm: MM, s: int) -> bool:
    """Model of pmdp_test_and_clear_young(): was the PMD leaf young?  Clears the bit."""
    flags = mm.pt.pmd_flags
    if not flags[s] & _PAGE_ACCESSED:
        return False
    flags[s] &= _u8(~_PAGE_ACCESSED)
    return True
