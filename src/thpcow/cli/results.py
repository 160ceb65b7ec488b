"""thpcow results: regenerate docs/results.md and its figures (what `make results` runs)."""

from __future__ import annotations

import sys

import typer

from .common import bad_input, fail


def command(out: str = typer.Option(None, "--out", help="the page to write (default: docs/results.md "
                                    "of the checkout; its figures go to results/ beside it)"),
            quick: bool = typer.Option(False, "--quick", help="shrunken scenarios (seconds, for a "
                                       "check that the page renders; its claims need not hold)"),
            real: bool = typer.Option(True, "--real/--no-real", help="also measure on the running "
                                      "kernel (a real Redis BGSAVE, the latency model's cases)"),
            jobs: int = typer.Option(2, "--jobs", help="scenario runs in parallel (>= 1)")) -> None:
    """Regenerate docs/results.md and its figures from the built-in scenarios (`make results`).

    Runs every scenario of the page on the simulated kernel (in --jobs worker processes), the
    measured sections on the running kernel where THP is available (never writing sysfs), renders
    docs/results.in.md and writes the figures; the end-to-end table (each scenario's runnable
    policies, simulated and real) also goes into docs/validation.md.  Every sentence that states a result is checked;
    the exit status is 1 when one no longer holds (it is marked on the page).
    """
    import os

    from ..experiments import results as res

    if jobs < 1:
        bad_input(f"--jobs={jobs}: must be >= 1")
    if out is not None and not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        bad_input(f"--out={out}: its directory does not exist")
    if not os.path.exists(os.path.join(res.DOCS, res.TEMPLATE)):
        fail(f"no template {res.TEMPLATE} in {res.DOCS}: run from a checkout of thpcow")
    validation_md = os.path.join(res.DOCS, "validation.md") if out is None and not quick else None
    outcome = res.generate(out, quick=quick, real=real, jobs=jobs, validation_md=validation_md,
                           progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(f"wrote {outcome.path} and {len(outcome.figures)} figures in {outcome.seconds:.0f} s; "
          f"{outcome.claims.held} claims hold, {len(outcome.claims.failed)} do not")
    for text in outcome.claims.failed:
        print(f"  does not hold: {text[:70]}...")
    if outcome.claims.failed and not quick:
        raise typer.Exit(1)
