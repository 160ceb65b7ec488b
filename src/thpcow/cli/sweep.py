"""thpcow sweep: a grid of scenario parameters x policies, stored point by point (resumable)."""

from __future__ import annotations

import os

import typer

from .common import bad_input, console, fail, writable_dir


def command(grid: str = typer.Argument(..., help="grid YAML file (scenario x parameter lists x policies)"),
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

    from ..experiments.scenario import ScenarioError
    from ..experiments.sweep import load_grid, run_sweep

    try:
        g = load_grid(grid)
    except ScenarioError as exc:
        bad_input(str(exc))
    if workers is not None and workers < 1:
        bad_input(f"--workers={workers}: must be >= 1")
    out_dir = out or os.path.join("results", g.name)
    try:
        writable_dir(out_dir, "--out")
    except ValueError as exc:
        bad_input(str(exc))
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as prog:
        task = prog.add_task(f"sweep {g.name}", total=len(g.points))

        def advance(done: int, total: int, point) -> None:
            prog.update(task, completed=done, total=total)

        try:
            df = run_sweep(g, out_dir, scheduler=scheduler, workers=workers, progress=advance)
        except RuntimeError as exc:
            fail(str(exc))
    console.print(f"{len(df)} of {len(g.points)} points stored in {out_dir}/points/ "
                  f"(summary plot: {out_dir}/summary.png)")
