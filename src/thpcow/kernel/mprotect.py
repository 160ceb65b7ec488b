"""Model of mm/mprotect.c: mprotect() on private anonymous mappings."""

from __future__ import annotations

import errno as E
from typing import TYPE_CHECKING

import numpy as np

from .constants import (
    HPAGE_PMD_SIZE, PHYS_PFN, PROT_EXEC, PROT_READ, PROT_SEM, PROT_WRITE, VM_READ, VM_WRITE, VM_EXEC, VM_ACCOUNT,
    VM_NORESERVE, offset_in_page,
)
from .errors import KernelError, einval
from .mm import MM, PMD_LEAF, PMD_TABLE, VMA, _PAGE_RW, _PAGE_SPECIAL
from .page_alloc import PG_ANON_EXCLUSIVE
from .folio import PG_HUGE_ZERO
from . import huge_memory as hm
from . import pgtable
from .mmap import check_range, merge_vmas, split_range

if TYPE_CHECKING:
    from .kernel import Kernel


def change_protection(k: Kernel, mm: MM, vma: VMA, start: int, end: int) -> None:
    """Model of change_protection() for [start, end) of one VMA whose flags just changed.

    Taking write away clears the write bit of every PTE and PMD.  Giving it
    back makes an entry writable at once only where the page is
    AnonExclusive (can_change_pte_writable()/can_change_pmd_writable()); the
    others stay read-only and take a write fault later.  A PMD leaf only
    partly in the range is split (change_pmd_range()).
    """
    pt = mm.pt
    writable = bool(vma.flags & VM_WRITE)
    if not writable and "mprotect-keeps-write" in k.bugs:
        return                                      # injected bug (bugs.py): the entries keep their write bit
    k.flush_tlb_range(mm, start, end)
    for s, base, lo, hi in pt.spans_in(start, end):
        if pt.pmd_kind[s] == PMD_LEAF and (lo != base or hi != base + HPAGE_PMD_SIZE):
            hm.split_huge_pmd(k, mm, vma, s)
        if pt.pmd_kind[s] == PMD_LEAF:
            fid = int(pt.pmd_folio[s])
            if not writable or k.folios.flags[fid] & PG_HUGE_ZERO:
                pgtable.pmdp_set_wrprotect(k, mm, s)
            elif k.mem.pflags[int(k.folios.head[fid])] & PG_ANON_EXCLUSIVE:
                pgtable.pmd_update_flags(k, mm, s, set_bits=_PAGE_RW)
            continue
        if pt.pmd_kind[s] != PMD_TABLE:
            continue
        row = int(pt.pmd_row[s])
        a, b = PHYS_PFN(lo - base), PHYS_PFN(hi - base)
        if not writable:
            pgtable.ptep_set_wrprotect(k, mm, row, slice(a, b))
            continue
        pfns = pt.pte_pfn[row, a:b]
        normal = (pfns >= 0) & ~(pt.pte_flags[row, a:b] & _PAGE_SPECIAL).astype(bool)
        ae = np.zeros(len(pfns), dtype=bool)
        ae[normal] = (k.mem.pflags[pfns[normal]] & PG_ANON_EXCLUSIVE).astype(bool)
        pgtable.pte_update_flags(k, mm, row, a + np.flatnonzero(ae), set_bits=_PAGE_RW)


def mprotect_account(vma: VMA, newbits: int) -> int:
    """The commit-accounting rule of mprotect_fixup(): ``vma``'s flags with VM_ACCOUNT as it becomes.

    A private mapping made writable is charged (VM_ACCOUNT set) unless it
    already is, or was writable, or is MAP_NORESERVE.  Taking write away
    uncharges it (VM_ACCOUNT cleared) only while no page was ever written,
    i.e. an anonymous VMA with no anon_vma yet; otherwise the charge stays.
    Both change which neighbours the VMA can merge with.
    """
    flags = vma.flags
    if newbits & VM_WRITE:
        if not flags & (VM_ACCOUNT | VM_WRITE | VM_NORESERVE):
            flags |= VM_ACCOUNT
    elif flags & VM_ACCOUNT and not vma.anon_vma:
        flags &= ~VM_ACCOUNT
    return flags


def do_mprotect(k: Kernel, mm: MM, start: int, length: int, prot: int) -> None:
    """Model of do_mprotect_pkey().

    EINVAL for an unaligned start or unknown prot bits; ENOMEM when start is
    not mapped (nothing changes) or when a hole is met further on (the VMAs
    before the hole keep their new protection, as in the kernel).
    """
    call = "mprotect"
    if offset_in_page(start):
        raise einval(call, f"addr={start:#x}: not page aligned")
    if length == 0:
        return                                      # before the prot check, as the kernel does
    end = check_range(call, start, length)
    if prot & ~(PROT_READ | PROT_WRITE | PROT_EXEC | PROT_SEM):
        raise einval(call, f"prot={prot:#x}: unknown bits (arch_validate_prot)")
    if mm.find_vma(start) is None:
        raise KernelError(E.ENOMEM, call, f"addr={start:#x}: not mapped")
    newbits = (VM_READ if prot & PROT_READ else 0) | (VM_WRITE if prot & PROT_WRITE else 0) | \
        (VM_EXEC if prot & PROT_EXEC else 0)
    hole = None
    cursor = start
    for v in mm.vmas_in(start, end):
        if v.start > cursor:
            hole = cursor
            break
        cursor = v.end
    if hole is None and cursor < end:
        hole = cursor
    stop = hole if hole is not None else end
    changed = False
    for old in list(mm.vmas_in(start, stop)):
        if (old.flags & ~(VM_READ | VM_WRITE | VM_EXEC)) | newbits == old.flags:
            continue                                # mprotect_fixup(): same flags, nothing to do
        changed = True
        for v in split_range(k, mm, max(old.start, start), min(old.end, stop)):
            v.flags = mprotect_account(v, newbits)
            v.flags = (v.flags & ~(VM_READ | VM_WRITE | VM_EXEC)) | newbits
            change_protection(k, mm, v, v.start, v.end)
    if changed:
        merge_vmas(mm, start, stop)
    if hole is not None:
        raise KernelError(E.ENOMEM, call, f"addr={hole:#x}: hole in the range")
