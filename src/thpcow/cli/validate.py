"""thpcow validate: the latency model's predictions against times measured on the running kernel."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from .common import bad_input, busy_warning, console, fail, human_ns, print_fitted, run_lab


def command(profile: str = typer.Option(None, "--profile", help="profile file from `thpcow calibrate`, or a "
                                        "cost preset (`thpcow calibrate --list-presets`); default: this "
                                        "machine's cached profile, else this CPU's preset, else the reference"),
            quick: bool = typer.Option(False, "--quick", help="smaller regions, fewer repeats"),
            refit: bool = typer.Option(False, "--calibrate", help="calibrate this machine first (as `thpcow "
                                       "calibrate`, --quick with --quick), cache the profile, validate with it"),
            scenario: list[str] = typer.Option(None, "--scenario", help="run only this scenario (repeatable): "
                                               "first_touch_4k, first_touch_thp, fork_thp, fork_4k, cow_storm, "
                                               "rewrite_thp, rewrite_4k, random_thp, random_split"),
            as_json: bool = typer.Option(False, "--json", help="print the rows as JSON"),
            programs: int = typer.Option(None, "--programs", help="instead: run N seeded random programs of "
                                         "mmap/madvise/mprotect/munmap/stores on the simulator and on the "
                                         "running kernel and compare them (a differential test)"),
            seed: int = typer.Option(None, "--seed", help="with --programs: the random programs' seed (default 0)"),
            steps: int = typer.Option(None, "--steps", help="with --programs: steps per program (default 16)"),
            program_set: str = typer.Option(None, "--set", help="with --programs: 'wide' (default: also loads, "
                                            "MADV_FREE/COLD/PAGEOUT/WILLNEED/WIPEONFORK/GUARD_*, process_madvise, "
                                            "PR_SET_THP_DISABLE; compares Referenced and pagemap counts too) or "
                                            "'basic' (the first set)")) -> None:
    """Compare the latency model's predicted times with times measured on the running kernel
    (--programs N: random VMA programs, simulator vs kernel).

    With --programs N: a differential test of the VMA-level calls instead.  N seeded random
    programs run on the simulator (with the running kernel's THP knobs) and on the running
    kernel; return values and VMAs (perms, VmFlags, AnonHugePages, Rss) are compared after
    every step (--set wide, the default: also smaps Referenced and the pagemap counts of present,
    exclusive, swapped and guard pages).  A mismatch is rerun: if the kernel's second run differs from its first, or
    system-wide THP counters moved other than the simulator's (khugepaged), it is noise;
    otherwise a difference, shrunk to a minimal program and printed (exit status 1).

    Each micro-scenario runs on the running kernel (median of repeats) and on the
    simulated kernel with the same calls; the simulator's vmstat deltas are priced
    with the profile (cost_vmstat_delta; random reads: the TLB simulator over the
    simulated page sizes plus a per-access memory cost).  A ratio predicted/measured
    within 0.90-1.10 is in band.  A real run whose counters show another path than the
    simulator's is refused (exit status 1).  Never writes sysfs.

    Without --profile: the profile `thpcow calibrate` cached for this CPU and kernel;
    when there is none, this machine is calibrated first and the profile cached
    (--profile auto: the cached one, else this CPU's preset, else the reference, never
    fitting).  The first line says which profile and why.
    """
    from ..lab import validate as val

    if programs is not None or seed is not None or steps is not None or program_set is not None:
        if profile is not None or quick or scenario or refit:
            bad_input("--programs: cannot be combined with --profile, --calibrate, --quick or --scenario")
        _differential(programs, 0 if seed is None else seed, 16 if steps is None else steps, as_json,
                      "wide" if program_set is None else program_set)
        return
    from ..experiments.costs import resolve_profile
    from ..lab import calibrate as cal
    from ..machine.cost_presets import mismatch

    if refit and profile is not None:
        bad_input("--calibrate: cannot be combined with --profile (it measures the profile)")
    try:
        prof, lab, choice = resolve_profile(profile, auto=True)
    except ValueError as exc:
        bad_input(str(exc) if str(exc).startswith("--profile") else f"--profile={profile}: {exc}")
    cfg = val.ValidationConfig.quick_config() if quick else val.ValidationConfig()
    only = tuple(scenario) if scenario else None
    fit = refit or (profile is None and choice.how != "cached")
    if fit:
        prof, lab, choice, res = _fit(quick, choice, as_json, cfg, only)
    if not as_json:
        console.print(choice.line(), soft_wrap=True, highlight=False)
        warn = mismatch(prof)
        if warn:
            console.print(f"[yellow]warning:[/] {warn}", soft_wrap=True)
    if not fit:
        res = run_lab(lambda progress: val.validate(cfg, prof, lab, progress=progress, only=only), "validating", 60)
    drift = {} if fit else cal.probe_drift(lab.get("probe"), res.metadata.get("probe"))
    if as_json:
        print(json.dumps({**res.to_dict(), "profile_probe": lab.get("probe"), "probe_drift": drift},
                         indent=2, default=str))
        return
    lo, hi = val.BAND
    rows = [[r.label, human_ns(r.measured_ns), human_ns(r.predicted_ns), f"{r.ratio:.2f}",
             "yes" if r.in_band else "NO"] for r in res.rows]
    how = (f"median of {cfg.repeats} rounds' ratios" if res.metadata.get("interleaved")
           else f"median of {cfg.repeats}")
    print_fitted(f"model vs Linux {res.metadata.get('kernel')}: band {lo:.2f}-{hi:.2f}, {how}",
                 ["scenario", "measured", "predicted", "ratio", "band"], rows)
    n_in = sum(r.in_band for r in res.rows)
    console.print(f"{n_in} of {len(res.rows)} scenarios in band ({res.elapsed_s:.1f} s); see docs/validation.md "
                  "for the misses", soft_wrap=True)
    busy_warning(res.metadata)
    if fit:
        console.print("measured interleaved with the calibration (each round: every figure, then every "
                      f"scenario once); random reads x{res.metadata.get('read_scale', 1.0):.2f}, the read "
                      "timing against the calibration's random reads", soft_wrap=True, highlight=False)
    if drift:
        console.print("machine speed now vs at calibration (probe, CPU time; above 1: slower now): "
                      + ", ".join(f"{k[:-3]} x{v:.2f}" for k, v in drift.items()), soft_wrap=True, highlight=False)
    then = dict(lab.get("metadata", {})).get("other_cpu_busy")
    now = res.metadata.get("other_cpu_busy")
    if isinstance(then, float) and isinstance(now, float) and abs(then - now) > 0.2:
        console.print(f"note: the profile was calibrated with {then:.0%} of the CPUs busy with other work, "
                      f"this run with {now:.0%}: memory shared with that work moves every cost (by up to "
                      "30 % on a shared VM); calibrate and validate together (--calibrate)",
                      soft_wrap=True, highlight=False)


def _fit(quick: bool, before, as_json: bool, cfg, only):
    """Calibrate this machine now (quick with --quick) interleaved with the validation, cache the
    profile; (profile, lab, Choice, ValidationResult)."""
    from ..lab import calibrate as cal
    from ..lab import validate as val
    from ..machine import cost_presets as cp

    why = ("--calibrate" if before.how == "cached" else
           "no profile of this machine is cached" + (" (--profile auto would use "
                                                     f"{before.profile.name})" if before.how != "reference" else ""))
    if not as_json:
        console.print(f"fitting this machine's profile first ({why}): thpcow calibrate"
                      f"{' --quick' if quick else ''}, interleaved with the validation",
                      soft_wrap=True, highlight=False)
    cal_cfg = cal.CalibrationConfig.quick_config() if quick else cal.CalibrationConfig()
    res, vres = run_lab(lambda progress: val.calibrate_and_validate(cal_cfg, cfg, progress=progress, only=only),
                        "calibrating and validating", 60)
    try:
        path = cal.cache_profile(res)
    except OSError as exc:
        if not as_json:
            console.print(f"[yellow]note:[/] cannot cache the profile: {exc}", soft_wrap=True)
        path = None
    how = "fitted" if path is None else "cached"
    return res.profile, res.lab, cp.Choice(res.profile, how, path), vres


def _differential(n: int | None, seed: int, steps: int, as_json: bool, program_set: str = "wide") -> None:
    """validate --programs N --seed S: the simulator against the running kernel, program by program."""
    from ..lab import programs as prg
    from ..lab.procfs import LabError

    if n is None:
        bad_input("--seed/--steps/--set: need --programs N")
    if program_set not in ("basic", "wide"):
        bad_input(f"--set={program_set}: must be basic or wide")
    if n < 1 or n > 100_000:
        bad_input(f"--programs={n}: must be between 1 and 100000")
    if seed < 0:
        bad_input(f"--seed={seed}: must be 0 or more")
    if steps < 1 or steps > 1000:
        bad_input(f"--steps={steps}: must be between 1 and 1000")
    reason = prg.real_kernel_reason()
    if reason:
        fail(f"--programs needs the running kernel: {reason}")
    try:    # NumPy madvise()s its big arrays MADV_HUGEPAGE: the simulator's would feed khugepaged,
        from numpy._core.multiarray import _set_madvise_hugepage    # whose collapses count as noise
    except ImportError:                                             # NumPy < 2
        from numpy.core.multiarray import _set_madvise_hugepage
    _set_madvise_hugepage(False)
    res = run_lab(lambda progress: prg.differential(n, seed, steps=steps, progress=progress,
                                                    wide=program_set == "wide"),
                  "differential", 30, errors=(LabError, OSError, RuntimeError))
    if as_json:
        print(json.dumps(res.to_dict(), indent=2, default=str))
    else:
        table = Table(title=f"simulator vs kernel, {program_set} set, seed {seed}, {steps} steps")
        for col in ("programs", "equal", "noisy", "different", "time"):
            table.add_column(col, justify="right")
        table.add_row(str(res.programs), str(res.equal), str(res.noisy),
                      str(res.different) if not res.different else f"[bold red]{res.different}[/]",
                      f"{res.elapsed_s:.1f} s")
        console.print(table)
        if res.rerun_equal:
            print(f"({res.rerun_equal} of the equal judged by a rerun: khugepaged worked during their "
                  "first run, on its own timer, which the simulator's programs do not reach)")
        if res.lock_wait_s >= 1:
            print(f"({res.lock_wait_s:.0f} s of it waiting for the lab lock: other real-kernel runs)")
        for o in res.outcomes:
            if o.verdict == "noisy":
                print(f"program {o.index}: noisy ({o.where}):\n  {o.why}")
        for o in res.outcomes:
            if o.verdict != "different":
                continue
            print(f"\nprogram {o.index}: different ({o.where})")
            print(f"minimal program, {len(o.minimal)} of {len(o.program)} steps (thpcow.lab.programs:")
            print("run_sim(program) / run_real(program); K = 4 KiB, M = 1 MiB):")
            print(prg.format_program(o.minimal))
            for side, r in (("running kernel", o.real), ("simulator", o.sim)):
                print(f"# {side}: return values {r['rcs']}")
                for v in r["vmas"]:
                    print(f"#   {v[0]:#x}-{v[1]:#x} {v[2]} [{v[3]}] AnonHugePages {v[4]} kB, Rss {v[5]} kB")
                    if len(v) > 6:
                        print("#     Referenced {} kB; present {}, exclusive {}, swapped {}, "
                              "guard {}".format(*v[6:]))
    if res.different:
        raise typer.Exit(1)
