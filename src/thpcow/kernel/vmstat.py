"""Model of mm/vmstat.c: the /proc/vmstat counters and the per-size mTHP stats.

Every event counter has the kernel's name (``vmstat_text[]``) and is counted at
the point where the kernel counts it.  Counters that only the simulator has get
a ``sim_`` prefix.  Node state items (``nr_anon_pages``,
``nr_anon_transparent_hugepages``) are kept in pages, as the kernel does, and
printed in the kernel's units.
"""

from __future__ import annotations

import numpy as np

from .constants import HPAGE_PMD_NR, HPAGE_PMD_ORDER, order_to_kb

# Node/zone state items printed first in /proc/vmstat (a subset: the anon ones).
NODE_STATE_ITEMS = (
    "nr_free_pages",
    "nr_anon_pages",                  # NR_ANON_MAPPED, pages
    "nr_anon_transparent_hugepages",  # NR_ANON_THPS, printed in units of HPAGE_PMD_NR
    "nr_page_table_pages",
)

# Events, in the order of include/linux/vm_event_item.h (those thpcow models).
VM_EVENT_ITEMS = (
    "pgpgin", "pgpgout", "pswpin", "pswpout",
    "pgfault", "pgmajfault",
    "thp_migration_success", "thp_migration_fail", "thp_migration_split",
    "thp_fault_alloc", "thp_fault_fallback", "thp_fault_fallback_charge",
    "thp_collapse_alloc", "thp_collapse_alloc_failed",
    "thp_split_page", "thp_split_page_failed", "thp_deferred_split_page",
    "thp_underused_split_page", "thp_split_pmd",
    "thp_scan_exceed_none_pte", "thp_scan_exceed_swap_pte", "thp_scan_exceed_share_pte",
    "thp_zero_page_alloc", "thp_zero_page_alloc_failed",
    "thp_swpout", "thp_swpout_fallback",
    "pgreuse", "cow_ksm", "pgscan_anon", "pgsteal_anon", "pgsteal_file", "pglazyfreed",
    "compact_stall", "compact_success", "compact_fail", "compact_migrate_scanned", "compact_daemon_wake",
    "pgmigrate_success", "pgmigrate_fail", "memory_failure_late_kill",
    # Simulator-only counters.
    "sim_cow_pages", "sim_cow_bytes", "sim_huge_cow", "sim_collapse_bytes", "sim_zero_bytes", "sim_compact_pages",
    "sim_memory_failure",
)

# Per-size stats: /sys/kernel/mm/transparent_hugepage/hugepages-<N>kB/stats/<name>
MTHP_STAT_ITEMS = (
    "anon_fault_alloc", "anon_fault_fallback", "anon_fault_fallback_charge",
    "zswpout", "swpin", "swpin_fallback", "swpin_fallback_charge",
    "swpout", "swpout_fallback",
    "split", "split_failed", "split_deferred",
    "nr_anon", "nr_anon_partially_mapped",
)
_MTHP_INDEX = {name: i for i, name in enumerate(MTHP_STAT_ITEMS)}


class VmStat:
    """The counters of one simulated kernel."""

    def __init__(self) -> None:
        self.events: dict[str, int] = dict.fromkeys(VM_EVENT_ITEMS, 0)
        self.node: dict[str, int] = dict.fromkeys(NODE_STATE_ITEMS, 0)
        self.mthp = np.zeros((HPAGE_PMD_ORDER + 1, len(MTHP_STAT_ITEMS)), dtype=np.int64)

    def count_vm_event(self, item: str, n: int = 1) -> None:
        """Model of count_vm_event()/count_vm_events()."""
        self.events[item] += n

    def count_mthp_stat(self, order: int, item: str, n: int = 1) -> None:
        """Model of count_mthp_stat(): order-0 events are never recorded."""
        if order <= 0:
            return
        self.mthp[order, _MTHP_INDEX[item]] += n

    mod_mthp_stat = count_mthp_stat

    def mthp_stat(self, order: int, item: str) -> int:
        return int(self.mthp[order, _MTHP_INDEX[item]])

    def mod_node_page_state(self, item: str, n: int) -> None:
        """Model of __mod_node_page_state()/__lruvec_stat_mod_folio()."""
        self.node[item] += n

    def snapshot(self) -> dict[str, int]:
        """All counters by their /proc/vmstat name (node items in printed units)."""
        out = {name: self.node_printed(name) for name in NODE_STATE_ITEMS}
        out.update(self.events)
        return out

    def node_printed(self, name: str) -> int:
        val = self.node[name]
        if name == "nr_anon_transparent_hugepages":
            return val // HPAGE_PMD_NR
        return val

    def mthp_snapshot(self) -> dict[str, dict[str, int]]:
        """Per-size stats as {"hugepages-64kB": {"anon_fault_alloc": n, ...}}."""
        out = {}
        for order in range(2, HPAGE_PMD_ORDER + 1):
            out[f"hugepages-{order_to_kb(order)}kB"] = {
                name: int(self.mthp[order, i]) for i, name in enumerate(MTHP_STAT_ITEMS)
            }
        return out

    def text(self) -> str:
        """/proc/vmstat as the kernel prints it: "name value" lines."""
        return "".join(f"{k} {v}\n" for k, v in self.snapshot().items())

    def meminfo_anon_huge_kb(self) -> int:
        """/proc/meminfo AnonHugePages (kB): NR_ANON_THPS, counted once per folio."""
        return self.node["nr_anon_transparent_hugepages"] * 4


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    """Counter deltas, keeping only the ones that moved."""
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
