"""thpcow demo: the built-in fork/COW scenario on the simulated kernel."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from .common import bad_input, console


def command(size_mib: int = typer.Option(8, help="size of the THP-backed region (MiB, multiple of 2)"),
            writes_per_2m: int = typer.Option(1, help="pages the child writes in every 2 MiB"),
            seed: int = typer.Option(0, help="simulation seed"),
            as_json: bool = typer.Option(False, "--json", help="print the figures as JSON")) -> None:
    """Run the built-in fork/COW scenario on the simulated kernel and show what changed.

    A process maps SIZE MiB with MADV_HUGEPAGE and writes all of it; it forks;
    the child writes WRITES_PER_2M pages in every 2 MiB; the child exits.
    Prints the /proc/vmstat deltas of each step and the smaps of each process.
    """
    from ..scenarios import fork_cow_demo

    if size_mib <= 0 or size_mib % 2:
        bad_input(f"--size-mib={size_mib}: must be a positive multiple of 2")
    need = size_mib + size_mib * max(writes_per_2m, 0) // 512
    if need > 768:
        bad_input(f"--size-mib={size_mib} with --writes-per-2m={writes_per_2m}: needs {need} MiB after the "
                  "fork; the demo's machine has 1024 MiB of RAM (768 for the demo)")
    if not 0 <= writes_per_2m <= 512:
        bad_input(f"--writes-per-2m={writes_per_2m}: must be within [0, 512] (the 4 KiB pages of a 2 MiB block)")
    if seed < 0:
        bad_input(f"--seed={seed}: must be >= 0")
    result = fork_cow_demo(size_mib=size_mib, writes_per_2m=writes_per_2m, seed=seed)
    if as_json:
        print(json.dumps({k: v for k, v in result.items() if k != "smaps"}, indent=2))
        return
    table = Table(title=f"simulated Linux 6.18: fork + COW of a {size_mib} MiB THP region (/proc/vmstat deltas)")
    table.add_column("counter")
    steps = list(result["deltas"])
    for step in steps:
        table.add_column(step, justify="right")
    names = sorted({n for d in result["deltas"].values() for n in d})
    for n in names:
        table.add_row(n, *[str(result["deltas"][s].get(n, 0)) for s in steps])
    console.print(table)
    for label, text in result["smaps"].items():
        console.rule(f"smaps of the {label}")
        console.print(text, markup=False, highlight=False)
    ah = result["anon_huge_kb"]
    console.print("AnonHugePages (kB): " + ", ".join(f"{k}={v}" for k, v in ah.items()))
