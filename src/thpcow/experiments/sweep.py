"""Sweeps: a grid of scenario parameters x COW policies, run locally or on Dask, resumable.

Grid file schema::

    name: redis-sizes          # default: the grid file name without .yaml
    scenario: default          # "default", a scenario file (relative to this file), or an inline scenario
    policies: [upstream, thp-cow-v1]   # default: the scenario's
    grid:                      # dotted scenario fields -> the values to try; the product is run
      workload.dataset_mib: [64, 128]
      fragmentation: [0.0, 0.5]
      sysfs.khugepaged/max_ptes_shared: [0, 256]

Every (grid combination, policy) is a *point*, identified by a hash of the
scenario it runs (everything but name/description) and the policy.  A
finished point is stored at once as ``OUT/points/<id>.parquet`` (written to a
hidden temporary name, then renamed), so a sweep killed at any moment loses
only the points that were running; run it again with the same OUT and it
skips the stored ones (two sweeps must not share one OUT at the same
time).  ``OUT/points/`` is one Parquet dataset
(``pandas.read_parquet(OUT + "/points")``); ``OUT/summary.png`` plots it.
``OUT/runlog/<id>.log`` gets a line when a point is started (``run``), stored
(``stored``) or fails (``failed``), with the sweep session's id.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import io
import itertools
import json
import multiprocessing
import os
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from .scenario import (
    DEFAULT_PATH, FIELDS, Scenario, ScenarioError, compose, err, mapping, scenario_from_node, value_of,
)

GRID_FIELDS = ("name", "scenario", "policies", "grid")
GRID_DOCS = {
    "name": "the grid's name (default: the grid file name without .yaml)",
    "scenario": "\"default\" (the built-in scenario), a scenario file (relative to the grid file) or an "
                "inline scenario mapping (the scenario schema above)",
    "policies": "list of COW policies (default: the scenario's)",
    "grid": "mapping of dotted scenario fields (`seed`, `ram_mib`, `workload.dataset_mib`, "
            "`sysfs.khugepaged/max_ptes_shared`, ...) to lists of values; every combination of the "
            "lists is run with every policy",
}
IDENTITY_SKIP = ("name", "description", "policies")


@dataclass
class Point:
    """One (grid combination, policy): its id, the grid values and the scenario to run."""

    id: str
    index: int
    values: dict[str, Any]
    policy: str
    scenario: Scenario


@dataclass
class Grid:
    name: str
    source: str
    axes: list[str]
    points: list[Point]


def with_profile(grid: Grid, profile: str) -> Grid:
    """The grid with every point priced by the latency profile file ``profile`` (new point ids)."""
    from dataclasses import replace
    points = []
    for p in grid.points:
        sc = replace(p.scenario, profile=profile)
        points.append(replace(p, id=point_id(sc, p.policy), scenario=sc))
    return replace(grid, points=points)


def point_id(sc: Scenario, policy: str) -> str:
    """A stable id: a hash of what the point runs (not of its position in the grid)."""
    ident = {k: v for k, v in sc.to_dict().items() if k not in IDENTITY_SKIP}
    blob = json.dumps({"scenario": ident, "policy": policy}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _override(node, parts: list[str], keynode, value):
    """A copy of mapping ``node`` with ``parts`` set to the node ``value`` (missing keys are added)."""
    import yaml

    items = list(node.value)
    key = parts[0]
    for i, (k, v) in enumerate(items):
        if value_of(k) == key:
            new = value if len(parts) == 1 else _override(v, parts[1:], keynode, value)
            items[i] = (k, new)
            break
    else:
        knew = yaml.ScalarNode("tag:yaml.org,2002:str", key, keynode.start_mark, keynode.end_mark)
        if len(parts) == 1:
            items.append((knew, value))
        else:
            sub = yaml.MappingNode("tag:yaml.org,2002:map", [], keynode.start_mark, keynode.end_mark)
            items.append((knew, _override(sub, parts[1:], keynode, value)))
    return yaml.MappingNode(node.tag, items, node.start_mark, node.end_mark, node.flow_style)


def _split(key: str) -> list[str]:
    head, dot, rest = key.partition(".")
    return [head, rest] if dot else [head]


def load_grid(path: str) -> Grid:
    """Read and validate a grid file, and every point's scenario (errors name the line)."""
    import yaml

    if not os.path.isfile(path):
        raise ScenarioError(path, None, "", "no such grid file")
    with open(path, encoding="utf-8") as fh:
        root = compose(fh.read(), path)
    fields = mapping(root, path, "")
    for key, (knode, _v) in fields.items():
        if key not in GRID_FIELDS:
            raise err(knode, key, f"unknown field; known: {', '.join(GRID_FIELDS)}")
    base_dir = os.path.dirname(os.path.abspath(path))
    name = os.path.splitext(os.path.basename(path))[0]
    if "name" in fields:
        name = value_of(fields["name"][1])
        if not isinstance(name, str):
            raise err(fields["name"][1], "name", "expected a string")
    base, base_src, base_dir_sc = _base_scenario(fields, path, base_dir)
    axes: list[tuple[str, Any, list]] = []
    if "grid" in fields:
        for key, (knode, vnode) in mapping(fields["grid"][1], path, "grid").items():
            parts = _split(key)
            if parts[0] not in FIELDS or parts[0] in IDENTITY_SKIP:
                raise err(knode, f"grid.{key}", f"not a scenario field to vary; one of "
                          f"{', '.join(f for f in FIELDS if f not in IDENTITY_SKIP)} (workload.X, sysfs.X)")
            if parts[0] in ("workload", "sysfs") and len(parts) == 1:
                raise err(knode, f"grid.{key}", f"name the {parts[0]} key to vary, e.g. {parts[0]}.X")
            if not isinstance(vnode, yaml.SequenceNode) or not vnode.value:
                raise err(vnode, f"grid.{key}", "expected a non-empty list of values")
            axes.append((key, knode, vnode.value))
    policies = None
    if "policies" in fields:
        pnode = fields["policies"][1]
        if not isinstance(pnode, yaml.SequenceNode) or not pnode.value:
            raise err(pnode, "policies", "expected a non-empty list of policy names")
        policies = pnode
    points: list[Point] = []
    for combo in itertools.product(*(vals for _k, _kn, vals in axes)):
        node = base
        for (key, knode, _vals), vnode in zip(axes, combo):
            node = _override(node, _split(key), knode, vnode)
        if policies is not None:
            node = _override(node, ["policies"], fields["policies"][0], policies)
        sc = scenario_from_node(node, base_src, base_dir_sc, name)
        values = {key: value_of(v) for (key, _kn, _vals), v in zip(axes, combo)}
        for pol in sc.policies:
            points.append(Point(point_id(sc, pol), len(points), values, pol, sc))
    seen: dict[str, int] = {}
    for p in points:
        if p.id in seen:
            raise ScenarioError(path, None, "grid", f"points #{seen[p.id]} and #{p.index} run the same scenario "
                                f"and policy ({p.policy}, {p.values})")
        seen[p.id] = p.index
    return Grid(name, path, [k for k, _kn, _v in axes], points)


def _base_scenario(fields, path: str, base_dir: str):
    """(scenario node, its source, its directory) of the grid's ``scenario`` field."""
    import yaml

    if "scenario" not in fields:
        spec_node = None
        spec = "default"
    else:
        spec_node = fields["scenario"][1]
        spec = spec_node if isinstance(spec_node, yaml.MappingNode) else value_of(spec_node)
    if isinstance(spec, yaml.MappingNode):
        return spec, path, base_dir
    if not isinstance(spec, str):
        raise err(spec_node, "scenario", "expected default, a scenario file or an inline scenario mapping")
    sc_path = DEFAULT_PATH if spec == "default" else spec if os.path.isabs(spec) else os.path.join(base_dir, spec)
    if not os.path.isfile(sc_path):
        raise err(spec_node, "scenario", f"no such scenario file {sc_path!r}")
    with open(sc_path, encoding="utf-8") as fh:
        return compose(fh.read(), sc_path), sc_path, os.path.dirname(os.path.abspath(sc_path))


# -- running ----------------------------------------------------------------------------------
def run_point_summary(scenario: Scenario, policy: str) -> dict[str, Any]:
    """Worker entry point: one point's summary row."""
    from .runner import run_point
    return run_point(scenario, policy).summary


def _axis_dtype(values: list[Any]) -> str:
    if all(isinstance(v, bool) for v in values):
        return "bool"
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return "int64"
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return "float64"
    return "string"


def _point_frame(grid: Grid, p: Point, row: dict[str, Any]):
    from .runner import summary_frame

    df = summary_frame([row])
    df.insert(0, "point", p.id)
    for i, axis in enumerate(grid.axes):
        if axis in df.columns:                  # seed, machine: the summary has them already
            continue
        dtype = _axis_dtype([q.values[axis] for q in grid.points])
        val = p.values[axis] if dtype != "string" else str(p.values[axis])
        df.insert(1 + i, axis, [val])
        df[axis] = df[axis].astype(dtype)
    return df


def _store(out: str, grid: Grid, p: Point, row: dict[str, Any]) -> None:
    """Write one point atomically: a hidden temporary file, then os.replace."""
    buf = io.BytesIO()
    _point_frame(grid, p, row).to_parquet(buf, index=False)
    final = os.path.join(out, "points", f"{p.id}.parquet")
    tmp = os.path.join(out, "points", f".{p.id}.parquet.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(buf.getvalue())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, final)


def _log(out: str, p: Point, session: str, what: str) -> None:
    with open(os.path.join(out, "runlog", f"{p.id}.log"), "a", encoding="utf-8") as fh:
        fh.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} session={session} {what}\n")


def stored_ids(out: str) -> set[str]:
    """Ids of the points already stored under ``out``."""
    d = os.path.join(out, "points")
    if not os.path.isdir(d):
        return set()
    return {f[:-len(".parquet")] for f in os.listdir(d) if f.endswith(".parquet") and not f.startswith(".")}


class _Serial:
    """Points one at a time in this process (``workers=1``): no pool to start."""

    slots = 1

    def submit(self, fn, *args):
        fut: cf.Future = cf.Future()
        try:
            fut.set_result(fn(*args))
        except Exception as exc:  # reported by the caller like a worker's failure
            fut.set_exception(exc)
        return fut

    def wait(self, futures):
        return set(futures)

    def close(self) -> None:
        pass


class _Local:
    """Points on local processes (concurrent.futures)."""

    def __init__(self, workers: int) -> None:
        self.slots = workers
        from . import _orphans
        ctx = multiprocessing.get_context("forkserver")
        # Workers fork from a server that has imported the simulator (and the TLB model) once;
        # the server and the workers die with this process, also on SIGKILL (_orphans).
        os.environ[_orphans.SWEEP_PID] = str(os.getpid())
        ctx.set_forkserver_preload(["thpcow.experiments._orphans", "thpcow.experiments.runner", "thpcow.machine"])
        self.pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx,
                                           initializer=_orphans.die_with_parent)

    def submit(self, fn, *args):
        return self.pool.submit(fn, *args)

    def wait(self, futures):
        done, _ = cf.wait(futures, return_when=cf.FIRST_COMPLETED)
        return done

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class _Dask:
    """Points on a Dask cluster: ``local`` starts a LocalCluster; otherwise a scheduler address."""

    def __init__(self, address: str, workers: int | None) -> None:
        from distributed import Client, LocalCluster

        self.cluster = None
        if address == "local":
            self.cluster = LocalCluster(n_workers=workers or 2, threads_per_worker=1, processes=True,
                                        dashboard_address=None)
            self.client = Client(self.cluster)
        else:
            self.client = Client(address)
        self.slots = max(sum(self.client.nthreads().values()), 1)

    def submit(self, fn, *args):
        return self.client.submit(fn, *args, pure=False)

    def wait(self, futures):
        from distributed import wait
        return wait(list(futures), return_when="FIRST_COMPLETED").done

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def run_sweep(grid: "Grid | str", out: str, *, scheduler: str | None = None, workers: int | None = None,
              progress: Callable[[int, int, Point | None], None] | None = None, plot: bool = True):
    """Run every point not yet stored under ``out``; returns the grid's results as a DataFrame.

    ``scheduler``: None for local processes (``workers`` of them, default
    half the CPUs; ``workers=1`` runs the points in this process), ``"local"``
    for a Dask LocalCluster of ``workers`` (default 2), or a Dask scheduler
    address.  ``progress(done, total,
    point)`` after each stored point (and once at the start with point None).
    Points that raise are logged and left unstored (a rerun retries them);
    a RuntimeError listing them is raised at the end.
    """
    g = load_grid(grid) if isinstance(grid, str) else grid
    if workers is not None and workers < 1:
        raise ValueError(f"workers={workers}: must be >= 1")
    os.makedirs(os.path.join(out, "points"), exist_ok=True)
    os.makedirs(os.path.join(out, "runlog"), exist_ok=True)
    for f in os.listdir(os.path.join(out, "points")):      # half-written files of a killed run
        if f.startswith(".") and f.endswith(".tmp"):
            os.remove(os.path.join(out, "points", f))
    session = uuid.uuid4().hex[:8]
    stored = stored_ids(out)
    todo = deque(p for p in g.points if p.id not in stored)
    done = len(g.points) - len(todo)
    if progress:
        progress(done, len(g.points), None)
    failures: list[tuple[Point, str]] = []
    if todo:
        nproc = workers or max(1, min((os.cpu_count() or 2) // 2, len(todo)))
        ex = _Dask(scheduler, workers) if scheduler else _Serial() if nproc == 1 else _Local(nproc)
        active: dict[Any, Point] = {}
        try:
            def submit_next() -> None:
                p = todo.popleft()
                _log(out, p, session, f"run policy={p.policy} values={json.dumps(p.values, default=str)}")
                active[ex.submit(run_point_summary, p.scenario, p.policy)] = p

            for _ in range(min(ex.slots, len(todo))):
                submit_next()
            while active:
                for fut in ex.wait(active):
                    p = active.pop(fut)
                    try:
                        row = fut.result()
                    except Exception as exc:  # a failed point: keep going, report at the end
                        failures.append((p, f"{type(exc).__name__}: {exc}"))
                        _log(out, p, session, f"failed {type(exc).__name__}: {exc}")
                    else:
                        _store(out, g, p, row)
                        _log(out, p, session, "stored")
                        done += 1
                        if progress:
                            progress(done, len(g.points), p)
                    if todo:
                        submit_next()
        finally:
            ex.close()
    df = load_results(out, g)
    if plot and len(df):
        plot_sweep(df, g, os.path.join(out, "summary.png"))
    if failures:
        lines = "; ".join(f"point {p.id} ({p.policy}, {p.values}): {msg}" for p, msg in failures)
        raise RuntimeError(f"{len(failures)} point(s) failed (a rerun retries them): {lines}")
    return df


def load_results(out: str, grid: Grid | None = None):
    """The stored points as one DataFrame (only the grid's points, in grid order, if a grid is given)."""
    import pandas as pd

    d = os.path.join(out, "points")
    if not stored_ids(out):
        return pd.DataFrame()
    df = pd.read_parquet(d)
    if grid is None:
        return df.reset_index(drop=True)
    order = {p.id: p.index for p in grid.points}
    df = df[df["point"].isin(order)].copy()
    df["_order"] = df["point"].map(order)
    return df.sort_values("_order").drop(columns="_order").reset_index(drop=True)


def plot_sweep(df, grid: Grid, path: str) -> None:
    """summary.png: bytes copied, p99 latency, peak memory, THP coverage, CPU time and translation
    time per grid combination and policy (where the policies' CPU time lines cross is the crossover),
    and under a loop the throughput (ops/s, loads/s)."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    short = {a: a.rsplit(".", 1)[-1].rsplit("/", 1)[-1] for a in grid.axes}
    labels = (df[grid.axes].astype(str).apply(lambda r: ", ".join(f"{short[a]}={r[a]}" for a in grid.axes), axis=1)
              if grid.axes else df["scenario"].astype(str))
    df = df.assign(_label=labels)
    cats = list(dict.fromkeys(df["_label"]))
    cpu = df["model_ms"] + (df["bg_ms"] if "bg_ms" in df.columns else 0.0)
    copied = df["cow_mib"] + (df["collapse_mib"] if "collapse_mib" in df.columns else 0.0)
    df = df.assign(_cpu=cpu, _copied=copied)
    panels = [("_copied", "copied: COW + collapse (MiB)"), ("lat_p99_us", "p99 write-op latency (µs)"),
              ("peak_mib", "peak memory (MiB)"), ("thp_mean", "THP coverage (mean)"),
              ("_cpu", "CPU time: fg + bg (ms, modelled)"), ("tlb_ms", "translation time (ms, TLB model)")]
    if "loop" in df.columns and (df["loop"].astype(str) != "none").any() and "loads_per_s" in df.columns:
        panels += [("ops_per_s", "throughput: read + write ops/s (loop)"),
                   ("loads_per_s", "throughput: loads/s (loop)")]
    fig, axs = plt.subplots(2, len(panels) // 2, figsize=(14 * len(panels) / 6, 7), dpi=100)
    for ax, (col, title) in zip(axs.flat, panels):
        for pol in dict.fromkeys(df["policy"]):
            s = df[df["policy"] == pol]
            ax.plot([cats.index(x) for x in s["_label"]], s[col], marker="o", label=pol)
        ax.set_title(title)
        ax.set_xticks(range(len(cats)))
        ax.set_xticklabels(cats, rotation=30, ha="right", fontsize=7)
    axs[0, 0].legend(fontsize=7)
    fig.suptitle(f"sweep {grid.name}: " + (", ".join(grid.axes) or "one scenario"))
    fig.tight_layout()
    tmp = os.path.join(os.path.dirname(path), ".summary.png.tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)

