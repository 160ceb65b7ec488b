"""Model of mm/vmscan.c (reclaim of anonymous memory) and mm/page_io.c.

Reclaim keeps one LRU of anonymous folios (a stamp per folio, oldest first) with
second-chance ageing, like the kernel's inactive list: a folio whose mappings
were accessed since the last look (young PTE/PMD) has the bits cleared, is
marked PG_referenced and goes to the tail; an old one is reclaimed, whatever
PG_referenced said (``folio_check_references()``).  (This is the classic
two-list LRU reduced to one list with a referenced test, not MGLRU.)

Reclaiming a folio (``shrink_folio``):
- a clean lazyfree folio (MADV_FREE, no dirty mapping) is discarded;
- a partially mapped large folio is split first;
- otherwise it is added to the swap cache (``add_to_swap``): a PMD-order folio
  needs a whole swap cluster, else (also with no swap device: MADV_PAGEOUT
  still gets here) it is split (thp_swpout_fallback) and the pieces tried;
- every mapping is replaced by a swap entry (``try_to_unmap``; PMD mappings
  are split first, thp_split_pmd each), the folio is written (pswpout,
  thp_swpout / swpout) and freed;
- a folio still in the swap cache from a swap-in is unmapped to its slot and
  freed without a write.

kswapd (``balance_pgdat``) runs this when free memory would fall under the
low watermark, after the one shrinker modelled (``shrink_slab``: the deferred
split queue).  Simplification: writeback is synchronous and a reclaimed folio
leaves the swap cache as soon as the write is done.  Swap-in is
``do_swap_page()`` in :mod:`.memory`; the rmap walks (``folio_referenced()``,
``try_to_unmap()``) are in :mod:`.rmap`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .constants import HPAGE_PMD_ORDER
from .folio import PG_ANON, PG_DIRTY, PG_HUGE_ZERO, PG_PARTIALLY_MAPPED, PG_REFERENCED, PG_SWAPBACKED, PG_SWAPCACHE
from .mm import _PAGE_ACCESSED, _PAGE_DIRTY, _PAGE_SWP_EXCLUSIVE, swp_entry
from .page_alloc import PG_ANON_EXCLUSIVE
from .rmap import folio_mappings, folio_referenced, small_mappings, try_to_unmap_to_swap
from .swap import folio_add_lru
from .swap_state import add_to_swap_cache, delete_from_swap_cache
from . import huge_memory as hm
from . import memory, pgtable, rmap

if TYPE_CHECKING:
    from .kernel import Kernel


# -- the LRU ---------------------------------------------------------------------------------------------------
def isolate_lru_folios(k: Kernel, n: int) -> np.ndarray:
    """Model of isolate_lru_folios(): the ``n`` oldest folios on the LRU, oldest first (taken off it).

    Optimization: the oldest few thousand are sorted once and handed out
    from that buffer (``Lruvec.isolate_buf``) while their stamps still hold
    (folios added later are younger than all of them).
    """
    f = k.folios
    lru = k.lruvec
    out = []
    need = n
    while need:
        buf = lru.isolate_buf
        if buf is None or lru.isolate_pos >= len(buf[0]):
            stamps = f.lru[: f._next]
            on = np.flatnonzero(stamps >= 0)
            if not len(on):
                break
            m = min(len(on), max(4 * n, 262144))
            if len(on) > m:
                on = on[np.argpartition(stamps[on], m - 1)[:m]]
            on = on[np.argsort(stamps[on], kind="stable")]
            lru.isolate_buf = buf = (on, stamps[on].copy())
            lru.isolate_pos = 0
        ids, st = buf
        take = ids[lru.isolate_pos: lru.isolate_pos + need]
        valid = f.lru[take] == st[lru.isolate_pos: lru.isolate_pos + need]
        lru.isolate_pos += len(take)
        take = take[valid]
        f.lru[take] = -1
        out.append(take)
        need -= len(take)
    return np.concatenate(out) if out else np.empty(0, dtype=np.int64)


def lruvec_lru_size(k: Kernel) -> int:
    """Model of lruvec_lru_size(): the number of folios on the anon LRU."""
    return int(np.count_nonzero(k.folios.lru[: k.folios._next] >= 0))


# -- references -------------------------------------------------------------------------------------------
def folio_check_references(k: Kernel, fid: int) -> bool:
    """Model of folio_check_references() for an anon folio: keep it (True) or reclaim it.

    folio_referenced() tests and clears the young bit of every mapping, and
    PG_referenced is tested and cleared.  A folio with a young mapping is
    kept and marked PG_referenced (the kernel activates it when it was
    referenced before or more than one mapping was young, and keeps it on
    the inactive list otherwise: on the one list here both are a second
    chance).  Without a young mapping an anon folio is reclaimed, whatever
    PG_referenced said.
    """
    young = folio_referenced(k, fid)
    f = k.folios
    if young:
        f.flags[fid] |= PG_REFERENCED
    else:
        f.flags[fid] &= np.uint16(~PG_REFERENCED & 0xFFFF)
    return young


# -- pageout ------------------------------------------------------------------------------------------------
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
            memory.zap_pte_range(k, mm, m[2], m[3], m[3] + 1)
    k.vmstat.count_vm_event("pglazyfreed", 1 << int(k.folios.order[fid]))
    k.vmstat.count_vm_event("pgsteal_file", 1 << int(k.folios.order[fid]))   # lazyfree folios sit on the file LRU
    return True


def shrink_folio(k: Kernel, fid: int) -> int:
    """Model of shrink_folio_list() for one anon folio: returns pages freed (0 if kept).

    A clean lazyfree folio is discarded.  A partially mapped large folio is
    split first.  Then add_to_swap()/folio_alloc_swap(): a large folio that
    gets no swap space (no free cluster, or no swap device at all: reclaim
    does not ask whether there is one) is split (thp_split_page, and the
    split's thp_split_pmd and zero-page remap), counting thp_swpout_fallback
    (PMD order) and swpout_fallback, and its pieces are tried one by one; a
    small folio without swap space is kept (activated).  With a slot, the
    folio is unmapped to swap entries, written and freed.
    """
    f = k.folios
    if not f.used[fid] or f.flags[fid] & PG_HUGE_ZERO or not f.flags[fid] & PG_ANON:
        return 0
    order = int(f.order[fid])
    nr = 1 << order
    if not f.flags[fid] & PG_SWAPBACKED:
        return nr if discard_lazyfree(k, fid) else 0
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
    slot = k.swap.alloc_slots(nr) if k.swap is not None else -1
    if order and slot < 0:
        head = int(f.head[fid])
        if hm.split_folio(k, fid) != 0:
            return 0
        if order >= HPAGE_PMD_ORDER:
            k.vmstat.count_vm_event("thp_swpout_fallback")
        k.vmstat.count_mthp_stat(order, "swpout_fallback")
        return _shrink_pieces(k, head, nr)
    if slot < 0:
        return 0                                          # no swap space: keep it (activate_locked_split)
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
    """shrink_folio() of every folio a split left in frames [head, head + nr): pages freed.

    Optimization: with no free swap slot every piece (a swap-backed order-0
    folio) would be kept, so none is tried.
    """
    if k.swap is None or k.swap.nr_free == 0:
        return 0
    return sum(shrink_folio(k, int(k.mem.folio[p])) for p in range(head, head + nr) if k.mem.folio[p] >= 0)


def reclaim_pages(k: Kernel, fids) -> int:
    """Model of reclaim_pages() (MADV_PAGEOUT): reclaim these folios now; returns pages freed."""
    freed = 0
    for fid in dict.fromkeys(int(x) for x in fids):
        if k.folios.used[fid]:
            freed += shrink_folio(k, fid)
    return freed


def shrink_small_batch(k: Kernel, fids: np.ndarray) -> np.ndarray:
    """Optimization: second chance and swap-out for many order-0 anon folios at once.

    Same decisions as folio_check_references() + shrink_folio() one by one:
    young folios get their bits cleared, are marked PG_referenced and are
    returned to be kept; the others are written to swap, their PTEs become
    swap entries, and they are freed.
    Returns the folios kept (young, or no swap slot left).
    """
    f = k.folios
    mem = k.mem
    pfns = f.head[fids]
    maps, complete = small_mappings(k, pfns)
    if not complete:
        keep = []
        for fid in fids.tolist():
            if folio_check_references(k, fid) or not shrink_folio(k, fid):
                if f.used[fid]:
                    keep.append(fid)
        return np.array(keep, dtype=np.int64)
    young = np.zeros(len(fids), dtype=bool)
    for mm, idx, rows, cols in maps:
        y = (mm.pt.pte_flags[rows, cols] & _PAGE_ACCESSED).astype(bool)
        young[idx[y]] = True
        pgtable.pte_update_flags(k, mm, rows[y], cols[y], clear_bits=_PAGE_ACCESSED)
    f.flags[fids] = (f.flags[fids] & np.uint16(~PG_REFERENCED & 0xFFFF)) | \
        np.where(young, PG_REFERENCED, 0).astype(np.uint16)
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
            if folio_check_references(k, fid):
                folio_add_lru(k, fid)                     # second chance: to the tail
                continue
            freed += shrink_folio(k, fid)
        return freed
    limit = 2 * lruvec_lru_size(k) + 1
    while freed < nr_to_reclaim and scanned < limit:
        chunk = isolate_lru_folios(k, max(32, 2 * (nr_to_reclaim - freed)))
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
                (keep if folio_check_references(k, fid) else old).append(fid)
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
            if folio_check_references(k, fid):
                keep.append(fid)                          # second chance: to the tail
                continue
            got = shrink_folio(k, fid)
            if not got and f.used[fid]:
                keep.append(fid)
            freed += got
        keep = np.array(keep, dtype=np.int64)
        keep = keep[f.used[keep] & (f.lru[keep] < 0)] if len(keep) else keep
        if len(keep):
            folio_add_lru(k, keep)
    k.vmstat.count_vm_event("pgscan_anon", scanned)
    k.vmstat.count_vm_event("pgsteal_anon", freed)
    return freed


# -- kswapd ---------------------------------------------------------------------------------------------------
def shrink_slab(k: Kernel, nr_to_scan: int | None = None) -> int:
    """Model of shrink_slab(): run the shrinkers; the one modelled is the deferred split queue's.

    Returns the pages freed (huge_memory.deferred_split_scan()).
    """
    return hm.deferred_split_scan(k, nr_to_scan)


def balance_pgdat(k: Kernel, need: int = 0) -> None:
    """Model of wakeup_kswapd() + balance_pgdat(): short of the low watermark, reclaim to the high one.

    ``need``: pages the caller is about to allocate.  Called (through
    ``Kernel.balance()``) at the start of a fault, before any page-table
    state is read, and of a store batch, never in the middle of one, so
    reclaim never pulls a page out from under a fault in progress.

    Simplification: kswapd runs synchronously and takes no simulated time;
    direct reclaim is folded into it (a fault that finds memory short
    reclaims first).
    """
    if k.mem.nr_free - need >= k.wmark_low:
        return
    shrink_slab(k)
    target = k.wmark_high + need - k.mem.nr_free
    if target > 0:
        # kswapd reclaims in SWAP_CLUSTER_MAX-sized steps; take at least a few of them.
        shrink_lru(k, max(target, 4 * 32))
