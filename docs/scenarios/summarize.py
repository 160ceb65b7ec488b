"""Markdown tables for docs/results.md from the Parquet files `thpcow compare ... --out DIR` wrote.

    python3 docs/scenarios/summarize.py DIR [--copy] [--coverage N]

Reads DIR/summary.parquet, DIR/ops.parquet and DIR/samples.parquet (nothing is re-run) and prints:

- the main table: per policy the copy/COW figures and the modelled write latency of the
  workload's measured phase; ``--copy`` adds the sum of that phase's write costs (the modelled
  copy time) and its ratio to upstream;
- ``--coverage N``: the parent's THP coverage (AnonHugePages / Anonymous) at N evenly spaced
  sample times.

Latencies are per write *op* (one ``write_many`` batch): with one store per batch (the review
scenarios) that is the latency of one store.
"""

from __future__ import annotations

import argparse
import os
import sys

import pandas as pd

from thpcow.experiments.summarize import coverage_rows, main_rows, markdown


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir")
    ap.add_argument("--copy", action="store_true", help="add the modelled copy time and its ratio to upstream")
    ap.add_argument("--coverage", type=int, default=0, help="THP coverage at N sample times")
    args = ap.parse_args(argv)
    summ = pd.read_parquet(os.path.join(args.dir, "summary.parquet"))
    ops = pd.read_parquet(os.path.join(args.dir, "ops.parquet"))
    samples = pd.read_parquet(os.path.join(args.dir, "samples.parquet"))
    import yaml
    with open(os.path.join(args.dir, "scenario.yaml")) as fh:
        sc = yaml.safe_load(fh)
    from thpcow.workloads import get_workload
    wl = sc["workload"]
    phase = get_workload(wl["name"], **{k: v for k, v in wl.items() if k != "name"}).measure_phase
    print(f"scenario {sc['name']}: seed {sc['seed']}, ram {sc['ram_mib']} MiB, fragmentation "
          f"{sc['fragmentation']}, latency model {summ['latency_model'].iloc[0]}; measured phase: {phase}\n")
    print(markdown(main_rows(summ, ops, phase, copy=args.copy)))
    if args.coverage:
        print("\nTHP coverage of the parent (AnonHugePages / Anonymous) over simulated time:\n")
        print(markdown(coverage_rows(summ, samples, args.coverage)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
