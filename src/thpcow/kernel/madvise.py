"""Model of mm/madvise.c for private anonymous memory."""

from __future__ import annotations

import errno as E
from typing import TYPE_CHECKING

import numpy as np

from .constants import (
    HPAGE_PMD_SIZE, MADV_COLD, MADV_COLLAPSE, MADV_DOFORK, MADV_DONTFORK, MADV_DONTNEED, MADV_FREE,
    MADV_HUGEPAGE, MADV_KEEPONFORK, MADV_NOHUGEPAGE, MADV_NORMAL, MADV_PAGEOUT, MADV_RANDOM,
    MADV_SEQUENTIAL, MADV_THP_COW, MADV_THP_SETUP_BASE, MADV_THP_SETUP_END, MADV_WILLNEED, MADV_WIPEONFORK,
    PAGE_ALIGN, PAGE_ALIGNED, PHYS_PFN,
    VM_DONTCOPY, VM_HUGEPAGE, VM_LOCKED, VM_NOHUGEPAGE, VM_THP_COW, VM_WIPEONFORK, U64,
    MADV_DONTDUMP, MADV_DODUMP, MADV_MERGEABLE, MADV_UNMERGEABLE, MADV_REMOVE, MADV_POPULATE_READ,
    MADV_POPULATE_WRITE, MADV_DONTNEED_LOCKED, MADV_GUARD_INSTALL, MADV_GUARD_REMOVE, VM_DONTDUMP,
    VM_MAYBE_GUARD, VM_MERGEABLE, VM_WRITE,
)
from .errors import KernelError, einval
from .folio import PG_DIRTY, PG_HUGE_ZERO, PG_REFERENCED, PG_SWAPBACKED, PG_SWAPCACHE
from .mm import MM, PMD_LEAF, PMD_TABLE, PTE_NONE, VMA, _PAGE_ACCESSED, _PAGE_DIRTY, _PAGE_SOFT_DIRTY, _PAGE_SPECIAL, swp_offset
from . import huge_memory as hm
from . import memory, pgtable
from .khugepaged import khugepaged_enter_vma, madvise_collapse
from .mmap import merge_vmas, split_range
from .swap import folio_deactivate
from .swapfile import free_swap_and_cache

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
    MADV_DONTDUMP: (VM_DONTDUMP, 0),
    MADV_DODUMP: (0, VM_DONTDUMP),
    # Simplification: KSM never merges in thpcow; the advice only sets the flag.
    MADV_MERGEABLE: (VM_MERGEABLE, 0),
    MADV_UNMERGEABLE: (0, VM_MERGEABLE),
}
_NOOP_ADVICE = (MADV_NORMAL, MADV_RANDOM, MADV_SEQUENTIAL, MADV_WILLNEED)
_LATER_ADVICE: tuple[int, ...] = ()
_GUARD_ADVICE = (MADV_GUARD_INSTALL, MADV_GUARD_REMOVE)
_ZAP_ADVICE = (MADV_DONTNEED, MADV_DONTNEED_LOCKED)


def advice_modelled(advice: int) -> bool:
    """Does the simulator carry out this (valid) advice?  False for the few it does not model yet."""
    return advice not in _LATER_ADVICE


def madvise_behavior_valid(k: Kernel, advice: int) -> bool:
    """Model of madvise_behavior_valid() of 6.18 as configured here; the THP-setup range only with the series.

    6.18 accepts 0-4, 8-25 (MERGEABLE/UNMERGEABLE: CONFIG_KSM=y; HUGEPAGE,
    NOHUGEPAGE, COLLAPSE: CONFIG_TRANSPARENT_HUGEPAGE=y), 102 and 103 (the
    guard advice); MADV_HWPOISON (100) and MADV_SOFT_OFFLINE (101) need
    CONFIG_MEMORY_FAILURE, which the machine's 6.18 lacks.  The series' patch
    1 adds MADV_THP_SETUP_BASE <= advice < MADV_THP_SETUP_END (256 and
    MADV_THP_COW = 257) under CONFIG_TRANSPARENT_HUGEPAGE.  Anything else is
    EINVAL.
    """
    if MADV_THP_SETUP_BASE <= advice < MADV_THP_SETUP_END:   # series thp_cow v1 1/5
        return k.series_thp_cow
    return advice in _FLAG_ADVICE or advice in _NOOP_ADVICE or advice in _GUARD_ADVICE or \
        advice in _ZAP_ADVICE or advice in (MADV_FREE, MADV_COLLAPSE, MADV_COLD, MADV_PAGEOUT, MADV_REMOVE, MADV_POPULATE_READ,
                                            MADV_POPULATE_WRITE)


def int_arg(value: int) -> int:
    """A syscall argument declared ``int``: the low 32 bits of the register, signed."""
    return ((int(value) + (1 << 31)) & 0xFFFF_FFFF) - (1 << 31)


def do_madvise(k: Kernel, mm: MM, start: int, length: int, advice: int) -> None:
    """Model of do_madvise().

    ``advice`` is the syscall's ``int``: only its low 32 bits count.  EINVAL
    for an unknown advice, an unaligned start, a negative length; ENOMEM when
    part of the range is not mapped: as in the kernel, the advice is still
    applied to the mapped parts before ENOMEM is returned.  MADV_COLLAPSE
    walks the VMAs as madvise_walk_vmas() does: a VMA's own error ends the
    walk and wins over the ENOMEM of a hole.
    """
    call = "madvise"
    advice = int_arg(advice)
    if not madvise_behavior_valid(k, advice):
        raise einval(call, f"advice={advice}: unknown advice")
    if not PAGE_ALIGNED(start):
        raise einval(call, f"addr={start:#x}: not page aligned")
    if length < 0:
        raise einval(call, f"length={length}: negative")
    aligned = PAGE_ALIGN(length) & U64
    if length and not aligned:
        raise einval(call, f"length={length:#x}: rounds up to zero")
    end = start + aligned
    if end > U64:
        raise einval(call, f"addr={start:#x} length={length:#x}: the range wraps")
    if end == start:
        return
    if not advice_modelled(advice):
        raise NotImplementedError(f"madvise advice {advice} is not modelled yet")
    vmas = mm.vmas_in(start, end)
    mapped = sum(min(v.end, end) - max(v.start, start) for v in vmas)
    if advice in _NOOP_ADVICE:
        pass
    elif MADV_THP_SETUP_BASE <= advice < MADV_THP_SETUP_END:
        madvise_thp_setup(k, mm, start, end, advice)
    elif advice in _FLAG_ADVICE:                    # (WIPEONFORK/KEEPONFORK: private anonymous, allowed)
        set_bits, clear_bits = _FLAG_ADVICE[advice]
        madvise_update_vma(k, mm, start, end, set_bits, clear_bits)
        if advice == MADV_HUGEPAGE:
            for v in mm.vmas_in(start, end):
                khugepaged_enter_vma(k, mm, v)
    elif advice in _ZAP_ADVICE:
        for v in vmas:
            if v.flags & VM_LOCKED and advice == MADV_DONTNEED:
                raise einval(call, f"addr={v.start:#x}: MADV_DONTNEED on a VM_LOCKED mapping")
        for v in vmas:
            lo, hi = max(v.start, start), min(v.end, end)
            memory.zap_range(k, mm, v, lo, hi, drop_markers=False)
            reclaim_empty_pte_tables(k, mm, lo, hi)
    elif advice in (MADV_COLD, MADV_PAGEOUT):
        for v in vmas:
            if v.flags & VM_LOCKED:
                continue
            madvise_cold_or_pageout(k, mm, v, max(v.start, start), min(v.end, end), advice == MADV_PAGEOUT)
    elif advice == MADV_REMOVE:
        raise einval(call, "MADV_REMOVE needs a shared file mapping")
    elif advice in (MADV_POPULATE_READ, MADV_POPULATE_WRITE):
        if mapped != end - start:
            raise KernelError(E.ENOMEM, call, f"addr={start:#x}: part of the range is not mapped")
        write = advice == MADV_POPULATE_WRITE
        for v in vmas:
            if write and not v.flags & VM_WRITE:
                raise KernelError(E.EFAULT, call, f"addr={v.start:#x}: MADV_POPULATE_WRITE on a read-only mapping")
        k.populate(mm, start, end - start, write=write)
    elif advice == MADV_FREE:
        for v in vmas:
            madvise_free_single_vma(k, mm, v, max(v.start, start), min(v.end, end))
    elif advice == MADV_COLLAPSE:
        madvise_walk_vmas(k, mm, start, end, lambda vma, lo, hi: madvise_collapse(k, mm, vma, lo, hi))
        return
    elif advice == MADV_GUARD_INSTALL:
        madvise_walk_vmas(k, mm, start, end, lambda vma, lo, hi: madvise_guard_install(k, mm, vma, lo, hi))
        return
    elif advice == MADV_GUARD_REMOVE:
        madvise_walk_vmas(k, mm, start, end, lambda vma, lo, hi: madvise_guard_remove(k, mm, vma, lo, hi))
        return
    if mapped != end - start:
        raise KernelError(E.ENOMEM, call, f"addr={start:#x} length={end - start:#x}: part of the range is not mapped")


def madvise_walk_vmas(k: Kernel, mm: MM, start: int, end: int, behavior) -> None:
    """Model of madvise_walk_vmas(): apply ``behavior(vma, lo, hi)`` to each VMA's part of [start, end).

    The VMAs are visited in address order, each with the range clipped to
    it.  A VMA's error (a KernelError from ``behavior``) ends the walk at
    once and is the call's result: the VMAs after it are left alone.  A hole
    in the range (before, between or after the VMAs) does not stop the walk;
    the call then fails with ENOMEM, but only if no VMA failed.
    """
    call = "madvise"
    unmapped = False
    vma = next((v for v in mm.vmas if v.end > start), None)      # find_vma()
    while True:
        if vma is None:
            raise KernelError(E.ENOMEM, call, f"addr={start:#x}: no mapping from here to the end of the range")
        if start < vma.start:                                     # a gap: carry on, ENOMEM at the end
            unmapped = True
            start = vma.start
            if start >= end:
                break
        hi = min(vma.end, end)
        behavior(vma, start, hi)
        if hi >= end:
            break
        vma = next((v for v in mm.vmas if v.end > hi), None)
        start = hi
    if unmapped:
        raise KernelError(E.ENOMEM, call, "part of the range is not mapped")


def is_valid_guard_vma(vma: VMA, allow_locked: bool) -> bool:
    """Model of is_valid_guard_vma(): no VM_SPECIAL/VM_HUGETLB VMA (none here), and no VM_LOCKED
    one for an install (zapping locked pages is not allowed)."""
    return allow_locked or not vma.flags & VM_LOCKED


def madvise_guard_install(k: Kernel, mm: MM, vma: VMA, start: int, end: int) -> None:
    """Model of madvise_guard_install() for [start, end) inside ``vma`` (madvise_walk_vmas()).

    EINVAL for a VM_LOCKED VMA.  The VMA is marked VM_MAYBE_GUARD as a whole
    (an atomic flag: no split, "gu" in smaps) and gets an anon_vma
    (anon_vma_prepare(), so that fork copies its page tables).  Whatever is
    mapped in the range is zapped first (zap_vma_range(): a PMD leaf only
    partly in the range is split, one wholly in it zapped; existing guard
    markers stay), then every entry of the range becomes a guard marker,
    page tables allocated where needed.
    """
    if not is_valid_guard_vma(vma, allow_locked=False):
        raise einval("madvise(MADV_GUARD_INSTALL)", f"addr={vma.start:#x}: a VM_LOCKED mapping")
    vma.flags |= VM_MAYBE_GUARD
    memory.anon_vma_prepare(k, vma, mm)
    pt = mm.pt
    populated = False
    for s, base, lo, hi in pt.spans_in(start, end):
        kind = pt.pmd_kind[s]
        if kind == PMD_LEAF:
            populated = True
        elif kind == PMD_TABLE:
            row, a, b = int(pt.pmd_row[s]), PHYS_PFN(lo - base), PHYS_PFN(hi - base)
            if not pgtable.pte_guard_mask(pt.pte_pfn[row, a:b], pt.pte_flags[row, a:b]).all():
                populated = True
    if populated:
        memory.zap_range(k, mm, vma, start, end, drop_markers=False)
    a = start
    while a < end:
        nxt = pgtable.pmd_addr_end(a, end)
        s = pt.slot(pgtable.pmd_index(a))
        row = memory.pte_alloc(k, mm, s)
        i, j = pgtable.pte_index(a), pgtable.pte_index(nxt - 1) + 1
        cur_pfn, cur_flags = pt.pte_pfn[row, i:j], pt.pte_flags[row, i:j]
        new = np.flatnonzero(~pgtable.pte_guard_mask(cur_pfn, cur_flags))
        if len(new):
            pgtable.set_ptes_scatter(k, mm, row, i + new, PTE_NONE, pgtable.PTE_MARKER_GUARD)
        a = nxt


def madvise_guard_remove(k: Kernel, mm: MM, vma: VMA, start: int, end: int) -> None:
    """Model of madvise_guard_remove(): clear the guard markers of [start, end) inside ``vma``
    (a VM_LOCKED VMA is allowed; PMD leaves hold none; VM_MAYBE_GUARD stays)."""
    pt = mm.pt
    for s, base, lo, hi in pt.spans_in(start, end):
        if pt.pmd_kind[s] != PMD_TABLE:
            continue
        row, a, b = int(pt.pmd_row[s]), PHYS_PFN(lo - base), PHYS_PFN(hi - base)
        marks = np.flatnonzero(pgtable.pte_guard_mask(pt.pte_pfn[row, a:b], pt.pte_flags[row, a:b]))
        for i in (a + marks).tolist():
            pgtable.pte_clear(k, mm, row, i)


def madvise_thp_setup(k: Kernel, mm: MM, start: int, end: int, advice: int) -> None:
    """The THP-setup branch of madvise_vma_behavior() (series thp_cow v1 1/5).

    Each bit of ``advice - MADV_THP_SETUP_BASE`` names a per-VMA THP switch;
    the only one is MADV_THP_COW's, which sets VM_THP_COW (the series tests
    the bit by ANDing with MADV_THP_COW itself, which works for that one
    value).  MADV_THP_SETUP_BASE alone sets nothing.  There is no advice that
    clears the flag.
    """
    set_bits = VM_THP_COW if (advice - MADV_THP_SETUP_BASE) & MADV_THP_COW else 0
    if set_bits:
        madvise_update_vma(k, mm, start, end, set_bits, 0)


def reclaim_empty_pte_tables(k: Kernel, mm: MM, start: int, end: int) -> None:
    """Model of CONFIG_PT_RECLAIM (try_to_free_pte()): MADV_DONTNEED frees PTE tables it emptied.

    Only tables whose whole 2 MiB lies inside the zapped range are candidates, and only
    when every entry is none (a guard marker the zap kept is not).
    """
    pt = mm.pt
    for s in pt.slots_in(start, end):
        base = int(pt.pmd_index[s]) * HPAGE_PMD_SIZE
        if base < start or base + HPAGE_PMD_SIZE > end or pt.pmd_kind[s] != PMD_TABLE:
            continue
        row = int(pt.pmd_row[s])
        if pgtable.pte_none_mask(pt.pte_pfn[row], pt.pte_flags[row]).all():
            memory.pte_free(k, mm, s)


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


def madvise_folio_pte_batch(k: Kernel, pt, row: int, i: int, end: int, pfn: int) -> int:
    """Model of madvise_folio_pte_batch(): how many PTEs from index ``i`` of this table map the
    following pages of the folio of ``pfn``.

    The batch stays in this one table and below ``end`` (an index), ends at
    the folio's last page, and needs each PTE to map the next page with the
    same bits, young, dirty and soft-dirty aside (folio_pte_batch_flags()).
    """
    f = k.folios
    fid = int(k.mem.folio[pfn])
    last = int(f.head[fid]) + (1 << int(f.order[fid]))
    n = min(end - i, last - pfn)
    got = pt.pte_pfn[row, i: i + n]
    bits = pt.pte_flags[row, i: i + n] & ~np.uint8(_PAGE_DIRTY | _PAGE_ACCESSED | _PAGE_SOFT_DIRTY)
    ok = (got == pfn + np.arange(n)) & (bits == bits[0])
    return n if ok.all() else int(np.argmin(ok))


def _mark_lazyfree(f, fid: int) -> None:
    """Model of folio_mark_lazyfree(): the folio loses PG_swapbacked; lru_lazyfree() also
    clears PG_referenced of a folio that was swap-backed until now."""
    if f.flags[fid] & PG_SWAPBACKED:
        f.flags[fid] &= np.uint16(~PG_REFERENCED & 0xFFFF)
    f.flags[fid] &= np.uint16(~PG_SWAPBACKED & 0xFFFF)


def madvise_free_single_vma(k: Kernel, mm: MM, vma: VMA, start: int, end: int) -> None:
    """Model of madvise_free_single_vma()/madvise_free_pte_range(): mark pages lazily freeable.

    PMD level (madvise_free_huge_pmd()): a THP that may be mapped shared is
    skipped; one only partly in the range is split (split_folio()) and handled
    at PTE level; a whole one is marked clean and lazyfree, its PMD clean and old.
    PTE level: a large folio that one batch of this table's PTEs does not map
    whole (madvise_folio_pte_batch(): only partly in the range, or spanning
    two page tables after an mremap()) is split when it is not shared
    (skipped otherwise); a folio in the swap cache is skipped (other
    swap entries still use its slot, so folio_free_swap() fails); a dirty one
    that may be mapped shared is skipped, an exclusive one is cleaned; then the
    folio is marked lazyfree (PG_swapbacked cleared) and the PTEs made clean and old.
    """
    pt = mm.pt
    f = k.folios
    for s, base, lo, hi in pt.spans_in(start, end):
        if pt.pmd_kind[s] == PMD_LEAF:
            fid = int(pt.pmd_folio[s])
            if f.flags[fid] & PG_HUGE_ZERO or f.maybe_mapped_shared(fid, 0):
                continue
            if lo == base and hi == base + HPAGE_PMD_SIZE:
                _mark_lazyfree(f, fid)
                f.flags[fid] &= np.uint16(~PG_DIRTY & 0xFFFF)
                pgtable.pmd_update_flags(k, mm, s, clear_bits=_PAGE_DIRTY | _PAGE_ACCESSED)
                continue
            hm.split_folio(k, fid)
        if pt.pmd_kind[s] != PMD_TABLE:
            continue
        row = int(pt.pmd_row[s])
        i, end = PHYS_PFN(lo - base), PHYS_PFN(hi - base)
        batch_end = i                             # PTEs up to here map a folio whole in one batch
        while i < end:
            pfn = int(pt.pte_pfn[row, i])
            if pfn <= -2:                         # a swap entry: free_swap_and_cache(), clear it
                free_swap_and_cache(k, swp_offset(pfn))
                pgtable.pte_clear(k, mm, row, i)
                mm.rss_swap -= 1
                i += 1
                continue
            if pfn < 0 or pt.pte_flags[row, i] & _PAGE_SPECIAL:
                i += 1
                continue
            fid = int(k.mem.folio[pfn])
            shared = f.maybe_mapped_shared(fid, int(k.mem.mapcount[pfn]))
            if f.order[fid] and i >= batch_end:
                nr = madvise_folio_pte_batch(k, pt, row, i, end, pfn)
                if nr < 1 << int(f.order[fid]):
                    if shared or hm.split_folio(k, fid) != 0:
                        i += nr
                        continue
                    continue                      # split: look at this PTE again
                batch_end = i + nr
            if f.flags[fid] & PG_SWAPCACHE:
                i += 1
                continue                          # folio_free_swap() fails: other entries use the slot
            if f.flags[fid] & PG_DIRTY:
                if shared:
                    i += 1
                    continue
                f.flags[fid] &= np.uint16(~PG_DIRTY & 0xFFFF)
            _mark_lazyfree(f, fid)
            pgtable.pte_update_flags(k, mm, row, i, clear_bits=_PAGE_DIRTY | _PAGE_ACCESSED)
            i += 1


def madvise_cold_or_pageout(k: Kernel, mm: MM, vma: VMA, start: int, end: int, pageout: bool) -> None:
    """Model of madvise_cold_or_pageout_pte_range().

    Folios that may be mapped by other processes are left alone.  A PMD THP
    wholly in the range is taken whole; one only partly in it is split
    (split_folio(), which splits the PMD) and handled page by page; likewise
    a PTE-mapped large folio that one batch of this table's PTEs does not map
    whole (madvise_folio_pte_batch(): partly in the range, or spanning two
    page tables after an mremap()).  Every split maps the zero-filled pages
    to the shared zero page.  Both clear PG_referenced of the folios
    they take.  MADV_COLD also clears the young bits of their PTEs/PMDs and
    moves the folios to the head of the LRU (they are reclaimed first);
    MADV_PAGEOUT leaves the young bits alone and reclaims the folios now
    (reclaim_pages() ignores references), so a folio it cannot reclaim stays
    young.
    """
    from . import vmscan
    pt = mm.pt
    f = k.folios
    picked: list[int] = []
    for s, base, lo, hi in pt.spans_in(start, end):
        if pt.pmd_kind[s] == PMD_LEAF:
            fid = int(pt.pmd_folio[s])
            if f.flags[fid] & PG_HUGE_ZERO or f.maybe_mapped_shared(fid, 0):
                continue
            if lo == base and hi == base + HPAGE_PMD_SIZE:
                if not pageout:
                    pgtable.pmd_update_flags(k, mm, s, clear_bits=_PAGE_ACCESSED)
                picked.append(fid)
                continue
            hm.split_folio(k, fid)                # splits the PMD too; on failure the PMD stays
        if pt.pmd_kind[s] != PMD_TABLE:
            continue
        row = int(pt.pmd_row[s])
        i, b = PHYS_PFN(lo - base), PHYS_PFN(hi - base)
        while i < b:
            pfn = int(pt.pte_pfn[row, i])
            if pfn < 0 or pt.pte_flags[row, i] & _PAGE_SPECIAL:
                i += 1
                continue
            fid = int(k.mem.folio[pfn])
            nr = 1
            if f.order[fid]:
                nr = madvise_folio_pte_batch(k, pt, row, i, b, pfn)
                if nr < 1 << int(f.order[fid]):
                    if f.maybe_mapped_shared(fid, 0) or hm.split_folio(k, fid) != 0:
                        i += nr
                        continue
                    continue                      # split: look at this PTE again
            if f.maybe_mapped_shared(fid, int(k.mem.mapcount[pfn])):
                i += nr
                continue
            if not pageout:
                pgtable.pte_update_flags(k, mm, row, np.arange(i, i + nr), clear_bits=_PAGE_ACCESSED)
            picked.append(fid)
            i += nr
    picked = list(dict.fromkeys(picked))
    if picked:
        f.flags[np.array(picked, dtype=np.int64)] &= np.uint16(~PG_REFERENCED & 0xFFFF)   # folio_clear_referenced()
    if pageout:
        vmscan.reclaim_pages(k, picked)
        return
    for fid in reversed(picked):                  # deactivate: to the head of the LRU
        folio_deactivate(k, fid)
