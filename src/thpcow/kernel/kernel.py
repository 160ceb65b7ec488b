"""The simulated kernel: one machine's memory, its processes and their system calls.

:class:`Kernel` holds the global state (frames, folios, counters, sysfs, the
LRU, the deferred split queue, the huge zero folio, the watermarks) and
:class:`Process` is the user view of one task: ``mmap``, ``munmap``,
``mprotect``, ``mremap``, ``madvise``, ``prctl``, ``fork``, ``exit`` and
loads/stores.  Every call either succeeds or raises
:class:`~thpcow.kernel.errors.KernelError` with the kernel's errno.

The work is in the modules named after the kernel's files; ``Kernel``'s own
methods are thin entry points into them (``balance()``:
``vmscan.balance_pgdat()``; ``alloc_thp()``: ``page_alloc.alloc_thp()``;
``memory_failure()``, ``migrate()``, ``reclaim()``).

With ``check=True`` the invariant checker (:mod:`thpcow.kernel.check`) runs
after every system call and every access, as DEBUG_VM does, and
page_table_check (:mod:`thpcow.kernel.page_table_check`) checks every
page-table store as it happens; ``page_table_check=`` turns the latter on or
off on its own (by default it follows ``check``).
"""

from __future__ import annotations

import contextlib
import errno as E

import numpy as np

from .constants import (
    MAP_ANONYMOUS, MAP_PRIVATE, MMAP_BASE, PAGE_SIZE, PFN_PHYS, PHYS_PFN,
    PR_GET_THP_DISABLE, PR_SET_THP_DISABLE, PR_THP_DISABLE_EXCEPT_ADVISED, PROT_READ, PROT_WRITE,
)
from .errors import InvariantViolation, KernelError, KernelOops, einval
from .folio import FolioTable
from .mm import MM, VMA
from .page_table_check import PageTableCheck
from .page_alloc import PhysMem
from .swap import Lruvec
from .sysfs import Sysfs
from .vmstat import VmStat
from . import access, fork as _fork, madvise as _madvise
from . import bugs as _bugs, builds as _builds, mmap as _mmap, mprotect as _mprotect, mremap as _mremap
from . import memory_failure as _memory_failure, page_alloc, vmscan


class Kernel:
    """A simulated Linux 6.18 memory-management subsystem."""

    def __init__(self, ram: int = 1 << 30, *, seed: int = 0, check: bool = False,
                 build: "_builds.KernelBuild | str | None" = None, series_thp_cow: "bool | str" = True,
                 fragmentation: float = 0.0, swap: int = 0, page_table_check: bool | None = None,
                 inject=(), khugepaged_rules=None,
                 cow_policy: "_builds.KernelBuild | str | None" = None) -> None:
        """Boot a kernel.

        ``build``: what the kernel was compiled with (:mod:`.builds`; a name
        such as ``"upstream"``, ``"pre-5.8"``, ``"mthp-cow:order=4"``).
        ``series_thp_cow``: the 2026 thp_cow series applied to the upstream
        build: True (as meant, the default), ``"v1"`` (as posted) or False;
        its ``thp_cow`` knob starts at ``never``.  ``check``: the invariant
        checker after every call; ``page_table_check`` (default: as
        ``check``) the page_table_check hook at every page-table store.
        ``khugepaged_rules``: which kernel's khugepaged
        (:class:`~thpcow.kernel.khugepaged.KhugepagedRules`): ``"6.18"`` (the
        default) or ``"7.1"`` (scan progress counted per PTE examined, clean
        lazyfree pages skipped), or one rule at a time
        (``"6.18:skip_lazyfree=1"``).  ``cow_policy`` is the former name of
        ``build``.
        """
        if ram % PAGE_SIZE:
            raise einval("Kernel", f"ram={ram}: not a multiple of the page size")
        self.ram = ram
        self.seed = seed
        self.oops: KernelOops | None = None          # set when the kernel oopses; it is dead then
        self.bugs = _bugs.parse_bugs(inject)         # injected bugs (bugs.py): none unless asked for
        self.rng = np.random.default_rng(seed)
        self.mem = PhysMem(ram // PAGE_SIZE)
        # page_table_check: None unless enabled (the page-table writers test it once per call).
        self.ptc: PageTableCheck | None = None
        if check if page_table_check is None else page_table_check:
            self.ptc = PageTableCheck(self)
            self.mem.ptc = self.ptc
        # Sized for the worst case (one folio per frame): untouched entries cost nothing.
        self.folios = FolioTable(capacity=self.mem.nr_frames, max_capacity=self.mem.nr_frames)
        self.folios.bugs = self.bugs
        self.vmstat = VmStat()
        self.khugepaged_counters = {"pages_collapsed": 0, "full_scans": 0}
        if build is not None and cow_policy is not None:
            raise ValueError("Kernel: build= and cow_policy= name the same thing: give one")
        self.build = _builds.get_build(build if build is not None else cow_policy,
                                       _builds.series_option(series_thp_cow))
        if series_thp_cow is False and self.build.series is not None:
            raise ValueError(f"Kernel: build {self.build.name} applies the thp_cow series; "
                             "series_thp_cow=False contradicts it")
        self.sysfs = Sysfs(stats_reader=self.vmstat.mthp_stat,
                           counter_reader=lambda name: self.khugepaged_counters[name],
                           series_thp_cow=self.build.series is not None)
        self.thp_supported = True
        if ram < 512 << 20:
            # hugepage_init(): THP off by default on machines under 512 MiB.
            for knob, val in (("enabled", "never"), ("defrag", "never"), ("use_zero_page", "0")):
                self.sysfs.write(knob, val)
        if not 0.0 <= fragmentation <= 1.0:
            raise einval("Kernel", f"fragmentation={fragmentation}: must be within [0, 1]")
        self.unmovable_pages = self.mem.fragment(fragmentation, self.rng) if fragmentation else 0
        self.deferred: dict[int, None] = {}          # the deferred split queue
        self.lruvec = Lruvec()                       # the anon LRU (a stamp per folio in FolioTable.lru)
        self.kcompactd_pending = False               # wakeup_kcompactd() queued its run
        # TLB flushes the kernel would issue, for a machine model to replay:
        # (pid, start, end) ranges or (pid, vpn array) single pages.  None: off.
        self.tlb_flush_log: list | None = None
        from .swapfile import SwapDevice
        if swap < 0:
            raise einval("Kernel", f"swap={swap}: must be >= 0")
        self.swap = SwapDevice(swap) if swap else None
        page_alloc.setup_per_zone_wmarks(self)       # wmark_min, wmark_low, wmark_high
        self.huge_zero_fid = -1
        self.procs: dict[int, Process] = {}
        self.khugepaged_mms: dict[int, None] = {}    # khugepaged_scan.mm_head
        self.check_enabled = check
        self._next_pid = 1
        self._next_mm_id = 1
        self._next_anon_vma = 1
        self.vmstat.node["nr_free_pages"] = self.mem.nr_free
        from .clock import Clock
        from .khugepaged import Khugepaged
        self.clock = Clock()
        self.khugepaged = Khugepaged(self, khugepaged_rules)
        self.sysfs.add_listener(self._sysfs_changed)
        self.khugepaged.start_stop()
        self.build.boot(self)

    @property
    def series_thp_cow(self) -> bool:
        """Whether the 2026 thp_cow series is applied (its sysfs file and advice exist)."""
        return self.build.series is not None

    @property
    def cow_policy(self) -> "_builds.KernelBuild":
        """The former name of :attr:`build`."""
        return self.build

    # -- processes ---------------------------------------------------------------------
    def spawn(self) -> "Process":
        """A new process with an empty address space (as after execve())."""
        mm = MM(pid=self._next_pid, mm_id=self._new_mm_id(), mmap_base=MMAP_BASE)
        p = Process(self, mm)
        self._next_pid += 1
        self.procs[mm.pid] = p
        return p

    def _new_mm_id(self) -> int:
        self._next_mm_id += 1
        return self._next_mm_id

    def new_anon_vma_id(self) -> int:
        self._next_anon_vma += 1
        return self._next_anon_vma

    # -- reclaim and allocation (vmscan.py, page_alloc.py) ----------------------------------------
    def balance(self, need: int = 0) -> None:
        """kswapd: reclaim when free memory would fall under the low watermark (vmscan.balance_pgdat()).

        ``need``: pages the caller is about to allocate.
        """
        vmscan.balance_pgdat(self, need)

    def alloc_page(self) -> int:
        """An order-0 frame (memory was balanced at the start of the fault); -1 means OOM."""
        return self.mem.alloc(0)

    def alloc_pages_bulk(self, n: int):
        """``n`` order-0 frames at once, or None (the batch was balanced before it began)."""
        return self.mem.alloc_bulk(n)

    def alloc_thp(self, gfp: "page_alloc.Gfp | str | bool") -> int:
        """An order-9 block, or -1: see :func:`.page_alloc.alloc_thp`.

        ``gfp``: a :class:`.page_alloc.Gfp` (huge_memory.vma_thp_gfp_mask()),
        or as before "direct", "kswapd", "light", ``True``/``False``.
        """
        return page_alloc.alloc_thp(self, page_alloc.gfp_from(gfp))

    def new_folio(self, pfn: int, order: int) -> int:
        """Make the allocated frames [pfn, pfn + 2^order) one folio; returns its id."""
        fid = self.folios.alloc(pfn, order)
        self.mem.folio[pfn: pfn + (1 << order)] = fid
        return fid

    # -- TLB flushes ------------------------------------------------------------------------------
    def flush_tlb_range(self, mm: MM, start: int, end: int) -> None:
        """Model of flush_tlb_range()/flush_tlb_mm(): recorded when a machine model listens."""
        if self.tlb_flush_log is not None:
            self.tlb_flush_log.append((mm.pid, int(start), int(end)))

    def flush_tlb_pages(self, mm: MM, vpns) -> None:
        """Model of flush_tlb_page() for many pages (COW remaps, swap-out)."""
        if self.tlb_flush_log is not None and len(vpns):
            self.tlb_flush_log.append((mm.pid, np.asarray(vpns, dtype=np.int64)))

    def _sysfs_changed(self, path: str, old: str, new: str) -> None:
        """enabled_store()/anon_enabled_store() (re)start or stop khugepaged."""
        if path == "enabled" or path.endswith("/enabled"):
            self.khugepaged.start_stop()
        elif path in ("khugepaged/scan_sleep_millisecs", "khugepaged/alloc_sleep_millisecs"):
            self.khugepaged.kick()          # the stores wake khugepaged; the new sleep applies

    # -- simulated time ----------------------------------------------------------------------------
    @property
    def now(self) -> int:
        """Simulated time in nanoseconds."""
        return self.clock.now

    def advance(self, ns: int) -> int:
        """Let ``ns`` nanoseconds pass: kernel threads run at their own times."""
        self._enter("advance")
        if ns < 0:
            raise einval("advance", f"ns={ns}: time cannot go backwards")
        n = self.clock.run_until(self.clock.now + int(ns))
        self._after()
        return n

    def run_until(self, t: int) -> int:
        self._enter("run_until")
        if t < self.clock.now:
            raise einval("run_until", f"t={t}: before now ({self.clock.now})")
        n = self.clock.run_until(int(t))
        self._after()
        return n

    def sysfs_orders(self, vm_hugepage: bool) -> int:
        return self.sysfs.anon_orders(vm_hugepage)

    def memory_failure(self, pfn: int) -> None:
        """Poison one frame (as a hardware memory error would); see memory_failure.memory_failure()."""
        self._enter("memory_failure")
        if not 0 < pfn < self.mem.nr_frames:
            raise einval("memory_failure", f"pfn={pfn:#x}: outside memory")
        _memory_failure.memory_failure(self, pfn)
        self._after()

    def migrate(self, pfn: int) -> int:
        """Migrate the folio holding ``pfn`` (as NUMA balancing or offlining would)."""
        from .migrate import migrate_folio
        self._enter("migrate")
        fid = int(self.mem.folio[pfn]) if 0 <= pfn < self.mem.nr_frames else -1
        if fid < 0:
            raise einval("migrate", f"pfn={pfn:#x}: not a page of a folio")
        ret = migrate_folio(self, fid)
        self._after()
        return ret

    def reclaim(self, nr_pages: int) -> int:
        """Run reclaim now (as kswapd would): returns the pages freed."""
        self._enter("reclaim")
        freed = vmscan.shrink_slab(self)
        freed += vmscan.shrink_lru(self, max(0, nr_pages - freed))
        self._after()
        return freed

    def populate(self, mm: MM, start: int, length: int, write: bool) -> None:
        """Model of populate_vma_page_range() (MAP_POPULATE)."""
        pages = np.arange(PHYS_PFN(start), PHYS_PFN(start + length), dtype=np.int64)
        if write:
            access.write_pages(self, mm, pages, self.mem.content[np.zeros(len(pages), dtype=np.int64)])
        else:
            access.read_pages(self, mm, pages)

    # -- views -------------------------------------------------------------------------------------
    def vmstat_snapshot(self) -> dict[str, int]:
        self.vmstat.node["nr_free_pages"] = self.mem.nr_free
        self.vmstat.node["nr_page_table_pages"] = sum(p.mm.nr_ptes for p in self.procs.values())
        return self.vmstat.snapshot()

    def vmstat_text(self) -> str:
        self.vmstat_snapshot()
        return self.vmstat.text()

    def meminfo_anon_huge_kb(self) -> int:
        return self.vmstat.meminfo_anon_huge_kb()

    def check(self) -> None:
        """Run the full invariant checker now."""
        from . import check
        check.check_kernel(self)

    def _after(self) -> None:
        if self.check_enabled and self.oops is None:
            self.check()

    @contextlib.contextmanager
    def _checked(self):
        """Run the checker after a call, also one that failed cleanly (a KernelError leaves the
        state as it was); not after one that a checker or an oops stopped: that report stands."""
        try:
            yield
        except (InvariantViolation, KernelOops):
            raise
        except BaseException:
            self._after()
            raise
        self._after()

    def _enter(self, call: str) -> None:
        """Refuse every call once the kernel has oopsed: it is dead (see :class:`KernelOops`)."""
        if self.oops is not None:
            o = self.oops
            raise KernelOops(o.function, f"{call}: the kernel oopsed earlier ({o.cause})", o.stack, o.report)


class Process:
    """The user view of one simulated task."""

    def __init__(self, kernel: Kernel, mm: MM) -> None:
        self.kernel = kernel
        self.mm = mm

    @property
    def pid(self) -> int:
        return self.mm.pid

    @property
    def alive(self) -> bool:
        """False once the process has exited."""
        return self.mm.alive

    def _alive(self, call: str) -> None:
        if not self.mm.alive:
            raise KernelError(E.ESRCH, call, f"pid {self.pid} has exited")

    def _sys(self, call: str, fn, *args):
        self.kernel._enter(call)
        self._alive(call)
        with self.kernel._checked():
            return fn(self.kernel, self.mm, *args)

    # -- system calls ----------------------------------------------------------------------------
    def mmap(self, length: int, prot: int = PROT_READ | PROT_WRITE, flags: int = MAP_PRIVATE | MAP_ANONYMOUS,
             addr: int = 0) -> int:
        """mmap(2) of anonymous private memory; returns the address."""
        return self._sys("mmap", _mmap.do_mmap, addr, length, prot, flags)

    def munmap(self, addr: int, length: int) -> None:
        self._sys("munmap", _mmap.do_munmap, addr, length)

    def mprotect(self, addr: int, length: int, prot: int) -> None:
        self._sys("mprotect", _mprotect.do_mprotect, addr, length, prot)

    def mremap(self, old_addr: int, old_len: int, new_len: int, flags: int = 0, new_addr: int = 0) -> int:
        return self._sys("mremap", _mremap.do_mremap, old_addr, old_len, new_len, flags, new_addr)

    def madvise(self, addr: int, length: int, advice: int) -> None:
        self._sys("madvise", _madvise.do_madvise, addr, length, advice)

    def process_madvise(self, target: "Process", addr: int, length: int, advice: int) -> None:
        """process_madvise(2) on ``target`` (one iovec): only the advice the kernel allows remotely."""
        from .constants import MADV_COLD, MADV_COLLAPSE, MADV_PAGEOUT, MADV_WILLNEED
        self._alive("process_madvise")
        advice = _madvise.int_arg(advice)                   # the syscall's int behavior
        if advice not in (MADV_COLD, MADV_PAGEOUT, MADV_WILLNEED, MADV_COLLAPSE):
            raise einval("process_madvise", f"advice={advice}: not allowed on another process")
        target._sys("process_madvise", _madvise.do_madvise, addr, length, advice)

    def prctl(self, option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
        """prctl(2): PR_SET_THP_DISABLE and PR_GET_THP_DISABLE."""
        self._alive("prctl")
        call = "prctl"
        mm = self.mm
        if option == PR_GET_THP_DISABLE:
            if arg2 or arg3 or arg4 or arg5:
                raise einval(call, "PR_GET_THP_DISABLE takes no arguments")
            return mm.thp_disable
        if option != PR_SET_THP_DISABLE:
            raise einval(call, f"option={option}: not modelled")
        if arg4 or arg5:
            raise einval(call, "PR_SET_THP_DISABLE: arg4 and arg5 must be 0")
        if not arg2:                                  # arg2 is a boolean (!!arg2)
            if arg3:
                raise einval(call, f"arg3={arg3:#x}: flags are only valid when disabling")
            mm.thp_disable = 0
            return 0
        if arg3 & ~PR_THP_DISABLE_EXCEPT_ADVISED:
            raise einval(call, f"arg3={arg3:#x}: unknown flags")
        mm.thp_disable = 1 | (PR_THP_DISABLE_EXCEPT_ADVISED if arg3 else 0)
        return 0

    def fork(self) -> "Process":
        """fork(2): a child with a copy-on-write copy of this address space."""
        self.kernel._enter("fork")
        self._alive("fork")
        k = self.kernel
        child = k.spawn()
        with k._checked():
            _fork.dup_mmap(k, child.mm, self.mm)
        return child

    def exit(self) -> None:
        """exit(2): tear down the address space."""
        self.kernel._enter("exit")
        self._alive("exit")
        k = self.kernel
        _mmap.unmap_all(k, self.mm)
        self.mm.alive = False
        k.procs.pop(self.pid, None)
        k.khugepaged.exit_mm(self.pid)
        k._after()

    # -- memory accesses --------------------------------------------------------------------------
    def write(self, addr: int, length: int = 1, token: int = 1) -> None:
        """Store ``length`` bytes at ``addr``: every page touched now holds ``token``."""
        pages = self._pages("write", addr, length)
        self._sys("write", access.write_pages, pages, np.full(len(pages), token, dtype=np.int64),
                  self._byte_addrs(addr, pages))

    def write_many(self, addrs, tokens) -> None:
        """Many small stores (each within one page), in order: the batched path."""
        addrs = np.asarray(addrs, dtype=np.int64)
        tokens = np.broadcast_to(np.asarray(tokens, dtype=np.int64), addrs.shape)
        self._sys("write", access.write_pages, PHYS_PFN(addrs), tokens, addrs)

    def write_many_scalar(self, addrs, tokens) -> None:
        """The same stores through the one-page-at-a-time reference path."""
        addrs = np.asarray(addrs, dtype=np.int64)
        tokens = np.broadcast_to(np.asarray(tokens, dtype=np.int64), addrs.shape)
        self._sys("write", access.write_pages_scalar, PHYS_PFN(addrs), tokens, addrs)

    def read(self, addr: int, length: int = 1) -> np.ndarray:
        """Load ``length`` bytes at ``addr``: the token of every page touched."""
        pages = self._pages("read", addr, length)
        return self._sys("read", access.read_pages, pages, self._byte_addrs(addr, pages))

    def read_many(self, addrs) -> np.ndarray:
        addrs = np.asarray(addrs, dtype=np.int64)
        return self._sys("read", access.read_pages, PHYS_PFN(addrs), addrs)

    @staticmethod
    def _byte_addrs(addr: int, pages: np.ndarray) -> np.ndarray:
        """The first byte each page of an access touches: addr itself, then page starts."""
        out = PFN_PHYS(pages)
        out[0] = addr
        return out

    def _pages(self, call: str, addr: int, length: int) -> np.ndarray:
        if length <= 0:
            raise einval(call, f"length={length}: must be > 0")
        if addr < 0 or addr + length > 1 << 47:
            from .errors import SegmentationFault
            raise SegmentationFault(max(addr, 0), "outside the user address space")
        return np.arange(PHYS_PFN(addr), PHYS_PFN(addr + length - 1) + 1, dtype=np.int64)

    # -- views -------------------------------------------------------------------------------------------
    def smaps(self) -> str:
        from . import task_mmu
        return task_mmu.show_smaps(self.kernel, self.mm)

    def smaps_rollup(self) -> str:
        from . import task_mmu
        return task_mmu.show_smaps_rollup(self.kernel, self.mm)

    def smaps_fields(self, addr: int | None = None) -> dict[str, int]:
        """smaps figures (kB) of the VMA containing addr, or the rollup if addr is None."""
        from . import task_mmu
        return task_mmu.smaps_fields(self.kernel, self.mm, addr)

    def pagemap(self, addr: int, npages: int) -> np.ndarray:
        from . import task_mmu
        return task_mmu.pagemap_read(self.kernel, self.mm, addr, npages)

    def status(self) -> dict[str, int]:
        """/proc/PID/status memory lines (kB)."""
        return {"RssAnon": self.mm.rss_anon * 4, "VmSwap": self.mm.rss_swap * 4,
                "VmPTE": self.mm.nr_ptes * 4}

    def vmas(self) -> list[VMA]:
        return list(self.mm.vmas)
