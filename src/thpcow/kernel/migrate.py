"""Model of mm/migrate.c: moving a folio to other frames while keeping its mappings.

``migrate_folio()`` moves one folio to a new frame range, keeping every
mapping (PMD mappings stay PMD mappings when a THP can be allocated:
thp_migration_success; otherwise the THP is split and its pages move one by
one: thp_migration_split).  Compaction (:mod:`.compaction`) and
``Kernel.migrate()`` (NUMA balancing, offlining) use it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .constants import HPAGE_PMD_ORDER, HPAGE_PMD_SIZE
from .rmap import folio_mappings
from . import pgtable

if TYPE_CHECKING:
    from .kernel import Kernel


def migrate_folio(k: Kernel, fid: int, allow_split: bool = True,
                  vacated: list[tuple[int, int]] | None = None) -> int:
    """Model of migrate_pages() for one anon folio: move it, keep its mappings.

    Returns the new folio id, or -1 (thp_migration_fail / pgmigrate_fail).
    A THP for which no new THP can be had is split when ``allow_split``
    (thp_migration_split, and it counts as a failed THP migration as
    migrate_pages_batch() does) and its pages migrated as one batch: every
    target is allocated before any source frame is freed.  ``vacated``
    collects the source frames instead of freeing them (for compaction).
    """
    f = k.folios
    mem = k.mem
    order = int(f.order[fid])
    nr = 1 << order
    ids = np.array([fid])
    if f.refcount[fid] != f.expected_ref_count(ids, mem.mapcount[f.head[ids]])[0]:
        k.vmstat.count_vm_event("pgmigrate_fail", nr)
        if order >= HPAGE_PMD_ORDER:
            k.vmstat.count_vm_event("thp_migration_fail")
        return -1
    new_pfn = mem.alloc(order)
    if new_pfn < 0:
        if order >= HPAGE_PMD_ORDER and allow_split:
            from .huge_memory import split_folio
            head = int(f.head[fid])
            if split_folio(k, fid) != 0:
                k.vmstat.count_vm_event("thp_migration_fail")
                return -1
            k.vmstat.count_vm_event("thp_migration_split")
            k.vmstat.count_vm_event("thp_migration_fail")
            batch: list[tuple[int, int]] = []
            for p in range(head, head + nr):
                if mem.folio[p] >= 0:
                    migrate_folio(k, int(mem.folio[p]), allow_split=False, vacated=batch)
            for pfn, o in batch:
                if vacated is None:
                    mem.free(pfn, o)
                else:
                    vacated.append((pfn, o))
            return -1
        k.vmstat.count_vm_event("pgmigrate_fail", nr)
        if order >= HPAGE_PMD_ORDER:
            k.vmstat.count_vm_event("thp_migration_fail")
        return -1
    old_head = int(f.head[fid])
    maps = folio_mappings(k, fid)
    # try_to_migrate(): a PMD mapping becomes a migration entry (cleared here) until
    # remove_migration_pmd() maps the new frames; PTEs are remapped in place below.
    pmd_flags = [pgtable.pmdp_huge_get_and_clear(k, m[1], m[2])[1] if m[0] == "pmd" else 0 for m in maps]
    # Move the frames' state; the folio id stays, only its frames change.
    sl_old = slice(old_head, old_head + nr)
    sl_new = slice(new_pfn, new_pfn + nr)
    mem.content[sl_new] = mem.content[sl_old]
    mem.mapcount[sl_new] = mem.mapcount[sl_old]
    mem.pflags[sl_new] = mem.pflags[sl_old]
    mem.vpn[sl_new] = mem.vpn[sl_old]
    mem.folio[sl_new] = fid
    f.head[fid] = new_pfn
    for m, pmd_fl in zip(maps, pmd_flags):
        if m[0] == "pte":
            _, mm, r, c, pfn = m
            pgtable.set_pte_at(k, mm, r, c, new_pfn + (pfn - old_head), mm.pt.pte_flags[r, c])
            k.flush_tlb_pages(mm, [mem.vpn[pfn]])
        else:
            base = int(m[1].pt.pmd_index[m[2]]) * HPAGE_PMD_SIZE
            k.flush_tlb_range(m[1], base, base + HPAGE_PMD_SIZE)
            pgtable.set_pmd_at(k, m[1], m[2], fid, pmd_fl)
    mem.folio[sl_old] = -1
    mem.mapcount[sl_old] = 0
    mem.pflags[sl_old] = 0
    if vacated is None:
        mem.free(old_head, order)
    else:
        # Keep the frame out of the allocator until the batch is done.
        vacated.append((old_head, order))
    k.vmstat.count_vm_event("pgmigrate_success", nr)
    if order >= HPAGE_PMD_ORDER:
        k.vmstat.count_vm_event("thp_migration_success")
    return fid
