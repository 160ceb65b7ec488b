"""Latency models that price one workload op: the machine model's, or a PLACEHOLDER.

:func:`latency_model` returns :class:`MachineLatencyModel`, an adapter over
:func:`thpcow.machine.latency.cost_vmstat_delta` (the op's vmstat deltas,
with fork/exit page-table hints), when :mod:`thpcow.machine` can be
imported, and otherwise :class:`PlaceholderLatencyModel`, a stand-in with the
same per-event costs written out here.  Both add the op's own work: 15 ns per
access and 0.035 ns per byte moved.  Address translation is not in either:
the runner reports it separately (``tlb_ms``, from the TLB simulator).

The placeholder's costs (from calibration.md (the reference measurements of the lab VM), "Key numbers"):
It prices one workload op from the vmstat deltas the op caused, the number of
accesses it made and the bytes it moved, with the warm, guest-only medians
measured on the lab VM (2 vCPU Zen 4 KVM guest, Linux 6.18):

=========================  ==========  ==============================================
event                      cost        source (calibration.md, "Key numbers")
=========================  ==========  ==============================================
4 KiB zero-fill fault      1.53 us     4 KiB anon write fault p50
THP fault                  221 us      2 MiB THP write fault p50 (alloc + clear)
COW PMD split              8.88 us     COW 1st write into a THP (10.7 us) - 4 KiB COW
4 KiB COW fault            1.82 us     COW, later writes into the PTE-mapped 2 MiB
extra 4 KiB copied         0.30 us     memcpy 4 KiB cold (pages of an mTHP-size COW)
whole-2 MiB COW            387 us      THP alloc + clear (221 us) + 2 MiB copy (166 us)
reuse fault (4 KiB)        0.70 us     write-after-fork once the child has exited
collapse of 2 MiB          169 us      MADV_COLLAPSE of a PTE-mapped 2 MiB, exclusive
fork                       160 us + 34.3 us/PTE table + 0.92 us/PMD   fork() rows
exit                       27.3 us/PTE table + 0.68 us/PMD            child exit rows
access                     15 ns       random 8 B access, 256 MiB buffer
bytes moved                0.035 ns/B  memset / sequential read, ~28.6 GB/s
=========================  ==========  ==============================================

How the deltas are split into events (vmstat has no per-kind fault counter):
``huge_cow = min(sim_huge_cow, thp_fault_alloc)`` (the series allocates a THP
per whole-2 MiB copy); ``thp_zero = thp_fault_alloc - huge_cow``; of the other
faults (``pgfault - pgreuse - thp_fault_alloc``) up to ``sim_cow_pages`` are
COW faults and the rest zero-fill faults; copied pages beyond the COW faults
cost a memcpy each.  khugepaged's work is not charged to any op (it runs on
its own thread); MADV_COLLAPSE from a policy's ``phase_end`` and cow-density's
collapses are.  TLB misses are not modelled here (the machine model does them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

US = 1000.0
ACCESS_NS = 15.0        # one load or store: random 8 B access, 256 MiB buffer (calibration.md section 6)
BYTE_NS = 0.035         # per byte moved: memset / sequential read at ~28.6 GB/s (sections 4 and 6)


@dataclass(frozen=True)
class PlaceholderLatencyModel:
    """Per-event costs (ns) from calibration.md; see the module docstring."""

    name: str = "placeholder (calibration.md key numbers)"
    fault_4k: float = 1.53 * US
    thp_fault: float = 221 * US
    cow_split: float = (10.7 - 1.82) * US
    cow_4k: float = 1.82 * US
    copy_4k: float = 0.30 * US
    copy_2m: float = 166 * US
    reuse_4k: float = 0.70 * US
    collapse_2m: float = 169 * US
    fork_base: float = 160 * US
    fork_pte_table: float = 67.0 * 512
    fork_pmd: float = 0.47e6 / 512
    exit_pte_table: float = 14e6 / 512
    exit_pmd: float = 0.35e6 / 512
    access: float = ACCESS_NS
    per_byte: float = BYTE_NS

    def fault_cost_ns(self, d: Mapping[str, int]) -> float:
        """Cost of the faults, splits, copies and collapses recorded in the vmstat delta ``d``."""
        g = d.get
        thp_alloc = g("thp_fault_alloc", 0)
        huge_cow = min(g("sim_huge_cow", 0), thp_alloc)
        thp_zero = thp_alloc - huge_cow
        cow_pages = g("sim_cow_pages", 0)
        other = max(g("pgfault", 0) - g("pgreuse", 0) - thp_alloc, 0)
        cow_faults = min(cow_pages, other)
        return (thp_zero * self.thp_fault + huge_cow * (self.thp_fault + self.copy_2m)
                + (other - cow_faults) * self.fault_4k + cow_faults * self.cow_4k
                + (cow_pages - cow_faults) * self.copy_4k + g("thp_split_pmd", 0) * self.cow_split
                + g("pgreuse", 0) * self.reuse_4k + g("thp_collapse_alloc", 0) * self.collapse_2m)

    def op_cost_ns(self, kind: str, d: Mapping[str, int], accesses: int = 0, nbytes: int = 0,
                   pte_tables: int = 0, pmds: int = 0) -> float:
        """Modelled time of one op: its accesses, its bytes, its faults; fork/exit by page tables walked."""
        cost = accesses * self.access + nbytes * self.per_byte + self.fault_cost_ns(d)
        if kind == "fork":
            cost += self.fork_base + pte_tables * self.fork_pte_table + pmds * self.fork_pmd
        elif kind == "exit":
            cost += pte_tables * self.exit_pte_table + pmds * self.exit_pmd
        return cost


class MachineLatencyModel:
    """Adapter: :func:`thpcow.machine.latency.cost_vmstat_delta` on each op's deltas, plus its accesses and bytes."""

    def __init__(self, profile=None) -> None:
        from ..machine import latency

        self.profile = profile or latency.DEFAULT_PROFILE
        self._cost = latency.cost_vmstat_delta
        self.name = f"thpcow.machine.latency ({self.profile.name})"

    def op_cost_ns(self, kind: str, d: Mapping[str, int], accesses: int = 0, nbytes: int = 0,
                   pte_tables: int = 0, pmds: int = 0) -> float:
        """Modelled time of one op; fork and exit get the page-table hints vmstat does not count."""
        hints: dict[str, int] = {}
        if kind == "fork":
            hints = {"forks": 1, "fork_pmds": pmds, "fork_pte_tables": pte_tables}
        elif kind == "exit":
            hints = {"exit_pmds": pmds, "exit_pte_tables": pte_tables}
        return accesses * ACCESS_NS + nbytes * BYTE_NS + self._cost(d, self.profile, hints).total_ns


def latency_model(machine: str | None = None):
    """The machine model's latency model when thpcow.machine imports, else the placeholder."""
    try:
        return MachineLatencyModel()
    except ImportError:
        return PlaceholderLatencyModel()
