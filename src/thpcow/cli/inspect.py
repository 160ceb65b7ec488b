"""thpcow inspect: a live process's THPs, per VMA and in total (in the spirit of tools/mm/thpmaps)."""

from __future__ import annotations

import typer

from .common import bad_input, console, fail, print_fitted


def _size(kb: int) -> str:
    return f"{kb // 1024}M" if kb >= 1024 else f"{kb}K"


def command(pid: list[int] = typer.Argument(None, help="process ids to inspect"),
            cgroup: str = typer.Option(None, "--cgroup", help="every process of this cgroup v2 directory"),
            all_procs: bool = typer.Option(False, "--all", help="every process with an address space"),
            watch: float = typer.Option(None, "--watch", help="repeat every SECONDS until interrupted"),
            count: int = typer.Option(None, "--count", help="with --watch: stop after this many reports"),
            as_json: bool = typer.Option(False, "--json", help="print JSON (one object per process)")) -> None:
    """Show a live process's THP state from smaps, PAGEMAP_SCAN, pagemap and kpageflags.

    Per anonymous VMA, in kB: PMD-mapped THP; large folios mapped by PTEs, per
    folio size, as aligned (the whole folio, naturally aligned: as a fault or
    a collapse made it), unaligned (whole, but moved: mremap) or partial (only
    some of its pages mapped here); order-0 pages; the zero page; swap.
    Needs root (the kernel shows PFNs to CAP_SYS_ADMIN only).  Reads only.
    """
    import json
    import time as _time

    from ..lab.inspect import InspectError, all_pids, cgroup_pids, inspect_pid

    if watch is not None and watch <= 0:
        bad_input(f"--watch={watch}: must be > 0 (seconds)")
    if count is not None and count < 1:
        bad_input(f"--count={count}: must be >= 1")
    if sum(bool(x) for x in (pid, cgroup, all_procs)) != 1:
        bad_input("give process ids, --cgroup PATH or --all (one of them)")
    try:
        pids = list(pid or []) or (cgroup_pids(cgroup) if cgroup else all_pids())
    except InspectError as exc:
        bad_input(str(exc))
    for p in pids:
        if p <= 0:
            bad_input(f"pid {p}: must be > 0")
    n = 0
    while True:
        results = []
        for p in pids:
            try:
                results.append(inspect_pid(p))
            except InspectError as exc:
                if all_procs or cgroup:                       # processes come and go
                    continue
                msg = str(exc)
                if "no such process" in msg:
                    bad_input(msg)
                fail(msg)
        if as_json:
            print(json.dumps([r.to_dict() for r in results]))
        else:
            if watch is not None:
                console.print(f"[bold]{_time.strftime('%H:%M:%S')}[/]", highlight=False)
            _print(results)
        n += 1
        if watch is None or (count is not None and n >= count):
            return
        _time.sleep(watch)


def _print(results) -> None:
    sizes = sorted({s for r in results for v in r.vmas + [r.total()] for s in v.pte}, reverse=True)
    headers = ["VMA", "perms", "anon", "PMD"]
    for s in sizes:
        headers += [f"{_size(s)} aligned", f"{_size(s)} unal.", f"{_size(s)} partial"]
    headers += ["4K pages", "zero", "swap"]
    for r in results:
        rows = []
        for v in r.vmas + [r.total()]:
            label = "total" if v.name == "total" else f"{v.start:x}-{v.end:x} {v.name}"
            row = [label, v.perms, str(v.anon_kb), str(v.pmd_kb + v.huge_zero_kb)]
            for s in sizes:
                b = v.pte.get(s, {"aligned": 0, "unaligned": 0, "partial": 0})
                row += [str(b["aligned"]), str(b["unaligned"]), str(b["partial"])]
            row += [str(v.small_kb), str(v.zero_kb), str(v.swap_kb)]
            rows.append(row)
        print_fitted(f"pid {r.pid} ({r.comm}): anonymous memory in kB; PMD from {r.pmd_source}", headers, rows,
                     [1, 1, 1] + [3] * len(sizes) + [1, 1, 1], left=2)
