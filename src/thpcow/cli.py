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
    console.print("AnonHugePages (kB): " + ", ".join(f"{k}={v}" for k, v in ah.items()))


@app.command()
def policies() -> None:
    """List the COW policies, one line each."""
    from .experiments.policies import policy_help

    for name, (kind, text, params) in sorted(policy_help().items()):
        print(f"{name:<20} {kind:<9} {text}")


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


def _wide_console(width: int) -> Console:
    """The console on a terminal; otherwise one at least ``width`` columns wide, so that tables
    written to a file or a pipe are not squeezed."""
    return console if console.is_terminal else Console(width=max(console.width, width))


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
        if tlb is not None:
            sc = replace(sc, tlb_model=tlb)
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
    from .workloads import workload_class
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
    wide = _wide_console(200)
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


def _human_ns(ns: float | None) -> str:
    """A duration in ns as text with a unit (ns, us, ms, s)."""
    if ns is None or ns != ns:
        return "-"
    a = abs(ns)
    if a < 1e3:
        return f"{ns:.1f} ns"
    if a < 1e6:
        return f"{ns / 1e3:,.2f} us"
    if a < 1e9:
        return f"{ns / 1e6:,.2f} ms"
    return f"{ns / 1e9:,.2f} s"


def _lab_progress(prog, task):
    """A progress callback for thpcow.lab: the step's label and the bar, refreshed by hand.

    NOTE: the Progress runs with auto_refresh=False so that no refresh thread
    competes with the measurements for the CPU (or the GIL).
    """
    def cb(label: str, done: int, total: int) -> None:
        prog.update(task, description=label, completed=done, total=total)
        prog.refresh()
    return cb


def _busy_warning(meta: dict) -> None:
    """Warn when other tasks kept the CPUs busy during a lab run (the figures are then inflated)."""
    from .lab.calibrate import BUSY_WARNING

    busy = meta.get("other_cpu_busy")
    if isinstance(busy, float) and busy > BUSY_WARNING:
        console.print(f"[yellow]warning:[/] other tasks kept {busy:.0%} of the CPUs busy during the run; "
                      "the timings may be inflated (rerun on a quieter machine)", soft_wrap=True)


@app.command("calibrate")
def calibrate_cmd(out: str = typer.Option(None, "--out", help="profile file to write (TOML; default "
                                          "results/calibration-<kernel>-<timestamp>.toml)"),
                  quick: bool = typer.Option(False, "--quick", help="smaller regions, fewer repeats: under a minute"),
                  cold: bool = typer.Option(False, "--cold", help="sleep 3.5 s before every allocating step instead "
                                            "of pre-touching scratch memory (calibration.md 'cold'; slow)"),
                  as_json: bool = typer.Option(False, "--json", help="print the profile, figures and metadata as JSON")) -> None:
    """Measure the latency model's costs on the running kernel and write a CalibrationProfile (TOML).

    Measures mmap/munmap/madvise, fork() and exit per GiB (THP- and 4 KiB-backed),
    4 KiB write faults, zero-page and huge-zero-page read faults, THP write faults,
    COW (1st write into a shared THP = PMD split + 4 KiB copy; later 4 KiB COWs),
    reuse faults after the child exits (4 KiB and PMD), MADV_COLLAPSE of a PTE-mapped
    2 MiB, memcpy of 4 KiB / 2 MiB, memset, and random 8 B reads over THP- and 4 KiB-backed
    buffers.  Batches of faults are timed and divided; each figure is the median of
    repeats.  Every run's /proc/vmstat deltas and smaps are checked: a figure whose
    counters show another kernel path is refused (exit status 1, no profile).
    Never writes sysfs.  The profile loads with CalibrationProfile.load(); a commented
    [lab] section keeps the metadata (kernel, THP knobs, CPU, governor, date, warm).
    """
    import time as _time

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .lab import calibrate as cal
    from .lab.procfs import LabError

    cfg = cal.CalibrationConfig.quick_config(warm=not cold) if quick else cal.CalibrationConfig(warm=not cold)
    with Progress(TextColumn("{task.description:<52}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=Console(stderr=True), transient=True, auto_refresh=False) as prog:
        task = prog.add_task("calibrating", total=1)
        try:
            res = cal.calibrate(cfg, progress=_lab_progress(prog, task))
        except (LabError, OSError, ValueError) as exc:
            _fail(str(exc))
    kernel = res.lab["metadata"].get("kernel", "unknown")
    path = out or os.path.join("results", f"calibration-{kernel}-{_time.strftime('%Y%m%d-%H%M%S')}.toml")
    try:
        cal.write_profile(res.profile, path, res.lab)
    except (OSError, ValueError) as exc:
        _fail(f"{path}: cannot write the profile: {exc}")
    rows = list(cal.profile_rows(res))
    if as_json:
        print(json.dumps({"profile": res.profile.to_dict(), "path": str(path), "rows": rows, "lab": res.lab,
                          "elapsed_s": round(res.elapsed_s, 1)}, indent=2, default=str))
        return
    meta = res.lab["metadata"]
    table = Table(title=f"calibration on Linux {kernel}, {meta.get('cpu_model')} x{meta.get('nr_cpus')}, "
                        f"{'warm' if cfg.warm else 'cold'}{', quick' if quick else ''} (median of {cfg.repeats} runs)")
    for col, just in (("figure", "left"), ("profile field", "left"), ("per", "left"), ("measured", "right"),
                      ("min - max", "right"), ("reference", "right"), ("meas/ref", "right")):
        table.add_column(col, justify=just)
    for r in rows:
        ref = r["reference_ns"]
        table.add_row(r["figure"], r["field"] or "(lab extra)", r["per"], _human_ns(r["median_ns"]),
                      f"{_human_ns(r['min_ns'])} - {_human_ns(r['max_ns'])}", _human_ns(ref),
                      f"{r['median_ns'] / ref:.2f}" if ref else "-")
    out_console = _wide_console(160)
    out_console.print(table)
    rr = res.lab["random_reads"]
    t2 = Table(title=f"random 8 B reads (numpy take, {rr['accesses']:,} per run), ns per access")
    for col in ("buffer", "4 KiB", "THP", "model: memory", "model: per walk ref"):
        t2.add_column(col, justify="right")
    model = rr.get("model", {})
    for size in sorted({p["size_mib"] for p in rr["points"].values()}):
        p4, ph = rr["points"].get(f"4k-{size}", {}), rr["points"].get(f"thp-{size}", {})
        t2.add_row(f"{size} MiB", f"{p4.get('ns', float('nan')):.1f}", f"{ph.get('ns', float('nan')):.1f}",
                   f"{float(model.get('base_ns', {}).get(str(size), float('nan'))):.1f}",
                   f"{float(model.get('walk_ref_ns', {}).get(str(size), float('nan'))):.2f}")
    out_console.print(t2)
    console.print(f"profile written to {path} ({res.elapsed_s:.1f} s; not measured, kept at the reference: "
                  f"{', '.join(res.lab['not_measured'])})", soft_wrap=True)
    _busy_warning(meta)


@app.command("validate")
def validate_cmd(profile: str = typer.Option(None, "--profile", help="profile file from `thpcow calibrate` "
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

    from .lab import calibrate as cal
    from .lab import validate as val
    from .lab.procfs import LabError

    try:
        prof, lab = cal.load_profile(profile)
    except ValueError as exc:
        _fail(str(exc))
    cfg = val.ValidationConfig.quick_config() if quick else val.ValidationConfig()
    with Progress(TextColumn("{task.description:<60}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=Console(stderr=True), transient=True, auto_refresh=False) as prog:
        task = prog.add_task("validating", total=1)
        try:
            res = val.validate(cfg, prof, lab, progress=_lab_progress(prog, task),
                               only=tuple(scenario) if scenario else None)
        except (LabError, OSError, ValueError) as exc:
            _fail(str(exc))
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
        table.add_row(r.label, _human_ns(r.measured_ns), _human_ns(r.predicted_ns), f"{r.ratio:.2f}",
                      "yes" if r.in_band else "[bold red]no[/]")
    _wide_console(160).print(table)
    n_in = sum(r.in_band for r in res.rows)
    console.print(f"{n_in} of {len(res.rows)} scenarios in band ({res.elapsed_s:.1f} s); see docs/validation.md "
                  "for the misses", soft_wrap=True)
    _busy_warning(res.metadata)


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
