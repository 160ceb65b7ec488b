"""Markdown tables of a `compare` run, as docs/results.md prints them.

The functions take the frames :func:`thpcow.experiments.runner.run_compare` returns (or that
``thpcow compare --out DIR`` wrote as Parquet) and give rows (dicts) and Markdown text:

- :func:`main_rows`: per policy the counters, the copy/COW figures and the modelled cost of
  the write ops of the workload's measured phase; ``copy=True`` gives the sum of those costs
  (the modelled copy time) and its ratio to upstream instead of the latency percentiles;
- :func:`coverage_rows`: the parent's THP coverage (AnonHugePages / Anonymous) at N evenly
  spaced sample times.

Latencies are per write *op* (one ``write_many`` batch): with one store per batch (the review
scenarios) that is the latency of one store.
"""

from __future__ import annotations

from typing import Any

import numpy as np

MIB = 1 << 20


def measure_phase(scenario) -> str:
    """The phase whose write ops the tables price (the workload's ``measure_phase``)."""
    return scenario.make_workload().measure_phase if hasattr(scenario, "make_workload") else scenario


def phase_costs_us(ops, policy: str, phase: str) -> tuple[np.ndarray, int]:
    """The modelled cost (µs) of each write op of ``policy`` in ``phase``, and their stores."""
    o = ops[(ops["policy"] == policy) & (ops["kind"] == "write") & (ops["phase"] == phase)]
    return o["cost_ns"].to_numpy(dtype=np.float64) / 1000.0, int(o["n"].sum())


def _pct(lat: np.ndarray, q: float, nd: int) -> float:
    return round(float(np.percentile(lat, q)), nd) if len(lat) else float("nan")


def main_rows(summary, ops, phase: str, copy: bool = False) -> list[dict[str, Any]]:
    """One row per policy (see the module docstring for the columns)."""
    rows: list[dict[str, Any]] = []
    base_copy = None
    for rec in summary.to_dict("records"):
        pol = rec["policy"]
        lat, stores = phase_costs_us(ops, pol, phase)
        copy_ms = lat.sum() / 1000.0
        if pol == "upstream":
            base_copy = copy_ms
        row: dict[str, Any] = {
            "policy": f"`{pol}`" + (" (OOM)" if rec["oom"] else ""),
            "pgfault": rec["pgfault"], "thp_fault_alloc": rec["thp_fault_alloc"],
            "thp_fault_fallback": rec["thp_fault_fallback"], "thp_split_pmd": rec["thp_split_pmd"],
            "thp_collapse_alloc": rec["thp_collapse_alloc"],
            "COW MiB": round(rec["sim_cow_bytes"] / MIB, 2),
            "collapse MiB": round(rec["sim_collapse_bytes"] / MIB, 2),
            "peak extra MiB": round(rec["peak_extra_mib"], 2), "end extra MiB": round(rec["end_extra_mib"], 2),
        }
        if copy:
            row["copy ms"] = round(copy_ms, 2)
            row["per op p50 µs"] = _pct(lat, 50, 1)
        else:
            row["writes"] = stores
            row["p50 µs"] = _pct(lat, 50, 2)
            row["p99 µs"] = _pct(lat, 99, 2)
            row["p99.9 µs"] = _pct(lat, 99.9, 1)
            row["max µs"] = round(float(lat.max()), 1) if len(lat) else float("nan")
            row[">100 µs"] = int((lat > 100).sum())
            row["write ms"] = round(copy_ms, 1)
        row["run model ms"] = round(rec["model_ms"], 1)
        row["THP mean"] = round(rec["thp_mean"], 3)
        row["THP min"] = round(rec["thp_min"], 3)
        row["THP end"] = round(rec["thp_end"], 3)
        row["TLB misses"] = int(rec["tlb_misses"]) if rec["tlb_misses"] == rec["tlb_misses"] else "n/a"
        rows.append(row)
    if copy and base_copy:
        for row in rows:
            row["upstream / this"] = round(base_copy / row["copy ms"], 2) if row["copy ms"] else float("nan")
    return rows


def coverage_times(samples, n: int) -> np.ndarray:
    """``n`` evenly spaced times (ns) over the run's samples."""
    t = samples["t_ns"].to_numpy()
    return np.linspace(t.min(), t.max(), n)


def coverage_rows(summary, samples, n: int) -> list[dict[str, Any]]:
    """The parent's THP coverage of each policy at ``n`` evenly spaced sample times."""
    times = coverage_times(samples, n)
    rows = []
    for pol in summary["policy"]:
        s = samples[samples["policy"] == pol].sort_values("t_ns")
        st, sv = s["t_ns"].to_numpy(), s["thp_coverage"].to_numpy()
        row: dict[str, Any] = {"policy": f"`{pol}`"}
        for x in times:
            i = max(int(np.searchsorted(st, x, side="right")) - 1, 0)
            row[f"{x / 1e6:.0f} ms"] = "n/a" if np.isnan(sv[i]) else f"{sv[i]:.2f}"
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of ``rows`` (the first row's keys are the columns)."""
    if not rows:
        return ""
    cols = list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    out += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(out)
