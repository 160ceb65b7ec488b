"""Validation: the fork/COW-split scenario on the running kernel and on the simulator agree.

thpcow.lab.scenario.run_fork_split() runs on the real kernel: mmap size + 2 MiB, madvise
(MADV_HUGEPAGE) the 2 MiB aligned size inside it, write every 4 KiB page, fork, let the child
write ``writes`` bytes per 2 MiB (pages 1..writes of each PMD), then let the child exit.
The same program runs here on a simulated kernel whose THP knobs are copied from the
machine's, and the two must report the same

- thp_fault_alloc and thp_split_pmd deltas of each stage (populate, child writes, child exit),
- other THP events (thp_split_page, thp_deferred_split_page, thp_fault_fallback),
- AnonHugePages of the range: parent after populate, parent and child after the child's
  writes, parent after the child's exit.

Mainline expectation (kernel-semantics.md §5.1, §5.3, §12.5) for 8 MiB: populate faults 4
PMD THPs; each child write to a shared THP splits the child's PMD only (the first write per
PMD: thp_split_pmd +1, later writes in the same PMD are 4 KiB COWs at PTE level); nothing
is split or queued for deferred split while the parent still PMD-maps the folios.

vmstat is system-wide on the real kernel; run_fork_split() serialises lab scenarios and
returns the quietest of three runs (see tests/test_lab_realkernel.py for the discussion).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest

from thpcow.kernel import HPAGE_PMD_SIZE, PAGE_SIZE
from thpcow.lab import scenario

from conftest import (
    MiB, VmstatDelta, aligned_region, sim_kernel_with_knobs, skip_unless_settled, skip_without_real_thp,
    smaps_anon_huge_kb,
)

pytestmark = pytest.mark.realkernel

SIZE_MIB = 8
COMPARED = ("thp_fault_alloc", "thp_split_pmd")
ALSO_COMPARED = ("thp_split_page", "thp_deferred_split_page", "thp_fault_fallback")
VIEWS = ("parent_after_populate", "parent_after_child_writes", "child_after_child_writes",
         "parent_after_child_exit")


@dataclass
class SimResult:
    deltas: dict[str, dict[str, int]]      # stage -> counter -> delta
    anon_huge_kb: dict[str, int]           # VIEWS -> kB
    knobs: dict[str, str]


def run_fork_split_sim(size_mib: int, writes_per_2m: int, knobs: dict[str, str]) -> SimResult:
    """run_fork_split() written out on the simulator, step for step."""
    k, copied = sim_kernel_with_knobs(knobs, ram=512 << 20)
    pmd = HPAGE_PMD_SIZE
    size = size_mib * MiB
    nr_pmds = size // pmd
    populate_offsets = np.arange(0, size, PAGE_SIZE, dtype=np.int64)
    child_offsets = np.array([b * pmd + (j + 1) * PAGE_SIZE
                              for b in range(nr_pmds) for j in range(writes_per_2m)],
                             dtype=np.int64)

    parent = k.spawn()
    addr = aligned_region(parent, size)                  # scenario.thp_region()
    end = addr + size

    vm_before = k.vmstat_snapshot()
    parent.write_many(addr + populate_offsets, 1)        # one byte per page
    vm_populate = k.vmstat_snapshot()
    ahp = {"parent_after_populate": smaps_anon_huge_kb(parent, addr, end)}

    child = parent.fork()
    child.write_many(addr + child_offsets, 1)
    vm_child_writes = k.vmstat_snapshot()                # the child is still alive
    ahp["child_after_child_writes"] = smaps_anon_huge_kb(child, addr, end)
    ahp["parent_after_child_writes"] = smaps_anon_huge_kb(parent, addr, end)

    child.exit()
    vm_child_exit = k.vmstat_snapshot()
    ahp["parent_after_child_exit"] = smaps_anon_huge_kb(parent, addr, end)

    deltas = {
        "populate": VmstatDelta(vm_populate, vm_before),
        "child_writes": VmstatDelta(vm_child_writes, vm_populate),
        "child_exit": VmstatDelta(vm_child_exit, vm_child_writes),
    }
    return SimResult(deltas=deltas, anon_huge_kb=ahp, knobs=copied)


def _real_views(r: scenario.ForkSplitResult) -> dict[str, int]:
    return {
        "parent_after_populate": r.anon_huge_kb_parent_after_populate,
        "parent_after_child_writes": r.anon_huge_kb_parent_after_child_writes,
        "child_after_child_writes": r.anon_huge_kb_child_after_child_writes,
        "parent_after_child_exit": r.anon_huge_kb_parent_after_child_exit,
    }


def _explain(real: scenario.ForkSplitResult, sim: SimResult) -> str:
    names = COMPARED + ALSO_COMPARED
    return json.dumps({
        "real": {"deltas": {s: {c: real.delta(c, s) for c in names if c in real.vmstat_before}
                            for s in scenario.STAGES},
                 "views": _real_views(real), "noise": real.noise_scores,
                 "chosen_run": real.chosen_run, "kernel": real.kernel_release},
        "sim": {"deltas": {s: {c: sim.deltas[s][c] for c in names} for s in scenario.STAGES},
                "views": sim.anon_huge_kb, "knobs": sim.knobs},
    }, indent=1)


@pytest.fixture(scope="module", params=[1, 3], ids=["1-write-per-2m", "3-writes-per-2m"])
def pair(request) -> tuple[scenario.ForkSplitResult, SimResult]:
    """The real run first (so the simulator's own allocations cannot disturb it), then the sim."""
    skip_without_real_thp()
    writes = request.param
    real = scenario.run_fork_split(size_mib=SIZE_MIB, child_writes_per_2m=writes)
    skip_unless_settled(real.settled, real.noise_scores, "run_fork_split")
    sim = run_fork_split_sim(SIZE_MIB, writes, real.knobs)
    return real, sim


@pytest.mark.parametrize("counter", COMPARED)
@pytest.mark.parametrize("stage", scenario.STAGES)
def test_thp_counter_deltas_match(pair, counter: str, stage: str) -> None:
    real, sim = pair
    assert sim.deltas[stage][counter] == real.delta(counter, stage), _explain(real, sim)


@pytest.mark.parametrize("counter", ALSO_COMPARED)
def test_other_thp_events_match(pair, counter: str) -> None:
    real, sim = pair
    if counter not in real.vmstat_before:
        pytest.skip(f"/proc/vmstat has no {counter} on {real.kernel_release}")
    for stage in scenario.STAGES:
        assert sim.deltas[stage][counter] == real.delta(counter, stage), \
            f"{counter} in stage {stage}\n" + _explain(real, sim)


@pytest.mark.parametrize("view", VIEWS)
def test_anon_huge_pages_match(pair, view: str) -> None:
    real, sim = pair
    assert sim.anon_huge_kb[view] == _real_views(real)[view], _explain(real, sim)


def test_scenario_shape(pair) -> None:
    """Both sides ran the scenario they claim: 4 PMDs faulted, the child's PMDs all split."""
    real, sim = pair
    nr_pmds = SIZE_MIB * MiB // HPAGE_PMD_SIZE
    assert real.nr_pmds == nr_pmds
    assert sim.anon_huge_kb["parent_after_populate"] == SIZE_MIB * 1024, _explain(real, sim)
    assert sim.deltas["populate"]["thp_fault_alloc"] == nr_pmds, _explain(real, sim)
    assert sim.deltas["child_writes"]["thp_split_pmd"] == nr_pmds, _explain(real, sim)
    assert sim.anon_huge_kb["child_after_child_writes"] == 0, _explain(real, sim)
