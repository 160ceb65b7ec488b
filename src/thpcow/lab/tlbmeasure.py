"""Read sweeps on the running kernel: the measurements the TLB timing model is fitted to and checked on.

A *case* is (pattern, backing, size):

* pattern ``gather``: independent random 8-byte loads, one ``numpy.take``
  over random word indices (the loads overlap: memory-level parallelism);
  ``chase``: a dependent pointer chase over random cache lines (each load
  waits for the previous one: pure latency); ``seq``: a sequential sum of the
  whole region as 8-byte words (``numpy.sum``; prefetched streaming).
* backing ``4k`` (MADV_NOHUGEPAGE), ``thp`` (MADV_HUGEPAGE; AnonHugePages of
  the range must equal its size) or ``split`` (THP-backed, then fork and one
  store per 2 MiB in the parent: every PMD split by COW, the child exited).
* size: a multiple of 2 MiB.

The regions of a sweep are measured in batches of at most ``batch_mib``
(all sizes up to 1 GiB together), round-robin: each round times every case
of the batch once, after an untimed pass over it, so that a change of the
machine's state during the sweep reaches every case alike.  Each case is
timed ``repeats`` times; the figure is the median ns per access of this thread's CPU time
(``CLOCK_THREAD_CPUTIME_ID``), which leaves out the time the thread sat
preempted: on a shared 2-core machine the wall time of the same run varied
4x, its CPU time by a few per cent (the wall median is kept beside it).  Before each region is allocated, a
slightly larger scratch region of the same backing is touched and freed
(calibrate's "warm" method).  The region's own smaps line (this process) is
checked before the timing: a THP case that did not get huge pages, or a
4 KiB / split case that still has them, raises :class:`WrongBackingError`.
:func:`sweep` holds ``lab_lock()`` and turns the garbage collector off.

Hardware counters: :class:`DtlbCounter` opens the generic dTLB read-miss event
(``PERF_TYPE_HW_CACHE``: DTLB, READ, MISS) for this process with
``perf_event_open``.  Where the kernel or the VM does not expose the PMU,
:func:`dtlb_counter_available` says why and the sweep records no miss counts.
Nothing here writes sysfs.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import gc
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import numpy as np
from numba import njit

from . import calibrate as cal
from . import procfs

MiB = 1 << 20
GiB = 1 << 30
PAGE = 4096
PMD = 2 * MiB
LINE = 64

PATTERNS = ("gather", "chase", "seq")
BACKINGS = ("4k", "thp", "split")


class WrongBackingError(procfs.LabError):
    """A region's smaps line shows other page sizes than the case asks for."""


# ---------------------------------------------------------------------------------------------
# perf_event_open: dTLB read misses of this process
# ---------------------------------------------------------------------------------------------

PERF_TYPE_HW_CACHE = 3
PERF_COUNT_HW_CACHE_DTLB = 3
PERF_COUNT_HW_CACHE_OP_READ = 0
PERF_COUNT_HW_CACHE_RESULT_MISS = 1
DTLB_READ_MISS = (PERF_COUNT_HW_CACHE_DTLB | (PERF_COUNT_HW_CACHE_OP_READ << 8)
                  | (PERF_COUNT_HW_CACHE_RESULT_MISS << 16))
_NR_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241}
_PERF_EVENT_IOC_ENABLE = 0x2400
_PERF_EVENT_IOC_DISABLE = 0x2401
_PERF_EVENT_IOC_RESET = 0x2403


class _PerfEventAttr(ctypes.Structure):
    """The first 64 bytes of ``struct perf_event_attr`` (PERF_ATTR_SIZE_VER0)."""

    _fields_ = [("type", ctypes.c_uint32), ("size", ctypes.c_uint32), ("config", ctypes.c_uint64),
                ("sample_period", ctypes.c_uint64), ("sample_type", ctypes.c_uint64),
                ("read_format", ctypes.c_uint64), ("flags", ctypes.c_uint64),
                ("wakeup_events", ctypes.c_uint32), ("bp_type", ctypes.c_uint32),
                ("config1", ctypes.c_uint64)]


def _perf_open(config: int) -> int:
    """A disabled counting event on this process, any CPU, user space only; raises OSError."""
    nr = _NR_PERF_EVENT_OPEN.get(os.uname().machine)
    if nr is None:
        raise OSError(0, f"perf_event_open: unknown syscall number on {os.uname().machine}")
    attr = _PerfEventAttr(type=PERF_TYPE_HW_CACHE, size=ctypes.sizeof(_PerfEventAttr), config=config)
    attr.flags = 1 | (1 << 5) | (1 << 6)          # disabled, exclude_kernel, exclude_hv
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    fd = libc.syscall(ctypes.c_long(nr), ctypes.byref(attr), ctypes.c_int(0), ctypes.c_int(-1),
                      ctypes.c_int(-1), ctypes.c_ulong(0))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"perf_event_open(PERF_TYPE_HW_CACHE, dTLB read miss): {os.strerror(err)}")
    return int(fd)


def dtlb_counter_available(root: str = "/") -> tuple[bool, str]:
    """Can this process count its own dTLB read misses?  (ok, why not)."""
    try:
        with open(os.path.join(root, "proc/sys/kernel/perf_event_paranoid")) as f:
            paranoid = int(f.read().strip())
    except (OSError, ValueError):
        return False, "perf_event_open is not configured (no /proc/sys/kernel/perf_event_paranoid)"
    if paranoid > 2 and os.geteuid() != 0:
        return False, f"perf_event_paranoid is {paranoid} and this process is not root"
    pmus = os.path.join(root, "sys/bus/event_source/devices")
    try:
        names = set(os.listdir(pmus))
    except OSError:
        names = set()
    if names and not names & {"cpu", "cpu_core", "cpu_atom", "armv8_pmuv3", "armv8_pmuv3_0"}:
        return False, (f"the CPU's PMU is not exposed (event sources: {', '.join(sorted(names))}); "
                       "a VM without a virtual PMU has no hardware counters")
    try:
        os.close(_perf_open(DTLB_READ_MISS))
    except OSError as e:
        return False, str(e.strerror or e)
    return True, ""


class DtlbCounter:
    """Counts this process's dTLB read misses (user space) over a ``with`` block: ``.count``."""

    def __init__(self) -> None:
        self.fd = _perf_open(DTLB_READ_MISS)
        self.count = 0

    def __enter__(self) -> "DtlbCounter":
        import fcntl
        fcntl.ioctl(self.fd, _PERF_EVENT_IOC_RESET, 0)
        fcntl.ioctl(self.fd, _PERF_EVENT_IOC_ENABLE, 0)
        return self

    def __exit__(self, *exc) -> None:
        import fcntl
        fcntl.ioctl(self.fd, _PERF_EVENT_IOC_DISABLE, 0)
        self.count = int.from_bytes(os.read(self.fd, 8), "little")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# ---------------------------------------------------------------------------------------------
# The three access patterns
# ---------------------------------------------------------------------------------------------

def gather_indices(size: int, n: int, seed: int) -> np.ndarray:
    """``n`` random 8-byte word indices into ``size`` bytes (seeded by seed and size)."""
    return np.random.default_rng([seed, size // MiB, 1]).integers(0, size // 8, n, dtype=np.int64)


def chase_lines(size: int, n: int, seed: int) -> np.ndarray:
    """A random order of ``min(n, lines)`` distinct cache lines of ``size`` bytes (line numbers)."""
    rng = np.random.default_rng([seed, size // MiB, 2])
    lines = size // LINE
    if n >= lines:
        return rng.permutation(lines).astype(np.int64)
    pick = np.unique(rng.integers(0, lines, n + n // 4 + 16, dtype=np.int64))
    return rng.permutation(pick)[:n]


def link_chase(u64: np.ndarray, lines: np.ndarray) -> int:
    """Write the cycle through ``lines`` into the buffer (each line's first word holds the next
    line's word index); returns the word index to start from."""
    words = lines * (LINE // 8)
    u64[words] = np.roll(words, -1).astype(np.uint64)
    return int(words[0])


@njit(cache=True, nogil=True)
def chase(u64, start, steps):
    """Follow ``steps`` links from word ``start``; returns the last word index (dependent loads)."""
    i = np.int64(start)
    for _ in range(steps):
        i = np.int64(u64[i])
    return i


# ---------------------------------------------------------------------------------------------
# Cases and the sweep
# ---------------------------------------------------------------------------------------------

@dataclass
class SweepConfig:
    sizes_mib: tuple[int, ...] = (4, 16, 64, 256, 1024, 2048, 4096)
    patterns: tuple[str, ...] = PATTERNS
    backings: tuple[str, ...] = ("4k", "thp")
    gather_accesses: int = 4_000_000
    chase_steps: int = 1_000_000
    repeats: int = 5
    seed: int = 0
    counters: bool = True              # count dTLB misses where perf_event_open can
    probe: bool = True                 # wait out LLC contention before each timed run (LlcProbe)
    probe_wait_s: float = 3.0          # at most this long per case, then time it anyway (flagged)
    batch_mib: int = 6144              # regions measured together, round-robin (memory they may take)

    @classmethod
    def quick_config(cls, **kw) -> "SweepConfig":
        base = dict(sizes_mib=(4, 16, 64, 256, 1024), gather_accesses=1_000_000, chase_steps=300_000, repeats=5,
                    probe_wait_s=0.3)
        base.update(kw)
        return cls(**base)

    def check(self) -> "SweepConfig":
        for s in self.sizes_mib:
            if s <= 0 or s % 2:
                raise ValueError(f"sizes_mib: {s} is not a positive multiple of 2 MiB")
        for p in self.patterns:
            if p not in PATTERNS:
                raise ValueError(f"patterns: {p!r}; expected one of {', '.join(PATTERNS)}")
        for b in self.backings:
            if b not in BACKINGS:
                raise ValueError(f"backings: {b!r}; expected one of {', '.join(BACKINGS)}")
        if self.gather_accesses <= 0 or self.chase_steps <= 0 or self.repeats <= 0 or self.batch_mib <= 0:
            raise ValueError("gather_accesses, chase_steps, repeats and batch_mib must be > 0")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CaseResult:
    pattern: str
    backing: str
    size_mib: int
    ns: float                          # median ns per access
    runs_ns: list[float]
    accesses: int                      # accesses per run
    anon_huge_kb: int                  # smaps AnonHugePages of the region when timed
    dtlb_misses: float | None = None   # per access (median run), where the counter is readable
    extra: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.pattern}/{self.backing}/{self.size_mib}M"

    def to_dict(self) -> dict:
        return asdict(self)


def cpu_timed_ns(fn: Callable[[], object]) -> tuple[int, int]:
    """(this thread's CPU ns, wall ns) of one call.  The CPU time leaves out the time the
    thread sat preempted by other processes on a shared machine."""
    c0, w0 = time.thread_time_ns(), time.perf_counter_ns()
    fn()
    return time.thread_time_ns() - c0, time.perf_counter_ns() - w0


def _check_backing(r: cal.Region, backing: str) -> int:
    huge = r.smaps()["smaps:AnonHugePages"]
    if backing == "thp" and huge != r.kb:
        raise WrongBackingError(f"thp region of {r.kb} kB has AnonHugePages {huge} kB (THP fault fell back)")
    if backing != "thp" and huge > r.kb // 64:
        raise WrongBackingError(f"{backing} region of {r.kb} kB still has AnonHugePages {huge} kB")
    return huge


def prepare(r: cal.Region, backing: str) -> None:
    """Populate the region; for ``split``, fork and store once per 2 MiB (COW splits every PMD)."""
    r.buf[::PAGE] = 1
    if backing == "split":
        child, _ = cal.Child.fork()
        try:
            r.buf[PAGE::PMD] = 2
        finally:
            child.exit()


class LlcProbe:
    """Detects contention for the last-level cache: a short pointer chase over a 4 MiB THP region.

    On a quiet machine most of the region stays in the LLC; while other
    processes or other tenants of the host thrash the shared LLC more of its
    steps cost a memory access, and every read sweep of the moment is slow
    too.  :meth:`quiet` runs the probe and compares it with the fastest probe
    of this run (a relative test: the probe's own level moves with the LLC
    share this guest gets).
    """

    def __init__(self, size: int = 4 * MiB, steps: int = 20_000, seed: int = 0) -> None:
        self.region = cal.Region(size, "thp")
        self.region.buf[::PAGE] = 1
        self.u64 = self.region.buf.view(np.uint64)
        self.lines = size // LINE
        self.start = link_chase(self.u64, chase_lines(size, self.lines, seed))
        self.steps = min(steps, self.lines)
        self.best = float("inf")
        chase(self.u64, self.start, self.steps)                # JIT and cache warm-up

    def __call__(self) -> float:
        """ns per step now (thread CPU time); the best so far is kept in ``best``."""
        # Refill the whole region (what the last sweep evicted), then time the lines refilled
        # first: the 2 MiB L2 no longer holds them, the LLC does unless something thrashed it.
        chase(self.u64, self.start, self.lines)
        t, _ = cpu_timed_ns(lambda: chase(self.u64, self.start, self.steps))
        ns = t / self.steps
        self.best = min(self.best, ns)
        return ns

    def settle(self, tries: int = 5, pause_s: float = 0.02) -> float:
        """Probe a few times (pauses between) so that ``best`` is a quiet moment's; returns it."""
        for _ in range(tries):
            self()
            time.sleep(pause_s)
        return self.best

    def quiet(self, ratio: float = 1.5) -> tuple[bool, float]:
        """(probe within ``ratio`` of the best, the probe's ns)."""
        ns = self()
        return ns <= ratio * self.best, ns

    def close(self) -> None:
        self.u64 = None
        self.region.close()


def _case_runner(r: cal.Region, pattern: str, cfg: SweepConfig, shared: dict) -> tuple[int, Callable[[], object]]:
    """(accesses per run, the run) of one pattern over one prepared region."""
    size = r.size
    u64 = r.buf.view(np.uint64)
    if pattern == "gather":
        n = cfg.gather_accesses
        if ("idx", size) not in shared:
            shared[("idx", size)] = gather_indices(size, n, cfg.seed)
        if "out" not in shared:
            shared["out"] = np.empty(n, dtype=np.uint64)
        idx, res = shared[("idx", size)], shared["out"]
        return n, lambda: np.take(u64, idx, out=res, mode="clip")
    if pattern == "chase":
        n = cfg.chase_steps
        start = link_chase(u64, chase_lines(size, n, cfg.seed))
        return n, lambda: chase(u64, start, n)
    return size // 8, lambda: u64.sum()


def measure_regions(regions: list[tuple[cal.Region, str]], patterns: Iterable[str], cfg: SweepConfig,
                    counter: DtlbCounter | None = None, probe: LlcProbe | None = None) -> list[CaseResult]:
    """Time each pattern over each prepared (region, backing), round-robin (see the module docstring).

    Each round times every case once, so that a change of the machine's state
    during the sweep (other tenants' load, the vCPU's speed) reaches every
    case alike; the figure of a case is its median over ``cfg.repeats`` rounds.
    With a ``probe``, each timed run waits (up to ``cfg.probe_wait_s`` per case
    in all) until the probe finds the LLC uncontended; a case that timed a run
    under contention anyway has ``extra["disturbed"]`` runs > 0.
    """
    shared: dict = {}
    todo = []
    for r, backing in regions:
        huge = _check_backing(r, backing)
        for pattern in patterns:
            n, run = _case_runner(r, pattern, cfg, shared)
            run()                                              # warm-up (caches, TLBs, JIT)
            todo.append({"r": r, "backing": backing, "pattern": pattern, "n": n, "run": run, "huge": huge,
                         "runs": [], "walls": [], "misses": [], "probes": [], "disturbed": 0,
                         "wait": cfg.probe_wait_s})
    for _ in range(cfg.repeats):
        for c in todo:
            run, n = c["run"], c["n"]
            run()                                              # refill what the other cases evicted
            if probe is not None:
                t_wait = time.monotonic()
                ok, pns = probe.quiet()
                while not ok and time.monotonic() - t_wait < c["wait"]:
                    time.sleep(0.05)
                    ok, pns = probe.quiet()
                c["wait"] = max(0.0, c["wait"] - (time.monotonic() - t_wait))
                c["probes"].append(pns)
                c["disturbed"] += not ok
                run()                                          # refill what the probe evicted
            if counter is not None:
                with counter:
                    t, w = cpu_timed_ns(run)
                c["misses"].append(counter.count / n)
            else:
                t, w = cpu_timed_ns(run)
            c["runs"].append(t / n)
            c["walls"].append(w / n)
    out = []
    for c in todo:
        res = CaseResult(pattern=c["pattern"], backing=c["backing"], size_mib=c["r"].size // MiB,
                         ns=float(statistics.median(c["runs"])), runs_ns=[round(x, 3) for x in c["runs"]],
                         accesses=c["n"], anon_huge_kb=c["huge"],
                         dtlb_misses=float(statistics.median(c["misses"])) if c["misses"] else None,
                         extra={"wall_ns": round(float(statistics.median(c["walls"])), 3)})
        if c["probes"]:
            res.extra.update({"probe_ns": round(float(statistics.median(c["probes"])), 2),
                              "disturbed": c["disturbed"]})
        out.append(res)
    return out


def measure_region(r: cal.Region, backing: str, patterns: Iterable[str], cfg: SweepConfig,
                   counter: DtlbCounter | None = None, probe: LlcProbe | None = None) -> list[CaseResult]:
    """measure_regions() of one region."""
    return measure_regions([(r, backing)], patterns, cfg, counter, probe)


def batches(todo: list[tuple[int, str]], budget: int) -> list[list[tuple[int, str]]]:
    """Consecutive groups of (size MiB, backing) whose regions together stay within ``budget`` bytes
    (a region larger than the budget goes alone)."""
    out: list[list[tuple[int, str]]] = []
    total = budget + 1
    for size_mib, backing in todo:
        if total + size_mib * MiB > budget:
            out.append([])
            total = 0
        out[-1].append((size_mib, backing))
        total += size_mib * MiB
    return out


def free_memory_bytes(root: str = "/") -> int:
    """MemAvailable of /proc/meminfo in bytes."""
    with open(os.path.join(root, "proc/meminfo")) as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def sizes_that_fit(sizes_mib: Iterable[int], root: str = "/") -> tuple[list[int], list[int]]:
    """(sizes to run, sizes dropped): a region plus its warm-up scratch must fit in half of the
    available memory."""
    avail = free_memory_bytes(root)
    keep, drop = [], []
    for s in sizes_mib:
        (keep if 2.3 * s * MiB < avail / 2 else drop).append(s)
    return keep, drop


def sweep(cfg: SweepConfig | None = None, progress: Callable[[str, int, int], None] | None = None,
          root: str = "/", attempts: int = 3) -> dict:
    """Measure every case of ``cfg`` holding lab_lock(); returns {"cases": [...], "metadata": ...}.

    Raises procfs.LabError when THP is unavailable (the thp and split cases
    need it).  A region whose backing came out wrong is tried ``attempts``
    times (another process may hold the huge pages for a moment).
    """
    from .scenario import lab_lock

    cfg = (cfg or SweepConfig()).check()
    if set(cfg.backings) & {"thp", "split"}:
        ok, reason = procfs.thp_available(root)
        if not ok:
            raise procfs.LabError(f"cannot measure THP-backed reads: {reason}")
    sizes, dropped = sizes_that_fit(cfg.sizes_mib, root)
    counter, why = None, "not requested"
    if cfg.counters:
        ok, why = dtlb_counter_available(root)
        counter = DtlbCounter() if ok else None
    todo = [(s, b) for s in sizes for b in cfg.backings]
    cases: list[CaseResult] = []
    gc_was = gc.isenabled()
    gc.disable()
    t0 = time.perf_counter()
    probe = None
    try:
        with lab_lock():
            if cfg.probe:
                probe = LlcProbe(seed=cfg.seed)
                probe.settle()
            groups = batches(todo, max(min(cfg.batch_mib * MiB, free_memory_bytes(root) // 3), 1))
            done = 0
            for group in groups:
                if progress:
                    progress(", ".join(f"{b} {s} MiB" for s, b in group), done, len(todo))
                for attempt in range(1, attempts + 1):
                    with contextlib.ExitStack() as stack:
                        regions = []
                        for size_mib, backing in group:
                            kind = "thp" if backing == "split" else backing
                            cal.prewarm(size_mib * MiB, kind)
                            r = stack.enter_context(cal.Region(size_mib * MiB, kind))
                            prepare(r, backing)
                            regions.append((r, backing))
                        try:
                            cases += measure_regions(regions, cfg.patterns, cfg, counter, probe)
                            break
                        except WrongBackingError:
                            if attempt == attempts:
                                raise
                done += len(group)
    finally:
        if counter is not None:
            counter.close()
        if probe is not None:
            probe.close()
        if gc_was:
            gc.enable()
    if progress:
        progress("done", len(todo), len(todo))
    meta = cal.collect_metadata(root)
    meta.update({"dtlb_counters": counter is not None, "dtlb_counters_reason": why,
                 "sizes_dropped_mib": dropped, "elapsed_s": round(time.perf_counter() - t0, 1),
                 "probe_best_ns": round(probe.best, 2) if probe is not None else None,
                 "disturbed_cases": sum(1 for c in cases if c.extra.get("disturbed"))})
    return {"config": cfg.to_dict(), "cases": [c.to_dict() for c in cases], "metadata": meta}


# ---------------------------------------------------------------------------------------------
# The model: prediction per case, fit, check
# ---------------------------------------------------------------------------------------------

def predict_case(timing, knobs, pattern: str, backing: str, size_mib: int, accesses: int = 200_000,
                 seed: int = 0) -> dict[str, float]:
    """The model's ns per access for one case (``split`` is mapped by 4 KiB pages, like ``4k``)."""
    from ..machine.tlb import PAGE_SHIFT_2M, PAGE_SHIFT_4K, read_ns, read_rates

    shift = PAGE_SHIFT_2M if backing == "thp" else PAGE_SHIFT_4K
    rates = read_rates(knobs, size_mib * MiB, shift, accesses, seed) if pattern != "seq" else {}
    return read_ns(timing, knobs, pattern, size_mib * MiB, rates, shift)


def errors(timing, knobs, cases: Iterable[dict]) -> list[dict]:
    """Per case: measured, predicted (with its translation part) and the relative error."""
    out = []
    for c in cases:
        p = predict_case(timing, knobs, c["pattern"], c["backing"], c["size_mib"])
        out.append({"pattern": c["pattern"], "backing": c["backing"], "size_mib": c["size_mib"],
                    "measured_ns": c["ns"], "predicted_ns": p["ns"], "translation_ns": p["translation"],
                    "error": p["ns"] / c["ns"] - 1.0})
    return out


def nelder_mead(f: Callable[[np.ndarray], float], x0: np.ndarray, step: float = 0.3, iters: int = 4000,
                tol: float = 1e-10) -> np.ndarray:
    """Minimise ``f`` from ``x0`` (the simplex method of Nelder and Mead; deterministic)."""
    n = len(x0)
    pts = [np.asarray(x0, dtype=float)]
    for i in range(n):
        x = pts[0].copy()
        x[i] += step
        pts.append(x)
    vals = [f(x) for x in pts]
    for _ in range(iters):
        order = np.argsort(vals, kind="stable")
        pts = [pts[i] for i in order]
        vals = [vals[i] for i in order]
        if vals[-1] - vals[0] < tol:
            break
        c = np.mean(pts[:-1], axis=0)
        xr = c + (c - pts[-1])
        fr = f(xr)
        if fr < vals[0]:
            xe = c + 2 * (c - pts[-1])
            fe = f(xe)
            pts[-1], vals[-1] = (xe, fe) if fe < fr else (xr, fr)
        elif fr < vals[-2]:
            pts[-1], vals[-1] = xr, fr
        else:
            xc = c + 0.5 * (pts[-1] - c)
            fc = f(xc)
            if fc < vals[-1]:
                pts[-1], vals[-1] = xc, fc
            else:
                pts = [pts[0]] + [pts[0] + 0.5 * (x - pts[0]) for x in pts[1:]]
                vals = [vals[0]] + [f(x) for x in pts[1:]]
    return pts[int(np.argmin(vals))]


# The parameters that move with the machine's state rather than its design: the share of the
# shared LLC this guest gets, memory latency and bandwidth under other tenants' load, and the cost
# of a walk (under nested paging it depends on how the host backs the guest's memory today).
STATE_PARAMS = ("llc_ns", "dram_ns", "llc_mib", "walk_hit_ns", "walk_miss_ns", "mlp", "seq_dram_ns",
                "seq_llc_mib")


def fit_timing(cases: Iterable[dict], knobs, start=None, name: str = "fitted", source: str = "",
               restarts: int = 3, params: Iterable[str] | None = None):
    """Fit a :class:`~thpcow.machine.tlb.ReadTiming` to measured cases (least squares of log ratios).

    ``params``: the parameters to fit (default: all of ReadTiming.PARAMS); the
    others keep ``start``'s values.  The parameters are fitted in log space
    (all stay positive); the TLB counts of every case are simulated once.
    Restarting the simplex from its own best point a few times gets it out of
    the flat valleys of the capacity terms.  Deterministic.
    """
    from ..machine.tlb import ReadTiming, read_ns, read_rates

    cases = list(cases)
    t0 = start or ReadTiming(tlb_preset=knobs.name)
    names = tuple(params) if params is not None else ReadTiming.PARAMS
    unknown = set(names) - set(ReadTiming.PARAMS)
    if unknown:
        raise ValueError(f"params: unknown {', '.join(sorted(unknown))}")
    where = [ReadTiming.PARAMS.index(n) for n in names]
    prepared = []
    for c in cases:
        shift = 21 if c["backing"] == "thp" else 12
        rates = read_rates(knobs, c["size_mib"] * MiB, shift) if c["pattern"] != "seq" else {}
        prepared.append((c["pattern"], c["size_mib"] * MiB, rates, shift, math.log(c["ns"])))
    base = t0.params()

    def timing_of(x: np.ndarray):
        v = base.copy()
        v[where] = np.exp(x)
        return t0.with_params(v)

    def loss(x: np.ndarray) -> float:
        t = timing_of(x)
        s = 0.0
        for pattern, size, rates, shift, logm in prepared:
            s += (math.log(max(read_ns(t, knobs, pattern, size, rates, shift)["ns"], 1e-9)) - logm) ** 2
        return s

    x = np.log(np.maximum(base[where], 1e-6))
    for _ in range(restarts):
        x = nelder_mead(loss, x)
    fitted = timing_of(x)
    fitted.name, fitted.source, fitted.tlb_preset = name, source, knobs.name
    return fitted


def split_sets(cases: list[dict]) -> tuple[list[dict], list[dict]]:
    """(fit set, check set): the sizes alternate between the two, in increasing order; the largest
    is always fitted (the check set interpolates, never extrapolates)."""
    sizes = sorted({c["size_mib"] for c in cases})
    fit_sizes = set(sizes[0::2]) | set(sizes[-1:])
    return ([c for c in cases if c["size_mib"] in fit_sizes], [c for c in cases if c["size_mib"] not in fit_sizes])


def cpu_identity(root: str = "/") -> tuple[str, str, str]:
    """(vendor_id, cpu family, model) of the first processor in /proc/cpuinfo ("" where absent)."""
    want = {"vendor_id": 0, "cpu family": 1, "model": 2}
    out = ["", "", ""]
    try:
        with open(os.path.join(root, "proc/cpuinfo")) as f:
            for line in f:
                if not line.strip():
                    break
                key, _, val = line.partition(":")
                if key.strip() in want:
                    out[want[key.strip()]] = val.strip()
    except OSError:
        pass
    return out[0], out[1], out[2]


def machine_timing(root: str = "/"):
    """(ReadTiming, TlbKnobs) fitted for this machine's CPU, or (None, None) if none is."""
    from ..machine.presets import get_preset, read_timing_for_cpu

    t = read_timing_for_cpu(*cpu_identity(root))
    return (t, get_preset(t.tlb_preset)) if t else (None, None)
