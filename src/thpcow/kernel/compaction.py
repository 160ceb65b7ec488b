"""Model of mm/compaction.c: direct compaction for one THP, and kcompactd.

``compact_for_thp()`` looks for a 2 MiB pageblock whose frames are all free or
movable (belong to anon folios that are not the huge zero folio), migrates
the movable folios to free frames outside it, and hands the now free block to
the caller.  Unmovable pages (``PhysMem.fragment()``) make a block useless.
The scan follows the kernel's two scanners only in spirit: candidate blocks
are taken from the top of memory down, the cheapest (fewest pages to move)
first among a bounded window.  The folios move with ``migrate_folio()``
(:mod:`.migrate`).

``wakeup_kcompactd()`` schedules the same work in the background, on the
simulated clock.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .constants import HPAGE_PMD_NR, HPAGE_PMD_ORDER
from .folio import PG_ANON, PG_HUGE_ZERO
from .migrate import migrate_folio

if TYPE_CHECKING:
    from .kernel import Kernel

SCAN_WINDOW = 64          # pageblocks looked at per compaction attempt
KCOMPACTD_DELAY_NS = 1_000_000      # 1 ms: the kthread runs soon after its wakeup


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


def wakeup_kcompactd(k: Kernel) -> None:
    """Model of wakeup_kcompactd(): background compaction of one block, soon."""
    if k.kcompactd_pending:
        return
    k.kcompactd_pending = True

    def run() -> None:
        k.kcompactd_pending = False
        pfn = compact_for_thp(k, background=True)
        if pfn >= 0:
            k.mem.free(pfn, HPAGE_PMD_ORDER)     # the block goes back to the free lists
    k.clock.schedule(k.clock.now + KCOMPACTD_DELAY_NS, run)
