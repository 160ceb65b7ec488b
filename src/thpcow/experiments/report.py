"""Results of a comparison: Parquet files, an HTML report with plots, the verdict line.

``write_results(result, out_dir)`` writes::

    out_dir/summary.parquet   one row per policy (runner.SUMMARY_SCHEMA)
    out_dir/ops.parquet       one row per op and policy: time, kind, pid, phase, accesses,
                              modelled cost, memory in use after it, its vmstat deltas
    out_dir/samples.parquet   THP coverage of the parent and memory in use over simulated time
    out_dir/scenario.yaml     the scenario as run
    out_dir/report.html       the table, the verdict and three plots as embedded PNGs
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from typing import Any

from ..workloads import workload_class

# Columns of the printed table: (column, header, format).
TABLE = (
    ("policy", "policy", "{}"),
    ("cow_mib", "COW MiB", "{:.1f}"),
    ("peak_mib", "peak MiB", "{:.1f}"),
    ("pgfault", "pgfault", "{:d}"),
    ("thp_fault_alloc", "thp_fault_alloc", "{:d}"),
    ("thp_split_pmd", "thp_split_pmd", "{:d}"),
    ("thp_collapse_alloc", "thp_collapse_alloc", "{:d}"),
    ("pgreuse", "pgreuse", "{:d}"),
    ("lat_p50_us", "p50 µs", "{:.1f}"),
    ("lat_p99_us", "p99 µs", "{:.1f}"),
    ("lat_max_us", "max µs", "{:.1f}"),
    ("thp_mean", "THP mean", "{:.2f}"),
    ("thp_end", "THP end", "{:.2f}"),
    ("tlb_misses", "TLB misses", "{:.0f}"),
    ("tlb_ms", "TLB ms", "{:.2f}"),
    ("model_ms", "model ms", "{:.1f}"),
)


def _missing(value: Any) -> bool:
    """A figure that was not measured: None or NaN."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def fmt(value: Any, spec: str) -> str:
    """One table cell: n/a for missing figures."""
    if _missing(value):
        return "n/a"
    if spec == "{:d}":
        return str(int(value))
    return spec.format(value)


def table_rows(summary) -> list[list[str]]:
    """The summary as rows of formatted cells, in TABLE order (an OOM or oopsed run is marked)."""
    out = []
    for rec in summary.to_dict("records"):
        row = [fmt(rec[col], spec) for col, _h, spec in TABLE]
        if rec.get("oom"):
            row[0] += " (OOM)"
        if rec.get("oops"):
            row[0] += " (oops)"
        out.append(row)
    return out


def verdict(summary) -> str:
    """One line: which policy leads on p99 write latency, bytes copied, peak memory, THP coverage, run time."""
    recs = [r for r in summary.to_dict("records")]
    if not recs:
        return "verdict: no policy was run"
    ok = [r for r in recs if not r.get("oom") and not r.get("oops")] or recs
    oom = [r["policy"] for r in recs if r.get("oom")]
    oops = [f"{r['policy']} ({r['oops']})" for r in recs if r.get("oops")]
    metrics = (("lat_p99_us", 1, "lowest p99 write latency", " µs", 1), ("cow_mib", 1, "least copied", " MiB", 1),
               ("peak_mib", 1, "lowest peak", " MiB", 1), ("thp_mean", -1, "best THP coverage", "", 2),
               ("model_ms", 1, "fastest", " ms modelled", 1))
    parts, leaders = [], set()
    for col, sign, what, unit, nd in metrics:
        best = min(_key(r[col], sign) for r in ok)
        if math.isinf(best):
            continue
        tied = [r for r in ok if _key(r[col], sign) == best]
        leaders.add(tied[0]["policy"] if len(tied) == 1 else None)
        more = f" and {len(tied) - 1} more" if len(tied) > 1 else ""
        parts.append(f"{what}: {tied[0]['policy']}{more} ({fmt(tied[0][col], f'{{:.{nd}f}}')}{unit})")
    tail = (f"; out of memory: {', '.join(oom)}" if oom else "") + \
        (f"; the kernel oopsed: {', '.join(oops)}" if oops else "")
    if len(recs) > 1 and len(leaders) == 1 and None not in leaders:
        return f"verdict: {leaders.pop()} is best on every count (" + "; ".join(parts) + ")" + tail
    return "verdict: " + "; ".join(parts) + tail


def _key(v: Any, sign: int) -> float:
    return math.inf if _missing(v) else sign * float(v)


# -- plots ------------------------------------------------------------------------------------
def _figure():
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
    return plt, fig, ax


_STYLES = ("-", "--", ":", "-.")


def _style(i: int) -> dict[str, Any]:
    """Line style of the i-th policy: identical results stay visible as dashed/dotted overlays."""
    return {"linestyle": _STYLES[i % len(_STYLES)], "linewidth": 1.6 if i % len(_STYLES) == 0 else 1.3}


def _png(plt, fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def plot_coverage(samples, policies: list[str]) -> bytes:
    """THP coverage (AnonHugePages / Anonymous) of the parent over simulated time, one line per policy."""
    plt, fig, ax = _figure()
    for i, pol in enumerate(policies):
        s = samples[samples["policy"] == pol]
        ax.step(s["t_ns"] / 1e6, s["thp_coverage"], where="post", label=pol, **_style(i))
    ax.set(xlabel="simulated time (ms)", ylabel="AnonHugePages / Anonymous (parent)", ylim=(-0.02, 1.02),
           title="THP coverage over time")
    ax.legend(fontsize=7)
    return _png(plt, fig)


def plot_latency_cdf(ops, policies: list[str], phase: str) -> bytes:
    """CDF of the modelled write-batch latency in the measured phase, one line per policy."""
    import numpy as np

    plt, fig, ax = _figure()
    for i, pol in enumerate(policies):
        o = ops[(ops["policy"] == pol) & (ops["kind"] == "write") & (ops["phase"] == phase)]
        lat = np.sort(o["cost_ns"].to_numpy() / 1000.0)
        if len(lat):
            ax.step(lat, np.arange(1, len(lat) + 1) / len(lat), where="post", label=pol, **_style(i))
    ax.set_xscale("log")
    ax.set(xlabel="write-batch latency (µs, modelled)", ylabel="fraction of batches",
           title=f"write latency CDF ({phase} phase)")
    ax.legend(fontsize=7)
    return _png(plt, fig)


def plot_memory(ops, policies: list[str]) -> bytes:
    """Memory in use ((nr_frames - nr_free) x 4 KiB) after every op, one line per policy."""
    plt, fig, ax = _figure()
    for i, pol in enumerate(policies):
        o = ops[ops["policy"] == pol]
        ax.step(o["t_ns"] / 1e6, o["mem_bytes"] / (1 << 20), where="post", label=pol, **_style(i))
    ax.set(xlabel="simulated time (ms)", ylabel="memory in use (MiB)", title="memory over time")
    ax.legend(fontsize=7)
    return _png(plt, fig)


# -- files ------------------------------------------------------------------------------------
def _atomic_write(path: str, data: bytes) -> None:
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def write_results(result, out_dir: str) -> dict[str, str]:
    """Write the Parquet files, the scenario and the HTML report; returns {what: path}."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {name: os.path.join(out_dir, f"{name}.parquet") for name in ("summary", "ops", "samples")}
    for name, df in (("summary", result.summary), ("ops", result.ops), ("samples", result.samples)):
        buf = io.BytesIO()
        df.to_parquet(buf, index=False)
        _atomic_write(paths[name], buf.getvalue())
    paths["scenario"] = os.path.join(out_dir, "scenario.yaml")
    _atomic_write(paths["scenario"], result.scenario.to_yaml().encode())
    paths["report"] = os.path.join(out_dir, "report.html")
    _atomic_write(paths["report"], render_html(result).encode())
    return paths


def render_html(result) -> str:
    """The report: verdict, table, plots (embedded PNGs), notes and the scenario."""
    sc = result.scenario
    pols = list(result.summary["policy"])
    phase = workload_class(sc.workload).measure_phase
    images = [
        ("THP coverage over time", plot_coverage(result.samples, pols)),
        ("Write latency CDF", plot_latency_cdf(result.ops, pols, phase)),
        ("Memory over time", plot_memory(result.ops, pols)),
    ]
    head = "".join(f"<th>{html.escape(h)}</th>" for _c, h, _s in TABLE)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                   for row in table_rows(result.summary))
    figs = "".join(f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' "
                   f"src='data:image/png;base64,{base64.b64encode(png).decode()}'/>" for title, png in images)
    model = result.summary["latency_model"].iloc[0] if len(result.summary) else ""
    wall = ", ".join(f"{p}: {s:.2f} s" for p, s in result.wall_s.items())
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>thpcow compare: {html.escape(sc.name)}</title>
<style>body{{font-family:sans-serif;max-width:70em;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #bbb;padding:2px 6px;text-align:right}}td:first-child{{text-align:left}}
pre{{background:#f4f4f4;padding:1em}}</style></head><body>
<h1>thpcow compare: {html.escape(sc.name)}</h1>
<p>{html.escape(sc.description)}</p>
<p><b>{html.escape(verdict(result.summary))}</b></p>
<table><tr>{head}</tr>{body}</table>
<p>Counters and COW MiB (sim_cow_bytes + sim_collapse_bytes) are vmstat deltas from just before the
first fork to the end. Peak: max of (nr_frames - nr_free) x 4 KiB after every op. Latency: modelled
cost of each write batch of the <i>{html.escape(phase)}</i> phase ({html.escape(model)}). THP: the
parent's AnonHugePages / Anonymous over time. TLB misses: page walks of the workload's loads and stores
from the first fork on, replayed through the TLB simulator of thpcow.machine (preset
<i>{html.escape(sc.machine)}</i>; it is flushed wherever the simulated kernel flushed: COW remaps,
PMD splits, collapses, unmaps, swap-out, migration, fork and exit; n/a without thpcow.machine or with
<code>tlb_model: false</code>); TLB ms: the translation time it estimates (not in the latencies). Model ms: sum of
the modelled cost of every op.</p>
{figs}
<h2>Scenario</h2><pre>{html.escape(sc.to_yaml())}</pre>
<p>Simulated on the host in {html.escape(wall)}.</p>
</body></html>
"""
