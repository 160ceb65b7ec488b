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

import numpy as np
import pandas as pd

MIB = 1 << 20


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

    rows = []
    base_copy = None
    for rec in summ.to_dict("records"):
        pol = rec["policy"]
        o = ops[(ops["policy"] == pol) & (ops["kind"] == "write") & (ops["phase"] == phase)]
        lat = o["cost_ns"].to_numpy() / 1000.0
        stores = int(o["n"].sum())
        copy_ms = lat.sum() / 1000.0
        if pol == "upstream":
            base_copy = copy_ms
        row = {
            "policy": f"`{pol}`" + (" (OOM)" if rec["oom"] else ""),
            "pgfault": rec["pgfault"], "thp_fault_alloc": rec["thp_fault_alloc"],
            "thp_fault_fallback": rec["thp_fault_fallback"], "thp_split_pmd": rec["thp_split_pmd"],
            "thp_collapse_alloc": rec["thp_collapse_alloc"],
            "COW MiB": round(rec["sim_cow_bytes"] / MIB, 2),
            "collapse MiB": round(rec["sim_collapse_bytes"] / MIB, 2),
            "peak extra MiB": round(rec["peak_extra_mib"], 2), "end extra MiB": round(rec["end_extra_mib"], 2),
        }
        if args.copy:
            row["copy ms"] = round(copy_ms, 2)
            row["per op p50 µs"] = round(float(np.percentile(lat, 50)), 1) if len(lat) else float("nan")
        else:
            row["writes"] = stores
            row["p50 µs"] = round(float(np.percentile(lat, 50)), 2) if len(lat) else float("nan")
            row["p99 µs"] = round(float(np.percentile(lat, 99)), 2) if len(lat) else float("nan")
            row["p99.9 µs"] = round(float(np.percentile(lat, 99.9)), 1) if len(lat) else float("nan")
            row["max µs"] = round(float(lat.max()), 1) if len(lat) else float("nan")
            row[">100 µs"] = int((lat > 100).sum())
            row["write ms"] = round(copy_ms, 1)
        row["run model ms"] = round(rec["model_ms"], 1)
        row["THP mean"] = round(rec["thp_mean"], 3)
        row["THP min"] = round(rec["thp_min"], 3)
        row["THP end"] = round(rec["thp_end"], 3)
        row["TLB misses"] = int(rec["tlb_misses"]) if rec["tlb_misses"] == rec["tlb_misses"] else "n/a"
        rows.append(row)
    if args.copy and base_copy:
        for row in rows:
            row["upstream / this"] = round(base_copy / row["copy ms"], 2) if row["copy ms"] else float("nan")
    _markdown(rows)

    if args.coverage:
        t = samples["t_ns"].to_numpy()
        times = np.linspace(t.min(), t.max(), args.coverage)
        cov_rows = []
        for pol in summ["policy"]:
            s = samples[samples["policy"] == pol].sort_values("t_ns")
            st, sv = s["t_ns"].to_numpy(), s["thp_coverage"].to_numpy()
            row = {"policy": f"`{pol}`"}
            for x in times:
                i = max(int(np.searchsorted(st, x, side="right")) - 1, 0)
                row[f"{x / 1e6:.0f} ms"] = "n/a" if np.isnan(sv[i]) else f"{sv[i]:.2f}"
            cov_rows.append(row)
        print("\nTHP coverage of the parent (AnonHugePages / Anonymous) over simulated time:\n")
        _markdown(cov_rows)
    return 0


def _markdown(rows: list[dict]) -> None:
    if not rows:
        return
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")


if __name__ == "__main__":
    sys.exit(main())
