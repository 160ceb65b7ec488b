"""thpcow compare: each COW policy on one scenario, a table, a verdict and the result files."""

from __future__ import annotations

import os

import typer
from rich.table import Table

from .common import console, fail, wide_console


def command(scenario: str = typer.Argument(None, help="scenario YAML file (default: the built-in one)"),
            policy: list[str] = typer.Option(None, "--policy", help="policy to run (repeatable; "
                                             "default: the scenario's list), e.g. cow-density:threshold=32"),
            out: str = typer.Option(None, "--out", help="output directory "
                                    "(default: results/<scenario>-<timestamp>/)"),
            seed: int = typer.Option(None, "--seed", help="override the scenario's seed"),
            tlb: bool = typer.Option(None, "--tlb/--no-tlb", help="run the accesses through the TLB model "
                                     "(default: the scenario's tlb_model, normally on); off is faster "
                                     "and leaves the TLB columns n/a")) -> None:
    """Run each COW policy on one scenario; print a table and a verdict; write Parquet and an HTML report.

    Columns: COW MiB = (sim_cow_bytes + sim_collapse_bytes), vmstat counters
    from just before the first fork, peak memory in use, modelled write-batch
    latency p50/p99/max in the workload's measured phase, the parent's THP
    coverage (AnonHugePages / Anonymous; mean and at the end), TLB misses
    (page walks in the machine model's TLB simulator; n/a without
    thpcow.machine) and translation time, and the modelled run time.
    """
    import time as _time
    from dataclasses import replace

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from ..experiments import report
    from ..experiments.runner import run_compare
    from ..experiments.scenario import ScenarioError, resolve_scenario

    try:
        sc = resolve_scenario(scenario)
        if policy:
            sc = sc.with_policies(list(policy))
        if seed is not None:
            if seed < 0:
                raise ValueError(f"--seed={seed}: must be >= 0")
            sc = replace(sc, seed=seed)
        if tlb is not None:
            sc = replace(sc, tlb_model=tlb)
    except (ScenarioError, ValueError) as exc:
        fail(str(exc))
    out_dir = out or os.path.join("results", f"{sc.name}-{_time.strftime('%Y%m%d-%H%M%S')}")
    t0 = _time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeElapsedColumn(), console=console, transient=True) as prog:
        tasks = [prog.add_task(p, total=1) for p in sc.policies]

        def advance(i: int, pol: str, t: int, total: int) -> None:
            prog.update(tasks[i], completed=t, total=total)

        res = run_compare(sc, progress=advance)
    elapsed = _time.perf_counter() - t0
    from ..workloads import workload_class
    phase = workload_class(sc.workload).measure_phase
    table = Table(title=f"{sc.name}: {sc.workload}, {sc.ram_mib} MiB RAM, seed {sc.seed} "
                        f"(latency: {phase} phase)")
    for _col, head, _spec in report.TABLE:
        if _col == "policy":
            table.add_column(head, justify="left", no_wrap=True, min_width=12)
        else:
            table.add_column(head, justify="right")
    for row in report.table_rows(res.summary):
        table.add_row(*row)
    wide = wide_console(200)
    wide.print(table)
    paths = report.write_results(res, out_dir)
    console.print(f"results: {paths['report']} (Parquet: summary, ops, samples) in {out_dir}/; "
                  f"simulated in {elapsed:.1f} s", soft_wrap=True)
    console.print(report.verdict(res.summary), markup=False, highlight=False, soft_wrap=True)
