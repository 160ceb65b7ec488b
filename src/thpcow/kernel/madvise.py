"""Model of mm/madvise.c for private anonymous memory."""

from __future__ import annotations

import errno as E
from typing import TYPE_CHECKING

import numpy as np

from .constants import (
    HPAGE_PMD_SIZE, MADV_COLD, MADV_COLLAPSE, MADV_DOFORK, MADV_DONTFORK, MADV_DONTNEED, MADV_FREE,
    MADV_HUGEPAGE, MADV_KEEPONFORK, MADV_NOHUGEPAGE, MADV_NORMAL, MADV_PAGEOUT, MADV_RANDOM,
    MADV_SEQUENTIAL, MADV_THP_COW, MADV_THP_SETUP_BASE, MADV_WILLNEED, MADV_WIPEONFORK, PAGE_SHIFT,
    VM_DONTCOPY, VM_HUGEPAGE, VM_LOCKED, VM_NOHUGEPAGE, VM_THP_COW, VM_WIPEONFORK,
)
from .errors import KernelError, einval
from .folio import PG_DIRTY, PG_HUGE_ZERO, PG_SWAPBACKED
from .mm import MM, PMD_LEAF, PMD_TABLE, VMA, _PAGE_ACCESSED, _PAGE_DIRTY, _PAGE_SPECIAL
from . import huge_memory as hm
from . import memory
from .mmap import check_range, merge_vmas, split_range

if TYPE_CHECKING:
    from .kernel import Kernel

# advice -> (flags to set, flags to clear) for the vm_flags-only advice
_FLAG_ADVICE = {
    MADV_HUGEPAGE: (VM_HUGEPAGE, VM_NOHUGEPAGE),
    MADV_NOHUGEPAGE: (VM_NOHUGEPAGE, VM_HUGEPAGE),
    MADV_DONTFORK: (VM_DONTCOPY, 0),
    MADV_DOFORK: (0, VM_DONTCOPY),
    MADV_WIPEONFORK: (VM_WIPEONFORK, 0),
    MADV_KEEPONFORK: (0, VM_WIPEONFORK),
    MADV_THP_COW: (VM_THP_COW, 0),        # series thp_cow v1 1/5
}
_NOOP_ADVICE = (MADV_NORMAL, MADV_RANDOM, MADV_SEQUENTIAL, MADV_WILLNEED, MADV_THP_SETUP_BASE)
_LATER_ADVICE = (MADV_COLD, MADV_PAGEOUT)


def madvise_behavior_valid(k: Kernel, advice: int) -> bool:
    """Model of madvise_behavior_valid(); MADV_THP_COW only with the series applied."""
    if advice == MADV_THP_COW:
        return k.series_thp_cow
    return advice in _FLAG_ADVICE or advice in _NOOP_ADVICE or advice in _LATER_ADVICE or \
        advice in (MADV_DONTNEED, MADV_FREE, MADV_COLLAPSE)


def do_madvise(k: Kernel, mm: MM, start: int, length: int, advice: int) -> None:
    """Model of do_madvise().

    EINVAL for an unaligned start, a negative length or an unknown advice;
    ENOMEM when part of the range is not mapped: as in the kernel, the advice
    is still applied to the mapped parts before ENOMEM is returned.
    """
    call = "madvise"
    if not madvise_behavior_valid(k, advice):
        raise einval(call, f"advice={advice}: unknown advice")
    end = check_range(call, start, length)
    if end == start:
        return
    if advice in _LATER_ADVICE:
        raise NotImplementedError(f"madvise advice {advice} is not modelled yet")
    vmas = mm.vmas_in(start, end)
    mapped = sum(min(v.end, end) - max(v.start, start) for v in vmas)
    if advice in _NOOP_ADVICE:
        pass
    elif advice in _FLAG_ADVICE:
        if advice == MADV_WIPEONFORK or advice == MADV_KEEPONFORK:
            pass                                    # private anonymous: allowed
        set_bits, clear_bits = _FLAG_ADVICE[advice]
        madvise_update_vma(k, mm, start, end, set_bits, clear_bits)
        if advice == MADV_HUGEPAGE:
            for v in mm.vmas_in(start, end):
                k.khugepaged_enter_vma(mm, v)
    elif advice == MADV_DONTNEED:
        for v in vmas:
            if v.flags & VM_LOCKED:
                raise einval(call, f"addr={v.start:#x}: MADV_DONTNEED on a VM_LOCKED mapping")
        for v in vmas:
            memory.zap_range(k, mm, v, max(v.start, start), min(v.end, end))
    elif advice == MADV_FREE:
        for v in vmas:
            madvise_free_single_vma(k, mm, v, max(v.start, start), min(v.end, end))
    elif advice == MADV_COLLAPSE:
        if mapped != end - start:
            raise KernelError(E.ENOMEM, call, f"addr={start:#x} length={end - start:#x}: part of the range is not mapped")
        from .khugepaged import madvise_collapse
        madvise_collapse(k, mm, start, end)
    if mapped != end - start:
        raise KernelError(E.ENOMEM, call, f"addr={start:#x} length={end - start:#x}: part of the range is not mapped")


def madvise_update_vma(k: Kernel, mm: MM, start: int, end: int, set_bits: int, clear_bits: int) -> None:
    """Model of madvise_update_vma(): change vm_flags, splitting and merging VMAs."""
    for v in mm.vmas_in(start, end):
        new = (v.flags | set_bits) & ~clear_bits
        if new == v.flags:
            continue
        lo, hi = max(v.start, start), min(v.end, end)
        for part in split_range(k, mm, lo, hi):
            part.flags = (part.flags | set_bits) & ~clear_bits
    merge_vmas(mm, start, end)


def madvise_free_single_vma(k: Kernel, mm: MM, vma: VMA, start: int, end: int) -> None:
    """Model of madvise_free_single_vma(): mark exclusive pages lazily freeable.

    A PMD-mapped THP wholly in the range is marked clean and lazyfree when
    this mm is its only mapper; one only partly in the range is split
    (split_folio()) and handled at PTE level.  Shared pages are skipped.
    Large PTE-mapped folios partly in the range are split when exclusive.
    """
    pt = mm.pt
    f = k.folios
    for s in pt.slots_in(start, end):
        base = int(pt.pmd_index[s]) * HPAGE_PMD_SIZE
        lo, hi = max(start, base), min(end, base + HPAGE_PMD_SIZE)
        if pt.pmd_kind[s] == PMD_LEAF:
            fid = int(pt.pmd_folio[s])
            if f.flags[fid] & PG_HUGE_ZERO or f.large[fid] != 1:
                continue                              # huge zero, or mapped shared: skip
            if lo == base and hi == base + HPAGE_PMD_SIZE:
                f.flags[fid] &= np.uint16(~(PG_DIRTY | PG_SWAPBACKED) & 0xFFFF)
                pt.pmd_flags[s] &= ~np.uint8(_PAGE_DIRTY | _PAGE_ACCESSED)
                continue
            hm.split_folio(k, fid)
        if pt.pmd_kind[s] != PMD_TABLE:
            continue
        row = int(pt.pmd_row[s])
        for i in range((lo - base) >> PAGE_SHIFT, (hi - base) >> PAGE_SHIFT):
            pfn = int(pt.pte_pfn[row, i])
            if pfn < 0 or pt.pte_flags[row, i] & _PAGE_SPECIAL:
                continue
            fid = int(k.mem.folio[pfn])
            nr = 1 << int(f.order[fid])
            if nr > 1:
                head = int(f.head[fid])
                fully = base + ((i - (pfn - head)) << PAGE_SHIFT) >= start and \
                    base + ((i - (pfn - head) + nr) << PAGE_SHIFT) <= end
                shared = f.maybe_mapped_shared(fid, int(k.mem.mapcount[pfn]))
                if shared:
                    continue
                if not fully:
                    if hm.split_folio(k, fid) != 0:
                        continue
                    fid = int(k.mem.folio[pfn])
            elif k.mem.mapcount[pfn] != 1:
                continue
            f.flags[fid] &= np.uint16(~(PG_DIRTY | PG_SWAPBACKED) & 0xFFFF)
            pt.pte_flags[row, i] &= ~np.uint8(_PAGE_DIRTY | _PAGE_ACCESSED)
