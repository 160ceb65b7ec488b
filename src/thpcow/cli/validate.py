"""thpcow validate: the latency model's predictions against times measured on the running kernel."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

from .common import bad_input, busy_warning, console, fail, human_ns, lab_progress, wide_console


def command(profile: str = typer.Option(None, "--profile", help="profile file from `thpcow calibrate` "
                                        "(default: the built-in reference profile, calibration.md)"),
            quick: bool = typer.Option(False, "--quick", help="smaller regions, fewer repeats"),
            scenario: list[str] = typer.Option(None, "--scenario", help="run only this scenario (repeatable): "
                                               "first_touch_4k, first_touch_thp, fork_thp, fork_4k, cow_storm, "
                                               "rewrite_thp, rewrite_4k, random_thp, random_split"),
            as_json: bool = typer.Option(False, "--json", help="print the rows as JSON")) -> None:
    """Compare the latency model's predicted times with times measured on the running kernel.

    Each micro-scenario runs on the running kernel (median of repeats) and on the
    simulated kernel with the same calls; the simulator's vmstat deltas are priced
    with the profile (cost_vmstat_delta; random reads: the TLB simulator over the
    simulated page sizes plus a per-access memory cost).  A ratio predicted/measured
    within 0.75-1.33 is in band.  A real run whose counters show another path than the
    simulator's is refused (exit status 1).  Never writes sysfs.
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from ..lab import calibrate as cal
    from ..lab import validate as val
    from ..lab.procfs import LabError

    try:
        prof, lab = cal.load_profile(profile)
    except ValueError as exc:
        bad_input(str(exc))
    cfg = val.ValidationConfig.quick_config() if quick else val.ValidationConfig()
    with Progress(TextColumn("{task.description:<60}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=Console(stderr=True), transient=True, auto_refresh=False) as prog:
        task = prog.add_task("validating", total=1)
        try:
            res = val.validate(cfg, prof, lab, progress=lab_progress(prog, task),
                               only=tuple(scenario) if scenario else None)
        except (LabError, OSError, ValueError) as exc:
            fail(str(exc))
    if as_json:
        print(json.dumps(res.to_dict(), indent=2, default=str))
        return
    lo, hi = val.BAND
    table = Table(title=f"model vs Linux {res.metadata.get('kernel')}: profile {prof.name} "
                        f"(band {lo}-{hi}, median of {cfg.repeats} runs)")
    for col, just in (("scenario", "left"), ("measured", "right"), ("predicted", "right"),
                      ("pred/meas", "right"), ("in band", "center")):
        table.add_column(col, justify=just)
    for r in res.rows:
        table.add_row(r.label, human_ns(r.measured_ns), human_ns(r.predicted_ns), f"{r.ratio:.2f}",
                      "yes" if r.in_band else "[bold red]no[/]")
    wide_console(160).print(table)
    n_in = sum(r.in_band for r in res.rows)
    console.print(f"{n_in} of {len(res.rows)} scenarios in band ({res.elapsed_s:.1f} s); see docs/validation.md "
                  "for the misses", soft_wrap=True)
    busy_warning(res.metadata)
