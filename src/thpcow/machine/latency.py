"""Model of what kernel memory-management events cost in time, priced from the /proc/vmstat deltas they cause.

A :class:`CalibrationProfile` holds one cost (ns) per kernel event.  The
default is the lab VM of the reference calibration (2 vCPU AMD EPYC Zen 4
KVM guest, Linux 6.18), warm numbers: guest-kernel cost without the host's
page faults.  :func:`cost_vmstat_delta` prices one kernel operation (a fault,
a batch of stores, an madvise, a fork) from the counters it moved, and
:class:`LatencyRecorder` keeps a latency distribution per operation kind in
HDR histograms.

How counters map to costs (``d`` is the delta, every name as in /proc/vmstat)::

    event                         counted as                                   profile field
    ----------------------------  -------------------------------------------  --------------------
    THP fault (alloc + clear)     thp_fault_alloc                              fault_thp_zero_ns
    whole-2 MiB copy              (sim_cow_bytes - 4096*sim_cow_pages) / 2 MiB copy_2m_ns
    4 KiB COW fault               min(sim_cow_pages, other faults)             cow_4k_ns
    more 4 KiB copied in a fault  sim_cow_pages - 4 KiB COW faults             copy_4k_ns
    PMD split                     thp_split_pmd                                split_pmd_ns
    reuse fault (4 KiB)           pgreuse                                      reuse_4k_ns
    4 KiB zero-fill fault         the other faults (see below)                 fault_4k_zero_ns
    collapse of 2 MiB             thp_collapse_alloc                           collapse_ns
    swap-out / swap-in, per page  pswpout / pswpin (a swap-in is a major fault) swap_*_page_ns
    compaction, per page          pgmigrate_success + hint compact_pages       compact_page_ns
    TLB shootdown                 nr_tlb_remote_flush + hint shootdowns        tlb_shootdown_ns
    failed THP allocation         thp_fault_fallback                           thp_fault_fallback_ns
    fork page-table copy          hints forks, fork_pmds, fork_pte_tables,     fork_*_ns
                                  fork_ptes (present PTEs; default 512/table)
    exit page-table teardown      hints exit_pmds, exit_pte_tables, exit_ptes  exit_*_ns
    COW in a dense overwrite      hint dense_cow_pages                         cow_dense_4k_ns
    read fault on the zero page   hint zero_page_reads                         zero_page_read_ns
    read fault, huge zero page    hint huge_zero_reads                         huge_zero_read_ns
    reuse fault on a PMD          hint thp_reuse                               reuse_thp_ns

"Other faults" are ``pgfault - thp_fault_alloc - pgreuse - pgmajfault`` minus
the hinted fault kinds (a major fault is a swap-in, priced per ``pswpin``).
What is approximate:

* The kernel counts no zero-page read faults, no PMD reuse faults and no
  fork or exit work in vmstat.  Without hints such faults are priced as 4 KiB
  zero-fill faults, and fork/exit cost nothing.  :func:`fork_hints` counts a
  process's PMD leaves and PTE tables for fork and exit.
* One COW fault per copied 4 KiB page is assumed until the faults run out;
  the rest of the pages (an mTHP-size or pre-5.8 whole-THP copy made of
  4 KiB pages inside one fault) cost a memcpy each.
* A whole-2 MiB COW (the thp_cow series) is a THP fault (allocate and clear
  2 MiB, as ``vma_alloc_anon_folio_pmd()`` does) plus a 2 MiB copy.
* ``pgmigrate_success`` (pages moved; the simulator's ``sim_compact_pages``
  counts the same pages for successful compactions) also counts NUMA and
  other migrations, and a failed compaction's scanning is not priced;
  ``nr_tlb_remote_flush`` exists only with CONFIG_DEBUG_TLBFLUSH.
* fork() copies page tables entry by entry: a PTE table costs its
  allocation and its walk (``fork_pte_table_ns``) plus ``fork_pte_ns`` for
  every present entry (copy_present_pte(): the entry, the folio's refcount and
  its rmap dup).  A sparsely populated table is cheap; a full one costs 512
  entries.  Exit likewise.  Without a ``fork_ptes`` hint every table is full.
* A COW fault costs more when the store that took it is the start of a
  stream that overwrites the whole page (a memset, a rewrite of a buffer):
  the copy has filled the cache with lines that the stream then rewrites,
  and the faults break the stream.  ``cow_dense_4k_ns`` is that extra per
  page, measured by calibrate as (a memset over fork-shared 4 KiB pages -
  the same memset without faults) / pages - a 1-byte COW fault; callers that
  know a write is dense pass the ``dense_cow_pages`` hint.  It may be
  negative (SIGNED_FIELDS): where the copy leaves the new page in the cache,
  the stream's stores to it cost less than to memory (an Intel Xeon 6 VM:
  -0.2 to -0.3 us), where on the Zen 4 VM of calibration.md it was +0.89 us.
* Every cost is a median: variance, cache state and the host's faults
  (calibration.md "cold" numbers, 20x dearer for THP faults) are not modelled.
"""

from __future__ import annotations

import json
import math
import sys
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, TextIO

import numpy as np

if TYPE_CHECKING:
    from ..kernel import Process

PAGE_SIZE = 4096
HPAGE_PMD_SIZE = 2 << 20
PTRS_PER_TABLE = 512
US = 1000.0

try:                                   # HDR histograms (pip install hdrhistogram), else the fallback below
    from hdrh.histogram import HdrHistogram as _HdrHistogram
except ImportError:                    # pragma: no cover - depends on the environment
    _HdrHistogram = None

HDR_AVAILABLE = _HdrHistogram is not None


SIGNED_FIELDS = ("cow_dense_4k_ns",)    # a difference of two costs: may be below zero


@dataclass
class CalibrationProfile:
    """The cost (ns) of every kernel memory-management event on one machine.

    Defaults: the lab VM of calibration.md, warm (median per-run p50, or the
    per-page slope of the fork and exit fits).  Each comment names the table
    row.  Values marked "not measured" are assumptions: the lab VM has no
    swap, no compaction run and no TLB-flush counter.
    """

    name: str = "lab-vm-zen4-warm"
    source: str = "reference calibration of the lab VM (2026-11-25), warm numbers"
    # The CPU it was measured on (/proc/cpuinfo "model name"): a profile is only right on that kind.
    cpu: str = "AMD EPYC (Zen 4 / Genoa, family 25 model 17), KVM guest, 2 vCPUs"
    # The kernel release it was measured on (uname -r); "" when not known.
    kernel: str = "6.18.44-fc-v669"
    # vendor:family:model of /proc/cpuinfo ("AuthenticAMD:25:17"): what auto-selection matches on.
    cpu_id: str = "AuthenticAMD:25:17"
    # 1. First-touch faults (256 MiB region), rows "4K write (MADV_NOHUGEPAGE) | warm" and
    #    "THP write fault (MADV_HUGEPAGE, 2M aligned) | warm": per-fault p50 1.53 us and 221 us.
    fault_4k_zero_ns: float = 1.53 * US
    fault_thp_zero_ns: float = 221 * US
    # 1. rows "4K read -> 4K zero page | warm" (0.61 us) and "THP read -> huge zero page | warm" (1.31 us).
    zero_page_read_ns: float = 0.61 * US
    huge_zero_read_ns: float = 1.31 * US
    # 3a/3b. COW in the parent after fork, row "4k | warm": subsequent 4K writes p50 1.80 us
    #    (a whole COW fault: allocate, copy 4 KiB, remap).
    cow_4k_ns: float = 1.80 * US
    # 4. Copy bandwidth, row "C memcpy, cold (1 GiB walk)": 4 KiB 0.299 us, 2 MiB 166 us.
    copy_4k_ns: float = 0.299 * US
    copy_2m_ns: float = 166 * US
    # 3a. row "thp | warm": 1st write per 2 MiB 10.7 us = PMD split + a 4 KiB COW (1.82 us).
    split_pmd_ns: float = (10.7 - 1.82) * US
    # 2. fork() latency, "Key numbers": THP-backed 0.47 ms per GiB + 0.16 ms (512 PMDs per GiB);
    #    4 KiB-backed 67 ns per PTE (full tables only: the table's own share is not separated
    #    there, so it is folded into the per-PTE cost and the per-table cost is 0).
    fork_base_ns: float = 160 * US
    fork_pmd_ns: float = 0.47e6 / 512
    fork_pte_ns: float = 67.0
    fork_pte_table_ns: float = 0.0
    # 2. "child exit after fork (no writes)": 4 KiB 14 ms per GiB, THP 0.35 ms per GiB (as above).
    exit_pte_ns: float = 14e6 / 512 / 512
    exit_pte_table_ns: float = 0.0
    exit_pmd_ns: float = 0.35e6 / 512
    # 3c. "parent writes all (child alive)", 4k: 1,453 us per 2 MiB = memset 77.3 + 512 COW faults
    #    at 1.80 + 512 x 0.89 us: the extra of a COW fault taken by a dense overwrite.
    cow_dense_4k_ns: float = (1453 - 77.3) / 512 * US - 1.80 * US
    # 5. MADV_COLLAPSE, row "child exited - warm": p50 169 us per 2 MiB (pages exclusive).
    collapse_ns: float = 169 * US
    # 2. "re-dirty whole region after fork" (child exited): 4k 359-385 us per 2 MiB = 0.7 us per
    #    4 KiB reuse fault; thp 7.76-9.04 us per 2 MiB = one PMD reuse fault.
    reuse_4k_ns: float = 0.70 * US
    reuse_thp_ns: float = 8.0 * US
    # Not measured (assumptions): migrating one 4 KiB page (copy + unmap/remap), swap to an NVMe
    # device, one TLB shootdown with one remote CPU (an IPI round trip is 1-3 us), and the extra
    # cost of a failed THP allocation before the 4 KiB fallback.
    compact_page_ns: float = 2.0 * US
    swap_out_page_ns: float = 20.0 * US
    swap_in_page_ns: float = 30.0 * US
    tlb_shootdown_ns: float = 2.0 * US
    thp_fault_fallback_ns: float = 0.0

    # -- files ----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping, where: str = "profile") -> "CalibrationProfile":
        """Build a profile from a mapping; a bad key or value raises ValueError naming the field."""
        known = {f.name: f.type for f in fields(cls)}
        for key, val in data.items():
            if key not in known:
                raise ValueError(f"{where}: field '{key}': not a profile field")
            if known[key] == "str":
                if not isinstance(val, str):
                    raise ValueError(f"{where}: field '{key}': expected a string, got {val!r}")
            elif isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val) \
                    or (val < 0 and key not in SIGNED_FIELDS):
                raise ValueError(f"{where}: field '{key}': expected a cost in ns >= 0, got {val!r}")
        vals = {k: (v if known[k] == "str" else float(v)) for k, v in data.items()}
        for op in ("fork", "exit"):     # files from before the per-PTE fields: a cost per full table
            if f"{op}_pte_table_ns" in vals and f"{op}_pte_ns" not in vals:
                vals[f"{op}_pte_ns"] = vals[f"{op}_pte_table_ns"] / PTRS_PER_TABLE
                vals[f"{op}_pte_table_ns"] = 0.0
        return cls(**vals)

    @classmethod
    def load(cls, path: str | Path) -> "CalibrationProfile":
        """Read a profile from a .toml or .json file (missing fields keep their defaults)."""
        path = Path(path)
        text = path.read_text()
        try:
            data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
            raise ValueError(f"{path}: cannot parse: {e}") from None
        return cls.from_dict(data, where=str(path))

    def save(self, path: str | Path) -> Path:
        """Write the profile as TOML (or JSON when the name ends in .json)."""
        path = Path(path)
        d = self.to_dict()
        if path.suffix == ".json":
            path.write_text(json.dumps(d, indent=2) + "\n")
            return path
        lines = []
        for key, val in d.items():
            if isinstance(val, str):
                escaped = val.replace("\\", "\\\\").replace('"', '\\"')
                lines.append(f'{key} = "{escaped}"')
            else:
                lines.append(f"{key} = {float(val)!r}")
        path.write_text("\n".join(lines) + "\n")
        return path

    # -- pricing --------------------------------------------------------------------------------
    def fault_cost_ns(self, delta: Mapping[str, int], hints: Mapping[str, int] | None = None) -> float:
        """Total cost of the events in a vmstat delta (see :func:`cost_vmstat_delta`)."""
        return cost_vmstat_delta(delta, self, hints).total_ns


DEFAULT_PROFILE = CalibrationProfile()

HINTS = ("zero_page_reads", "huge_zero_reads", "thp_reuse", "forks", "fork_pmds", "fork_pte_tables",
         "fork_ptes", "exit_pmds", "exit_pte_tables", "exit_ptes", "shootdowns", "compact_pages",
         "dense_cow_pages")

_EVENTS = ("pgfault", "pgmajfault", "pgreuse", "thp_fault_alloc", "thp_fault_fallback", "thp_split_pmd",
           "thp_collapse_alloc", "sim_cow_pages", "sim_cow_bytes", "pswpin", "pswpout",
           "pgmigrate_success", "nr_tlb_remote_flush")


@dataclass
class OpCost:
    """The priced events of one kernel operation: counts per event, ns per event, the total."""

    total_ns: float
    events: dict[str, int] = field(default_factory=dict)
    parts_ns: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        parts = ", ".join(f"{k} {self.events[k]} x = {v / US:,.2f} us" for k, v in self.parts_ns.items() if v)
        return f"{self.total_ns / US:,.2f} us" + (f" ({parts})" if parts else "")


def cost_vmstat_delta(delta: Mapping[str, int], profile: CalibrationProfile | None = None,
                      hints: Mapping[str, int] | None = None) -> OpCost:
    """Price one kernel operation from the /proc/vmstat counter deltas it caused.

    ``delta`` maps counter names to increments (``after - before``; other
    counters are ignored).  ``hints`` gives what vmstat does not count (names
    in :data:`HINTS`).  The mapping and its approximations are in the module
    docstring.  A negative event count or an unknown hint raises ValueError.
    """
    p = profile or DEFAULT_PROFILE
    hints = dict(hints or {})
    for name in hints:
        if name not in HINTS:
            raise ValueError(f"hint '{name}': unknown (known: {', '.join(HINTS)})")
    for name, val in list(delta.items()) + list(hints.items()):
        if (name in _EVENTS or name in HINTS) and int(val) < 0:
            raise ValueError(f"'{name}': negative count {val}")
    g = lambda k: int(delta.get(k, 0))          # noqa: E731
    h = lambda k: int(hints.get(k, 0))          # noqa: E731

    thp_faults = g("thp_fault_alloc")
    cow_pages = g("sim_cow_pages")
    huge_copies = max(0, g("sim_cow_bytes") - PAGE_SIZE * cow_pages) // HPAGE_PMD_SIZE
    reuse = g("pgreuse")
    other = max(0, g("pgfault") - thp_faults - reuse - g("pgmajfault") - h("zero_page_reads")
                - h("huge_zero_reads") - h("thp_reuse"))
    cow_faults = min(cow_pages, other)
    ptes = {op: (h(f"{op}_ptes") if f"{op}_ptes" in hints else PTRS_PER_TABLE * h(f"{op}_pte_tables"))
            for op in ("fork", "exit")}
    events = {
        "fault_4k_zero": other - cow_faults,
        "fault_thp_zero": thp_faults,
        "zero_page_read": h("zero_page_reads"),
        "huge_zero_read": h("huge_zero_reads"),
        "cow_4k": cow_faults,
        "cow_dense_4k": min(h("dense_cow_pages"), cow_faults),
        "copy_4k": cow_pages - cow_faults,
        "copy_2m": huge_copies,
        "split_pmd": g("thp_split_pmd"),
        "reuse_4k": reuse,
        "reuse_thp": h("thp_reuse"),
        "collapse": g("thp_collapse_alloc"),
        "swap_out_page": g("pswpout"),
        "swap_in_page": g("pswpin"),
        "compact_page": g("pgmigrate_success") + h("compact_pages"),
        "tlb_shootdown": g("nr_tlb_remote_flush") + h("shootdowns"),
        "thp_fault_fallback": g("thp_fault_fallback"),
        "fork_base": h("forks"),
        "fork_pmd": h("fork_pmds"),
        "fork_pte_table": h("fork_pte_tables"),
        "fork_pte": ptes["fork"],
        "exit_pmd": h("exit_pmds"),
        "exit_pte_table": h("exit_pte_tables"),
        "exit_pte": ptes["exit"],
    }
    parts = {name: n * getattr(p, name + "_ns") for name, n in events.items()}
    return OpCost(total_ns=float(sum(parts.values())), events=events, parts_ns=parts)


def fork_hints(proc: "Process") -> dict[str, int]:
    """The page-table work fork() (or exit) of a simulated process does: PMD leaves, PTE tables, PTEs.

    A PMD leaf costs one copy_huge_pmd(); every PTE table (a PMD of kind
    table) one copy_pte_range() walk, plus one copy_present_pte() per entry
    that is not none.  Use as hints for the fork (``forks=1, fork_pmds,
    fork_pte_tables, fork_ptes``) or, renamed, for the exit.
    """
    from ..kernel.mm import PMD_LEAF, PMD_TABLE, PTE_NONE

    pt = proc.mm.pt
    kind = pt.pmd_kind[: pt.nr_slots]
    rows = pt.pmd_row[: pt.nr_slots][kind == PMD_TABLE]
    ptes = 0
    for i in range(0, len(rows), 4096):                # bounded temporaries for big processes
        r = rows[i:i + 4096]
        ptes += int(np.count_nonzero((pt.pte_pfn[r] != PTE_NONE) | (pt.pte_flags[r] != 0)))
    return {"forks": 1, "fork_pmds": int(np.count_nonzero(kind == PMD_LEAF)),
            "fork_pte_tables": int(len(rows)), "fork_ptes": ptes}


# -- latency distributions ----------------------------------------------------------------------
class LatencyHistogram:
    """A latency distribution (ns) with p50/p99/p99.9/max: an HDR histogram (3 significant digits).

    Uses the ``hdrhistogram`` package when it is installed; otherwise a
    log-bucketed histogram with 64 buckets per power of two (relative error
    under 1.1 %), which is what ``fallback=True`` forces.
    """

    LOWEST = 1
    HIGHEST = 3_600 * 10**9            # one hour in ns

    def __init__(self, fallback: bool = False) -> None:
        self.backend = "log-buckets" if (fallback or not HDR_AVAILABLE) else "hdrhistogram"
        if self.backend == "hdrhistogram":
            self._h = _HdrHistogram(self.LOWEST, self.HIGHEST, 3)
        else:
            self._h = _LogHistogram()

    def record(self, ns: float, count: int = 1) -> None:
        v = min(max(int(round(ns)), self.LOWEST), self.HIGHEST)
        if self.backend == "hdrhistogram":
            self._h.record_value(v, count)
        else:
            self._h.record(v, count)

    @property
    def count(self) -> int:
        return int(self._h.get_total_count() if self.backend == "hdrhistogram" else self._h.total)

    def percentile(self, p: float) -> float:
        if not self.count:
            return 0.0
        if self.backend == "hdrhistogram":
            return float(self._h.get_value_at_percentile(p))
        return self._h.percentile(p)

    def max(self) -> float:
        if not self.count:
            return 0.0
        return float(self._h.get_max_value() if self.backend == "hdrhistogram" else self._h.max)

    def mean(self) -> float:
        if not self.count:
            return 0.0
        return float(self._h.get_mean_value() if self.backend == "hdrhistogram" else self._h.mean())

    def summary(self) -> dict[str, float]:
        return {"count": self.count, "p50": self.percentile(50), "p99": self.percentile(99),
                "p99.9": self.percentile(99.9), "max": self.max(), "mean": round(self.mean(), 3)}


class _LogHistogram:
    """Log-bucketed histogram: bucket ``floor(64 * log2(v))``, reported at the bucket's geometric middle."""

    SUB = 64

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.total = 0
        self.sum = 0.0
        self.max = 0
        self.min = 0

    def record(self, v: int, count: int) -> None:
        b = int(math.floor(self.SUB * math.log2(v)))
        self.counts[b] = self.counts.get(b, 0) + count
        self.min = v if not self.total else min(self.min, v)
        self.total += count
        self.sum += float(v) * count
        self.max = max(self.max, v)

    def percentile(self, p: float) -> float:
        target = max(1, math.ceil(self.total * p / 100.0))
        seen = 0
        for b in sorted(self.counts):
            seen += self.counts[b]
            if seen >= target:
                mid = 2.0 ** ((b + 0.5) / self.SUB)
                return float(min(max(mid, self.min), self.max))
        return float(self.max)

    def mean(self) -> float:
        return self.sum / self.total if self.total else 0.0


class LatencyRecorder:
    """Per-operation latency distributions: one :class:`LatencyHistogram` per operation kind."""

    def __init__(self, profile: CalibrationProfile | None = None, fallback: bool = False) -> None:
        self.profile = profile or DEFAULT_PROFILE
        self.fallback = fallback
        self.ops: dict[str, LatencyHistogram] = {}

    def record(self, op: str, ns: float, count: int = 1) -> None:
        hist = self.ops.get(op)
        if hist is None:
            hist = self.ops[op] = LatencyHistogram(self.fallback)
        hist.record(ns, count)

    def record_delta(self, op: str, delta: Mapping[str, int], hints: Mapping[str, int] | None = None,
                     extra_ns: float = 0.0) -> OpCost:
        """Price one operation from its vmstat delta (plus ``extra_ns``, e.g. TLB time) and record it."""
        cost = cost_vmstat_delta(delta, self.profile, hints)
        self.record(op, cost.total_ns + extra_ns)
        return cost

    def summary(self) -> dict[str, dict[str, float]]:
        return {op: h.summary() for op, h in sorted(self.ops.items())}

    def print_summary(self, file: TextIO | None = None) -> None:
        """One line per operation kind: count, p50, p99, p99.9, max (us)."""
        out = file or sys.stdout
        print(f"{'operation':<24}{'count':>10}{'p50 us':>12}{'p99 us':>12}{'p99.9 us':>12}{'max us':>12}",
              file=out)
        for op, s in self.summary().items():
            print(f"{op:<24}{s['count']:>10,}{s['p50'] / US:>12.2f}{s['p99'] / US:>12.2f}"
                  f"{s['p99.9'] / US:>12.2f}{s['max'] / US:>12.2f}", file=out)
