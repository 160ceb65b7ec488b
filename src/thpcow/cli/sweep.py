"""thpcow sweep: a grid of scenario parameters x policies, stored point by point (resumable)."""

from __future__ import annotations

import os

import typer

from .common import bad_input, console, err_console, fail, writable_dir


def command(grid: str = typer.Argument(..., help="grid YAML file (scenario x parameter lists x policies)"),
            out: str = typer.Option(None, "--out", help="output directory; rerun with the same one to resume "
                                    "(default: results/<grid name>/)"),
            scheduler: str = typer.Option(None, "--scheduler", help="Dask scheduler address, or 'local' for a "
                                          "Dask LocalCluster (default: local processes)"),
            workers: int = typer.Option(None, "--workers", help="local processes (1: in this process; "
                                        "default: CPU count / 2) or LocalCluster workers (default 2)"),
            profile: str = typer.Option(None, "--profile", help="latency profile written by `thpcow calibrate` "
                                        "for every point (default: each scenario's, else the reference)"),
            dry_run: bool = typer.Option(False, "--dry-run", help="list the points (and which are stored "
                                         "already) and stop")) -> None:
    """Run a grid of scenario parameters x policies; every finished point is stored at once (resumable).

    Results: OUT/points/ (one Parquet dataset, one file per point),
    OUT/summary.png, OUT/runlog/<point>.log.
    """
    from rich.progress import (
        BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
    )

    from ..experiments.scenario import ScenarioError
    from ..experiments.sweep import load_grid, run_sweep, stored_ids, with_profile

    err_console.print(f"reading grid {grid} ...", highlight=False)
    try:
        g = load_grid(grid)
        if profile is not None:
            from ..lab.calibrate import load_profile
            try:
                load_profile(profile)
            except (OSError, ValueError) as exc:
                raise ScenarioError(grid, None, "--profile", f"{profile}: {exc}") from None
            g = with_profile(g, profile)
    except ScenarioError as exc:
        bad_input(str(exc))
    if workers is not None and workers < 1:
        bad_input(f"--workers={workers}: must be >= 1")
    out_dir = out or os.path.join("results", g.name)
    try:
        writable_dir(out_dir, "--out")
    except ValueError as exc:
        bad_input(str(exc))
    stored = stored_ids(out_dir) if os.path.isdir(os.path.join(out_dir, "points")) else set()
    todo = [p for p in g.points if p.id not in stored]
    pols = sorted({p.policy for p in g.points})
    err_console.print(f"grid {g.name}: {len(g.points)} points ({len(g.points) // max(len(pols), 1)} "
                      f"combinations of {', '.join(g.axes) or 'no axis'} x {len(pols)} policies); "
                      f"{len(g.points) - len(todo)} stored already, {len(todo)} to run", highlight=False)
    if dry_run:
        for p in g.points:
            state = "stored" if p.id in stored else "to run"
            console.print(f"{p.id}  {state:6}  {p.policy}  {p.values}", highlight=False, soft_wrap=True)
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("ETA"), TimeRemainingColumn(), console=err_console, transient=True) as prog:
        task = prog.add_task(f"sweep {g.name}", total=len(g.points))

        def advance(done: int, total: int, point) -> None:
            prog.update(task, completed=done, total=total)

        try:
            df = run_sweep(g, out_dir, scheduler=scheduler, workers=workers, progress=advance)
        except RuntimeError as exc:
            fail(str(exc))
    console.print(f"{len(df)} of {len(g.points)} points stored in {out_dir}/points/ "
                  f"(summary plot: {out_dir}/summary.png)")
    if len(df):
        from .compare import print_tables
        from ..experiments import report
        axes = [a for a in g.axes if a in df.columns]
        shown = df.copy()
        if axes:
            shown["policy"] = shown["policy"] + " @ " + shown[axes].astype(str).agg(", ".join, axis=1)
        for col, _h, _s in report.TABLE:
            if col not in shown.columns:
                shown[col] = float("nan")
        print_tables(shown, f"sweep {g.name}: one row per point")
