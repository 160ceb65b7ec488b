"""Model of mm/mmap.c and mm/vma.c: placing, splitting, merging and unmapping VMAs.

Only private anonymous mappings are modelled.  Addresses are chosen top-down
from a fixed mmap base (no randomization, so runs repeat); an anonymous
mapping whose length is a multiple of 2 MiB is 2 MiB aligned, as
``__get_unmapped_area()`` does since v6.7 (limited to PMD-multiple lengths
since v6.12).
"""

from __future__ import annotations

import errno as E
from typing import TYPE_CHECKING

from .constants import (
    HPAGE_PMD_MASK, HPAGE_PMD_SIZE, MAP_ANONYMOUS, MAP_FIXED, MAP_FIXED_NOREPLACE, MAP_NORESERVE, MAP_POPULATE,
    MAP_PRIVATE, MAP_SHARED, MMAP_MIN_ADDR, PAGE_ALIGN, PAGE_MASK, PAGE_SIZE, PHYS_PFN, PROT_EXEC, PROT_READ,
    PROT_WRITE, PUD_SIZE, TASK_SIZE, VM_ACCOUNT, VM_MAYBE_GUARD, VM_NORESERVE, VM_WRITE, U64, offset_in_page,
)
from .errors import KernelError, einval, enomem
from .mm import MM, PMD_NONE, PMD_TABLE, VMA, prot_to_vm_flags
from . import huge_memory as hm
from . import memory, pgtable

if TYPE_CHECKING:
    from .kernel import Kernel

_KNOWN_MAP_FLAGS = MAP_SHARED | MAP_PRIVATE | MAP_FIXED | MAP_ANONYMOUS | MAP_NORESERVE | \
    MAP_POPULATE | MAP_FIXED_NOREPLACE


# -- address space search -------------------------------------------------------------------
def _gaps_topdown(mm: MM, top: int):
    """Free gaps (start, end) below ``top``, highest first."""
    end = top
    for v in reversed(mm.vmas):
        if v.start >= end:
            continue
        if v.end < end:
            yield v.end, end
        end = min(end, v.start)
    if end > MMAP_MIN_ADDR:
        yield MMAP_MIN_ADDR, end


def get_unmapped_area(mm: MM, length: int, hint: int = 0) -> int:
    """Model of __get_unmapped_area() for an anonymous private mapping; -1 if no room."""
    if hint:
        hint = hint & PAGE_MASK
        if MMAP_MIN_ADDR <= hint and hint + length <= TASK_SIZE and not mm.vmas_in(hint, hint + length):
            return hint
    thp_align = length % HPAGE_PMD_SIZE == 0
    for gs, ge in _gaps_topdown(mm, mm.mmap_base):
        if thp_align and ge - gs >= length + HPAGE_PMD_SIZE:
            # thp_get_unmapped_area(): ask for len + 2 MiB, keep the aligned part
            return (ge - length) & HPAGE_PMD_MASK
        if not thp_align and ge - gs >= length:
            return ge - length
    if thp_align:
        return get_unmapped_area_plain(mm, length)
    return -1


def get_unmapped_area_plain(mm: MM, length: int) -> int:
    for gs, ge in _gaps_topdown(mm, mm.mmap_base):
        if ge - gs >= length:
            return ge - length
    return -1


# -- split and merge ---------------------------------------------------------------------------
def split_vma(k: Kernel, mm: MM, vma: VMA, addr: int) -> VMA:
    """Model of split_vma(): cut ``vma`` at ``addr``; returns the upper part.

    A boundary inside a 2 MiB block that a PMD leaf maps splits that PMD first
    (vma_adjust_trans_huge()).
    """
    hm.vma_adjust_trans_huge(k, mm, vma, addr)
    upper = VMA(addr, vma.end, vma.flags, vma.anon_vma, vma.pgoff + PHYS_PFN(addr - vma.start),
                vma.uncowed_parents)                # anon_vma_clone()
    vma.end = addr
    mm.insert_vma(upper)
    return upper


def split_range(k: Kernel, mm: MM, start: int, end: int) -> list[VMA]:
    """Split VMAs so that [start, end) is covered by whole VMAs; return them in order."""
    out = []
    for v in list(mm.vmas_in(start, end)):
        if v.start < start:
            v = split_vma(k, mm, v, start)
        if v.end > end:
            split_vma(k, mm, v, end)
        out.append(v)
    return out


def is_mergeable_anon_vma(a: VMA, b: VMA) -> bool:
    """Model of is_mergeable_anon_vma(): may two adjacent VMAs share one anon_vma?

    Two anon_vmas must be the same one.  A VMA without one may join a VMA
    that has one, unless that VMA's anon_vma_chain also links its parents'
    anon_vmas (vma_had_uncowed_parents(): a fork child's VMA that had one).
    """
    if a.anon_vma and b.anon_vma:
        return a.anon_vma == b.anon_vma
    if a.anon_vma:
        return not a.had_uncowed_parents()
    if b.anon_vma:
        return not b.had_uncowed_parents()
    return True


def can_merge(a: VMA, b: VMA) -> bool:
    """Model of the anon part of is_mergeable_vma()/is_mergeable_anon_vma().

    The flags must be equal, VM_ACCOUNT and VM_NORESERVE included, but for
    VM_IGNORE_MERGE: VM_SOFTDIRTY (thpcow has none) and the sticky
    VM_MAYBE_GUARD, which the merged VMA keeps if either had it (VM_STICKY);
    the page offsets must follow on; the anon_vmas must be compatible.
    """
    return a.end == b.start and not (a.flags ^ b.flags) & ~VM_MAYBE_GUARD and a.pgoff + PHYS_PFN(a.end - a.start) == b.pgoff and \
        is_mergeable_anon_vma(a, b)


def merge_vmas(mm: MM, start: int, end: int) -> None:
    """Model of vma_merge_*(): merge VMAs touching [start, end) with equal neighbours."""
    i = 0
    vmas = mm.vmas
    while i < len(vmas) - 1:
        a, b = vmas[i], vmas[i + 1]
        if b.start > end or a.end < start:
            i += 1
            continue
        if can_merge(a, b):
            a.end = b.end
            a.flags |= b.flags & VM_MAYBE_GUARD
            if not a.anon_vma:
                a.anon_vma, a.uncowed_parents = b.anon_vma, b.uncowed_parents
            del vmas[i + 1]
            continue
        i += 1


# -- page-table freeing -------------------------------------------------------------------------
def free_pgtables(k: Kernel, mm: MM, start: int, end: int) -> None:
    """Model of free_pgtables(): free PTE tables of 2 MiB blocks no VMA uses any more."""
    pt = mm.pt
    for s in pt.slots_in(start, end):
        base = int(pt.pmd_index[s]) * HPAGE_PMD_SIZE
        if mm.vmas_in(base, base + HPAGE_PMD_SIZE):
            continue
        if pt.pmd_kind[s] == PMD_TABLE:
            memory.pte_free(k, mm, s)
        elif pt.pmd_kind[s] != PMD_NONE:
            pgtable.pmd_clear(k, mm, s)
    # free_pmd_range(): a PMD table goes once no VMA is left in its 1 GiB (PUD) range.
    first, last = start // PUD_SIZE, (end - 1) // PUD_SIZE
    for pud in [i for i in pt.pmd_tables if first <= i <= last]:
        if not mm.vmas_in(pud * PUD_SIZE, (pud + 1) * PUD_SIZE):
            pt.pmd_tables.discard(pud)


# -- system calls ----------------------------------------------------------------------------------
def do_mmap(k: Kernel, mm: MM, addr: int, length: int, prot: int, flags: int) -> int:
    """Model of do_mmap() for MAP_PRIVATE|MAP_ANONYMOUS.

    Errors (nothing changed): EINVAL for a zero length, unknown prot or flag
    bits, MAP_SHARED or a file mapping (not modelled), an unaligned MAP_FIXED
    address; ENOMEM when the length overflows or no room is left; EEXIST for
    MAP_FIXED_NOREPLACE over an existing mapping.
    """
    call = "mmap"
    if length <= 0:
        raise einval(call, f"length={length}: must be > 0")
    if prot & ~(PROT_READ | PROT_WRITE | PROT_EXEC):
        raise einval(call, f"prot={prot:#x}: unknown bits")
    if flags & ~_KNOWN_MAP_FLAGS:
        raise einval(call, f"flags={flags:#x}: unknown or unmodelled flag bits")
    if not flags & MAP_ANONYMOUS or flags & MAP_SHARED or not flags & MAP_PRIVATE:
        raise einval(call, f"flags={flags:#x}: only MAP_PRIVATE|MAP_ANONYMOUS is modelled")
    length = PAGE_ALIGN(length)
    if length > TASK_SIZE:
        raise enomem(call, f"length={length:#x}: larger than the address space")
    fixed = flags & (MAP_FIXED | MAP_FIXED_NOREPLACE)
    if fixed:
        if offset_in_page(addr):
            raise einval(call, f"addr={addr:#x}: MAP_FIXED needs a page-aligned address")
        if addr < MMAP_MIN_ADDR or addr + length > TASK_SIZE:
            raise enomem(call, f"addr={addr:#x}: outside the user address space")
        if flags & MAP_FIXED_NOREPLACE and mm.vmas_in(addr, addr + length):
            raise KernelError(E.EEXIST, call, f"addr={addr:#x}: MAP_FIXED_NOREPLACE over an existing mapping")
        if mm.vmas_in(addr, addr + length):
            do_munmap(k, mm, addr, length)
        start = addr
    else:
        start = get_unmapped_area(mm, length, addr)
        if start < 0:
            raise enomem(call, f"length={length:#x}: no free range of that size")
    vm_flags = prot_to_vm_flags(prot)
    if flags & MAP_NORESERVE:
        vm_flags |= VM_NORESERVE                    # honoured: overcommit_memory is not 2 (never)
    if (vm_flags & (VM_NORESERVE | VM_WRITE)) == VM_WRITE:
        vm_flags |= VM_ACCOUNT                      # accountable_mapping()
    vma = VMA(start, start + length, vm_flags)
    mm.insert_vma(vma)
    merge_vmas(mm, start, start + length)
    if flags & MAP_POPULATE:
        k.populate(mm, start, length, write=bool(vma.flags & VM_WRITE))
    return start


def do_munmap(k: Kernel, mm: MM, addr: int, length: int) -> None:
    """Model of do_vmi_munmap(): EINVAL for an unaligned address or a zero length."""
    call = "munmap"
    if offset_in_page(addr):
        raise einval(call, f"addr={addr:#x}: not page aligned")
    if length <= 0:
        raise einval(call, f"length={length}: must be > 0")
    length = PAGE_ALIGN(length)
    if addr + length > TASK_SIZE or addr + length < addr:
        raise einval(call, f"addr={addr:#x} length={length:#x}: outside the address space")
    end = addr + length
    vmas = split_range(k, mm, addr, end)
    for v in vmas:
        memory.zap_range(k, mm, v, v.start, v.end)
        mm.vmas.remove(v)
    free_pgtables(k, mm, addr, end)


def unmap_all(k: Kernel, mm: MM) -> None:
    """Model of exit_mmap(): zap every VMA and free all page tables."""
    for v in list(mm.vmas):
        memory.zap_range(k, mm, v, v.start, v.end)
    mm.vmas.clear()
    if mm.pt.nr_slots:
        lo = int(mm.pt.pmd_index[: mm.pt.nr_slots].min()) * HPAGE_PMD_SIZE
        hi = (int(mm.pt.pmd_index[: mm.pt.nr_slots].max()) + 1) * HPAGE_PMD_SIZE
        free_pgtables(k, mm, lo, hi)


def check_range(call: str, start: int, length: int) -> int:
    """mprotect()'s argument checks after the zero-length test: the page-aligned end.

    Lengths are unsigned 64-bit as in the kernel: a range whose end wraps is ENOMEM.
    """
    if offset_in_page(start):
        raise einval(call, f"addr={start:#x}: not page aligned")
    if length < 0:
        raise einval(call, f"length={length}: negative")
    aligned = PAGE_ALIGN(length) & U64
    end = (start + aligned) & U64
    if end <= start or end > TASK_SIZE + PAGE_SIZE:
        raise enomem(call, f"addr={start:#x} length={length:#x}: range overflows the address space")
    return end
