"""Small built-in scenarios on the simulated kernel (the demo until the experiment runner exists)."""

from __future__ import annotations

from .kernel import HPAGE_PMD_SIZE, MADV_HUGEPAGE, PAGE_SIZE, Kernel
from .kernel.vmstat import delta


def fork_cow_demo(size_mib: int = 8, writes_per_2m: int = 1, seed: int = 0, ram: int = 1 << 30) -> dict:
    """mmap + MADV_HUGEPAGE + populate, fork, the child writes, the child exits.

    Returns the vmstat deltas of each step, the AnonHugePages of each process
    along the way, and the smaps text of both processes while the child lives.
    """
    k = Kernel(ram=ram, seed=seed)
    parent = k.spawn()
    size = size_mib << 20
    base = parent.mmap(size)
    parent.madvise(base, size, MADV_HUGEPAGE)
    deltas = {}
    anon_huge = {}
    before = k.vmstat_snapshot()
    parent.write(base, size, token=1)
    after = k.vmstat_snapshot()
    deltas["populate"] = delta(after, before)
    anon_huge["parent after populate"] = parent.smaps_fields(base)["AnonHugePages"]
    child = parent.fork()
    before = k.vmstat_snapshot()
    for block in range(size // HPAGE_PMD_SIZE):
        for i in range(writes_per_2m):
            child.write(base + block * HPAGE_PMD_SIZE + (1 + i) * PAGE_SIZE, 1, token=2)
    after = k.vmstat_snapshot()
    deltas["child writes"] = delta(after, before)
    anon_huge["parent after child writes"] = parent.smaps_fields(base)["AnonHugePages"]
    anon_huge["child after child writes"] = child.smaps_fields(base)["AnonHugePages"]
    smaps = {"parent": parent.smaps(), "child": child.smaps()}
    before = k.vmstat_snapshot()
    child.exit()
    after = k.vmstat_snapshot()
    deltas["child exit"] = delta(after, before)
    anon_huge["parent after child exit"] = parent.smaps_fields(base)["AnonHugePages"]
    return {"deltas": deltas, "anon_huge_kb": anon_huge, "smaps": smaps}
