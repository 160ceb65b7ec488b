"""Model of mm/vmscan.c (reclaim of anonymous memory), mm/page_io.c and do_swap_page().

Reclaim keeps one LRU of anonymous folios (a stamp per folio, oldest first) with
second-chance ageing, like the kernel's inactive list: a folio whose mappings
were accessed since the last look (young PTE/PMD) has the bits cleared and
goes to the tail; an old one is reclaimed.  (This is the classic two-list
LRU reduced to one list with a referenced test, not MGLRU.)

Reclaiming a folio (``shrink_folio``):
- a clean lazyfree folio (MADV_FREE, no dirty mapping) is discarded;
- a partially mapped large folio is split first;
- otherwise it is added to the swap cache (``add_to_swap``): a PMD-order folio
  needs a whole swap cluster, else it is split (thp_swpout_fallback);
- every mapping is replaced by a swap entry (``try_to_unmap``; PMD mappings
  are split first, thp_split_pmd each), the folio is written (pswpout,
  thp_swpout / swpout) and freed;
- a folio still in the swap cache from a swap-in is unmapped to its slot and
  freed without a write.

Swap-in (``do_swap_page``) reads the device at 4 KiB (pgmajfault, pswpin);
a folio read from a slot that other swap entries share stays in the swap
cache, where their faults find it.  Simplification: writeback is synchronous
and a reclaimed folio leaves the swap cache as soon as the write is done;
there is no readahead and no mTHP swap-in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .constants import HPAGE_PMD_NR, HPAGE_PMD_ORDER, PAGE_SHIFT, VM_WRITE
from .errors import OutOfMemory
from .folio import PG_ANON, PG_DIRTY, PG_HUGE_ZERO, PG_PARTIALLY_MAPPED, PG_SWAPBACKED, PG_SWAPCACHE
from .mm import (
    MM, PMD_LEAF, PMD_TABLE, VMA, _PAGE_ACCESSED, _PAGE_DIRTY, _PAGE_PRESENT, _PAGE_RW, _PAGE_SPECIAL,
    _PAGE_SWP_EXCLUSIVE, PTE_ZERO, swp_entry, swp_offset, pte_index,
)
from .page_alloc import PG_ANON_EXCLUSIVE
from . import huge_memory as hm
from . import pgtable, rmap

if TYPE_CHECKING:
    from .kernel import Kernel


# -- rmap walk ---------------------------------------------------------------------------------------------
def folio_mappings(k: Kernel, fid: int):
    """Every mapping of a folio: ('pmd', mm, slot) and ('pte', mm, row, col, pfn) tuples.

    Model of rmap_walk_anon(): each page is looked up at the virtual page it
    was mapped at (``PhysMem.vpn``, the anon page index) in every mm; the hits
    are verified, and if they do not account for every mapping (an mremap()
    in one of the mms moved it) the page tables are searched instead.
    """
    f = k.folios
    mem = k.mem
    head = int(f.head[fid])
    nr = 1 << int(f.order[fid])
    expected = int(mem.mapcount[head: head + nr].sum()) + int(f.entire[fid])
    vpns = mem.vpn[head: head + nr]
    out = []
    if (vpns >= 0).all():
        pfns = np.arange(head, head + nr)
        for p in k.procs.values():
            pt = p.mm.pt
            if not pt.nr_slots:
                continue
            sc, kind = pt.pmd_entries(vpns)
            if f.entire[fid]:
                for s in np.unique(sc[(kind == PMD_LEAF) & (pt.pmd_folio[sc] == fid)]).tolist():
                    out.append(("pmd", p.mm, int(s)))
            tab = kind == PMD_TABLE
            if tab.any():
                rows = pt.pmd_row[sc[tab]]
                cols = vpns[tab] & 511
                hit = pt.pte_pfn[rows, cols] == pfns[tab]
                hit &= ~(pt.pte_flags[rows, cols] & _PAGE_SPECIAL).astype(bool)
                for r, c, q in zip(rows[hit].tolist(), cols[hit].tolist(), pfns[tab][hit].tolist()):
                    out.append(("pte", p.mm, r, c, q))
        if len(out) == expected:
            return out
    return _folio_mappings_slow(k, fid)


def _folio_mappings_slow(k: Kernel, fid: int):
    """The brute-force walk of every page table (fallback of folio_mappings())."""
    f = k.folios
    head = int(f.head[fid])
    nr = 1 << int(f.order[fid])
    out = []
    for p in k.procs.values():
        pt = p.mm.pt
        n = pt.nr_slots
        if f.entire[fid]:
            for s in np.flatnonzero((pt.pmd_kind[:n] == PMD_LEAF) & (pt.pmd_folio[:n] == fid)).tolist():
                out.append(("pmd", p.mm, s))
        if pt.nr_rows:
            rows = pt.pte_pfn[: pt.nr_rows]
            hit = np.argwhere((rows >= head) & (rows < head + nr))
            for r, c in hit.tolist():
                if not pt.pte_flags[r, c] & _PAGE_SPECIAL:
                    out.append(("pte", p.mm, r, c, int(rows[r, c])))
    return out


def folio_referenced(k: Kernel, fid: int) -> bool:
    """Model of folio_referenced(): were any mappings young?  Clears the young bits."""
    young = False
    for m in folio_mappings(k, fid):
        if m[0] == "pmd":
            young |= pgtable.pmdp_test_and_clear_young(k, m[1], m[2])
        else:
            young |= pgtable.ptep_test_and_clear_young(k, m[1], m[2], m[3])
    return young


# -- pageout ------------------------------------------------------------------------------------------------
def try_to_unmap_to_swap(k: Kernel, fid: int, slot: int) -> None:
    """Model of try_to_unmap(TTU_SPLIT_HUGE_PMD) for a folio in the swap cache.

    PMD mappings are split first; then each PTE becomes a swap entry for its
    page's slot, exclusive when the page was AnonExclusive.
    """
    f = k.folios
    head = int(f.head[fid])
    if f.entire[fid]:
        for mm, vma, s in k.rmap_walk_pmd(fid):
            hm.split_huge_pmd(k, mm, vma, s)
    for m in folio_mappings(k, fid):
        _, mm, r, c, pfn = m
        pt = mm.pt
        i = pfn - head
        flags = pt.pte_flags[r, c]
        if flags & _PAGE_DIRTY:
            f.flags[fid] |= PG_DIRTY
        exclusive = bool(k.mem.pflags[pfn] & PG_ANON_EXCLUSIVE)
        k.flush_tlb_pages(mm, [k.mem.vpn[pfn]])
        pgtable.set_pte_at(k, mm, r, c, swp_entry(slot + i), _PAGE_SWP_EXCLUSIVE if exclusive else 0)
        k.swap.swap_map[slot + i] += 1
        rmap.folio_remove_rmap_ptes(k, fid, pfn, 1, mm)
        rmap.folio_put(k, fid)
        mm.rss_anon -= 1
        mm.rss_swap += 1
        k.mem.pflags[pfn] &= np.uint8(~PG_ANON_EXCLUSIVE & 0xFF)


def discard_lazyfree(k: Kernel, fid: int) -> bool:
    """A clean MADV_FREE folio is dropped instead of swapped; a redirtied one is kept."""
    maps = folio_mappings(k, fid)
    for m in maps:
        pt = m[1].pt
        dirty = pt.pmd_flags[m[2]] & _PAGE_DIRTY if m[0] == "pmd" else pt.pte_flags[m[2], m[3]] & _PAGE_DIRTY
        if dirty:
            k.folios.flags[fid] |= PG_SWAPBACKED          # folio_set_swapbacked(): keep it
            return False
    for m in maps:
        mm = m[1]
        if m[0] == "pmd":
            hm.zap_huge_pmd(k, mm, m[2])
        else:
            from .memory import zap_pte_range
            zap_pte_range(k, mm, m[2], m[3], m[3] + 1)
    k.vmstat.count_vm_event("pglazyfreed", 1 << int(k.folios.order[fid]))
    k.vmstat.count_vm_event("pgsteal_file", 1 << int(k.folios.order[fid]))   # lazyfree folios sit on the file LRU
    return True


def shrink_folio(k: Kernel, fid: int) -> int:
    """Model of shrink_folio_list() for one anon folio: returns pages freed (0 if kept)."""
    f = k.folios
    if not f.used[fid] or f.flags[fid] & PG_HUGE_ZERO or not f.flags[fid] & PG_ANON:
        return 0
    order = int(f.order[fid])
    nr = 1 << order
    if not f.flags[fid] & PG_SWAPBACKED:
        return nr if discard_lazyfree(k, fid) else 0
    if k.swap is None:
        return 0
    if f.flags[fid] & PG_SWAPCACHE:
        # Swapped in and still in the swap cache: its slot holds its contents (it is never
        # written while cached: it is mapped read-only), so it is unmapped and freed without
        # a write (pageout() skips a clean folio).
        slot = int(f.swap[fid])
        try_to_unmap_to_swap(k, fid, slot)
        if f.flags[fid] & PG_DIRTY:
            head = int(f.head[fid])
            k.swap.content[slot: slot + nr] = k.mem.content[head: head + nr]
            k.vmstat.count_vm_event("pswpout", nr)
        delete_from_swap_cache(k, fid)
        return nr
    if order and f.flags[fid] & PG_PARTIALLY_MAPPED:
        head = int(f.head[fid])
        if hm.split_folio(k, fid) != 0:
            return 0
        return _shrink_pieces(k, head, nr)
    slot = k.swap.alloc_slots(nr)
    if order and slot < 0:
        head = int(f.head[fid])
        if hm.split_folio(k, fid) != 0:
            return 0
        if order >= HPAGE_PMD_ORDER:
            k.vmstat.count_vm_event("thp_swpout_fallback")
        k.vmstat.count_mthp_stat(order, "swpout_fallback")
        return _shrink_pieces(k, head, nr)
    if slot < 0:
        return 0                                          # swap full: keep it
    # add_to_swap(): into the swap cache, which holds nr references
    head = int(f.head[fid])
    add_to_swap_cache(k, fid, slot)
    try_to_unmap_to_swap(k, fid, slot)
    # pageout(): write the folio
    k.swap.content[slot: slot + nr] = k.mem.content[head: head + nr]
    k.vmstat.count_vm_event("pswpout", nr)
    if order >= HPAGE_PMD_ORDER:
        k.vmstat.count_vm_event("thp_swpout")
    k.vmstat.count_mthp_stat(order, "swpout")
    # __remove_mapping(): leave the swap cache and free the folio
    delete_from_swap_cache(k, fid)
    return nr


def _shrink_pieces(k: Kernel, head: int, nr: int) -> int:
    """shrink_folio() of every folio a split left in frames [head, head + nr): pages freed."""
    return sum(shrink_folio(k, int(k.mem.folio[p])) for p in range(head, head + nr) if k.mem.folio[p] >= 0)


def add_to_swap_cache(k: Kernel, fid: int, slot: int) -> None:
    """Model of add_to_swap_cache(): the folio holds slots [slot, slot + nr), one reference each."""
    f = k.folios
    nr = 1 << int(f.order[fid])
    f.flags[fid] |= PG_SWAPCACHE
    f.swap[fid] = slot
    f.refcount[fid] += nr
    k.swap.in_cache[slot: slot + nr] = True
    k.swap.used[slot: slot + nr] = True
    k.swap.cache[slot: slot + nr] = fid


def delete_from_swap_cache(k: Kernel, fid: int) -> None:
    """Model of delete_from_swap_cache(): drop the cache's references and slot hold."""
    f = k.folios
    slot = int(f.swap[fid])
    nr = 1 << int(f.order[fid])
    f.flags[fid] &= np.uint16(~PG_SWAPCACHE & 0xFFFF)
    f.swap[fid] = -1
    for s in range(slot, slot + nr):
        k.swap.in_cache[s] = False
        k.swap.cache[s] = -1
        if k.swap.swap_map[s] <= 0:
            k.swap.free_slot(s)
    rmap.folio_put(k, fid, nr)


def free_swap_and_cache(k: Kernel, slot: int) -> None:
    """Model of swap_free() / free_swap_and_cache(): one swap entry of ``slot`` is gone.

    When it was the last one, a folio still in the swap cache for that slot
    leaves it (and is freed if nothing maps it).  A mapped one is then the only
    copy of its data, so it is marked dirty, as folio_free_swap() does (a clean
    one could be dropped: MADV_FREE then reclaim).  Simplification: the kernel
    keeps a mapped folio cached until reclaim or a write frees the swap
    (should_try_to_free_swap()); here it leaves at once, with the same
    result for reuse on a later write.
    """
    sw = k.swap
    sw.swap_map[slot] -= 1
    if sw.swap_map[slot] > 0:
        return
    fid = int(sw.cache[slot])
    if fid >= 0:
        if k.mem.mapcount[int(k.folios.head[fid])] > 0:
            k.folios.flags[fid] |= PG_DIRTY
        delete_from_swap_cache(k, fid)
    elif not sw.in_cache[slot]:
        sw.free_slot(slot)


def reclaim_pages(k: Kernel, fids) -> int:
    """Model of reclaim_pages() (MADV_PAGEOUT): reclaim these folios now; returns pages freed."""
    freed = 0
    for fid in dict.fromkeys(int(x) for x in fids):
        if k.folios.used[fid]:
            freed += shrink_folio(k, fid)
    return freed


def small_mappings(k: Kernel, pfns: np.ndarray):
    """Optimization: the PTE mappings of many order-0 pages, found at their page index.

    Returns a list of (mm, page positions, rows, cols) per mm, and whether every
    mapping was found (their count equals the pages' mapcounts).
    """
    mem = k.mem
    vpns = mem.vpn[pfns]
    out = []
    found = np.zeros(len(pfns), dtype=np.int64)
    for p in k.procs.values():
        pt = p.mm.pt
        if not pt.nr_slots:
            continue
        sc, kind = pt.pmd_entries(vpns)
        tab = kind == PMD_TABLE
        rows = np.where(tab, pt.pmd_row[sc], 0)
        cols = vpns & 511
        hit = tab & (pt.pte_pfn[rows, cols] == pfns)
        if hit.any():
            idx = np.flatnonzero(hit)
            out.append((p.mm, idx, rows[idx], cols[idx]))
            found[idx] += 1
    return out, bool((found == mem.mapcount[pfns]).all())


def shrink_small_batch(k: Kernel, fids: np.ndarray) -> np.ndarray:
    """Optimization: second chance and swap-out for many order-0 anon folios at once.

    Same decisions as folio_referenced() + shrink_folio() one by one: young
    folios get their bits cleared and are returned to be kept; the others are
    written to swap, their PTEs become swap entries, and they are freed.
    Returns the folios kept (young, or no swap slot left).
    """
    f = k.folios
    mem = k.mem
    pfns = f.head[fids]
    maps, complete = small_mappings(k, pfns)
    if not complete:
        keep = []
        for fid in fids.tolist():
            if folio_referenced(k, fid) or not shrink_folio(k, fid):
                if f.used[fid]:
                    keep.append(fid)
        return np.array(keep, dtype=np.int64)
    young = np.zeros(len(fids), dtype=bool)
    for mm, idx, rows, cols in maps:
        y = (mm.pt.pte_flags[rows, cols] & _PAGE_ACCESSED).astype(bool)
        young[idx[y]] = True
        pgtable.pte_update_flags(k, mm, rows[y], cols[y], clear_bits=_PAGE_ACCESSED)
    old = np.flatnonzero(~young)
    slots = k.swap.alloc_many(len(old))
    old = old[: len(slots)]
    if not len(old):
        return fids
    slot_of = np.full(len(fids), -1, dtype=np.int64)
    slot_of[old] = slots
    go = np.zeros(len(fids), dtype=bool)
    go[old] = True
    for mm, idx, rows, cols in maps:
        sel = go[idx]
        if not sel.any():
            continue
        i, r, c = idx[sel], rows[sel], cols[sel]
        pt = mm.pt
        dirty = (pt.pte_flags[r, c] & _PAGE_DIRTY).astype(bool)
        f.flags[fids[i[dirty]]] |= PG_DIRTY
        excl = (mem.pflags[pfns[i]] & PG_ANON_EXCLUSIVE).astype(bool)
        k.flush_tlb_pages(mm, mem.vpn[pfns[i]])
        pgtable.set_ptes_scatter(k, mm, r, c, swp_entry(slot_of[i]), np.where(excl, _PAGE_SWP_EXCLUSIVE, 0).astype(np.uint8))
        np.add.at(k.swap.swap_map, slot_of[i], 1)
        mm.rss_anon -= len(i)
        mm.rss_swap += len(i)
    gone = fids[old]
    gp = pfns[old]
    k.swap.content[slots] = mem.content[gp]
    mem.mapcount[gp] = 0
    f.refcount[gone] = 0
    k.vmstat.mod_node_page_state("nr_anon_pages", -len(gone))
    k.vmstat.count_vm_event("pswpout", len(gone))
    rmap.free_small_folios(k, gone)
    return fids[~go]


def shrink_lru(k: Kernel, nr_to_reclaim: int) -> int:
    """Model of shrink_lruvec() for anon: second chance from the oldest folio on.

    Optimization: order-0 folios are taken in chunks (shrink_small_batch());
    large folios one at a time.
    """
    freed = 0
    scanned = 0
    f = k.folios
    if k.swap is None or k.swap.nr_free == 0:
        # Without swap space only clean lazyfree folios can go (get_scan_count()).
        fids = np.flatnonzero(f.lru[: f._next] >= 0)
        lazy = fids[~(f.flags[fids] & PG_SWAPBACKED).astype(bool)]
        lazy = lazy[np.argsort(f.lru[lazy], kind="stable")]
        for fid in lazy.tolist():
            if freed >= nr_to_reclaim:
                break
            freed += shrink_folio(k, fid)
        return freed
    limit = 2 * k.lru_len() + 1
    while freed < nr_to_reclaim and scanned < limit:
        chunk = k.lru_oldest(max(32, 2 * (nr_to_reclaim - freed)))
        if not len(chunk):
            break
        scanned += len(chunk)
        chunk = chunk[f.used[chunk]]
        small = (f.order[chunk] == 0) & (f.flags[chunk] & PG_SWAPBACKED).astype(bool) & \
            ~(f.flags[chunk] & PG_SWAPCACHE).astype(bool) & (f.refcount[chunk] == k.mem.mapcount[f.head[chunk]])
        keep = []
        # Partially mapped large folios: an old one is split and its pieces go
        # the way of small folios (shrink_folio() does the same one at a time).
        pm = ~small & (f.order[chunk] >= 2) & (f.flags[chunk] & PG_PARTIALLY_MAPPED).astype(bool) & \
            (f.entire[chunk] == 0) & (f.refcount[chunk] == f.large[chunk]) & \
            (f.flags[chunk] & PG_SWAPBACKED).astype(bool) & ~(f.flags[chunk] & PG_SWAPCACHE).astype(bool)
        pieces = np.empty(0, dtype=np.int64)
        if pm.any():
            old = []
            for fid in chunk[pm].tolist():
                (keep if folio_referenced(k, fid) else old).append(fid)
            if old:
                old = np.array(old, dtype=np.int64)
                sizes = 1 << f.order[old].astype(np.int64)
                heads = f.head[old].copy()
                hm.split_folios_unmapped_pmd(k, old)
                pfns = np.repeat(heads - (np.cumsum(sizes) - sizes), sizes) + np.arange(int(sizes.sum()))
                pieces = k.mem.folio[pfns]
                pieces = pieces[pieces >= 0].astype(np.int64)
                f.lru[pieces] = -1                      # taken off the LRU: handled now
        batch = np.concatenate((chunk[small], pieces))
        if len(batch):
            before = k.mem.nr_free
            kept = shrink_small_batch(k, batch)
            freed += k.mem.nr_free - before
            keep.extend(kept.tolist())
        for fid in chunk[~small & ~pm].tolist():
            if not f.used[fid]:
                continue
            if folio_referenced(k, fid):
                keep.append(fid)                          # second chance: to the tail
                continue
            got = shrink_folio(k, fid)
            if not got and f.used[fid]:
                keep.append(fid)
            freed += got
        keep = np.array(keep, dtype=np.int64)
        keep = keep[f.used[keep] & (f.lru[keep] < 0)] if len(keep) else keep
        if len(keep):
            k.lru_add(keep)
    k.vmstat.count_vm_event("pgscan_anon", scanned)
    k.vmstat.count_vm_event("pgsteal_anon", freed)
    return freed


# -- swap-in ------------------------------------------------------------------------------------------------
def do_swap_page(k: Kernel, mm: MM, vma: VMA, addr: int, row: int, write: bool) -> int:
    """Model of do_swap_page() for a 4 KiB swap-in.

    If another process sharing the slot swapped it in already, its folio is
    still in the swap cache and is mapped again: a minor fault, no read.
    Otherwise the slot is read into a new order-0 folio (pgmajfault, pswpin),
    which enters the swap cache when other swap entries still point at the
    slot, so that they map the same folio.  Then the swap reference is
    dropped (free_swap_and_cache(): after the last one the folio leaves the
    cache).  The page is mapped exclusive, and
    writable in a VM_WRITE mapping even on a read fault, when the swap entry
    was exclusive, or on a write fault when nobody else holds the folio or
    its slot (should_try_to_free_swap() frees the swap first); otherwise it
    is mapped read-only and a write goes on to do_wp_page().
    Simplification: the device is not SWP_SYNCHRONOUS_IO, but a slot nobody
    else references does not keep its folio in the swap cache (the kernel
    keeps it until reclaim or a write).
    """
    from .memory import VM_FAULT_OK, do_wp_page_at
    pt = mm.pt
    f = k.folios
    i = pte_index(addr)
    slot = swp_offset(int(pt.pte_pfn[row, i]))
    exclusive_entry = bool(pt.pte_flags[row, i] & _PAGE_SWP_EXCLUSIVE)
    last = int(k.swap.swap_map[slot]) == 1              # this is the slot's last swap entry
    fid = int(k.swap.cache[slot])
    if fid >= 0:                                        # swap cache hit
        pfn = int(f.head[fid])
        exclusive = exclusive_entry or (write and last and int(k.mem.mapcount[pfn]) == 0)
        f.refcount[fid] += 1
        rmap.folio_add_anon_rmap_ptes(k, fid, pfn, 1, mm, exclusive)
    else:
        pfn = k.alloc_page()
        if pfn < 0:
            raise OutOfMemory(addr)
        fid = k.new_folio(pfn, 0)
        k.mem.content[pfn] = k.swap.content[slot]
        k.vmstat.count_vm_event("pgmajfault")
        k.vmstat.count_vm_event("pswpin")
        exclusive = exclusive_entry or (write and last)
        f.refcount[fid] = 1
        rmap.folio_add_new_anon_rmap(k, fid, mm, pmd=False)
        if not exclusive:
            k.mem.pflags[pfn] &= np.uint8(~PG_ANON_EXCLUSIVE & 0xFF)
        k.lru_add(fid)
        add_to_swap_cache(k, fid, slot)
    free_swap_and_cache(k, slot)          # the last entry takes the folio out of the cache, dirty
    mm.rss_swap -= 1
    mm.rss_anon += 1
    flags = _PAGE_PRESENT | _PAGE_ACCESSED
    if exclusive and vma.flags & VM_WRITE:
        flags |= _PAGE_RW | (_PAGE_DIRTY if write else 0)
    pgtable.set_pte_at(k, mm, row, i, pfn, flags)
    k.mem.vpn[pfn] = addr >> PAGE_SHIFT
    if write and not flags & _PAGE_RW:
        return do_wp_page_at(k, mm, addr, row)
    return VM_FAULT_OK


# -- the deferred split shrinker ----------------------------------------------------------------------------
def thp_underused(k: Kernel, fid: int) -> bool:
    """Model of thp_underused(): more than max_ptes_none zero-filled pages (never at 511)."""
    limit = k.sysfs.max_ptes_none
    if limit == HPAGE_PMD_NR - 1:
        return False
    head = int(k.folios.head[fid])
    zeros = int(np.count_nonzero(k.mem.content[head: head + HPAGE_PMD_NR] == 0))
    return zeros > limit


def shrink_deferred(k: Kernel, nr_to_scan: int | None = None) -> int:
    """Model of deferred_split_scan(): split partially mapped and underused THPs.

    A partially mapped folio is split (its unmapped pages are freed); one that
    is not partially mapped is split when thp_underused() says so, counting
    thp_underused_split_page, and its zero-filled pages are remapped to the
    shared zero page instead of being kept.  Others leave the queue.
    Returns the pages freed.
    """
    f = k.folios
    freed = 0
    queue = list(k.deferred)[: nr_to_scan] if nr_to_scan else list(k.deferred)
    # Optimization: the partially mapped folios that can be split (no PMD
    # mapping, no extra references) are split together.
    q = np.array(queue, dtype=np.int64)
    if len(q):
        ok = f.used[q] & (f.flags[q] & PG_PARTIALLY_MAPPED).astype(bool) & (f.entire[q] == 0) & \
            (f.refcount[q] == f.large[q]) & (f.order[q] >= 2)
        if ok.any():
            before = k.mem.nr_free
            hm.split_folios_unmapped_pmd(k, q[ok])
            freed += k.mem.nr_free - before
    for fid in queue:
        if fid not in k.deferred or not f.used[fid]:
            continue
        before = k.mem.nr_free
        if f.flags[fid] & PG_PARTIALLY_MAPPED:
            if hm.split_folio(k, fid) != 0:
                continue                              # requeued: stays on the list
        elif f.order[fid] >= HPAGE_PMD_ORDER and thp_underused(k, fid):
            head = int(f.head[fid])
            zero_pages = np.flatnonzero(k.mem.content[head: head + HPAGE_PMD_NR] == 0) + head
            if hm.split_folio(k, fid) != 0:
                continue
            k.vmstat.count_vm_event("thp_underused_split_page")
            remap_zero_pages(k, zero_pages)
        else:
            rmap.folio_unqueue_deferred_split(k, fid)
        freed += k.mem.nr_free - before
    return freed


def remap_zero_pages(k: Kernel, pfns: np.ndarray) -> None:
    """After an underused split, map the zero page where the split pages held zeros."""
    from .page_alloc import ZERO_PFN
    for pfn in pfns.tolist():
        fid = int(k.mem.folio[pfn])
        if fid < 0:
            continue
        for m in folio_mappings(k, fid):
            if m[0] != "pte":
                continue
            _, mm, r, c, p = m
            pgtable.set_pte_at(k, mm, r, c, ZERO_PFN, PTE_ZERO)
            rmap.folio_remove_rmap_ptes(k, fid, p, 1, mm)
            mm.rss_anon -= 1
            rmap.folio_put(k, fid)


# -- memory failure ------------------------------------------------------------------------------------------
def memory_failure(k: Kernel, pfn: int) -> None:
    """Model of memory_failure() for an anon page: lose that 4 KiB page only.

    A large folio is split first (so the rest of a THP survives as 4 KiB
    pages); the poisoned page is unmapped everywhere and its entries become
    hwpoison markers: touching them raises SIGBUS.  If the split fails the
    whole folio is unmapped (the processes would be killed).  A folio in the
    swap cache is clean (its slot holds the data): its entries become swap
    entries again.
    """
    from .mm import _PAGE_HWPOISON
    fid = int(k.mem.folio[pfn])
    k.vmstat.count_vm_event("sim_memory_failure")
    if fid < 0:
        k.mem.take_pfn(pfn)
        return
    if k.folios.order[fid]:
        if hm.split_folio(k, fid) != 0:
            k.vmstat.count_vm_event("memory_failure_late_kill")
        fid = int(k.mem.folio[pfn])
        if fid < 0:
            k.mem.take_pfn(pfn)
            return
    if k.folios.flags[fid] & PG_SWAPCACHE:
        # A clean folio in the swap cache: its slot holds the data, so the mappings become swap
        # entries again and a later fault reads the slot (hwpoison_user_mappings() drops
        # TTU_HWPOISON for swap cache folios; me_swapcache_clean() deletes it from the cache).
        try_to_unmap_to_swap(k, fid, int(k.folios.swap[fid]))
    for m in folio_mappings(k, fid):
        if m[0] == "pte":
            _, mm, r, c, p = m
            rmap.folio_remove_rmap_ptes(k, fid, p, 1, mm)
            mm.rss_anon -= 1
            pgtable.set_pte_at(k, mm, r, c, -1, _PAGE_HWPOISON)
            rmap.folio_put(k, fid)
        else:
            mm = m[1]
            hm.zap_huge_pmd(k, mm, m[2])
    if k.folios.used[fid] and k.folios.flags[fid] & PG_SWAPCACHE:
        delete_from_swap_cache(k, fid)
    k.mem.reserved[pfn] = True        # a poisoned frame never returns to the allocator
    if k.mem.free_order[pfn] >= 0 or k.mem.folio[pfn] < 0:
        k.mem.take_pfn(pfn)
