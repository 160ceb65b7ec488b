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
                                        "peak, thp, cpu (fg + bg) or tput (ops/s; with a scenario loop)"),
            as_json: bool = typer.Option(False, "--json", help="print the summary rows as JSON instead of tables"),
            as_csv: bool = typer.Option(False, "--csv", help="print the summary rows as CSV instead of tables"),
            profile: str = typer.Option(None, "--profile", help="latency profile written by `thpcow calibrate` "
                                        "(default: the scenario's, else the reference profile)"),
            on: str = typer.Option("sim", "--on", help="where to run: sim (the default), or sim,real to "
                                   "also replay the workload on this machine's kernel with real processes "
                                   "and print both side by side (root; never writes sysfs)"),
            real_paced: bool = typer.Option(False, "--real-paced", help="with --on sim,real: each real op "
                                            "waits for its time in the stream, so the real run lasts as "
                                            "long as the stream (khugepaged gets its time); default: as "
                                            "fast as the ops go"),
            ) -> None:
    """Run each COW policy on one scenario; print a table and a verdict; write Parquet and an HTML report.

    With --on sim,real each policy that this kernel can run (upstream and the
    userspace strategies) also runs for real: one table per policy with the
    simulator's figure, the real one and their ratio, and one line for every
    difference between counters both sides count (see docs/validation.md).

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
        sides = parse_on(on)
        if "real" in sides and as_csv:
            raise ValueError("--csv with --on sim,real: use --json for both sides")
        if real_paced and "real" not in sides:
            raise ValueError("--real-paced: needs --on sim,real")
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
    if "real" in sides:
        from ..lab import procfs
        ok, reason = procfs.thp_available()
        if not ok:
            fail(f"--on real: THP is not available on this kernel: {reason}")
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
    real = run_real_side(sc, res, real_paced) if "real" in sides else None
    if as_json or as_csv:
        import json
        if as_json:
            rows = json.loads(summary.to_json(orient="records"))
            doc = {"scenario": sc.name, "rank_by": rank_by, "report": paths["report"],
                   "profile": {"name": model.profile.name, "path": sc.profile, "cpu": model.profile.cpu},
                   "rows": rows}
            if real is not None:
                doc["real"] = real_json(sc, real)
            print(json.dumps(doc, indent=2))
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
        if real is not None:
            print_real(sc, real)


SIDES = ("sim", "real")


def parse_on(on: str) -> tuple[str, ...]:
    """``--on``: a comma-separated subset of sim, real that includes sim; ValueError naming it."""
    sides = tuple(dict.fromkeys(p.strip() for p in str(on).split(",")))
    bad = [p for p in sides if p not in SIDES]
    if bad or not sides:
        raise ValueError(f"--on={on}: expected sim or sim,real (comma-separated: {', '.join(SIDES)})")
    if "sim" not in sides:
        raise ValueError(f"--on={on}: the real run is shown beside the simulator's: use --on sim,real")
    return sides


def run_real_side(sc, res, paced: bool = False) -> list[tuple[str, dict, object, str]]:
    """Each policy on the running kernel: (policy, sim figures, RealResult or None, why not)."""
    import time as _time

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from ..lab.realrun import RealRunError, real_support, run_real, sim_extras

    out = []
    recs = res.summary.to_dict("records")
    todo = [r["policy"] for r in recs if not real_support(r["policy"])]
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeElapsedColumn(), console=err_console, transient=True, auto_refresh=False) as prog:
        tasks = {p: prog.add_task(f"real: {p}", total=1) for p in todo}
        for rec in recs:
            pol = rec["policy"]
            sim = sim_extras(rec, res.ops[res.ops["policy"] == pol], res.samples[res.samples["policy"] == pol])
            sim["sim_wall_s"] = res.wall_s.get(pol)
            why = real_support(pol)
            if why:
                out.append((pol, sim, None, why))
                continue
            last = [0.0]

            def cb(t: int, total: int, pol=pol) -> None:
                now = _time.monotonic()
                if now - last[0] > 0.2:
                    last[0] = now
                    prog.update(tasks[pol], completed=t, total=total)
                    prog.refresh()

            def waiting(pol=pol) -> None:
                prog.update(tasks[pol], description=f"real: {pol} (waiting for another real-kernel run)")
                prog.refresh()
            try:
                out.append((pol, sim, run_real(sc, pol, cb, on_wait=waiting, paced=paced), ""))
            except RealRunError as exc:
                fail(f"--on real: policy {pol}: {exc}")
    return out


def real_json(sc, real) -> list[dict]:
    """The real side for --json: per policy both sides' figures, the notes and how they were made."""
    import math

    from ..lab.realrun import explain, knob_differences

    def plain(d: dict) -> dict:
        """JSON values: numpy scalars as Python ones, NaN as null."""
        out = {}
        for k, v in d.items():
            v = v.item() if hasattr(v, "item") else v
            if isinstance(v, (int, float, str, bool)) or v is None:
                out[k] = None if isinstance(v, float) and math.isnan(v) else v
        return out

    out = []
    for pol, sim, rr, why in real:
        rec = {"policy": pol, "sim": plain(sim)}
        if rr is None:
            rec.update(status=why)
        else:
            rec.update(status="ran", real=plain(rr.summary), notes=explain(sim, rr, sc), source=rr.source,
                       runs=rr.runs, settled=rr.settled, thp_scores=[s[0] for s in rr.scores],
                       knob_differences=knob_differences(sc),
                       anon_huge_samples=rr.samples, agent_pids=rr.agent_pids, paced=rr.paced)
        out.append(rec)
    return out


def print_real(sc, real) -> None:
    """One table per policy: sim, real, model/real; then the differences explained (lines wrapped
    to the console's width)."""
    import os as _os
    import textwrap

    from ..lab.realrun import explain, fmt_figure, knob_differences, side_by_side

    def say(text: str, indent: str = "") -> None:
        width = max(console.width, 40)
        console.print(textwrap.fill(text, width=width, initial_indent=indent, subsequent_indent=indent + "  "),
                      markup=False, highlight=False, soft_wrap=True)

    console.print()
    paced = any(rr is not None and rr.paced for _p, _s, rr, _w in real)
    pace = ("each op at its time in the stream (--real-paced)" if paced
            else "as fast as they go (not paced by the ops' times)")
    say(f"{sc.name} on this kernel ({_os.uname().release}) beside the simulator: the same op stream "
        f"replayed by real processes, {pace}")
    knobs = knob_differences(sc)
    for pol, sim, rr, why in real:
        if rr is None:
            continue
        print_fitted(f"{pol}", ["figure", "sim", "real", "model/real"], side_by_side(sim, rr, why))
        say(f"counters: {rr.source}, from the fork on; {rr.runs} run(s), "
            f"{'the quietest kept' if rr.settled else 'NOISY: no two runs equally quiet'}; pgfault: "
            "the agents' own faults during their ops (getrusage); COW: pagemap PFNs that changed")
        for n in [*explain(sim, rr, sc), *rr.notes]:
            say(n, "  ")
    lacking = [(pol, sim, why) for pol, sim, rr, why in real if rr is None]
    if lacking:
        print_fitted("policies this kernel cannot run (the simulator's figures)",
                     ["policy", "COW MiB", "thp_split_pmd", "p99 µs", "real"],
                     [[pol, fmt_figure(sim.get("cow_mib")), fmt_figure(sim.get("thp_split_pmd")),
                       fmt_figure(sim.get("lat_p99_us")), why] for pol, sim, why in lacking])
    if knobs:
        say("THP settings differ (sysfs is never written): " + "; ".join(knobs))


def print_tables(summary, title: str) -> None:
    """The summary as tables that fit the console's width (every cell whole), then the notes."""
    from ..experiments import report

    print_fitted(title, [h for _c, h, _s in report.TABLE], report.table_rows(summary),
                 [len(g) for g in report.TABLE_GROUPS])
    console.print(report.TABLE_NOTES, markup=False, highlight=False)
