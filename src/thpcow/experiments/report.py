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

# Columns of the printed table: (column, header, format), in groups that are kept together when a
# narrow terminal splits the table.
TABLE_GROUPS: tuple[tuple[tuple[str, str, str], ...], ...] = (
    (("cow_mib", "COW MiB", "{:.1f}"), ("collapse_mib", "collapse MiB", "{:.1f}"),
     ("zero_mib", "zeroed MiB", "{:.1f}"), ("peak_mib", "peak MiB", "{:.1f}")),
    (("pgfault", "pgfault", "{:d}"), ("thp_fault_alloc", "thp_fault_alloc", "{:d}"),
     ("thp_split_pmd", "thp_split_pmd", "{:d}"), ("thp_collapse_alloc", "thp_collapse_alloc", "{:d}"),
     ("pgreuse", "pgreuse", "{:d}")),
    (("lat_p50_us", "p50 µs", "{:.1f}"), ("lat_p99_us", "p99 µs", "{:.1f}"),
     ("lat_p999_us", "p99.9 µs", "{:.1f}"), ("lat_max_us", "max µs", "{:.1f}")),
    (("thp_mean", "THP mean", "{:.2f}"), ("thp_end", "THP end", "{:.2f}"),
     ("tlb_misses", "TLB misses", "{:.0f}"), ("tlb_ms", "TLB ms", "{:.2f}"),
     ("model_ms", "fg ms", "{:.1f}"), ("bg_ms", "bg ms", "{:.1f}")),
    (("read_p99_us", "read p99 µs", "{:.1f}"), ("ops_per_s", "ops/s", "{:.0f}"),
     ("loads_per_s", "loads/s", "{:.3g}"), ("end_ms", "end ms", "{:.1f}")),
)
TABLE = (("policy", "policy", "{}"),) + tuple(c for g in TABLE_GROUPS for c in g)

# What the table's columns mean (printed under it and in the report).
TABLE_NOTES = (
    "MiB: bytes moved from the fork on: COW copies, collapse copies (khugepaged and MADV_COLLAPSE), "
    "pages cleared for faults; peak: most memory in use.  Counters: /proc/vmstat deltas from the "
    "fork on.  µs: modelled latency of one write op (one batch of stores; read p99: of one read op) "
    "of the measured phase, under an open loop its wait included.  "
    "THP: the parent's AnonHugePages / Anonymous.  fg ms: modelled time of the workload's ops; "
    "bg ms: of the kernel threads (khugepaged) between them.  ops/s, loads/s: read and write ops, and "
    "loads, per second of modelled time from the fork to the last one's completion; end ms: when the "
    "run ends on the modelled clock (under a loop, later as ops get slower).")

# --rank-by: (label, the figure, sign: 1 lower is better, -1 higher is better, unit, decimals).
RANK_BY: dict[str, tuple[str, Any, int, str, int]] = {
    "p99": ("p99 write-op latency", "lat_p99_us", 1, " µs", 1),
    "cow": ("COW bytes copied", "cow_mib", 1, " MiB", 1),
    "copied": ("bytes copied in all (COW + collapse)", lambda r: r["cow_mib"] + r["collapse_mib"], 1, " MiB", 1),
    "peak": ("peak memory", "peak_mib", 1, " MiB", 1),
    "thp": ("THP coverage (mean)", "thp_mean", -1, "", 2),
    "cpu": ("CPU time (fg + bg)", lambda r: r["model_ms"] + r["bg_ms"], 1, " ms", 1),
    "tput": ("throughput (read and write ops/s)", "ops_per_s", -1, " ops/s", 0),
}
DEFAULT_RANK_BY = "p99"


def _loop_note(sc) -> str:
    """How the scenario's ops are clocked, for the report."""
    if sc.loop == "none":
        return " (ops start at the workload's times; latency is an op's own cost)"
    extra = f", think {sc.think_us:g} µs" if sc.loop == "closed" and sc.think_us else ""
    cores = f"background on {sc.cores} cores shared with the clients" if sc.cores else "background free"
    how = ("queueing per client, latency includes the wait" if sc.loop == "open"
           else "a slower op delays its client's later ops")
    return f" ({how}{extra}; {cores})"


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


def _figure_of(rec: dict, how) -> Any:
    return how(rec) if callable(how) else rec.get(how)


def _failed(rec: dict) -> bool:
    return bool(rec.get("oom")) or bool(rec.get("oops"))


def ranked(summary, rank_by: str = DEFAULT_RANK_BY):
    """The summary rows ordered by ``rank_by`` (best first; runs that OOM or oopsed last)."""
    if rank_by not in RANK_BY:
        raise ValueError(f"--rank-by={rank_by}: expected one of {', '.join(RANK_BY)}")
    _label, how, sign, _unit, _nd = RANK_BY[rank_by]
    recs = summary.to_dict("records")
    order = sorted(range(len(recs)), key=lambda i: (_failed(recs[i]), _key(_figure_of(recs[i], how), sign), i))
    return summary.iloc[order].reset_index(drop=True)


def table_rows(summary) -> list[list[str]]:
    """The summary as rows of formatted cells, in TABLE order (an OOM or oopsed run is marked)."""
    out = []
    for rec in summary.to_dict("records"):
        row = [fmt(rec.get(col), spec) for col, _h, spec in TABLE]
        if rec.get("oom"):
            row[0] += " (OOM)"
        if rec.get("oops"):
            row[0] += " (oops)"
        out.append(row)
    return out


def column_widths(rows: list[list[str]], headers: list[str]) -> list[int]:
    """Each column's printed width: its widest cell or header."""
    return [max([len(headers[i])] + [len(r[i]) for r in rows]) for i in range(len(headers))]


def table_chunks(rows: list[list[str]], width: int, headers: list[str] | None = None,
                 groups: list[int] | None = None) -> list[list[int]]:
    """Column indexes (after the first column, 0, which every table repeats) of each table that fits
    ``width`` columns.

    Every cell is printed whole: a table is as wide as its widest cells and
    headers, plus 3 columns per column and 1 (rich's borders and padding).
    ``groups`` (sizes; default: TABLE_GROUPS) are kept together when they fit;
    one too wide for a table of its own is split column by column.
    """
    headers = headers if headers is not None else [h for _c, h, _s in TABLE]
    if groups is None:
        groups = [len(g) for g in TABLE_GROUPS] if headers == [h for _c, h, _s in TABLE] else \
            [1] * (len(headers) - 1)
    widths = column_widths(rows, headers)
    base = widths[0] + 3 + 1
    chunks: list[list[int]] = []
    cur: list[int] = []
    used = base
    i = 1
    for size in groups:
        idx = list(range(i, i + size))
        i += size
        need = sum(widths[j] + 3 for j in idx)
        if cur and used + need > width:
            chunks.append(cur)
            cur, used = [], base
        if used + need <= width:
            cur += idx
            used += need
            continue
        for j in idx:                               # a group too wide for one table: column by column
            if cur and used + widths[j] + 3 > width:
                chunks.append(cur)
                cur, used = [], base
            cur.append(j)
            used += widths[j] + 3
    if cur:
        chunks.append(cur)
    return chunks


def verdict(summary, rank_by: str = DEFAULT_RANK_BY) -> str:
    """One line: the leader by ``rank_by`` first, then who leads on each figure (ties listed in full)."""
    recs = [r for r in summary.to_dict("records")]
    if not recs:
        return "verdict: no policy was run"
    ok = [r for r in recs if not _failed(r)] or recs
    oom = [r["policy"] for r in recs if r.get("oom")]
    oops = [f"{r['policy']} ({r['oops']})" for r in recs if r.get("oops")]
    parts, leaders = [], []
    looped = any(r.get("loop") not in (None, "none") for r in recs)
    for key in [rank_by] + [k for k in RANK_BY if k != rank_by]:
        if key == "tput" and not looped and key != rank_by:
            continue                      # without a loop, the ops run at the workload's times
        label, how, sign, unit, nd = RANK_BY[key]
        best = min(_key(_figure_of(r, how), sign) for r in ok)
        if math.isinf(best):
            continue
        tied = [r["policy"] for r in ok if _key(_figure_of(r, how), sign) == best]
        value = fmt(_figure_of(next(r for r in ok if r["policy"] == tied[0]), how), f"{{:.{nd}f}}")
        word = "lowest" if sign > 0 else "best"
        if key in ("cow", "copied"):
            word = "least"
        text = f"{word} {label}: {', '.join(tied)} ({value}{unit})"
        if key == rank_by:
            text += f" [ranked by this: --rank-by {key}" + (", the default]" if key == DEFAULT_RANK_BY else "]")
        parts.append(text)
        leaders.append(tuple(tied))
    tail = (f"; out of memory: {', '.join(oom)}" if oom else "") + \
        (f"; the kernel oopsed: {', '.join(oops)}" if oops else "")
    if len(recs) > 1 and leaders and all(len(t) == 1 and t == leaders[0] for t in leaders):
        return f"verdict: {leaders[0][0]} is best on every count (" + "; ".join(parts) + ")" + tail
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


def _coincide(curves: dict[str, tuple]) -> dict[str, str]:
    """Legend labels: a policy whose curve equals an earlier one's says so ("= upstream")."""
    import numpy as np

    labels, seen = {}, []
    for pol, (x, y) in curves.items():
        same = next((q for q, (qx, qy) in seen if len(qx) == len(x) and np.array_equal(qx, x)
                     and np.allclose(qy, y, equal_nan=True)), None)
        labels[pol] = f"{pol} (= {same})" if same else pol
        seen.append((pol, (x, y)))
    return labels


def _events(ax, ops, pol: str) -> None:
    """Mark the forks and exits of one policy's run on a time axis (ms)."""
    o = ops[(ops["policy"] == pol) & ops["kind"].isin(["fork", "exit"])]
    for t, kind in zip(o["t_ns"] / 1e6, o["kind"]):
        ax.axvline(t, color="0.6" if kind == "exit" else "0.3", linewidth=0.7,
                   linestyle=":" if kind == "exit" else "--", zorder=0)


def plot_coverage(samples, policies: list[str], ops=None) -> bytes:
    """THP coverage (AnonHugePages / Anonymous) over simulated time: the parent (solid) and the
    children together (dashed), one colour per policy; forks (--) and exits (:) marked."""
    import numpy as np

    plt, fig, ax = _figure()
    curves = {}
    for pol in policies:
        s = samples[samples["policy"] == pol]
        curves[pol] = (s["t_ns"].to_numpy(), np.concatenate([s["thp_coverage"].to_numpy(),
                                                             s["child_thp_coverage"].to_numpy()]))
    labels = _coincide(curves)
    for i, pol in enumerate(policies):
        s = samples[samples["policy"] == pol]
        line = ax.step(s["t_ns"] / 1e6, s["thp_coverage"], where="post", label=f"{labels[pol]}: parent",
                       **_style(i))[0]
        if s["child_thp_coverage"].notna().any():
            ax.step(s["t_ns"] / 1e6, s["child_thp_coverage"], where="post", color=line.get_color(),
                    linestyle="--", linewidth=1.0, alpha=0.8, label=f"{labels[pol]}: children")
    if ops is not None and len(policies):
        _events(ax, ops, policies[0])
    ax.set(xlabel="simulated time (ms); forks --, exits :", ylabel="AnonHugePages / Anonymous",
           ylim=(-0.02, 1.02), title="THP coverage over time")
    ax.legend(fontsize=7)
    return _png(plt, fig)


def plot_latency_cdf(ops, policies: list[str], phase: str) -> bytes:
    """The tail of the write-op latency in the measured phase: 1 - CDF on log-log axes (the
    fraction of write ops slower than x), one line per policy, as latency plots in the field do."""
    import numpy as np

    plt, fig, ax = _figure()
    curves = {}
    for pol in policies:
        o = ops[(ops["policy"] == pol) & (ops["kind"] == "write") & (ops["phase"] == phase)]
        lat = np.sort(o["cost_ns"].to_numpy() / 1000.0)
        curves[pol] = (lat, 1.0 - np.arange(len(lat)) / max(len(lat), 1))
    labels = _coincide(curves)
    for i, pol in enumerate(policies):
        lat, tail = curves[pol]
        if len(lat):
            ax.step(lat, tail, where="post", label=labels[pol], **_style(i))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set(xlabel="latency of one write op (µs, modelled)", ylabel="fraction of write ops slower (1 - CDF)",
           title=f"write-op latency tail ({phase} phase)")
    for q in (0.01, 0.001):
        ax.axhline(q, color="0.8", linewidth=0.6, zorder=0)
    ax.legend(fontsize=7)
    return _png(plt, fig)


def plot_memory(ops, policies: list[str]) -> bytes:
    """Memory in use ((nr_frames - nr_free) x 4 KiB) after every op, one line per policy."""
    plt, fig, ax = _figure()
    curves = {pol: (ops.loc[ops["policy"] == pol, "t_ns"].to_numpy(),
                    ops.loc[ops["policy"] == pol, "mem_bytes"].to_numpy()) for pol in policies}
    labels = _coincide(curves)
    for i, pol in enumerate(policies):
        o = ops[ops["policy"] == pol]
        ax.step(o["t_ns"] / 1e6, o["mem_bytes"] / (1 << 20), where="post", label=labels[pol], **_style(i))
    if len(policies):
        _events(ax, ops, policies[0])
    ax.set(xlabel="simulated time (ms); forks --, exits :", ylabel="memory in use (MiB)",
           title="memory over time")
    ax.legend(fontsize=7)
    return _png(plt, fig)


def plot_cost_benefit(summary) -> bytes:
    """One point per policy: what it copied (COW + collapse MiB) against the translation time it
    saved (TLB ms below the policy that spends the most on translation)."""
    import numpy as np

    plt, fig, ax = _figure()
    recs = summary.to_dict("records")
    tlb = np.array([r.get("tlb_ms", np.nan) for r in recs], dtype=float)
    worst = np.nanmax(tlb) if np.isfinite(tlb).any() else np.nan
    for i, r in enumerate(recs):
        x = r["cow_mib"] + r.get("collapse_mib", 0.0)
        y = worst - tlb[i] if np.isfinite(tlb[i]) else np.nan
        if np.isfinite(y):
            ax.scatter([x], [y], marker="os^Dv<>p"[i % 8], s=36, label=r["policy"])
            ax.annotate(r["policy"], (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set(xlabel="copied (COW + collapse, MiB): the cost", ylabel="TLB time saved (ms): the benefit",
           title="what each policy copies against the translation time it saves")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    return _png(plt, fig)


BASELINE = "upstream"


def crossover(ops, policies: list[str], base: str = BASELINE) -> dict[str, dict[str, Any]]:
    """Where keeping THPs pays back, from one run: for each policy but ``base``, over the ops from the
    first fork on, in stream order (``seq``, the same for every policy), ``x`` = the loads made so far
    per byte the policy has copied so far (COW + collapse), ``y`` = the CPU time (fg + bg, modelled,
    ms) the policy is ahead of ``base`` so far; ``cross`` = the x from which it stays ahead (linear
    between two points; NaN if it never gets ahead, 0 if it always was).  Empty without ``base`` or
    without loads."""
    import numpy as np

    if base not in policies or ops is None or not len(ops):
        return {}
    since = ops[ops["since_fork"].astype(bool)]
    if not (since["kind"] == "read").any():
        return {}

    def cumulative(pol: str):
        o = since[since["policy"] == pol]
        g = o.assign(loads=np.where(o["kind"] == "read", o["n"], 0),
                     copied=o["sim_cow_bytes"] + o["sim_collapse_bytes"]).groupby("seq")[
            ["cost_ns", "loads", "copied"]].sum()
        return g

    ref = cumulative(base)
    out: dict[str, dict[str, Any]] = {}
    for pol in policies:
        if pol == base:
            continue
        g = cumulative(pol)
        seqs = ref.index.union(g.index)
        a, b = ref.reindex(seqs, fill_value=0).cumsum(), g.reindex(seqs, fill_value=0).cumsum()
        copied = b["copied"].to_numpy(dtype=float)
        ok = copied > 0
        x = b["loads"].to_numpy(dtype=float)[ok] / copied[ok]
        y = (a["cost_ns"].to_numpy(dtype=float) - b["cost_ns"].to_numpy(dtype=float))[ok] / 1e6
        cross = math.nan
        if len(y) and y[-1] > 0:
            behind = np.nonzero(y <= 0)[0]
            if not len(behind):
                cross = 0.0
            else:
                i = int(behind[-1])
                x0, x1, y0, y1 = x[i], x[i + 1], y[i], y[i + 1]
                cross = float(x0 + (x1 - x0) * (-y0) / (y1 - y0)) if y1 != y0 else float(x1)
        out[pol] = {"x": x, "y": y, "cross": cross}
    return out


def plot_crossover(ops, policies: list[str], base: str = BASELINE) -> bytes | None:
    """The crossover chart: each policy's CPU-time advantage over ``base`` against the loads made per
    byte it copied, as the run goes (see :func:`crossover`); None when the run has no loads."""
    curves = crossover(ops, policies, base)
    if not curves:
        return None
    plt, fig, ax = _figure()
    for i, (pol, c) in enumerate(curves.items()):
        pos = c["x"] > 0                            # log axis: from the first load on
        line = ax.plot(c["x"][pos], c["y"][pos], label=pol, **_style(i))[0]
        if math.isfinite(c["cross"]) and c["cross"] > 0:
            ax.axvline(c["cross"], color=line.get_color(), linewidth=0.8, linestyle=":")
            ax.annotate(f"ahead from {c['cross']:.3g}", (c["cross"], 0.03), xycoords=("data", "axes fraction"),
                        fontsize=7, rotation=90, xytext=(3, 0), textcoords="offset points",
                        color=line.get_color(), va="bottom")
    ax.axhline(0, color="0.5", linewidth=0.8)
    if any((c["x"] > 0).any() for c in curves.values()):
        ax.set_xscale("log")
    ax.set(xlabel="loads so far per byte the policy copied so far (from the fork on)",
           ylabel=f"CPU time ahead of {base} so far (ms, fg + bg)",
           title=f"crossover: where keeping THPs pays back (above 0: ahead of {base})")
    ax.legend(fontsize=7)
    return _png(plt, fig)


def crossover_text(ops, policies: list[str], base: str = BASELINE) -> str:
    """One sentence per policy: from how many loads per copied byte it is ahead of ``base`` (or not)."""
    parts = []
    for pol, c in crossover(ops, policies, base).items():
        end = f"{c['y'][-1]:+.1f} ms at the end" if len(c["y"]) else "no copies"
        if math.isfinite(c["cross"]):
            parts.append(f"{pol} is ahead of {base} from {c['cross']:.3g} loads per copied byte ({end})")
        else:
            parts.append(f"{pol} does not get ahead of {base} in this run ({end})")
    return "; ".join(parts)


# -- files ------------------------------------------------------------------------------------
def _atomic_write(path: str, data: bytes) -> None:
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


# Units of columns that their names do not say (the suffixes _mib, _us, _ns, _ms, _kb, _bytes do).
UNITS = {"thp_mean": "ratio", "thp_min": "ratio", "thp_end": "ratio", "thp_child_mean": "ratio",
         "thp_child_min": "ratio", "thp_child_end": "ratio", "thp_coverage": "ratio",
         "child_thp_coverage": "ratio", "tlb_misses": "page walks", "tlb_walks": "page walks",
         "n": "accesses", "nbytes": "bytes", "nr_procs": "processes", "write_batches": "write ops"}
_SUFFIX_UNITS = (("_mib", "MiB"), ("_us", "µs"), ("_ns", "ns"), ("_ms", "ms"), ("_kb", "KiB"),
                 ("_bytes", "bytes"))


def unit_of(column: str) -> str:
    """The unit of a result column ("count" for vmstat counters, "" for labels)."""
    if column in UNITS:
        return UNITS[column]
    for suffix, unit in _SUFFIX_UNITS:
        if column.endswith(suffix):
            return unit
    from .runner import COUNTERS
    return "count" if column in COUNTERS else ""


def parquet_bytes(df, meta: dict) -> bytes:
    """A DataFrame as Parquet whose schema carries ``meta`` (key ``thpcow``: scenario, seed, profile,
    ...) and, per column, its unit (field metadata ``unit``)."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df, preserve_index=False)
    fields = [f.with_metadata({b"unit": unit_of(f.name).encode()}) for f in table.schema]
    schema = pa.schema(fields, metadata={**(table.schema.metadata or {}),
                                         b"thpcow": json.dumps(meta, default=str).encode()})
    buf = io.BytesIO()
    pq.write_table(table.cast(schema), buf)
    return buf.getvalue()


def write_results(result, out_dir: str) -> dict[str, str]:
    """Write the Parquet files, the scenario and the HTML report; returns {what: path}."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {name: os.path.join(out_dir, f"{name}.parquet") for name in ("summary", "ops", "samples")}
    model = str(result.summary["latency_model"].iloc[0]) if len(result.summary) else ""
    meta = {"scenario": result.scenario.name, "seed": result.scenario.seed, "workload": result.scenario.workload,
            "profile": result.scenario.profile or "reference", "latency_model": model}
    for name, df in (("summary", result.summary), ("ops", result.ops), ("samples", result.samples)):
        _atomic_write(paths[name], parquet_bytes(df, dict(meta, table=name)))
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
        ("THP coverage over time", plot_coverage(result.samples, pols, result.ops)),
        ("Write-op latency tail", plot_latency_cdf(result.ops, pols, phase)),
        ("Memory over time", plot_memory(result.ops, pols)),
        ("Cost and benefit", plot_cost_benefit(result.summary)),
    ]
    cross = plot_crossover(result.ops, pols)
    if cross is not None:
        images.append(("Crossover: loads per copied byte against the CPU time saved", cross))
    cross_text = crossover_text(result.ops, pols) if cross is not None else ""
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
.scroll{{overflow-x:auto;max-width:100%}}img{{max-width:100%;height:auto}}
td,th{{border:1px solid #bbb;padding:2px 6px;text-align:right}}td:first-child{{text-align:left}}
pre{{background:#f4f4f4;padding:1em}}</style></head><body>
<h1>thpcow compare: {html.escape(sc.name)}</h1>
<p>{html.escape(sc.description)}</p>
<p><b>{html.escape(verdict(result.summary))}</b></p>
<div class="scroll"><table><tr>{head}</tr>{body}</table></div>
<p>{html.escape(TABLE_NOTES)} Peak: max of (nr_frames - nr_free) x 4 KiB after every op.
Latency model: {html.escape(model)}; measured phase: <i>{html.escape(phase)}</i>. TLB misses: page walks
of the workload's loads and stores from the first fork on, replayed through the TLB simulator of
thpcow.machine (preset <i>{html.escape(sc.machine)}</i>; it is flushed wherever the simulated kernel
flushed: COW remaps, PMD splits, collapses, unmaps, swap-out, migration, fork and exit; n/a without
thpcow.machine or with <code>tlb_model: false</code>); TLB ms: the translation time it estimates (part of
each op's time, so of the latencies and fg ms, with <code>tlb_in_latency</code> or a loop).
Loop: <i>{html.escape(sc.loop)}</i>{html.escape(_loop_note(sc))}.</p>
{f"<p>Crossover: {html.escape(cross_text)}.</p>" if cross_text else ""}
{figs}
<h2>Scenario</h2><pre>{html.escape(sc.to_yaml())}</pre>
<p>Simulated on the host in {html.escape(wall)}.</p>
</body></html>
"""
