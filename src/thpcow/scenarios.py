"""The demo: the ``fork-touch`` workload run by the experiment runner, shown step by step."""

from __future__ import annotations

from .experiments.runner import run_point
from .experiments.scenario import Scenario

# The demo's steps: workload phase -> label.  The fork is a phase of its own, left out as before.
STEPS = {"load": "populate", "write": "child writes", "exit": "child exit"}
WHO = {0: "parent", 1: "child"}


def fork_cow_demo(size_mib: int = 8, writes_per_2m: int = 1, seed: int = 0, ram: int = 1 << 30) -> dict:
    """mmap + MADV_HUGEPAGE + populate, fork, the child writes, the child exits.

    Returns the vmstat deltas of each step, the AnonHugePages of each process
    after each step, and the smaps text of both processes while the child lives.
    """
    sc = Scenario(workload="fork-touch", params={"size_mib": size_mib, "pages_per_2m": writes_per_2m},
                  name="demo", ram_mib=ram >> 20, seed=seed, tlb_model=False)
    res = run_point(sc, "upstream", smaps=True)
    if res.summary["oom"]:
        raise MemoryError(f"fork_cow_demo: {size_mib} MiB with {writes_per_2m} writes per 2 MiB ran out of "
                          f"the machine's {ram >> 20} MiB")
    phases = res.phases
    deltas = {label: phases[phase]["vmstat"] for phase, label in STEPS.items()}
    anon_huge = {f"{WHO[pid]} after {label}": kb
                 for phase, label in STEPS.items() for pid, kb in phases[phase]["anon_huge_kb"].items()}
    smaps = {WHO[pid]: text for pid, text in phases["write"]["smaps"].items()}
    return {"deltas": deltas, "anon_huge_kb": anon_huge, "smaps": smaps}
