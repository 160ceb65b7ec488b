"""The benchmarks still run against the code they measure (they wrap runner internals).

Each benchmark's own run function on a tiny size: a change to the runner that breaks a
benchmark's wrapper fails here instead of in `make bench`.
"""

from __future__ import annotations

import importlib.util
import pathlib
import types

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_redis_bgsave_benchmark_times_every_op_kind_of_a_small_run():
    bench = _load("redis_bgsave")
    args = types.SimpleNamespace(dataset_mib=16, writes=2000, scan_mib_s=512.0, batch_ms=100.0,
                                 value_size=1024, key_dist="zipf", seed=0)
    res, wall, parts = bench.run(bench.build(args), False)
    assert res.summary["thp_split_pmd"] > 0
    assert any(k.startswith("write/") for k in parts) and "setup (kernel, TLB)" in parts
    assert sum(parts.values()) <= wall * 1.05
