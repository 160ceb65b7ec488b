"""thpcow record: which pages a real process writes, and when, as a trace the simulator replays."""

from __future__ import annotations

import typer

from .common import bad_input, console, err_console, fail, print_fitted


def command(cmd: list[str] = typer.Argument(None, metavar="-- COMMAND...", help="the command to start and record"),
            pid: int = typer.Option(None, "--pid", help="record this running process instead"),
            out: str = typer.Option("trace.csv", "--out", "-o", help="the trace file (.csv or .parquet)"),
            interval: float = typer.Option(10.0, "--interval", help="ms between two reads of the written pages"),
            method: str = typer.Option("auto", "--method",
                                       help="uffd-wp (Linux 6.7+, exact per interval), pagemap (PFN changes: "
                                            "first touches and COW copies only) or auto"),
            duration: float = typer.Option(None, "--duration", help="stop after this many seconds"),
            replay: bool = typer.Option(False, "--replay", help="then replay the trace on the simulator"),
            as_json: bool = typer.Option(False, "--json", help="print the summary as JSON")) -> None:
    """Record which pages a real process writes, and when, as a trace the simulator replays.

    Starts COMMAND (give it after --) or attaches to --pid, follows its forks
    and records, every --interval ms, its anonymous mappings (mmap, munmap,
    madvise rows) and the pages written since the last look (write rows),
    until every recorded process has exited (or --duration, or Ctrl-C).  The
    trace's format is the 'trace' workload's: replay it in a scenario with
    workload: {name: trace, path: FILE}, or here with --replay.  Needs root;
    writes no sysfs; the recorded processes are detached and left as they
    were (a COMMAND started here is killed if the recording stops early).
    """
    import json
    import os

    from ..lab.record import METHODS, RecordError, method_supported, record
    from ..lab.record import replay as replay_trace

    if interval <= 0:
        bad_input(f"--interval={interval}: must be > 0 (ms)")
    if duration is not None and duration <= 0:
        bad_input(f"--duration={duration}: must be > 0 (seconds)")
    if method not in (*METHODS, "auto"):
        bad_input(f"--method={method}: expected one of {', '.join((*METHODS, 'auto'))}")
    if bool(cmd) == (pid is not None):
        bad_input("give a COMMAND (after --) or --pid PID (one of them)")
    if pid is not None and (pid <= 0 or not os.path.isdir(f"/proc/{pid}")):
        bad_input(f"--pid={pid}: no such process")
    if pid is not None and pid == os.getpid():
        bad_input(f"--pid={pid}: that is this recorder")
    if not out.endswith((".csv", ".parquet")):
        bad_input(f"--out={out}: expected a .csv or .parquet file")
    outdir = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(outdir) or not os.access(outdir, os.W_OK):
        bad_input(f"--out={out}: cannot write in {outdir}")
    if method == "auto":
        ok, why = method_supported("uffd-wp")
        method = "uffd-wp" if ok else "pagemap"
        if not ok:
            err_console.print(f"uffd-wp unavailable ({why}); using pagemap", soft_wrap=True, highlight=False)
    with err_console.status("recording", spinner="dots") as status:
        try:
            rows, summary = record(cmd or None, pid, out, method, interval, duration,
                                   progress=lambda msg: status.update(f"recording: {msg}"))
        except RecordError as exc:
            fail(str(exc))
    result = {"trace": out, **summary.to_dict()}
    if replay:
        with err_console.status("replaying on the simulator", spinner="dots"):
            try:
                sim = replay_trace(out)
            except ValueError as exc:
                fail(f"replay: {exc}")
        result["sim"] = {k: sim[k] for k in ("sim_cow_bytes", "sim_cow_pages", "thp_split_pmd",
                                             "thp_fault_alloc", "pgfault") if k in sim}
    if as_json:
        print(json.dumps(result))
    else:
        MiB = 1 << 20
        rows_out = [["trace", out], ["method", method], ["rows", str(summary.rows)],
                    ["processes", str(summary.pids)], ["forks", str(summary.forks)],
                    ["written", f"{summary.written_bytes / MiB:,.1f} MiB"],
                    ["read (zero page)", f"{summary.read_bytes / MiB:,.1f} MiB"],
                    ["duration", f"{summary.duration_ns / 1e9:,.3f} s"],
                    ["scans", f"{summary.scans} (median {summary.scan_ns_median / 1e3:,.0f} us)"]]
        if summary.exit_status is not None:
            rows_out.append(["exit status", str(summary.exit_status)])
        if "sim" in result:
            s = result["sim"]
            rows_out += [["sim COW", f"{s['sim_cow_bytes'] / MiB:,.2f} MiB ({s['sim_cow_pages']} pages)"],
                         ["sim thp_split_pmd", str(s["thp_split_pmd"])]]
        print_fitted("recorded", ["", "value"], rows_out, left=2)
    if summary.interrupted:
        console.print("interrupted: the trace holds what was recorded until then", highlight=False)
        raise typer.Exit(130)
