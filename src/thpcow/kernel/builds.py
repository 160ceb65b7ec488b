"""Kernel builds: upstream Linux 6.18 and the kernel-side COW alternatives.

A build is what a kernel was compiled with.  Each one answers the kernel's
own judgement points; the fault code asks them and never tests which build it
runs on:

- ``pmd_cow_copy``: ``do_huge_pmd_wp_page()`` found a shared, non-reusable
  PMD-mapped THP: copy it whole?  Upstream asks ``hugepage_cow_enabled()``,
  which only exists (and only says yes) when the 2026 series is applied and
  its ``thp_cow`` knob and ``MADV_THP_COW`` allow it.
- ``huge_pmd_wp_fallback``: the PMD is not copied whole (or the copy could
  not get a THP): upstream splits the PMD and the same fault copies 4 KiB.
- ``pte_wp_copy``: ``do_wp_page()`` is about to copy one 4 KiB page (only
  asked when ``pte_hook`` is set).
- ``cow_split``: a COW fault has just split a PMD.
- ``alloc_thp_fallback``: the buddy allocator had no order-9 block.

The series (``series``: ``"v1"`` as posted, ``"meant"`` with its review fix)
is a kernel option of the upstream build, not a build of its own: its five
pieces sit where the C puts them (``madvise_vma_behavior()``, the ``thp_cow``
sysfs file, ``hugepage_cow_enabled()``, ``map_anon_folio_pmd_*()`` and
``wp_huge_pmd_page_copy()``).  The ``thp-cow-v1`` and ``thp-cow-meant`` builds
are that kernel booted with ``thp_cow=always``.

What userspace can do on an unmodified kernel (MADV_COLLAPSE after fork,
MADV_DONTFORK) is not a build: see :mod:`thpcow.strategies`.

Builds are made by name from :data:`BUILDS`, with parameters as
``"name:key=value,key=value"``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import numpy as np

from .constants import (
    ALIGN_DOWN, HPAGE_PMD_MASK, HPAGE_PMD_NR, HPAGE_PMD_ORDER, HPAGE_PMD_SIZE, PAGE_SIZE, PHYS_PFN, VM_HUGEPAGE,
)

from . import huge_memory, memory

if TYPE_CHECKING:
    from .kernel import Kernel
    from .mm import MM, VMA

SERIES_VARIANTS = ("v1", "meant")


class KernelBuild:
    """Linux 6.18 as released: split the PMD and copy 4 KiB (since v5.8)."""

    name: ClassVar[str] = "upstream"
    help: ClassVar[str] = "Linux 6.18: split the PMD and copy one 4 KiB page (since v5.8)"
    params: ClassVar[dict[str, object]] = {}
    limits: ClassVar[dict[str, tuple[int, int]]] = {}     # inclusive bounds of numeric parameters
    pte_hook: ClassVar[bool] = False       # True: every 4 KiB COW asks pte_wp_copy()
    takes_series: ClassVar[bool] = True    # the 2026 series can be applied on top

    def __init__(self, series: str | None = None, **kwargs) -> None:
        set_params(self, f"build {self.name}", kwargs)
        if series not in (None,) + SERIES_VARIANTS:
            raise ValueError(f"build {self.name}: series={series!r} must be one of v1, meant or None")
        #: The 2026 thp_cow series: None (not applied), "v1" (as posted) or "meant" (as meant).
        self.series = series if self.takes_series else None

    def __repr__(self) -> str:
        args = ",".join(f"{k}={getattr(self, k)}" for k in self.params)
        return f"{self.name}:{args}" if args else self.name

    # -- boot ---------------------------------------------------------------------------------
    def boot(self, k: Kernel) -> None:
        """Called once when the kernel boots (sysfs defaults, reservations)."""

    # -- judgement points -------------------------------------------------------------------
    def pmd_cow_copy(self, k: Kernel, mm: MM, vma: VMA) -> bool:
        """do_huge_pmd_wp_page(): copy this shared THP whole instead of splitting its PMD?"""
        return huge_memory.hugepage_cow_enabled(k, mm, vma)

    def huge_pmd_wp_fallback(self, k: Kernel, mm: MM, vma: VMA, addr: int, s: int) -> int:
        """do_huge_pmd_wp_page()'s fallback: split this VMA's PMD; the fault copies 4 KiB."""
        huge_memory.split_huge_pmd(k, mm, vma, s)
        self.cow_split(k, mm, vma, addr & HPAGE_PMD_MASK)
        return memory.VM_FAULT_FALLBACK

    def pte_wp_copy(self, k: Kernel, mm: MM, vma: VMA, addr: int, row: int, fid: int) -> int | None:
        """do_wp_page() before its 4 KiB copy (asked only when ``pte_hook``): None copies 4 KiB."""
        return None

    def cow_split(self, k: Kernel, mm: MM, vma: VMA, haddr: int) -> None:
        """A COW fault has just split the PMD at haddr."""

    def alloc_thp_fallback(self, k: Kernel) -> int:
        """The buddy allocator had no order-9 block: another source, or -1."""
        return -1

    def cost_bytes(self, k: Kernel) -> int:
        """Memory the build itself holds (a reservation pool)."""
        return 0


Upstream = KernelBuild


class ThpCowV1(KernelBuild):
    """6.18 with the 2026 series as posted (v1), booted with thp_cow=always."""

    name = "thp-cow-v1"
    help = ("the 2026 series as posted: copy the whole 2 MiB when hugepage_cow_enabled() (thp_cow=always); "
            "any PMD collapse oopses (patch 4)")
    params = {"thp_cow": "always"}
    variant = "v1"

    def __init__(self, series: str | None = None, **kwargs) -> None:
        super().__init__(self.variant, **kwargs)

    def boot(self, k: Kernel) -> None:
        if self.thp_cow:
            k.sysfs.write("thp_cow", self.thp_cow)


class ThpCowMeant(ThpCowV1):
    """The series with its review fix: hugepage_cow_enabled() honours every THP switch."""

    name = "thp-cow-meant"
    help = "the series as meant: also honours hugepages-2048kB, VM_NOHUGEPAGE and PR_SET_THP_DISABLE"
    variant = "meant"


class Pre58(KernelBuild):
    """do_huge_pmd_wp_page() before v5.8 (commit 3917c80280c9 changed it).

    A shared THP was copied whole into a new THP whenever THP was enabled for
    the VMA, allocated as a THP fault allocates it: alloc_hugepage_vma() with
    alloc_hugepage_direct_gfpmask(), the gfp of the ``defrag`` knob (what
    vma_thp_gfp_mask() still returns).  So the copy stalls in direct
    compaction where a fault would (defrag=always; madvise and defer+madvise
    in MADV_HUGEPAGE regions), wakes kcompactd with defer (and defer+madvise
    elsewhere) and otherwise takes only a free order-9 block.  When THP is
    off for the VMA, or no THP is had, do_huge_pmd_wp_page_fallback() copies
    the 512 pages into 4 KiB pages; thp_fault_fallback counts either way.
    """

    name = "pre-5.8"
    help = ("kernels before 5.8: copy the whole 2 MiB into a THP allocated as a fault does (defrag); "
            "if none, copy all 512 pages into 4 KiB pages")
    takes_series = False

    @staticmethod
    def transparent_hugepage_enabled(k: Kernel, mm: MM, vma: VMA) -> bool:
        """Model of __transparent_hugepage_enabled() of v5.7: THP allowed for this VMA at all?"""
        from .huge_memory import vma_thp_disabled
        return not vma_thp_disabled(mm, vma, False) and k.sysfs.global_allows(vma.flags & VM_HUGEPAGE)

    def pmd_cow_copy(self, k, mm, vma):
        # The copy then allocates with vma_thp_gfp_mask() (alloc_hugepage_direct_gfpmask() of
        # v5.7): compaction or a kcompactd wakeup as ``defrag`` says; a failure counts
        # thp_fault_fallback (and, this being a 6.18 allocator, anon_fault_fallback[2048kB]).
        return self.transparent_hugepage_enabled(k, mm, vma)

    def huge_pmd_wp_fallback(self, k, mm, vma, addr, s):
        if not self.transparent_hugepage_enabled(k, mm, vma):
            k.vmstat.count_vm_event("thp_fault_fallback")      # no allocation was tried to count it
        if do_huge_pmd_wp_page_fallback(k, mm, vma, s) is None:
            return super().huge_pmd_wp_fallback(k, mm, vma, addr, s)
        return 0


def do_huge_pmd_wp_page_fallback(k: Kernel, mm: MM, vma: VMA, s: int) -> int | None:
    """Model of the pre-5.8 do_huge_pmd_wp_page_fallback(): copy all 512 pages to 4 KiB pages.

    The deposited table is withdrawn and filled with 512 new exclusive,
    writable pages; the THP loses this PMD mapping.  No thp_split_pmd.  None
    (nothing changed) if 512 pages cannot be had.
    """
    from . import pgtable, rmap
    from .memory import new_anon_folios_bulk
    from .mm import PTE_NEW_ANON
    new = k.alloc_pages_bulk(HPAGE_PMD_NR)
    if new is None:
        return None
    pt = mm.pt
    old = int(pt.pmd_folio[s])
    f = k.folios
    head = int(f.head[old])
    new_anon_folios_bulk(k, new, 0)
    memory.copy_user_large_folio(k, new, np.arange(head, head + HPAGE_PMD_NR))
    row = pt.alloc_row()
    pgtable.pmd_populate(k, mm, s, row)
    pgtable.set_ptes(k, mm, row, 0, new, PTE_NEW_ANON)
    k.mem.vpn[new] = int(pt.pmd_index[s]) * HPAGE_PMD_NR + np.arange(HPAGE_PMD_NR)
    rmap.folio_remove_rmap_pmd(k, old, mm)
    rmap.folio_put(k, old)
    k.vmstat.count_vm_event("sim_cow_pages", HPAGE_PMD_NR)
    k.vmstat.count_vm_event("sim_cow_bytes", HPAGE_PMD_SIZE)
    return 0


class MthpCow(KernelBuild):
    """Copy a naturally aligned mTHP-sized block around the faulting page."""

    name = "mthp-cow"
    help = "copy the aligned 2^order block around the fault (16 KiB..2 MiB), PMD- and PTE-mapped"
    params = {"order": 4}
    limits = {"order": (2, HPAGE_PMD_ORDER)}
    pte_hook = True

    def pmd_cow_copy(self, k, mm, vma):
        return self.order == HPAGE_PMD_ORDER

    def pte_wp_copy(self, k, mm, vma, addr, row, fid):
        if self.order >= HPAGE_PMD_ORDER or k.folios.order[fid] == 0:
            return None
        return wp_page_copy_block(k, mm, vma, addr, row, self.order)


def wp_page_copy_block(k: Kernel, mm: MM, vma: VMA, addr: int, row: int, order: int) -> int | None:
    """Copy the aligned block of 2^order pages around addr into one new mTHP folio.

    Every PTE of the block must be a present, read-only, non-exclusive anon
    page inside the VMA (a page each would be COW-copied anyway); otherwise
    (or when the order cannot be allocated) None, and the 4 KiB copy happens.
    """
    from . import pgtable, rmap
    from .mm import PTE_NEW_ANON, _PAGE_RW, _PAGE_SPECIAL, pte_index
    from .page_alloc import PG_ANON_EXCLUSIVE
    nr = 1 << order
    base = ALIGN_DOWN(addr, PAGE_SIZE << order)
    if base < vma.start or base + (PAGE_SIZE << order) > vma.end:
        return None
    pt = mm.pt
    first = pte_index(base)
    pfns = pt.pte_pfn[row, first: first + nr].copy()
    flags = pt.pte_flags[row, first: first + nr]
    if (pfns < 0).any() or (flags & (_PAGE_RW | _PAGE_SPECIAL)).any():
        return None
    if (k.mem.pflags[pfns] & PG_ANON_EXCLUSIVE).any():
        return None
    pfn = k.mem.alloc(order)
    if pfn < 0:
        return None
    new = k.new_folio(pfn, order)
    memory.copy_user_large_folio(k, np.arange(pfn, pfn + nr), pfns)
    k.folios.refcount[new] = nr
    rmap.folio_add_new_anon_rmap(k, new, mm, pmd=False)
    pgtable.set_ptes(k, mm, row, first, np.arange(pfn, pfn + nr), PTE_NEW_ANON)
    k.mem.vpn[pfn: pfn + nr] = PHYS_PFN(base) + np.arange(nr)
    for old_pfn in pfns.tolist():              # the old pages lose their mapping once it is replaced
        old = int(k.mem.folio[old_pfn])
        rmap.folio_remove_rmap_ptes(k, old, old_pfn, 1, mm)
        rmap.folio_put(k, old)
    k.vmstat.count_vm_event("sim_cow_pages", nr)
    k.vmstat.count_vm_event("sim_cow_bytes", nr * PAGE_SIZE)
    return 0


class DirectedKhugepaged(KernelBuild):
    """khugepaged told where a COW just split a THP: those PMDs are scanned first.

    Each COW split adds a hint to the khugepaged daemon
    (``Khugepaged.hint``); its passes (on the simulated clock, with the
    sysfs limits: max_ptes_shared refuses blocks still shared with a child)
    try the hinted PMDs before resuming the normal scan.
    """

    name = "directed-khugepaged"
    help = "upstream COW; each COW split queues its PMD for khugepaged to scan first (with its limits)"

    def cow_split(self, k, mm, vma, haddr):
        k.khugepaged.hint[(mm.pid, haddr)] = None


class Reservation(KernelBuild):
    """A pool of order-9 blocks set aside at boot (in the spirit of TAO)."""

    name = "reservation"
    help = "set aside a pool of 2 MiB blocks for THP faults and COW copies when the buddy has none"
    params = {"pool_mib": 64}

    def __init__(self, series: str | None = None, **kwargs) -> None:
        super().__init__(series, **kwargs)
        if self.pool_mib < 0:
            raise ValueError(f"build reservation: pool_mib={self.pool_mib} must be >= 0")

    def boot(self, k: Kernel) -> None:
        self.pool: list[int] = []
        for _ in range(self.pool_mib // (HPAGE_PMD_SIZE >> 20)):
            pfn = k.mem.alloc(HPAGE_PMD_ORDER)
            if pfn < 0:
                break
            self.pool.append(pfn)
        self.reserved = len(self.pool) * HPAGE_PMD_SIZE

    def alloc_thp_fallback(self, k):
        return self.pool.pop() if self.pool else -1

    def cost_bytes(self, k):
        return self.reserved


class CowDensity(KernelBuild):
    """Ours: copy the whole 2 MiB once a process has COWed enough of it.

    Upstream copies 4 KiB per written page.  When, since fork, a process has
    taken ``threshold`` 4 KiB COW copies inside one 2 MiB block of a
    THP-eligible VMA, its next COW there copies the whole block into a new
    exclusive THP (the collapse engine, no khugepaged limits).  Sparse writers
    never reach the threshold and pay nothing; dense writers get their THP
    back after ``threshold`` faults, wasting at most ``threshold`` x 4 KiB of
    copies per block, instead of 2 MiB per first write (the series) or a
    permanently split mapping (upstream).
    """

    name = "cow-density"
    help = "ours: after THRESHOLD 4 KiB COWs in a 2 MiB block since fork, copy that block whole into a THP"
    params = {"threshold": 64}
    limits = {"threshold": (1, HPAGE_PMD_NR)}
    pte_hook = True

    def __init__(self, series: str | None = None, **kwargs) -> None:
        super().__init__(series, **kwargs)
        self.count: dict[tuple[int, int], int] = {}

    def pte_wp_copy(self, k, mm, vma, addr, row, fid):
        from . import huge_memory as hm
        from .khugepaged import CollapseControl, ScanResult, collapse_single_pmd
        haddr = addr & HPAGE_PMD_MASK
        key = (mm.mm_id, haddr)
        n = self.count.get(key, 0) + 1
        self.count[key] = n
        if n < self.threshold or k.folios.order[fid] < HPAGE_PMD_ORDER:
            return None
        if haddr < vma.start or haddr + HPAGE_PMD_SIZE > vma.end or \
                not hm.thp_vma_allowable_order(k, mm, vma, HPAGE_PMD_ORDER, hm.TVA_PAGEFAULT):
            return None
        res = collapse_single_pmd(k, mm, vma, haddr, CollapseControl(is_khugepaged=False))
        if res != ScanResult.SCAN_SUCCEED:
            return None
        k.vmstat.count_vm_event("sim_huge_cow")
        del self.count[key]
        return 0


BUILDS: dict[str, type[KernelBuild]] = {
    cls.name: cls for cls in (KernelBuild, ThpCowV1, ThpCowMeant, Pre58, MthpCow, DirectedKhugepaged,
                              Reservation, CowDensity)
}
ALIASES = {"thp-cow-intended": "thp-cow-meant", "6.18": "upstream"}


def set_params(obj, what: str, kwargs: dict) -> None:
    """Set ``obj``'s parameters (its class's ``params``: name -> default) from ``kwargs``.

    Values are converted to the default's type and checked against the
    class's ``limits`` (inclusive bounds), if it has any; ValueError names
    ``what``, the parameter and the value for an unknown name, a value of the
    wrong kind or one out of bounds.
    """
    unknown = set(kwargs) - set(obj.params)
    if unknown:
        raise ValueError(f"{what}: unknown parameter(s) {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(obj.params) or 'none'}")
    for key, default in obj.params.items():
        val = kwargs.get(key, default)
        try:
            setattr(obj, key, type(default)(val) if default is not None else val)
        except (TypeError, ValueError):
            raise ValueError(f"{what}: {key}={val!r} is not {type(default).__name__}") from None
        lo, hi = getattr(obj, "limits", {}).get(key, (None, None))
        if lo is not None and not lo <= getattr(obj, key) <= hi:
            raise ValueError(f"{what}: {key}={getattr(obj, key)} must be within {lo}..{hi}")


def split_spec(spec: str, what: str = "build") -> tuple[str, dict[str, str]]:
    """``"name:key=value,key=value"`` -> (name, {key: value})."""
    name, _, args = spec.partition(":")
    name = name.strip()
    kwargs = {}
    for item in filter(None, (a.strip() for a in args.split(","))):
        key, eq, val = item.partition("=")
        if not eq:
            raise ValueError(f"{what} {name}: parameter {item!r} is not key=value")
        kwargs[key.strip()] = val.strip()
    return name, kwargs


def parse_build(spec: str, series: str | None = None) -> KernelBuild:
    """Build a kernel build from ``"name"`` or ``"name:key=value,..."``."""
    name, kwargs = split_spec(spec)
    cls = BUILDS.get(ALIASES.get(name, name))
    if cls is None:
        raise ValueError(f"unknown kernel build {name!r}; known: {', '.join(sorted(BUILDS))} "
                         "(what userspace does, such as MADV_COLLAPSE after fork or MADV_DONTFORK, "
                         "is a strategy: thpcow.strategies)")
    try:
        return cls(series, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(str(exc)) from None


def series_option(value: "bool | str | None") -> str | None:
    """``Kernel(series_thp_cow=...)``: True means the series as meant, "v1" as posted, False not applied."""
    if value is True:
        return "meant"
    if value in (False, None):
        return None
    if value in SERIES_VARIANTS:
        return str(value)
    raise ValueError(f"series_thp_cow={value!r}: must be True, False, 'v1' or 'meant'")


def get_build(spec: "KernelBuild | str | None", series: str | None = None) -> KernelBuild:
    if spec is None:
        return KernelBuild(series)
    if isinstance(spec, KernelBuild):
        return spec
    return parse_build(spec, series)
