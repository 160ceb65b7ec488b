"""Model of mm/rmap.c (and the inline helpers in include/linux/rmap.h).

Adding and removing anonymous mappings of folios: mapcounts, the CONFIG_MM_ID
slots, NR_ANON_MAPPED/NR_ANON_THPS, PG_anon_exclusive, and the deferred split
queueing that ``__folio_remove_rmap()`` does for partially mapped folios.
Reference counts are taken and dropped by the callers, as in the kernel.

All functions take the kernel context ``k`` (``k.mem``, ``k.folios``,
``k.vmstat``, ``k.sysfs``, ``k.deferred``) first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .constants import HPAGE_PMD_NR, HPAGE_PMD_ORDER
from .folio import PG_ANON, PG_DEFERRED, PG_LRU, PG_MM_IDS_SHARED, PG_PARTIALLY_MAPPED, PG_SWAPBACKED, PG_SWAPCACHE  # noqa: F401
from .page_alloc import PG_ANON_EXCLUSIVE

if TYPE_CHECKING:
    from .kernel import Kernel
    from .mm import MM

_NOT_AE = np.uint8(~PG_ANON_EXCLUSIVE & 0xFF)


def _pages(k: Kernel, fid: int) -> slice:
    head = int(k.folios.head[fid])
    return slice(head, head + (1 << int(k.folios.order[fid])))


def folio_add_new_anon_rmap(k: Kernel, fid: int, mm: MM, pmd: bool) -> None:
    """Model of folio_add_new_anon_rmap(..., RMAP_EXCLUSIVE): a fresh folio's first mapping.

    A PMD mapping sets the entire mapcount and AnonExclusive on the head page
    only; PTE mappings set every page's mapcount and AnonExclusive.
    """
    f = k.folios
    order = int(f.order[fid])
    nr = 1 << order
    pages = _pages(k, fid)
    f.flags[fid] |= PG_ANON | PG_SWAPBACKED | PG_LRU
    k.lru_add(fid)                                    # folio_add_lru_vma()
    if pmd:
        f.entire[fid] = 1
        f.set_large_mapcount(fid, 1, mm.mm_id)
        k.mem.pflags[pages.start] |= PG_ANON_EXCLUSIVE
        k.vmstat.mod_node_page_state("nr_anon_transparent_hugepages", nr)
    else:
        k.mem.mapcount[pages] = 1
        k.mem.pflags[pages] |= PG_ANON_EXCLUSIVE
        if order:
            f.set_large_mapcount(fid, nr, mm.mm_id)
    if order:
        k.vmstat.mod_mthp_stat(order, "nr_anon", 1)
    k.vmstat.mod_node_page_state("nr_anon_pages", nr)


def _pte_mapped_pages(k: Kernel, fid: int) -> int:
    return int(np.count_nonzero(k.mem.mapcount[_pages(k, fid)]))


def folio_add_anon_rmap_ptes(k: Kernel, fid: int, pfn: int, nr: int, mm: MM, exclusive: bool) -> None:
    """Model of folio_add_anon_rmap_ptes(): map ``nr`` pages of an existing folio."""
    f = k.folios
    mc = k.mem.mapcount[pfn: pfn + nr]
    newly = int(np.count_nonzero(mc == 0))
    mc += 1
    if exclusive:
        k.mem.pflags[pfn: pfn + nr] |= PG_ANON_EXCLUSIVE
    if f.order[fid]:
        f.add_large_mapcount(fid, nr, mm.mm_id)
    if f.entire[fid] == 0 and newly:
        k.vmstat.mod_node_page_state("nr_anon_pages", newly)


def folio_remove_rmap_ptes(k: Kernel, fid: int, pfn: int, nr: int, mm: MM) -> None:
    """Model of folio_remove_rmap_ptes() / __folio_remove_rmap(PGTABLE_LEVEL_PTE)."""
    f = k.folios
    mc = k.mem.mapcount[pfn: pfn + nr]
    mc -= 1
    gone = int(np.count_nonzero(mc == 0))
    if f.order[fid] == 0:
        if gone:
            k.vmstat.mod_node_page_state("nr_anon_pages", -1)
        return
    f.sub_large_mapcount(fid, nr, mm.mm_id)
    if f.entire[fid] or not gone:
        return
    k.vmstat.mod_node_page_state("nr_anon_pages", -gone)
    if _pte_mapped_pages(k, fid):
        _queue_partially_mapped(k, fid)


def folio_remove_rmap_pmd(k: Kernel, fid: int, mm: MM) -> None:
    """Model of folio_remove_rmap_pmd() / __folio_remove_rmap(PGTABLE_LEVEL_PMD)."""
    f = k.folios
    f.entire[fid] -= 1
    f.sub_large_mapcount(fid, 1, mm.mm_id)
    if f.entire[fid]:
        return
    k.vmstat.mod_node_page_state("nr_anon_transparent_hugepages", -HPAGE_PMD_NR)
    mapped = _pte_mapped_pages(k, fid)
    nr = HPAGE_PMD_NR - mapped
    if nr:
        k.vmstat.mod_node_page_state("nr_anon_pages", -nr)
    if nr and nr < HPAGE_PMD_NR:
        _queue_partially_mapped(k, fid)


def _queue_partially_mapped(k: Kernel, fid: int) -> None:
    f = k.folios
    if f.flags[fid] & PG_ANON and not f.flags[fid] & PG_PARTIALLY_MAPPED:
        deferred_split_folio(k, fid, partially_mapped=True)


def folio_try_dup_anon_rmap_pmd(k: Kernel, fid: int, dst: MM) -> None:
    """Model of folio_try_dup_anon_rmap_pmd() for an unpinned THP (fork)."""
    f = k.folios
    k.mem.pflags[int(f.head[fid])] &= _NOT_AE
    f.entire[fid] += 1
    f.add_large_mapcount(fid, 1, dst.mm_id)


def deferred_split_folio(k: Kernel, fid: int, partially_mapped: bool) -> None:
    """Model of mm/huge_memory.c:deferred_split_folio()."""
    f = k.folios
    order = int(f.order[fid])
    if order <= 1:
        return
    if not partially_mapped and not k.sysfs.shrink_underused:
        return
    if f.flags[fid] & PG_SWAPCACHE:
        return
    if partially_mapped and not f.flags[fid] & PG_PARTIALLY_MAPPED:
        f.flags[fid] |= PG_PARTIALLY_MAPPED
        if order >= HPAGE_PMD_ORDER:
            k.vmstat.count_vm_event("thp_deferred_split_page")
        k.vmstat.count_mthp_stat(order, "split_deferred")
        k.vmstat.mod_mthp_stat(order, "nr_anon_partially_mapped", 1)
    if not f.flags[fid] & PG_DEFERRED:
        f.flags[fid] |= PG_DEFERRED
        k.deferred[fid] = None


def folio_unqueue_deferred_split(k: Kernel, fid: int) -> None:
    """Model of folio_unqueue_deferred_split()."""
    f = k.folios
    if not f.flags[fid] & PG_DEFERRED:
        return
    del k.deferred[fid]
    f.flags[fid] &= np.uint16(~PG_DEFERRED & 0xFFFF)
    if f.flags[fid] & PG_PARTIALLY_MAPPED:
        f.flags[fid] &= np.uint16(~PG_PARTIALLY_MAPPED & 0xFFFF)
        k.vmstat.mod_mthp_stat(int(f.order[fid]), "nr_anon_partially_mapped", -1)


def folio_put(k: Kernel, fid: int, refs: int = 1) -> None:
    """Model of folio_put_refs(): drop references and free the folio at zero."""
    f = k.folios
    f.refcount[fid] -= refs
    if f.refcount[fid] == 0:
        free_folio(k, fid)


def free_small_folios(k: Kernel, fids: np.ndarray) -> None:
    """Optimization: free_folio() for many order-0 folios whose refcount dropped to 0."""
    if not len(fids):
        return
    f = k.folios
    pfns = f.head[fids].copy()
    k.mem.folio[pfns] = -1
    k.mem.pflags[pfns] = 0
    k.mem.mapcount[pfns] = 0
    f.release_bulk(fids)
    k.mem.free_bulk(pfns)


def free_folio(k: Kernel, fid: int) -> None:
    """Model of __folio_put() -> free_frozen_pages(): give the frames back."""
    f = k.folios
    folio_unqueue_deferred_split(k, fid)
    order = int(f.order[fid])
    pages = _pages(k, fid)
    if order and f.flags[fid] & PG_ANON:
        k.vmstat.mod_mthp_stat(order, "nr_anon", -1)
    k.mem.folio[pages] = -1
    k.mem.pflags[pages] = 0
    k.mem.mapcount[pages] = 0
    head = pages.start
    f.release(fid)
    k.mem.free(head, order)
