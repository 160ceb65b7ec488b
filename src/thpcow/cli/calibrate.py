"""thpcow calibrate: measure the latency model's costs on the running kernel."""

from __future__ import annotations

import json
import os

import typer
from rich.table import Table

from .common import busy_warning, console, fail, human_ns, run_calibration, wide_console


def command(out: str = typer.Option(None, "--out", help="profile file to write (TOML; default "
                                    "results/calibration-<kernel>-<timestamp>.toml)"),
            quick: bool = typer.Option(False, "--quick", help="smaller regions, fewer repeats: under a minute"),
            cold: bool = typer.Option(False, "--cold", help="sleep 3.5 s before every allocating step instead "
                                      "of pre-touching scratch memory (calibration.md 'cold'; slow)"),
            as_json: bool = typer.Option(False, "--json", help="print the profile, figures and metadata as JSON"),
            list_presets: bool = typer.Option(False, "--list-presets", help="list the cost presets (other CPUs "
                                              "and kernels, with their sources) and exit")) -> None:
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
    The profile is also cached as this machine's (keyed by CPU and kernel; see
    THPCOW_PROFILE_CACHE), which `thpcow validate` then uses when given no --profile.
    """
    import time as _time

    if list_presets:
        _list_presets()
        return

    from ..lab import calibrate as cal

    cfg = cal.CalibrationConfig.quick_config(warm=not cold) if quick else cal.CalibrationConfig(warm=not cold)
    res = run_calibration(cfg)
    kernel = res.lab["metadata"].get("kernel", "unknown")
    path = out or os.path.join("results", f"calibration-{kernel}-{_time.strftime('%Y%m%d-%H%M%S')}.toml")
    try:
        cal.write_profile(res.profile, path, res.lab)
    except (OSError, ValueError) as exc:
        fail(f"{path}: cannot write the profile: {exc}")
    from ..machine import cost_presets as cp

    cached = cp.cache_path(res.profile.cpu_id, res.profile.kernel)
    if cached is not None:
        try:
            cal.write_profile(res.profile, cached, res.lab)
        except OSError as exc:
            cached = None
            console.print(f"[yellow]note:[/] cannot cache the profile: {exc}", soft_wrap=True)
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
        table.add_row(r["figure"], r["field"] or "(lab extra)", r["per"], human_ns(r["median_ns"]),
                      f"{human_ns(r['min_ns'])} - {human_ns(r['max_ns'])}", human_ns(ref),
                      f"{r['median_ns'] / ref:.2f}" if ref else "-")
    out_console = wide_console(160)
    out_console.print(table)
    dropped = [f"{r['figure']} ({r['dropped']} of {r['dropped'] + r['repeats']})" for r in rows if r["dropped"]]
    if dropped:
        console.print("[yellow]note:[/] runs that came out below zero were dropped as measurement errors "
                      f"(noise larger than the cost): {', '.join(dropped)}; rerun on a quieter machine",
                      soft_wrap=True)
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
    if cached is not None:
        console.print(f"cached as this machine's profile: {cached}", soft_wrap=True, highlight=False)
    busy_warning(meta)


def _list_presets() -> None:
    """calibrate --list-presets: one block per cost preset, its changed costs and its sources."""
    from ..machine import cost_presets as cp
    from ..machine.latency import DEFAULT_PROFILE
    from .common import print_fitted

    rows = []
    for name, p in cp.PRESETS.items():
        changed = [f"{k} {human_ns(v)}" for k, v in p.to_dict().items()
                   if k.endswith("_ns") and v != getattr(DEFAULT_PROFILE, k)]
        rows.append([name, p.cpu_id or "-", p.kernel or "-", ", ".join(changed) or "(reference)"])
    print_fitted("cost presets (--profile NAME); the costs that differ from the reference",
                 ["preset", "cpu_id", "kernel", "costs"], rows)
    for name, p in cp.PRESETS.items():
        console.print(f"{name}: {p.source}", soft_wrap=True, highlight=False)
