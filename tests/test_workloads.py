"""Workloads: deterministic op streams, validated parameters, and what each stream does to a kernel."""

from __future__ import annotations

import numpy as np
import pytest

from thpcow.kernel import PAGE_SIZE, Kernel
from thpcow.workloads import REGISTRY, get_workload, stream_digest, workload_class, write_trace
from thpcow.workloads import ops as O
from thpcow.workloads.base import keys, page_offsets, per_tick, span_offsets, zipf_ranks
from thpcow.workloads.ops import check_order

from conftest import thp_region

MIB = 1 << 20

# Small parameters for every workload (the trace one gets its file from the fixture).
SMALL = {
    "redis-bgsave": dict(dataset_mib=8, writes_per_s=20000, scan_mib_s=256, tail_ms=5),
    "copy-after-fork": dict(size_mib=8, copy_mib=4, range_kib=1024),
    "prefork-server": dict(data_mib=8, workers=3, serve_ms=20, share=0.05),
    "python-refcount": dict(data_mib=8, workers=3, serve_ms=20, touches_per_s=20000),
    "forkserver": dict(data_mib=8, children=40, hot_mib=1, pages_per_child=4),
}


@pytest.fixture
def trace_csv(tmp_path):
    """A small trace: populate 4 MiB of THP, fork, the child writes a few ranges, exits."""
    base = 0x7F0000000000
    rows = [(0, 10, "mmap", base, 4 * MIB), (0, 10, "madvise", base, 4 * MIB, "hugepage"),
            (0, 10, "write", base, 4 * MIB, 1), (1_000_000, 10, "fork", 0, 0, 11)]
    for i in range(8):
        rows.append((2_000_000 + i * 100_000, 11, "write", base + i * 300_000, 5000, 7))
    rows.append((2_000_000 + 8 * 100_000, 10, "read", base, 8192))
    rows.append((9_000_000, 11, "exit", 0, 0))
    path = tmp_path / "t.csv"
    write_trace(str(path), rows)
    return str(path)


def make(name: str, trace: str | None = None, **extra):
    params = dict(SMALL.get(name, {}), **extra)
    if name == "trace":
        params.setdefault("path", trace)
    return get_workload(name, **params)


def run_stream(ops, ram=256 * MIB, check=True) -> tuple[dict, int]:
    """Apply a stream to a fresh kernel (a minimal runner, independent of experiments/): vmstat, used pages."""
    k = Kernel(ram=ram, seed=0, check=check)
    k.sysfs.write("enabled", "madvise")
    procs, base = {}, {}
    for op in check_order(ops):
        k.run_until(max(op.t, k.now))
        p = procs.get(op.pid)
        if op.kind == O.SPAWN:
            procs[op.pid] = k.spawn()
        elif op.kind == O.MMAP:
            base[op.region] = p.mmap(op.length)
        elif op.kind == O.MADVISE:
            p.madvise(base[op.region] + op.offset, op.length, op.arg)
        elif op.kind == O.WRITE:
            p.write_many(base[op.region] + op.offsets, op.token)
        elif op.kind == O.READ:
            p.read_many(base[op.region] + op.offsets)
        elif op.kind == O.FORK:
            procs[op.arg] = p.fork()
        elif op.kind == O.EXIT:
            p.exit()
    return k.vmstat_snapshot(), k.mem.nr_frames - k.mem.nr_free


# -- determinism ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_same_seed_same_stream_and_same_results(name, trace_csv):
    a = list(make(name, trace_csv).ops(seed=3))
    b = list(make(name, trace_csv).ops(seed=3))
    assert len(a) == len(b) and all(x.same(y) for x, y in zip(a, b))
    assert stream_digest(a) == stream_digest(b)
    assert run_stream(a) == run_stream(b)


@pytest.mark.parametrize("name", sorted(set(REGISTRY) - {"trace"}))
def test_another_seed_another_stream(name):
    assert stream_digest(make(name).ops(seed=0)) != stream_digest(make(name).ops(seed=1))


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_streams_are_time_ordered_and_end_at_duration(name, trace_csv):
    w = make(name, trace_csv)
    ops = list(check_order(w.ops(0)))
    assert ops[0].kind == O.SPAWN and ops[-1].kind == O.END
    assert ops[-1].t == w.duration_ns()
    assert all(op.offsets is None or op.offsets.dtype == np.int64 for op in ops)
    assert w.measure_phase in {op.phase for op in ops}


# -- parameters ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(set(REGISTRY) - {"trace"}))
def test_defaults_are_valid_and_documented(name):
    cls = workload_class(name)
    w = cls()
    assert w.values() == {k: p.default for k, p in cls.params.items()}
    for key in cls.params:
        assert key in cls.describe()


@pytest.mark.parametrize("kwargs, words", [
    (dict(dataset_mib=0), ["dataset_mib=0", ">= 1"]),
    (dict(dataset_mib="big"), ["dataset_mib='big'", "integer"]),
    (dict(dataset_mib=2.5), ["dataset_mib=2.5", "integer"]),
    (dict(key_dist="pareto"), ["key_dist='pareto'", "uniform, zipf"]),
    (dict(thp="maybe"), ["thp='maybe'", "boolean"]),
    (dict(writes_per_s=-1), ["writes_per_s=-1", ">= 0"]),
    (dict(zipf_s=True), ["zipf_s=True", "number"]),
    (dict(value_size=4 * MIB), ["value_size=4194304", "<= 1048576"]),
    (dict(batch_ms=0), ["batch_ms=0", ">= 0.001"]),
    (dict(dataset=8), ["unknown parameter(s) dataset", "dataset_mib"]),
])
def test_bad_parameters_name_the_parameter(kwargs, words):
    with pytest.raises(ValueError) as exc:
        get_workload("redis-bgsave", **kwargs)
    for w in words:
        assert w in str(exc.value)


@pytest.mark.parametrize("name, kwargs, word", [
    ("copy-after-fork", dict(copy_mib=65), "copy_mib=65"),
    ("copy-after-fork", dict(range_kib=6), "range_kib=6"),
    ("copy-after-fork", dict(writer="both"), "writer='both'"),
    ("prefork-server", dict(share=1.5), "share=1.5"),
    ("prefork-server", dict(workers=0), "workers=0"),
    ("python-refcount", dict(object_size=12), "object_size=12"),
    ("forkserver", dict(hot_mib=128), "hot_mib=128"),
    ("forkserver", dict(children=0), "children=0"),
    ("trace", dict(path="/nonexistent.csv"), "path='/nonexistent.csv'"),
    ("trace", dict(), "path is required"),
])
def test_bad_parameters_of_each_workload(name, kwargs, word):
    with pytest.raises(ValueError, match="parameter") as exc:
        get_workload(name, **kwargs)
    assert word in str(exc.value) and name in str(exc.value)


def test_unknown_workload_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown workload 'memcached'; known: redis-bgsave"):
        get_workload("memcached")


def test_string_values_are_coerced_like_yaml_or_a_command_line():
    w = get_workload("redis-bgsave", dataset_mib="16", thp="false", zipf_s="1.2")
    assert (w.dataset_mib, w.thp, w.zipf_s) == (16, False, 1.2)


# -- helpers --------------------------------------------------------------------------------------
def test_span_offsets_one_store_per_page_touched():
    assert span_offsets(np.array([0, 8, 4000]), 200).tolist() == [0, 8, 4000, 4096]
    assert span_offsets(np.array([4090]), 9000).tolist() == [4090, 4096, 8192, 12288]
    assert page_offsets(100, 8192).tolist() == [100, 4096, 8192]


def test_per_tick_spreads_a_rate_exactly():
    c = per_tick(1500.0, 1_000_000, 1000)          # 1.5 per ms for 1 s
    assert c.sum() == 1500 and set(c.tolist()) == {1, 2}


def test_zipf_keys_are_skewed_and_in_range():
    rng = np.random.default_rng(0)
    r = zipf_ranks(rng, 100_000, 0.99, 200_000)
    assert r.min() >= 0 and r.max() < 100_000
    assert (r < 1000).mean() > 0.5                # the top 1 % of keys take most accesses
    k = keys(np.random.default_rng(0), 100_000, "zipf", 0.99, 200_000)
    assert k.min() >= 0 and k.max() < 100_000 and (k < 1000).mean() < 0.1   # scrambled over the key space
    u = keys(np.random.default_rng(0), 100_000, "uniform", 0.99, 200_000)
    assert abs((u < 50_000).mean() - 0.5) < 0.01


# -- what each stream does ------------------------------------------------------------------------
def test_redis_bgsave_timeline():
    w = make("redis-bgsave", batch_ms=1.0)
    ops = list(w.ops(0))
    fork = next(op for op in ops if op.kind == O.FORK)
    exit_ = next(op for op in ops if op.kind == O.EXIT)
    reads = [op for op in ops if op.kind == O.READ]
    writes = [op for op in ops if op.kind == O.WRITE and op.pid == 0 and op.phase != "load"]
    pages = np.concatenate([op.offsets for op in reads]) // PAGE_SIZE
    assert np.array_equal(pages, np.arange(8 * MIB // PAGE_SIZE))         # the child reads every page once, in order
    assert all(fork.t <= op.t <= exit_.t and op.pid == 1 for op in reads)
    assert exit_.t - fork.t == pytest.approx(8 / 256 * 1e9, rel=0.05)      # scan_mib_s
    assert sum(op.nbytes for op in writes) == 1024 * round(20000 * w.duration_ns() / 1e9)
    assert {op.phase for op in writes} == {"before", "snapshot", "after"}
    assert ops[ops.index(exit_) + 1].kind == O.PHASE_END


def test_copy_after_fork_rewrites_whole_disjoint_ranges():
    w = make("copy-after-fork", order="random")
    writes = [op for op in w.ops(0) if op.kind == O.WRITE and op.phase == "copy"]
    assert len(writes) == 4 and all(op.pid == 1 and op.nbytes == MIB for op in writes)
    starts = sorted(int(op.offsets[0]) for op in writes)
    assert all(s % MIB == 0 for s in starts) and len(set(starts)) == 4
    assert all(np.array_equal(op.offsets, op.offsets[0] + np.arange(256) * PAGE_SIZE) for op in writes)
    vm, _ = run_stream(w.ops(0))
    assert vm["sim_cow_bytes"] == 4 * MIB and vm["thp_split_pmd"] == len({s // (2 * MIB) for s in starts})


def test_copy_after_fork_sequential_order():
    w = make("copy-after-fork", order="sequential", range_kib=2048)
    ops = list(w.ops(0))
    assert [int(op.offsets[0]) for op in ops if op.kind == O.WRITE and op.phase == "copy"] == [0, 2 * MIB]


def test_prefork_workers_each_write_their_share():
    w = make("prefork-server")
    ops = list(w.ops(0))
    assert [op.arg for op in ops if op.kind == O.FORK] == [1, 2, 3]
    per = {pid: np.concatenate([op.offsets for op in ops if op.kind == O.WRITE and op.pid == pid])
           for pid in (1, 2, 3)}
    for offs in per.values():
        pages = offs // PAGE_SIZE
        assert len(pages) == len(np.unique(pages)) == round(0.05 * 2048)
    assert sorted(op.pid for op in ops if op.kind == O.EXIT) == [1, 2, 3]


def test_python_refcount_reads_are_writes_at_object_headers():
    w = make("python-refcount", object_size=64)
    writes = [op for op in w.ops(0) if op.kind == O.WRITE and op.pid > 0]
    offs = np.concatenate([op.offsets for op in writes])
    assert len(offs) == 3 * 20000 * 20 // 1000 and (offs % 64 == 0).all()
    vm, _ = run_stream(w.ops(0))
    assert vm["sim_cow_pages"] >= len(np.unique(offs // PAGE_SIZE)) // 3   # every page touched is COWed


def test_forkserver_children_are_short_lived():
    w = make("forkserver", lifetime_ms=0.5)
    ops = list(w.ops(0))
    forks = {op.arg: op.t for op in ops if op.kind == O.FORK}
    exits = {op.pid: op.t for op in ops if op.kind == O.EXIT}
    assert len(forks) == 40 and forks.keys() == exits.keys()
    assert all(exits[p] - forks[p] == 500_000 for p in forks)
    writes = [op for op in ops if op.kind == O.WRITE and op.pid > 0]
    assert all(op.n == 4 and (op.offsets < MIB).all() for op in writes)
    vm, used = run_stream(ops)
    assert vm["thp_split_pmd"] == 40 and used == run_stream(list(ops)[:5])[1]   # children leave nothing behind


def test_fork_touch_writes_n_pages_in_every_block():
    w = make("fork-touch", size_mib=8, pages_per_2m=5)
    ops = list(w.ops(0))
    assert [op.phase for op in ops if op.kind != O.WRITE or op.pid == 1][-4:] == ["fork", "write", "exit", "exit"]
    (write,) = [op for op in ops if op.kind == O.WRITE and op.pid == 1]
    blocks, pages = np.divmod(write.offsets // PAGE_SIZE, 512)
    assert np.array_equal(np.bincount(blocks), [5, 5, 5, 5]) and len(np.unique(write.offsets)) == 20
    vm, _ = run_stream(ops)
    assert vm["thp_split_pmd"] == 4 and vm["sim_cow_pages"] == 20
    with pytest.raises(ValueError, match="size_mib=3"):
        make("fork-touch", size_mib=3)


# -- traces -----------------------------------------------------------------------------------
def test_trace_replays_like_the_program_it_records(trace_csv):
    vm_trace, used_trace = run_stream(make("trace", trace_csv).ops(0))
    k = Kernel(ram=256 * MIB, seed=0, check=True)
    k.sysfs.write("enabled", "madvise")
    p = k.spawn()
    a = thp_region(p, 4 * MIB)
    k.run_until(1_000_000)
    c = p.fork()
    for i in range(8):
        k.run_until(2_000_000 + i * 100_000)
        c.write(a + i * 300_000, 5000, 7)
    k.run_until(2_800_000)
    p.read(a, 8192)
    k.run_until(9_000_000)
    c.exit()
    assert vm_trace == k.vmstat_snapshot() and used_trace == k.mem.nr_frames - k.mem.nr_free
    assert vm_trace["thp_split_pmd"] == 2


def test_trace_batches_writes_within_the_window(trace_csv):
    ops = list(make("trace", trace_csv, batch_ms=1.0).ops(0))
    child = [op for op in ops if op.kind == O.WRITE and op.pid == 1]
    assert len(child) == 1 and child[0].n == 8 * 2 + 1     # 5000 B at 300 KB strides: 2 pages each but one
    assert len([op for op in make("trace", trace_csv, batch_ms=0.05).ops(0) if op.kind == O.WRITE]) == 9


def test_trace_csv_and_parquet_give_the_same_stream(trace_csv, tmp_path):
    import pandas as pd

    pq = str(tmp_path / "t.parquet")
    pd.read_csv(trace_csv, dtype=str, keep_default_na=False).to_parquet(pq)
    assert stream_digest(make("trace", trace_csv).ops(0)) == stream_digest(make("trace", pq).ops(0))


@pytest.mark.parametrize("bad_row, words", [
    ((5, 10, "mprotect", 0, 4096), ["row 2", "op='mprotect'"]),
    ((-5, 10, "mmap", 0, 4096), ["row 2", "time_ns=-5 is before"]),
    ((5, 10, "write", 0x1000, 4096), ["row 2", "not inside one mapping of pid 10"]),
    ((5, 10, "fork", 0, 0), ["row 2", "fork needs arg"]),
    ((5, 10, "madvise", 0x7F0000000000, 4096, "sideways"), ["row 2", "arg='sideways'"]),
    ((5, 12, "exit", 0, 0), ["row 2", "pid 12 exits before it ran"]),
    ((5, 10, "munmap", 0x7F0000000000, 4096), ["row 2", "munmap must cover exactly one mapping"]),
    ((5, 10, "write", "0xzz", 4096), ["row 2", "address='0xzz' is not an integer"]),
])
def test_bad_trace_rows_are_named(tmp_path, bad_row, words):
    path = str(tmp_path / "bad.csv")
    write_trace(path, [(0, 10, "mmap", 0x7F0000000000, 2 * MIB), bad_row])
    with pytest.raises(ValueError) as exc:
        list(make("trace", path).ops(0))
    for w in words:
        assert w in str(exc.value)


def test_trace_missing_columns(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("time,pid,op\n0,1,mmap\n")
    with pytest.raises(ValueError, match="missing column"):
        list(make("trace", str(path)).ops(0))


def test_every_workload_runs_on_a_checked_kernel(trace_csv):
    for name in sorted(REGISTRY):
        vm, _ = run_stream(make(name, trace_csv).ops(0), check=True)
        assert vm["pgfault"] > 0, name



def test_prefork_workers_can_read_the_shared_state():
    """reads_per_tick: each worker loads that many random 8-byte places of all the data per tick;
    without it the stream is the same as before (no extra random draws)."""
    from thpcow.workloads.ops import READ
    w = get_workload("prefork-server", data_mib=8, workers=2, serve_ms=20, batch_ms=10, reads_per_tick=100)
    reads = [op for op in w.ops(seed=0) if op.kind == READ]
    assert len(reads) == 2 * 2 and all(len(op.offsets) == 100 and op.pid in (1, 2) for op in reads)
    assert all((op.offsets % 8 == 0).all() and (op.offsets < 8 << 20).all() for op in reads)
    plain = get_workload("prefork-server", data_mib=8, workers=2, serve_ms=20, batch_ms=10)
    assert stream_digest(plain.ops(seed=0)) == stream_digest(
        op for op in get_workload("prefork-server", data_mib=8, workers=2, serve_ms=20, batch_ms=10,
                                  reads_per_tick=0).ops(seed=0))


# -- reads in every workload ------------------------------------------------------------------
def _loads(w, seed=0):
    return [op for op in w.ops(seed=seed) if op.kind == O.READ]


def test_copy_after_fork_reader_loads_its_region_from_the_fork_to_the_childs_exit():
    """reads_per_s loads in read_batch_ms ticks by the reader, between the fork and the child's exit,
    in the copy phase and then the after phase; 8-byte aligned, within the region."""
    kw = dict(size_mib=8, copy_mib=4, range_kib=1024, copy_mib_s=1024, fork_after_ms=2, hold_ms=3)
    w = get_workload("copy-after-fork", reads_per_s=100_000, read_batch_ms=0.5, **kw)
    ops = list(w.ops(seed=1))
    fork = next(op for op in ops if op.kind == O.FORK)
    exit_ = next(op for op in ops if op.kind == O.EXIT)
    done = next(op for op in ops if op.kind == O.PHASE_END)
    reads = [op for op in ops if op.kind == O.READ]
    assert {op.pid for op in reads} == {0}
    assert all(fork.t <= op.t < exit_.t for op in reads)
    assert {op.phase for op in reads} == {"copy", "after"}
    assert all((op.phase == "copy") == (op.t < done.t) for op in reads)
    span_s = (exit_.t - fork.t) / 1e9
    assert sum(op.n for op in reads) == pytest.approx(100_000 * span_s, abs=1)
    offs = np.concatenate([op.offsets for op in reads])
    assert (offs % 8 == 0).all() and (offs >= 0).all() and (offs < 8 * MIB).all()
    assert [op.t for op in ops] == sorted(op.t for op in ops)
    for phase in ("copy", "after"):
        only = _loads(get_workload("copy-after-fork", reads_per_s=100_000, read_batch_ms=0.5, read_in=phase, **kw),
                      seed=1)
        assert {op.phase for op in only} == {phase}
        assert [op.t for op in only] == [op.t for op in reads if op.phase == phase]
    child = get_workload("copy-after-fork", reads_per_s=100_000, reader="child", **kw)
    assert {op.pid for op in _loads(child)} == {1}
    assert next(op for op in child.ops(0) if op.kind == O.FORK).needs == ((0, 0, 8 * MIB),)
    # Without reads the stream is the one it always was.
    assert stream_digest(get_workload("copy-after-fork", **kw).ops(1)) == stream_digest(
        op for op in ops if op.kind != O.READ)


def test_read_dist_sequential_continues_and_zipf_is_skewed():
    kw = dict(size_mib=4, copy_mib=1, range_kib=1024, fork_after_ms=1, hold_ms=2, reads_per_s=1_000_000)
    seq = _loads(get_workload("copy-after-fork", read_dist="sequential", **kw))
    offs = np.concatenate([op.offsets for op in seq])
    lines = 4 * MIB // 64
    assert (offs == (np.arange(len(offs)) % lines) * 64).all()      # one line after another, across batches
    zipf = np.concatenate([op.offsets for op in _loads(get_workload("copy-after-fork", read_dist="zipf", **kw))])
    uni = np.concatenate([op.offsets for op in _loads(get_workload("copy-after-fork", **kw))])
    top = lambda o: np.sort(np.unique(o // 64, return_counts=True)[1])[-10:].sum() / len(o)  # noqa: E731
    assert top(zipf) > 10 * top(uni)
    assert (zipf % 64 == 0).all() and (zipf < 4 * MIB).all()


def test_forkserver_children_load_the_data():
    w = get_workload("forkserver", data_mib=8, children=20, hot_mib=1, pages_per_child=2, reads_per_child=50,
                     read_dist="zipf")
    ops = list(w.ops(seed=2))
    reads = [op for op in ops if op.kind == O.READ]
    assert len(reads) == 20 and all(op.n == 50 for op in reads)
    assert sorted(op.pid for op in reads) == list(range(1, 21))
    for r in reads:                      # after its own fork and write, before its exit
        idx = ops.index(r)
        assert any(o.kind == O.FORK and o.arg == r.pid for o in ops[:idx])
        assert any(o.kind == O.EXIT and o.pid == r.pid for o in ops[idx:])
    assert all(op.needs == ((0, 0, 8 * MIB),) for op in ops if op.kind == O.FORK)
    assert stream_digest(w.ops(2)) == stream_digest(w.ops(2)) != stream_digest(w.ops(3))


def test_prefork_read_dist():
    w = get_workload("prefork-server", data_mib=8, workers=2, serve_ms=20, batch_ms=10, reads_per_tick=64,
                     read_dist="sequential")
    by = {}
    for op in _loads(w):
        by.setdefault(op.pid, []).append(op.offsets)
    for pid, chunks in by.items():       # each worker has its own cursor
        assert (np.concatenate(chunks) == np.arange(64 * len(chunks)) * 64).all()


@pytest.mark.parametrize("kwargs, word", [
    (dict(read_dist="random"), "read_dist"), (dict(reads_per_s=-1), "reads_per_s"),
    (dict(reader="both"), "reader"), (dict(read_batch_ms=0), "read_batch_ms")])
def test_bad_read_parameters_are_named(kwargs, word):
    with pytest.raises(ValueError, match=word):
        get_workload("copy-after-fork", **kwargs)


def test_workloads_with_reads_run_on_a_checked_kernel():
    for name, kw in (("copy-after-fork", dict(size_mib=8, copy_mib=4, range_kib=1024, reads_per_s=200_000)),
                     ("forkserver", dict(data_mib=8, children=10, hot_mib=1, reads_per_child=100))):
        vm, _ = run_stream(get_workload(name, **kw).ops(0), check=True)
        assert vm["pgfault"] > 0, name
