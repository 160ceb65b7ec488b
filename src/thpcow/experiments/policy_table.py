"""Every COW policy on three small built-in scenarios: one table of what each costs.

Scenarios (all on a THP-backed region of ``size_mib``, MADV_HUGEPAGE, fully written first):

- ``dense``: after fork the child rewrites the first half of the region page by
  page (the series' "end-to-end copying" case);
- ``sparse``: after fork the child stays alive (a snapshot) while the parent
  makes random 8-byte writes spread over the whole region (Redis-style);
- ``forkserver``: the parent forks short-lived children one after the other;
  each writes a few random pages of the first 4 MiB and exits.

After the writes, khugepaged (default tuning) runs for 30 simulated seconds
with the last child still alive.  Figures per (scenario, policy), all
measured from just before the fork:
vmstat deltas, bytes copied by COW (``sim_cow_bytes``), the extra memory in
use at the peak and at the end, the memory the policy itself holds, and THP
coverage (AnonHugePages / Anonymous) of the parent and of the last child
after the writes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..kernel import MADV_HUGEPAGE, PAGE_SIZE, Kernel
from .policies import parse_policy, policy_help

SCENARIOS = ("dense", "sparse", "forkserver")
SETTLE_S = 30          # simulated seconds after the writes, for khugepaged

# Default parameters of each policy in the table (others use their defaults).
TABLE_POLICIES = (
    "upstream", "thp-cow-v1", "thp-cow-intended", "pre-5.8", "mthp-cow:order=4", "mthp-cow:order=6",
    "collapse-after-fork:who=parent", "collapse-after-fork:who=both", "dontfork", "directed-khugepaged",
    "reservation:pool_mib=16", "cow-density:threshold=64",
)


@dataclass
class Meter:
    """Peak of the memory in use (frames not free), sampled after each step."""

    k: Kernel
    base: int = 0
    peak: int = 0

    def start(self) -> None:
        self.base = self.used()
        self.peak = self.base

    def used(self) -> int:
        return (self.k.mem.nr_frames - self.k.mem.nr_free) * PAGE_SIZE

    def sample(self) -> None:
        self.peak = max(self.peak, self.used())


def _coverage(proc) -> float:
    f = proc.smaps_fields()
    return f["AnonHugePages"] / f["Anonymous"] if f["Anonymous"] else 0.0


def run_scenario(scenario: str, policy: str, size_mib: int = 64, seed: int = 0, check: bool = False) -> dict:
    """Run one scenario under one policy; returns the row of figures."""
    if scenario not in SCENARIOS:
        raise ValueError(f"scenario={scenario!r}: one of {', '.join(SCENARIOS)}")
    if size_mib < 8 or size_mib % 2:
        raise ValueError(f"size_mib={size_mib}: an even number >= 8")
    pol = parse_policy(policy)
    k = Kernel(ram=max(1 << 30, 4 * size_mib << 20), seed=seed, check=check, build=pol.build)
    rng = np.random.default_rng(seed)
    size = size_mib << 20
    parent = k.spawn()
    base = parent.mmap(size)
    parent.madvise(base, size, MADV_HUGEPAGE)
    parent.write(base, size, token=1)
    meter = Meter(k)
    before = k.vmstat_snapshot()
    meter.start()
    children = []
    if scenario == "dense":
        pol.before_fork(k, parent, [(base, size // 2)])
        child = parent.fork()
        children.append(child)
        pages = base + np.arange(size // 2 // PAGE_SIZE, dtype=np.int64) * PAGE_SIZE
        for chunk in np.array_split(pages, 16):
            child.write_many(chunk, 2)
            meter.sample()
        pol.phase_end(k, parent, children)
    elif scenario == "sparse":
        pol.before_fork(k, parent, [(base, size)])
        child = parent.fork()
        children.append(child)
        nwrites = size // PAGE_SIZE // 16
        offs = rng.integers(0, size // 8, size=nwrites, dtype=np.int64) * 8
        for chunk in np.array_split(offs, 16):
            parent.write_many(base + chunk, 3)
            meter.sample()
        pol.phase_end(k, parent, children)
    else:
        need = min(4 << 20, size)
        pol.before_fork(k, parent, [(base, need)])
        for i in range(32):
            child = parent.fork()
            offs = rng.integers(0, need // PAGE_SIZE, size=8, dtype=np.int64) * PAGE_SIZE
            child.write_many(base + offs, 100 + i)
            meter.sample()
            pol.phase_end(k, parent, [child])
            if i < 31:
                child.exit()
        children.append(child)
    cov_parent = _coverage(parent)
    cov_child = _coverage(children[-1]) if children[-1].mm.alive else None
    # Let khugepaged (default tuning) run for SETTLE_S seconds of simulated time.
    k.advance(SETTLE_S * 1_000_000_000)
    meter.sample()
    after = k.vmstat_snapshot()
    d = {name: after[name] - before[name] for name in after}
    row = {
        "scenario": scenario,
        "policy": repr(pol),
        "thp_fault_alloc": d["thp_fault_alloc"],
        "thp_fault_fallback": d["thp_fault_fallback"],
        "thp_split_pmd": d["thp_split_pmd"],
        "thp_collapse_alloc": d["thp_collapse_alloc"],
        "thp_deferred_split_page": d["thp_deferred_split_page"],
        "pgfault": d["pgfault"],
        "cow_mib": round(d["sim_cow_bytes"] / (1 << 20), 2),
        "copied_mib": round((d["sim_cow_bytes"] + d["sim_collapse_bytes"]) / (1 << 20), 2),
        "peak_extra_mib": round((meter.peak - meter.base) / (1 << 20), 2),
        "end_extra_mib": round((meter.used() - meter.base) / (1 << 20), 2),
        "policy_cost_mib": round(pol.cost_bytes(k) / (1 << 20), 2),
        "thp_parent": round(cov_parent, 3),
        "thp_child": round(cov_child, 3) if cov_child is not None else None,
        "thp_parent_30s": round(_coverage(parent), 3),
        "thp_child_30s": round(_coverage(children[-1]), 3) if children[-1].mm.alive else None,
    }
    return row


def run_table(policies=TABLE_POLICIES, scenarios=SCENARIOS, size_mib: int = 64, seed: int = 0,
              progress=None) -> list[dict]:
    rows = []
    for sc in scenarios:
        for pol in policies:
            rows.append(run_scenario(sc, pol, size_mib=size_mib, seed=seed))
            if progress:
                progress(sc, pol)
    return rows


COLUMNS = ("policy", "thp_fault_alloc", "thp_fault_fallback", "thp_split_pmd", "thp_collapse_alloc", "pgfault",
           "cow_mib", "copied_mib", "peak_extra_mib", "end_extra_mib", "policy_cost_mib", "thp_parent", "thp_child",
           "thp_parent_30s", "thp_child_30s")


def to_markdown(rows: list[dict], size_mib: int, seed: int) -> str:
    """The table as Markdown, one section per scenario."""
    out = [
        "# COW policies on three small scenarios",
        "",
        f"Produced by `thpcow policy-table --size-mib {size_mib} --seed {seed}` on the simulated kernel "
        "(Linux 6.18 semantics). Every figure is measured from just before the first fork. "
        "`cow_mib`: bytes copied by COW faults; `copied_mib`: those plus the bytes copied by collapses; `peak_extra_mib`/`end_extra_mib`: memory in use beyond "
        "the pre-fork level; `policy_cost_mib`: memory the policy holds itself (a reservation pool); "
        "`thp_parent`/`thp_child`: AnonHugePages / Anonymous right after the writes (the last child for "
        "the fork server), `*_30s`: the same after 30 simulated seconds of khugepaged at its default "
        "tuning (the counters include that time). See `src/thpcow/experiments/policy_table.py` for the scenarios.",
        "",
        "Policies (`thpcow policies`):",
        "",
    ]
    for name, (kind, text, _) in policy_help().items():
        out.append(f"- `{name}` ({kind}): {text}")
    out.append("")
    for sc in dict.fromkeys(r["scenario"] for r in rows):
        out.append(f"## {sc}")
        out.append("")
        out.append("| " + " | ".join(COLUMNS) + " |")
        out.append("|" + "---|" * len(COLUMNS))
        for r in rows:
            if r["scenario"] == sc:
                out.append("| " + " | ".join("-" if r[c] is None else f"`{r[c]}`" if c == "policy" else str(r[c])
                                             for c in COLUMNS) + " |")
        out.append("")
    return "\n".join(out)
