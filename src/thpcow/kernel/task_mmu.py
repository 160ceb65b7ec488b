"""Model of fs/proc/task_mmu.c and fs/proc/page.c: smaps, smaps_rollup, pagemap, kpageflags.

The text has the kernel's field names, order and widths, so the lab's smaps
parser reads both.  Pss is accumulated with the kernel's PSS_SHIFT precision.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .constants import HPAGE_PMD_NR, HPAGE_PMD_SIZE, PAGE_SIZE, PHYS_PFN
from .folio import PG_ANON, PG_DIRTY, PG_HUGE_ZERO, PG_SWAPBACKED, PG_REFERENCED, PG_SWAPCACHE, PG_LRU
from .mm import (
    MM, PMD_LEAF, PMD_TABLE, VMA, _PAGE_ACCESSED, _PAGE_DIRTY, _PAGE_HWPOISON, _PAGE_SPECIAL, swp_offset,
    vpn_pte_index,
)

# Swap type of hwpoison entries in pagemap's low 5 bits.  Simplification: the
# kernel's SWP_HWPOISON number depends on the config (MAX_SWAPFILES + ...); the
# simulator uses the top value and keeps no offset.
SWP_HWPOISON_TYPE = 0x1F
MAX_SWAPFILES_SHIFT = 5       # pagemap puts a swap entry's offset above its 5-bit type
from .page_alloc import ZERO_PFN
from .pgtable import pte_guard_mask
from . import huge_memory as hm

if TYPE_CHECKING:
    from .kernel import Kernel

PSS_SHIFT = 12
SMAPS_FIELDS = ("Rss", "Pss", "Pss_Dirty", "Shared_Clean", "Shared_Dirty", "Private_Clean",
                "Private_Dirty", "Referenced", "Anonymous", "KSM", "LazyFree", "AnonHugePages",
                "ShmemPmdMapped", "FilePmdMapped", "Shared_Hugetlb", "Private_Hugetlb", "Swap",
                "SwapPss", "Locked")
ROLLUP_EXTRA = ("Pss_Anon", "Pss_File", "Pss_Shmem")

# pagemap bits (fs/proc/task_mmu.c)
PM_PFRAME_MASK = (1 << 55) - 1
PM_SOFT_DIRTY = 1 << 55
PM_MMAP_EXCLUSIVE = 1 << 56
PM_UFFD_WP = 1 << 57
PM_GUARD_REGION = 1 << 58
PM_FILE = 1 << 61
PM_SWAP = 1 << 62
PM_PRESENT = 1 << 63

# kpageflags bit numbers (include/uapi/linux/kernel-page-flags.h)
KPF_REFERENCED, KPF_DIRTY, KPF_LRU, KPF_MMAP, KPF_ANON, KPF_SWAPCACHE, KPF_SWAPBACKED = 2, 4, 5, 11, 12, 13, 14
KPF_COMPOUND_HEAD, KPF_COMPOUND_TAIL, KPF_THP, KPF_ZERO_PAGE, KPF_BUDDY, KPF_NOPAGE = 15, 16, 22, 24, 10, 20


class MemSize:
    """Model of struct mem_size_stats (byte counters, Pss with PSS_SHIFT)."""

    def __init__(self) -> None:
        self.v = dict.fromkeys(SMAPS_FIELDS + ROLLUP_EXTRA, 0)

    def add(self, other: "MemSize") -> None:
        for key, val in other.v.items():
            self.v[key] += val


def _accumulate_pages(k: Kernel, mss: MemSize, pfns: np.ndarray, fids: np.ndarray, entry_dirty: np.ndarray,
                      entry_young: np.ndarray, extra_mapcount: np.ndarray) -> None:
    """Model of smaps_account() for a run of 4 KiB pages (PTE-mapped or one PMD's pages).

    Referenced: the page's entry is young (a young PMD counts its whole
    folio), or the folio has PG_referenced; folio_test_young() (PG_young, set
    only by idle-page tracking and DAMON) is never set in the simulator.
    """
    f = k.folios
    v = mss.v
    n = len(pfns)
    if not n:
        return
    fflags = f.flags[fids]
    anon = (fflags & PG_ANON).astype(bool)
    folio_dirty = (fflags & PG_DIRTY).astype(bool)
    dirty = entry_dirty | folio_dirty
    v["Rss"] += n * PAGE_SIZE
    v["Anonymous"] += int(np.count_nonzero(anon)) * PAGE_SIZE
    lazy = anon & ~(fflags & PG_SWAPBACKED).astype(bool) & ~dirty
    v["LazyFree"] += int(np.count_nonzero(lazy)) * PAGE_SIZE
    young = entry_young | (fflags & PG_REFERENCED).astype(bool)
    v["Referenced"] += int(np.count_nonzero(young)) * PAGE_SIZE
    exclusive_ref = f.refcount[fids] == 1
    mapcount = k.mem.mapcount[pfns] + extra_mapcount
    private = exclusive_ref | (mapcount < 2)
    pss = np.where(private, PAGE_SIZE << PSS_SHIFT,
                   (PAGE_SIZE << PSS_SHIFT) // np.maximum(mapcount, 1)).astype(np.int64)
    v["Pss"] += int(pss.sum())
    v["Pss_Anon"] += int(pss[anon].sum())
    v["Pss_Dirty"] += int(pss[dirty].sum())
    v["Private_Dirty"] += int(np.count_nonzero(private & dirty)) * PAGE_SIZE
    v["Shared_Dirty"] += int(np.count_nonzero(~private & dirty)) * PAGE_SIZE
    v["Private_Clean"] += int(np.count_nonzero(private & ~dirty)) * PAGE_SIZE
    v["Shared_Clean"] += int(np.count_nonzero(~private & ~dirty)) * PAGE_SIZE


def smap_gather_stats(k: Kernel, mm: MM, vma: VMA) -> MemSize:
    """Model of smap_gather_stats(): walk one VMA's page tables."""
    mss = MemSize()
    pt = mm.pt
    f = k.folios
    for s, base, lo, hi in pt.spans_in(vma.start, vma.end):
        kind = pt.pmd_kind[s]
        if kind == PMD_LEAF:
            fid = int(pt.pmd_folio[s])
            if f.flags[fid] & PG_HUGE_ZERO:
                continue                                   # special: not counted
            head = int(f.head[fid])
            pfns = np.arange(head, head + HPAGE_PMD_NR)
            flags = pt.pmd_flags[s]
            ones = np.ones(HPAGE_PMD_NR, dtype=bool)
            _accumulate_pages(k, mss, pfns, np.full(HPAGE_PMD_NR, fid), ones & bool(flags & _PAGE_DIRTY),
                              ones & bool(flags & _PAGE_ACCESSED), np.full(HPAGE_PMD_NR, int(f.entire[fid])))
            if f.flags[fid] & PG_ANON:
                mss.v["AnonHugePages"] += HPAGE_PMD_SIZE
            continue
        if kind != PMD_TABLE:
            continue
        row = int(pt.pmd_row[s])
        a, b = PHYS_PFN(lo - base), PHYS_PFN(hi - base)
        pfns = pt.pte_pfn[row, a:b]
        flags = pt.pte_flags[row, a:b]
        normal = (pfns >= 0) & ~(flags & _PAGE_SPECIAL).astype(bool)
        swp = pfns <= -2
        if swp.any():                                   # smaps_pte_entry(): swap entries
            counts = k.swap.swap_map[swp_offset(pfns[swp])]
            mss.v["Swap"] += int(np.count_nonzero(swp)) * PAGE_SIZE
            mss.v["SwapPss"] += int(((PAGE_SIZE << PSS_SHIFT) // np.maximum(counts, 1)).sum())
        p = pfns[normal]
        fl = flags[normal]
        fids = k.mem.folio[p]
        _accumulate_pages(k, mss, p, fids, (fl & _PAGE_DIRTY).astype(bool), (fl & _PAGE_ACCESSED).astype(bool),
                          f.entire[fids])
    return mss


def thp_eligible(k: Kernel, mm: MM, vma: VMA) -> int:
    """THPeligible: any anon order allowed for smaps (size-at-end checked)."""
    return int(bool(hm.thp_vma_allowable_orders(k, mm, vma, hm.TVA_SMAPS)))


def _header(start: int, end: int, perms: str) -> str:
    return f"{start:08x}-{end:08x} {perms} 00000000 00:00 0 "


def _kb(name: str, val: int) -> int:
    """One smaps field in kB (the Pss fields carry PSS_SHIFT extra bits of precision)."""
    return val >> (10 + PSS_SHIFT) if name.startswith("Pss") or name == "SwapPss" else val >> 10


def _kb_lines(mss: MemSize, rollup: bool) -> list[str]:
    v = mss.v
    out = []
    names = list(SMAPS_FIELDS)
    if rollup:
        names[3:3] = ROLLUP_EXTRA
    for name in names:
        val = v[name]
        out.append(f"{name + ':':<16}{_kb(name, val):>8} kB")
    return out


def show_smaps(k: Kernel, mm: MM) -> str:
    """/proc/PID/smaps text."""
    lines = []
    for vma in mm.vmas:
        mss = smap_gather_stats(k, mm, vma)
        lines.append(_header(vma.start, vma.end, vma.perms()))
        lines.append(f"{'Size:':<16}{vma.length >> 10:>8} kB")
        lines.append(f"{'KernelPageSize:':<16}{4:>8} kB")
        lines.append(f"{'MMUPageSize:':<16}{4:>8} kB")
        lines.extend(_kb_lines(mss, rollup=False))
        lines.append(f"{'THPeligible:':<16}{thp_eligible(k, mm, vma):>8}")
        lines.append(f"VmFlags: {vma.mnemonics()} ")
    return "".join(line + "\n" for line in lines)


def show_smaps_rollup(k: Kernel, mm: MM) -> str:
    """/proc/PID/smaps_rollup text."""
    total = MemSize()
    for vma in mm.vmas:
        total.add(smap_gather_stats(k, mm, vma))
    if mm.vmas:
        head = _header(mm.vmas[0].start, mm.vmas[-1].end, "---p").ljust(72) + " [rollup]"
    else:
        head = _header(0, 0, "---p").ljust(72) + " [rollup]"
    return "".join(line + "\n" for line in [head] + _kb_lines(total, rollup=True))


def smaps_fields(k: Kernel, mm: MM, addr: int | None) -> dict[str, int]:
    """The smaps figures in kB: of the VMA holding addr, or summed over all VMAs."""
    total = MemSize()
    vmas = mm.vmas if addr is None else [v for v in mm.vmas if v.contains(addr)]
    for vma in vmas:
        total.add(smap_gather_stats(k, mm, vma))
    out = {}
    for name, val in total.v.items():
        out[name] = _kb(name, val)
    return out


# -- pagemap ---------------------------------------------------------------------------------------------
def pagemap_read(k: Kernel, mm: MM, addr: int, npages: int) -> np.ndarray:
    """Model of pagemap_read() for a reader with CAP_SYS_ADMIN: one u64 per page.

    PM_MMAP_EXCLUSIVE follows CONFIG_PAGE_MAPCOUNT (the 6.18 kernel modelled):
    a present page is exclusive when its precise mapcount (its PTE mapcount
    plus the folio's entire mapcount) is 1, page by page.  A PMD leaf reports
    the head page's answer for every page it maps (pagemap_pmd_range_thp()
    looks at the head page only); the huge zero folio is never rmapped
    (mapcount 0), so its pages are not exclusive, and being no anon folio they
    carry PM_FILE.  A zero-page PTE has no normal page: present, nothing else.
    A guard marker is a swap-type entry with PM_GUARD_REGION.
    """
    out = np.zeros(npages, dtype=np.uint64)
    if npages <= 0:
        return out
    pt = mm.pt
    f = k.folios
    mem = k.mem
    vpages = PHYS_PFN(addr) + np.arange(npages, dtype=np.int64)
    sc, kind = pt.pmd_entries(vpages)
    cols = vpn_pte_index(vpages)
    leaf = np.flatnonzero(kind == PMD_LEAF)
    if len(leaf):                                       # pagemap_pmd_range_thp()
        fids = pt.pmd_folio[sc[leaf]]
        heads = f.head[fids]
        fflags = f.flags[fids]
        val = PM_PRESENT | (heads + cols[leaf]).astype(np.uint64)
        val |= np.where(fflags & PG_ANON, 0, PM_FILE).astype(np.uint64)
        excl = (mem.mapcount[heads] + f.entire[fids] == 1) & ~(fflags & PG_HUGE_ZERO).astype(bool)
        val |= np.where(excl, PM_MMAP_EXCLUSIVE, 0).astype(np.uint64)
        out[leaf] = val
    tab = np.flatnonzero(kind == PMD_TABLE)
    if len(tab):                                        # pte_to_pagemap_entry()
        rows = pt.pmd_row[sc[tab]]
        pfn = pt.pte_pfn[rows, cols[tab]]
        fl = pt.pte_flags[rows, cols[tab]]
        val = np.zeros(len(tab), dtype=np.uint64)
        swp = pfn <= -2                                 # swap: type 0, then the offset
        val[swp] = PM_SWAP | (swp_offset(pfn[swp]).astype(np.uint64) << np.uint64(MAX_SWAPFILES_SHIFT))
        hwp = (pfn == -1) & (fl & _PAGE_HWPOISON).astype(bool)
        val[hwp] = PM_SWAP | SWP_HWPOISON_TYPE          # a hwpoison swap-type entry
        guard = pte_guard_mask(pfn, fl)
        val[guard] = PM_SWAP | PM_GUARD_REGION          # a guard marker: a swap-type entry, PM_GUARD_REGION
        present = pfn >= 0
        val[present] = PM_PRESENT | pfn[present].astype(np.uint64)
        normal = np.flatnonzero(present & ~(fl & _PAGE_SPECIAL).astype(bool))
        if len(normal):
            p = pfn[normal]
            fids = mem.folio[p]
            val[normal] |= np.where(f.flags[fids] & PG_ANON, 0, PM_FILE).astype(np.uint64)
            excl = mem.mapcount[p] + f.entire[fids] == 1     # folio_precise_page_mapcount() == 1
            val[normal] |= np.where(excl, PM_MMAP_EXCLUSIVE, 0).astype(np.uint64)
        out[tab] = val
    return out


def kpageflags(k: Kernel, pfns) -> np.ndarray:
    """Model of stable_page_flags() for the modelled flags."""
    pfns = np.asarray(pfns, dtype=np.int64)
    out = np.zeros(len(pfns), dtype=np.uint64)
    f = k.folios
    for i, pfn in enumerate(pfns.tolist()):
        fid = int(k.mem.folio[pfn])
        if pfn == ZERO_PFN:
            out[i] = 1 << KPF_ZERO_PAGE
            continue
        if fid < 0:
            out[i] = (1 << KPF_BUDDY) if k.mem.free_order[pfn] >= 0 else 0
            continue
        fl = int(f.flags[fid])
        order = int(f.order[fid])
        bits = 0
        if fl & PG_HUGE_ZERO:
            bits |= (1 << KPF_ZERO_PAGE) | (1 << KPF_THP)
        else:
            if k.mem.mapcount[pfn] or f.entire[fid]:
                bits |= 1 << KPF_MMAP
            if fl & PG_ANON:
                bits |= 1 << KPF_ANON
            if fl & PG_REFERENCED:
                bits |= 1 << KPF_REFERENCED
            if fl & PG_DIRTY:
                bits |= 1 << KPF_DIRTY
            if fl & PG_LRU:
                bits |= 1 << KPF_LRU
            if fl & PG_SWAPBACKED:
                bits |= 1 << KPF_SWAPBACKED
                if fl & PG_SWAPCACHE:
                    bits |= 1 << KPF_SWAPCACHE
            if order:
                bits |= 1 << KPF_THP
        if order:
            bits |= 1 << (KPF_COMPOUND_HEAD if pfn == int(f.head[fid]) else KPF_COMPOUND_TAIL)
        out[i] = bits
    return out


def kpagecount(k: Kernel, pfns) -> np.ndarray:
    """Model of /proc/kpagecount: the precise page mapcount (PTE + entire)."""
    pfns = np.asarray(pfns, dtype=np.int64)
    fids = k.mem.folio[pfns]
    entire = np.where(fids >= 0, k.folios.entire[np.maximum(fids, 0)], 0)
    return (k.mem.mapcount[pfns] + entire).astype(np.int64)
