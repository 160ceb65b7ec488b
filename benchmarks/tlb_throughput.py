"""Benchmark: TLB-model throughput (accesses simulated per second) of the numba engine vs the plain-Python reference.

The stream: uniformly random 8-byte accesses over a region (default 1 GiB),
half of whose 2 MiB blocks are THP-mapped (page_shift 21) and half 4 KiB
(page_shift 12), 25 % stores, one address space, on the Zen 4 preset.  That
is close to the worst case: most accesses miss the L1 and most 4 KiB ones
miss the L2 too.  A second stream of the same shape over 16 MiB (every
translation fits the L2) is reported beside it.  The numba engine is warmed up first (its JIT compile or
cache load is reported separately, not counted); the stream is generated in
chunks outside the timed region; the baselines run a shorter prefix of the
same stream: the plain-Python reference engine, and the numba engine's own
code run as plain Python on NumPy arrays (a subprocess with
NUMBA_DISABLE_JIT=1); both must give the numba engine's counts.
Rates are accesses per CPU second of this (single-threaded) process, so that
other load on a shared machine does not count; wall seconds are reported too.
Target (issue 5): >= 50,000,000 accesses/s on one core.
The last printed line is one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from thpcow.machine import ReferenceTlbSimulator, TlbSimulator, get_preset

BASE = 0x7F00_0000_0000


def stream(rng: np.random.Generator, n: int, footprint: int, huge: np.ndarray):
    """One chunk of the random stream: addresses, store flags, page shifts."""
    off = rng.integers(0, footprint // 8, n, dtype=np.int64) * 8
    vaddr = (BASE + off).astype(np.uint64)
    page_shift = np.where(huge[off >> 21], 21, 12).astype(np.uint8)
    return vaddr, rng.random(n) < 0.25, page_shift


def measure(engine, preset: str, n: int, chunk: int, footprint: int, huge_fraction: float, seed: int):
    """Simulate n accesses in chunks; returns (CPU seconds, wall seconds in simulate(), the simulator)."""
    rng = np.random.default_rng(seed)
    huge = rng.random(footprint // (2 << 20) + 1) < huge_fraction
    sim = engine(get_preset(preset))
    cpu = wall = 0.0
    done = 0
    while done < n:
        m = min(chunk, n - done)
        v, w, ps = stream(rng, m, footprint, huge)
        c0, t0 = time.process_time(), time.perf_counter()
        sim.simulate(v, w, ps, 1)
        cpu += time.process_time() - c0
        wall += time.perf_counter() - t0
        done += m
    return cpu, wall, sim


def numpy_baseline(args, n: int, footprint: int) -> tuple[float, dict]:
    """Run the numba engine's code as plain Python/NumPy (JIT disabled) in a subprocess: (rate, counts)."""
    cmd = [sys.executable, __file__, "--numpy-baseline-child", str(n), "--footprint-gib", str(args.footprint_gib),
           "--huge-fraction", str(args.huge_fraction), "--preset", args.preset, "--seed", str(args.seed)]
    out = subprocess.run(cmd, env={**os.environ, "NUMBA_DISABLE_JIT": "1"}, capture_output=True, text=True,
                         check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    return res["rate"], res["stats"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10,000,000 accesses (under a minute)")
    ap.add_argument("--accesses", type=int, default=100_000_000)
    ap.add_argument("--baseline-accesses", type=int, default=300_000)
    ap.add_argument("--chunk", type=int, default=10_000_000, help="accesses per simulate() call")
    ap.add_argument("--footprint-gib", type=float, default=1.0)
    ap.add_argument("--huge-fraction", type=float, default=0.5)
    ap.add_argument("--preset", default="amd-zen4-genoa")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--numpy-baseline-accesses", type=int, default=20_000)
    ap.add_argument("--numpy-baseline-child", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    footprint = int(args.footprint_gib * (1 << 30))
    if args.numpy_baseline_child:
        n = args.numpy_baseline_child
        cpu, _, sim = measure(TlbSimulator, args.preset, n, n, footprint, args.huge_fraction, args.seed)
        print(json.dumps({"rate": n / cpu, "stats": sim.stats_dict()}))
        return 0
    if args.quick:
        args.accesses, args.baseline_accesses, args.numpy_baseline_accesses = 10_000_000, 200_000, 10_000

    # Warm-up: the first call compiles the kernels (or loads them from numba's cache).
    t0 = time.perf_counter()
    warm = TlbSimulator(get_preset(args.preset))
    warm.simulate(np.array([BASE, BASE + 4096], dtype=np.uint64), None, 12, 0)
    warm.invalidate_range(0, BASE, BASE + (2 << 20))
    jit_s = time.perf_counter() - t0

    numba_s, numba_wall, sim = measure(TlbSimulator, args.preset, args.accesses, args.chunk, footprint,
                           args.huge_fraction, args.seed)
    base_s, _, ref = measure(ReferenceTlbSimulator, args.preset, args.baseline_accesses,
                          args.baseline_accesses, footprint, args.huge_fraction, args.seed)
    # The reference replays the start of the same stream: its counts must equal a fresh numba run's.
    _, _, check = measure(TlbSimulator, args.preset, args.baseline_accesses, args.baseline_accesses,
                             footprint, args.huge_fraction, args.seed)
    identical = check.stats_dict() == ref.stats_dict()
    np_rate, np_stats = numpy_baseline(args, args.numpy_baseline_accesses, footprint)
    _, _, check_np = measure(TlbSimulator, args.preset, args.numpy_baseline_accesses,
                             args.numpy_baseline_accesses, footprint, args.huge_fraction, args.seed)
    identical = identical and check_np.stats_dict() == np_stats

    resident_s, _, _ = measure(TlbSimulator, args.preset, args.accesses, args.chunk, 16 << 20,
                               args.huge_fraction, args.seed + 1)
    numba_rate = args.accesses / numba_s
    base_rate = args.baseline_accesses / base_s
    l1 = sim.l1_for[0].name
    res = {
        "preset": args.preset,
        "accesses": args.accesses,
        "footprint_gib": args.footprint_gib,
        "huge_fraction": args.huge_fraction,
        "numba_accesses_per_s": round(numba_rate),
        "numba_cpu_seconds": round(numba_s, 3),
        "numba_accesses_per_s_l2_resident": round(args.accesses / resident_s),
        "numba_wall_seconds": round(numba_wall, 3),
        "jit_compile_or_load_seconds": round(jit_s, 3),
        "baseline_accesses": args.baseline_accesses,
        "baseline_accesses_per_s": round(base_rate),
        "ratio": round(numba_rate / base_rate, 1),
        "numpy_baseline_accesses": args.numpy_baseline_accesses,
        "numpy_baseline_accesses_per_s": round(np_rate),
        "ratio_vs_numpy": round(numba_rate / np_rate, 1),
        "reference_counts_identical": identical,
        "l1_miss_rate": round(sim.get_metric("misses", l1) / max(1, sim.get_metric("hits", l1)
                                                                 + sim.get_metric("misses", l1)), 4),
        "walks_per_access": round((sim.get_metric("walks_pmd") + sim.get_metric("walks_pte_pwc_hit")
                                   + sim.get_metric("walks_pte_pwc_miss")) / args.accesses, 4),
        "target_accesses_per_s": 50_000_000,
        "target_met": numba_rate >= 50_000_000,
    }
    print(f"numba:     {args.accesses:>12,} accesses in {numba_s:7.2f} CPU s = {numba_rate / 1e6:7.1f} M/s "
          f"(wall {numba_wall:.2f} s; JIT compile/load {jit_s:.2f} s, not counted)", file=sys.stderr)
    print(f"numba, 16 MiB footprint (L2-resident): {args.accesses / resident_s / 1e6:.1f} M/s", file=sys.stderr)
    print(f"reference: {args.baseline_accesses:>12,} accesses in {base_s:7.2f} s = {base_rate / 1e6:7.2f} M/s",
          file=sys.stderr)
    print(f"plain NumPy (the numba engine's code, JIT disabled): {args.numpy_baseline_accesses:,} accesses "
          f"= {np_rate / 1e6:.3f} M/s", file=sys.stderr)
    print(f"numba is {res['ratio']}x the reference, {res['ratio_vs_numpy']}x plain NumPy; "
          f"baseline counts identical to numba: {identical}", file=sys.stderr)
    print(json.dumps(res))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
