"""Model of a core's data-TLB hierarchy, built the way DynamoRIO drcachesim builds its TLB simulator.

Layout (drcachesim ``clients/drcachesim/simulator/``): one knobs dataclass
(:class:`TlbKnobs`, after ``tlb_simulator_knobs_t``), one device class reused
per level (:class:`Tlb`, after ``tlb_t``) linked by ``parent``, per-level
stats with ``get_metric()`` (after ``caching_device_stats_t``), and the
skip / warmup / sim-refs counts of ``tlb_simulator_t::process_memref()``.

The hierarchy of one core::

    L1 dTLB 4 KiB  --.                       (or one L1 for both sizes:
                      >-- L2 (STLB) --> page walk    Zen 4, Neoverse V2)
    L1 dTLB 2 MiB  --'                   |
                                         +-- PDE cache (PMD-level walk cache)

An access carries its virtual address, whether it is a store, the size of the
page that maps it *at that moment* (``page_shift`` 12 or 21, which the
simulated kernel knows: see :func:`page_shifts_of`) and its address-space id.
Entries are tagged by (ASID, virtual page number, page size); a lookup uses the
page size of the access, so an entry of the other size for the same address
is never hit (and wastes space until it is invalidated, as a stale entry
would until its flush).

Replacement: every level is set-associative with true LRU inside a set.  The
set of a page is ``vpn & (sets - 1)`` with ``vpn`` the page number at the
page's own size (sets must be a power of two).  An invalid way is always
filled before a valid one is evicted.  Levels are non-inclusive and
non-exclusive, as drcachesim's default: a miss fills every level it missed in;
an L1 eviction does not touch the L2; an L2 eviction does not touch the L1.

Page walks (x86-64 4-level paging; the upper levels are assumed to hit the
upper paging-structure caches):

* a 2 MiB page ends at the PMD: ``pmd_walk_refs`` memory references;
* a 4 KiB page whose PMD entry is in the PDE cache reads only the PTE:
  ``pte_walk_refs_pwc_hit`` references (1);
* otherwise it reads the PMD then the PTE: ``pte_walk_refs_pwc_miss`` (2),
  and the PMD entry is filled into the PDE cache.

Invalidation models what Linux flushes after a page-table change (the caller,
who knows the kernel event, calls one of them; each call counts one
shootdown): :meth:`TlbSimulator.invalidate_page` (COW remap of a 4 KiB page,
or a PMD split: the old 2 MiB entry goes), :meth:`~TlbSimulator.invalidate_range`
(munmap, collapse, MADV_DONTNEED; also drops the PDE-cache entries of the
2 MiB regions it touches, as freeing or replacing a PTE table does) and
:meth:`~TlbSimulator.flush_asid` (fork's ``flush_tlb_mm()`` of the parent, exit).

Simplification: one core, no instruction side, no 1 GiB pages, no PCID
limits, no coalescing of adjacent 4 KiB entries (Zen 4 can merge them into
16 KiB entries), no skewed-associative L2 (Zen's L2 is skewed by page size),
and the hot loop sees no permission bits: a store to a read-only entry is the
kernel's business (it arrives as a fault and an invalidation).
"""

from __future__ import annotations

import enum
import sys
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Iterable, TextIO

import numpy as np
from numba import njit

if TYPE_CHECKING:
    from ..kernel import Process

PAGE_SHIFT_4K = 12
PAGE_SHIFT_2M = 21
SIZE_4K = 1 << PAGE_SHIFT_4K
SIZE_2M = 1 << PAGE_SHIFT_2M
PAGE_SIZES = (SIZE_4K, SIZE_2M)
USER_VA_LIMIT = 1 << 47            # x86-64 4-level user space (TASK_SIZE rounded up)

# Entry key: (asid << 48) | (vpn << 1) | is_2m.  vpn < 2**35 for 4 KiB pages.
ASID_SHIFT = 48
ASID_LIMIT = 1 << 15
EMPTY = -1
_VPN_MASK = (1 << 47) - 1



class Metric(enum.IntEnum):
    """Per-level counters (after drcachesim's ``metric_name_t``)."""

    HITS = 0
    MISSES = 1
    EVICTIONS = 2
    INVALIDATIONS = 3


class SimMetric(enum.IntEnum):
    """Simulator-wide counters: accesses, page walks by kind, shootdowns."""

    ACCESSES = 0
    READS = 1
    WRITES = 2
    WALKS_PMD = 3              # 2 MiB page: walk ends at the PMD
    WALKS_PTE_PWC_HIT = 4      # 4 KiB page, PMD entry found in the PDE cache
    WALKS_PTE_PWC_MISS = 5     # 4 KiB page, PMD entry read from memory
    WALK_MEM_REFS = 6          # page-table entries read by all walks
    SHOOTDOWNS = 7             # invalidate_page / invalidate_range / flush_asid calls
    INVALIDATED_ENTRIES = 8    # entries those calls removed (all levels)


def _metric_name(m: enum.IntEnum) -> str:
    return m.name.lower()


class _Accesses:
    """A checked batch of accesses; ``page_shift`` and ``asid`` may be one value for all (stride 0)."""

    __slots__ = ("vaddr", "is_write", "page_shift", "asid", "n")

    def __init__(self, vaddr, is_write, page_shift, asid) -> None:
        self.vaddr, self.is_write, self.page_shift, self.asid = vaddr, is_write, page_shift, asid
        self.n = len(vaddr)

    @staticmethod
    def _column(name: str, val, dtype, n: int) -> np.ndarray:
        arr = np.asarray(val, dtype=dtype)
        if arr.ndim == 0:
            return arr.reshape(1)
        if arr.shape != (n,):
            raise ValueError(f"{name}: expected one value or shape ({n},), got shape {arr.shape}")
        return np.ascontiguousarray(arr)

    @classmethod
    def check(cls, vaddr, is_write, page_shift, asid) -> "_Accesses":
        vaddr = np.asarray(vaddr)
        if vaddr.ndim != 1:
            raise ValueError(f"vaddr: expected a 1-D array, got shape {vaddr.shape}")
        if vaddr.dtype.kind == "i" and len(vaddr) and int(vaddr.min()) < 0:
            raise ValueError(f"vaddr: negative address {int(vaddr.min())}")
        vaddr = np.ascontiguousarray(vaddr, dtype=np.uint64)
        n = len(vaddr)
        is_write = None if is_write is None else cls._column("is_write", is_write, bool, n)
        page_shift = cls._column("page_shift", PAGE_SHIFT_4K if page_shift is None else page_shift,
                                 np.uint8, n)
        asid = cls._column("asid", asid, np.int64, n)
        bad, what = _check_kernel(vaddr, page_shift, asid)
        if bad >= 0:
            if what == 0:
                raise ValueError(f"vaddr: {int(vaddr[bad]):#x} at index {bad} is outside the 47-bit "
                                 "user address space")
            if what == 1:
                ps = page_shift[0 if len(page_shift) == 1 else bad]
                raise ValueError(f"page_shift: {int(ps)} at index {bad}; must be 12 (4 KiB) or 21 (2 MiB)")
            a = asid[0 if len(asid) == 1 else bad]
            raise ValueError(f"asid: {int(a)} at index {bad}; must be within [0, {ASID_LIMIT})")
        return cls(vaddr, is_write, page_shift, asid)

    def slice(self, a: int, b: int) -> "_Accesses":
        if a == 0 and b == self.n:
            return self
        def cut(x):
            return x if x is None or (len(x) == 1 and self.n != 1) else x[a:b]
        return _Accesses(self.vaddr[a:b], cut(self.is_write), cut(self.page_shift), cut(self.asid))

    def writes(self) -> int:
        if self.is_write is None:
            return 0
        if len(self.is_write) == 1 and self.n != 1:
            return self.n if bool(self.is_write[0]) else 0
        return int(np.count_nonzero(self.is_write))

    def full(self, name: str) -> np.ndarray:
        """One column as a full-length array (for the reference engine)."""
        x = getattr(self, name)
        return np.broadcast_to(x, (self.n,)) if len(x) == 1 else x


# -- knobs --------------------------------------------------------------------------------------
@dataclass
class TlbKnobs:
    """Model of drcachesim's ``tlb_simulator_knobs_t``: the geometry and costs of one core's dTLBs.

    Every default lives here.  The defaults are a generic Skylake-class x86 core;
    use a preset (:mod:`thpcow.machine.presets`) for a real machine.
    """

    name: str = "default"
    source: str = ""                 # where the geometry comes from (a citation)
    # L1 dTLB.  l1_unified: one L1 of l1_4k_entries/l1_4k_assoc holds both page sizes.
    l1_unified: bool = False
    l1_4k_entries: int = 64
    l1_4k_assoc: int = 4
    l1_2m_entries: int = 32
    l1_2m_assoc: int = 4
    # L2 (STLB).  l2_entries == 0: no L2.
    l2_entries: int = 1536
    l2_assoc: int = 12
    l2_holds_2m: bool = True
    # PDE cache (PMD-level paging-structure / walk cache).  pwc_entries == 0: none.
    pwc_entries: int = 32
    pwc_assoc: int = 4
    # Memory references per page walk.
    pmd_walk_refs: int = 1
    pte_walk_refs_pwc_hit: int = 1
    pte_walk_refs_pwc_miss: int = 2
    # Costs: cycles are turned into ns with cpu_ghz.
    cpu_ghz: float = 3.0
    l2_hit_cycles: float = 7.0       # extra cycles of an L1 miss that hits the L2
    walk_ref_cycles: float = 40.0    # one page-table read (assumption: mostly L2/L3 cache hits)
    shootdown_ns: float = 2000.0     # one flush with one remote CPU (IPI round trip, not measured here)
    # drcachesim's reference counts: skip, then warm up (stats reset after), then simulate.
    skip_refs: int = 0
    warmup_refs: int = 0
    sim_refs: int = 0                # 0: no limit

    def validate(self) -> "TlbKnobs":
        """Check every field; raise ValueError naming the first bad one."""
        for f in fields(self):
            val = getattr(self, f.name)
            want = {"str": str, "bool": bool, "int": int, "float": (int, float)}[f.type]
            if not isinstance(val, want) or (want is not bool and isinstance(val, bool)):
                raise ValueError(f"field '{f.name}': expected {f.type}, got {val!r}")
        _check_geometry("l1_4k", self.l1_4k_entries, self.l1_4k_assoc, required=True)
        if not self.l1_unified:
            _check_geometry("l1_2m", self.l1_2m_entries, self.l1_2m_assoc, required=True)
        _check_geometry("l2", self.l2_entries, self.l2_assoc, required=False)
        _check_geometry("pwc", self.pwc_entries, self.pwc_assoc, required=False)
        for name in ("pmd_walk_refs", "pte_walk_refs_pwc_hit", "pte_walk_refs_pwc_miss",
                     "skip_refs", "warmup_refs", "sim_refs"):
            if getattr(self, name) < 0:
                raise ValueError(f"field '{name}': must be >= 0, got {getattr(self, name)}")
        for name in ("l2_hit_cycles", "walk_ref_cycles", "shootdown_ns"):
            if getattr(self, name) < 0:
                raise ValueError(f"field '{name}': must be >= 0, got {getattr(self, name)}")
        if self.cpu_ghz <= 0:
            raise ValueError(f"field 'cpu_ghz': must be > 0, got {self.cpu_ghz}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def _check_geometry(prefix: str, entries: int, assoc: int, required: bool) -> None:
    if entries == 0 and not required:
        return
    if entries <= 0:
        raise ValueError(f"field '{prefix}_entries': must be > 0, got {entries}")
    if assoc <= 0 or entries % assoc:
        raise ValueError(f"field '{prefix}_assoc': must divide {prefix}_entries={entries}, got {assoc}")
    sets = entries // assoc
    if sets & (sets - 1):
        raise ValueError(f"field '{prefix}_assoc': {prefix}_entries/{prefix}_assoc = {sets} sets, "
                         "not a power of two")


# -- devices ------------------------------------------------------------------------------------
class Tlb:
    """Model of one TLB level (drcachesim ``tlb_t``): set-associative, true LRU, tagged by (ASID, page, size).

    Its contents live in the simulator that owns it; the device keeps the
    geometry, its ``parent`` (the next level) and a view of its counters.
    """

    kind = "tlb"

    def __init__(self, name: str, entries: int, assoc: int, page_sizes: Iterable[int] = (SIZE_4K,),
                 parent: "Tlb | None" = None) -> None:
        page_sizes = tuple(sorted(set(page_sizes)))
        for size in page_sizes:
            if size not in PAGE_SIZES:
                raise ValueError(f"Tlb {name!r}: page size {size} not supported (4096 or 2097152)")
        if self.kind == "tlb" and not page_sizes:
            raise ValueError(f"Tlb {name!r}: page_sizes is empty")
        _check_geometry(name, entries, assoc, required=True)
        self.name = name
        self.entries = entries
        self.assoc = assoc
        self.nsets = entries // assoc
        self.page_sizes = page_sizes
        self.parent = parent
        self.stats = np.zeros(len(Metric), dtype=np.int64)

    def holds(self, size: int) -> bool:
        return size in self.page_sizes

    def get_metric(self, metric: "Metric | str") -> int:
        """One counter of this level (after ``caching_device_stats_t::get_metric()``)."""
        m = Metric[metric.upper()] if isinstance(metric, str) else Metric(metric)
        return int(self.stats[m])

    def describe(self) -> str:
        shape = "fully associative" if self.nsets == 1 else f"{self.assoc}-way"
        sizes = "+".join("4K" if s == SIZE_4K else "2M" for s in self.page_sizes)
        return f"{self.entries}-entry {shape}" + (f", {sizes}" if sizes else "")

    def print_stats(self, prefix: str = "  ", file: TextIO | None = None) -> None:
        """Print the counters as drcachesim's ``print_counts()``/``print_rates()`` do."""
        out = file or sys.stdout
        parent = f" -> {self.parent.name}" if self.parent else ""
        print(f"{prefix}{self.name} ({self.describe()}){parent} stats:", file=out)
        for m in Metric:
            print(f"{prefix}    {m.name.capitalize() + ':':<22}{int(self.stats[m]):>16,}", file=out)
        lookups = int(self.stats[Metric.HITS] + self.stats[Metric.MISSES])
        rate = 100.0 * int(self.stats[Metric.MISSES]) / lookups if lookups else 0.0
        print(f"{prefix}    {'Miss rate:':<22}{rate:>15.2f}%", file=out)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.describe()})"


class WalkCache(Tlb):
    """Model of the PDE cache: x86 paging-structure cache of PMD entries (Arm: the walk cache).

    It holds the PMD entries that point to PTE tables, one per 2 MiB region,
    so that a 4 KiB walk whose PMD entry is cached reads only the PTE.
    """

    kind = "pwc"

    def __init__(self, name: str, entries: int, assoc: int) -> None:
        super().__init__(name, entries, assoc, page_sizes=())

    def describe(self) -> str:
        shape = "fully associative" if self.nsets == 1 else f"{self.assoc}-way"
        return f"{self.entries}-entry {shape} PDE cache"


# -- the model ----------------------------------------------------------------------------------
class _TlbModel:
    """Model of drcachesim's ``tlb_simulator_t`` for one core: the parts both engines share."""

    engine = "abstract"

    def __init__(self, knobs: TlbKnobs | None = None, *, l1: Iterable[Tlb] | None = None,
                 pwc: WalkCache | None = None) -> None:
        self.knobs = (knobs or TlbKnobs()).validate()
        if l1 is None:
            l1, pwc = self._build_from_knobs(self.knobs)
        self._wire(list(l1), pwc)
        self.sim_stats = np.zeros(len(SimMetric), dtype=np.int64)
        self.dev_stats = np.zeros((len(self.devices), len(Metric)), dtype=np.int64)
        for i, dev in enumerate(self.devices):
            dev.stats = self.dev_stats[i]        # the device reads its row of the simulator's table
        self.stats_at_reset: dict | None = None
        self.refs_skipped = 0
        self.refs_warmup = 0
        self.refs_simulated = 0
        self.refs_ignored = 0

    # -- hierarchy ------------------------------------------------------------------------------
    @staticmethod
    def _build_from_knobs(k: TlbKnobs) -> tuple[list[Tlb], WalkCache | None]:
        """Model of ``tlb_simulator_t::init()``: create the devices the knobs describe."""
        l2 = None
        if k.l2_entries:
            l2 = Tlb("l2", k.l2_entries, k.l2_assoc,
                     page_sizes=PAGE_SIZES if k.l2_holds_2m else (SIZE_4K,))
        if k.l1_unified:
            l1 = [Tlb("l1d", k.l1_4k_entries, k.l1_4k_assoc, page_sizes=PAGE_SIZES, parent=l2)]
        else:
            l1 = [Tlb("l1d_4k", k.l1_4k_entries, k.l1_4k_assoc, page_sizes=(SIZE_4K,), parent=l2),
                  Tlb("l1d_2m", k.l1_2m_entries, k.l1_2m_assoc, page_sizes=(SIZE_2M,),
                      parent=l2 if k.l2_holds_2m else None)]
        pwc = WalkCache("pwc", k.pwc_entries, k.pwc_assoc) if k.pwc_entries else None
        return l1, pwc

    def _wire(self, l1: list[Tlb], pwc: WalkCache | None) -> None:
        """Check the hierarchy and number its devices: L1s, then their parent, then the PDE cache."""
        self.l1_for: list[Tlb] = []
        for size in PAGE_SIZES:
            owners = [d for d in l1 if d.holds(size)]
            if len(owners) != 1:
                raise ValueError(f"{len(owners)} L1 devices hold {size}-byte pages; exactly one must")
            self.l1_for.append(owners[0])
        parents = {id(d.parent): d.parent for d in l1 if d.parent is not None}
        if len(parents) > 1:
            raise ValueError("the L1 devices have different parents; one shared L2 is supported")
        l2 = next(iter(parents.values()), None)
        if l2 is not None and l2.parent is not None:
            raise ValueError(f"{l2.name}: a third TLB level is not supported")
        self.l2 = l2
        # The L2 is consulted for a size only if the L1 of that size points to it and it holds the size.
        self.l2_for = [l2 if (l2 is not None and self.l1_for[i].parent is l2 and l2.holds(size)) else None
                       for i, size in enumerate(PAGE_SIZES)]
        self.pwc = pwc
        devices: list[Tlb] = []
        for d in l1 + ([l2] if l2 else []) + ([pwc] if pwc else []):
            if all(d is not e for e in devices):
                devices.append(d)
        self.devices = devices
        self.levels = {d.name: d for d in devices}
        if len(self.levels) != len(devices):
            raise ValueError("TLB device names must be unique")

    def _index(self, dev: Tlb | None) -> int:
        return -1 if dev is None else next(i for i, d in enumerate(self.devices) if d is dev)

    # -- accesses -------------------------------------------------------------------------------
    def simulate(self, vaddr, is_write=None, page_shift=None, asid=0) -> None:
        """Model of ``tlb_simulator_t::process_memref()`` over an array of data accesses.

        ``vaddr`` (uint64), ``is_write`` (bool, default all loads), ``page_shift``
        (uint8: 12 or 21, default 12) and ``asid`` (int) are parallel arrays; the
        last three may also be one value for every access.  The first
        ``skip_refs`` accesses of the whole stream are dropped, the next
        ``warmup_refs`` only warm the TLBs (the stats are reset after them, the
        old ones kept in ``stats_at_reset``), then at most ``sim_refs`` are
        simulated and the rest ignored.  A bad access raises ValueError before
        anything is simulated.
        """
        acc = _Accesses.check(vaddr, is_write, page_shift, asid)
        n = acc.n
        k = self.knobs
        pos = 0
        if self.refs_skipped < k.skip_refs:
            take = min(n, k.skip_refs - self.refs_skipped)
            self.refs_skipped += take
            pos += take
        if pos < n and self.refs_warmup < k.warmup_refs:
            take = min(n - pos, k.warmup_refs - self.refs_warmup)
            self._run(acc.slice(pos, pos + take))
            self.refs_warmup += take
            pos += take
            if self.refs_warmup == k.warmup_refs:
                self.stats_at_reset = self.stats_dict()
                self.reset_stats()
        if pos < n:
            room = n - pos if not k.sim_refs else max(0, k.sim_refs - self.refs_simulated)
            take = min(n - pos, room)
            if take:
                self._run(acc.slice(pos, pos + take))
            self.refs_simulated += take
            pos += take
        self.refs_ignored += n - pos

    def _run(self, acc: "_Accesses") -> None:
        nw = acc.writes()
        self.sim_stats[SimMetric.WRITES] += nw
        self.sim_stats[SimMetric.READS] += acc.n - nw
        self.sim_stats[SimMetric.ACCESSES] += acc.n
        self._simulate_chunk(acc)

    def _simulate_chunk(self, acc: "_Accesses") -> None:
        raise NotImplementedError

    # -- invalidation ---------------------------------------------------------------------------
    def invalidate_page(self, asid: int, vpn: int, size: int) -> int:
        """Model of flush_tlb_page() / a PMD flush: drop every entry of ``asid`` overlapping one page.

        ``vpn`` is the page number at ``size`` (4096: ``vaddr >> 12``, 2 MiB:
        ``vaddr >> 21``).  For a 2 MiB page (a PMD split, a PMD COW remap) the
        PDE-cache entry of that region goes too; a 4 KiB flush is a last-level
        flush and leaves the PDE cache alone.  Returns the entries removed.
        """
        if size not in PAGE_SIZES:
            raise ValueError(f"size: {size} not supported (4096 or 2097152)")
        self._check_asid(asid)
        start = int(vpn) * size
        if not 0 <= start < USER_VA_LIMIT:
            raise ValueError(f"vpn: {vpn:#x} is outside the user address space for size {size}")
        return self._shootdown(asid, start, start + size, with_pwc=size == SIZE_2M)

    def invalidate_range(self, asid: int, start: int, end: int) -> int:
        """Model of flush_tlb_range(): drop the entries of ``asid`` overlapping [start, end), PDE cache too."""
        self._check_asid(asid)
        start, end = int(start), int(end)
        if not 0 <= start < end:
            raise ValueError(f"range: need 0 <= start < end, got [{start:#x}, {end:#x})")
        # No entry lies above the user address space (and the kernels take 64-bit ints).
        return self._shootdown(asid, min(start, USER_VA_LIMIT), min(end, USER_VA_LIMIT), with_pwc=True)

    def invalidate_pages(self, asid: int, vpns) -> int:
        """Many flush_tlb_page() calls of 4 KiB pages (COW remaps, swap-out), one shootdown each.

        Drops every entry of ``asid`` whose page holds one of the 4 KiB pages
        ``vpns`` (a 2 MiB entry goes if any of them lies inside it); the PDE
        cache is left alone, as for single 4 KiB flushes.  Returns entries removed.
        """
        self._check_asid(asid)
        arr = np.asarray(vpns).ravel()
        if not arr.size:
            return 0
        if arr.dtype.kind not in "iu":
            raise ValueError(f"vpns: expected integer page numbers, got {arr.dtype}")
        for bad in (arr.min(), arr.max()):
            if not 0 <= int(bad) < USER_VA_LIMIT >> PAGE_SHIFT_4K:
                raise ValueError(f"vpns: page {int(bad):#x} is outside the user address space")
        vpns = np.unique(arr.astype(np.int64))
        removed = self._invalidate_pages(asid, vpns)
        self.sim_stats[SimMetric.SHOOTDOWNS] += len(vpns)
        self.sim_stats[SimMetric.INVALIDATED_ENTRIES] += removed
        return removed

    def _invalidate_pages(self, asid: int, vpns: np.ndarray) -> int:
        return sum(self._invalidate(asid, int(v) << PAGE_SHIFT_4K, (int(v) + 1) << PAGE_SHIFT_4K, False)
                   for v in vpns.tolist())

    def flush_asid(self, asid: int) -> int:
        """Model of flush_tlb_mm(): drop every entry of one address space (fork's parent flush, exit)."""
        self._check_asid(asid)
        return self._shootdown(asid, 0, 1 << 62, with_pwc=True)

    def flush_all(self) -> int:
        """Model of flush_tlb_all(): drop every entry of every address space."""
        return self._shootdown(-1, 0, 1 << 62, with_pwc=True)

    def _shootdown(self, asid: int, start: int, end: int, with_pwc: bool) -> int:
        removed = self._invalidate(asid, start, end, with_pwc)
        self.sim_stats[SimMetric.SHOOTDOWNS] += 1
        self.sim_stats[SimMetric.INVALIDATED_ENTRIES] += removed
        return removed

    def _invalidate(self, asid: int, start: int, end: int, with_pwc: bool) -> int:
        raise NotImplementedError

    @staticmethod
    def _check_asid(asid: int) -> None:
        if not 0 <= int(asid) < ASID_LIMIT:
            raise ValueError(f"asid: must be within [0, {ASID_LIMIT}), got {asid}")

    # -- stats ----------------------------------------------------------------------------------
    def reset_stats(self) -> None:
        """Model of ``caching_device_stats_t::reset()``: zero the counters, keep the TLB contents."""
        self.dev_stats[:] = 0
        self.sim_stats[:] = 0

    def get_metric(self, metric: "Metric | SimMetric | str", level: str | None = None) -> int:
        """One counter: a level's (``level`` given, or a :class:`Metric`) or the simulator's."""
        if level is not None or isinstance(metric, Metric):
            name = level if level is not None else self.l1_for[0].name
            if name not in self.levels:
                raise KeyError(f"level {name!r}: not one of {sorted(self.levels)}")
            return self.levels[name].get_metric(metric)
        m = SimMetric[metric.upper()] if isinstance(metric, str) else SimMetric(metric)
        return int(self.sim_stats[m])

    def translation_ns(self) -> float:
        """Estimated time spent translating: L2 hits plus page-walk references, in ns."""
        k = self.knobs
        l2_hits = self.l2.get_metric(Metric.HITS) if self.l2 else 0
        cycles = l2_hits * k.l2_hit_cycles + int(self.sim_stats[SimMetric.WALK_MEM_REFS]) * k.walk_ref_cycles
        return cycles / k.cpu_ghz

    def shootdown_ns(self) -> float:
        """Estimated cost of the flushes issued: shootdowns × ``shootdown_ns``."""
        return int(self.sim_stats[SimMetric.SHOOTDOWNS]) * self.knobs.shootdown_ns

    def stats_dict(self) -> dict:
        """Every counter as plain ints (JSON-ready), keyed by level name and metric name."""
        return {
            "preset": self.knobs.name,
            **{_metric_name(m): int(self.sim_stats[m]) for m in SimMetric},
            "levels": {d.name: {_metric_name(m): int(d.stats[m]) for m in Metric} for d in self.devices},
            "refs": {"skipped": self.refs_skipped, "warmup": self.refs_warmup,
                     "simulated": self.refs_simulated, "ignored": self.refs_ignored},
            "translation_ns": round(self.translation_ns(), 3),
            "shootdown_ns": round(self.shootdown_ns(), 3),
        }

    def print_results(self, file: TextIO | None = None) -> None:
        """Model of ``tlb_simulator_t::print_results()``: every level, the walks, the flushes."""
        out = file or sys.stdout
        s = self.sim_stats
        print(f"TLB simulation results ({self.knobs.name}, {self.engine} engine):", file=out)
        print(f"  {'Accesses:':<26}{int(s[SimMetric.ACCESSES]):>16,}  "
              f"({int(s[SimMetric.READS]):,} loads, {int(s[SimMetric.WRITES]):,} stores)", file=out)
        if self.refs_skipped or self.refs_warmup or self.refs_ignored:
            print(f"  {'Skipped / warmup / ignored:':<26}{self.refs_skipped:,} / {self.refs_warmup:,} / "
                  f"{self.refs_ignored:,}", file=out)
        for dev in self.devices:
            dev.print_stats("  ", out)
        print("  Page walks:", file=out)
        for m, label in ((SimMetric.WALKS_PMD, "PMD (2 MiB page)"),
                         (SimMetric.WALKS_PTE_PWC_HIT, "PTE, PDE-cache hit"),
                         (SimMetric.WALKS_PTE_PWC_MISS, "PTE, PDE-cache miss"),
                         (SimMetric.WALK_MEM_REFS, "Memory references")):
            print(f"      {label + ':':<22}{int(s[m]):>16,}", file=out)
        print(f"  {'Shootdowns:':<26}{int(s[SimMetric.SHOOTDOWNS]):>16,}  "
              f"({int(s[SimMetric.INVALIDATED_ENTRIES]):,} entries invalidated, "
              f"{self.shootdown_ns() / 1000:,.1f} us)", file=out)
        acc = int(s[SimMetric.ACCESSES])
        per = self.translation_ns() / acc if acc else 0.0
        print(f"  {'Translation overhead:':<26}{self.translation_ns() / 1000:>16,.1f} us  "
              f"({per:.2f} ns/access)", file=out)

    def results_text(self) -> str:
        import io
        buf = io.StringIO()
        self.print_results(buf)
        return buf.getvalue()


# -- the numba engine ---------------------------------------------------------------------------
# Device table columns and kinds.
_D_KIND, _D_BASE, _D_NSETS, _D_ASSOC, _D_WBITS, _D_HBASE, _D_HBITS, _D_QBASE, _D_QSIZE = range(9)
_SET_ASSOC, _FULLY_ASSOC = 0, 1
# Per-device state columns: the stamp clock, the queue's head and tail, the
# next stamp given to an invalidated way of a fully associative device (counts down from -entries).
_S_CLOCK, _S_QHEAD, _S_QTAIL, _S_LOW = range(4)
_GOLD = np.int64(-7046029254386353131)       # 0x9E3779B97F4A7C15: Fibonacci hashing
_NO_PAGES = np.zeros(0, dtype=np.int64)      # _invalidate_kernel: no page filter
# _level_pass's walk mode.  Its calls pass NumPy ints (and np.int64() counts), not literals: a literal
# argument makes numba compile another version of the pass.
_OFF, _ON = np.int64(0), np.int64(1)
CHUNK = 256                                  # accesses per pipeline step of the hot loop
_KEY_ASID = ~np.int64((1 << ASID_SHIFT) - 1)


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


class TlbSimulator(_TlbModel):
    """Model of drcachesim's ``tlb_simulator_t`` for one core, with a numba-compiled hot loop.

    Storage: every device's ways are slots of two flat arrays, the key held
    (or EMPTY) and an LRU stamp.  A set-associative device (more than one
    set) finds a key by comparing the whole set at once (a vector compare)
    and its LRU way as the smallest stamp; a stamp is the device's access
    clock shifted left, with the way number in the low bits, so an invalid
    way (clock 0) is always taken before a valid one.  A fully associative
    device (one set: an L1 of 48-96 entries, a PDE cache) would make that
    scan a chain of stores and wide loads over the same lines, so it keeps
    a linear-probing hash from key to slot (an evicted key's bucket is found
    through a slot-to-bucket index and deleted by backward shift) and its
    LRU order as a queue of (stamp, slot) records in touch order: a record
    is live while its slot still carries that stamp, and the LRU way is the
    slot of the first live record.

    The hot loop is a pipeline over blocks of :data:`CHUNK` accesses: the
    block's keys through the L1(s), the L1 misses in order through the L2,
    the L2 misses through the page walk and the PDE cache.  The levels are
    independent LRU structures and each sees its own accesses in stream
    order, so the counts are those of the access-at-a-time reference
    engine; a block pass has few unpredictable branches.
    """

    engine = "numba"

    def __init__(self, knobs: TlbKnobs | None = None, *, l1: Iterable[Tlb] | None = None,
                 pwc: WalkCache | None = None) -> None:
        super().__init__(knobs, l1=l1, pwc=pwc)
        ndev = len(self.devices)
        dev = np.zeros((ndev, 9), dtype=np.int64)
        slot = hbase = qbase = 0
        for i, d in enumerate(self.devices):
            if d.nsets > 1:
                dev[i] = (_SET_ASSOC, slot, d.nsets, d.assoc, max(1, (d.assoc - 1).bit_length()), 0, 0, 0, 0)
            else:
                # Hash: load factor <= 1/32 (1/8 for a device of more than 1024 entries), so that a probe
                # rarely goes past its home bucket and the probe loop's exit is predicted.  Queue: every
                # live record plus two blocks of touches.
                hsize = _pow2_at_least(max(8 * d.entries, min(32 * d.entries, 1 << 15)))
                qsize = _pow2_at_least(2 * (d.entries + CHUNK))
                dev[i] = (_FULLY_ASSOC, slot, 1, d.entries, max(1, (d.entries - 1).bit_length()),
                          hbase, hsize.bit_length() - 1, qbase, qsize)
                hbase += hsize
                qbase += qsize
            slot += d.entries
        self._dev = dev
        self._tag = np.full(slot, EMPTY, dtype=np.int64)
        self._stamp = np.zeros(slot, dtype=np.int64)
        self._hk = np.full(max(1, hbase), EMPTY, dtype=np.int64)
        self._hv = np.zeros(max(1, hbase), dtype=np.int32)
        self._sb = np.zeros(slot, dtype=np.int32)
        self._q = np.zeros(max(1, qbase), dtype=np.int64)
        self._dst = np.zeros((ndev, 4), dtype=np.int64)
        _init_devices(dev, self._stamp, self._q, self._dst)
        self._buf = np.zeros((7, CHUNK + 1), dtype=np.int64)
        self._last_key = np.full(ndev, EMPTY, dtype=np.int64)
        self._l1_for = np.array([self._index(d) for d in self.l1_for], dtype=np.int64)
        self._l2_for = np.array([self._index(d) for d in self.l2_for], dtype=np.int64)
        k = self.knobs
        self._walk_refs = np.array([k.pmd_walk_refs, k.pte_walk_refs_pwc_hit, k.pte_walk_refs_pwc_miss],
                                   dtype=np.int64)

    def _state(self):
        return self._dev, self._dst, self._tag, self._stamp, self._hk, self._hv, self._sb, self._q

    def _simulate_chunk(self, acc: _Accesses) -> None:
        ps_step = 0 if len(acc.page_shift) == 1 and acc.n != 1 else 1
        asid_step = 0 if len(acc.asid) == 1 and acc.n != 1 else 1
        _simulate_kernel(acc.vaddr, acc.page_shift, ps_step, acc.asid, asid_step, *self._state(),
                         self._l1_for, self._l2_for, self._index(self.pwc), self._walk_refs,
                         self.dev_stats, self.sim_stats, self._last_key, self._buf)

    def _invalidate(self, asid: int, start: int, end: int, with_pwc: bool,
                    starts: np.ndarray = _NO_PAGES) -> int:
        skip = self._index(self.pwc) if not with_pwc else -1
        removed = _invalidate_kernel(*self._state(), self.dev_stats, asid, start, end, starts, skip)
        self._last_key[:] = EMPTY            # the fast path must look again
        return removed

    def _invalidate_pages(self, asid: int, vpns: np.ndarray) -> int:
        # Optimization: one pass over the TLBs for a sorted set of pages.
        return self._invalidate(asid, 0, USER_VA_LIMIT, False, vpns << PAGE_SHIFT_4K)

    def contents(self, level: str) -> list[tuple[int, int, int]]:
        """The valid entries of one level as (asid, vaddr, size), most recently used first per set."""
        d = self._index(self.levels[level])
        base, nsets, assoc = (int(x) for x in self._dev[d, [_D_BASE, _D_NSETS, _D_ASSOC]])
        out = []
        for s in range(nsets):
            tags = self._tag[base + s * assoc: base + (s + 1) * assoc]
            stamps = self._stamp[base + s * assoc: base + (s + 1) * assoc]
            for w in np.argsort(-stamps, kind="stable"):
                if tags[w] != EMPTY:
                    out.append(_decode(int(tags[w])))
        return out


def _decode(key: int) -> tuple[int, int, int]:
    big = key & 1
    vpn = (key >> 1) & _VPN_MASK
    shift = PAGE_SHIFT_2M if big else PAGE_SHIFT_4K
    return key >> ASID_SHIFT, vpn << shift, 1 << shift


@njit(cache=True, _nrt=False)
def _init_devices(dev, stamp, q, dst):
    """Every way invalid.  Set-associative: stamp = way number (clock 0).  Fully associative:
    slot x gets stamp x - entries and its queue record, oldest first."""
    for d in range(dev.shape[0]):
        base, assoc, wbits = dev[d, _D_BASE], dev[d, _D_ASSOC], dev[d, _D_WBITS]
        n = dev[d, _D_NSETS] * assoc
        if dev[d, _D_KIND] == _SET_ASSOC:
            for x in range(n):
                stamp[base + x] = x % assoc
        else:
            for x in range(n):
                stamp[base + x] = x - n
                q[dev[d, _D_QBASE] + x] = ((x - n) << wbits) | x
            dst[d, _S_QHEAD] = 0
            dst[d, _S_QTAIL] = n
            dst[d, _S_LOW] = -n - 1


@njit(cache=True, inline="always", _nrt=False)
def _home(key, bits):
    """The home bucket of ``key`` in a table of 2**bits buckets (Fibonacci hashing)."""
    return np.uint64(((key * _GOLD) >> (64 - bits)) & ((1 << bits) - 1))


@njit(cache=True, _nrt=False)
def _fa_compact(stamp, q, dst, d, wbits):
    """Drop the dead records of a fully associative device's LRU queue (the live ones keep their order)."""
    qm = np.uint64(q.shape[0] - 1)
    wm = (1 << wbits) - 1
    w = dst[d, _S_QHEAD]
    for r in range(dst[d, _S_QHEAD], dst[d, _S_QTAIL]):
        rec = q[np.uint64(r) & qm]
        if stamp[rec & wm] == rec >> wbits:
            q[np.uint64(w) & qm] = rec
            w += 1
    dst[d, _S_QTAIL] = w


@njit(cache=True, inline="always", _nrt=False)
def _fa_open(dev, dst, tag, stamp, hk, hv, sb, q, d, n):
    """A fully associative device's arrays, with room made in its queue for n more records."""
    base, nent, wbits = dev[d, _D_BASE], dev[d, _D_ASSOC], dev[d, _D_WBITS]
    hb, bits, qb, qsize = dev[d, _D_HBASE], dev[d, _D_HBITS], dev[d, _D_QBASE], dev[d, _D_QSIZE]
    tg = tag[base:base + nent]
    sp = stamp[base:base + nent]
    bk = sb[base:base + nent]
    h_k = hk[hb:hb + (1 << bits)]
    h_v = hv[hb:hb + (1 << bits)]
    qq = q[qb:qb + qsize]
    if dst[d, _S_QTAIL] - dst[d, _S_QHEAD] + n > qsize:
        _fa_compact(sp, qq, dst, d, wbits)
    return tg, sp, bk, h_k, h_v, qq, bits, wbits


@njit(cache=True, inline="always", _nrt=False)
def _hash_delete(h_k, h_v, bk, bits, i):
    """Empty bucket ``i`` of a linear-probing hash by backward shift; ``bk`` follows the moved slots."""
    m = np.uint64((1 << bits) - 1)
    i = np.uint64(i)
    j = i
    while True:
        j = (j + np.uint64(1)) & m
        k = h_k[j]
        if k == EMPTY:
            break
        # The entry at j may move back to i unless its home lies cyclically in (i, j].
        h = _home(k, bits)
        if (j - h) & m >= (j - i) & m:
            h_k[i] = k
            h_v[i] = h_v[j]
            bk[h_v[j]] = np.int32(i)
            i = j
    h_k[i] = EMPTY


@njit(cache=True, inline="always", _nrt=False)
def _fa_access(tg, sp, bk, h_k, h_v, qq, bits, wbits, key, t, qh, qt):
    """Model of ``tlb_t::request()`` at a fully associative device, stamp ``t``, queue [qh, qt).

    Returns (miss, a valid entry was evicted, new qh); the caller advances
    ``t`` and ``qt`` by one.
    """
    m = np.uint64((1 << bits) - 1)
    p = _home(key, bits)
    k = h_k[p]
    while k != key and k != EMPTY:
        p = (p + np.uint64(1)) & m
        k = h_k[p]
    hit = np.int64(k == key)
    # The LRU way: the slot of the first live record (every slot has exactly one).
    qm = np.uint64(qq.shape[0] - 1)
    wm = (1 << wbits) - 1
    rec = qq[np.uint64(qh) & qm]
    xv = np.uint64(rec & wm)
    while sp[xv] != rec >> wbits:
        qh += 1
        rec = qq[np.uint64(qh) & qm]
        xv = np.uint64(rec & wm)
    x = np.uint64(h_v[p]) if hit else xv
    miss = 1 - hit
    evict = 0
    if miss:
        old = tg[x]
        evict = np.int64(old != EMPTY)
        gone = bk[x]
        h_k[p] = key
        h_v[p] = np.int32(x)
        bk[x] = np.int32(p)
        tg[x] = key
        if evict:
            _hash_delete(h_k, h_v, bk, bits, gone)
    sp[x] = t
    qq[np.uint64(qt) & qm] = (t << wbits) | np.int64(x)
    return miss, evict, qh + miss


@njit(cache=True, inline="always", _nrt=False)
def _key_of(vaddr, page_shift, ps_step, asid, asid_step, i):
    """The entry key of access ``i``: (asid << 48) | (page number at its own size << 1) | is_2m."""
    big = np.int64(page_shift[i * ps_step] == 21)
    vpn = np.int64(vaddr[i]) >> (12 + 9 * big)
    return (asid[i * asid_step] << ASID_SHIFT) | (vpn << 1) | big


@njit(cache=True, inline="always", _nrt=False)
def _pde_key(key):
    """The PDE-cache key of a 4 KiB key: its 2 MiB region, tagged as a 2 MiB page."""
    return (key & _KEY_ASID) | ((((key >> 1) & _VPN_MASK) >> 9) << 1) | 1


@njit(cache=True, inline="always", _nrt=False)
def _emit(out, nout, key, miss, walk):
    """Append a missing key to ``out``.  In walk mode only a 4 KiB key goes on, as its PDE-cache key."""
    out[np.uint64(nout)] = _pde_key(key) if walk else key
    return nout + ((miss & (1 - (key & 1))) if walk else miss)


@njit(cache=True, _nrt=False)
def _fa_pass(keys, n, dev, dst, tag, stamp, hk, hv, sb, q, d, out, flags, dev_stats, walk):
    """Model of ``tlb_t::request()`` for a block of keys at a fully associative device.

    Writes 1 (miss) / 0 (hit) to ``flags`` and the missing keys in order to
    ``out`` (in walk mode: the PDE-cache keys of the 4 KiB ones, see _emit);
    returns (misses, keys written).
    """
    tg, sp, bk, h_k, h_v, qq, bits, wbits = _fa_open(dev, dst, tag, stamp, hk, hv, sb, q, d, n)
    t, qh, qt = dst[d, _S_CLOCK], dst[d, _S_QHEAD], dst[d, _S_QTAIL]
    nm = nout = ev = 0
    for i in range(n):
        key = keys[i]
        t += 1
        miss, evict, qh = _fa_access(tg, sp, bk, h_k, h_v, qq, bits, wbits, key, t, qh, qt)
        qt += 1
        ev += evict
        flags[i] = miss
        nm += miss
        nout = _emit(out, nout, key, miss, walk)
    dst[d, _S_CLOCK], dst[d, _S_QHEAD], dst[d, _S_QTAIL] = t, qh, qt
    dev_stats[d, 0] += n - nm
    dev_stats[d, 1] += nm
    dev_stats[d, 2] += ev
    return nm, nout


@njit(cache=True, _nrt=False)
def _fa_decode_pass(vaddr, page_shift, ps_step, asid, asid_step, lo, hi, last, dev, dst, tag, stamp, hk, hv,
                    sb, q, d, out, dev_stats):
    """Decode accesses [lo, hi) and run them through a unified, fully associative L1 (as _fa_pass).

    Returns (misses, the last key).  A repeat of the last key is an L1 hit
    with no LRU change (drcachesim's "check last tag and pid").
    Optimization: _decode_l1() then _fa_pass() give the same; fusing them
    saves about 4 % of the whole model on a random stream (Zen 4, Neoverse).
    """
    tg, sp, bk, h_k, h_v, qq, bits, wbits = _fa_open(dev, dst, tag, stamp, hk, hv, sb, q, d, hi - lo)
    t, qh, qt = dst[d, _S_CLOCK], dst[d, _S_QHEAD], dst[d, _S_QTAIL]
    nm = ev = 0
    for i in range(lo, hi):
        key = _key_of(vaddr, page_shift, ps_step, asid, asid_step, i)
        if key == last:
            continue
        last = key
        t += 1
        miss, evict, qh = _fa_access(tg, sp, bk, h_k, h_v, qq, bits, wbits, key, t, qh, qt)
        qt += 1
        ev += evict
        out[np.uint64(nm)] = key
        nm += miss
    dst[d, _S_CLOCK], dst[d, _S_QHEAD], dst[d, _S_QTAIL] = t, qh, qt
    dev_stats[d, 0] += hi - lo - nm
    dev_stats[d, 1] += nm
    dev_stats[d, 2] += ev
    return nm, last


@njit(cache=True, _nrt=False)
def _sa_pass(keys, n, dev, dst, tag, stamp, d, out, flags, dev_stats, walk):
    """Model of ``tlb_t::request()`` for a block of keys at a set-associative device (see _fa_pass)."""
    base, nsets, assoc, wbits = dev[d, _D_BASE], dev[d, _D_NSETS], dev[d, _D_ASSOC], dev[d, _D_WBITS]
    t = dst[d, _S_CLOCK]
    sm = nsets - 1
    wm = (1 << wbits) - 1
    nm = nout = ev = 0
    for i in range(n):
        key = keys[i]
        b = np.uint64(base + (((key >> 1) & _VPN_MASK) & sm) * assoc)
        tg = tag[b:b + np.uint64(assoc)]
        sv = stamp[b:b + np.uint64(assoc)]
        r = -1
        lru = sv[0]
        for w in range(tg.shape[0]):
            r = max(r, w if tg[w] == key else -1)
            lru = min(lru, sv[w])
        hit = r >= 0
        w = np.uint64(r) if hit else np.uint64(lru & wm)
        miss = 1 - np.int64(hit)
        ev += miss & np.int64(tg[w] != EMPTY)
        t += 1
        tg[w] = key
        sv[w] = (t << wbits) | np.int64(w)
        flags[i] = miss
        nm += miss
        nout = _emit(out, nout, key, miss, walk)
    dst[d, _S_CLOCK] = t
    dev_stats[d, 0] += n - nm
    dev_stats[d, 1] += nm
    dev_stats[d, 2] += ev
    return nm, nout


@njit(cache=True, _nrt=False)
def _level_pass(keys, n, dev, dst, tag, stamp, hk, hv, sb, q, d, out, flags, dev_stats, walk):
    """One device over a block of keys: (misses, keys written to ``out``); see _fa_pass."""
    if dev[d, _D_KIND] == _FULLY_ASSOC:
        return _fa_pass(keys, n, dev, dst, tag, stamp, hk, hv, sb, q, d, out, flags, dev_stats, walk)
    return _sa_pass(keys, n, dev, dst, tag, stamp, d, out, flags, dev_stats, walk)


@njit(cache=True, _nrt=False)
def _decode_l1(vaddr, page_shift, ps_step, asid, asid_step, lo, hi, last4k, last2m, split, dev, dst, tag,
               stamp, hk, hv, sb, q, d4, d2m, buf, dev_stats):
    """Decode accesses [lo, hi) and run them through the L1(s); the misses go to ``buf[3]`` in order.

    Returns (misses, last 4 KiB key, last 2 MiB key).  A repeat of an L1's last
    key is a hit with no LRU change (drcachesim's "check last tag and pid").
    With split L1s each device sees only its own keys, and the misses of the
    two are merged back in stream order.
    """
    k4, k2, order, m1, m2, f4, f2 = buf[0], buf[1], buf[2], buf[3], buf[4], buf[5], buf[6]
    n = n4 = n2 = fast4 = fast2 = 0
    for i in range(lo, hi):
        key = _key_of(vaddr, page_shift, ps_step, asid, asid_step, i)
        big = key & 1
        if key == (last2m if big else last4k):
            fast2 += big
            fast4 += 1 - big
            continue
        if split:
            last2m = key if big else last2m
            last4k = last4k if big else key
        else:
            last4k = last2m = key
        k4[np.uint64(n4)] = key
        k2[np.uint64(n2)] = key
        order[np.uint64(n)] = big
        n4 += 1 - big if split else 1
        n2 += big if split else 0
        n += 1
    dev_stats[d4, 0] += fast4
    dev_stats[d2m, 0] += fast2
    if not split:
        nm = _level_pass(k4, np.int64(n4), dev, dst, tag, stamp, hk, hv, sb, q, d4, m1, f4, dev_stats, _OFF)[0]
        return nm, last4k, last2m
    _level_pass(k4, np.int64(n4), dev, dst, tag, stamp, hk, hv, sb, q, d4, m2, f4, dev_stats, _OFF)
    _level_pass(k2, np.int64(n2), dev, dst, tag, stamp, hk, hv, sb, q, d2m, m2, f2, dev_stats, _OFF)
    i4 = i2 = nm = 0
    for j in range(n):
        big = order[j]
        m1[np.uint64(nm)] = k2[i2] if big else k4[i4]
        nm += f2[i2] if big else f4[i4]
        i2 += big
        i4 += 1 - big
    return nm, last4k, last2m


@njit(cache=True, nogil=True, _nrt=False)
def _simulate_kernel(vaddr, page_shift, ps_step, asid, asid_step, dev, dst, tag, stamp, hk, hv, sb, q,
                     l1_for, l2_for, pwc, walk_refs, dev_stats, sim_stats, last_key, buf):
    """The hot loop: blocks of accesses through L1, L2 and the page walk (see TlbSimulator).

    ``buf`` rows: 0 the block's keys (its 4 KiB keys when the L1s are split),
    1 the 2 MiB keys of split L1s, 2 the page size of each key in order (split
    L1s), 3 and 4 the misses of one level and of the next, 5 and 6 miss flags.
    """
    k4, k2, m1, m2, f4 = buf[0], buf[1], buf[3], buf[4], buf[5]
    d4, d2m = l1_for[0], l1_for[1]
    split = d4 != d2m
    last4k, last2m = last_key[d4], last_key[d2m]
    walks_pmd = walks_pte_hit = walks_pte_miss = 0
    l2 = l2_for[0] if l2_for[0] >= 0 else l2_for[1]
    l2_both = l2_for[0] >= 0 and l2_for[1] >= 0
    total = vaddr.shape[0]
    fused = not split and dev[d4, _D_KIND] == _FULLY_ASSOC
    for lo in range(0, total, CHUNK):
        hi = min(total, lo + CHUNK)
        if fused:
            nm, last4k = _fa_decode_pass(vaddr, page_shift, ps_step, asid, asid_step, lo, hi, last4k, dev, dst,
                                         tag, stamp, hk, hv, sb, q, d4, m1, dev_stats)
            last2m = last4k
        else:
            nm, last4k, last2m = _decode_l1(vaddr, page_shift, ps_step, asid, asid_step, lo, hi, last4k,
                                            last2m, split, dev, dst, tag, stamp, hk, hv, sb, q, d4, d2m, buf,
                                            dev_stats)
        if nm == 0:
            continue
        # L2, then the page walks: a 2 MiB miss ends at the PMD; a 4 KiB one looks up its region
        # in the PDE cache.  An L2 that serves both sizes writes the PDE-cache keys itself.
        if l2 >= 0 and l2_both:
            nw, np_ = _level_pass(m1, np.int64(nm), dev, dst, tag, stamp, hk, hv, sb, q, l2, m2, f4, dev_stats, _ON)
            walks_pmd += nw - np_
        else:
            if l2 >= 0:
                # The L1 misses of the size the L2 serves go through it in order; the others go to the walk.
                served = 0 if l2_for[0] >= 0 else 1
                nk = nw = 0
                for j in range(nm):
                    key = m1[j]
                    mine = np.int64((key & 1) == served)
                    k4[np.uint64(nk)] = key
                    nk += mine
                    m2[np.uint64(nw)] = key
                    nw += 1 - mine
                n2 = _level_pass(k4, np.int64(nk), dev, dst, tag, stamp, hk, hv, sb, q, l2, k2, f4, dev_stats, _OFF)[1]
                for j in range(n2):
                    m2[np.uint64(nw + j)] = k2[j]
                nw += n2
                src = m2
            else:
                nw = nm
                src = m1
            np_ = 0
            for j in range(nw):
                key = src[j]
                walks_pmd += key & 1
                np_ = _emit(m2, np_, key, 1, True)
        if pwc >= 0 and np_:
            misses = _level_pass(m2, np.int64(np_), dev, dst, tag, stamp, hk, hv, sb, q, pwc, m1, f4, dev_stats,
                                 _OFF)[0]
            walks_pte_hit += np_ - misses
            walks_pte_miss += misses
        else:
            walks_pte_miss += np_
    last_key[d4] = last4k
    last_key[d2m] = last2m
    sim_stats[3] += walks_pmd
    sim_stats[4] += walks_pte_hit
    sim_stats[5] += walks_pte_miss
    sim_stats[6] += walks_pmd * walk_refs[0] + walks_pte_hit * walk_refs[1] + walks_pte_miss * walk_refs[2]


@njit(cache=True, nogil=True, _nrt=False)
def _check_kernel(vaddr, page_shift, asid):
    """First bad access: (index, 0 address / 1 page size / 2 asid), or (-1, -1)."""
    # Optimization: branch-free reductions first (they vectorize); the index only when one is bad.
    top = np.uint64(0)
    for i in range(vaddr.shape[0]):
        top = max(top, vaddr[i])
    if top >= np.uint64(1 << 47):
        for i in range(vaddr.shape[0]):
            if vaddr[i] >= np.uint64(1 << 47):
                return i, 0
    bad = 0
    for i in range(page_shift.shape[0]):
        bad |= (page_shift[i] != 12) & (page_shift[i] != 21)
    if bad:
        for i in range(page_shift.shape[0]):
            if page_shift[i] != 12 and page_shift[i] != 21:
                return i, 1
    lo = hi = asid[0] if asid.shape[0] else 0
    for i in range(asid.shape[0]):
        lo = min(lo, asid[i])
        hi = max(hi, asid[i])
    if lo < 0 or hi >= (1 << 15):
        for i in range(asid.shape[0]):
            if asid[i] < 0 or asid[i] >= (1 << 15):
                return i, 2
    return -1, -1


@njit(cache=True, _nrt=False)
def _fa_drop(dev, dst, tag, stamp, hk, hv, sb, q, d, x):
    """Invalidate slot ``x`` of a fully associative device: out of the hash, and made the LRU way
    (a record at the queue's front, with a stamp below every other)."""
    tg, sp, bk, h_k, h_v, qq, bits, wbits = _fa_open(dev, dst, tag, stamp, hk, hv, sb, q, d, 1)
    _hash_delete(h_k, h_v, bk, bits, bk[x])
    tg[x] = EMPTY
    low = dst[d, _S_LOW]
    dst[d, _S_LOW] = low - 1
    sp[x] = low
    qh = dst[d, _S_QHEAD] - 1
    dst[d, _S_QHEAD] = qh
    qq[np.uint64(qh) & np.uint64(qq.shape[0] - 1)] = (low << wbits) | x


@njit(cache=True, _nrt=False)
def _invalidate_kernel(dev, dst, tag, stamp, hk, hv, sb, q, dev_stats, asid, start, end, starts, skip_dev):
    """Drop every entry (of ``asid``, or all if < 0) whose page overlaps [start, end) and, unless
    ``starts`` is empty, holds one of the sorted 4 KiB page addresses ``starts``."""
    total = 0
    for d in range(dev.shape[0]):
        if d == skip_dev:
            continue
        base, assoc = dev[d, _D_BASE], dev[d, _D_ASSOC]
        n = 0
        for x in range(dev[d, _D_NSETS] * assoc):
            key = tag[base + x]
            if key == EMPTY or (asid >= 0 and (key >> ASID_SHIFT) != asid):
                continue
            shift = 21 if key & 1 else 12
            lo = ((key >> 1) & _VPN_MASK) << shift
            if lo >= end or lo + (1 << shift) <= start:
                continue
            if starts.shape[0]:
                i = np.searchsorted(starts, lo)
                if i >= starts.shape[0] or starts[i] >= lo + (1 << shift):
                    continue
            if dev[d, _D_KIND] == _SET_ASSOC:
                tag[base + x] = EMPTY
                stamp[base + x] = x % assoc          # clock 0: the set's next victim
            else:
                _fa_drop(dev, dst, tag, stamp, hk, hv, sb, q, d, x)
            n += 1
        dev_stats[d, 3] += n
        total += n
    return total


# -- reading page sizes from the simulated kernel -----------------------------------------------
def page_shifts_of(proc: "Process", vaddr) -> np.ndarray:
    """The page size mapping each address now in a simulated process: 21 under a PMD leaf, else 12."""
    from ..kernel.mm import PMD_LEAF

    vaddr = np.asarray(vaddr, dtype=np.int64)
    pt = proc.mm.pt
    slots = pt.lookup_slots(vaddr >> PAGE_SHIFT_2M)
    kind = np.where(slots >= 0, pt.pmd_kind[np.maximum(slots, 0)], 0)
    return np.where(kind == PMD_LEAF, PAGE_SHIFT_2M, PAGE_SHIFT_4K).astype(np.uint8)


# -- read timing: per-access time of a read sweep from the TLB model's counts ----------------------
READ_PATTERNS = ("gather", "chase", "seq")
_RATE_BASE = 0x7F00_0000_0000          # where a simulated read sweep's region starts (1 GiB aligned)


@dataclass
class ReadTiming:
    """The fitted free parameters of :func:`read_ns` for one machine (see its docstring for the form).

    ``tlb_preset`` names the :data:`~thpcow.machine.presets.PRESETS` entry
    whose geometry gives the TLB counts; its ``l2_hit_cycles`` / ``cpu_ghz``
    price an L2 TLB hit.  Under nested paging (a VM) the walk costs include the
    host side of each guest page-table reference.
    """

    name: str = "default"
    source: str = ""
    tlb_preset: str = "intel-spr-goldencove"
    llc_ns: float = 35.0          # a dependent load that hits the last-level cache
    dram_ns: float = 110.0        # a dependent load served by memory
    llc_mib: float = 8.0          # effective LLC capacity for random lines (MiB)
    cache_slope: float = 2.0      # k: past its capacity a cache holds (capacity / footprint) ** k
    walk_hit_ns: float = 10.0     # one page-table reference whose line is cached
    walk_miss_ns: float = 60.0    # extra for a PTE reference whose line is not cached
    pt_cache_mib: float = 2.0     # effective cache capacity left to PTE lines (MiB)
    mlp: float = 12.0             # independent loads in flight (numpy take)
    walk_mlp: float = 4.0         # page walks in flight for independent loads (the page walkers)
    gather_ns: float = 1.0        # per-element loop cost of numpy take
    seq_cache_ns: float = 0.28    # ns per 8-byte word streamed from the caches
    seq_dram_ns: float = 0.6      # ns per 8-byte word streamed from memory
    seq_llc_mib: float = 32.0     # the largest region a sequential sweep streams from the caches

    PARAMS = ("llc_ns", "dram_ns", "llc_mib", "cache_slope", "walk_hit_ns", "walk_miss_ns", "pt_cache_mib",
              "mlp", "walk_mlp", "gather_ns", "seq_cache_ns", "seq_dram_ns", "seq_llc_mib")

    def validate(self) -> "ReadTiming":
        for name in self.PARAMS:
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, (int, float)) or not val >= 0:
                raise ValueError(f"field '{name}': must be a number >= 0, got {val!r}")
        for name in ("llc_mib", "pt_cache_mib", "mlp", "walk_mlp", "cache_slope", "seq_llc_mib"):
            if getattr(self, name) <= 0:
                raise ValueError(f"field '{name}': must be > 0, got {getattr(self, name)}")
        return self

    def params(self) -> np.ndarray:
        return np.array([float(getattr(self, p)) for p in self.PARAMS])

    def with_params(self, values) -> "ReadTiming":
        d = asdict(self)
        d.update({p: float(v) for p, v in zip(self.PARAMS, values)})
        return ReadTiming(**d)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update({p: round(float(d[p]), 4) for p in self.PARAMS})
        return d


def cache_hit_ratio(footprint: float, capacity: float, slope: float = 1.0) -> float:
    """The share of uniformly random lines of ``footprint`` bytes found in a cache of ``capacity``:
    (capacity / footprint) ** slope past the capacity (slope 1: an ideal LRU cache of its own;
    steeper where other data and other tenants share it)."""
    return 1.0 if footprint <= capacity else (capacity / footprint) ** slope


def read_rates(knobs: TlbKnobs, size: int, page_shift, accesses: int = 200_000, seed: int = 0,
               base: int = _RATE_BASE) -> dict[str, float]:
    """TLB counts per access of uniformly random 8-byte reads over ``size`` bytes at ``base``.

    ``page_shift``: 12 or 21 for the whole region, or a function of the
    addresses giving each one's page size (e.g. :func:`page_shifts_of`).  The
    first quarter of the stream only warms the TLBs.  Returns l2_hits, walks,
    pte_refs (page-table references to PTE lines) and pmd_refs (to PMD lines)
    per access.  Deterministic for a seed.
    """
    if not callable(page_shift):
        return dict(_read_rates_cached(tuple(sorted(knobs.to_dict().items())), int(size), int(page_shift),
                                       int(accesses), int(seed), int(base)))
    return _read_rates(knobs, size, page_shift, accesses, seed, base)


def _read_rates(knobs, size, page_shift, accesses, seed, base):
    rng = np.random.default_rng([seed, max(1, size >> 20)])
    vaddr = (base + rng.integers(0, size // 8, accesses, dtype=np.int64) * 8).astype(np.uint64)
    shifts = np.asarray(page_shift(vaddr) if callable(page_shift) else page_shift, dtype=np.uint8)
    sim = TlbSimulator(knobs)
    warm = accesses // 4
    sim.simulate(vaddr[:warm], page_shift=shifts if shifts.ndim == 0 else shifts[:warm])
    sim.reset_stats()
    sim.simulate(vaddr[warm:], page_shift=shifts if shifts.ndim == 0 else shifts[warm:])
    n = accesses - warm
    pmd = sim.get_metric(SimMetric.WALKS_PMD)
    hit = sim.get_metric(SimMetric.WALKS_PTE_PWC_HIT)
    miss = sim.get_metric(SimMetric.WALKS_PTE_PWC_MISS)
    l2 = sim.l2.get_metric(Metric.HITS) if sim.l2 else 0
    return {"l2_hits": l2 / n, "walks": (pmd + hit + miss) / n, "pte_refs": (hit + miss) / n,
            "pmd_refs": (pmd + miss) / n}


_RATE_CACHE: dict = {}


def _read_rates_cached(knob_items, size, page_shift, accesses, seed, base):
    key = (knob_items, size, page_shift, accesses, seed, base)
    if key not in _RATE_CACHE:
        _RATE_CACHE[key] = _read_rates(TlbKnobs(**dict(knob_items)), size, page_shift, accesses, seed, base)
    return _RATE_CACHE[key]


def read_ns(timing: ReadTiming, knobs: TlbKnobs, pattern: str, size: int, rates: dict[str, float],
            page_shift: int = PAGE_SHIFT_4K) -> dict[str, float]:
    """Predicted ns per 8-byte read of one sweep: {"ns", "data", "translation"}.

    The form (S = region bytes, h(F, C) = 1 if F <= C else (C / F) ** k, the
    share of random lines of footprint F that a cache of C holds; k =
    ``cache_slope``, 1 for an ideal LRU cache of its own)::

        data  D = h(S, llc) * llc_ns + (1 - h(S, llc)) * dram_ns
        PTE reference  R = walk_hit_ns + (1 - h(S / 512, pt_cache)) * walk_miss_ns
        translation  X = l2_hits * l2_hit_ns + pte_refs * R + pmd_refs * walk_hit_ns
        chase   t = D + X                       (dependent loads: latencies add)
        gather  t = gather_ns + D / mlp + X / walk_mlp   (independent loads overlap;
                                                    walks overlap less: few walkers)
        seq     t = seq_cache_ns if S <= seq_llc else seq_dram_ns, + X / walk_mlp

    ``rates`` are the TLB simulator's counts per access (:func:`read_rates`):
    L2 TLB hits, and the walks' references to PTE lines (a 4 KiB page; 2 when
    the PDE cache misses: the PMD line too) and to PMD lines (S / 512 bytes of
    PTEs against S / 256 Ki of PMDs: PMD lines stay cached).  The sequential
    sweep takes one walk per page: its rates are 1/512 (4 KiB) or 1/262144
    (2 MiB) walks per 8-byte word and no L2 hits.  Not linear in the misses:
    both cache shares depend on the region size, and the data and translation
    times overlap by different factors in a gather.
    """
    if pattern not in READ_PATTERNS:
        raise ValueError(f"pattern {pattern!r}: expected one of {', '.join(READ_PATTERNS)}")
    t = timing
    mib = float(1 << 20)
    h = cache_hit_ratio(size, t.llc_mib * mib, t.cache_slope)
    data = h * t.llc_ns + (1.0 - h) * t.dram_ns
    pte_ns = t.walk_hit_ns + (1.0 - cache_hit_ratio(size / 512, t.pt_cache_mib * mib, t.cache_slope)) * t.walk_miss_ns
    if pattern == "seq":
        per_page = 8.0 / (1 << page_shift)
        rates = {"l2_hits": 0.0, "pte_refs": per_page if page_shift == PAGE_SHIFT_4K else 0.0,
                 "pmd_refs": per_page if page_shift != PAGE_SHIFT_4K else 0.0}
    l2_ns = knobs.l2_hit_cycles / knobs.cpu_ghz
    tr = rates["l2_hits"] * l2_ns + rates["pte_refs"] * pte_ns + rates["pmd_refs"] * t.walk_hit_ns
    if pattern == "chase":
        return {"ns": data + tr, "data": data, "translation": tr}
    if pattern == "gather":
        return {"ns": t.gather_ns + data / t.mlp + tr / t.walk_mlp, "data": t.gather_ns + data / t.mlp,
                "translation": tr / t.walk_mlp}
    stream = t.seq_cache_ns if size <= t.seq_llc_mib * mib else t.seq_dram_ns
    return {"ns": stream + tr / t.walk_mlp, "data": stream, "translation": tr / t.walk_mlp}
