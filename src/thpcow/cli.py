"""The thpcow command line: one typer app, one verb per capability."""

from __future__ import annotations

import json
import os
import sys

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="A lab for Linux transparent huge pages and copy-on-write after fork().")
console = Console()


@app.command()
def demo(size_mib: int = typer.Option(8, help="size of the THP-backed region (MiB, multiple of 2)"),
         writes_per_2m: int = typer.Option(1, help="pages the child writes in every 2 MiB"),
         seed: int = typer.Option(0, help="simulation seed"),
         as_json: bool = typer.Option(False, "--json", help="print the figures as JSON")) -> None:
    """Run the built-in fork/COW scenario on the simulated kernel and show what changed.

    A process maps SIZE MiB with MADV_HUGEPAGE and writes all of it; it forks;
    the child writes WRITES_PER_2M pages in every 2 MiB; the child exits.
    Prints the /proc/vmstat deltas of each step and the smaps of each process.
    """
    from .scenarios import fork_cow_demo

    if size_mib <= 0 or size_mib % 2:
        raise typer.BadParameter(f"--size-mib={size_mib}: must be a positive multiple of 2")
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
    console.print(f"AnonHugePages (kB): " + ", ".join(f"{k}={v}" for k, v in ah.items()))


@app.command()
def policies() -> None:
    """List the COW policies, one line each."""
    from .kernel.policy import REGISTRY

    for name, cls in sorted(REGISTRY.items()):
        print(f"{name:<20} {cls.help}")


@app.command("policy-table")
def policy_table(size_mib: int = typer.Option(64, help="size of the THP-backed region (MiB)"),
                 seed: int = typer.Option(0, help="simulation seed"),
                 out: str = typer.Option("docs/policies.md", help="where to write the Markdown table"),
                 policy: list[str] = typer.Option(None, "--policy", help="policies to include (default: all)")) -> None:
    """Run every COW policy on the three small built-in scenarios and write one table."""
    from .experiments import policy_table as pt

    pols = tuple(policy) if policy else pt.TABLE_POLICIES
    total = len(pols) * len(pt.SCENARIOS)
    from rich.progress import Progress
    with Progress(console=console, transient=True) as prog:
        task = prog.add_task("scenarios x policies", total=total)
        try:
            rows = pt.run_table(pols, size_mib=size_mib, seed=seed, progress=lambda s, p: prog.advance(task))
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
    text = pt.to_markdown(rows, size_mib, seed)
    with open(out, "w") as fh:
        fh.write(text + "\n")
    for sc in pt.SCENARIOS:
        table = Table(title=f"{sc} ({size_mib} MiB)")
        for c in pt.COLUMNS:
            table.add_column(c, justify="left" if c == "policy" else "right")
        for r in rows:
            if r["scenario"] == sc:
                table.add_row(*["-" if r[c] is None else str(r[c]) for c in pt.COLUMNS])
        console.print(table)
    console.print(f"table written to {out}")


@app.command()
def workloads() -> None:
    """List the workloads and their parameters (name: meaning (range); type, default)."""
    from .workloads import REGISTRY

    for cls in REGISTRY.values():
        print(cls.describe())


def _fail(msg: str) -> None:
    """One line on stderr, exit status 1."""
    print(f"thpcow: {msg}", file=sys.stderr)
    raise typer.Exit(1)


@app.command("compare")
def compare_cmd(scenario: str = typer.Argument(None, help="scenario YAML file (default: the built-in one)"),
                policy: list[str] = typer.Option(None, "--policy", help="policy to run (repeatable; "
                                                 "default: the scenario's list), e.g. cow-density:threshold=32"),
                out: str = typer.Option(None, "--out", help="output directory "
                                        "(default: results/<scenario>-<timestamp>/)"),
                seed: int = typer.Option(None, "--seed", help="override the scenario's seed")) -> None:
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

    from .experiments import report
    from .experiments.runner import run_compare
    from .experiments.scenario import ScenarioError, resolve_scenario

    try:
        sc = resolve_scenario(scenario)
        if policy:
            sc = sc.with_policies(list(policy))
        if seed is not None:
            if seed < 0:
                raise ValueError(f"--seed={seed}: must be >= 0")
            sc = replace(sc, seed=seed)
    except (ScenarioError, ValueError) as exc:
        _fail(str(exc))
    out_dir = out or os.path.join("results", f"{sc.name}-{_time.strftime('%Y%m%d-%H%M%S')}")
    t0 = _time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeElapsedColumn(), console=console, transient=True) as prog:
        tasks = [prog.add_task(p, total=1) for p in sc.policies]

        def advance(i: int, pol: str, t: int, total: int) -> None:
            prog.update(tasks[i], completed=t, total=total)

        res = run_compare(sc, progress=advance)
    elapsed = _time.perf_counter() - t0
    phase = sc.make_workload().measure_phase
    table = Table(title=f"{sc.name}: {sc.workload}, {sc.ram_mib} MiB RAM, seed {sc.seed} "
                        f"(latency: {phase} phase)")
    for _col, head, _spec in report.TABLE:
        table.add_column(head, justify="left" if _col == "policy" else "right")
    for row in report.table_rows(res.summary):
        table.add_row(*row)
    wide = console if console.is_terminal else Console(width=max(console.width, 200))
    wide.print(table)
    paths = report.write_results(res, out_dir)
    console.print(f"results: {paths['report']} (Parquet: summary, ops, samples) in {out_dir}/; "
                  f"simulated in {elapsed:.1f} s", soft_wrap=True)
    console.print(report.verdict(res.summary), markup=False, highlight=False, soft_wrap=True)


@app.command("sweep")
def sweep_cmd(grid: str = typer.Argument(..., help="grid YAML file (scenario x parameter lists x policies)"),
              out: str = typer.Option(None, "--out", help="output directory; rerun with the same one to resume "
                                      "(default: results/<grid name>/)"),
              scheduler: str = typer.Option(None, "--scheduler", help="Dask scheduler address, or 'local' for a "
                                            "Dask LocalCluster (default: local processes)"),
              workers: int = typer.Option(None, "--workers", help="local processes (1: in this process; "
                                          "default: CPU count / 2) or LocalCluster workers (default 2)")) -> None:
    """Run a grid of scenario parameters x policies; every finished point is stored at once (resumable).

    Results: OUT/points/ (one Parquet dataset, one file per point),
    OUT/summary.png, OUT/runlog/<point>.log.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .experiments.scenario import ScenarioError
    from .experiments.sweep import load_grid, run_sweep

    try:
        g = load_grid(grid)
    except ScenarioError as exc:
        _fail(str(exc))
    if workers is not None and workers < 1:
        _fail(f"--workers={workers}: must be >= 1")
    out_dir = out or os.path.join("results", g.name)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as prog:
        task = prog.add_task(f"sweep {g.name}", total=len(g.points))

        def advance(done: int, total: int, point) -> None:
            prog.update(task, completed=done, total=total)

        try:
            df = run_sweep(g, out_dir, scheduler=scheduler, workers=workers, progress=advance)
        except RuntimeError as exc:
            _fail(str(exc))
    console.print(f"{len(df)} of {len(g.points)} points stored in {out_dir}/points/ "
                  f"(summary plot: {out_dir}/summary.png)")


def main() -> None:
    try:
        app()
    except Exception as exc:  # one line, non-zero exit
        from .kernel.errors import KernelError
        if isinstance(exc, KernelError):
            print(f"thpcow: {exc}", file=sys.stderr)
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()
