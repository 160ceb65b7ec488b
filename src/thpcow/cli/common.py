"""What the verbs share: the console, its width for tables, error exits and the lab helpers."""

from __future__ import annotations

import sys
from typing import NoReturn

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

console = Console()
err_console = Console(stderr=True)      # progress bars and warnings: stdout stays clean for --json/--csv


def wide_console(width: int) -> Console:
    """The console on a terminal; otherwise one at least ``width`` columns wide, so that tables
    written to a file or a pipe are not squeezed."""
    return console if console.is_terminal else Console(width=max(console.width, width))


def fail(msg: str) -> NoReturn:
    """A run that could not do its work: one line on stderr, exit status 1."""
    print(f"thpcow: {msg}", file=sys.stderr)
    raise typer.Exit(1)


def bad_input(msg: str) -> NoReturn:
    """Refuse an argument: one line on stderr naming it, its value and what is allowed; exit status 2.

    ``msg`` names the option, e.g. ``--size-mib=3: must be a positive multiple of 2``.
    """
    print(f"thpcow: {msg}", file=sys.stderr)
    raise typer.Exit(2)


def writable_dir(path: str, option: str) -> None:
    """Check before a run that ``path`` can be created and written (ValueError naming ``option``)."""
    import os
    import tempfile

    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise ValueError(f"{option}={path}: {probe} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise ValueError(f"{option}={path}: cannot write there ({exc.strerror})") from None


def print_fitted(title: str | None, headers: list[str], rows: list[list[str]],
                 groups: list[int] | None = None, left: int = 1) -> None:
    """Rows of text cells as tables that fit the console's width, every cell whole.

    The first column is repeated in every table; ``groups`` (sizes of the
    other columns' groups) stay together when they fit; the first ``left``
    columns are left-justified.
    """
    from ..experiments.report import column_widths, table_chunks

    widths = column_widths(rows, headers)
    for n, chunk in enumerate(table_chunks(rows, console.width, headers, groups)):
        cols = [0] + chunk
        table = Table(title=Text(title) if title and n == 0 else None, title_justify="left")
        for i in cols:
            table.add_column(Text(headers[i]), justify="left" if i < left else "right", no_wrap=True,
                             min_width=widths[i], max_width=widths[i])
        for r in rows:
            table.add_row(*[Text(r[i]) for i in cols])       # cells are text, never markup ("[heap]")
        console.print(table)


def human_ns(ns: float | None) -> str:
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


def lab_progress(prog, task):
    """A progress callback for thpcow.lab: the step's label and the bar, refreshed by hand.

    NOTE: the Progress runs with auto_refresh=False so that no refresh thread
    competes with the measurements for the CPU (or the GIL).
    """
    def cb(label: str, done: int, total: int) -> None:
        prog.update(task, description=label, completed=done, total=total)
        prog.refresh()
    return cb


def run_lab(fn, label: str, width: int = 52, errors: tuple[type, ...] | None = None):
    """``fn(progress)`` (a thpcow.lab run taking a lab_progress() callback) under a progress bar on
    stderr, starting at ``label``; its result.  A lab error (``errors``; default LabError, OSError,
    ValueError) is one line and exit status 1."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from ..lab.procfs import LabError

    with Progress(TextColumn(f"{{task.description:<{width}}}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(), console=Console(stderr=True),
                  transient=True, auto_refresh=False) as prog:
        task = prog.add_task(label, total=1)
        try:
            return fn(lab_progress(prog, task))
        except errors or (LabError, OSError, ValueError) as exc:
            fail(str(exc))


def run_calibration(cfg):
    """``thpcow.lab.calibrate.calibrate(cfg)`` under a progress bar on stderr; a lab error is one
    line and exit status 1."""
    from ..lab import calibrate as cal

    return run_lab(lambda progress: cal.calibrate(cfg, progress=progress), "calibrating")


def busy_warning(meta: dict) -> None:
    """Warn when other tasks kept the CPUs busy during a lab run (the figures are then inflated)."""
    from ..lab.calibrate import BUSY_WARNING

    busy = meta.get("other_cpu_busy")
    if isinstance(busy, float) and busy > BUSY_WARNING:
        console.print(f"[yellow]warning:[/] other tasks kept {busy:.0%} of the CPUs busy during the run; "
                      "the timings may be inflated (rerun on a quieter machine)", soft_wrap=True)
