"""Every COW policy on three small scenarios: one table of what each costs, from the runner's summary rows.

The scenarios are workloads run by :func:`~thpcow.experiments.runner.run_point`
on a THP-backed region of ``size_mib`` (MADV_HUGEPAGE, fully written first),
at the kernel's default sysfs values (khugepaged at its default tuning):

- ``dense``: ``copy-after-fork``: after fork the child rewrites the first half
  of the region page by page, in 16 ranges (the series' end-to-end copying
  case), and lives 30 simulated seconds more;
- ``sparse``: ``redis-bgsave``: a snapshot child reads the region in 16
  batches over 30 simulated seconds while the parent writes random 8-byte
  values all over it (uniform keys, 16 per MiB of the region per 30 s, a
  batch each time the child reads one); the child exits when done;
- ``forkserver``: ``forkserver``: the parent forks 32 short-lived children one
  after the other; each writes 8 random pages of the first 4 MiB and exits.

Every column of the table is a column of the runner's summary row (see
:mod:`thpcow.experiments.runner`): counters from just before the first fork
to the end, khugepaged included.
"""

from __future__ import annotations

import math

from .policies import policy_help
from .runner import run_point
from .scenario import Scenario

SCENARIOS = ("dense", "sparse", "forkserver")
SETTLE_S = 30          # simulated seconds of khugepaged with a child alive (dense, sparse)

# Default parameters of each policy in the table (others use their defaults).
TABLE_POLICIES = (
    "upstream", "thp-cow-v1", "thp-cow-meant", "pre-5.8", "mthp-cow:order=4", "mthp-cow:order=6",
    "collapse-after-fork:who=parent", "collapse-after-fork:who=both", "dontfork", "directed-khugepaged",
    "reservation:pool_mib=16", "cow-density:threshold=64",
)

# Summary columns shown, and the decimals of the float ones.
COLUMNS = ("policy", "sim_cow_pages", "sim_huge_cow", "cow_mib", "collapse_mib", "thp_split_pmd", "thp_fault_alloc",
           "thp_fault_fallback", "thp_collapse_alloc", "pgfault", "peak_extra_mib", "end_extra_mib",
           "policy_cost_mib", "thp_min", "thp_end", "thp_child_min", "thp_child_end", "model_ms")
DECIMALS = {"cow_mib": 2, "collapse_mib": 2, "peak_extra_mib": 2, "end_extra_mib": 2, "policy_cost_mib": 2, "thp_min": 3,
            "thp_end": 3, "thp_child_min": 3, "thp_child_end": 3, "model_ms": 1}


def table_scenario(scenario: str, size_mib: int = 64, seed: int = 0, check: bool = False) -> Scenario:
    """The scenario ``scenario`` (one of :data:`SCENARIOS`) on a region of ``size_mib``."""
    if scenario not in SCENARIOS:
        raise ValueError(f"scenario={scenario!r}: one of {', '.join(SCENARIOS)}")
    if size_mib < 8 or size_mib % 2:
        raise ValueError(f"size_mib={size_mib}: an even number >= 8")
    if scenario == "dense":
        workload, params = "copy-after-fork", dict(
            size_mib=size_mib, copy_mib=size_mib / 2, range_kib=size_mib * 1024 // 32, order="sequential",
            writer="child", hold_ms=SETTLE_S * 1000.0)
    elif scenario == "sparse":
        workload, params = "redis-bgsave", dict(
            dataset_mib=size_mib, value_size=8, key_dist="uniform", writes_per_s=size_mib * 16 / SETTLE_S,
            scan_mib_s=size_mib / SETTLE_S, tail_ms=0.0, batch_ms=SETTLE_S * 1000 / 16)
    else:
        workload, params = "forkserver", dict(
            data_mib=size_mib, children=32, pages_per_child=8, hot_mib=4.0)
    return Scenario(workload=workload, params=params, name=scenario, description=f"policy table: {scenario}",
                    ram_mib=max(1024, 4 * size_mib), seed=seed, check=check, tlb_model=False,
                    policies=list(TABLE_POLICIES))


def table_row(summary: dict) -> dict:
    """The table's row of one runner summary row: the scenario and :data:`COLUMNS`, rounded; NaN is None."""
    row = {"scenario": summary["scenario"]}
    for c in COLUMNS:
        val = summary[c]
        if isinstance(val, float):
            val = None if math.isnan(val) else round(val, DECIMALS.get(c, 2))
        row[c] = val
    return row


def run_scenario(scenario: str, policy: str, size_mib: int = 64, seed: int = 0, check: bool = False) -> dict:
    """Run one scenario under one policy; returns the table's row."""
    return table_row(run_point(table_scenario(scenario, size_mib, seed, check), policy).summary)


def run_table(policies=TABLE_POLICIES, scenarios=SCENARIOS, size_mib: int = 64, seed: int = 0,
              progress=None) -> list[dict]:
    rows = []
    for sc in scenarios:
        for pol in policies:
            rows.append(run_scenario(sc, pol, size_mib=size_mib, seed=seed))
            if progress:
                progress(sc, pol)
    return rows


def to_markdown(rows: list[dict], size_mib: int, seed: int) -> str:
    """The table as Markdown, one section per scenario."""
    out = [
        "# COW policies on three small scenarios",
        "",
        f"Produced by `thpcow policy-table --size-mib {size_mib} --seed {seed}` on the simulated kernel "
        "(Linux 6.18 semantics), with the runner of `thpcow compare`; every column is a column of its "
        "summary row (`src/thpcow/experiments/runner.py`). Counters are measured from just before the first "
        "fork to the end of the run, khugepaged (default tuning) included. "
        "`sim_cow_pages`: pages copied by COW faults that did not copy a whole 2 MiB (one by one, or in "
        "mTHP blocks); `sim_huge_cow`: whole 2 MiB COW copies; `cow_mib`: bytes copied by COW faults; "
        "`collapse_mib`: bytes copied by collapses (khugepaged, MADV_COLLAPSE); "
        "`peak_extra_mib`/`end_extra_mib`: memory in use beyond the pre-fork level, at the peak and at the "
        "end (after the children exit); `policy_cost_mib`: memory the policy holds itself (a reservation "
        "pool); `thp_min`/`thp_end`: the parent's AnonHugePages / Anonymous, lowest and at the end, over "
        "samples taken 200 times per run; `thp_child_min`/`thp_child_end`: the same for the live children "
        "together, lowest and in the last sample that saw one; `model_ms`: the modelled time of all the "
        "ops (the latency model of `thpcow compare`).",
        "",
        "Scenarios (`src/thpcow/experiments/policy_table.py`; `thpcow workloads` explains the parameters):",
        "",
    ]
    for sc in dict.fromkeys(r["scenario"] for r in rows):
        s = table_scenario(sc, size_mib, seed)
        params = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in s.params.items())
        out.append(f"- `{sc}`: `{s.workload}` ({params}), {s.ram_mib} MiB RAM")
    out += ["", "Policies (`thpcow policies`):", ""]
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
