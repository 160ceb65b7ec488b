"""Benchmark: `redis-bgsave` with a 64 GiB THP-backed dataset and 10,000,000 writes, through the experiments API.

The scenario is built with :class:`thpcow.experiments.scenario.Scenario` and
run by :func:`thpcow.experiments.runner.run_point` under one COW policy
(``upstream``), exactly as ``thpcow compare`` runs a scenario file: the
workload's op stream, vmstat deltas and the modelled cost of every op,
THP-coverage samples, and the TLB model fed with every load and store.

The workload's timeline is chosen so that the parent makes exactly
``--writes`` stores after the load: the snapshot child scans the dataset at
``--scan-mib-s``, the parent forks after one tick, and the run lasts the
smallest number of ``--batch-ms`` ticks that (a) leaves a tail of at least a
fifth of the scan after the child exits and (b) divides the write count,
so that ``writes_per_s`` x run length is an exact integer per tick.  The
count is checked against the op records after the run.

RAM is the dataset plus the most that upstream COW can copy during the
snapshot (one 4 KiB page per write, at most the dataset) plus 1 GiB.

Figures: wall seconds of the whole run (op generation, the load, fork, the
snapshot, the tail), simulated writes per wall second, and the simulator's
peak memory (``resource.getrusage(RUSAGE_SELF).ru_maxrss``).
Target: the full run (64 GiB, 10M writes) in under 60 s on one core.
``--quick``: 8 GiB and 1,000,000 writes.  ``--profile`` runs it under
cProfile and prints where the time goes.  ``--tlb off`` runs the scenario
with ``tlb_model: false`` (no TLB model); the output says which was used.
The wall time is also broken down by op kind and phase (the benchmark wraps
``runner._Run.step`` and ``__init__`` for that; the figures are unchanged).
The last printed line is one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import resource
import sys
import time
from dataclasses import replace

import numpy as np

from thpcow.experiments import runner
from thpcow.experiments.scenario import Scenario
from thpcow.workloads import get_workload
from thpcow.workloads.base import per_tick

TARGET_SECONDS = 60.0
MIB = 1 << 20


def plan(dataset_mib: int, writes: int, scan_mib_s: float, batch_ms: float, value_size: int) -> dict:
    """Workload parameters that give exactly ``writes`` parent stores after the load."""
    base = dict(dataset_mib=dataset_mib, scan_mib_s=scan_mib_s, batch_ms=batch_ms, fork_after_ms=batch_ms,
                value_size=value_size, tail_ms=0.0)
    tick, fork_i, exit_i, _last, _per = get_workload("redis-bgsave", **base)._ticks()
    last_min = exit_i + max(1, (exit_i - fork_i) // 5)
    divisors = [d for d in range(last_min, 2 * last_min + 1) if writes % d == 0]
    last = divisors[0] if divisors else last_min
    params = dict(base, tail_ms=(last - exit_i) * batch_ms, writes_per_s=writes / (last * tick / 1e9))
    w = get_workload("redis-bgsave", **params)
    t, f, e, l, _p = w._ticks()
    total = int(per_tick(w.writes_per_s, t, l).sum())
    if total != writes:                                 # float rounding: nudge the rate
        params["writes_per_s"] = float(np.nextafter(params["writes_per_s"], np.inf))
        w = get_workload("redis-bgsave", **params)
        total = int(per_tick(w.writes_per_s, t, l).sum())
    if total != writes:
        raise SystemExit(f"redis_bgsave: cannot schedule exactly {writes} writes (got {total}); "
                         "try another --batch-ms or --scan-mib-s")
    return params


def build(args) -> Scenario:
    params = plan(args.dataset_mib, args.writes, args.scan_mib_s, args.batch_ms, args.value_size)
    params["key_dist"] = args.key_dist
    pages_per_write = -(-args.value_size // 4096)
    worst_cow_mib = min(args.dataset_mib, args.writes * pages_per_write * 4096 // MIB + 1)
    ram_mib = args.dataset_mib + worst_cow_mib + 1024
    return Scenario(workload="redis-bgsave", params=params, name=f"redis-bgsave-{args.dataset_mib // 1024}g",
                    ram_mib=ram_mib, seed=args.seed, policies=["upstream"],
                    sysfs={"enabled": "madvise", "defrag": "madvise"})


def run(sc: Scenario, tlb: bool) -> tuple[runner.PointResult, float, dict[str, float]]:
    """run_point() on the scenario; also the wall seconds spent per (op kind, phase), kernel setup included."""
    saved_step, saved_init = runner._Run.step, runner._Run.__init__
    wall: dict[str, float] = {}

    def step(self, it):
        t = time.perf_counter()
        try:
            saved_step(self, it)
        finally:
            key = f"{it.op.kind}/{it.op.phase}"
            wall[key] = wall.get(key, 0.0) + time.perf_counter() - t

    def init(self, *a, **kw):
        t = time.perf_counter()
        saved_init(self, *a, **kw)
        wall["setup (kernel, TLB)"] = time.perf_counter() - t

    sc = replace(sc, tlb_model=tlb)
    runner._Run.step, runner._Run.__init__ = step, init
    try:
        t0 = time.perf_counter()
        res = runner.run_point(sc, "upstream")
        return res, time.perf_counter() - t0, wall
    finally:
        runner._Run.step, runner._Run.__init__ = saved_step, saved_init


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="8 GiB and 1,000,000 writes (under a minute)")
    ap.add_argument("--dataset-mib", type=int, default=64 << 10)
    ap.add_argument("--writes", type=int, default=10_000_000)
    ap.add_argument("--key-dist", choices=("zipf", "uniform"), default="zipf")
    ap.add_argument("--value-size", type=int, default=1024)
    ap.add_argument("--scan-mib-s", type=float, default=512.0, help="snapshot child's read rate (MiB/s)")
    ap.add_argument("--batch-ms", type=float, default=100.0, help="one write batch per tick of this length")
    ap.add_argument("--tlb", choices=("on", "off"), default="on", help="feed the TLB model (runner default: on)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", action="store_true", help="run under cProfile and print the top functions")
    args = ap.parse_args(argv)
    if args.quick:
        args.dataset_mib, args.writes = 8 << 10, 1_000_000
    sc = build(args)
    w = sc.make_workload()
    tick, fork_i, exit_i, last, _per = w._ticks()
    print(f"scenario: {sc.name}, {sc.ram_mib} MiB RAM, seed {sc.seed}, policy upstream, "
          f"TLB model {args.tlb} (scenario tlb_model)", file=sys.stderr)
    print(f"workload: {w!r}", file=sys.stderr)
    print(f"  {last} ticks of {tick / 1e6:g} ms: fork at tick {fork_i}, child exits at tick {exit_i}, "
          f"{w.duration_ns() / 1e9:g} s simulated", file=sys.stderr)
    prof = cProfile.Profile() if args.profile else None
    if prof is not None:
        prof.enable()
    res, wall, parts = run(sc, args.tlb == "on")
    if prof is not None:
        prof.disable()
    ops = res.ops
    kinds = np.asarray(ops["kind"], dtype=object)
    phases = np.asarray(ops["phase"], dtype=object)
    n = np.asarray(ops["n"], dtype=np.int64)
    writes_done = int(n[(kinds == "write") & (phases != "load")].sum())
    snap_writes = int(n[(kinds == "write") & (phases == "snapshot")].sum())
    reads_done = int(n[kinds == "read"].sum())
    s = res.summary
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {
        "dataset_gib": args.dataset_mib / 1024,
        "writes": writes_done,
        "writes_in_snapshot": snap_writes,
        "child_loads": reads_done,
        "key_dist": args.key_dist,
        "ram_mib": sc.ram_mib,
        "seed": sc.seed,
        "tlb_model": args.tlb,
        "simulated_s": round(w.duration_ns() / 1e9, 3),
        "ticks": last,
        "seconds": round(wall, 2),
        "writes_per_s": round(writes_done / wall),
        "peak_rss_mib": round(peak_mib, 1),
        "profiled": bool(args.profile),
        "oom": bool(s["oom"]),
        "cow_mib": round(s["cow_mib"], 1),
        "peak_extra_mib": round(s["peak_extra_mib"], 1),
        "thp_split_pmd": s["thp_split_pmd"],
        "sim_cow_pages": s["sim_cow_pages"],
        "pgreuse": s["pgreuse"],
        "lat_p99_us": round(s["lat_p99_us"], 1),
        "thp_mean": round(s["thp_mean"], 3),
        "tlb_misses": None if s["tlb_misses"] != s["tlb_misses"] else int(s["tlb_misses"]),
        "model_ms": round(s["model_ms"], 1),
        "target_seconds": TARGET_SECONDS,
        "target_writes": args.writes,
        "target_met": bool(wall < TARGET_SECONDS and writes_done == args.writes),
    }
    if writes_done != args.writes:
        print(f"WARNING: {writes_done} writes simulated, expected {args.writes}", file=sys.stderr)
    parts["other (op generation, sampling, summary)"] = wall - sum(parts.values())
    print("wall seconds by op kind/phase: " + ", ".join(f"{k} {v:.2f}" for k, v in
                                                         sorted(parts.items(), key=lambda kv: -kv[1])), file=sys.stderr)
    out["wall_by_op"] = {k: round(v, 2) for k, v in sorted(parts.items(), key=lambda kv: -kv[1])}
    if prof is not None:
        buf = io.StringIO()
        st = pstats.Stats(prof, stream=buf).sort_stats("tottime")
        st.print_stats(25)
        st.sort_stats("cumulative").print_stats(40)
        print(buf.getvalue(), file=sys.stderr)
    print(f"{writes_done:,} writes ({snap_writes:,} during the snapshot) on {out['dataset_gib']:g} GiB: "
          f"{wall:.1f} s wall ({out['writes_per_s']:,} writes/s), peak RSS {out['peak_rss_mib']} MiB, "
          f"TLB model {args.tlb}; target < {TARGET_SECONDS:g} s: {'met' if out['target_met'] else 'NOT met'}",
          file=sys.stderr)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
