"""COW policies: small objects behind the kernel's judgement points.

The fault code asks the kernel's policy object at the points where the kernel
(or a proposed patch) decides:

- ``huge_pmd_wp_copy``: a write fault on a shared PMD-mapped THP that cannot be
  reused (``do_huge_pmd_wp_page()``); None lets upstream split the PMD and copy
  4 KiB;
- ``pte_wp_copy``: a write fault on a shared PTE that will be copied
  (``do_wp_page()``); None lets upstream copy 4 KiB;
- ``cow_split``: notification that a COW fault just split a PMD;
- ``alloc_thp_fallback``: the buddy allocator had no order-9 block.

Workload-level alternatives (MADV_DONTFORK, MADV_COLLAPSE after fork) use the
``before_fork`` and ``phase_end`` hooks that scenario runners call.

Policies are built by name from :data:`REGISTRY`, with parameters as
``"name:key=value,key=value"``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import numpy as np

from .constants import (
    HPAGE_PMD_NR, HPAGE_PMD_ORDER, HPAGE_PMD_SIZE, MADV_COLLAPSE, MADV_DONTFORK, PAGE_SHIFT, PAGE_SIZE,
    VM_HUGEPAGE, VM_NOHUGEPAGE,
)
from .errors import KernelError

if TYPE_CHECKING:
    from .kernel import Kernel, Process
    from .mm import MM, VMA


class CowPolicy:
    """Base class: the judgement points a COW policy can answer (all default to upstream)."""

    name: ClassVar[str] = "base"
    help: ClassVar[str] = ""
    params: ClassVar[dict[str, object]] = {}
    pte_hook: ClassVar[bool] = False      # True: every PTE COW goes through pte_wp_copy()

    def __init__(self, **kwargs) -> None:
        unknown = set(kwargs) - set(self.params)
        if unknown:
            raise ValueError(f"policy {self.name}: unknown parameter(s) {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(self.params) or 'none'}")
        for key, default in self.params.items():
            val = kwargs.get(key, default)
            setattr(self, key, type(default)(val) if default is not None else val)

    def __repr__(self) -> str:
        args = ",".join(f"{k}={getattr(self, k)}" for k in self.params)
        return f"{self.name}:{args}" if args else self.name

    # -- kernel judgement points ------------------------------------------------------------
    def attach(self, k: Kernel) -> None:
        """Called once when a kernel takes this policy."""

    def huge_pmd_wp_copy(self, k: Kernel, mm: MM, vma: VMA, addr: int, slot: int, fid: int) -> int | None:
        return None

    def pte_wp_copy(self, k: Kernel, mm: MM, vma: VMA, addr: int, row: int, fid: int) -> int | None:
        return None

    def cow_split(self, k: Kernel, mm: MM, vma: VMA, haddr: int) -> None:
        """A COW fault has just split the PMD at haddr."""

    def alloc_thp_fallback(self, k: Kernel) -> int:
        return -1

    # -- workload-level hooks ----------------------------------------------------------------
    def before_fork(self, k: Kernel, parent: Process, child_needs: list[tuple[int, int]]) -> None:
        """Before the scenario forks; ``child_needs`` lists the (addr, length) the child uses."""

    def phase_end(self, k: Kernel, parent: Process, children: list[Process]) -> None:
        """After a phase of writes (the scenario decides when)."""

    def cost_bytes(self, k: Kernel) -> int:
        """Memory the policy itself holds (e.g. a reservation pool)."""
        return 0


class Upstream(CowPolicy):
    name = "upstream"
    help = "Linux 6.18: split the PMD and copy one 4 KiB page (since v5.8)"


class ThpCowSeries(CowPolicy):
    """The 2026 series, as written in v1 (series thp_cow v1 3/5 + 5/5)."""

    name = "thp-cow-v1"
    help = "the 2026 series as written: copy the whole 2 MiB when hugepage_cow_enabled() (sets thp_cow)"
    params = {"thp_cow": "always"}
    intended = False

    def attach(self, k: Kernel) -> None:
        if self.thp_cow:
            k.sysfs.write("thp_cow", self.thp_cow)

    def huge_pmd_wp_copy(self, k, mm, vma, addr, slot, fid):
        from . import huge_memory as hm
        if not hm.hugepage_cow_enabled(k, mm, vma, intended=self.intended):
            return None
        return hm.wp_huge_pmd_page_copy(k, mm, vma, addr, slot)


class ThpCowIntended(ThpCowSeries):
    name = "thp-cow-intended"
    help = "the series as meant: also honours hugepages-2048kB, VM_NOHUGEPAGE and PR_SET_THP_DISABLE"
    intended = True


class Pre58(CowPolicy):
    """Model of do_huge_pmd_wp_page() before v5.8 (commit 3917c80280c9 changed it)."""

    name = "pre-5.8"
    help = "kernels before 5.8: copy the whole 2 MiB; if no THP, copy all 512 pages into 4 KiB pages"

    def huge_pmd_wp_copy(self, k, mm, vma, addr, slot, fid):
        from . import huge_memory as hm
        enabled = not hm.vma_thp_disabled(mm, vma, False) and k.sysfs.global_allows(vma.flags & VM_HUGEPAGE)
        if enabled and k.mem.has_free_order(HPAGE_PMD_ORDER):
            return hm.wp_huge_pmd_page_copy(k, mm, vma, addr, slot)
        k.vmstat.count_vm_event("thp_fault_fallback")
        return do_huge_pmd_wp_page_fallback(k, mm, vma, slot)


def do_huge_pmd_wp_page_fallback(k: Kernel, mm: MM, vma: VMA, s: int) -> int | None:
    """Model of the pre-5.8 do_huge_pmd_wp_page_fallback(): copy all 512 pages to 4 KiB pages.

    The deposited table is withdrawn and filled with 512 new exclusive,
    writable pages; the THP loses this PMD mapping.  No thp_split_pmd.  If 512
    pages cannot be had, the PMD is split as upstream does.
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
    new_anon_folios_bulk(k, new, k.mem.content[head: head + HPAGE_PMD_NR])
    row = pt.alloc_row()
    pgtable.pmd_populate(k, mm, s, row)
    pgtable.set_ptes(k, mm, row, 0, new, PTE_NEW_ANON)
    k.mem.vpn[new] = int(pt.pmd_index[s]) * HPAGE_PMD_NR + np.arange(HPAGE_PMD_NR)
    rmap.folio_remove_rmap_pmd(k, old, mm)
    rmap.folio_put(k, old)
    k.vmstat.count_vm_event("sim_cow_pages", HPAGE_PMD_NR)
    k.vmstat.count_vm_event("sim_cow_bytes", HPAGE_PMD_SIZE)
    return 0


class MthpCow(CowPolicy):
    """Copy a naturally aligned mTHP-sized block around the faulting page."""

    name = "mthp-cow"
    help = "copy the aligned 2^order block around the fault (16 KiB..2 MiB), PMD- and PTE-mapped"
    params = {"order": 4}
    pte_hook = True

    def attach(self, k: Kernel) -> None:
        if not 2 <= self.order <= HPAGE_PMD_ORDER:
            raise ValueError(f"policy mthp-cow: order={self.order} must be within 2..{HPAGE_PMD_ORDER}")

    def huge_pmd_wp_copy(self, k, mm, vma, addr, slot, fid):
        from . import huge_memory as hm
        if self.order == HPAGE_PMD_ORDER:
            return hm.wp_huge_pmd_page_copy(k, mm, vma, addr, slot)
        return None                          # split; the PTE COW that follows copies the block

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
    from .mm import PTE_NEW_ANON, _PAGE_RW, _PAGE_SPECIAL
    from .physmem import PG_ANON_EXCLUSIVE
    nr = 1 << order
    base = addr & ~((PAGE_SIZE << order) - 1)
    if base < vma.start or base + (PAGE_SIZE << order) > vma.end:
        return None
    pt = mm.pt
    first = (base >> PAGE_SHIFT) & 511
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
    k.mem.content[pfn: pfn + nr] = k.mem.content[pfns]
    k.folios.refcount[new] = nr
    rmap.folio_add_new_anon_rmap(k, new, mm, pmd=False)
    pgtable.set_ptes(k, mm, row, first, np.arange(pfn, pfn + nr), PTE_NEW_ANON)
    k.mem.vpn[pfn: pfn + nr] = (base >> PAGE_SHIFT) + np.arange(nr)
    for old_pfn in pfns.tolist():              # the old pages lose their mapping once it is replaced
        old = int(k.mem.folio[old_pfn])
        rmap.folio_remove_rmap_ptes(k, old, old_pfn, 1, mm)
        rmap.folio_put(k, old)
    k.vmstat.count_vm_event("sim_cow_pages", nr)
    k.vmstat.count_vm_event("sim_cow_bytes", nr * PAGE_SIZE)
    return 0


class CollapseAfterFork(CowPolicy):
    name = "collapse-after-fork"
    help = "upstream COW, then MADV_COLLAPSE of the written ranges at the end of each phase"
    params = {"who": "parent"}

    def attach(self, k: Kernel) -> None:
        if self.who not in ("parent", "child", "both"):
            raise ValueError(f"policy collapse-after-fork: who={self.who} must be parent, child or both")

    def phase_end(self, k, parent, children):
        procs = []
        if self.who in ("parent", "both"):
            procs.append(parent)
        if self.who in ("child", "both"):
            procs.extend(children)
        for p in procs:
            if not p.mm.alive:
                continue
            for v in list(p.mm.vmas):
                if v.flags & VM_NOHUGEPAGE or not v.anon_vma:
                    continue
                try:
                    p.madvise(v.start, v.end - v.start, MADV_COLLAPSE)
                except KernelError:
                    pass                      # EINVAL/ENOMEM/EAGAIN: keep what could be collapsed


class DontFork(CowPolicy):
    name = "dontfork"
    help = "upstream COW, and MADV_DONTFORK on the parent's memory that the child does not use"

    def before_fork(self, k, parent, child_needs):
        for v in list(parent.mm.vmas):
            cursor = v.start
            for start, length in sorted(child_needs):
                lo, hi = max(start & ~(PAGE_SIZE - 1), v.start), min(start + length, v.end)
                if lo >= hi:
                    continue
                if lo > cursor:
                    parent.madvise(cursor, lo - cursor, MADV_DONTFORK)
                cursor = max(cursor, (hi + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1))
            if cursor < v.end:
                parent.madvise(cursor, v.end - cursor, MADV_DONTFORK)


class DirectedKhugepaged(CowPolicy):
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


class Reservation(CowPolicy):
    """A pool of order-9 blocks set aside at boot (in the spirit of TAO)."""

    name = "reservation"
    help = "set aside a pool of 2 MiB blocks for THP faults and COW copies when the buddy has none"
    params = {"pool_mib": 64}

    def attach(self, k: Kernel) -> None:
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


class CowDensity(CowPolicy):
    """Our own: copy the whole 2 MiB once a process has COWed enough of it.

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
    pte_hook = True

    def attach(self, k: Kernel) -> None:
        if not 1 <= self.threshold <= HPAGE_PMD_NR:
            raise ValueError(f"policy cow-density: threshold={self.threshold} must be within 1..512")
        self.count: dict[tuple[int, int], int] = {}

    def pte_wp_copy(self, k, mm, vma, addr, row, fid):
        from . import huge_memory as hm
        from .khugepaged import CollapseControl, ScanResult, collapse_single_pmd
        haddr = addr & ~(HPAGE_PMD_SIZE - 1)
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


REGISTRY: dict[str, type[CowPolicy]] = {
    cls.name: cls for cls in (Upstream, ThpCowSeries, ThpCowIntended, Pre58, MthpCow, CollapseAfterFork,
                              DontFork, DirectedKhugepaged, Reservation, CowDensity)
}


def parse_policy(spec: str) -> CowPolicy:
    """Build a policy from ``"name"`` or ``"name:key=value,key=value"``."""
    name, _, args = spec.partition(":")
    cls = REGISTRY.get(name.strip())
    if cls is None:
        raise ValueError(f"unknown COW policy {name!r}; known: {', '.join(sorted(REGISTRY))}")
    kwargs = {}
    for item in filter(None, (a.strip() for a in args.split(","))):
        key, eq, val = item.partition("=")
        if not eq:
            raise ValueError(f"policy {name}: parameter {item!r} is not key=value")
        kwargs[key.strip()] = val.strip()
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(str(exc)) from None


def get_policy(spec: "CowPolicy | str | None") -> CowPolicy:
    if spec is None:
        return Upstream()
    if isinstance(spec, CowPolicy):
        return spec
    return parse_policy(spec)
