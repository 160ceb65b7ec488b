"""Invariant checker in the spirit of page_table_check and CONFIG_DEBUG_VM.

:func:`check_kernel` recomputes, from every process's page tables alone, what
the folio table, the per-page counters, the rss counters and vmstat must say,
and raises :class:`InvariantViolation` with a message naming the mm, address,
PFN or folio at the first disagreement.  The rules follow the checklist of
kernel-semantics §11.6, plus the mm-ids SHARED bit of §1.1 (rule 9) and the
per-size ``nr_anon`` gauge of §9.5 (rule 11):

1. a writable anon entry is the only mapping of its page system-wide
   (page_table_check's anon_map_count rule); the zero pages are never writable;
2. writable anon PTE => page AnonExclusive; writable anon PMD => head AnonExclusive;
3. an AnonExclusive page is mapped by at most one mm;
4. refcount == PTE mappings + PMD mappings + one per page held by the swap cache (no pins);
   a folio in the swap cache is the one the swap cache names for its slots;
5. per-page mapcounts, entire and large mapcounts, NR_ANON_MAPPED, NR_ANON_THPS;
6. per mm: MM_ANONPAGES equals a page-table walk, nr_ptes equals the tables;
7. a PMD leaf maps a PMD-order folio, 2 MiB aligned, inside one VMA;
8. no entry outside a VMA; no frame both free and mapped (buddy check);
9. the MM_IDS_SHARED bit is set whenever two mms map a large folio, and
   clear when one mm-id slot holds all its mappings; each slot in use names
   a distinct mm and counts at least one and at most that mm's mappings;
10. partially mapped large folios are on the deferred split queue;
11. nr_anon per order equals the live anon folios of that order;
12. with page_table_check on, its per-page anon/file map counts equal the
    mappings counted from the page tables (a PMD leaf counts on every page of
    its folio; the zero pages are not counted);
13. a writable entry lies in a VMA with VM_WRITE (mprotect's change_protection()
    and every fault path map read-only elsewhere);
14. (at each copy of many pages, :func:`check_copy`) every page of the copy
    holds its source's contents.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .constants import HPAGE_PMD_NR, HPAGE_PMD_ORDER, HPAGE_PMD_SIZE, PFN_PHYS, VM_WRITE
from .errors import InvariantViolation
from .folio import MM_ID_DUMMY, PG_ANON, PG_DEFERRED, PG_HUGE_ZERO, PG_MM_IDS_SHARED, PG_PARTIALLY_MAPPED, PG_SWAPCACHE
from .mm import PMD_LEAF, _PAGE_RW, _PAGE_SPECIAL, swp_offset
from .page_alloc import PG_ANON_EXCLUSIVE, ZERO_PFN

if TYPE_CHECKING:
    from .kernel import Kernel


def _fail(msg: str) -> None:
    raise InvariantViolation(msg)


def check_kernel(k: Kernel) -> None:
    mem, f = k.mem, k.folios
    n = mem.nr_frames
    pte_maps = np.zeros(n, dtype=np.int64)          # PTE mappings per pfn
    writable_maps = np.zeros(n, dtype=np.int64)
    entire = np.zeros(f.capacity, dtype=np.int64)   # PMD mappings per folio
    pmd_writable = np.zeros(f.capacity, dtype=np.int64)
    mm_of_page: dict[int, set] = {}                 # only for AE pages
    swap_refs = np.zeros(k.swap.nr_slots if k.swap else 0, dtype=np.int64)
    per_mm_folio_maps: dict[int, dict[int, int]] = {}
    mm_ids = {pid: proc.mm.mm_id for pid, proc in k.procs.items()}
    for pid, proc in k.procs.items():
        mm = proc.mm
        pt = mm.pt
        rss = 0
        tables = 0
        swap_ptes = 0
        fmaps: dict[int, int] = {}
        for s in range(pt.nr_slots):
            kind = pt.pmd_kind[s]
            base = int(pt.pmd_index[s]) * HPAGE_PMD_SIZE
            if kind == 0:
                continue
            tables += 1
            if kind == PMD_LEAF:
                fid = int(pt.pmd_folio[s])
                if fid < 0 or not f.used[fid]:
                    _fail(f"mm {pid}: PMD at {base:#x} maps freed folio {fid}")
                if f.order[fid] != HPAGE_PMD_ORDER:
                    _fail(f"mm {pid}: PMD at {base:#x} maps folio {fid} of order {f.order[fid]}, not {HPAGE_PMD_ORDER}")
                if int(f.head[fid]) % HPAGE_PMD_NR:
                    _fail(f"mm {pid}: PMD at {base:#x} maps unaligned head pfn {int(f.head[fid]):#x}")
                v = mm.find_vma(base)
                if v is None or v.end < base + HPAGE_PMD_SIZE:
                    _fail(f"mm {pid}: PMD leaf at {base:#x} is not inside one VMA")
                if f.flags[fid] & PG_HUGE_ZERO:
                    if pt.pmd_flags[s] & _PAGE_RW:
                        _fail(f"mm {pid}: huge zero PMD at {base:#x} is writable")
                    continue
                entire[fid] += 1
                rss += HPAGE_PMD_NR
                fmaps[fid] = fmaps.get(fid, 0) + 1
                if pt.pmd_flags[s] & _PAGE_RW:
                    if not v.flags & VM_WRITE:
                        _fail(f"mm {pid}: writable PMD at {base:#x} in a VMA without VM_WRITE ({v.perms()})")
                    pmd_writable[fid] += 1
                    if not mem.pflags[int(f.head[fid])] & PG_ANON_EXCLUSIVE:
                        _fail(f"mm {pid}: writable PMD at {base:#x} maps folio {fid} whose head is not AnonExclusive")
                if mem.pflags[int(f.head[fid])] & PG_ANON_EXCLUSIVE:
                    mm_of_page.setdefault(int(f.head[fid]), set()).add(pid)
                continue
            row = int(pt.pmd_row[s])
            pfns = pt.pte_pfn[row]
            flags = pt.pte_flags[row]
            swp = pfns <= -2
            if swp.any():
                if k.swap is None:
                    _fail(f"mm {pid}: swap entries at {base:#x} but there is no swap device")
                swap_ptes += int(np.count_nonzero(swp))
                np.add.at(swap_refs, swp_offset(pfns[swp]), 1)
            present = np.flatnonzero(pfns >= 0)
            if not len(present):
                continue
            addrs = base + PFN_PHYS(present)
            for a in (int(addrs[0]), int(addrs[-1])):
                if mm.find_vma(a) is None:
                    _fail(f"mm {pid}: PTE at {a:#x} lies outside every VMA")
            if len(present) > 2:
                for a in addrs.tolist():
                    if mm.find_vma(a) is None:
                        _fail(f"mm {pid}: PTE at {a:#x} lies outside every VMA")
            special = (flags[present] & _PAGE_SPECIAL).astype(bool)
            if (flags[present][special] & _PAGE_RW).any():
                _fail(f"mm {pid}: a zero-page PTE in the table at {base:#x} is writable")
            if (pfns[present][special] != ZERO_PFN).any():
                _fail(f"mm {pid}: a special PTE at {base:#x} does not map the zero page")
            idx = present[~special]
            p = pfns[idx]
            if (mem.folio[p] < 0).any():
                bad = int(p[mem.folio[p] < 0][0])
                _fail(f"mm {pid}: PTE in the table at {base:#x} maps pfn {bad:#x}, which belongs to no folio")
            np.add.at(pte_maps, p, 1)
            w = (flags[idx] & _PAGE_RW).astype(bool)
            if w.any():
                for v in mm.vmas_in(base, base + HPAGE_PMD_SIZE):
                    if v.flags & VM_WRITE:
                        continue
                    wa = addrs[~special][w]
                    inside = (wa >= v.start) & (wa < v.end)
                    if inside.any():
                        _fail(f"mm {pid}: writable PTE at {int(wa[inside][0]):#x} in a VMA without VM_WRITE "
                              f"({v.perms()})")
            np.add.at(writable_maps, p[w], 1)
            if len(p[w]) and not (mem.pflags[p[w]] & PG_ANON_EXCLUSIVE).all():
                bad = int(p[w][~(mem.pflags[p[w]] & PG_ANON_EXCLUSIVE).astype(bool)][0])
                _fail(f"mm {pid}: writable PTE maps pfn {bad:#x} that is not AnonExclusive")
            ae = p[(mem.pflags[p] & PG_ANON_EXCLUSIVE).astype(bool)]
            for q in ae.tolist():
                mm_of_page.setdefault(q, set()).add(pid)
            rss += len(p)
            fids, counts = np.unique(mem.folio[p], return_counts=True)
            for fid, c in zip(fids.tolist(), counts.tolist()):
                fmaps[fid] = fmaps.get(fid, 0) + c
        if rss != mm.rss_anon:
            _fail(f"mm {pid}: MM_ANONPAGES={mm.rss_anon} but the page tables map {rss} anon pages")
        if swap_ptes != mm.rss_swap:
            _fail(f"mm {pid}: MM_SWAPENTS={mm.rss_swap} but the page tables hold {swap_ptes} swap entries")
        if tables != mm.nr_ptes:
            _fail(f"mm {pid}: nr_ptes={mm.nr_ptes} but there are {tables} page tables (incl. deposits)")
        per_mm_folio_maps[pid] = fmaps
    # Per page
    if (mem.mapcount != pte_maps).any():
        pfn = int(np.flatnonzero(mem.mapcount != pte_maps)[0])
        _fail(f"pfn {pfn:#x}: page mapcount {mem.mapcount[pfn]} but {pte_maps[pfn]} PTEs map it")
    for pfn, mms in mm_of_page.items():
        if len(mms) > 1:
            _fail(f"pfn {pfn:#x}: AnonExclusive but mapped by mms {sorted(mms)}")
    wp = np.flatnonzero(writable_maps)
    if len(wp):
        fids = mem.folio[wp]
        total = pte_maps[wp] + entire[fids]
        if (total > 1).any():
            pfn = int(wp[total > 1][0])
            _fail(f"pfn {pfn:#x}: mapped writable but has {int(total[total > 1][0])} mappings")
    # Per folio
    live = np.flatnonzero(f.used[: f.capacity])
    for fid in np.flatnonzero(pmd_writable).tolist():
        head = int(f.head[fid])
        if entire[fid] > 1 or pte_maps[head: head + HPAGE_PMD_NR].any():
            _fail(f"folio {fid}: PMD-mapped writable but has other mappings")
    pte_by_folio = np.zeros(f.capacity, dtype=np.int64)
    owners = mem.folio >= 0
    np.add.at(pte_by_folio, mem.folio[owners], pte_maps[owners])
    nr_anon_pages = 0
    nr_thps = 0
    nr_anon = np.zeros(HPAGE_PMD_ORDER + 1, dtype=np.int64)
    for fid in live.tolist():
        if f.flags[fid] & PG_HUGE_ZERO:
            continue
        order = int(f.order[fid])
        head = int(f.head[fid])
        nr = 1 << order
        if (mem.folio[head: head + nr] != fid).any():
            _fail(f"folio {fid}: not every frame of pfn {head:#x}+{nr} points back to it")
        maps = int(pte_by_folio[fid] + entire[fid])
        cached = nr if f.flags[fid] & PG_SWAPCACHE else 0
        if f.refcount[fid] != maps + cached:
            _fail(f"folio {fid} (pfn {head:#x}, order {order}): refcount {f.refcount[fid]} but {maps} mappings"
                  f" and {cached} swap cache references")
        if cached:
            slot = int(f.swap[fid])
            if k.swap is None or slot < 0 or (k.swap.cache[slot: slot + nr] != fid).any() \
                    or not k.swap.in_cache[slot: slot + nr].all():
                _fail(f"folio {fid}: in the swap cache at slot {slot} but the swap cache does not hold it there")
        if f.entire[fid] != entire[fid]:
            _fail(f"folio {fid}: entire_mapcount {f.entire[fid]} but {entire[fid]} PMD mappings")
        if maps + cached == 0:
            _fail(f"folio {fid} (pfn {head:#x}): unmapped but not freed")
        if order:
            if f.large[fid] != maps:
                _fail(f"folio {fid}: large_mapcount {f.large[fid]} but {maps} mappings")
            mappers = [pid for pid, fm in per_mm_folio_maps.items() if fm.get(fid)]
            if len(mappers) > 1 and not f.flags[fid] & PG_MM_IDS_SHARED:
                _fail(f"folio {fid}: mapped by mms {mappers} but MM_IDS_SHARED is clear")
            _check_mm_ids(k, fid, maps, {mm_ids[pid]: fm.get(fid, 0) for pid, fm in per_mm_folio_maps.items()})
            pages_mapped = int(np.count_nonzero(pte_maps[head: head + nr]))
            if entire[fid] == 0 and 0 < pages_mapped < nr and f.flags[fid] & PG_ANON and order > 1:
                if not f.flags[fid] & PG_PARTIALLY_MAPPED or not f.flags[fid] & PG_DEFERRED:
                    _fail(f"folio {fid}: partially mapped ({pages_mapped}/{nr}) but not on the deferred split queue")
        if f.flags[fid] & PG_ANON:
            nr_anon[order] += 1
            if entire[fid]:
                nr_anon_pages += nr
                nr_thps += nr
            else:
                nr_anon_pages += int(np.count_nonzero(pte_maps[head: head + nr]))
    if nr_anon_pages != k.vmstat.node["nr_anon_pages"]:
        _fail(f"vmstat: nr_anon_pages={k.vmstat.node['nr_anon_pages']} but {nr_anon_pages} anon pages are mapped")
    if nr_thps != k.vmstat.node["nr_anon_transparent_hugepages"]:
        _fail(f"vmstat: NR_ANON_THPS={k.vmstat.node['nr_anon_transparent_hugepages']} pages "
              f"but {nr_thps} pages of PMD-mapped THPs")
    for order in range(2, HPAGE_PMD_ORDER + 1):
        if nr_anon[order] != k.vmstat.mthp_stat(order, "nr_anon"):
            _fail(f"mTHP order {order}: nr_anon={k.vmstat.mthp_stat(order, 'nr_anon')} but {nr_anon[order]} live folios")
    deferred = set(np.flatnonzero(f.used & (f.flags & PG_DEFERRED).astype(bool)).tolist())
    if deferred != set(k.deferred):
        _fail(f"deferred split queue holds {sorted(k.deferred)[:5]}... but PG_DEFERRED is set on {sorted(deferred)[:5]}...")
    if k.swap is not None:
        sw = k.swap
        if (sw.swap_map != swap_refs).any():
            slot = int(np.flatnonzero(sw.swap_map != swap_refs)[0])
            _fail(f"swap slot {slot}: swap_map={sw.swap_map[slot]} but {swap_refs[slot]} swap entries point at it")
        for slot in np.flatnonzero(sw.cache >= 0).tolist():
            fid = int(sw.cache[slot])
            if not f.used[fid] or not f.flags[fid] & PG_SWAPCACHE or not sw.in_cache[slot]:
                _fail(f"swap slot {slot}: the swap cache names folio {fid}, which is not in the swap cache")
            pfn = int(f.head[fid]) + slot - int(f.swap[fid])
            # Kept only while other swap entries use the slot, and never written while cached.
            if sw.swap_map[slot] < 1:
                _fail(f"swap slot {slot}: folio {fid} is in the swap cache but no swap entry uses the slot")
            if mem.content[pfn] != sw.content[slot]:
                _fail(f"swap slot {slot}: folio {fid} in the swap cache differs from the slot's contents")
            if mem.pflags[pfn] & PG_ANON_EXCLUSIVE or writable_maps[pfn]:
                _fail(f"swap slot {slot}: folio {fid} in the swap cache is exclusive or mapped writable")
        held = (swap_refs > 0) | sw.in_cache
        held[0] = True                              # the swap header
        if (sw.used[: sw.nr_slots] != held).any():
            slot = int(np.flatnonzero(sw.used[: sw.nr_slots] != held)[0])
            _fail(f"swap slot {slot}: used={bool(sw.used[slot])} but referenced={bool(held[slot])}")
        if sw.nr_free != sw.nr_slots - int(sw.used[: sw.nr_slots].sum()):
            _fail(f"swap: nr_free={sw.nr_free} but {sw.nr_slots - int(sw.used[: sw.nr_slots].sum())} slots are free")
    lru = set(np.flatnonzero(f.lru[: f._next] >= 0).tolist())
    anon_live = set(live[(f.flags[live] & PG_ANON).astype(bool)].tolist())
    if lru != anon_live:
        extra = sorted(lru - anon_live)[:3]
        missing = sorted(anon_live - lru)[:3]
        _fail(f"LRU: folios {extra} are on it but not live anon; live anon folios {missing} are missing")
    if k.ptc is not None:
        check_page_table_check(k, pte_maps, entire, live)
    mem.check()


def _check_mm_ids(k: Kernel, fid: int, maps: int, by_mm_id: dict[int, int]) -> None:
    """Rules 9a-9c: the CONFIG_MM_ID slots of a large folio (include/linux/rmap.h).

    A slot in use names a distinct mm that maps the folio, with a count of at
    least 1 and at most that mm's mappings (a count can fall short: mappings
    made while both slots were taken are only in the total); a free slot
    counts 0.  When one slot's count is the whole large mapcount the folio
    is mapped exclusively and the SHARED bit is clear: every removal clears
    it then, and an addition that keeps it so cannot set it.
    """
    f = k.folios
    slots = [(int(f.mm_id0[fid]), int(f.mm_cnt0[fid])), (int(f.mm_id1[fid]), int(f.mm_cnt1[fid]))]
    for i, (mid, cnt) in enumerate(slots):
        if mid == MM_ID_DUMMY:
            if cnt:
                _fail(f"folio {fid}: mm-id slot {i} is free but counts {cnt} mappings")
            continue
        if not 1 <= cnt <= by_mm_id.get(mid, 0):
            _fail(f"folio {fid}: mm-id slot {i} (mm id {mid}) counts {cnt} mappings but that mm has "
                  f"{by_mm_id.get(mid, 0)}")
    if slots[0][0] != MM_ID_DUMMY and slots[0][0] == slots[1][0]:
        _fail(f"folio {fid}: both mm-id slots name mm id {slots[0][0]}")
    if maps and f.flags[fid] & PG_MM_IDS_SHARED and any(mid != MM_ID_DUMMY and cnt == maps for mid, cnt in slots):
        owner = next(mid for mid, cnt in slots if mid != MM_ID_DUMMY and cnt == maps)
        _fail(f"folio {fid}: MM_IDS_SHARED is still set but mm id {owner} holds all {maps} mappings")


def check_copy(k: Kernel, dst: np.ndarray, src: np.ndarray) -> None:
    """Rule 14: after a copy of many pages (a whole THP, an mTHP block, a collapse), every
    page of the copy holds its source's contents (a none or zero-page source: zeroes)."""
    want = np.where(src >= 0, k.mem.content[np.maximum(src, 0)], 0)
    bad = np.flatnonzero(k.mem.content[dst] != want)
    if len(bad):
        i = int(bad[0])
        _fail(f"copy of {len(dst)} pages: {len(bad)} differ from their source, the first page {i} "
              f"(pfn {int(dst[i]):#x}) holds {int(k.mem.content[dst[i]])}, its source "
              f"(pfn {int(src[i]):#x}) {int(want[i])}")


def check_page_table_check(k: Kernel, pte_maps: np.ndarray, entire: np.ndarray, live: np.ndarray) -> None:
    """Rule 12: page_table_check's counters against the mappings the page tables hold.

    ``pte_maps``: PTE mappings per pfn; ``entire``: PMD mappings per folio (the
    huge zero folio excluded); ``live``: the live folio ids; all as
    check_kernel() found them (which also made sure that only frames of
    folios are mapped).  Pages of anon folios count as anon, the others as file.
    """
    f, ptc = k.folios, k.ptc
    anon_maps = pte_maps.copy()
    for fid in live[entire[live] > 0].tolist():
        head = int(f.head[fid])
        anon_maps[head: head + (1 << int(f.order[fid]))] += entire[fid]
    file_maps = None
    for fid in live[(f.flags[live] & (PG_ANON | PG_HUGE_ZERO)) == 0].tolist():   # rare: no such folio is mapped
        head = int(f.head[fid])
        sl = slice(head, head + (1 << int(f.order[fid])))
        if file_maps is None:
            file_maps = np.zeros_like(anon_maps)
        file_maps[sl] = anon_maps[sl]
        anon_maps[sl] = 0
    for name, counts, expected in (("anon_map_count", ptc.anon_map_count, anon_maps),
                                   ("file_map_count", ptc.file_map_count, file_maps)):
        if expected is None:
            if not counts.any():
                continue
            expected = np.zeros_like(anon_maps)
        elif np.array_equal(counts, expected):
            continue
        pfn = int(np.flatnonzero(counts != expected)[0])
        _fail(f"page_table_check: pfn {pfn:#x}: {name}={int(counts[pfn])} but the page tables map it "
              f"{int(expected[pfn])} time(s) as {'an anon' if name[0] == 'a' else 'a file'} page")
