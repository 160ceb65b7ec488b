"""The thpcow command line: one typer app, one verb per capability.

VERBS is the one registration table: (verb, module in this package, help shown
in the ``thpcow --help`` list), in the order of that list.  Each verb module
defines ``command()``, the typer callback, whose docstring is the verb's full
help; the table's help is that docstring's first paragraph.  A verb module
imports at its top only typer, rich and the helpers in ``common``; the
simulator, pandas, matplotlib and dask are imported inside ``command()``, so
that building the app (``thpcow --help``) stays cheap.
"""

from __future__ import annotations

import importlib
import sys

import typer

VERBS: tuple[tuple[str, str, str], ...] = (
    ("demo", "demo",
     "Run the built-in fork/COW scenario on the simulated kernel and show what changed."),
    ("policies", "policies",
     "List the COW policies: kernel builds and userspace strategies, with their parameters."),
    ("policy-table", "policy_table",
     "Run every COW policy on the three small built-in scenarios and write one table."),
    ("workloads", "workloads",
     "List the workloads and their parameters (name: meaning (range); type, default)."),
    ("compare", "compare",
     "Run each COW policy on one scenario; print a table and a verdict; write Parquet and an HTML report."),
    ("sweep", "sweep",
     "Run a grid of scenario parameters x policies; every finished point is stored at once (resumable)."),
    ("results", "results",
     "Regenerate docs/results.md and its figures from the built-in scenarios (`make results`)."),
    ("inspect", "inspect",
     "Show a live process's THP state from smaps, PAGEMAP_SCAN, pagemap and kpageflags."),
    ("calibrate", "calibrate",
     "Measure the latency model's costs on the running kernel and write a CalibrationProfile (TOML)."),
    ("record", "record",
     "Record which pages a real process writes, and when, as a trace the simulator replays."),
    ("validate", "validate",
     "Compare the latency model's predicted times with times measured on the running kernel "
     "(--programs N: random VMA programs, simulator vs kernel)."),
)


def build_app() -> typer.Typer:
    """The typer app with one command per row of VERBS."""
    app = typer.Typer(add_completion=False, no_args_is_help=True,
                      help="A lab for Linux transparent huge pages and copy-on-write after fork().")

    def show_version(value: bool) -> None:
        if value:
            from importlib.metadata import PackageNotFoundError, version
            try:
                print(f"thpcow {version('thpcow')}")
            except PackageNotFoundError:
                print("thpcow (not installed)")
            raise typer.Exit()

    @app.callback()
    def root(_version: bool = typer.Option(False, "--version", callback=show_version, is_eager=True,
                                           help="Print the version and exit.")) -> None:
        """A lab for Linux transparent huge pages and copy-on-write after fork()."""
    for verb, module, help_text in VERBS:
        mod = importlib.import_module(f"{__name__}.{module}")
        app.command(verb, short_help=help_text)(mod.command)
    return app


app = build_app()


def main() -> None:
    """The ``thpcow`` entry point: usage errors and kernel errors are one line on stderr."""
    usage_error = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
    try:
        code = app(standalone_mode=False)
    except usage_error as exc:                   # bad option, bad value, missing argument: exit 2
        verb = f" {exc.ctx.info_name}" if exc.ctx is not None and exc.ctx.parent is not None else ""
        if exc.format_message().strip():         # (no arguments at all: the help was printed)
            print(f"thpcow{verb}: {exc.format_message()} (see 'thpcow{verb} --help')", file=sys.stderr)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):         # Ctrl-C
        print("thpcow: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # one line, non-zero exit
        from ..kernel.errors import KernelError
        if isinstance(exc, KernelError):
            print(f"thpcow: {exc}", file=sys.stderr)
            sys.exit(1)
        raise
    sys.exit(code if isinstance(code, int) else 0)
