"""thpcow compare: each COW policy on one scenario, a table, a verdict and the result files."""

from __future__ import annotations

import os

import typer

from .common import bad_input, console, err_console, fail, print_fitted, writable_dir


def command(scenario: str = typer.Argument(None, help="scenario YAML file (default: the built-in one)"),
            policy: list[str] = typer.Option(None, "--policy", help="policy to run (repeatable; "
                                             "default: the scenario's list), e.g. cow-density:threshold=32"),
            out: str = typer.Option(None, "--out", help="output directory "
                                    "(default: results/<scenario>-<timestamp>/)"),
            seed: int = typer.Option(None, "--seed", help="override the scenario's seed (>= 0)"),
            tlb: bool = typer.Option(None, "--tlb/--no-tlb", help="run the accesses through the TLB model "
                                     "(default: the scenario's tlb_model, normally on); off is faster "
                                     "and leaves the TLB columns n/a"),
            rank_by: str = typer.Option("p99", "--rank-by", help="order the rows and lead the verdict by: "
                                        "p99 (write-op latency, the default), cow, copied (COW + collapse), "
                                        "peak, thp or cpu (fg + bg)"),
            as_json: bool = typer.Option(False, "--json", help="print the summary rows as JSON instead of tables"),
            as_csv: bool = typer.Option(False, "--csv", help="print the summary rows as CSV instead of tables"),
            profile: str = typer.Option(None, "--profile", help="latency profile written by `thpcow calibrate` "
                                        "(default: the scenario's, else the reference profile)"),
            ) -> None:
    """Run each COW policy on one scenario; print a table and a verdict; write Parquet and an HTML report.

    Columns (from just before the first fork to the end): bytes moved, apart:
    COW copies (COW MiB), copies made by collapses (khugepaged and
    MADV_COLLAPSE: collapse MiB) and pages cleared for faults (zeroed MiB);
    peak memory in use; vmstat counters; the modelled latency of one write op
    (one batch of stores: a request's writes, a range rewritten) in the
    workload's measured phase, p50/p99/p99.9/max; the parent's THP coverage
    (AnonHugePages / Anonymous; mean and at the end); TLB misses (page walks
    in the machine model's TLB simulator) and translation time; the modelled
    time of the workload's ops (fg ms) and of the kernel threads' work between
    them (bg ms: khugepaged's scans and collapses).  The table is split into
    as many tables as the terminal width needs; no cell is cut.
    """
    import time as _time
    from dataclasses import replace

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from ..experiments import report
    from ..experiments.runner import run_compare
    from ..experiments.scenario import ScenarioError, resolve_scenario

    try:
        if rank_by not in report.RANK_BY:
            raise ValueError(f"--rank-by={rank_by}: expected one of {', '.join(report.RANK_BY)}")
        if as_json and as_csv:
            raise ValueError("--json and --csv: give one")
        sc = resolve_scenario(scenario)
        if policy:
            sc = sc.with_policies(list(policy))
        if seed is not None:
            if seed < 0:
                raise ValueError(f"--seed={seed}: must be >= 0")
            sc = replace(sc, seed=seed)
        if tlb is not None:
            sc = replace(sc, tlb_model=tlb)
        if profile is not None:
            from ..lab.calibrate import load_profile
            try:
                load_profile(profile)
            except OSError as exc:
                raise ValueError(f"--profile={profile}: {exc.strerror}") from None
            except ValueError as exc:
                raise ValueError(f"--profile={profile}: {exc}") from None
            sc = replace(sc, profile=profile)
        sc.make_workload().validate()                 # a trace's rows, before any policy runs
        out_dir = out or os.path.join("results", f"{sc.name}-{_time.strftime('%Y%m%d-%H%M%S')}")
        writable_dir(out_dir, "--out")
    except (ScenarioError, ValueError) as exc:
        bad_input(str(exc))
    from ..experiments.costs import latency_model, profile_warning
    model = latency_model(sc.profile)
    warning = profile_warning(model)
    if warning:
        err_console.print(f"[yellow]warning:[/] {warning}", soft_wrap=True, highlight=False)
    t0 = _time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeElapsedColumn(), console=err_console, transient=True) as prog:
        tasks = [prog.add_task(p, total=1) for p in sc.policies]

        def advance(i: int, pol: str, t: int, total: int) -> None:
            prog.update(tasks[i], completed=t, total=total)

        res = run_compare(sc, progress=advance)
    elapsed = _time.perf_counter() - t0
    summary = report.ranked(res.summary, rank_by)
    paths = report.write_results(res, out_dir)
    if as_json or as_csv:
        import json
        if as_json:
            rows = json.loads(summary.to_json(orient="records"))
            print(json.dumps({"scenario": sc.name, "rank_by": rank_by, "report": paths["report"],
                              "profile": {"name": model.profile.name, "path": sc.profile, "cpu": model.profile.cpu},
                              "rows": rows}, indent=2))
        else:
            print(summary.to_csv(index=False), end="")
    else:
        from ..workloads import workload_class
        phase = workload_class(sc.workload).measure_phase
        print_tables(summary, f"{sc.name}: {sc.workload}, {sc.ram_mib} MiB RAM, seed {sc.seed} "
                              f"(latency: one write op of the {phase} phase)")
        console.print(f"latency profile: {model.profile.name} ({sc.profile or 'the reference profile'})",
                      soft_wrap=True, highlight=False)
        console.print(f"results: {paths['report']} (Parquet: summary, ops, samples) in {out_dir}/; "
                      f"simulated in {elapsed:.1f} s", soft_wrap=True)
    recs = summary.to_dict("records")
    if recs and all(r["oom"] for r in recs):
        fail("every policy ran out of memory (VM_FAULT_OOM: a fault could not get a page): "
             f"the workload could not run in {sc.ram_mib} MiB; no verdict")
    if not (as_json or as_csv):
        console.print(report.verdict(summary, rank_by), markup=False, highlight=False, soft_wrap=True)


def print_tables(summary, title: str) -> None:
    """The summary as tables that fit the console's width (every cell whole), then the notes."""
    from ..experiments import report

    print_fitted(title, [h for _c, h, _s in report.TABLE], report.table_rows(summary),
                 [len(g) for g in report.TABLE_GROUPS])
    console.print(report.TABLE_NOTES, markup=False, highlight=False)
