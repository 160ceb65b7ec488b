"""Model of mm/huge_memory.c: PMD-mapped THPs (v6.18).

Faults (``do_huge_pmd_anonymous_page``, ``do_huge_pmd_wp_page``), fork
(``copy_huge_pmd``), unmapping (``zap_huge_pmd``), splitting a PMD mapping
(``split_huge_pmd``) and splitting a folio (``split_folio``), the deferred
split shrinker (``deferred_split_scan``), plus the eligibility helpers
(``thp_vma_allowable_orders``).
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

import numpy as np

from .constants import (
    ALIGN_DOWN, HPAGE_PMD_MASK, HPAGE_PMD_NR, HPAGE_PMD_ORDER, HPAGE_PMD_SIZE, IS_ALIGNED, PAGE_SIZE, PFN_PHYS,
    VM_HUGEPAGE, VM_LOCKED, VM_NOHUGEPAGE, VM_THP_COW, VM_WRITE,
)
from .folio import PG_ANON, PG_DIRTY, PG_HUGE_ZERO, PG_PARTIALLY_MAPPED, PG_REFERENCED, PG_SWAPCACHE
from .memory import (
    FAULT_FLAG_UNSHARE, FAULT_FLAG_WRITE, VM_FAULT_FALLBACK, VM_FAULT_OK, VmFault, anon_vma_prepare, copy_user_large_folio,
)
from .mm import (
    MM, PMD_LEAF, PTE_ZERO, VMA, _PAGE_ACCESSED, _PAGE_DIRTY, _PAGE_PRESENT,
    _PAGE_RW, _PAGE_SOFT_DIRTY, _PAGE_SPECIAL, pmd_index,
)
from .page_alloc import GFP_TRANSHUGE, GFP_TRANSHUGE_LIGHT, PG_ANON_EXCLUSIVE, PG_HWPOISON, ZERO_PFN, Gfp, alloc_thp
from .swap import folio_add_lru
from . import pgtable, rmap

if TYPE_CHECKING:
    from .kernel import Kernel

ALL_ANON_ORDERS = sum(1 << o for o in range(2, HPAGE_PMD_ORDER + 1))


class TvaType(enum.Enum):
    """Model of enum tva_type: who asks thp_vma_allowable_orders().

    The values are the strings thpcow used before, which
    thp_vma_allowable_orders() still accepts.
    """

    TVA_SMAPS = "smaps"                        # /proc/PID/smaps' THPeligible
    TVA_PAGEFAULT = "pagefault"                # the fault path
    TVA_KHUGEPAGED = "khugepaged"              # the khugepaged daemon
    TVA_FORCED_COLLAPSE = "forced_collapse"    # MADV_COLLAPSE


TVA_SMAPS = TvaType.TVA_SMAPS
TVA_PAGEFAULT = TvaType.TVA_PAGEFAULT
TVA_KHUGEPAGED = TvaType.TVA_KHUGEPAGED
TVA_FORCED_COLLAPSE = TvaType.TVA_FORCED_COLLAPSE


# -- eligibility ----------------------------------------------------------------------
def vma_thp_disabled(mm: MM, vma: VMA, forced_collapse: bool) -> bool:
    """Model of vma_thp_disabled(): VM_NOHUGEPAGE and PR_SET_THP_DISABLE."""
    if vma.flags & VM_NOHUGEPAGE:
        return True
    if mm.thp_disable & 1 and not mm.thp_disable & 2:
        return True                                  # MMF_DISABLE_THP_COMPLETELY
    if mm.thp_disable & 2 and not vma.flags & VM_HUGEPAGE and not forced_collapse:
        return True                                  # MMF_DISABLE_THP_EXCEPT_ADVISED
    return False


def thp_vma_suitable_orders(vma: VMA, addr: int, orders: int) -> int:
    """Model of thp_vma_suitable_orders(): keep orders whose aligned block around addr fits."""
    out = 0
    o = orders
    while o:
        order = o.bit_length() - 1
        o &= ~(1 << order)
        size = PAGE_SIZE << order
        haddr = ALIGN_DOWN(addr, size)
        if haddr >= vma.start and haddr + size <= vma.end:
            out |= 1 << order
    return out


def thp_vma_allowable_orders(k: Kernel, mm: MM, vma: VMA, tva: TvaType, orders: int = ALL_ANON_ORDERS) -> int:
    """Model of thp_vma_allowable_orders()/__thp_vma_allowable_orders() for anon VMAs.

    Guard clauses in the kernel's order: the VMA or the mm disabled THP; the
    sysfs mask (skipped by MADV_COLLAPSE); khugepaged and collapse need an
    anon_vma; non-fault users need the order to fit at the end of the VMA.
    ``tva`` may also be a :class:`TvaType` value ("pagefault", ...).
    """
    if tva.__class__ is not TvaType:
        tva = TvaType(tva)
    forced = tva is TVA_FORCED_COLLAPSE
    if not k.thp_supported:
        return 0
    if vma_thp_disabled(mm, vma, forced):
        return 0
    if not forced:
        orders &= k.sysfs_orders(bool(vma.flags & VM_HUGEPAGE))
    if not orders:
        return 0
    if (tva is TVA_KHUGEPAGED or forced) and not vma.anon_vma:
        return 0
    if tva is not TVA_PAGEFAULT:
        # The highest order whose block ending at vm_end fits, and every lower one.
        o = orders
        while o:
            order = o.bit_length() - 1
            if thp_vma_suitable_orders(vma, vma.end - (PAGE_SIZE << order), 1 << order):
                break
            o &= ~(1 << order)
        orders = o
    return orders


def thp_vma_allowable_order(k: Kernel, mm: MM, vma: VMA, order: int, tva: TvaType) -> bool:
    return bool(thp_vma_allowable_orders(k, mm, vma, tva, 1 << order))


# The masks vma_thp_gfp_mask() returns (combined once: IntFlag operations are slow).
_GFP_LIGHT_KSWAPD = GFP_TRANSHUGE_LIGHT | Gfp.KSWAPD_RECLAIM
_GFP_LIGHT_DIRECT = GFP_TRANSHUGE_LIGHT | Gfp.DIRECT_RECLAIM


def vma_thp_gfp_mask(k: Kernel, vma: VMA) -> Gfp:
    """Model of vma_thp_gfp_mask(): stall, defer to kcompactd, or just fall back.

    always: direct reclaim for everyone (NORETRY outside MADV_HUGEPAGE
    regions, not modelled); defer: wake kswapd/kcompactd, never stall;
    defer+madvise: direct in MADV_HUGEPAGE regions, wake kswapd/kcompactd
    elsewhere; madvise: direct in MADV_HUGEPAGE regions, nothing elsewhere;
    never: nothing.
    """
    mode = k.sysfs.defrag
    advised = bool(vma.flags & VM_HUGEPAGE)
    if mode == "always":
        return GFP_TRANSHUGE
    if mode == "defer":
        return _GFP_LIGHT_KSWAPD
    if mode == "defer+madvise":
        return _GFP_LIGHT_DIRECT if advised else _GFP_LIGHT_KSWAPD
    if mode == "madvise":
        return _GFP_LIGHT_DIRECT if advised else GFP_TRANSHUGE_LIGHT
    return GFP_TRANSHUGE_LIGHT


def vma_alloc_anon_folio_pmd(k: Kernel, vma: VMA) -> int:
    """Model of vma_alloc_anon_folio_pmd(): an order-9 folio, or -1 with fallback counted."""
    pfn = alloc_thp(k, vma_thp_gfp_mask(k, vma))
    if pfn < 0:
        k.vmstat.count_vm_event("thp_fault_fallback")
        k.vmstat.count_mthp_stat(HPAGE_PMD_ORDER, "anon_fault_fallback")
        return -1
    k.mem.content[pfn: pfn + HPAGE_PMD_NR] = 0           # folio_zero_user()
    k.vmstat.count_vm_event("sim_zero_bytes", HPAGE_PMD_SIZE)
    return k.new_folio(pfn, HPAGE_PMD_ORDER)


# -- mapping a new THP ---------------------------------------------------------------------
def map_anon_folio_pmd_nopf(k: Kernel, fid: int, vmf: VmFault, cow: bool = False) -> None:
    """Model of map_anon_folio_pmd_nopf(): install a fresh exclusive THP at PMD level.

    The PMD is dirty, young and writable if the VMA is; the folio gets its
    first (exclusive) rmap, goes on the LRU and, when shrink_underused is on,
    on the deferred split queue as not partially mapped.

    series thp_cow v1 4/5: the PMD, the VMA and the address come from the
    ``vm_fault`` (upstream passes them one by one), and a COW copy made for
    an unshare fault (``cow`` with FAULT_FLAG_UNSHARE) is mapped read-only
    and clean, keeping the old PMD's soft-dirty bit.
    """
    mm, vma, s = vmf.mm, vmf.vma, vmf.pmd
    pt = mm.pt
    k.folios.refcount[fid] = 1
    rmap.folio_add_new_anon_rmap(k, fid, mm, pmd=True)
    if cow and vmf.flags & FAULT_FLAG_UNSHARE:
        flags = _PAGE_PRESENT | _PAGE_ACCESSED | (vmf.orig_pmd & _PAGE_SOFT_DIRTY)
    else:
        flags = _PAGE_PRESENT | _PAGE_DIRTY | _PAGE_ACCESSED | (_PAGE_RW if vma.flags & VM_WRITE else 0)
    pgtable.set_pmd_at(k, mm, s, fid, flags)
    head = int(k.folios.head[fid])
    k.mem.vpn[head: head + HPAGE_PMD_NR] = int(pt.pmd_index[s]) * HPAGE_PMD_NR + np.arange(HPAGE_PMD_NR)
    rmap.deferred_split_folio(k, fid, partially_mapped=False)


def map_anon_folio_pmd_pf(k: Kernel, fid: int, vmf: VmFault, cow: bool = False) -> None:
    """Model of map_anon_folio_pmd_pf(): map_anon_folio_pmd_nopf() plus MM_ANONPAGES and the fault counters."""
    map_anon_folio_pmd_nopf(k, fid, vmf, cow)
    vmf.mm.rss_anon += HPAGE_PMD_NR
    k.vmstat.count_vm_event("thp_fault_alloc")
    k.vmstat.count_mthp_stat(HPAGE_PMD_ORDER, "anon_fault_alloc")


def _install_deposit(mm: MM) -> None:
    """pgtable_trans_huge_deposit(): a PMD leaf keeps a spare PTE table."""
    mm.nr_ptes += 1


def mm_get_huge_zero_folio(k: Kernel, mm: MM) -> int:
    """Model of mm_get_huge_zero_folio(): the huge zero folio, allocated on first use."""
    if k.huge_zero_fid < 0:
        pfn = k.mem.alloc(HPAGE_PMD_ORDER)
        if pfn < 0:
            k.vmstat.count_vm_event("thp_zero_page_alloc_failed")
            return -1
        k.mem.content[pfn: pfn + HPAGE_PMD_NR] = 0
        k.vmstat.count_vm_event("sim_zero_bytes", HPAGE_PMD_SIZE)
        fid = k.new_folio(pfn, HPAGE_PMD_ORDER)
        k.folios.flags[fid] = PG_HUGE_ZERO
        k.folios.refcount[fid] = 1
        k.huge_zero_fid = fid
        k.vmstat.count_vm_event("thp_zero_page_alloc")
    mm.huge_zero = True
    return k.huge_zero_fid


def do_huge_pmd_anonymous_page(k: Kernel, vmf: VmFault) -> int:
    """Model of do_huge_pmd_anonymous_page().

    Falls back (no counter) when the aligned 2 MiB is not inside the VMA; a
    read maps the huge zero page when use_zero_page allows; a write allocates
    a THP with the defrag semantics, counting thp_fault_fallback on failure.
    """
    mm, vma, s = vmf.mm, vmf.vma, vmf.pmd
    haddr = vmf.address & HPAGE_PMD_MASK
    if haddr < vma.start or haddr + HPAGE_PMD_SIZE > vma.end:
        return VM_FAULT_FALLBACK
    from .khugepaged import khugepaged_enter_vma
    anon_vma_prepare(k, vma, mm)
    khugepaged_enter_vma(k, mm, vma)
    if not vmf.flags & FAULT_FLAG_WRITE and k.sysfs.use_zero_page:
        zfid = mm_get_huge_zero_folio(k, mm)
        if zfid < 0:
            k.vmstat.count_vm_event("thp_fault_fallback")
            return VM_FAULT_FALLBACK
        pgtable.set_pmd_at(k, mm, s, zfid, pgtable.PMD_HUGE_ZERO)      # set_huge_zero_folio(): young (vm_page_prot)
        _install_deposit(mm)
        return VM_FAULT_OK
    fid = vma_alloc_anon_folio_pmd(k, vma)
    if fid < 0:
        return VM_FAULT_FALLBACK
    map_anon_folio_pmd_pf(k, fid, vmf, False)
    _install_deposit(mm)
    return VM_FAULT_OK


# -- write-protect fault on a PMD ------------------------------------------------------------
def do_huge_zero_wp_pmd(k: Kernel, vmf: VmFault) -> int:
    """Model of do_huge_zero_wp_pmd(): replace the huge zero PMD with a fresh THP, or split."""
    fid = vma_alloc_anon_folio_pmd(k, vmf.vma)
    if fid < 0:
        split_huge_pmd(k, vmf.mm, vmf.vma, vmf.pmd)
        return VM_FAULT_FALLBACK
    pgtable.pmdp_huge_get_and_clear(k, vmf.mm, vmf.pmd)   # pmdp_huge_clear_flush(); the deposit stays
    base = vmf.address & HPAGE_PMD_MASK
    k.flush_tlb_range(vmf.mm, base, base + HPAGE_PMD_SIZE)
    map_anon_folio_pmd_pf(k, fid, vmf, True)
    return VM_FAULT_OK


def do_huge_pmd_wp_page(k: Kernel, vmf: VmFault) -> int:
    """Model of do_huge_pmd_wp_page(): a write (or unshare) fault on a read-only PMD leaf.

    In order: the huge zero PMD takes do_huge_zero_wp_pmd(); an
    AnonExclusive head is reused; a folio whose only reference is this PMD
    becomes exclusive and is reused.  A shared folio is copied whole when the
    kernel build says so (the series: hugepage_cow_enabled()); otherwise, or
    when no THP can be had for the copy, the build's fallback runs: upstream
    splits this VMA's PMD and returns FALLBACK, so the same fault copies one
    4 KiB page at PTE level.  The work is done by do_huge_pmd_wp_pages(),
    which the batched store path calls with a round of such faults.
    """
    ret = do_huge_pmd_wp_pages(k, vmf.mm, np.array([vmf.pmd], dtype=np.int64), [vmf.address], vmf.flags,
                               [vmf.vma], [vmf.orig_pmd])
    return int(ret[0])


def do_huge_pmd_wp_pages(k: Kernel, mm: MM, slots: np.ndarray, addrs, flags: int = FAULT_FLAG_WRITE,
                         vmas: list[VMA] | None = None, orig_pmds=None) -> np.ndarray:
    """do_huge_pmd_wp_page() for faults on distinct read-only PMD leaves of one mm, in order.

    The one decision path of the scalar and the batched fault paths (the
    scalar path hands one fault).  The tests on the folios are made for all
    faults at once, and the faults that reuse their PMD do so together; each
    huge zero PMD and each shared folio then takes its branch, and the
    build's judgement, one by one in fault order.  ``vmas``: each fault's VMA
    (looked up when None); ``orig_pmds``: each fault's vmf->orig_pmd (the
    PMD flags now when None).  Returns each fault's VM_FAULT_* code.
    """
    pt = mm.pt
    f = k.folios
    fids = pt.pmd_folio[slots]
    heads = f.head[fids]
    zero = (f.flags[fids] & PG_HUGE_ZERO).astype(bool)
    exclusive = ~zero & (k.mem.pflags[heads] & PG_ANON_EXCLUSIVE).astype(bool)
    sole = ~zero & ~exclusive & (f.refcount[fids] == 1)
    k.mem.pflags[heads[sole]] |= PG_ANON_EXCLUSIVE        # folio_move_anon_rmap()
    reuse = exclusive | sole
    if vmas is None:
        vmas = mm.find_vmas(addrs)
    if reuse.any() and not flags & FAULT_FLAG_UNSHARE:
        _huge_pmd_reuse(k, mm, slots[reuse], [v for v, r in zip(vmas, reuse.tolist()) if r])
    ret = np.full(len(slots), VM_FAULT_OK, dtype=np.int64)
    for i in np.flatnonzero(~reuse).tolist():
        s, addr, vma = int(slots[i]), int(addrs[i]), vmas[i]
        orig = int(pt.pmd_flags[s] if orig_pmds is None else orig_pmds[i])
        vmf = VmFault(mm, vma, addr, flags, pmd=s, orig_pmd=orig)
        if zero[i]:
            ret[i] = do_huge_zero_wp_pmd(k, vmf)
            continue
        if k.build.pmd_cow_copy(k, mm, vma):               # series thp_cow v1 5/5: hugepage_cow_enabled()
            ret[i] = wp_huge_pmd_page_copy(k, vmf)
            if ret[i] != VM_FAULT_FALLBACK:
                continue
        ret[i] = k.build.huge_pmd_wp_fallback(k, mm, vma, addr, s)
    return ret


# -- the 2026 series "mm: Support selecting doing direct COW for anonymous pmd entry" ------------
def hugepage_cow_enabled(k: Kernel, mm: MM, vma: VMA) -> bool:
    """Model of hugepage_cow_enabled() (series thp_cow v1 3/5): copy this PMD whole?

    False on a kernel without the series.  As posted (v1): the global
    ``enabled`` knob must allow THP for the VMA (always, or madvise with
    VM_HUGEPAGE); then ``thp_cow=always`` says yes, and ``thp_cow=madvise``
    says yes for VMAs with VM_THP_COW.  It ignores ``hugepages-2048kB/enabled``,
    VM_NOHUGEPAGE (with enabled=always) and PR_SET_THP_DISABLE.  The series
    as meant replaces the first test by thp_vma_allowable_order(PMD_ORDER,
    page fault), which honours them all.
    """
    series = k.build.series
    if series is None:
        return False
    sysfs = k.sysfs
    mode = sysfs.thp_cow
    if mode == "never":                 # decided by the knob alone (the tests below have no side effects)
        return False
    if series == "meant":
        if not thp_vma_allowable_order(k, mm, vma, HPAGE_PMD_ORDER, TVA_PAGEFAULT):
            return False
    elif not sysfs.global_allows(vma.flags & VM_HUGEPAGE):
        return False
    if mode == "always":
        return True
    return mode == "madvise" and bool(vma.flags & VM_THP_COW)


def wp_huge_pmd_page_copy(k: Kernel, vmf: VmFault) -> int:
    """Model of wp_huge_pmd_page_copy() (series thp_cow v1 5/5): copy a shared THP whole.

    Allocates a THP with the defrag semantics (on failure
    vma_alloc_anon_folio_pmd() counts thp_fault_fallback and
    anon_fault_fallback, and FALLBACK sends do_huge_pmd_wp_page() to its
    split), copies 2 MiB, clears the old PMD, maps the copy writable and
    exclusive (read-only and clean for an unshare fault) and drops the old
    folio's PMD mapping and reference.  The deposited table stays: nr_ptes
    is unchanged.  Counts thp_fault_alloc and anon_fault_alloc[2048kB].
    """
    mm, vma, s = vmf.mm, vmf.vma, vmf.pmd
    pt = mm.pt
    old = int(pt.pmd_folio[s])
    anon_vma_prepare(k, vma, mm)                           # vmf_anon_prepare()
    new = vma_alloc_anon_folio_pmd(k, vma)
    if new < 0:
        return VM_FAULT_FALLBACK
    f = k.folios
    src, dst = int(f.head[old]), int(f.head[new])
    copy_user_large_folio(k, np.arange(dst, dst + HPAGE_PMD_NR), np.arange(src, src + HPAGE_PMD_NR))
    base = int(pt.pmd_index[s]) * HPAGE_PMD_SIZE
    _, flags = pgtable.pmdp_huge_get_and_clear(k, mm, s)  # pmdp_huge_clear_flush(); the deposit stays
    k.flush_tlb_range(mm, base, base + HPAGE_PMD_SIZE)
    if flags & _PAGE_DIRTY:
        f.flags[old] |= PG_DIRTY
    mm.rss_anon -= HPAGE_PMD_NR
    map_anon_folio_pmd_pf(k, new, vmf, True)
    rmap.folio_remove_rmap_pmd(k, old, mm)
    rmap.folio_put(k, old)
    k.vmstat.count_vm_event("sim_huge_cow")
    k.vmstat.count_vm_event("sim_cow_bytes", HPAGE_PMD_SIZE)
    return VM_FAULT_OK


def _huge_pmd_reuse(k: Kernel, mm: MM, slots: np.ndarray, vmas: list[VMA]) -> None:
    """The reuse label of do_huge_pmd_wp_page() for write faults: young, dirty, writable if VM_WRITE."""
    writable = np.array([bool(v.flags & VM_WRITE) for v in vmas])
    for w in (True, False):
        sel = writable == w
        if sel.any():
            pgtable.pmdp_set_access_flags(k, mm, slots[sel], _PAGE_ACCESSED | _PAGE_DIRTY | (_PAGE_RW if w else 0))


# -- fork and zap ---------------------------------------------------------------------------
def copy_huge_pmd(k: Kernel, dst: MM, src: MM, vma: VMA, s: int) -> None:
    """Model of copy_huge_pmd(): share a PMD-mapped THP (or the huge zero PMD) with the child.

    Simplification: no GUP pins, so the pinned case (split the parent's PMD
    and copy for the child) never happens.
    """
    spt, dpt = src.pt, dst.pt
    d = dpt.slot(int(spt.pmd_index[s]))
    fid = int(spt.pmd_folio[s])
    flags = int(spt.pmd_flags[s])
    _install_deposit(dst)
    if k.folios.flags[fid] & PG_HUGE_ZERO:
        # The huge zero PMD too: wrprotect (it is read-only already) and old in the child.
        pgtable.set_pmd_at(k, dst, d, fid, flags & ~(_PAGE_RW | _PAGE_ACCESSED))
        dst.huge_zero = True
        return
    rmap.folio_try_dup_anon_rmap_pmd(k, fid, dst)
    k.folios.refcount[fid] += 1
    dst.rss_anon += HPAGE_PMD_NR
    pgtable.pmdp_set_wrprotect(k, src, s)
    pgtable.set_pmd_at(k, dst, d, fid, flags & ~(_PAGE_RW | _PAGE_ACCESSED))


def zap_huge_pmd(k: Kernel, mm: MM, s: int) -> None:
    """Model of zap_huge_pmd(): unmap a whole PMD leaf and free its deposited table.

    As for PTEs, an anon PMD's dirty bit is dropped, not moved to the folio.
    """
    fid, _ = pgtable.pmdp_huge_get_and_clear(k, mm, s)
    mm.nr_ptes -= 1
    if k.folios.flags[fid] & PG_HUGE_ZERO:
        return
    rmap.folio_remove_rmap_pmd(k, fid, mm)
    mm.rss_anon -= HPAGE_PMD_NR
    rmap.folio_put(k, fid)


# -- splitting a PMD mapping --------------------------------------------------------------------
def split_huge_pmd(k: Kernel, mm: MM, vma: VMA, s: int) -> None:
    """Model of split_huge_pmd()/__split_huge_pmd_locked(): one PMD leaf becomes 512 PTEs.

    The deposited table is withdrawn and filled.  For an anon THP every PTE
    inherits the PMD's write/dirty/young bits and the head page's
    AnonExclusive bit; the folio gains 511 references and 512 PTE mapcounts
    and loses its entire mapcount.  The folio itself is not split.  Counts
    thp_split_pmd, also for the huge zero PMD.
    """
    pt = mm.pt
    if pt.pmd_kind[s] != PMD_LEAF:
        return
    fid = int(pt.pmd_folio[s])
    flags = pt.pmd_flags[s]
    row = pt.alloc_row()                  # pgtable_trans_huge_withdraw(): nr_ptes unchanged
    k.vmstat.count_vm_event("thp_split_pmd")
    base = int(pt.pmd_index[s]) * HPAGE_PMD_SIZE
    k.flush_tlb_range(mm, base, base + HPAGE_PMD_SIZE)        # pmdp_invalidate()
    pgtable.pmd_populate(k, mm, s, row)
    f = k.folios
    if f.flags[fid] & PG_HUGE_ZERO:
        pgtable.set_ptes(k, mm, row, 0, ZERO_PFN, PTE_ZERO, nr=HPAGE_PMD_NR)
        return
    head = int(f.head[fid])
    ae = bool(k.mem.pflags[head] & PG_ANON_EXCLUSIVE)
    if flags & _PAGE_DIRTY:
        f.flags[fid] |= PG_DIRTY
    f.refcount[fid] += HPAGE_PMD_NR - 1
    rmap.folio_add_anon_rmap_ptes(k, fid, head, HPAGE_PMD_NR, mm, exclusive=ae)
    rmap.folio_remove_rmap_pmd(k, fid, mm)
    pgtable.set_ptes(k, mm, row, 0, np.arange(head, head + HPAGE_PMD_NR),
                     flags & (_PAGE_PRESENT | _PAGE_RW | _PAGE_DIRTY | _PAGE_ACCESSED))


def split_huge_pmd_address(k: Kernel, mm: MM, vma: VMA, addr: int) -> None:
    """Model of split_huge_pmd_address(): split the PMD leaf covering addr, if any."""
    s = mm.pt.slot_of.get(pmd_index(addr))
    if s is not None:
        split_huge_pmd(k, mm, vma, s)


def vma_adjust_trans_huge(k: Kernel, mm: MM, vma: VMA, addr: int) -> None:
    """Model of vma_adjust_trans_huge(): a VMA boundary inside a 2 MiB block splits its PMD."""
    if not IS_ALIGNED(addr, HPAGE_PMD_SIZE):
        split_huge_pmd_address(k, mm, vma, addr)


# -- splitting a folio ---------------------------------------------------------------------------
def split_folio(k: Kernel, fid: int) -> int:
    """Model of split_folio() -> __folio_split() for an anonymous large folio, to order 0.

    Refused before anything is touched: -EINVAL for the huge zero folio, a
    non-anon folio or order < 2; -EAGAIN (thp_split_page_failed,
    split_failed) when the folio has references that are not mappings
    (pins).  Otherwise unmap_folio() takes every mapping away (PMD mappings
    are split, thp_split_pmd each; the unmapping may queue the folio as
    partially mapped), the pages become order-0 folios, and remap_page()
    with TTU_USE_SHARED_ZEROPAGE maps each zero-filled page to the shared
    zero page and every other page back (split_folios_unmapped_pmd()).
    Counts thp_split_page (PMD order) and split[order]; nr_anon moves to
    order 0.  Returns 0 or the negative errno.
    """
    import errno as _e

    f = k.folios
    order = int(f.order[fid])
    if f.flags[fid] & PG_HUGE_ZERO or order < 2 or not f.flags[fid] & PG_ANON:
        return -_e.EINVAL
    if f.refcount[fid] != f.large[fid]:
        if order >= HPAGE_PMD_ORDER:
            k.vmstat.count_vm_event("thp_split_page_failed")
        k.vmstat.count_mthp_stat(order, "split_failed")
        return -_e.EAGAIN
    unmap_folio(k, fid)
    split_folios_unmapped_pmd(k, np.array([fid], dtype=np.int64))
    return 0


def unmap_folio(k: Kernel, fid: int) -> None:
    """Model of unmap_folio(): try_to_migrate() takes every mapping of a folio away before its split.

    The mappings are not replaced by migration entries here (the split keeps
    them and remaps in place); what the unmapping leaves behind is modelled:
    each PMD mapping is split (thp_split_pmd; the kernel turns it straight
    into migration entries), and the deferred split event.  try_to_migrate()
    drops one rmap at a time, a PMD mapping whole and a PTE mapping page by
    page, and __folio_remove_rmap() calls deferred_split_folio(folio, true)
    the first time a page loses its last mapping while another page is still
    PTE-mapped and no PMD maps the folio (thp_deferred_split_page for PMD
    order, split_deferred; the split then takes the folio off the queue).  A
    folio only PMD-mapped never counts; one only PTE-mapped counts when two or
    more of its pages are mapped; for a folio mapped both ways the order of
    the rmap walk decides (mms in pid order: the anon_vma interval tree visits
    the parent's VMA before the child's).
    """
    f = k.folios
    if not f.flags[fid] & (PG_PARTIALLY_MAPPED | PG_SWAPCACHE):
        head = int(f.head[fid])
        nr = 1 << int(f.order[fid])
        mc = k.mem.mapcount[head: head + nr].copy()
        entire = int(f.entire[fid])
        mapped = int(np.count_nonzero(mc))
        if entire == 0:
            partially = mapped >= 2
        elif mapped == 0:
            partially = False
        else:
            partially = _unmap_walk_partially_mapped(k, fid, head, nr, entire, mc)
        if partially:
            rmap.deferred_split_folio(k, fid, partially_mapped=True)
    if f.entire[fid]:
        for mm, vma, s in rmap.rmap_walk_pmd(k, fid):
            split_huge_pmd(k, mm, vma, s)


def _unmap_walk_partially_mapped(k: Kernel, fid: int, head: int, nr: int, entire: int, mc: np.ndarray) -> bool:
    """unmap_folio() of a folio both PMD- and PTE-mapped: does __folio_remove_rmap() see it
    partially mapped on the way?  Replays the removals in rmap-walk order (per mm, in pid order)."""
    groups: dict[int, list] = {}
    for m in rmap.folio_mappings(k, fid):
        groups.setdefault(id(m[1]), []).append(m)
    for maps in groups.values():
        for m in maps:
            if m[0] == "pmd":
                entire -= 1
                unmapped = nr - int(np.count_nonzero(mc))
                if entire == 0 and 0 < unmapped < nr:
                    return True
        idx = np.array([m[4] - head for m in maps if m[0] == "pte"], dtype=np.int64)
        if len(idx):
            if entire == 0 and (mc[idx] == 1).any() and np.count_nonzero(mc) >= 2:
                return True
            np.subtract.at(mc, idx, 1)
    return False


def split_folios_unmapped_pmd(k: Kernel, fids: np.ndarray) -> None:
    """The second half of split_folio() (__folio_freeze_and_split_unmapped(), remap_page()),
    for many anon large folios at once.

    Preconditions: each folio is anon, of order >= 2, has no PMD mapping
    (entire mapcount 0) and no references besides its mappings.  Each folio
    leaves the deferred split queue; its pages become order-0 folios.  Then
    remap_page(TTU_USE_SHARED_ZEROPAGE), which __folio_split() passes for
    every successful anon split: a zero-filled page is mapped to the shared
    zero page instead (try_to_map_unused_to_zeropage()), the others keep
    their mappings; pages left unmapped are freed.  Counts thp_split_page /
    split[order] and moves nr_anon as split_folio() does.
    """
    f = k.folios
    mem = k.mem
    orders = f.order[fids].astype(np.int64)
    heads = f.head[fids].copy()
    sizes = 1 << orders
    pflags = f.flags[fids].copy()
    for fid in fids.tolist():
        rmap.folio_unqueue_deferred_split(k, fid)
    for order, count in zip(*np.unique(orders, return_counts=True)):
        k.vmstat.mod_mthp_stat(int(order), "nr_anon", -int(count))
        if order >= HPAGE_PMD_ORDER:
            k.vmstat.count_vm_event("thp_split_page", int(count))
        k.vmstat.count_mthp_stat(int(order), "split", int(count))
    # every page of every folio: head + offset within its folio
    pfns = np.repeat(heads - (np.cumsum(sizes) - sizes), sizes) + np.arange(int(sizes.sum()))
    owner_flags = np.repeat(pflags, sizes)
    zero = (mem.content[pfns] == 0) & (mem.mapcount[pfns] > 0) & ~(mem.pflags[pfns] & PG_HWPOISON).astype(bool)
    if zero.any():
        try_to_map_unused_to_zeropage(k, pfns[zero])
    f.release_bulk(fids)
    mapcounts = mem.mapcount[pfns]
    live = mapcounts > 0
    new_ids = f.alloc_bulk(pfns[live])
    folio_add_lru(k, new_ids)
    mem.folio[pfns[live]] = new_ids
    f.refcount[new_ids] = mapcounts[live]
    f.flags[new_ids] = owner_flags[live] & (PG_ANON | rmap.PG_SWAPBACKED | rmap.PG_LRU | PG_DIRTY | PG_REFERENCED)
    dead = pfns[~live]
    mem.folio[dead] = -1
    mem.pflags[dead] = 0
    mem.free_bulk(dead)


def try_to_map_unused_to_zeropage(k: Kernel, pfns: np.ndarray) -> None:
    """Model of try_to_map_unused_to_zeropage() for every mapping of many zero-filled pages.

    Called while a split remaps its pages (remap_page() with
    TTU_USE_SHARED_ZEROPAGE): each PTE mapping of these order-0 pages becomes
    a read-only special PTE of the shared zero page (keeping the soft-dirty
    bit), MM_ANONPAGES drops by one, and the page loses that mapcount; a
    mapping in a VM_LOCKED VMA keeps its page.  The caller checked that the
    pages hold zeros and are not hwpoisoned.  No references change: the
    split hands each page as many references as it has mappings left.
    """
    mem = k.mem
    maps, complete = rmap.small_mappings(k, pfns)
    if not complete:
        maps = _pte_mappings_anywhere(k, pfns)
    gone = np.zeros(len(pfns), dtype=np.int64)
    for mm, idx, rows, cols in maps:
        if any(v.flags & VM_LOCKED for v in mm.vmas):
            addrs = PFN_PHYS(mem.vpn[pfns[idx]])
            keep = np.array([v is not None and bool(v.flags & VM_LOCKED) for v in mm.find_vmas(addrs)], dtype=bool)
            idx, rows, cols = idx[~keep], rows[~keep], cols[~keep]
            if not len(idx):
                continue
        pt = mm.pt
        flags = (PTE_ZERO | (pt.pte_flags[rows, cols] & _PAGE_SOFT_DIRTY)).astype(np.uint8)
        k.flush_tlb_pages(mm, mem.vpn[pfns[idx]])
        pgtable.set_ptes_scatter(k, mm, rows, cols, ZERO_PFN, flags)
        mm.rss_anon -= len(idx)
        np.add.at(gone, idx, 1)
    hit = gone > 0
    if hit.any():
        mem.mapcount[pfns[hit]] -= gone[hit].astype(mem.mapcount.dtype)
        k.vmstat.mod_node_page_state("nr_anon_pages", -int(np.count_nonzero(mem.mapcount[pfns[hit]] == 0)))


def _pte_mappings_anywhere(k: Kernel, pfns: np.ndarray):
    """Every PTE mapping of these pages, searched in every page table (the fallback of
    small_mappings() when a page is not mapped at its page index in some mm)."""
    out = []
    order = np.argsort(pfns)
    spfns = pfns[order]
    for p in k.procs.values():
        pt = p.mm.pt
        if not pt.nr_rows:
            continue
        table = pt.pte_pfn[: pt.nr_rows]
        r, c = np.nonzero(np.isin(table, spfns) & ~(pt.pte_flags[: pt.nr_rows] & _PAGE_SPECIAL).astype(bool))
        if len(r):
            idx = order[np.searchsorted(spfns, table[r, c])]
            out.append((p.mm, idx, r, c))
    return out


# -- the deferred split shrinker ----------------------------------------------------------------------------
def thp_underused(k: Kernel, fid: int) -> bool:
    """Model of thp_underused(): more than max_ptes_none zero-filled pages (never at 511)."""
    limit = k.sysfs.max_ptes_none
    if limit == HPAGE_PMD_NR - 1:
        return False
    head = int(k.folios.head[fid])
    zeros = int(np.count_nonzero(k.mem.content[head: head + HPAGE_PMD_NR] == 0))
    return zeros > limit


def deferred_split_scan(k: Kernel, nr_to_scan: int | None = None) -> int:
    """Model of deferred_split_scan(): split partially mapped and underused THPs.

    A partially mapped folio is split (its unmapped pages are freed, and
    like every anon split its zero-filled pages go to the shared zero page);
    one that is not partially mapped is split when thp_underused() says so,
    counting thp_underused_split_page.  A partially mapped folio that fails to
    split stays queued; others leave the queue.  Returns the pages freed.
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
            split_folios_unmapped_pmd(k, q[ok])
            freed += k.mem.nr_free - before
    for fid in queue:
        if fid not in k.deferred or not f.used[fid]:
            continue
        before = k.mem.nr_free
        if f.flags[fid] & PG_PARTIALLY_MAPPED:
            if split_folio(k, fid) != 0:
                continue                              # requeued: stays on the list
        elif f.order[fid] >= HPAGE_PMD_ORDER and thp_underused(k, fid):
            if split_folio(k, fid) != 0:
                rmap.folio_unqueue_deferred_split(k, fid)   # considered used: not requeued
                continue
            k.vmstat.count_vm_event("thp_underused_split_page")
        else:
            rmap.folio_unqueue_deferred_split(k, fid)
        freed += k.mem.nr_free - before
    return freed
