"""Model of mm/compaction.c (direct compaction for one THP) and mm/migrate.c.

``compact_for_thp()`` looks for a 2 MiB pageblock whose frames are all free or
movable (belong to anon folios that are not the huge zero folio), migrates
the movable folios to free frames outside it, and hands the now free block to
the caller.  Unmovable pages (``PhysMem.fragment()``) make a block useless.
The scan follows the kernel's two scanners only in spirit: candidate blocks
are taken from the top of memory down, the cheapest (fewest pages to move)
first among a bounded window.

``migrate_folio()`` moves one folio to a new frame range, keeping every
mapping (PMD mappings stay PMD mappings when a THP can be allocated:
thp_migration_success; otherwise the THP is split and its pages move one by
one: thp_migration_split).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .constants import HPAGE_PMD_NR, HPAGE_PMD_ORDER, HPAGE_PMD_SIZE
from .folio import PG_ANON, PG_HUGE_ZERO
from . import pgtable

if TYPE_CHECKING:
    from .kernel import Kernel

SCAN_WINDOW = 64          # pageblocks looked at per compaction attempt


def _block_cost(k: Kernel, base: int) -> int:
    """Pages to migrate to free this block, or -1 when something unmovable sits in it."""
    mem = k.mem
    sl = slice(base, base + HPAGE_PMD_NR)
    if mem.reserved[sl].any():
        return -1
    fids = mem.folio[sl]
    owned = fids >= 0
    if not owned.any():
        return -1 if mem.free_order[base] >= HPAGE_PMD_ORDER else 0
    f = k.folios
    uf = np.unique(fids[owned])
    if (f.flags[uf] & PG_HUGE_ZERO).any() or not (f.flags[uf] & PG_ANON).all():
        return -1
    if (f.order[uf] >= HPAGE_PMD_ORDER).any():
        return -1                                  # already a THP: nothing to gain
    return int(owned.sum())


def compact_for_thp(k: Kernel, background: bool = False) -> int:
    """Direct compaction (try_to_compact_pages()) for one order-9 block: its PFN or -1.

    ``background``: kcompactd's work, which counts no compact_stall (the
    kernel counts kcompactd's runs as compact_daemon_wake).
    """
    k.vmstat.count_vm_event("compact_daemon_wake" if background else "compact_stall")
    mem = k.mem
    if mem.nr_free < 2 * HPAGE_PMD_NR:
        k.vmstat.count_vm_event("compact_fail")
        return -1
    nblocks = mem.nr_frames // HPAGE_PMD_NR
    best, best_cost = -1, None
    scanned = 0
    for b in range(nblocks - 1, 0, -1):
        base = b * HPAGE_PMD_NR
        cost = _block_cost(k, base)
        scanned += 1
        if cost > 0 and cost <= mem.nr_free - HPAGE_PMD_NR and (best_cost is None or cost < best_cost):
            best, best_cost = base, cost
            if cost <= HPAGE_PMD_NR // 8 or scanned >= SCAN_WINDOW:
                break
    k.vmstat.count_vm_event("compact_migrate_scanned", scanned * HPAGE_PMD_NR)
    if best < 0:
        k.vmstat.count_vm_event("compact_fail")
        return -1
    # Fence the block off so migration targets land elsewhere.
    fence = []
    for pfn in range(best, best + HPAGE_PMD_NR):
        if mem.folio[pfn] < 0 and mem.take_pfn(pfn):
            fence.append(pfn)
    moved_ok = True
    vacated: list[tuple[int, int]] = []        # compaction_alloc() takes targets from other blocks
    for fid in np.unique(mem.folio[best: best + HPAGE_PMD_NR][mem.folio[best: best + HPAGE_PMD_NR] >= 0]).tolist():
        if migrate_folio(k, int(fid), allow_split=False, vacated=vacated) < 0:
            moved_ok = False
            break
    for pfn, order in vacated:
        mem.free(pfn, order)
    for pfn in fence:
        mem.reserved[pfn] = False
        mem.free(pfn, 0)
    if not moved_ok or (mem.folio[best: best + HPAGE_PMD_NR] >= 0).any():
        k.vmstat.count_vm_event("compact_fail")
        return -1
    got = best if mem.take_block(best, HPAGE_PMD_ORDER) else -1
    if got < 0:
        k.vmstat.count_vm_event("compact_fail")
        return -1
    k.vmstat.count_vm_event("compact_success")
    k.vmstat.count_vm_event("sim_compact_pages", best_cost)
    return got


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
    from .vmscan import folio_mappings
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
