"""The thpcow command line: one typer app, one verb per capability."""

from __future__ import annotations

import json
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
