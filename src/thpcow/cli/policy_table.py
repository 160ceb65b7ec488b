"""thpcow policy-table: every COW policy on the small built-in scenarios, as one Markdown table."""

from __future__ import annotations

import typer

from .common import bad_input, console, print_fitted


def command(size_mib: int = typer.Option(64, help="size of the THP-backed region (MiB)"),
            seed: int = typer.Option(0, help="simulation seed"),
            out: str = typer.Option("docs/policies.md", help="where to write the Markdown table"),
            policy: list[str] = typer.Option(None, "--policy", help="policies to include (default: all)")) -> None:
    """Run every COW policy on the three small built-in scenarios and write one table."""
    from ..experiments import policy_table as pt

    pols = tuple(policy) if policy else pt.TABLE_POLICIES
    total = len(pols) * len(pt.SCENARIOS)
    from rich.progress import Progress
    with Progress(console=console, transient=True) as prog:
        task = prog.add_task("scenarios x policies", total=total)
        try:
            rows = pt.run_table(pols, size_mib=size_mib, seed=seed, progress=lambda s, p: prog.advance(task))
        except ValueError as exc:
            bad_input(str(exc))
    text = pt.to_markdown(rows, size_mib, seed)
    with open(out, "w") as fh:
        fh.write(text + "\n")
    for sc in pt.SCENARIOS:
        print_fitted(f"{sc} ({size_mib} MiB)", list(pt.COLUMNS),
                     [["-" if r[c] is None else str(r[c]) for c in pt.COLUMNS] for r in rows if r["scenario"] == sc])
    console.print(f"table written to {out}")
