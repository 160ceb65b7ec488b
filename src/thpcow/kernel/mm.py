"""Model of struct mm_struct and struct vm_area_struct.

The page tables (:class:`PageTables`), their entry encoding (PMD kinds,
``_PAGE_*`` bits, swap entries), their index helpers (``pmd_index()``,
``pte_index()``) and their writers live in :mod:`thpcow.kernel.pgtable`; the
names are re-exported here.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from .constants import (
    PHYS_PFN, VM_FLAG_MNEMONICS, VM_READ, VM_WRITE, VM_EXEC, VM_MAYREAD, VM_MAYWRITE, VM_MAYEXEC,
)
from .pgtable import (  # noqa: F401  (re-exported)
    PMD_LEAF, PMD_NONE, PMD_TABLE, PTE_MARKER_GUARD, PTE_NEW_ANON, PTE_NONE, PTE_ZERO, PageTables, _PAGE_ACCESSED, _PAGE_DIRTY,
    _PAGE_HWPOISON, _PAGE_PRESENT, _PAGE_RW, _PAGE_SOFT_DIRTY, _PAGE_SPECIAL, _PAGE_SWP_EXCLUSIVE, pmd_index,
    pte_index, swp_entry, swp_offset, vpn_pmd_index, vpn_pte_index,
)


@dataclass
class VMA:
    """Model of struct vm_area_struct for a private anonymous mapping."""

    start: int
    end: int
    flags: int
    anon_vma: int = 0            # 0: no anon_vma yet; else an id (anon_vma_prepare)
    pgoff: int = -1              # vm_pgoff: for anon memory, the page index at mmap time
    # The anon_vma_chain links the parents' anon_vmas too: a fork child's copy of a VMA that
    # had an anon_vma (anon_vma_fork()), kept by splits and mremap copies (anon_vma_clone()).
    uncowed_parents: bool = False

    def had_uncowed_parents(self) -> bool:
        """Model of vma_had_uncowed_parents(): an anon_vma whose chain is not singular."""
        return bool(self.anon_vma) and self.uncowed_parents

    def __post_init__(self) -> None:
        if self.pgoff < 0:
            self.pgoff = PHYS_PFN(self.start)

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

    def find_vmas(self, addrs) -> list[VMA | None]:
        """vma_lookup() for each address of a sequence (a list or an array)."""
        starts = [v.start for v in self.vmas]
        out = []
        for a in (addrs.tolist() if hasattr(addrs, "tolist") else addrs):
            i = bisect.bisect_right(starts, a) - 1
            out.append(self.vmas[i] if i >= 0 and self.vmas[i].end > a else None)
        return out

    def vmas_in(self, start: int, end: int) -> list[VMA]:
        return [v for v in self.vmas if v.start < end and v.end > start]

    def insert_vma(self, vma: VMA) -> None:
        bisect.insort(self.vmas, vma, key=lambda v: v.start)
