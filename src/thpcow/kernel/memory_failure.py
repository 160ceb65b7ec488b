"""Model of mm/memory-failure.c: a hardware memory error in an anonymous page."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .folio import PG_SWAPCACHE
from .page_alloc import PG_HWPOISON
from .pgtable import _PAGE_HWPOISON
from .swap_state import delete_from_swap_cache
from . import huge_memory as hm
from . import pgtable, rmap

if TYPE_CHECKING:
    from .kernel import Kernel


def memory_failure(k: Kernel, pfn: int) -> None:
    """Model of memory_failure() for an anon page: lose that 4 KiB page only.

    The page is marked poisoned first.  A large folio is split (so the rest
    of a THP survives as 4 KiB pages; the split maps its zero-filled pages
    to the shared zero page, never the poisoned one); the poisoned page is
    unmapped everywhere and its entries become hwpoison markers: touching
    them raises SIGBUS.  If the split fails the
    whole folio is unmapped (the processes would be killed).  A folio in the
    swap cache is clean (its slot holds the data): its entries become swap
    entries again.
    """
    fid = int(k.mem.folio[pfn])
    k.vmstat.count_vm_event("sim_memory_failure")
    if fid < 0:
        k.mem.take_pfn(pfn)
        return
    k.mem.pflags[pfn] |= PG_HWPOISON          # TestSetPageHWPoison(), before any split
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
        rmap.try_to_unmap_to_swap(k, fid, int(k.folios.swap[fid]))
    for m in rmap.folio_mappings(k, fid):
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
